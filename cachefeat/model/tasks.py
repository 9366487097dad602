"""The two stage-1 tasks, hepattn style: each has a forward, a matching cost and a loss.

Shapes: B events, N queries, M hits, P particle slots, D embedding dim.
Costs are [B, N, P] (query n vs particle p), computed without gradients in float64.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PAD_LOGIT = -1e4
"""`track_hit_logit` of padding hits: sigmoid is 0 in float32, and the value stays finite."""


class ObjectValid(nn.Module):
    """MLP D→D→1 on each query → `track_valid` logit [B, N]."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, q: Tensor) -> Tensor:
        return self.net(q).squeeze(-1)

    @staticmethod
    @torch.no_grad()
    def cost(track_valid: Tensor, num_particles: int) -> Tensor:
        """BCE(track_valid, 1) = softplus(-logit), float64 [B, N, P]."""
        return F.softplus(-track_valid.double())[:, :, None].expand(-1, -1, num_particles)

    @staticmethod
    def loss(track_valid: Tensor, matched: Tensor) -> Tensor:
        """Mean BCE over all B·N queries; target 1 where `matched` (bool [B, N])."""
        return F.binary_cross_entropy_with_logits(track_valid.float(), matched.float())


class ObjectHitMask(nn.Module):
    """MLPs D→D→D on queries and hits; `track_hit_logit` = q·h / sqrt(D), [B, N, M].

    Padding hits get `PAD_LOGIT`.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query_net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.hit_net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, q: Tensor, h: Tensor, hit_valid: Tensor) -> Tensor:
        logit = torch.einsum("bnd,bmd->bnm", self.query_net(q), self.hit_net(h)) * self.scale
        return logit.masked_fill(~hit_valid[:, None, :], PAD_LOGIT)

    @staticmethod
    @torch.no_grad()
    def cost(track_hit_logit: Tensor, hit_valid: Tensor, particle_hit_valid: Tensor) -> dict[str, Tensor]:
        """Mask costs over valid hits, float64 [B, N, P] each.

        `mask_bce`: mean over valid hits of BCE(logit_nm, t_pm); `mask_dice`: 1 - (2Σpt + 1) / (Σp + Σt + 1),
        p = sigmoid(logit), t = particle_hit_valid ∧ hit_valid.

        On the CPU the sums over a particle's hits run over its hits only (`_cpu_mask_cost`); on other
        devices they are dense products over all hits (`_dense_mask_cost`: one batched matmul each,
        deterministic).
        """
        if track_hit_logit.device.type == "cpu":
            return _cpu_mask_cost(track_hit_logit, hit_valid, particle_hit_valid)
        return _dense_mask_cost(track_hit_logit, hit_valid, particle_hit_valid)

    @staticmethod
    def loss(logit: Tensor, target: Tensor, hit_valid: Tensor) -> dict[str, Tensor]:
        """Losses of K matched queries over their valid hits, averaged over the K queries.

        Args: logit float [K, M], target bool [K, M], hit_valid bool [K, M].
        Returns `mask_bce` (mean BCE over valid hits) and `mask_dice` (as in `cost`); zero when K = 0.
        """
        if logit.shape[0] == 0:
            zero = logit.sum() * 0.0
            return {"mask_bce": zero, "mask_dice": zero}
        v = hit_valid.float()
        t = target.float() * v
        bce = F.binary_cross_entropy_with_logits(logit.float(), t, reduction="none")
        bce = (bce * v).sum(-1) / v.sum(-1).clamp(min=1.0)
        p = torch.sigmoid(logit.float()) * v
        dice = 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
        return {"mask_bce": bce.mean(), "mask_dice": dice.mean()}


def _dense_mask_cost(track_hit_logit: Tensor, hit_valid: Tensor, particle_hit_valid: Tensor) -> dict[str, Tensor]:
    """`ObjectHitMask.cost` as dense float64 products over every (query, particle, hit)."""
    v = hit_valid.double()
    x = track_hit_logit.double() * v[:, None, :]
    t = particle_hit_valid.double() * v[:, None, :]
    n_valid = v.sum(-1).clamp(min=1.0)[:, None, None]
    softplus_sum = (F.softplus(x) * v[:, None, :]).sum(-1)
    bce = (softplus_sum[:, :, None] - torch.einsum("bnm,bpm->bnp", x, t)) / n_valid
    p = torch.sigmoid(x) * v[:, None, :]
    dice = 1.0 - (2.0 * torch.einsum("bnm,bpm->bnp", p, t) + 1.0) / (
        p.sum(-1)[:, :, None] + t.sum(-1)[:, None, :] + 1.0
    )
    return {"mask_bce": bce, "mask_dice": dice}


def _cpu_mask_cost(track_hit_logit: Tensor, hit_valid: Tensor, particle_hit_valid: Tensor) -> dict[str, Tensor]:
    """`ObjectHitMask.cost` on the CPU, in O(B·N·M) instead of the dense products' O(B·N·P·M).

    The products Σ_m x_nm t_pm sum, for each particle, its own hits' logits: the (event, particle,
    hit) memberships become a sparse CSR matrix [B·P, B·M] (row b·P + p lists the hits of particle
    p of event b, in hit order) times the logits copied hits-major ([B·M, N], float64, a hit's
    logits for all queries one contiguous row); the CPU sums each row's hits in order, so the result
    is deterministic. Measured on a TrackML-scale batch (2 events, 1,100 queries, 850 particle
    slots, 9,383 hits; a 2-core Intel Xeon VM, one thread): 0.49 s against 1.40 s for
    `_dense_mask_cost`; equal to it within 1e-15 (another summation order).
    """
    B, N, M = track_hit_logit.shape
    P = particle_hit_valid.shape[1]
    invalid = ~hit_valid[:, :, None]  # [B, M, 1]
    x = torch.empty(B * M, N, dtype=torch.float64)
    x.view(B, M, N).copy_(track_hit_logit.transpose(1, 2)).masked_fill_(invalid, 0.0)
    # nonzero lists the memberships in (event, particle, hit) order: the CSR's row order
    b, p, m = (particle_hit_valid & hit_valid[:, None, :]).nonzero(as_tuple=True)
    n_member = torch.bincount(b * P + p, minlength=B * P)
    crow = torch.cat([n_member.new_zeros(1), n_member.cumsum(0)])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a product with a dense matrix is all we use
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        members = torch.sparse_csr_tensor(crow, b * M + m, torch.ones(b.numel(), dtype=torch.float64),
                                          size=(B * P, B * M), check_invariants=False)

    def particle_sums(values: Tensor) -> Tensor:  # [B·M, N] -> Σ over each particle's hits, [B, N, P]
        return (members @ values).view(B, P, N).transpose(1, 2)

    n_valid = hit_valid.sum(-1).clamp(min=1).to(torch.float64)[:, None, None]
    bce = (F.softplus(x).view(B, M, N).masked_fill_(invalid, 0.0).sum(1)[:, :, None] - particle_sums(x)) / n_valid
    prob = torch.sigmoid(x)
    prob.view(B, M, N).masked_fill_(invalid, 0.0)
    dice = 1.0 - (2.0 * particle_sums(prob) + 1.0) / (
        prob.view(B, M, N).sum(1)[:, :, None] + n_member.view(B, 1, P).to(torch.float64) + 1.0
    )
    return {"mask_bce": bce, "mask_dice": dice}
