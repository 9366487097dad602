"""The frozen stage-1 backbone: one forward, shared by extraction and the live training path.

Phase 1 (`extract`) caches what `FrozenBackbone.head_batch` returns; phase 2's live source
calls the same method on the same padded batches, so cached == live holds by construction
of one code path, and the tests check it against an independent computation.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cachefeat.cache.schema import PRECISIONS
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch, from_model_outputs
from cachefeat.model.layers import warm_up_cpu_trig


def backbone_fingerprint_inputs(config: dict) -> dict:
    """The part of a config that determines the backbone's outputs: model block, data fields, max_hits."""
    from cachefeat.model.hepattn import is_hepattn_block, settings

    data = config.get("data") or {}
    extra = {"hepattn": settings(config)} if is_hepattn_block(config.get("model")) else {}
    return {
        **extra,
        "model": config.get("model"),
        "hit_fields": list(data.get("hit_fields") or []),
        "particle_fields": list(data.get("particle_fields") or []),
        "max_hits": data.get("max_hits"),
    }


class FrozenBackbone:
    """The stage-1 model, frozen: eval mode, no gradients, forward under `torch.inference_mode()`.

    Attributes:
        model: the backbone built from `config["model"]` (cachefeat's MaskFormer, any module with its
            interface, or a hepattn MaskFormer behind `HepattnBackbone`) with the checkpoint's weights.
        checkpoint_sha256: sha256 of the loaded weights (for the cache fingerprint).
        hit_fields, particle_fields: the config's `data` field lists.
        raw_fields: the hit fields stored as raw head inputs (= `hit_fields`).
        device: where the model runs; batches are moved there.
        precision: "fp32", or "bf16" (autocast; logits are widened to float32 afterwards).
    """

    def __init__(self, config: dict, checkpoint_path, device="cpu", precision: str = "fp32"):
        from cachefeat.data.loading import data_settings
        from cachefeat.model.backbone import build_backbone
        from cachefeat.model.checkpoint import load_checkpoint, load_model_state

        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
        data = data_settings(config)
        if "model" not in config:
            raise UserError("config has no 'model' section")
        self.hit_fields = list(data["hit_fields"])
        self.particle_fields = list(data["particle_fields"])
        self.raw_fields = self.hit_fields
        self.device = torch.device(device)
        self.precision = precision

        ckpt = load_checkpoint(checkpoint_path)  # UserError: missing, foreign or corrupt file
        self.model = build_backbone(config)
        load_model_state(self.model, ckpt)  # UserError: another architecture
        self.checkpoint_sha256 = ckpt["weights_sha256"]
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(self.device)
        if self.device.type == "cpu":
            warm_up_cpu_trig()  # the first parallel sin/cos of a process may round differently

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        """A padded batch's tensors on `self.device` (those already there are not copied)."""
        return {k: torch.as_tensor(v).to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict) -> dict:
        """The model's padded outputs (`hit_embed` [B, M, D], `query_embed` [B, N, D], `track_valid` [B, N],
        `track_hit_logit` [B, N, M], `layers`) for a padded batch, on `self.device`."""
        batch = self.to_device(batch)
        with torch.inference_mode(), self._autocast():
            return self.model(batch)

    def head_batch(
        self, batch: dict, floor: float, keep_hits: str = "assigned", keep_queries: str = "all"
    ) -> tuple[HeadBatch, dict[str, np.ndarray]]:
        """Forward, match on the final layer, count the frozen tasks' metrics, sparsify.

        Args:
            batch: a padded batch (`EventFile.read`), B events.
            floor: keep (query, hit) pairs with sigmoid(logit) >= floor on valid hits.
            keep_hits, keep_queries: see `cachefeat.head.inputs.from_model_outputs`.

        Returns:
            The `HeadBatch` of the B events (tensors on `self.device`; embeddings in the forward's
            dtype, float32 unless bf16) and per-event int64 [B] counts: the model's
            `event_metrics` plus `n_valid_hits`.
        """
        batch = self.to_device(batch)
        return self.sparsify(self.forward(batch), batch, floor, keep_hits=keep_hits, keep_queries=keep_queries)

    def sparsify(
        self, outputs: dict, batch: dict, floor: float, keep_hits: str = "assigned", keep_queries: str = "all"
    ) -> tuple[HeadBatch, dict[str, np.ndarray]]:
        """The second half of `head_batch`: match, count and sparsify the `forward` outputs of `batch`
        (already on the device). Reads the model's matcher only, never its forward state, so it may
        run in another thread while the next batch's forward runs."""
        from cachefeat.model.metrics import event_metrics

        with torch.inference_mode():
            target_index = self.model.match(outputs, batch)
            metrics = event_metrics(outputs, batch, target_index)
            metrics["n_valid_hits"] = batch["hit_valid"].sum(1).cpu().numpy().astype(np.int64)
            hb = from_model_outputs(
                outputs,
                batch,
                target_index,
                floor,
                self.raw_fields,
                self.particle_fields,
                keep_hits=keep_hits,
                keep_queries=keep_queries,
            )
        # Cloned outside inference mode: the live training path backpropagates through the head
        # on these tensors, which autograd refuses for inference tensors.
        return hb.clone(), metrics
