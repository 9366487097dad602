"""`ResidentCache`: every event of a cache in (device) memory; batches are vectorised ragged gathers."""

from __future__ import annotations

import numpy as np
import torch

from cachefeat.cache import schema
from cachefeat.head.inputs import HeadBatch


class ResidentCache:
    """All events of a cache in (device) memory.

    Holds flat CSR tensors like `HeadBatch`, with pair rows event-local (so that a batch
    re-bases them on its own offsets). The fields of each row kind are the schema's
    (`schema.ROW_FIELDS`). For `batch(..., valid_targets_only=True)` it also holds the rows of
    the queries with a valid target and of their pairs (int64 [Q_valid] and [P_valid]) and each
    such pair's query among its event's valid queries (int32 [P_valid]).

    The CSR offsets (int64 [E+1] per row kind) are kept on the host: a batch's sizes are
    computed there, so that gathering a batch on a GPU never waits for the GPU.
    """

    def __init__(self, hb: HeadBatch, device="cpu"):
        hb = hb.to(device)
        self.device = torch.device(device)
        self.num_events = hb.num_events
        self.event_id = hb.event_id
        query_event = hb.query_event()
        pair_event = query_event[hb.pair_query]
        self.pair_query = hb.pair_query - hb.query_offsets[pair_event]
        self.pair_hit = hb.pair_hit - hb.hit_offsets[pair_event]
        self._hits = {name: getattr(hb, name) for name in schema.ROW_FIELDS["H"]}
        self._queries = {name: getattr(hb, name) for name in schema.ROW_FIELDS["Q"]}
        self._pairs = {name: getattr(hb, name) for name in schema.ROW_FIELDS["P"] if name not in schema.PAIR_ROWS}

        valid = hb.target_valid.bool()
        pair_valid = valid[hb.pair_query]
        valid_query_offsets = _offsets(query_event[valid], self.num_events)
        valid_rank = torch.cumsum(valid.long(), 0) - 1 - valid_query_offsets[query_event]  # among its event's valid
        self._valid_query_rows = torch.nonzero(valid).flatten()
        self._valid_pair_rows = torch.nonzero(pair_valid).flatten()
        self._valid_pair_query = valid_rank[hb.pair_query[pair_valid]].int()
        self._offsets = {  # on the host: (hit, query, pair) rows of all queries, and of the valid ones
            "all": [o.cpu().numpy() for o in (hb.hit_offsets, hb.query_offsets, _offsets(pair_event, self.num_events))],
            "valid": [o.cpu().numpy() for o in (hb.hit_offsets, valid_query_offsets,
                                                 _offsets(pair_event[pair_valid], self.num_events))],
        }

    def batch(self, indices, valid_targets_only: bool = False) -> HeadBatch:
        """The events at `indices` (any order, repeats allowed) as one `HeadBatch`.

        `indices`: event indices on the host (numpy, a list or a CPU tensor; a device tensor is
        first copied to the host, which waits for the device). With `valid_targets_only`, the
        batch holds only the queries with a valid target and their pairs: it equals
        `batch(indices).with_valid_targets_only()`, gathered without reading the device.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_events):
            raise IndexError(f"event indices outside 0..{self.num_events - 1}")
        # On the host: per row kind, the batch's offsets [B+1] and each event's row shift [B].
        host = [idx]
        for offsets in self._offsets["valid" if valid_targets_only else "all"]:
            starts = offsets[idx]
            new = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(offsets[idx + 1] - starts, out=new[1:])
            host += [new, starts - new[:-1]]
        sizes = [int(part[-1]) for part in host[1::2]]  # (hits, queries, pairs) of the batch
        parts = torch.split(_to_device(np.concatenate(host), self.device), [len(part) for part in host])
        hit_off, query_off, pair_off = parts[1::2]
        hit_rows, query_rows, pair_rows = map(_ragged_rows, parts[1::2], parts[2::2], sizes)
        pair_event = torch.repeat_interleave(
            torch.arange(len(idx), device=self.device), pair_off.diff(), output_size=sizes[2]
        )
        if valid_targets_only:
            query_rows, pair_query = self._valid_query_rows[query_rows], self._valid_pair_query[pair_rows]
            pair_rows = self._valid_pair_rows[pair_rows]
        else:
            pair_query = self.pair_query[pair_rows]
        return HeadBatch(
            event_id=self.event_id[parts[0]],
            hit_offsets=hit_off,
            query_offsets=query_off,
            **{name: t[hit_rows] for name, t in self._hits.items()},
            **{name: t[query_rows] for name, t in self._queries.items()},
            pair_query=pair_query + query_off[pair_event],
            pair_hit=self.pair_hit[pair_rows] + hit_off[pair_event],
            **{name: t[pair_rows] for name, t in self._pairs.items()},
        )


def _offsets(row_event: torch.Tensor, num_events: int) -> torch.Tensor:
    """int64 [E+1] CSR offsets of rows whose events are `row_event` (event-major)."""
    counts = torch.bincount(row_event, minlength=num_events)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _ragged_rows(new: torch.Tensor, shift: torch.Tensor, total: int) -> torch.Tensor:
    """The `total` rows of a batch in a CSR layout from its offsets `new` [B+1] and each event's
    `shift` [B] (its first row in the layout minus its first row in the batch)."""
    shift = torch.repeat_interleave(shift, new.diff(), output_size=total)
    return torch.arange(total, device=new.device) + shift


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`; to a GPU through pinned memory, queued (the host does not wait)."""
    tensor = torch.from_numpy(host)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
