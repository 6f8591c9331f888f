"""A restricted unpickler for the CIFAR-10 python batches: numpy arrays, dicts, lists, bytes, str, int.

The CIFAR-10 "python version" tarball stores each batch as a pickled dict (``data``: a uint8 numpy array,
``labels``: a list of ints, ``filenames``: a list of bytes). Plain ``pickle.load`` would run any code a
crafted file names, so :func:`restricted_loads` resolves only the few globals needed to rebuild numpy
arrays; anything else raises :class:`UnsafePickleError`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

# (module, name) pairs a numpy-array pickle needs, across numpy 1.x / 2.x and pickle protocols 2-5.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"global {module}.{name} is not allowed (only numpy arrays and plain data)"
            )
        return super().find_class(module, name)


def _check_plain(value: Any, depth: int = 0) -> None:
    """Refuse object-dtype arrays and container types other than dict/list/tuple."""
    import numpy as np

    if depth > 8:
        raise UnsafePickleError("nesting deeper than 8 levels")
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise UnsafePickleError("object-dtype numpy arrays are not allowed")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, depth + 1)
            _check_plain(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_plain(item, depth + 1)
    elif not isinstance(value, bytes | str | int | float | bool | type(None)):
        raise UnsafePickleError(f"unexpected type {type(value).__name__}")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers (``encoding="bytes"``, as CIFAR needs).

    Raises :class:`UnsafePickleError` for disallowed content and ``pickle.UnpicklingError`` /
    ``EOFError`` / ``ValueError`` for corrupt data.
    """
    value = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    _check_plain(value)
    return value
