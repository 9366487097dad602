"""A hepattn MaskFormer as cachefeat's frozen backbone.

hepattn (github.com/samvanstroud/hepattn, GPL-3.0) is imported, never copied: it must be
importable (its `src` on PYTHONPATH, plus `pip install 'cachefeat[hepattn]'` for its runtime
packages). The config's `model` block is the `model.model` block of a hepattn LightningCLI
config, a nested `class_path`/`init_args` tree that is built the way LightningCLI builds it
(jsonargparse). The `hepattn` config section names the tasks and output keys (defaults: the
ATLAS-muon tracking config) and the attention backend.

`HepattnBackbone` gives the tensors the cache needs, in cachefeat's names:

- `hit_embed` [B, M, D]: the final hit embeddings (after the decoder's last bidirectional
  update), read from the `x` dict the decoder returns (hepattn does not put them in its outputs);
- `query_embed` [B, N, D]: the final query embeddings, from the same dict;
- `track_valid` [B, N]: the validity task's final logit;
- `track_hit_logit` [B, N, M]: the hit-assignment task's final logit, padding hits set to
  `PAD_LOGIT` (hepattn writes `finfo(dtype).min` there);

all in the input's hit order (a hepattn `sorter` reorders hits; they are put back). `match`
uses hepattn's own task costs and matcher on the final layer, so the matched particles are the
ones hepattn's training would use.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util

import torch
from torch import Tensor, nn

from cachefeat.config import HEPATTN_HINT, build_tree, did_you_mean, one_of, section
from cachefeat.errors import UserError
from cachefeat.model.tasks import PAD_LOGIT

DEFAULTS = {
    "attn_type": "auto",  # "auto": the config's backend on a GPU with flash-attn, else "torch"
    "input_name": "hit",
    "valid_task": "track_valid",
    "valid_logit": "track_logit",
    "hit_task": "track_hit_valid",
    "hit_logit": "track_hit_logit",
    "target_object": "particle",
}
ATTN_TYPES = ("auto", "torch", "flash", "flash-varlen", "flex")
ALLOWED = {"attn_type": one_of(*ATTN_TYPES)}


def is_hepattn_block(block) -> bool:
    """True when a config `model` block names a hepattn class."""
    return isinstance(block, dict) and str(block.get("class_path", "")).startswith("hepattn.")


def require_hepattn():
    """Import hepattn, or raise one UserError that says how to make it importable."""
    try:
        return importlib.import_module("hepattn.models")
    except ImportError as exc:
        raise UserError(f"this config needs hepattn, which cannot be imported ({exc}): {HEPATTN_HINT}") from exc


def settings(config: dict) -> dict:
    """The `hepattn` section merged over `DEFAULTS` (unknown keys refused)."""
    return section(config, "hepattn", DEFAULTS, ALLOWED)


def resolve_attn_type(attn_type: str) -> str:
    """"auto" -> "torch" unless CUDA and flash-attn are both there (then None: keep the config's)."""
    if attn_type != "auto":
        return attn_type
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return None
    return "torch"


def effective_block(block: dict, attn_type: str) -> dict:
    """A copy of the model block with the attention backend set in the encoder and the decoder layers."""
    block = copy.deepcopy(block)
    backend = resolve_attn_type(attn_type)
    if backend is None:
        return block
    init = block.setdefault("init_args", {})
    encoder = init.get("encoder")
    if isinstance(encoder, dict):
        encoder.setdefault("init_args", {})["attn_type"] = backend
    decoder = init.get("decoder")
    if isinstance(decoder, dict):
        layer = (decoder.get("init_args", decoder)).get("decoder_layer_config")
        if isinstance(layer, dict) and "attn_type" in (layer.get("attn_kwargs") or {}):
            layer["attn_kwargs"]["attn_type"] = backend
    return block


def build_maskformer(block: dict) -> nn.Module:
    """Build a hepattn model from its `class_path`/`init_args` tree, as LightningCLI does (jsonargparse)."""
    require_hepattn()
    return build_tree(block, nn.Module, "model")


class HepattnBackbone(nn.Module):
    """A hepattn MaskFormer behind cachefeat's backbone interface (`forward`, `match`, `dim`).

    Args:
        block: the hepattn `model.model` block (class_path/init_args tree).
        hit_fields: the hit fields of the batches (`hit_<f>` tensors); the model's input net
            must read a subset of them.
        attn_type, input_name, valid_task, valid_logit, hit_task, hit_logit, target_object: see
            `DEFAULTS`, the keys of the `hepattn` config section.

    The hepattn model is `self.maskformer`; its state dict is the checkpoint's (`stage1_module`).
    """

    def __init__(self, block: dict, hit_fields: list[str], **opts):
        super().__init__()
        opts = {**DEFAULTS, **opts}
        self.block = effective_block(block, opts["attn_type"])
        self.maskformer = build_maskformer(self.block)
        self.input_name = opts["input_name"]
        self.valid_task, self.valid_logit = opts["valid_task"], opts["valid_logit"]
        self.hit_task, self.hit_logit = opts["hit_task"], opts["hit_logit"]
        self.target_object = opts["target_object"]
        net = self.maskformer
        tasks = {task.name: task for task in getattr(net, "tasks", [])}
        for role, name in (("validity", self.valid_task), ("hit-assignment", self.hit_task)):
            if name not in tasks:
                raise UserError(f"the hepattn model has no {role} task '{name}'{did_you_mean(name, tasks)} "
                                f"(its tasks: {', '.join(tasks) or 'none'}); set hepattn.valid_task / hepattn.hit_task")
        if getattr(net, "unified_decoding", False):
            raise UserError("hepattn models with unified_decoding: true are not supported (no separate hit embeddings)")
        names = [i.input_name for i in net.input_nets]
        if self.input_name not in names:
            raise UserError(f"the hepattn model has no input '{self.input_name}'{did_you_mean(self.input_name, names)}")
        if len(names) > 1:
            raise UserError(f"hepattn models with several inputs ({', '.join(names)}) are not supported")
        needed = [f for i in net.input_nets for f in getattr(i, "fields", [])]
        missing = [f for f in needed if f not in hit_fields]
        if missing:
            raise UserError(f"the hepattn model reads hit fields {', '.join(missing)} that data.hit_fields lacks")
        self.hit_fields = list(hit_fields)
        if getattr(net.decoder, "dynamic_queries", False):
            raise UserError("hepattn models with dynamic_queries: true are not supported (the query count varies)")
        self.dim = int(net.decoder.dim)
        self.num_queries = int(net.decoder._num_queries)
        self._captured: dict | None = None
        net.decoder.register_forward_hook(self._capture)

    @property
    def stage1_module(self) -> nn.Module:
        """The module whose state dict a stage-1 checkpoint holds (keys `model.<name>`)."""
        return self.maskformer

    def _capture(self, module, args, output) -> None:
        x = output[0]
        self._captured = {"hit_embed": x[f"{self.input_name}_embed"], "query_embed": x["query_embed"]}

    def hepattn_inputs(self, batch: dict) -> dict[str, Tensor]:
        """The model's input dict (`hit_valid`, `hit_<f>` under its input name) from a cachefeat batch."""
        prefix = f"{self.input_name}_"
        return {f"{prefix}{f}": batch[f"hit_{f}"] for f in self.hit_fields} | {f"{prefix}valid": batch["hit_valid"]}

    def _unsort(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """int64 [B, M]: where each input hit went in the sorter's order (None without a sorter)."""
        sorter = getattr(self.maskformer, "sorter", None)
        if sorter is None:
            return None
        order = torch.argsort(inputs[f"{self.input_name}_{sorter.input_sort_field}"], dim=-1)  # as Sorter does
        return torch.argsort(order, dim=-1)

    def forward(self, batch: dict) -> dict:
        """Padded outputs for a cachefeat batch (`hit_valid`, `hit_<f>`): the four tensors and `hepattn`,
        the model's own output dict (hit order as the model's)."""
        inputs = self.hepattn_inputs(batch)
        self._captured = None
        raw = self.maskformer(inputs)
        if self._captured is None:
            raise RuntimeError("the hepattn decoder did not run")
        hit_embed, query_embed = self._captured["hit_embed"], self._captured["query_embed"]
        self._captured = None
        final = raw["final"]
        valid = final[self.valid_task][self.valid_logit]
        logit = final[self.hit_task][self.hit_logit]
        back = self._unsort(inputs)
        if back is not None:
            hit_embed = torch.gather(hit_embed, 1, back[..., None].expand_as(hit_embed))
            logit = torch.gather(logit, 2, back[:, None, :].expand_as(logit))
        logit = logit.float().masked_fill(~batch["hit_valid"][:, None, :], PAD_LOGIT)
        return {"hit_embed": hit_embed, "query_embed": query_embed, "track_valid": valid,
                "track_hit_logit": logit, "hepattn": raw}

    @torch.no_grad()
    def match(self, outputs: dict, batch: dict) -> Tensor:
        """int64 [B, N]: the particle slot each query is matched to (-1 if none), on the final layer,
        from hepattn's task costs and the model's matcher."""
        net = self.maskformer
        if net.matcher is None:
            raise UserError("the hepattn model has no matcher (model.init_args.matcher)")
        targets = self._targets(batch)
        targets, _, decoder_outputs = net._prepare_targets_and_outputs(outputs["hepattn"], targets)
        costs = net._compute_decoder_costs({"final": decoder_outputs["final"]}, targets)["final"]
        valid = targets[f"{self.target_object}_valid"]
        pred_idxs = net.matcher(costs, valid, targets.get("query_mask")).to(valid.device).long()
        # pred_idxs[b, i]: the query placed at target slot i; slots past the valid ones are padding.
        B, N = pred_idxs.shape
        target_index = torch.full((B, N), -1, dtype=torch.long, device=valid.device)
        slots = torch.arange(N, device=valid.device).expand(B, N)
        target_index.scatter_(1, pred_idxs, torch.where(valid, slots, -1))
        return target_index

    def _targets(self, batch: dict) -> dict[str, Tensor]:
        """hepattn's target dict for matching: particle slots padded to the N queries."""
        obj = self.target_object
        valid, hits = batch["particle_valid"], batch["particle_hit_valid"]
        B, P = valid.shape
        N = self.num_queries
        if P > N:
            raise UserError(f"an event has {P} particle slots, more than the model's {N} queries")
        if P < N:
            valid = torch.cat([valid, valid.new_zeros(B, N - P)], 1)
            hits = torch.cat([hits, hits.new_zeros(B, N - P, hits.shape[2])], 1)
        return {f"{self.input_name}_valid": batch["hit_valid"], f"{obj}_valid": valid, f"{obj}_hit_valid": hits}
