"""The regression head (DESIGN.md §5): track parameters pooled from hits with frozen assignments.

Per event with N queries and M hits, from query embeddings Q [N, D], hit embeddings
H [M, D], raw hit features X [M, F], assignment logits L [N, M] and hit validity v [M]:

    p = sigmoid(L);  A = (p >= tau) & v;  w~ = p * A;  w = w~ / max(sum_m w~, 1e-8)
    R = raw_hit_net(X);  E = encoded_hit_net(H)            (per-hit nets -> D, see HIT_NETS)
    pools of Z in (R, E): w @ Z, w~ @ Z, max and min over {m : A_nm} (0 if empty)
    z_n = [Q_n, pools(R), pools(E)] in R^{9D};  y_n = MLP(z_n) in R^T

Two implementations of the same formula live side by side:

- dense (`forward_dense`): padded [B, N, M] tensors, memory O(B·N·M·D); the reference.
- sparse (`forward_sparse`): the `HeadBatch` pair list with segment reductions, O(P·D).

They agree to float32 rounding, outputs and gradients alike. Targets are regressed in
scaled units, (value - `target_mean`) / `target_std` for each regressed quantity (a particle
field, or q / field for an inverse field). `targets="standardised"` fits mean and std on the
training targets (periodic fields such as phi keep mean 0 and have their residuals wrapped);
`targets="raw"` is the reference workflow's choice: mean 0 and std = `raw_scale[field]`
(default 1), i.e. the stored values divided by a fixed divisor (pT / 200), without wrapping.

The reference workflow's head (hepattn_muon's FrozenEncoderRegressionTask) is
`hit_net="dense", hidden_dim=None, targets="raw", raw_scale={"pt": 200.0}` (with its raw hit
fields chosen by `raw_hit_fields`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cachefeat.config import did_you_mean
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch

IMPLS = ("sparse", "dense")
# Logit given to (query, hit) pairs that a HeadBatch does not hold: sigmoid(-1e4) == 0 in float32.
ABSENT_LOGIT = -1e4


TARGET_MODES = ("standardised", "raw")


def mlp_hit_net(in_dim: int, dim: int) -> nn.Sequential:
    """Per-hit MLP: Linear(in_dim, dim) -> ReLU -> Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class SwiGLU(nn.Module):
    """x = [a, b] split in halves along the last dim -> a * silu(b) (the second half gates the first)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return a * F.silu(b)


def dense_hit_net(in_dim: int, dim: int) -> nn.Sequential:
    """Per-hit gated net as hepattn's `Dense` block with SwiGLU and one hidden layer of 2 * in_dim:
    Linear(in_dim, 4 * in_dim) -> SwiGLU -> Linear(2 * in_dim, dim)."""
    return nn.Sequential(nn.Linear(in_dim, 4 * in_dim), SwiGLU(), nn.Linear(2 * in_dim, dim))


# The `hit_net` choices of RegressionHead: how its raw and encoded hit nets are built.
HIT_NETS = {"mlp": mlp_hit_net, "dense": dense_hit_net}


class StreamDropout(nn.Module):
    """Inverted dropout whose masks come from the layer's own stream, not torch's global RNG.

    The k-th mask drawn in training mode depends on (seed, k) only. `stream` (int64 [2]: seed,
    masks drawn) is a buffer, saved with the weights: a resumed or reloaded head continues its
    stream, and heads trained side by side (a sweep's threads) draw independently of each other.
    The seed comes from torch's global RNG at construction, which `build_head` seeds.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.register_buffer("stream", torch.tensor([int(torch.randint(0, 2**62, ())), 0]))
        self._next: list[int] | None = None  # `stream` on the host: no device sync per mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self._next is None:
            self._next = self.stream.tolist()
        seed, k = self._next
        generator = torch.Generator(device=x.device)
        generator.manual_seed((seed + k * 0x9E3779B97F4A7C15) % 2**63)
        self._next = [seed, k + 1]
        self.stream[1] = k + 1
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._next = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "stream" in missing_keys:  # a head saved before the layer had a stream: keep the fresh one
            missing_keys.remove(prefix + "stream")

    def extra_repr(self) -> str:
        return f"p={self.p}"


def regression_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """(Linear -> ReLU -> LayerNorm -> StreamDropout) x (num_layers - 1) -> Linear(out_dim)."""
    layers: list[nn.Module] = []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.LayerNorm(hidden_dim), StreamDropout(dropout)]
        in_dim = hidden_dim
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def wrap_angle(x: Tensor) -> Tensor:
    """Map angles (radians) into [-pi, pi)."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def _padding_index(hb: HeadBatch) -> tuple[int, int, int, Tensor, Tensor]:
    """(B, N, M, query_flat [Q], hit_flat [H]): flat positions of CSR rows in [B*N] / [B*M] padding.

    N and M are the largest query and hit counts of an event, at least 1.
    """
    B = hb.num_events
    query_counts, hit_counts = hb.query_offsets.diff(), hb.hit_offsets.diff()
    N = max(int(query_counts.max()) if B else 0, 1)
    M = max(int(hit_counts.max()) if B else 0, 1)
    event = torch.arange(B, device=hb.query_offsets.device)
    query_event = torch.repeat_interleave(event, query_counts)
    hit_event = torch.repeat_interleave(event, hit_counts)
    query_local = torch.arange(query_event.shape[0], device=event.device) - hb.query_offsets[query_event]
    hit_local = torch.arange(hit_event.shape[0], device=event.device) - hb.hit_offsets[hit_event]
    return B, N, M, query_event * N + query_local, hit_event * M + hit_local


def dense_inputs(hb: HeadBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pad a `HeadBatch` into the dense head's inputs (differentiable w.r.t. the embeddings).

    Returns:
        query_embed [B, N, D], hit_embed [B, M, D], hit_raw [B, M, F],
        track_hit_logit [B, N, M] (pairs not in `hb` get -1e4, i.e. p = 0),
        hit_valid bool [B, M] (True on the rows `hb` holds).
        N and M are the largest per-event query and hit counts (at least 1).
    """
    B, N, M, query_flat, hit_flat = _padding_index(hb)

    def pad(rows: Tensor, flat: Tensor, size: int) -> Tensor:
        out = rows.new_zeros((B * size, rows.shape[1]))
        return out.index_copy(0, flat, rows).view(B, size, rows.shape[1])

    pair_flat = query_flat[hb.pair_query] * M + hit_flat[hb.pair_hit] % M
    logit = hb.pair_logit.new_full((B * N * M,), ABSENT_LOGIT).index_copy(0, pair_flat, hb.pair_logit)
    hit_valid = torch.zeros(B * M, dtype=torch.bool, device=hit_flat.device)
    hit_valid[hit_flat] = True
    return (
        pad(hb.query_embed, query_flat, N),
        pad(hb.hit_embed, hit_flat, M),
        pad(hb.hit_raw, hit_flat, M),
        logit.view(B, N, M),
        hit_valid.view(B, M),
    )


@dataclass
class PairWeights:
    """The weight-free part of the sparse pools at one threshold tau, shared by every head that uses tau.

    The P' pairs with p = sigmoid(logit) >= tau, ordered by query row:
    query, hit: int64 [P'], batch rows; wt: float32 [P'], their p (the w~ of the formula);
    w: float32 [P'], p normalised over each query's pairs (max(sum, 1e-8) in the denominator).
    raw [P', F] and embed [P', D]: the pair's hit features, so the hit nets run once per pair
    and need no gather (and no scatter in their backward). num_queries: Q, the batch's query rows.
    sums [2Q, P'] and sums_t [P', 2Q]: sparse CSR matrices, the weighted sums as one product
    (rows 0..Q-1 weight by w, rows Q..2Q-1 by wt) and its transpose for the backward.
    """

    query: Tensor
    hit: Tensor
    wt: Tensor
    w: Tensor
    raw: Tensor
    embed: Tensor
    num_queries: int
    sums: Tensor
    sums_t: Tensor


def pair_weights(hb: HeadBatch, threshold: float) -> PairWeights:
    """The pairs of `hb` above `threshold`, their weights and their hits' features."""
    p = torch.sigmoid(hb.pair_logit.float())
    keep = p >= threshold
    query, hit, wt = hb.pair_query[keep], hb.pair_hit[keep], p[keep]
    if query.numel() > 1 and bool((query.diff() < 0).any()):
        order = torch.argsort(query, stable=True)
        query, hit, wt = query[order], hit[order], wt[order]
    Q, P = hb.query_embed.shape[0], query.shape[0]
    denom = wt.new_zeros(Q).index_add_(0, query, wt).clamp(min=1e-8)
    w = wt / denom[query]
    counts = torch.bincount(query, minlength=Q)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    pair = torch.arange(P, device=query.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        sums = torch.sparse_csr_tensor(torch.cat([crow, crow[1:] + P]), pair.repeat(2), torch.cat([w, wt]),
                                       (2 * Q, P), check_invariants=False)
        sums_t = torch.sparse_csr_tensor(torch.arange(0, 2 * P + 1, 2, device=query.device),
                                         torch.stack([query, query + Q], 1).flatten(),
                                         torch.stack([w, wt], 1).flatten(), (P, 2 * Q), check_invariants=False)
    return PairWeights(query, hit, wt, w, hb.hit_raw[hit], hb.hit_embed[hit], Q, sums, sums_t)


class _PairSums(torch.autograd.Function):
    """[2Q, C] = sums @ Z for Z [P', C]: both weighted-sum pools of each query in one sparse product."""

    @staticmethod
    def forward(ctx, Z: Tensor, sums: Tensor, sums_t: Tensor):
        ctx.sums_t = sums_t
        return sums @ Z

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.sums_t @ grad, None, None


def _order_key(bits: Tensor) -> Tensor:
    """int32 float bits -> int32 with the floats' order (and back: the map is its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# _order_key of -inf and +inf: the start values of the max and min scatters.
_KEY_MINUS_INF, _KEY_PLUS_INF = (int(_order_key(torch.tensor([b]).view(torch.int32))) for b in (-math.inf, math.inf))


class _SegmentExtrema(torch.autograd.Function):
    """Column-wise max and min [Q, C] of Z's rows [P', C] over each query's pairs; 0 for a query without pairs.

    Each element is reduced as one int64 key, (order-preserving float bits << 32) | pair row, so
    one integer scatter gives the value and a row that attains it. The backward sends each output
    element's gradient to that row with a [Q, C] scatter. Exact ties (two pairs of one query with
    the same value) go to one row (the highest for max, the lowest for min) where autograd splits
    them evenly; tied rows of a hit net's output come from identical hidden activations, so the
    parameters' gradients are the same either way.
    """

    @staticmethod
    def forward(ctx, Z: Tensor, query: Tensor, num_queries: int):
        P, C = Z.shape
        key = _order_key(Z.contiguous().view(torch.int32)).to(torch.int64)
        key.bitwise_left_shift_(32).bitwise_or_(torch.arange(P, device=Z.device)[:, None])
        index = query[:, None].expand(P, C)
        has_pairs = torch.zeros(num_queries, 1, dtype=torch.bool, device=Z.device)
        has_pairs[query] = True
        outs, rows = [], []
        for reduce, bound_key in (("amax", _KEY_MINUS_INF), ("amin", _KEY_PLUS_INF)):
            k = torch.full((num_queries, C), bound_key << 32 | P, dtype=torch.int64, device=Z.device)  # row P: dropped
            k.scatter_reduce_(0, index, key, reduce)
            value = _order_key((k >> 32).to(torch.int32)).view(torch.float32)
            outs.append(torch.where(has_pairs, value, 0.0))
            rows.append(k.bitwise_and_(0xFFFFFFFF))
        ctx.save_for_backward(*rows)
        ctx.num_rows = P
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_max: Tensor, grad_min: Tensor):
        row_max, row_min = ctx.saved_tensors
        grad_z = grad_max.new_zeros((ctx.num_rows + 1, grad_max.shape[1]))
        grad_z.scatter_add_(0, row_max, grad_max).scatter_add_(0, row_min, grad_min)
        return grad_z[:-1], None, None


class RegressionHead(nn.Module):
    """Regresses track parameters per query by pooling hit features with frozen assignment weights.

    Args:
        raw_fields: names of the F raw hit feature columns (`HeadBatch.hit_raw`), supplied by
            code from the cache or data section (not a config key).
        particle_fields: names of the T_p columns of `HeadBatch.targets` (supplied likewise).
        dim: D, the embedding dim of queries, hits and the hit nets' outputs.
        hidden_dim, num_layers, dropout: the output MLP; `hidden_dim=None` means 9 * D // 2
            (the reference workflow's default).
        assignment_threshold: tau; a hit is assigned to a query where sigmoid(logit) >= tau.
        target_fields: the T regressed particle fields, in output order.
        inverse_fields: target fields regressed as q / value (needs "q" among particle_fields).
        periodic_fields: angles (radians) whose residual is wrapped into [-pi, pi]
            (standardised targets only; raw targets are not wrapped).
        impl: "sparse" or "dense", the path `forward(hb)` takes.
        hit_net: "mlp" (Linear -> ReLU -> Linear) or "dense" (hepattn's `Dense` with SwiGLU:
            Linear(F, 4F) -> SwiGLU -> Linear(2F, D)), for both the raw and the encoded hit net.
        raw_hit_fields: the raw fields, a subset of `raw_fields` by name (in the order given),
            that the raw hit net reads; None: all of them. The batch still holds every raw field.
        targets: "standardised" (mean/std fitted by `fit_scaling`) or "raw" (the stored values
            divided by `raw_scale`, no fitting, no wrapping).
        raw_scale: {target field: divisor} for raw targets, e.g. {"pt": 200.0}; others 1.
    """

    def __init__(
        self,
        raw_fields: list[str],
        particle_fields: list[str],
        dim: int = 32,
        hidden_dim: int | None = 128,
        num_layers: int = 3,
        dropout: float = 0.0,
        assignment_threshold: float = 0.1,
        target_fields: list[str] = ("pt", "eta", "phi", "q"),
        inverse_fields: list[str] = (),
        periodic_fields: list[str] = ("phi",),
        impl: str = "sparse",
        hit_net: str = "mlp",
        raw_hit_fields: list[str] | None = None,
        targets: str = "standardised",
        raw_scale: dict[str, float] | None = None,
    ):
        super().__init__()
        raw_fields, particle_fields = list(raw_fields), list(particle_fields)
        target_fields, inverse_fields, periodic_fields = map(list, (target_fields, inverse_fields, periodic_fields))
        raw_scale = dict(raw_scale or {})
        if impl not in IMPLS:
            raise UserError(f"head impl must be one of {IMPLS}, not {impl!r}")
        if hit_net not in HIT_NETS:
            raise UserError(f"head hit_net must be one of {tuple(HIT_NETS)}, not {hit_net!r}")
        if targets not in TARGET_MODES:
            raise UserError(f"head targets must be one of {TARGET_MODES}, not {targets!r}")
        if not 0.0 < assignment_threshold < 1.0:
            raise UserError(f"assignment_threshold must be in (0, 1), not {assignment_threshold}")
        if num_layers < 1:
            raise UserError(f"head num_layers must be >= 1, not {num_layers}")
        if hidden_dim is None:
            hidden_dim = 9 * dim // 2
        if not target_fields:
            raise UserError("head target_fields is empty")
        for name in target_fields:
            if name not in particle_fields:
                raise UserError(f"target field '{name}' is not a particle field{did_you_mean(name, particle_fields)}")
        for name in inverse_fields:
            if name not in target_fields:
                raise UserError(f"inverse field '{name}' is not a target field{did_you_mean(name, target_fields)}")
            if name == "q" or name in periodic_fields:
                raise UserError(f"inverse field '{name}' cannot be 'q' or a periodic field")
        if inverse_fields and "q" not in particle_fields:
            raise UserError("inverse_fields regress q / value and need 'q' among the particle fields")
        if raw_scale and targets != "raw":
            raise UserError("head raw_scale divides raw targets: it needs targets: raw")
        for name, divisor in raw_scale.items():
            if name not in target_fields:
                raise UserError(f"raw_scale field '{name}' is not a target field{did_you_mean(name, target_fields)}")
            if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or not 0 < divisor < math.inf:
                raise UserError(f"raw_scale['{name}'] must be a positive number, not {divisor!r}")
        if raw_hit_fields is not None:
            raw_hit_fields = list(raw_hit_fields)
            if not raw_hit_fields:
                raise UserError("head raw_hit_fields is empty (leave it out to use every raw field)")
            for name in raw_hit_fields:
                if name not in raw_fields:
                    raise UserError(f"raw hit field '{name}' is not among the raw hit fields "
                                    f"[{', '.join(raw_fields)}]{did_you_mean(name, raw_fields)}")
            if len(set(raw_hit_fields)) < len(raw_hit_fields):
                raise UserError(f"head raw_hit_fields names a field twice: {raw_hit_fields}")

        self.raw_fields, self.particle_fields = raw_fields, particle_fields
        self.target_fields, self.inverse_fields = target_fields, inverse_fields
        self.periodic_fields = [f for f in periodic_fields if f in target_fields] if targets == "standardised" else []
        self.dim, self.hidden_dim, self.num_layers, self.dropout = dim, hidden_dim, num_layers, dropout
        self.assignment_threshold, self.impl = assignment_threshold, impl
        self.hit_net, self.raw_hit_fields = hit_net, raw_hit_fields
        self.targets, self.raw_scale = targets, {k: float(v) for k, v in raw_scale.items()}

        used = raw_hit_fields if raw_hit_fields is not None else raw_fields
        # Columns of hit_raw the raw hit net reads; None: all, in order (no gather).
        self._raw_columns = None if used == raw_fields else [raw_fields.index(f) for f in used]
        self.raw_hit_net = HIT_NETS[hit_net](len(used), dim)
        self.encoded_hit_net = HIT_NETS[hit_net](dim, dim)
        self.mlp = regression_mlp(9 * dim, hidden_dim, len(target_fields), num_layers, dropout)

        T = len(target_fields)
        self.register_buffer("target_mean", torch.zeros(T))
        self.register_buffer("target_std", torch.tensor([self.raw_scale.get(f, 1.0) for f in target_fields]))
        self.register_buffer(
            "_target_column", torch.tensor([particle_fields.index(f) for f in target_fields]), persistent=False
        )
        self.register_buffer("_inverse", torch.tensor([f in inverse_fields for f in target_fields]), persistent=False)
        self.register_buffer(
            "_periodic", torch.tensor([f in self.periodic_fields for f in target_fields]), persistent=False
        )
        self._q_column = particle_fields.index("q") if "q" in particle_fields else None

    def head_config(self) -> dict:
        """The init arguments, JSON-serialisable."""
        return {
            "raw_fields": list(self.raw_fields),
            "particle_fields": list(self.particle_fields),
            "dim": self.dim,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "assignment_threshold": self.assignment_threshold,
            "target_fields": list(self.target_fields),
            "inverse_fields": list(self.inverse_fields),
            "periodic_fields": list(self.periodic_fields),
            "impl": self.impl,
            "hit_net": self.hit_net,
            "raw_hit_fields": None if self.raw_hit_fields is None else list(self.raw_hit_fields),
            "targets": self.targets,
            "raw_scale": dict(self.raw_scale),
        }

    def _raw_inputs(self, hit_raw: Tensor) -> Tensor:
        """[..., F] raw hit rows -> the columns the raw hit net reads (`raw_hit_fields`)."""
        return hit_raw if self._raw_columns is None else hit_raw[..., self._raw_columns]

    # ---- forward -------------------------------------------------------------------------

    def forward(self, hb: HeadBatch) -> Tensor:
        """[Q, T] scaled predictions, one row per query of `hb`, by `self.impl`."""
        if self.impl == "sparse":
            return self.forward_sparse(hb)
        _, _, _, query_flat, _ = _padding_index(hb)
        z = self.features_dense(*dense_inputs(hb))
        return self.mlp(z.flatten(0, 1)[query_flat])

    def forward_sparse(self, hb: HeadBatch) -> Tensor:
        """[Q, T] scaled predictions from the pair list (pairs with p >= tau)."""
        return self.mlp(self.features_sparse(hb))

    def forward_dense(
        self, query_embed: Tensor, hit_embed: Tensor, hit_raw: Tensor, track_hit_logit: Tensor, hit_valid: Tensor
    ) -> Tensor:
        """[B, N, T] scaled predictions from padded tensors (see `features_dense`)."""
        return self.mlp(self.features_dense(query_embed, hit_embed, hit_raw, track_hit_logit, hit_valid))

    def features_sparse(self, hb: HeadBatch) -> Tensor:
        """z [Q, 9D]: query embedding and the 8 pools, by segment reductions over the pairs."""
        return self.features_from_pairs(hb, pair_weights(hb, self.assignment_threshold))

    def features_from_pairs(self, hb: HeadBatch, pairs: PairWeights) -> Tensor:
        """z [Q, 9D] from precomputed pair weights (a sweep computes them once for many heads)."""
        Q = pairs.num_queries
        pools = [hb.query_embed]
        for Z in (self.raw_hit_net(self._raw_inputs(pairs.raw)), self.encoded_hit_net(pairs.embed)):
            Z = Z.float()  # under autocast the hit nets may give bfloat16; the pools are float32
            sums = _PairSums.apply(Z, pairs.sums, pairs.sums_t)
            pools += [sums[:Q], sums[Q:], *_SegmentExtrema.apply(Z, pairs.query, Q)]
        return torch.cat(pools, dim=-1)

    def features_dense(
        self, query_embed: Tensor, hit_embed: Tensor, hit_raw: Tensor, track_hit_logit: Tensor, hit_valid: Tensor
    ) -> Tensor:
        """z [B, N, 9D] from query_embed [B, N, D], hit_embed [B, M, D], hit_raw [B, M, F],
        track_hit_logit [B, N, M] and hit_valid bool [B, M]. Memory O(B·N·M·D)."""
        if hit_embed.shape[1] == 0:  # a reduction over zero hits is undefined: add one invalid hit
            hit_embed, hit_raw = F.pad(hit_embed, (0, 0, 0, 1)), F.pad(hit_raw, (0, 0, 0, 1))
            track_hit_logit, hit_valid = F.pad(track_hit_logit, (0, 1)), F.pad(hit_valid, (0, 1))
        p = torch.sigmoid(track_hit_logit.float())
        A = (p >= self.assignment_threshold) & hit_valid[:, None, :]
        wt = p * A
        w = wt / wt.sum(-1, keepdim=True).clamp(min=1e-8)
        has_hit = A.any(-1, keepdim=True)
        pools = [query_embed]
        for Z in (self.raw_hit_net(self._raw_inputs(hit_raw)), self.encoded_hit_net(hit_embed)):
            Zb = Z[:, None, :, :].expand(-1, A.shape[1], -1, -1)
            mask = A[..., None]
            pools += [
                w @ Z,
                wt @ Z,
                torch.where(has_hit, Zb.masked_fill(~mask, -math.inf).amax(2), 0.0),
                torch.where(has_hit, Zb.masked_fill(~mask, math.inf).amin(2), 0.0),
            ]
        return torch.cat(pools, dim=-1)

    # ---- targets and loss ----------------------------------------------------------------

    def _regressed(self, particle_values: Tensor) -> Tensor:
        """[Q, T_p] particle fields -> [Q, T] regressed quantities in physical units (q / x for inverse)."""
        if particle_values.shape[-1] != len(self.particle_fields):
            raise UserError(
                f"particle values have {particle_values.shape[-1]} columns, the head expects "
                f"{len(self.particle_fields)} ({', '.join(self.particle_fields)})"
            )
        x = particle_values.float()[:, self._target_column]
        if self._q_column is None:
            return x
        q = particle_values.float()[:, self._q_column, None]
        return torch.where(self._inverse, q / x, x)

    def encode_targets(self, particle_values: Tensor) -> Tensor:
        """[Q, T_p] particle fields -> [Q, T] scaled regression targets."""
        return (self._regressed(particle_values) - self.target_mean) / self.target_std

    def decode(self, pred: Tensor) -> dict[str, Tensor]:
        """[Q, T] scaled predictions -> {field: [Q] physical value} per target field.

        An inverse field f gives f = 1 / |y| (y = q / f); when "q" is not itself a target,
        its sign is returned as "q". Periodic fields are wrapped into [-pi, pi) (standardised
        targets; raw targets have no periodic fields).
        """
        y = pred * self.target_std + self.target_mean
        out = {}
        for i, name in enumerate(self.target_fields):
            col = y[:, i]
            if name in self.inverse_fields:
                out[name] = 1.0 / col.abs()
                if "q" not in self.target_fields:
                    out["q"] = torch.sign(col)
            elif name in self.periodic_fields:
                out[name] = wrap_angle(col)
            else:
                out[name] = col
        return out

    def fit_scaling(self, particle_values: Tensor, valid: Tensor) -> None:
        """Set `target_mean` / `target_std` [T] from [Q, T_p] particle values where valid [Q].

        Standardised targets: periodic fields keep mean 0 and get the root mean square as std.
        A std below 1e-6 (a constant target) is clamped to 1e-6. Raw targets: nothing is fitted,
        mean 0 and std `raw_scale` (1 for a field it does not name), whatever the values.
        """
        x = self._regressed(particle_values)[valid.bool()]
        if self.targets == "raw":
            self.target_mean.zero_()
            self.target_std.copy_(torch.tensor([self.raw_scale.get(f, 1.0) for f in self.target_fields]))
            return
        if x.shape[0] == 0:
            raise UserError("cannot fit the target scaling: no valid (matched) particles")
        mean = torch.where(self._periodic, 0.0, x.mean(0))
        std = ((x - mean) ** 2).mean(0).sqrt().clamp(min=1e-6)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def loss(self, pred: Tensor, hb: HeadBatch) -> Tensor:
        """Scalar smooth-L1 (beta 1) on scaled targets: mean over targets, then over valid queries.

        Periodic residuals are wrapped into [-pi, pi) in physical units before scaling.
        Without a valid query the loss is 0, still attached to the graph.
        """
        valid = hb.target_valid.bool()
        target = torch.where(valid[:, None], self.encode_targets(hb.targets), 0.0)
        diff = pred - target
        wrapped = wrap_angle(diff * self.target_std) / self.target_std
        diff = torch.where(self._periodic, wrapped, diff)
        per_query = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=1.0).mean(-1)
        per_query = torch.where(valid, per_query, 0.0)
        return per_query.sum() / valid.sum().clamp(min=1)
