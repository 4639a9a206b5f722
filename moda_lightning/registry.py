"""A keyed registry with did-you-mean lookups, shared by the attention backends and the norm placements.

One class for every registry, so that registering twice, listing the keys and the wording of an
unknown-key error cannot drift apart between them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by short lowercase key; an unknown key lists the registered ones and the closest.

    Args:
        kind: what an entry is, as the errors name it (``"attention backend"``).
        how_to_pick: the sentence that ends an unknown-key error (``"Pick one with --model.attention=NAME."``).
        base: when given, only subclasses of it can be registered.
    """

    def __init__(self, kind: str, how_to_pick: str, base: type | None = None) -> None:
        self.kind = kind
        self.how_to_pick = how_to_pick
        self.base = base
        self._entries: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        """Decorator that adds its class (or function) under ``key``; a key taken already is an error."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"a {self.kind} is registered under a non-empty string key such as 'mine'; got {key!r}.")

        def add(entry: T) -> T:
            if self.base is not None and not (isinstance(entry, type) and issubclass(entry, self.base)):
                raise TypeError(f"{self.kind} {key!r} must be a subclass of {self.base.__name__}; got {entry!r}.")
            if key in self._entries:
                raise ValueError(
                    f"{self.kind} {key!r} is registered twice ({_qualname(self._entries[key])}, {_qualname(entry)}); "
                    "register the second one under another key, and import its module under one name only."
                )
            self._entries[key] = entry
            return entry

        return add

    def keys(self) -> list[str]:
        """Sorted keys of every entry."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(key, entry)`` pairs sorted by key."""
        return sorted(self._entries.items())

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> T:
        """The entry registered under ``key``; an unknown key raises ``ValueError`` naming the registered ones."""
        if key not in self._entries:
            hint = difflib.get_close_matches(str(key), self._entries, n=1)
            raise ValueError(
                f"unknown {self.kind} {key!r}; registered: {self.keys()}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f". {self.how_to_pick}"
            )
        return self._entries[key]


def _qualname(entry: object) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"
