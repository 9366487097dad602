"""`XRootDStore`: a zarr v3 `Store` over the xrootd client (`root://host[:port]//path`).

zarr's `FsspecStore` does not work with fsspec-xrootd 0.5.5 (its file-handle cache needs a
running loop that fsspec sets to None), so this store calls the `XRootD.client` bindings
directly, through their asynchronous callback API: every request is awaited on the caller's
event loop, so zarr's (and `chunkio`'s) concurrent gets are concurrent requests to the server.

Contracts:
- `get` of a missing key returns None; any other server error is an `XRootDError` (an OSError)
  naming the URL and the server's message.
- `set` writes `<key>.<uuid>.partial`, then renames it onto `key` (xrootd's mv replaces an
  existing file): a reader never sees a half-written key, as with zarr's LocalStore; a killed
  writer can leave `*.partial` files, which `list_prefix` lists and a resuming writer deletes.
- `create_exclusive` creates a key only if it does not exist (open with `OpenFlags.NEW`), the
  server deciding: the lock primitive of `store`.
- Directories exist only as the parents of keys: `list*` yield keys of files, and deleting a
  key leaves its (maybe empty) directory behind.
"""

from __future__ import annotations

import asyncio
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

# XRootD protocol error numbers (XProtocol.hh)
NOT_FOUND = 3011  # kXR_NotFound
EXISTS = 3018  # kXR_ItExists


class XRootDError(OSError):
    """A request the xrootd server (or the connection to it) refused."""


def _client():
    try:
        from XRootD import client
        from XRootD.client import flags
    except ImportError as exc:  # the optional `remote` extra
        raise ImportError("root:// caches need the xrootd client: pip install 'cachefeat[remote]'") from exc
    # The bindings' exit hook (XRootD/client/finalize.py) runs isinstance over every live object,
    # which touches torch's deprecated `torch.distributed.reduce_op` and prints its warning on exit.
    warnings.filterwarnings("ignore", message="`torch.distributed.reduce_op` is deprecated", category=FutureWarning)
    return client, flags


async def _call(method, *args, **kwargs):
    """(status, response) of an XRootD client call, awaited through its callback."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def callback(status, response, hosts):
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result((status, response)))

    status = method(*args, callback=callback, **kwargs)
    if not status.ok:  # refused before it was sent
        return status, None
    return await done


class XRootDStore(Store):
    """Keys under `url` (an xrootd URL of a directory, e.g. `root://host:1094//data/cache.zarr`)."""

    supports_writes = True
    supports_deletes = True
    supports_listing = True

    def __init__(self, url: str, *, read_only: bool = False):
        super().__init__(read_only=read_only)
        client, _ = _client()
        parsed = client.URL(url)
        if not parsed.is_valid() or parsed.protocol not in ("root", "xroot"):
            raise ValueError(f"not an xrootd URL: {url}")
        self.url = url
        self.server = f"{parsed.protocol}://{parsed.hostid}/"
        self.path = "/" + parsed.path.strip("/")
        self._fs = client.FileSystem(self.server)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, XRootDStore) and (self.url, self.read_only) == (other.url, other.read_only)

    def __repr__(self) -> str:
        return f"XRootDStore({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def with_read_only(self, read_only: bool = False) -> XRootDStore:
        return XRootDStore(self.url, read_only=read_only)

    def _abs(self, key: str) -> str:
        """The server-side path of `key`."""
        return f"{self.path.rstrip('/')}/{key}" if key else self.path

    def _error(self, status, what: str, key: str) -> XRootDError:
        return XRootDError(f"xrootd {what} {self.server}/{self._abs(key)}: {status.message.strip()}")

    # --- reads ----------------------------------------------------------------------------

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        client, flags = _client()
        f = client.File()
        status, _ = await _call(f.open, self.server + self._abs(key), flags.OpenFlags.READ)
        if not status.ok:
            if status.errno == NOT_FOUND:
                return None
            raise self._error(status, "open", key)
        try:
            offset, size = 0, 0  # size 0: the whole file
            if byte_range is not None:
                if isinstance(byte_range, RangeByteRequest):
                    offset, size = byte_range.start, byte_range.end - byte_range.start
                else:
                    status, info = await _call(f.stat)
                    if not status.ok:
                        raise self._error(status, "stat", key)
                    if isinstance(byte_range, OffsetByteRequest):
                        offset, size = byte_range.offset, max(0, info.size - byte_range.offset)
                    elif isinstance(byte_range, SuffixByteRequest):
                        offset = max(0, info.size - byte_range.suffix)
                        size = info.size - offset
                    else:
                        raise ValueError(f"unexpected byte range {byte_range!r}")
                if size <= 0:  # an empty range (a read of size 0 would read the whole file)
                    return prototype.buffer.from_bytes(b"")
            status, data = await _call(f.read, offset, size)
            if not status.ok:
                raise self._error(status, "read", key)
        finally:
            await _call(f.close)
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def _stat(self, key: str):
        """The server's stat of `key`, or None when it does not exist."""
        status, info = await _call(self._fs.stat, self._abs(key))
        if not status.ok:
            if status.errno == NOT_FOUND:
                return None
            raise self._error(status, "stat", key)
        return info

    async def exists(self, key: str) -> bool:
        _, flags = _client()
        info = await self._stat(key)
        return info is not None and not info.flags & flags.StatInfoFlags.IS_DIR

    async def getsize(self, key: str) -> int:
        info = await self._stat(key)
        if info is None:
            raise FileNotFoundError(key)
        return int(info.size)

    # --- writes ---------------------------------------------------------------------------

    async def _write_new(self, key: str, data: bytes, open_flags) -> bool:
        """Write `data` to a file opened with `open_flags`; False when NEW found it existing."""
        client, flags = _client()
        f = client.File()
        status, _ = await _call(f.open, self.server + self._abs(key), open_flags | flags.OpenFlags.MAKEPATH)
        if not status.ok:
            if status.errno == EXISTS and open_flags & flags.OpenFlags.NEW:
                return False
            raise self._error(status, "create", key)
        try:
            if data:
                status, _ = await _call(f.write, data, 0, len(data))
                if not status.ok:
                    raise self._error(status, "write", key)
        finally:
            status, _ = await _call(f.close)
        if not status.ok:
            raise self._error(status, "close", key)
        return True

    async def set(self, key: str, value: Buffer) -> None:
        _, flags = _client()
        self._check_writable()
        temp = f"{key}.{uuid.uuid4().hex}.partial"
        await self._write_new(temp, value.to_bytes(), flags.OpenFlags.NEW)
        status, _ = await _call(self._fs.mv, self._abs(temp), self._abs(key))
        if not status.ok:
            await self.delete(temp)
            raise self._error(status, "rename onto", key)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self.create_exclusive(key, value.to_bytes())

    async def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` unless it exists (then False); the server decides."""
        _, flags = _client()
        self._check_writable()
        return await self._write_new(key, data, flags.OpenFlags.NEW)

    async def delete(self, key: str) -> None:
        self._check_writable()
        status, _ = await _call(self._fs.rm, self._abs(key))
        if not status.ok and status.errno != NOT_FOUND:
            raise self._error(status, "remove", key)

    # --- listing --------------------------------------------------------------------------

    async def _files(self, directory: str, recursive: bool) -> list[str]:
        """Keys (relative to the store) of the entries of `directory` (a key prefix without a
        trailing slash, "" for the root): files only when recursive, else files and directories."""
        _, flags = _client()
        mode = flags.DirListFlags.STAT | (flags.DirListFlags.RECURSIVE if recursive else 0)
        status, listing = await _call(self._fs.dirlist, self._abs(directory), mode)
        if not status.ok:
            if status.errno == NOT_FOUND:
                return []
            raise self._error(status, "list", directory)
        # entries are named relative to the listed directory (with RECURSIVE: "sub/dir/file")
        start = f"{directory}/" if directory else ""
        return [
            start + entry.name
            for entry in listing
            if not (recursive and entry.statinfo.flags & flags.StatInfoFlags.IS_DIR)
        ]

    async def list(self) -> AsyncIterator[str]:
        for key in await self._files("", recursive=True):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        for key in await self._files(directory, recursive=True):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        directory = prefix.rstrip("/")
        for key in await self._files(directory, recursive=False):
            yield key.rsplit("/", 1)[-1]
