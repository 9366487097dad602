"""Where a cache lives: a local directory, an xrootd URL or an S3 URL, as a zarr `Store`.

Locations (`open_store`):
- a path: a local directory (zarr's `LocalStore`);
- `root://host[:port]//absolute/path` (or `xroot://`): an xrootd server (`xrootd.XRootDStore`);
- `s3://bucket/prefix`: S3-compatible object storage through obstore (`zarr.storage.ObjectStore`).
  Endpoint, credentials and region come from the standard environment variables
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION),
  so a user's usual S3 setup works; an `http://` endpoint (a local server) is allowed as given;
- an existing zarr `Store` (e.g. MemoryStore), used as it is.

Besides zarr's own interface, the writer needs one primitive that zarr lacks: `create_exclusive`
(create a key only if it does not exist, decided by the storage itself), the cache lock. The
remote stores have no directory rename: a cache's commit protocol is "data first, then the one
key (a manifest) whose presence is the commit", which needs only atomic replacement of one key
(an object PUT; an xrootd write to a temporary name and a rename, see `xrootd`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore

from cachefeat.cache.xrootd import XRootDStore
from cachefeat.errors import UserError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
XROOTD_SCHEMES = ("root", "xroot")
REMOTE_HINT = "pip install 'cachefeat[remote]'"


def is_url(location) -> bool:
    """Whether `location` is a URL string (any scheme) rather than a path or a Store."""
    return isinstance(location, str) and URL.match(location) is not None


def open_store(location, read_only: bool) -> tuple[Store, Path | None]:
    """(store, local directory or None) for a path, a URL or an existing zarr Store.

    A URL's server is contacted once here, so that an unreachable server or a missing bucket is
    one UserError naming the location, before any work starts."""
    if isinstance(location, Store):
        store = location.with_read_only(True) if read_only and not location.read_only else location
        return store, Path(location.root) if isinstance(location, LocalStore) else None
    if is_url(location):
        store = _remote(location, read_only)
        _probe(store, location)
        return store, None
    path = Path(location)
    if not read_only:
        path.mkdir(parents=True, exist_ok=True)
    return LocalStore(path, read_only=read_only), path


def _remote(url: str, read_only: bool) -> Store:
    scheme = URL.match(url).group(1).lower()
    if scheme in XROOTD_SCHEMES:
        try:
            return XRootDStore(url, read_only=read_only)
        except ImportError as exc:
            raise UserError(f"{url}: {exc}") from exc
        except ValueError as exc:
            raise UserError(f"{url} is not a valid xrootd URL (root://host[:port]//path): {exc}") from exc
    if scheme == "s3":
        return _s3(url, read_only)
    raise UserError(f"{url}: unsupported URL scheme {scheme}://; a cache is a local path, root://... or s3://...")


def _s3(url: str, read_only: bool) -> Store:
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore
    except ImportError as exc:
        raise UserError(f"{url}: s3:// caches need obstore: {REMOTE_HINT}") from exc
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{url} names no bucket: use s3://bucket/prefix")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    options = {"allow_http": True} if endpoint.startswith("http://") else None
    try:
        s3 = S3Store(bucket, prefix=prefix.strip("/") or None, client_options=options)
    except Exception as exc:  # obstore's configuration errors (e.g. a malformed endpoint)
        raise UserError(f"{url}: cannot configure the S3 client: {one_line(exc)}") from exc
    return ObjectStore(s3, read_only=read_only)


def _probe(store: Store, where: str) -> None:
    """One request to the server; any failure but "no such key" is a UserError."""
    try:
        sync(store.exists("zarr.json"))
    except Exception as exc:
        raise UserError(f"cannot reach {where}: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """An exception as `Type: first line of its message` (obstore's messages run on into a debug
    dump), the message cut at 300 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def describe(location) -> str:
    """How to name a cache location in messages (an S3 store as its s3:// URL)."""
    if isinstance(location, LocalStore):
        return str(location.root)
    if isinstance(location, XRootDStore):
        return location.url
    bucket = getattr(getattr(location, "store", None), "config", {}).get("bucket")
    if bucket and type(location.store).__name__ == "S3Store":
        return f"s3://{bucket}/{location.store.prefix or ''}".rstrip("/")
    return str(location) if not isinstance(location, Store) else repr(location)


def supports_lock(store: Store) -> bool:
    """Whether `create_exclusive` works on `store` (local directories and the remote stores)."""
    from zarr.storage import ObjectStore

    return isinstance(store, (LocalStore, ObjectStore, XRootDStore))


def create_exclusive(store: Store, key: str, data: bytes) -> bool:
    """Create `key` holding `data` if it does not exist (True), else leave it and return False.

    The storage decides, so two writers racing for the same key cannot both win: O_CREAT|O_EXCL
    on a local directory, an open with `OpenFlags.NEW` on xrootd, a conditional PUT
    (If-None-Match: *) on S3. On a server, a refusal (no permission, no such bucket) is a
    UserError naming the key; on a local directory the OSError is raised as it is."""
    if isinstance(store, LocalStore):
        path = Path(store.root) / key
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        return sync(_create_remote(store, key, data))
    except Exception as exc:
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith("obstore"):
            raise
        raise UserError(f"cannot create {describe(store)}/{key}: {one_line(exc)}") from exc


async def _create_remote(store: Store, key: str, data: bytes) -> bool:
    if isinstance(store, XRootDStore):
        return await store.create_exclusive(key, data)
    import obstore
    from obstore.exceptions import AlreadyExistsError

    try:
        await obstore.put_async(store.store, key, data, mode="create")
    except AlreadyExistsError:
        return False
    return True
