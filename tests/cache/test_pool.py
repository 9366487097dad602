"""`ArrayPool`: arrays handed out again only once nothing refers to their memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachefeat.cache import pool


@pytest.fixture
def arrays(monkeypatch):
    monkeypatch.setattr(pool, "MIN_POOLED_BYTES", 0)
    return pool.ArrayPool()


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_a_dropped_array_is_reused_with_its_shape_and_dtype(arrays):
    a = arrays.empty("k", (100, 3), np.float32)
    assert a.shape == (100, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    address = _address(a)
    del a
    b = arrays.empty("k", (50,), np.int64)  # 400 bytes fit the 1,200 (+ headroom) kept
    assert _address(b) == address and b.shape == (50,) and b.dtype == np.int64
    c = arrays.empty("other", (50,), np.int64)  # another key never shares a buffer
    assert not np.shares_memory(b, c)


@pytest.mark.parametrize("holder", ["view", "tensor", "reshaped", "array"])
def test_memory_still_referred_to_is_not_reused(arrays, holder):
    a = arrays.empty("k", (1000,), np.float32)
    a[:] = np.arange(1000)
    first = _address(a)
    keep = _holder(a, holder)
    del a
    b = arrays.empty("k", (1000,), np.float32)
    b[:] = -1
    kept = keep.numpy() if isinstance(keep, torch.Tensor) else keep
    assert not np.shares_memory(b, kept)
    expected = {"view": np.arange(10, 20), "tensor": np.arange(5, 1000),
                "reshaped": np.arange(1000).reshape(10, 100).T, "array": np.arange(1000)}[holder]
    np.testing.assert_array_equal(kept, expected)
    del keep, kept
    assert _address(arrays.empty("k", (1000,), np.float32)) == first  # free again once the last holder is gone


def _holder(a: np.ndarray, kind: str):
    if kind == "view":
        return a[10:20]
    if kind == "tensor":
        return torch.from_numpy(a)[5:]
    if kind == "reshaped":
        return a.reshape(10, 100).T
    return a


def test_a_larger_request_replaces_the_free_buffers_too_small_for_it(arrays):
    a = arrays.empty("k", (100,), np.uint8)
    del a
    b = arrays.empty("k", (1000,), np.uint8)
    assert arrays.nbytes() == int(1000 * pool.HEADROOM)  # the 125-byte buffer was free and too small: dropped
    c = arrays.empty("k", (100,), np.uint8)  # b is held: a new buffer beside it
    assert not np.shares_memory(b, c) and arrays.nbytes() == int(1000 * pool.HEADROOM) + int(100 * pool.HEADROOM)


def test_small_arrays_are_not_pooled():
    arrays = pool.ArrayPool()
    a = arrays.empty("k", (pool.MIN_POOLED_BYTES // 8 - 1,), np.float64)
    assert a.shape == (pool.MIN_POOLED_BYTES // 8 - 1,) and arrays.nbytes() == 0
    b = arrays.empty("k", (pool.MIN_POOLED_BYTES // 8,), np.float64)
    assert arrays.nbytes() >= b.nbytes
