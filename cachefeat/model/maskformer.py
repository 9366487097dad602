"""The stage-1 model: a hepattn-style MaskFormer (input net, hit encoder, query decoder, two tasks).

Input: a padded batch dict (B events, M hits, P particle slots) with `hit_<f>` float [B, M] for the
hit fields and r, eta, phi; `hit_valid` bool [B, M]; for matching and losses also `particle_valid`
bool [B, P] and `particle_hit_valid` bool [B, P, M]. Padding hits never influence valid outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cachefeat.config import DROPOUT, POSITIVE_INT, at_least, between, check_allowed, did_you_mean, one_of
from cachefeat.errors import UserError
from cachefeat.model.layers import DecoderLayer, Encoder, InputNet
from cachefeat.model.matcher import match_batch
from cachefeat.model.tasks import ObjectHitMask, ObjectValid

TERMS = ("valid", "mask_bce", "mask_dice")
"""Names of the cost and loss terms, the keys of `loss_weights` and `cost_weights`."""


def _weights(given: dict | None, where: str) -> dict[str, float]:
    out = dict.fromkeys(TERMS, 1.0)
    for key, value in (given or {}).items():
        if key not in out:
            raise UserError(f"unknown {where} term '{key}'{did_you_mean(key, TERMS)}; terms: {', '.join(TERMS)}")
        out[key] = float(value)
    return out


class MaskFormer(nn.Module):
    """hepattn-style MaskFormer tracking backbone.

    Args:
        hit_fields: hit fields fed to the input MLP (`hit_<f>` in the batch).
        dim: embedding dim D; num_queries: N.
        encoder_attention: "full", or "window" (hits sorted by phi, blocks of `window_size`
            attending to themselves and their neighbours) for events of ~10^4 hits.
        input_scales: multiplier per hit field (default 1.0); the r and eta scales also apply to
            the positional encoding.
        mask_attention_threshold: a query attends to hits whose previous-layer mask probability
            is at least this; a query with no such hit attends to all valid hits.
        loss_weights, cost_weights: weights of the terms "valid", "mask_bce", "mask_dice" (default 1).
    """

    ALLOWED = {
        "dim": POSITIVE_INT,
        "num_queries": POSITIVE_INT,
        "num_encoder_layers": at_least(0, integer=True),
        "num_decoder_layers": POSITIVE_INT,
        "num_heads": POSITIVE_INT,
        "mlp_ratio": POSITIVE_INT,
        "dropout": DROPOUT,
        "encoder_attention": one_of("full", "window"),
        "window_size": POSITIVE_INT,
        "mask_attention_threshold": between(0.0, 1.0),
    }

    def __init__(
        self,
        hit_fields: list[str],
        dim: int = 32,
        num_queries: int = 2,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        num_heads: int = 8,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        encoder_attention: str = "full",
        window_size: int = 256,
        input_scales: dict[str, float] | None = None,
        mask_attention_threshold: float = 0.1,
        loss_weights: dict | None = None,
        cost_weights: dict | None = None,
    ):
        super().__init__()
        if not hit_fields:
            raise UserError("MaskFormer needs at least one hit field")
        check_allowed("model", dict(dim=dim, num_queries=num_queries, num_encoder_layers=num_encoder_layers,
                                    num_decoder_layers=num_decoder_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                    dropout=dropout, encoder_attention=encoder_attention, window_size=window_size,
                                    mask_attention_threshold=mask_attention_threshold), self.ALLOWED)
        if dim % num_heads:
            raise UserError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        scales = dict(input_scales or {})
        allowed = set(hit_fields) | {"r", "eta"}
        for key in scales:
            if key not in allowed:
                raise UserError(f"input_scales has '{key}', which is not a hit field{did_you_mean(key, allowed)}")
        self.hit_fields = list(hit_fields)
        self.dim = dim
        self.num_queries = num_queries
        self.mask_attention_threshold = mask_attention_threshold
        self.loss_weights = _weights(loss_weights, "loss_weights")
        self.cost_weights = _weights(cost_weights, "cost_weights")

        self.input_net = InputNet(hit_fields, dim, scales)
        self.encoder = Encoder(dim, num_encoder_layers, num_heads, mlp_ratio, dropout, encoder_attention, window_size)
        self.query_embed = nn.Parameter(torch.randn(num_queries, dim))
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(num_decoder_layers)
        )
        self.track_valid_task = ObjectValid(dim)
        self.hit_mask_task = ObjectHitMask(dim)

    def _tasks(self, q: Tensor, h: Tensor, hit_valid: Tensor) -> dict[str, Tensor]:
        return {"track_valid": self.track_valid_task(q), "track_hit_logit": self.hit_mask_task(q, h, hit_valid)}

    def forward(self, batch: dict) -> dict:
        """Run the model on a padded batch.

        Returns:
            hit_embed [B, M, D]: final hit embeddings (after the last decoder layer's hit update);
            query_embed [B, N, D]: decoder output;
            track_valid [B, N]: validity logits; track_hit_logit [B, N, M]: mask logits (padding hits -1e4);
            layers: per decoder layer {"track_valid", "track_hit_logit"}; the last entry is the final prediction.
        """
        hit_valid = batch["hit_valid"]
        h = self.encoder(self.input_net(batch), hit_valid, batch["hit_phi"])
        q = self.query_embed.expand(h.shape[0], -1, -1)
        pred = self._tasks(q, h, hit_valid)
        layers = []
        for layer in self.decoder:
            with torch.no_grad():
                mask = (torch.sigmoid(pred["track_hit_logit"]) >= self.mask_attention_threshold) & hit_valid[:, None, :]
                mask = torch.where(mask.any(-1, keepdim=True), mask, hit_valid[:, None, :])
            q, h = layer(q, h, mask)
            pred = self._tasks(q, h, hit_valid)
            layers.append(pred)
        return {"hit_embed": h, "query_embed": q, **pred, "layers": layers}

    @torch.no_grad()
    def match_cost(self, outputs: dict, batch: dict, layer: int = -1) -> Tensor:
        """Weighted matching cost, float64 [B, N, P], from decoder layer `layer`'s predictions."""
        pred = outputs["layers"][layer]
        w = self.cost_weights
        mask_cost = ObjectHitMask.cost(pred["track_hit_logit"], batch["hit_valid"], batch["particle_hit_valid"])
        return (
            w["valid"] * ObjectValid.cost(pred["track_valid"], batch["particle_valid"].shape[1])
            + w["mask_bce"] * mask_cost["mask_bce"]
            + w["mask_dice"] * mask_cost["mask_dice"]
        )

    def match(self, outputs: dict, batch: dict, layer: int = -1) -> Tensor:
        """int64 [B, N]: matched particle slot per query (Hungarian, per event), -1 if none."""
        return match_batch(self.match_cost(outputs, batch, layer), batch["particle_valid"])

    def loss(self, outputs: dict, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """Weighted loss summed over decoder layers, each layer matched separately.

        Returns the total and, as floats, "loss" and each term summed over layers.
        """
        hit_valid = batch["hit_valid"]
        per_term = {key: [] for key in TERMS}
        for i, pred in enumerate(outputs["layers"]):
            target = self.match(outputs, batch, layer=i)
            matched = target >= 0
            b, n = matched.nonzero(as_tuple=True)
            per_term["valid"].append(ObjectValid.loss(pred["track_valid"], matched))
            mask_terms = ObjectHitMask.loss(
                pred["track_hit_logit"][b, n], batch["particle_hit_valid"][b, target[b, n]], hit_valid[b]
            )
            for key, value in mask_terms.items():
                per_term[key].append(value)
        sums = {key: torch.stack(values).sum() for key, values in per_term.items()}
        loss = sum(self.loss_weights[key] * value for key, value in sums.items())
        logged = torch.stack([loss, *sums.values()]).detach().tolist()
        return loss, dict(zip(["loss", *sums], logged))
