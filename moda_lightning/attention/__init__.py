"""Attention backends of the model: a small open registry keyed by short strings.

Importing this package registers the built-in backends (``sdpa``, ``moda_torch``,
``moda_triton``); another project adds one by decorating its :class:`AttentionBackend` subclass
with ``@register_backend("name")`` in a module imported before the model is built (name that
module in ``--model.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable

from moda_lightning.attention.base import AttentionBackend
from moda_lightning.registry import Registry

_BACKENDS: Registry[type[AttentionBackend]] = Registry(
    "attention backend", "Pick one with --model.attention=NAME.", base=AttentionBackend
)


def register_backend(key: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator that makes an :class:`AttentionBackend` selectable as ``--model.attention=key``."""
    return _BACKENDS.register(key)


def registered_backends(*, reads_depth: bool | None = None) -> list[str]:
    """Sorted keys of the registered attention backends; with ``reads_depth``, only those that do (or don't)."""
    return [key for key, cls in _BACKENDS.items() if reads_depth is None or cls.reads_depth == reads_depth]


def backend_class(key: str) -> type[AttentionBackend]:
    """The backend class registered under ``key``; an unknown key raises ``ValueError`` listing the registered ones."""
    return _BACKENDS.get(key)


def build_backend(key: str) -> AttentionBackend:
    """Instantiate the backend ``key`` after checking it can run on this machine."""
    backend = backend_class(key)()
    backend.check_available()
    return backend


# Built-in backends register themselves on import.
from moda_lightning.attention import moda_torch, moda_triton, sdpa  # noqa: E402,F401

__all__ = ["AttentionBackend", "backend_class", "build_backend", "register_backend", "registered_backends"]
