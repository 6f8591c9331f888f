"""Secret redaction: what may be written to run records, MLflow params/tags and error lines.

A value is secret when its key looks like a credential (``secret``, ``password``, ``token``, ``*_key``, ...;
digests such as ``cache_key`` are not), and a URI's password part (``scheme://user:password@host``) is
always masked. Used wherever user input leaves the process: the run record's spec snapshot, MLflow, logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["SECRET_RE", "is_secret_name", "redact", "redact_uri"]

SECRET_RE = re.compile(
    r"(secret|password|passwd|token|credential|(^|[_.-])key$|access_key|api_key|private_key)", re.IGNORECASE
)
NOT_SECRET = {"cache_key", "reference_key"}  # digests, not credentials
_URI_PASSWORD = re.compile(r"(\w+://[^/:@\s]+):([^@/\s]+)@")


def is_secret_name(name: str) -> bool:
    """True for keys that name a credential (the last dotted part decides for ``a.b.key`` names)."""
    return bool(SECRET_RE.search(name)) and name.rsplit(".", 1)[-1] not in NOT_SECRET


def redact_uri(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


def redact(value: Any) -> Any:
    """Replace secret-looking values (keys named like secrets, passwords in URIs) by '***', recursively."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if is_secret_name(str(k)) and isinstance(v, str | bytes) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value
