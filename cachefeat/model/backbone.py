"""Build the stage-1 backbone a config's `model` block describes.

cachefeat's own MaskFormer (or any module with its interface whose constructor takes
`hit_fields`) is built by `cachefeat.config.instantiate`; a hepattn model (a `class_path` under
`hepattn.`) is built with jsonargparse and wrapped in `HepattnBackbone`.
"""

from __future__ import annotations

from torch import nn

from cachefeat.config import instantiate
from cachefeat.errors import UserError


def build_backbone(config: dict) -> nn.Module:
    """The backbone of `config["model"]`, with random weights, reading `data.hit_fields`."""
    from cachefeat.data.loading import data_settings
    from cachefeat.model.hepattn import HepattnBackbone, is_hepattn_block, settings

    data = data_settings(config)
    if "model" not in config:
        raise UserError("config has no 'model' section")
    block = config["model"]
    if is_hepattn_block(block):
        return HepattnBackbone(block, list(data["hit_fields"]), **settings(config))
    return instantiate(block, "model", hit_fields=list(data["hit_fields"]))
