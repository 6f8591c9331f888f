"""One storage object over fsspec (local paths, ``file://``, ``s3://``) with write-once artifacts.

Layout under the root::

    artifacts/<kind>/<key[:2]>/<key>/manifest.json            commit marker, created last, create-only
    artifacts/<kind>/<key[:2]>/<key>/attempts/<attempt>/...   the files of one attempt
    work/<kind>/<key>/...                                     durable scratch (training checkpoints)
    runs/<run_id>/run.json                                     mutable run record (driver is the only writer)

A stage's files go under a fresh attempt folder; ``manifest.json`` (files with sha256 and size, cache key
and its components, producer run, created_at, cmflow version) is then created with create-only semantics
(``O_EXCL`` link locally, ``If-None-Match: *`` on S3). A writer that loses the race adopts the winner's
manifest and deletes its own attempt. Readers find files only through a manifest, so a half-written
attempt is never seen. The filesystem is created lazily in each process (s3fs is not fork-safe) and the
object pickles as (root, options) alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from cmflow import __version__
from cmflow.errors import InputError, StorageError, TransientError
from cmflow.redact import redact_uri

T = TypeVar("T")
MANIFEST = "manifest.json"
_SAFE_PART = re.compile(r"^[A-Za-z0-9._=+-][A-Za-z0-9._=+@-]*$")

log = logging.getLogger(__name__)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_relpath(name: str) -> str:
    """Validate a relative artifact path: no absolute paths, no '..', no odd characters."""
    if not name or name.startswith("/") or "\\" in name:
        raise InputError(f"artifact file name {name!r} must be a relative POSIX path")
    parts = name.split("/")
    for part in parts:
        if part in {".", ".."} or not _SAFE_PART.match(part):
            raise InputError(
                f"artifact file name {name!r} has an unsafe part {part!r}; use letters, digits, '._-' only"
            )
    return "/".join(parts)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    name = type(exc).__name__
    transient_names = {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ProxyConnectionError",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
    }
    if name in transient_names:
        return True
    if isinstance(exc, OSError) and getattr(exc, "errno", None) in {None, 5, 104, 110, 111, 113}:
        text = str(exc).lower()
        return any(s in text for s in ("connect", "timed out", "timeout", "reset", "unavailable", "refused"))
    return False


_LOCAL_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _is_access_problem(exc: BaseException) -> bool:
    """An object-store credentials or permission problem (local permission errors are handled apart)."""
    name = type(exc).__name__
    if name in {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return True
    text = str(exc)
    return isinstance(exc, PermissionError) or any(
        s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken")
    )


@dataclass
class Manifest:
    """The commit record of one artifact."""

    kind: str
    cache_key: str
    attempt: str
    files: dict[str, dict[str, Any]]  # name -> {"sha256", "size"}
    meta: dict[str, Any] = field(default_factory=dict)
    key_components: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)  # run_id, stage
    created_at: str = ""
    cmflow_version: str = __version__
    uri: str = ""  # filled in when read; not part of the digest

    @property
    def digest(self) -> str:
        """Content digest over every file's sha256 and size and the meta dict.

        The attempt id is left out, so a recompute that writes identical bytes keeps downstream keys.
        """
        return sha256_bytes(canonical_json({"files": self.files, "meta": self.meta}).encode())

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("uri")
        data["digest"] = self.digest
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str = "") -> Manifest:
        data = json.loads(text)
        stored_digest = data.pop("digest", None)
        uri = data.pop("uri", None) or uri
        known = {f.name for f in fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known and k != "uri"}, uri=uri)
        if stored_digest != manifest.digest:
            raise ValueError("manifest digest does not match its contents")
        return manifest


class Storage:
    """fsspec-backed storage rooted at ``root`` (a local path, ``file://`` or ``s3://`` URI)."""

    def __init__(self, root: str, options: dict[str, Any] | None = None, *, retries: int = 6) -> None:
        self.root = root.rstrip("/") if root not in {"/", "s3://"} else root
        self.options = dict(options or {})
        self.retries = retries
        self._fs: Any = None
        self._root_path: str = ""

    # pickles as (root, options): the filesystem is rebuilt in each process
    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "options": self.options, "retries": self.retries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["options"], retries=state["retries"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Storage({redact_uri(self.root)!r})"

    @property
    def protocol(self) -> str:
        return self.root.split("://", 1)[0] if "://" in self.root else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            options = dict(self.options)
            if self.protocol == "s3":
                options.setdefault("use_listings_cache", False)  # listings go stale across clients
                options.setdefault("skip_instance_cache", True)
            try:
                self._fs, self._root_path = fsspec.core.url_to_fs(self.root, **options)
            except (ImportError, ValueError, TypeError) as exc:
                raise StorageError(
                    f"cannot open storage root {redact_uri(self.root)}: {exc}; check storage.root and "
                    "storage.options"
                ) from None
            self._root_path = self._root_path.rstrip("/")
        return self._fs

    # ---------------------------------------------------------------------------------------------
    # keys and retries

    def path(self, key: str) -> str:
        """Filesystem path for a key relative to the root."""
        _ = self.fs
        key = check_relpath(key)
        return f"{self._root_path}/{key}" if self._root_path else key

    def uri(self, key: str = "") -> str:
        return f"{self.root}/{check_relpath(key)}" if key else self.root

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if self.is_local and isinstance(exc, OSError) and exc.errno in _LOCAL_WRITE_ERRNOS:
                    fix = (
                        "free space on that filesystem"
                        if exc.errno in {errno.ENOSPC, errno.EDQUOT}
                        else "give this user write access to the storage root (or use another root)"
                    )
                    raise StorageError(
                        f"storage {self.root}: cannot {what} ({os.strerror(exc.errno or 0)}); {fix}, then "
                        "resume the run"
                    ) from None
                if _is_access_problem(exc):
                    raise InputError(
                        f"storage {redact_uri(self.root)}: cannot {what} ({type(exc).__name__}); check the "
                        "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.options key/secret) "
                        "and the bucket"
                    ) from None
                if not _is_transient(exc):
                    raise
                if attempt == self.retries:
                    raise TransientError(
                        f"storage {redact_uri(self.root)} failed to {what} after {self.retries + 1} tries "
                        f"({type(exc).__name__}: {exc}); check the endpoint, then resume the run"
                    ) from None
                log.warning(
                    "storage %s: %s failed (%s); retry %d of %d in %.1f s",
                    redact_uri(self.root),
                    what,
                    type(exc).__name__,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                if self.protocol == "s3":
                    self._fs = None  # reconnect
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------------------------------------
    # plain objects

    def exists(self, key: str) -> bool:
        path = self.path(key)
        return self._retry(f"check {key}", lambda: self.fs.exists(path))

    def read_bytes(self, key: str) -> bytes:
        path = self.path(key)
        return self._retry(f"read {key}", lambda: self.fs.cat_file(path))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_bytes(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Write an object; ``create_only`` raises FileExistsError if the key exists (atomically)."""
        path = self.path(key)
        if create_only:
            self._retry(f"create {key}", lambda: self._create(path, data))
            return
        if self.is_local:
            self._retry(f"write {key}", lambda: _local_atomic_write(path, data))
        else:
            self._retry(f"write {key}", lambda: self.fs.pipe_file(path, data))

    def write_json(self, key: str, value: Any, *, create_only: bool = False) -> None:
        self.write_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode(), create_only=create_only)

    def _create(self, path: str, data: bytes) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.link(tmp, path)  # atomic, fails if path exists
            finally:
                _unlink_quietly(tmp)
        else:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:  # s3fs maps PreconditionFailed to an OSError on some versions
                if "precondition" in str(exc).lower():
                    raise FileExistsError(path) from None
                raise

    def put_file(self, local: str | Path, key: str) -> None:
        path = self.path(key)
        if self.is_local:

            def copy() -> None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copyfile(local, path)

            self._retry(f"write {key}", copy)
        else:
            self._retry(f"upload {key}", lambda: self.fs.put_file(str(local), path))

    def get_file(self, key: str, local: str | Path) -> None:
        path = self.path(key)
        self._retry(f"download {key}", lambda: self.fs.get_file(path, str(local)))

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (empty if it does not exist)."""
        path = self.path(prefix)

        def ls() -> list[str]:
            try:
                entries = (
                    self.fs.ls(path, detail=False, refresh=True)
                    if not self.is_local
                    else self.fs.ls(path, detail=False)
                )
            except FileNotFoundError:
                return []
            return sorted(PurePosixPath(e).name for e in entries)

        return self._retry(f"list {prefix}", ls)

    def delete(self, key: str, *, recursive: bool = False) -> None:
        path = self.path(key)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._retry(f"delete {key}", rm)

    # ---------------------------------------------------------------------------------------------
    # artifacts

    @staticmethod
    def artifact_prefix(kind: str, cache_key: str) -> str:
        safe_kind = kind.replace(".", "_")
        return f"artifacts/{safe_kind}/{cache_key[:2]}/{cache_key}"

    @staticmethod
    def work_prefix(kind: str, cache_key: str) -> str:
        return f"work/{kind.replace('.', '_')}/{cache_key}"

    def load_manifest(self, kind: str, cache_key: str) -> Manifest | None:
        """The committed manifest, or None when absent. Raises ValueError when it does not parse."""
        key = f"{self.artifact_prefix(kind, cache_key)}/{MANIFEST}"
        try:
            data = self.read_bytes(key)
        except FileNotFoundError:
            return None
        return Manifest.from_json(data, uri=self.uri(self.artifact_prefix(kind, cache_key)))

    def verify(self, manifest: Manifest, cache_key: str, *, rehash: bool = True) -> str | None:
        """Why the artifact cannot be reused, or None when every file is present and intact.

        Local roots re-hash each file (``rehash=False``: presence and size only, a cheap pre-flight);
        object stores compare size and the ETag recorded at commit.
        """
        if manifest.cache_key != cache_key:
            return f"manifest key {manifest.cache_key[:12]} differs from {cache_key[:12]}"
        prefix = f"{self.artifact_prefix(manifest.kind, cache_key)}/attempts/{manifest.attempt}"
        for name, entry in manifest.files.items():
            path = self.path(f"{prefix}/{name}")
            try:
                info = self._retry(f"check {name}", lambda p=path: self.fs.info(p))
            except FileNotFoundError:
                return f"file {name} is missing"
            if int(info.get("size", -1)) != entry["size"]:
                return f"file {name} has size {info.get('size')}, manifest says {entry['size']}"
            if self.is_local:
                if rehash and sha256_file(path) != entry["sha256"]:
                    return f"file {name} does not match its sha256"
            elif entry.get("etag") and _etag(info) and _etag(info) != entry["etag"]:
                return f"file {name} was changed (ETag differs)"
        return None

    def quarantine(self, kind: str, cache_key: str, reason: str) -> None:
        """Move a broken manifest aside so that a recompute can commit this key again."""
        prefix = self.artifact_prefix(kind, cache_key)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        try:
            data = self.read_bytes(f"{prefix}/{MANIFEST}")
        except FileNotFoundError:
            return
        self.write_json(
            f"{prefix}/quarantine/{stamp}.json",
            {"reason": reason, "manifest": data.decode("utf-8", "replace")},
        )
        self.delete(f"{prefix}/{MANIFEST}")

    def commit(
        self,
        kind: str,
        cache_key: str,
        local_dir: str | Path,
        *,
        meta: dict[str, Any] | None = None,
        key_components: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
    ) -> Manifest:
        """Upload ``local_dir`` as a new attempt, then create the manifest; adopt the winner on a race."""
        local_dir = Path(local_dir)
        prefix = self.artifact_prefix(kind, cache_key)
        attempt = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = check_relpath(path.relative_to(local_dir).as_posix())
            key = f"{prefix}/attempts/{attempt}/{name}"
            self.put_file(path, key)
            entry: dict[str, Any] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            if not self.is_local:
                info = self._retry(f"check {name}", lambda k=key: self.fs.info(self.path(k)))
                if _etag(info):
                    entry["etag"] = _etag(info)
            files[name] = entry
        manifest = Manifest(
            kind=kind,
            cache_key=cache_key,
            attempt=attempt,
            files=files,
            meta=json.loads(canonical_json(meta or {})),
            key_components=key_components or {},
            producer=producer or {},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        try:
            self.write_bytes(f"{prefix}/{MANIFEST}", manifest.to_json().encode(), create_only=True)
        except FileExistsError:
            winner = self.load_manifest(kind, cache_key)
            if winner is None or winner.attempt != attempt:
                self.delete(f"{prefix}/attempts/{attempt}", recursive=True)
            if winner is None:
                raise StorageError(
                    f"manifest for {prefix} vanished during commit; re-run the stage"
                ) from None
            return winner
        manifest.uri = self.uri(prefix)
        return manifest

    def _artifact_key(self, manifest: Manifest, name: str) -> str:
        if name not in manifest.files:
            raise InputError(
                f"artifact {manifest.kind}/{manifest.cache_key[:12]} has no file {name!r}; it has: "
                f"{', '.join(sorted(manifest.files)) or 'no files'}"
            )
        return f"{self.artifact_prefix(manifest.kind, manifest.cache_key)}/attempts/{manifest.attempt}/{name}"

    def read_artifact_file(self, manifest: Manifest, name: str) -> bytes:
        data = self.read_bytes(self._artifact_key(manifest, name))
        if sha256_bytes(data) != manifest.files[name]["sha256"]:
            raise StorageError(
                f"{manifest.kind}/{manifest.cache_key[:12]}/{name} does not match its sha256; re-run with "
                f"--no-cache for the stage that made it"
            )
        return data

    def local_artifact_file(self, manifest: Manifest, name: str, cache_dir: Path | None = None) -> Path:
        key = self._artifact_key(manifest, name)
        if self.is_local:
            return Path(self.path(key))
        sha = manifest.files[name]["sha256"]
        cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "cmflow-cache")
        target = cache_dir / sha[:2] / sha / PurePosixPath(name).name
        if target.exists() and sha256_file(target) == sha:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        self.get_file(key, tmp)
        if sha256_file(tmp) != sha:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"download of {name} does not match its sha256; re-run the producing stage")
        os.replace(tmp, target)
        return target

    def iter_runs(self) -> Iterable[str]:
        return self.list("runs")


def _etag(info: dict[str, Any]) -> str | None:
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"') if tag else None


def _local_atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)  # a full disk or an interrupt leaves no stray temp file
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def open_uri(uri: str, options: dict[str, Any] | None = None) -> bytes:
    """Read a whole file from any fsspec URI or local path (datasets, weights), with a clear error."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(options or {})) as handle:
            return handle.read()
    except FileNotFoundError:
        raise InputError(f"{redact_uri(uri)} does not exist; check the URI") from None
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {redact_uri(uri)}: {exc}; use a path, file:// or s3:// URI") from None
    except PermissionError:
        raise InputError(f"no permission to read {redact_uri(uri)}; check credentials") from None
    except Exception as exc:  # noqa: BLE001 - credentials/endpoint problems surface as many types
        if "credential" in str(exc).lower() or type(exc).__name__ == "NoCredentialsError":
            raise InputError(
                f"no credentials to read {redact_uri(uri)}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                "storage options"
            ) from None
        raise
