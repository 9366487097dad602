"""`ResidentCache`: every event of a cache in (device) memory; batches are vectorised ragged gathers."""

from __future__ import annotations

import numpy as np
import torch

from cachefeat.cache import schema
from cachefeat.head.inputs import HeadBatch


class ResidentCache:
    """All events of a cache in (device) memory.

    Holds flat CSR tensors like `HeadBatch`, with pair rows event-local (so that a batch
    re-bases them on its own offsets) and pair offsets [E+1]. The fields of each row kind are
    the schema's (`schema.ROW_FIELDS`).
    """

    def __init__(self, hb: HeadBatch, device="cpu"):
        hb = hb.to(device)
        self.device = torch.device(device)
        self.num_events = hb.num_events
        self.event_id = hb.event_id
        self.hit_offsets, self.query_offsets = hb.hit_offsets, hb.query_offsets
        pair_event = hb.query_event()[hb.pair_query]
        counts = torch.bincount(pair_event, minlength=self.num_events)
        self.pair_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.pair_query = hb.pair_query - hb.query_offsets[pair_event]
        self.pair_hit = hb.pair_hit - hb.hit_offsets[pair_event]
        self._hits = {name: getattr(hb, name) for name in schema.ROW_FIELDS["H"]}
        self._queries = {name: getattr(hb, name) for name in schema.ROW_FIELDS["Q"]}
        self._pairs = {name: getattr(hb, name) for name in schema.ROW_FIELDS["P"] if name not in schema.PAIR_ROWS}

    def batch(self, indices) -> HeadBatch:
        """The events at `indices` (any order, repeats allowed) as one `HeadBatch`."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        idx = indices.to(self.device, torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_events):
            raise IndexError(f"event indices outside 0..{self.num_events - 1}")
        hit_rows, hit_off = _ragged_rows(self.hit_offsets, idx)
        query_rows, query_off = _ragged_rows(self.query_offsets, idx)
        pair_rows, pair_off = _ragged_rows(self.pair_offsets, idx)
        pair_event = torch.repeat_interleave(
            torch.arange(len(idx), device=self.device), pair_off.diff(), output_size=len(pair_rows)
        )
        return HeadBatch(
            event_id=self.event_id[idx],
            hit_offsets=hit_off,
            query_offsets=query_off,
            **{name: t[hit_rows] for name, t in self._hits.items()},
            **{name: t[query_rows] for name, t in self._queries.items()},
            pair_query=self.pair_query[pair_rows] + query_off[pair_event],
            pair_hit=self.pair_hit[pair_rows] + hit_off[pair_event],
            **{name: t[pair_rows] for name, t in self._pairs.items()},
        )


def _ragged_rows(offsets: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the events `idx` in a CSR layout with `offsets` [E+1], and the batch's offsets [B+1]."""
    starts = offsets[idx]
    counts = offsets[idx + 1] - starts
    new = torch.zeros(len(idx) + 1, dtype=torch.long, device=offsets.device)
    new[1:] = counts.cumsum(0)
    total = int(new[-1])
    shift = torch.repeat_interleave(starts - new[:-1], counts, output_size=total)
    return torch.arange(total, device=offsets.device) + shift, new
