"""Attention backends of the model: a small open registry keyed by short strings.

Importing this package registers the built-in backends (``sdpa``, ``moda_torch``,
``moda_triton``); another project adds one by decorating its class with
``@register_backend("name")`` before the model is built.
"""

from __future__ import annotations

import difflib

from moda_lightning.attention.base import AttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(key: str):
    """Class decorator that makes an :class:`AttentionBackend` selectable as ``--model.attention=key``."""

    def add(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        if key in _BACKENDS:
            raise ValueError(f"attention backend {key!r} is registered twice ({_BACKENDS[key].__name__}, {cls.__name__})")
        _BACKENDS[key] = cls
        return cls

    return add


def registered_backends() -> list[str]:
    """Sorted keys of every registered attention backend."""
    return sorted(_BACKENDS)


def backend_class(key: str) -> type[AttentionBackend]:
    """The backend class registered under ``key``; unknown keys list the registered ones."""
    if key not in _BACKENDS:
        hint = difflib.get_close_matches(key, _BACKENDS, n=1)
        raise ValueError(
            f"unknown attention backend {key!r}; registered: {registered_backends()}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". Pick one with --model.attention=NAME."
        )
    return _BACKENDS[key]


def build_backend(key: str) -> AttentionBackend:
    """Instantiate the backend ``key`` after checking it can run on this machine."""
    backend = backend_class(key)()
    backend.check_available()
    return backend


# Built-in backends register themselves on import.
from moda_lightning.attention import moda_torch, moda_triton, sdpa  # noqa: E402,F401

__all__ = ["AttentionBackend", "backend_class", "build_backend", "register_backend", "registered_backends"]
