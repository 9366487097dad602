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

`frame="track"` pools the raw hit features in each track's own frame (issue 12). Pass 1, per
query, over the same pairs and weights w: phi_ref = atan2(sum_m w sin(phi_m), sum_m w cos(phi_m))
(the circular weighted mean), eta_ref = sum_m w eta_m; 0 and 0 for a query without pairs; no
gradient flows through them. Pass 2: R = raw_hit_net(X') with X' the pair's hit in that frame,
one column per raw hit field the net reads: (x, y) and (u, v) rotated by -phi_ref, phi - phi_ref
(wrapped), z - r sinh(eta_ref), eta - eta_ref, any other field as it is; each column standardised
as (X' - frame_center) / frame_scale, clamped to [-8, 8], where frame_center and frame_scale
(buffers) are the median and the central-68% half-width, (q84 - q16) / 2, of the training cache's
matched pairs, fitted by `fit_scaling(..., batch=)`. R depends on the (query, hit) pair, so the
dense path runs the raw hit net on [B, N, M, F]. The targets phi and eta are regressed relative
to phi_ref and eta_ref: their target_mean / target_std are fitted on phi - phi_ref (wrapped) and
eta - eta_ref, and the head adds phi_ref / std and eta_ref / std to the MLP's outputs, so its
predictions, `loss` and `decode` are in the same units as without the frame.

The reference workflow's head (hepattn_muon's FrozenEncoderRegressionTask) is
`hit_net="dense", hidden_dim=None, targets="raw", raw_scale={"pt": 200.0}` (with its raw hit
fields chosen by `raw_hit_fields`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cachefeat.config import DROPOUT, POSITIVE_INT, PROBABILITY, at_least, check_allowed, did_you_mean, one_of
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.metrics import wrap_angle

IMPLS = ("sparse", "dense")
# Logit given to (query, hit) pairs that a HeadBatch does not hold: sigmoid(-1e4) == 0 in float32.
ABSENT_LOGIT = -1e4


TARGET_MODES = ("standardised", "raw")
# The `frame` choices of RegressionHead: the frame its raw hit net sees the hits in.
FRAMES = ("none", "track")
# frame="track": raw hit fields rotated by -phi_ref in pairs (first, second) ...
FRAME_ROTATED = {"x": ("x", "y"), "y": ("x", "y"), "u": ("u", "v"), "v": ("u", "v")}
# ... and the fields each other transformed field needs (pass 1 needs phi and eta in any case).
FRAME_NEEDS = {"phi": ("phi",), "eta": ("eta",), "z": ("z", "r")}
# frame="track": target fields regressed relative to the frame (phi_ref, eta_ref), in that order.
FRAME_TARGETS = ("phi", "eta")
# Standardised frame inputs are clamped to [-FRAME_CLAMP, FRAME_CLAMP].
FRAME_CLAMP = 8.0


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
        seed = int(torch.randint(0, 2**62, ()))
        self.register_buffer("stream", torch.tensor([seed, 0]))
        self._host = [seed, 0]  # `stream` on the host, kept equal to it: drawing a mask never reads the device

    def forward(self, x: Tensor) -> Tensor:
        keep = self.draw(x.shape, x.device)
        return x if keep is None else x * keep / (1.0 - self.p)

    def draw(self, shape, device) -> Tensor | None:
        """The stream's next keep mask (bool, `shape`), as `forward` draws it for an input of that shape,
        advancing the stream; None where `forward` draws none (eval mode or p = 0), the stream unchanged.
        (`StackedHeads` draws each variant's mask here and applies them stacked.)"""
        if not self.training or self.p == 0.0:
            return None
        seed, k = self._host
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + k * 0x9E3779B97F4A7C15) % 2**63)
        self._host = [seed, k + 1]
        self.stream[1:].fill_(k + 1)  # a fill, not `stream[1] = k + 1`: that copies from the host and waits
        return torch.rand(shape, generator=generator, device=device) >= self.p

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "stream" in missing_keys:  # a head saved before the layer had a stream: keep the fresh one
            missing_keys.remove(prefix + "stream")
        self._host = self.stream.tolist()

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

    All P pairs of the batch, in its order; the pools read those with p = sigmoid(logit) >= tau
    (the others get weight 0 and no part in the max and min), so that no shape depends on the
    values and building the pools never waits for the device:
    query, hit: int64 [P], batch rows; segment: int64 [P], the query row of a pair with p >= tau,
    Q for the others; wt: float32 [P], p where p >= tau, else 0 (the w~ of the formula);
    w: float32 [P], wt normalised over each query's pairs (max(sum, 1e-8) in the denominator).
    raw [P, F] and embed [P, D]: the pair's hit features, so the hit nets run once per pair
    and need no gather (and no scatter in their backward). num_queries: Q, the batch's query rows.
    sums [2Q, P] and sums_t [P, 2Q]: sparse CSR matrices, the weighted sums as one product
    (rows 0..Q-1 weight by w, rows Q..2Q-1 by wt) and its transpose for the backward.
    """

    query: Tensor
    hit: Tensor
    segment: Tensor
    wt: Tensor
    w: Tensor
    raw: Tensor
    embed: Tensor
    num_queries: int
    sums: Tensor
    sums_t: Tensor
    # Pass 1 of frame="track" per (phi column, eta column) of raw: (phi_ref [Q], eta_ref [Q]),
    # filled by the first head that needs it and shared by the others (a sweep's variants).
    frames: dict = field(default_factory=dict)


def pair_weights(hb: HeadBatch, threshold: float) -> PairWeights:
    """The pairs of `hb`, their weights at `threshold` and their hits' features (see `PairWeights`).

    The pairs may come in any order; the ops and shapes depend on the batch's sizes only.
    """
    p = torch.sigmoid(hb.pair_logit.float())
    query, hit = hb.pair_query, hb.pair_hit
    keep = p >= threshold
    wt = torch.where(keep, p, 0.0)
    Q, P = hb.query_embed.shape[0], query.shape[0]
    segment = torch.where(keep, query, Q)
    denom = wt.new_zeros(Q).index_add_(0, query, wt).clamp(min=1e-8)
    w = wt / denom[query]
    # sums' rows list each query's pairs; a stable sort keeps them in batch order (the identity on
    # the batches of `from_model_outputs` and the cache, whose pairs come by query row).
    by_query, order = torch.sort(query, stable=True)
    crow = torch.searchsorted(by_query, torch.arange(Q + 1, device=query.device))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        sums = torch.sparse_csr_tensor(torch.cat([crow, crow[1:] + P]), order.repeat(2),
                                       torch.cat([w[order], wt[order]]), (2 * Q, P), check_invariants=False)
        sums_t = torch.sparse_csr_tensor(torch.arange(0, 2 * P + 1, 2, device=query.device),
                                         torch.stack([query, query + Q], 1).flatten(),
                                         torch.stack([w, wt], 1).flatten(), (P, 2 * Q), check_invariants=False)
    return PairWeights(query, hit, segment, wt, w, hb.hit_raw[hit], hb.hit_embed[hit], Q, sums, sums_t)


def frame_refs_sparse(pairs: PairWeights, phi_column: int, eta_column: int) -> tuple[Tensor, Tensor]:
    """Pass 1 of frame="track": (phi_ref [Q], eta_ref [Q]) of each query from its pairs' hits.

    phi_ref = atan2(sum w sin(phi), sum w cos(phi)), eta_ref = sum w eta over the query's pairs
    (w = p / sum p, detached); 0 and 0 for a query without pairs. Computed once per `pairs`, from
    p in float64, and kept in float64 through pass 2 and the target offsets: rounded to float32,
    frames that differ in their last float64 bits (the dense pass 1 sums in another order) could
    differ by a whole float32 step (2.4e-7 rad at pi), which the standardisation of the frame
    inputs (widths down to ~1e-3) would magnify to ~1e-4. Logits that differ in their last float32
    bits (a batch of another composition, cached vs live) still move the frame by ~1e-8.
    """
    key = (phi_column, eta_column)
    if key not in pairs.frames:
        with torch.no_grad():
            phi, eta = pairs.raw[:, phi_column].double(), pairs.raw[:, eta_column].double()
            wt = pairs.wt.detach().double()
            terms = torch.stack([wt * torch.sin(phi), wt * torch.cos(phi), wt * eta, wt], dim=1)
            sums = terms.new_zeros((pairs.num_queries, 4)).index_add_(0, pairs.query, terms)
            eta_ref = sums[:, 2] / sums[:, 3].clamp(min=1e-300)
            pairs.frames[key] = (torch.atan2(sums[:, 0], sums[:, 1]), eta_ref)
    return pairs.frames[key]


def frame_refs_dense(wt: Tensor, hit_raw: Tensor, phi_column: int, eta_column: int) -> tuple[Tensor, Tensor]:
    """Pass 1 of frame="track" on padded tensors: wt [B, N, M] (p on the pairs, 0 off them),
    hit_raw [B, M, F] -> float64 (phi_ref [B, N], eta_ref [B, N]), the formula of `frame_refs_sparse`."""
    with torch.no_grad():
        phi, eta = hit_raw[..., phi_column].double(), hit_raw[..., eta_column].double()
        wt = wt.detach().double()
        sin = (wt * torch.sin(phi)[:, None, :]).sum(-1)
        cos = (wt * torch.cos(phi)[:, None, :]).sum(-1)
        eta_ref = (wt * eta[:, None, :]).sum(-1) / wt.sum(-1).clamp(min=1e-300)
        return torch.atan2(sin, cos), eta_ref


def linear_quantiles(x: Tensor, qs: list[float]) -> Tensor:
    """[len(qs), C] column quantiles of x [P, C] by linear interpolation (numpy's default method)."""
    ordered = x.sort(dim=0).values
    out = []
    for q in qs:
        pos = q * (x.shape[0] - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, x.shape[0] - 1)
        frac = pos - lo
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * frac)
    return torch.stack(out)


class _PairSums(torch.autograd.Function):
    """[2Q, C] = sums @ Z for Z [P, C]: both weighted-sum pools of each query in one sparse product.

    The backward is the product with the transpose `sums_t`, built once per batch in `PairWeights`.
    Measured (torch 2.13 CPU, 1 thread, a muon batch of 256 events: P = 12,529 pairs, Q = 512,
    C = 32; forward + backward for one hit net, median of 30 alternating runs, two runs): 0.92 and
    1.04 ms, against 2.1 and 2.2 ms for the two weighted sums as autograd index_adds. With the hit
    nets on pair rows and the integer-key extrema (commit c53730c): 29.3 -> 22.4 ms per training
    step of 256 muon events (same process, alternating, 1 thread).
    """

    @staticmethod
    def forward(ctx, Z: Tensor, sums: Tensor, sums_t: Tensor):
        ctx.sums_t = sums_t
        # float32 under autocast too: the sparse CSR products have no bfloat16 kernel on the CPU
        with torch.autocast(Z.device.type, enabled=False):
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
    """Column-wise max and min [Q, C] of Z's rows [P, C] over each query's pairs; 0 for a query without pairs.

    `segment` [P] gives each row's query, or Q for a row that no query reads (a pair below tau).

    Each element is reduced as one int64 key, (order-preserving float bits << 32) | pair row, so
    one integer scatter gives the value and a row that attains it. The backward sends each output
    element's gradient to that row with a [Q, C] scatter. Exact ties (two pairs of one query with
    the same value) go to one row (the highest for max, the lowest for min) where autograd splits
    them evenly; tied rows of a hit net's output come from identical hidden activations, so the
    parameters' gradients are the same either way.

    Measured (the batch and settings of `_PairSums`): 3.5 and 4.2 ms for max and min, forward +
    backward, against 9.3 and 12.6 ms for autograd's scatter_reduce amax/amin (include_self=False),
    whose backward makes several [P, C] passes and took about half of a cached training step
    (profile, muon batch of 256 events, 1 thread; commit 15fd803).
    """

    @staticmethod
    def forward(ctx, Z: Tensor, segment: Tensor, num_queries: int):
        P, C = Z.shape
        key = _order_key(Z.contiguous().view(torch.int32)).to(torch.int64)
        key.bitwise_left_shift_(32).bitwise_or_(torch.arange(P, device=Z.device)[:, None])
        index = segment[:, None].expand(P, C)
        # Segment Q collects the rows no query reads; it is dropped after the scatters.
        has_pairs = torch.zeros(num_queries + 1, 1, dtype=torch.bool, device=Z.device).index_fill_(0, segment, True)
        has_pairs = has_pairs[:num_queries]
        outs, rows = [], []
        for reduce, bound_key in (("amax", _KEY_MINUS_INF), ("amin", _KEY_PLUS_INF)):
            # row P: a query without pairs sends its gradient to a dropped row
            k = torch.full((num_queries + 1, C), bound_key << 32 | P, dtype=torch.int64, device=Z.device)
            k = k.scatter_reduce_(0, index, key, reduce)[:num_queries]
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


def pooled_features(query_embed: Tensor, hit_features: tuple[Tensor, Tensor], pairs: PairWeights) -> Tensor:
    """z [Q, *S, 9D] = [Q_n, pools(R), pools(E)], the feature assembly of the sparse head (module docstring).

    query_embed [Q, D]; hit_features (R, E): the raw and encoded hit nets' outputs on the pairs,
    each [P, *S, D] (S: stack dims, () for one head, (K,) for K heads stacked by `StackedHeads`;
    any float dtype, pooled in float32). pools(Z) = w @ Z, w~ @ Z, max and min over each query's
    pairs, computed on Z viewed as [P, prod(S) * D]: they are column-wise, so each stacked head gets
    exactly the pools it would get alone.
    """
    Q = pairs.num_queries
    stack = hit_features[0].shape[1:-1]
    D = query_embed.shape[-1]
    pools = [query_embed.reshape(Q, *(1,) * len(stack), D).expand(Q, *stack, D) if stack else query_embed]
    for Z in hit_features:
        shape = Z.shape
        # Under autocast the hit nets may give bfloat16; the pools are float32.
        Z = Z.float().reshape(shape[0], math.prod(shape[1:]))
        sums = _PairSums.apply(Z, pairs.sums, pairs.sums_t)
        extrema = _SegmentExtrema.apply(Z, pairs.segment, Q)
        pools += [pool.view(Q, *shape[1:]) for pool in (sums[:Q], sums[Q:], *extrema)]
    return torch.cat(pools, dim=-1)


def standardise_frame(columns: Tensor, center: Tensor, scale: Tensor) -> Tensor:
    """frame="track": the raw hit net's inputs from float64 frame columns [..., F'] (`_frame_columns`):
    (columns - center) / scale in float64, clamped to [-FRAME_CLAMP, FRAME_CLAMP], in center's dtype.
    center, scale: the head's `frame_center` / `frame_scale` [F'] (or stacked, broadcastable)."""
    X = (columns - center.double()) / scale.double()
    return X.clamp(-FRAME_CLAMP, FRAME_CLAMP).to(center.dtype)


def frame_offset(pred: Tensor, phi_ref: Tensor, eta_ref: Tensor, phi_map: Tensor, eta_map: Tensor,
                 std: Tensor) -> Tensor:
    """frame="track": float32 predictions from MLP outputs pred [..., T]: phi_ref / std and eta_ref / std
    (phi_ref, eta_ref broadcast against pred[..., 0]) added where phi_map / eta_map [T] (the head's
    `_frame_map` rows, or stacked, broadcastable) are 1; the other columns get an exact 0."""
    # Elementwise in float64, not a matmul: under autocast a matmul would round phi_ref to bfloat16.
    offset = (phi_ref.double()[..., None] * phi_map.double() + eta_ref.double()[..., None] * eta_map.double())
    return (pred.double() + offset / std.double()).float()


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
        frame: "none" (the raw hit net sees the raw fields as stored) or "track" (it sees each
            hit in the frame of the query it is pooled for, see the module docstring; needs the
            raw fields phi and eta, and y with x, v with u, r with z; standardised targets only).
    """

    ALLOWED = {
        "dim": POSITIVE_INT,
        "hidden_dim": at_least(1, integer=True, none=True),
        "num_layers": POSITIVE_INT,
        "dropout": DROPOUT,
        "assignment_threshold": PROBABILITY,
        "impl": one_of(*IMPLS),
        "hit_net": one_of(*HIT_NETS),
        "targets": one_of(*TARGET_MODES),
        "frame": one_of(*FRAMES),
    }

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
        frame: str = "none",
    ):
        super().__init__()
        raw_fields, particle_fields = list(raw_fields), list(particle_fields)
        target_fields, inverse_fields, periodic_fields = map(list, (target_fields, inverse_fields, periodic_fields))
        raw_scale = dict(raw_scale or {})
        check_allowed("head", dict(dim=dim, hidden_dim=hidden_dim, num_layers=num_layers, dropout=dropout,
                                   assignment_threshold=assignment_threshold, impl=impl, hit_net=hit_net,
                                   targets=targets, frame=frame), self.ALLOWED)
        if frame != "none" and targets != "standardised":
            raise UserError(f"head frame {frame!r} regresses phi and eta relative to the frame: it needs "
                            "targets: standardised")
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
        self.frame = frame

        used = raw_hit_fields if raw_hit_fields is not None else raw_fields
        # Columns of hit_raw the raw hit net reads (int64, on the head's device); None: all, in order (no gather).
        self.register_buffer("_raw_columns", None if used == raw_fields else
                             torch.tensor([raw_fields.index(f) for f in used]), persistent=False)
        if frame == "track":
            needed = ["phi", "eta"]
            for name in used:
                needed += [f for f in FRAME_ROTATED.get(name, FRAME_NEEDS.get(name, ())) if f not in needed]
            missing = [f for f in needed if f not in raw_fields]
            if missing:
                raise UserError(f"head frame 'track' needs the raw hit field(s) {', '.join(missing)}, which the data "
                                f"does not have (raw hit fields: {', '.join(raw_fields)})")
            col = raw_fields.index
            self._phi_column, self._eta_column = col("phi"), col("eta")
            # One (kind, column, partner) per raw hit net input, in the order of `used`.
            self._frame_spec = []
            for name in used:
                if name in FRAME_ROTATED:
                    first, second = FRAME_ROTATED[name]
                    self._frame_spec.append(("cos" if name == first else "sin", col(first), col(second)))
                elif name == "phi":
                    self._frame_spec.append(("phi", col(name), -1))
                elif name == "eta":
                    self._frame_spec.append(("eta", col(name), -1))
                elif name == "z":
                    self._frame_spec.append(("z", col(name), col("r")))
                else:
                    self._frame_spec.append(("same", col(name), -1))
            self.register_buffer("frame_center", torch.zeros(len(used)))
            self.register_buffer("frame_scale", torch.ones(len(used)))
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
        # frame="track": which of FRAME_TARGETS are regressed relative to the frame ([2, T] 0/1 map).
        frame_map = torch.zeros(len(FRAME_TARGETS), T)
        if frame == "track":
            for i, name in enumerate(FRAME_TARGETS):
                if name in target_fields and name not in inverse_fields:
                    frame_map[i, target_fields.index(name)] = 1.0
        self.register_buffer("_frame_map", frame_map, persistent=False)

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
            "frame": self.frame,
        }

    def _raw_inputs(self, hit_raw: Tensor) -> Tensor:
        """[..., F] raw hit rows -> the columns the raw hit net reads (`raw_hit_fields`)."""
        return hit_raw if self._raw_columns is None else hit_raw.index_select(-1, self._raw_columns)

    def _frame_columns(self, hit_raw: Tensor, phi_ref: Tensor, eta_ref: Tensor) -> Tensor:
        """frame="track": [..., F'] unstandardised inputs of the raw hit net from raw hit rows
        [..., F] and the frame (phi_ref, eta_ref broadcast against hit_raw[..., 0]); float64."""
        x, phi_ref, eta_ref = hit_raw.double(), phi_ref.double(), eta_ref.double()
        cos, sin = torch.cos(phi_ref), torch.sin(phi_ref)
        columns = []
        for kind, i, j in self._frame_spec:
            if kind == "cos":  # the first of a rotated pair: a cos + b sin
                columns.append(x[..., i] * cos + x[..., j] * sin)
            elif kind == "sin":  # the second: b cos - a sin
                columns.append(x[..., j] * cos - x[..., i] * sin)
            elif kind == "phi":
                columns.append(wrap_angle(x[..., i] - phi_ref))
            elif kind == "eta":
                columns.append(x[..., i] - eta_ref)
            elif kind == "z":
                columns.append(x[..., i] - x[..., j] * torch.sinh(eta_ref))
            else:
                columns.append(x[..., i].expand(torch.broadcast_shapes(x[..., i].shape, phi_ref.shape)))
        return torch.stack(columns, dim=-1)

    def _frame_inputs(self, hit_raw: Tensor, phi_ref: Tensor, eta_ref: Tensor) -> Tensor:
        """frame="track": the raw hit net's standardised, clamped float32 inputs (see `_frame_columns`)."""
        return standardise_frame(self._frame_columns(hit_raw, phi_ref, eta_ref), self.frame_center, self.frame_scale)

    def _frame_offset(self, pred: Tensor, phi_ref: Tensor, eta_ref: Tensor) -> Tensor:
        """[..., T] MLP outputs -> predictions: phi_ref / std and eta_ref / std added to the columns
        regressed relative to the frame (the others get an exact 0)."""
        return frame_offset(pred, phi_ref, eta_ref, self._frame_map[0], self._frame_map[1], self.target_std)

    def frame_refs(self, pairs: PairWeights) -> tuple[Tensor, Tensor]:
        """frame="track": float64 (phi_ref [Q], eta_ref [Q]) from pair weights (pass 1, shared via `pairs`)."""
        return frame_refs_sparse(pairs, self._phi_column, self._eta_column)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, hb: HeadBatch) -> Tensor:
        """[Q, T] scaled predictions, one row per query of `hb`, by `self.impl`."""
        if self.impl == "sparse":
            return self.forward_sparse(hb)
        _, _, _, query_flat, _ = _padding_index(hb)
        z, frame = self._features_dense(*dense_inputs(hb))
        pred = self.mlp(z.flatten(0, 1)[query_flat])
        if frame is None:
            return pred
        return self._frame_offset(pred, frame[0].flatten()[query_flat], frame[1].flatten()[query_flat])

    def forward_sparse(self, hb: HeadBatch) -> Tensor:
        """[Q, T] scaled predictions from the pair list (pairs with p >= tau)."""
        return self.predict_from_pairs(hb, pair_weights(hb, self.assignment_threshold))

    def predict_from_pairs(self, hb: HeadBatch, pairs: PairWeights) -> Tensor:
        """[Q, T] scaled predictions from precomputed pair weights (a sweep computes them once for many heads)."""
        pred = self.mlp(self.features_from_pairs(hb, pairs))
        if self.frame == "none":
            return pred
        return self._frame_offset(pred, *self.frame_refs(pairs))

    def forward_dense(
        self, query_embed: Tensor, hit_embed: Tensor, hit_raw: Tensor, track_hit_logit: Tensor, hit_valid: Tensor
    ) -> Tensor:
        """[B, N, T] scaled predictions from padded tensors (see `features_dense`)."""
        z, frame = self._features_dense(query_embed, hit_embed, hit_raw, track_hit_logit, hit_valid)
        pred = self.mlp(z)
        return pred if frame is None else self._frame_offset(pred, *frame)

    def features_sparse(self, hb: HeadBatch) -> Tensor:
        """z [Q, 9D]: query embedding and the 8 pools, by segment reductions over the pairs."""
        return self.features_from_pairs(hb, pair_weights(hb, self.assignment_threshold))

    def features_from_pairs(self, hb: HeadBatch, pairs: PairWeights) -> Tensor:
        """z [Q, 9D] from precomputed pair weights (a sweep computes them once for many heads)."""
        if self.frame == "none":
            raw = self._raw_inputs(pairs.raw)
        else:
            phi_ref, eta_ref = self.frame_refs(pairs)
            raw = self._frame_inputs(pairs.raw, phi_ref[pairs.query], eta_ref[pairs.query])
        return pooled_features(hb.query_embed, (self.raw_hit_net(raw), self.encoded_hit_net(pairs.embed)), pairs)

    def features_dense(
        self, query_embed: Tensor, hit_embed: Tensor, hit_raw: Tensor, track_hit_logit: Tensor, hit_valid: Tensor
    ) -> Tensor:
        """z [B, N, 9D] from query_embed [B, N, D], hit_embed [B, M, D], hit_raw [B, M, F],
        track_hit_logit [B, N, M] and hit_valid bool [B, M]. Memory O(B·N·M·D)."""
        return self._features_dense(query_embed, hit_embed, hit_raw, track_hit_logit, hit_valid)[0]

    def _features_dense(
        self, query_embed: Tensor, hit_embed: Tensor, hit_raw: Tensor, track_hit_logit: Tensor, hit_valid: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(z [B, N, 9D], frame): `features_dense` and, for frame="track", (phi_ref, eta_ref) [B, N]."""
        if hit_embed.shape[1] == 0:  # a reduction over zero hits is undefined: add one invalid hit
            hit_embed, hit_raw = F.pad(hit_embed, (0, 0, 0, 1)), F.pad(hit_raw, (0, 0, 0, 1))
            track_hit_logit, hit_valid = F.pad(track_hit_logit, (0, 1)), F.pad(hit_valid, (0, 1))
        p = torch.sigmoid(track_hit_logit.float())
        A = (p >= self.assignment_threshold) & hit_valid[:, None, :]
        wt = p * A
        w = wt / wt.sum(-1, keepdim=True).clamp(min=1e-8)
        has_hit = A.any(-1, keepdim=True)
        mask = A[..., None]
        pools = [query_embed]
        frame = None
        if self.frame == "none":
            raw = self.raw_hit_net(self._raw_inputs(hit_raw))  # [B, M, D]
        else:
            frame = frame_refs_dense(wt, hit_raw, self._phi_column, self._eta_column)
            raw = self.raw_hit_net(self._frame_inputs(hit_raw[:, None], frame[0][..., None], frame[1][..., None]))
        for Z in (raw, self.encoded_hit_net(hit_embed)):
            if Z.dim() == 4:  # [B, N, M, D]: a hit feature per (query, hit) pair (frame="track")
                Zb = Z
                sums = [torch.einsum("bnm,bnmd->bnd", w, Z), torch.einsum("bnm,bnmd->bnd", wt, Z)]
            else:
                Zb = Z[:, None, :, :].expand(-1, A.shape[1], -1, -1)
                sums = [w @ Z, wt @ Z]
            pools += [
                *sums,
                torch.where(has_hit, Zb.masked_fill(~mask, -math.inf).amax(2), 0.0),
                torch.where(has_hit, Zb.masked_fill(~mask, math.inf).amin(2), 0.0),
            ]
        return torch.cat(pools, dim=-1), frame

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

    def fit_scaling(self, particle_values: Tensor, valid: Tensor, batch: HeadBatch | None = None) -> None:
        """Set `target_mean` / `target_std` [T] from [Q, T_p] particle values where valid [Q].

        Standardised targets: periodic fields keep mean 0 and get the root mean square as std.
        A std below 1e-6 (a constant target) is clamped to 1e-6. Raw targets: nothing is fitted,
        mean 0 and std `raw_scale` (1 for a field it does not name), whatever the values.

        frame="track" needs `batch`, the HeadBatch whose queries the rows are (the training
        cache's first events): the targets phi and eta are fitted on phi - phi_ref (wrapped) and
        eta - eta_ref, and `frame_center` / `frame_scale` on the raw hit net's inputs over the
        pairs (p >= tau) of valid queries: their median and central-68% half-width (q84 - q16) / 2
        (a half-width of 0 becomes 1). Without `batch` (for a head that is only compared, as cache
        verify's) the frame statistics keep their values (0 and 1 when new) and phi and eta get
        mean 0, std 1: a head to be trained must get the batch.
        """
        valid = valid.bool()
        x = self._regressed(particle_values)
        if self.frame != "none" and self.targets == "standardised":
            if batch is None:
                if not bool(valid.any()):
                    raise UserError("cannot fit the target scaling: no valid (matched) particles")
                self._fit_targets(x[valid], fixed=self._frame_map.sum(0) > 0)
                return
            if batch.query_embed.shape[0] != particle_values.shape[0]:
                raise ValueError(f"fit_scaling: {particle_values.shape[0]} particle rows for a batch of "
                                 f"{batch.query_embed.shape[0]} queries")
            pairs = pair_weights(batch, self.assignment_threshold)
            phi_ref, eta_ref = self.frame_refs(pairs)
            ref = phi_ref[:, None] * self._frame_map[0] + eta_ref[:, None] * self._frame_map[1]  # [Q, T]
            x = torch.where(self._periodic, wrap_angle(x - ref), x - ref)
            matched = valid.to(pairs.query.device)[pairs.query] & (pairs.segment < pairs.num_queries)
            if not bool(matched.any()):
                raise UserError("cannot fit the head's frame statistics: no pairs of valid (matched) queries")
            q = pairs.query[matched]
            columns = self._frame_columns(pairs.raw[matched], phi_ref[q], eta_ref[q])
            lo, median, hi = linear_quantiles(columns, [0.16, 0.5, 0.84]).to(self.frame_center.dtype)
            half = (hi - lo) / 2
            self.frame_center.copy_(median)
            self.frame_scale.copy_(torch.where(half > 0, half, 1.0))
        x = x[valid]
        if self.targets == "raw":
            self.target_mean.zero_()
            self.target_std.copy_(torch.tensor([self.raw_scale.get(f, 1.0) for f in self.target_fields]))
            return
        if x.shape[0] == 0:
            raise UserError("cannot fit the target scaling: no valid (matched) particles")
        self._fit_targets(x)

    def _fit_targets(self, x: Tensor, fixed: Tensor | None = None) -> None:
        """Standardised target_mean / target_std from regressed values x [Q', T]; columns where
        `fixed` [T] is True get mean 0 and std 1."""
        mean = torch.where(self._periodic, 0.0, x.mean(0))
        std = ((x - mean) ** 2).mean(0).sqrt().clamp(min=1e-6)
        if fixed is not None:
            mean, std = torch.where(fixed, 0.0, mean), torch.where(fixed, 1.0, std)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def check_state(self, state: dict, prefix: str = "") -> None:
        """UserError when a state dict (keys `prefix` + name) is of a head of another frame kind.
        A partial state dict (without `target_mean`, e.g. dropout streams only) is not checked."""
        if prefix + "target_mean" not in state:
            return
        saved = "track" if prefix + "frame_center" in state else "none"
        if saved != self.frame:
            raise UserError(f"a head checkpoint of frame {saved!r} cannot be loaded into a head of frame "
                            f"{self.frame!r}: build the head with the checkpoint's head_config (frame: {saved})")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
