"""Helpers shared by the head tests (`test_regression.py`, `test_frame.py`): the float32 comparisons
of sparse against dense, the dense path's arguments, and a head with perturbed LayerNorms."""

from __future__ import annotations

import torch

from cachefeat.head.regression import RegressionHead

RTOL, ATOL = 1e-5, 1e-6


def close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def close_grad(a, b):
    """Gradient entries are sums whose rounding error scales with the summed terms, not with
    the (possibly cancelled) result: the absolute tolerance is scaled by the tensor's largest entry."""
    scale = b.abs().max().item() if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * max(1.0, scale))


def dense_args(outputs, batch, raw_fields: list[str]):
    """`forward_dense`'s arguments from padded model outputs and batch: query_embed [B, N, D],
    hit_embed [B, M, D], hit_raw [B, M, F] (the `raw_fields` in order), logits [B, N, M], hit_valid [B, M]."""
    hit_raw = torch.stack([batch[f"hit_{f}"] for f in raw_fields], dim=-1)
    return outputs["query_embed"], outputs["hit_embed"], hit_raw, outputs["track_hit_logit"], batch["hit_valid"]


def perturbed_head(seed, raw_fields, particle_fields, D=8, tau=0.1, **kw) -> RegressionHead:
    """A RegressionHead (hidden_dim 16 unless given) built after torch.manual_seed(seed), whose LayerNorms
    start away from weight 1 / bias 0, so that their parameters matter in the gradients."""
    torch.manual_seed(seed)
    kw.setdefault("hidden_dim", 16)
    head = RegressionHead(raw_fields, particle_fields, dim=D, assignment_threshold=tau, **kw)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.3)
                m.bias.add_(torch.randn_like(m.bias) * 0.3)
    return head
