"""Pipelined extraction (`extract_blocks`, `read_ahead`): the overlapped stages give exactly what the
stages run one after another give, errors from any stage surface, and no thread is left behind."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cachefeat.cache.chunkio import HELPER_NAME
from cachefeat.cache.extract import assemble_block, extract_blocks, resolve_options
from cachefeat.cache.frozen import FrozenBackbone
from cachefeat.cache.schema import block_range, num_blocks
from cachefeat.data.events import EventFile
from cachefeat.data.prefetch import read_ahead
from cachefeat.errors import UserError


def _stage_threads() -> list[str]:
    """cachefeat's threads still running, but the chunk reader's helpers (kept by design, idle)."""
    return [t.name for t in threading.enumerate()
            if t.name.startswith("cachefeat-") and not t.name.startswith(HELPER_NAME)]


def _serial(frozen, events, opts) -> list[tuple]:
    """The reference: each block's batches through `head_batch` one by one, in this thread."""
    out = []
    for block in range(num_blocks(len(events), opts["block_size"])):
        start, stop = block_range(block, len(events), opts["block_size"])
        parts = []
        for local, batch in events.block_batches(start, stop, opts["batch_size"]):
            hb, metrics = frozen.head_batch(batch, opts["floor"], keep_hits=opts["keep_hits"],
                                            keep_queries=opts["keep_queries"])
            parts.append((local, hb.to("cpu"), metrics))
        out.append((block, *assemble_block(parts)))
    return out


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_pipelined_blocks_equal_serial(tiny_config, checkpoint, edge_events_file, depth):
    data = tiny_config["data"]
    opts = resolve_options(tiny_config)
    frozen = FrozenBackbone(tiny_config, checkpoint)
    with EventFile(edge_events_file, data["hit_fields"], data["particle_fields"]) as events:
        want = _serial(frozen, events, opts)
        got, threads = [], []

        def on_block(block, hb, metrics):
            threads.append(threading.current_thread().name)
            got.append((block, hb, metrics))

        blocks = list(range(num_blocks(len(events), opts["block_size"])))
        extract_blocks(frozen, events, blocks, lambda b: block_range(b, len(events), opts["block_size"]), opts,
                       on_block, depth=depth)
    assert len(blocks) >= 2 and [b for b, _, _ in got] == blocks
    assert all(name.startswith("cachefeat-sparsify") for name in threads)
    for (block, hb, metrics), (_, hb_ref, metrics_ref) in zip(got, want):
        for name, value in vars(hb_ref).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(hb, name), value), (block, name)
        assert metrics.keys() == metrics_ref.keys()
        for name in metrics_ref:
            np.testing.assert_array_equal(metrics[name], metrics_ref[name])
    assert not _stage_threads()


def test_error_in_a_stage_is_raised_and_stops_the_rest(tiny_config, checkpoint, edge_events_file):
    data = tiny_config["data"]
    opts = resolve_options(tiny_config)
    frozen = FrozenBackbone(tiny_config, checkpoint)
    with EventFile(edge_events_file, data["hit_fields"], data["particle_fields"]) as events:
        seen = []

        def on_block(block, hb, metrics):
            seen.append(block)
            raise UserError(f"disk full at block {block}")

        ranges = lambda b: block_range(b, len(events), opts["block_size"])  # noqa: E731
        with pytest.raises(UserError, match="disk full at block 0"):
            extract_blocks(frozen, events, [0, 1, 2], ranges, opts, on_block)
    assert seen == [0]
    assert not _stage_threads()


def test_read_ahead_keeps_order_bounds_and_raises():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    assert list(read_ahead(items(), 3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("event 3 is broken")

    got = []
    with pytest.raises(ValueError, match="event 3 is broken"):
        for item in read_ahead(failing(), 2):
            got.append(item)
    assert got == [1, 2]

    produced.clear()
    stream = read_ahead(items(), 2)
    assert next(stream) == 0
    stream.close()  # the consumer stops early: the thread stops too, at most `depth` + 1 items ahead
    assert len(produced) <= 4
    assert not [t for t in threading.enumerate() if t.name == "cachefeat-read-ahead"]
