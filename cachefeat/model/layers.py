"""Building blocks of the stage-1 model: MLP, attention (full and phi-window), input net,
encoder and decoder layers.

Shapes: B events, M hits, N queries, D embedding dim. Masks are bool, True = may be attended.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of `module`, trainable or frozen."""
    return sum(p.numel() for p in module.parameters())


class MLP(nn.Module):
    """Gated (SwiGLU) feed-forward block: d_in → 2 × hidden → SiLU gate → hidden → d_out."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, 2 * hidden)
        self.out_proj = nn.Linear(hidden, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.gate_proj(x).chunk(2, dim=-1)
        return self.out_proj(self.dropout(F.silu(a) * b))


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`.

    A query row whose mask allows no key returns exactly zero (no NaN, nothing from masked keys).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, Lq, D] attends to kv [B, Lk, D] (x itself when None); mask broadcastable to [B, Lq, Lk]."""
        k, v = self.kv_proj(x if kv is None else kv).chunk(2, dim=-1)
        return self.attend(self.q_proj(x), k, v, mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention over projected q [B, Lq, D], k, v [B, Lk, D]; returns the output projection [B, Lq, D]."""
        B, Lq, D = q.shape
        H = self.num_heads
        q, k, v = (t.reshape(B, t.shape[1], H, D // H).transpose(1, 2) for t in (q, k, v))
        has_key = None
        if mask is not None:
            has_key = mask.any(dim=-1, keepdim=True)
            mask = (mask | ~has_key).unsqueeze(1)  # rows without keys attend anywhere, then are zeroed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, D))
        return out if has_key is None else torch.where(has_key, out, 0.0)


def window_self_attention(attn: Attention, x: Tensor, valid: Tensor, window_size: int) -> Tensor:
    """Self-attention of hits in blocks of `window_size`, for hits sorted by phi with valid hits first.

    Block i attends to itself and to blocks i-1 and i+1, wrapping around among the blocks that
    hold the event's valid hits; a neighbour that coincides with an already attended block (one or
    two blocks in the event) is attended once. With window_size ≥ M this is full attention.

    Args:
        x: float [B, M, D], hits sorted by phi, valid hits first.
        valid: bool [B, M].
    Returns: float [B, M, D].
    """
    B, M, D = x.shape
    W = window_size
    nb = max(1, math.ceil(M / W))
    pad = nb * W - M
    x = F.pad(x, (0, 0, 0, pad))
    valid = F.pad(valid, (0, pad), value=False)
    q = attn.q_proj(x).view(B * nb, W, D)
    k, v = attn.kv_proj(x).view(B, nb, W, 2 * D).chunk(2, dim=-1)

    n_blocks = ((valid.sum(dim=1) + W - 1) // W).clamp(min=1)  # blocks holding valid hits, [B]
    centre = torch.arange(nb, device=x.device).expand(B, nb)
    left = (centre - 1) % n_blocks[:, None]
    right = (centre + 1) % n_blocks[:, None]
    idx = torch.stack([left, centre, right], dim=-1)  # [B, nb, 3]
    distinct = torch.stack(
        [left != centre, torch.ones_like(left, dtype=torch.bool), (right != centre) & (right != left)], dim=-1
    )
    bi = torch.arange(B, device=x.device)[:, None, None]
    k = k[bi, idx].reshape(B * nb, 3 * W, D)
    v = v[bi, idx].reshape(B * nb, 3 * W, D)
    key_mask = (valid.view(B, nb, W)[bi, idx] & distinct[..., None]).reshape(B * nb, 1, 3 * W)
    out = attn.attend(q, k, v, key_mask)
    return out.view(B, nb * W, D)[:, :M]


@functools.cache
def warm_up_cpu_trig() -> None:
    """Run sin and cos once, per process, over a tensor large enough for torch's multi-threaded CPU path.

    Measured with the CPU wheel of torch 2.13 on a 2-core Xeon: in about 1 process in 11, the
    first multi-threaded sin/cos of the process rounded the first thread's share differently,
    which moved the embeddings of that batch by up to 1e-4 (the positional encoding takes sin of
    large arguments), so two extractions of one input could differ. With this call first, 45
    processes out of 45 agreed bit for bit. Uses no random numbers.
    """
    x = torch.linspace(0.0, 1.0e4, 1 << 17)
    x.sin()
    x.cos()


class PositionalEncoding(nn.Module):
    """Sinusoidal features of (r, eta, phi) projected to D; integer phi frequencies keep it 2π-periodic.

    r and eta use frequencies 2^j (j < num_frequencies), phi uses k = 1..num_frequencies.
    """

    def __init__(self, dim: int, num_frequencies: int = 8):
        super().__init__()
        self.register_buffer("freq_pow2", 2.0 ** torch.arange(num_frequencies), persistent=False)
        self.register_buffer("freq_int", torch.arange(1, num_frequencies + 1).float(), persistent=False)
        self.proj = nn.Linear(6 * num_frequencies, dim)

    def forward(self, r: Tensor, eta: Tensor, phi: Tensor) -> Tensor:
        """r, eta, phi float [B, M] (r, eta already scaled) → [B, M, D]."""
        angles = torch.cat(
            [r[..., None] * self.freq_pow2, eta[..., None] * self.freq_pow2, phi[..., None] * self.freq_int], dim=-1
        )
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


class InputNet(nn.Module):
    """Hit fields (scaled) → MLP F→D→D, plus the (r, eta, phi) positional encoding.

    Reads `hit_<f>` [B, M] for f in `hit_fields` and r, eta, phi; padding hits are zeroed first,
    so their values never matter.
    """

    def __init__(self, hit_fields: list[str], dim: int, scales: dict[str, float]):
        super().__init__()
        self.hit_fields = list(hit_fields)
        self.scales = dict(scales)
        self.net = nn.Sequential(nn.Linear(len(hit_fields), dim), nn.GELU(), nn.Linear(dim, dim))
        self.pos = PositionalEncoding(dim)

    def _field(self, batch: dict, name: str, valid: Tensor) -> Tensor:
        value = batch[f"hit_{name}"].float() * self.scales.get(name, 1.0)
        return torch.where(valid, value, 0.0)

    def forward(self, batch: dict) -> Tensor:
        valid = batch["hit_valid"]
        x = torch.stack([self._field(batch, f, valid) for f in self.hit_fields], dim=-1)
        r, eta = self._field(batch, "r", valid), self._field(batch, "eta", valid)
        phi = torch.where(valid, batch["hit_phi"].float(), 0.0)
        return self.net(x) + self.pos(r, eta, phi)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer over hits: self-attention (full or window), then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim, dim, dropout)

    def forward(self, x: Tensor, valid: Tensor, window_size: int | None = None) -> Tensor:
        """x [B, M, D], valid bool [B, M]; `window_size` set: window attention on phi-sorted hits."""
        y = self.attn_norm(x)
        if window_size is None:
            x = x + self.attn(y, mask=valid[:, None, :])
        else:
            x = x + window_self_attention(self.attn, y, valid, window_size)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    """L pre-norm transformer layers over the hits of each event.

    `attention="window"` sorts each event's hits by phi (valid first) once, runs every layer with
    `window_self_attention`, and restores the input order.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: int,
        dropout: float,
        attention: str = "full",
        window_size: int = 256,
    ):
        super().__init__()
        self.window_size = window_size if attention == "window" else None
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor, valid: Tensor, phi: Tensor) -> Tensor:
        """x [B, M, D], valid bool [B, M], phi [B, M] → [B, M, D]."""
        if self.window_size is None:
            for layer in self.layers:
                x = layer(x, valid)
            return x
        key = torch.where(valid, phi.float(), torch.inf)
        order = torch.sort(key, dim=1, stable=True).indices
        gather = order[..., None].expand_as(x)
        x = torch.gather(x, 1, gather)
        sorted_valid = torch.gather(valid, 1, order)
        for layer in self.layers:
            x = layer(x, sorted_valid, self.window_size)
        return torch.empty_like(x).scatter_(1, gather, x)


class DecoderLayer(nn.Module):
    """One MaskFormer decoder layer, pre-norm residual blocks in this order:
    queries → masked cross-attention to hits, query MLP, query self-attention;
    hits → cross-attention to queries, hit MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.q_ca_norm, self.q_ca_kv_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_ca = Attention(dim, num_heads, dropout)
        self.q_mlp_norm = nn.LayerNorm(dim)
        self.q_mlp = MLP(dim, mlp_ratio * dim, dim, dropout)
        self.q_sa_norm = nn.LayerNorm(dim)
        self.q_sa = Attention(dim, num_heads, dropout)
        self.h_ca_norm, self.h_ca_kv_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.h_ca = Attention(dim, num_heads, dropout)
        self.h_mlp_norm = nn.LayerNorm(dim)
        self.h_mlp = MLP(dim, mlp_ratio * dim, dim, dropout)

    def forward(self, q: Tensor, h: Tensor, attn_mask: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, N, D], h [B, M, D], attn_mask bool [B, N, M] (queries → hits) → updated (q, h)."""
        q = q + self.q_ca(self.q_ca_norm(q), self.q_ca_kv_norm(h), attn_mask)
        q = q + self.q_mlp(self.q_mlp_norm(q))
        q = q + self.q_sa(self.q_sa_norm(q))
        h = h + self.h_ca(self.h_ca_norm(h), self.h_ca_kv_norm(q))
        h = h + self.h_mlp(self.h_mlp_norm(h))
        return q, h
