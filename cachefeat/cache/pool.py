"""`ArrayPool`: the arrays of repeated reads, reused once nothing refers to them any more.

A read fills new arrays. When the allocator hands out fresh pages for them (glibc maps every
array above its adaptive threshold, at most 32 MB, anew), each 4 kB page faults on its first
write: on the 2-core AMD EPYC VM a whole read of an 18 MB muon block ran 5.3x slower that way
(0.86 against 4.6 GB/s, ~3.9 us per fault). A stream reads block after block of about the same
sizes, so it hands its reads one pool and the steady state writes into memory it has written before.

A buffer is handed out again only when the pool holds the last reference to it: every array,
view or `torch.from_numpy` tensor made from a handed-out array keeps the buffer referenced
(numpy views point at the array that owns the memory), so memory still in use is never reused.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

# Arrays below this many bytes come from the allocator as usual: small blocks live in memory it
# has written before, and a pool entry per small array would cost more than it saves.
MIN_POOLED_BYTES = 64 << 10
# A new buffer is this much larger than its first request, so that the same array of the next
# read (a few more rows) fits it.
HEADROOM = 1.25


def _refs(buffers: list, i: int) -> int:
    """The reference count of buffers[i], as seen from here (the same expression every time)."""
    return sys.getrefcount(buffers[i])


_IDLE = _refs([np.empty(0, np.uint8)], 0)  # the count of a buffer only its list refers to


class ArrayPool:
    """Hands out arrays backed by kept byte buffers, per key (e.g. the array's name in the cache).

    `empty(key, shape, dtype)` returns an uninitialised C-contiguous array, like `np.empty`,
    backed by the smallest free buffer of `key` that holds it; without one, by a new buffer
    `HEADROOM` times larger, and the free buffers of `key` too small for it are dropped (so a key
    keeps about as many buffers as its arrays alive at once, at most). Thread-safe.
    """

    def __init__(self):
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def empty(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            buffers = self._buffers.setdefault(key, [])
            free = [i for i in range(len(buffers)) if _refs(buffers, i) == _IDLE]
            fits = [i for i in free if buffers[i].nbytes >= nbytes]
            if fits:
                buffer = buffers[min(fits, key=lambda i: buffers[i].nbytes)]
            else:
                small = {i for i in free if buffers[i].nbytes < nbytes}
                buffers[:] = [b for i, b in enumerate(buffers) if i not in small]
                buffer = np.empty(int(nbytes * HEADROOM), np.uint8)
                buffers.append(buffer)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def nbytes(self) -> int:
        """Bytes of all kept buffers (free or in use)."""
        with self._lock:
            return sum(b.nbytes for buffers in self._buffers.values() for b in buffers)
