"""`HeadBatch`: everything the regression head and its loss read, as flat CSR tensors.

Both sources produce it: the live path (frozen backbone on a padded batch, through
`from_model_outputs`) and the cache reader (slices of the Zarr arrays). The cache stores
exactly these arrays, per event, so cached == live is a statement about this structure.

Symbols: B events, H hits, Q queries, P (query, hit) pairs, D embedding dim,
F raw hit fields, T particle (target) fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# The fields with one row per query.
QUERY_FIELDS = ("query_embed", "query_valid_logit", "query_slot", "target_index", "targets", "target_valid")


@dataclass
class HeadBatch:
    """A batch of events in CSR form; row order is event-major.

    Attributes:
        event_id: int64 [B].
        hit_offsets: int64 [B+1]; event b owns hit rows hit_offsets[b]:hit_offsets[b+1].
        query_offsets: int64 [B+1]; the same for query rows.
        hit_raw: float32 [H, F], raw hit features (order: the config's raw fields).
        hit_embed: [H, D], final hit embeddings (after the decoder's hit updates).
        query_embed: [Q, D], decoder output query embeddings.
        query_valid_logit: float32 [Q], `track_valid` logit.
        query_slot: int64 [Q], index of the query among the model's N queries.
        target_index: int64 [Q], matched truth particle (event-local), -1 if unmatched.
        targets: float32 [Q, T], the matched particle's fields (0 where unmatched).
        target_valid: bool [Q], matched to a valid particle.
        pair_query: int64 [P], batch-global query row of each stored pair.
        pair_hit: int64 [P], batch-global hit row of each stored pair.
        pair_logit: float32 [P], `track_hit_logit` of the pair.
    """

    event_id: Tensor
    hit_offsets: Tensor
    query_offsets: Tensor
    hit_raw: Tensor
    hit_embed: Tensor
    query_embed: Tensor
    query_valid_logit: Tensor
    query_slot: Tensor
    target_index: Tensor
    targets: Tensor
    target_valid: Tensor
    pair_query: Tensor
    pair_hit: Tensor
    pair_logit: Tensor

    def query_rows(self, rows: Tensor) -> dict[str, Tensor]:
        """The per-query fields (embeddings, logits, slots, targets) at `rows` (index or mask), by name."""
        return {name: getattr(self, name)[rows] for name in QUERY_FIELDS}

    @property
    def num_events(self) -> int:
        return self.event_id.shape[0]

    def query_event(self) -> Tensor:
        """int64 [Q]: batch-local event index of each query row."""
        counts = self.query_offsets.diff()
        return torch.repeat_interleave(torch.arange(self.num_events, device=counts.device), counts,
                                       output_size=self.query_embed.shape[0])

    def to(self, device, non_blocking: bool = False) -> HeadBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return replace(self, **moved)

    def clone(self) -> HeadBatch:
        """A copy; made outside `torch.inference_mode()` it holds normal tensors autograd can use."""
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def with_valid_targets_only(self) -> HeadBatch:
        """The batch restricted to the queries with a valid target, with their pairs (hit rows kept).

        The loss reads only these queries, so the loss and its gradients equal the full batch's:
        a trainer can skip the other queries' pairs and MLP rows.
        """
        keep = self.target_valid.bool()
        if bool(keep.all()):
            return self
        row = torch.cumsum(keep.long(), 0) - 1
        pair_keep = keep[self.pair_query]
        counts = torch.bincount(self.query_event()[keep], minlength=self.num_events)
        return replace(
            self,
            query_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
            **self.query_rows(keep),
            pair_query=row[self.pair_query[pair_keep]],
            pair_hit=self.pair_hit[pair_keep],
            pair_logit=self.pair_logit[pair_keep],
        )

    def float(self) -> HeadBatch:
        """Embeddings as float32 (a float16/bfloat16 cache is widened here, on the device)."""
        return replace(self, hit_embed=self.hit_embed.float(), query_embed=self.query_embed.float())


def from_model_outputs(
    outputs: dict,
    batch: dict,
    target_index: Tensor,
    floor: float,
    raw_fields: list[str],
    particle_fields: list[str],
    keep_hits: str = "assigned",
    keep_queries: str = "all",
) -> HeadBatch:
    """Sparsify the frozen model's padded outputs into a `HeadBatch`.

    Args:
        outputs: model outputs with `hit_embed` [B, M, D], `query_embed` [B, N, D],
            `track_valid` [B, N] and `track_hit_logit` [B, N, M].
        batch: the padded input batch (`event_id`, `hit_valid` [B, M], `hit_<f>` [B, M],
            `particle_valid` [B, P], `particle_<f>` [B, P]).
        target_index: int64 [B, N], matched particle per query, -1 if none.
        floor: keep pairs with sigmoid(logit) >= floor on valid hits.
        keep_hits: "assigned" keeps only hits used by a kept pair; "all" keeps every valid hit.
        keep_queries: "all" keeps the N queries of every event; "matched" only matched ones.
    """
    logit = outputs["track_hit_logit"].float()
    hit_valid = batch["hit_valid"]
    B, N, M = logit.shape
    device = logit.device

    if keep_queries == "all":
        query_keep = torch.ones(B, N, dtype=torch.bool, device=device)
    elif keep_queries == "matched":
        query_keep = target_index >= 0
    else:
        raise ValueError(f"keep_queries must be 'all' or 'matched', not {keep_queries!r}")
    pair_keep = (torch.sigmoid(logit) >= floor) & hit_valid[:, None, :] & query_keep[:, :, None]

    if keep_hits == "assigned":
        hit_keep = pair_keep.any(dim=1)
    elif keep_hits == "all":
        hit_keep = hit_valid.clone()
    else:
        raise ValueError(f"keep_hits must be 'assigned' or 'all', not {keep_hits!r}")

    # Row numbers of kept hits and queries in the flat (event-major) layout.
    hit_row = torch.cumsum(hit_keep.flatten().long(), 0).view(B, M) - 1
    query_row = torch.cumsum(query_keep.flatten().long(), 0).view(B, N) - 1
    b, n, m = pair_keep.nonzero(as_tuple=True)

    zero = torch.zeros(1, dtype=torch.long, device=device)
    hit_offsets = torch.cat([zero, hit_keep.sum(1).cumsum(0)])
    query_offsets = torch.cat([zero, query_keep.sum(1).cumsum(0)])

    hit_raw = torch.stack([batch[f"hit_{f}"].float() for f in raw_fields], dim=-1)[hit_keep]
    particles = torch.stack([batch[f"particle_{f}"].float() for f in particle_fields], dim=-1)
    safe_index = target_index.clamp(min=0)
    matched = torch.gather(particles, 1, safe_index[..., None].expand(B, N, len(particle_fields)))
    particle_valid = torch.gather(batch["particle_valid"], 1, safe_index) & (target_index >= 0)
    matched = torch.where(particle_valid[..., None], matched, torch.zeros_like(matched))

    return HeadBatch(
        event_id=batch["event_id"].long().to(device),
        hit_offsets=hit_offsets,
        query_offsets=query_offsets,
        hit_raw=hit_raw,
        hit_embed=outputs["hit_embed"][hit_keep],
        query_embed=outputs["query_embed"][query_keep],
        query_valid_logit=outputs["track_valid"].float()[query_keep],
        query_slot=torch.arange(N, device=device).expand(B, N)[query_keep],
        target_index=torch.where(particle_valid, target_index, -1)[query_keep],
        targets=matched[query_keep],
        target_valid=particle_valid[query_keep],
        pair_query=query_row[b, n],
        pair_hit=hit_row[b, m],
        pair_logit=logit[b, n, m],
    )


def concat(batches: list[HeadBatch]) -> HeadBatch:
    """Concatenate batches event-wise, shifting offsets and pair indices."""
    if len(batches) == 1:
        return batches[0]
    hit_base = torch.tensor([0] + [b.hit_offsets[-1].item() for b in batches]).cumsum(0)
    query_base = torch.tensor([0] + [b.query_offsets[-1].item() for b in batches]).cumsum(0)
    out = {}
    for f in fields(HeadBatch):
        name = f.name
        parts = [getattr(b, name) for b in batches]
        if name in ("hit_offsets", "query_offsets"):
            base = hit_base if name == "hit_offsets" else query_base
            parts = [parts[0]] + [p[1:] + base[i] for i, p in enumerate(parts) if i > 0]
        elif name == "pair_query":
            parts = [p + query_base[i] for i, p in enumerate(parts)]
        elif name == "pair_hit":
            parts = [p + hit_base[i] for i, p in enumerate(parts)]
        out[name] = torch.cat(parts)
    return HeadBatch(**out)
