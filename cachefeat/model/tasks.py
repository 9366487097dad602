"""The two stage-1 tasks, hepattn style: each has a forward, a matching cost and a loss.

Shapes: B events, N queries, M hits, P particle slots, D embedding dim.
Costs are [B, N, P] (query n vs particle p), computed without gradients in float64.
"""

from __future__ import annotations

import math

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
        """
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
