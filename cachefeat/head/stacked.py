"""K regression heads of one shape computed as one batched forward (issue 14: sweeps on a GPU).

`StackedHeads(heads).predict_from_pairs(hb, pairs)` gives float32 [K, Q, T], row k equal to
`heads[k].predict_from_pairs(hb, pairs)` up to float32 rounding (the batched matmuls and the
LayerNorm's affine sum in another order: measured in tests/head/test_stacked.py). The heads keep
their own parameters, buffers and dropout streams: each step stacks each layer's K weights
(`torch.stack`, differentiable, so a backward leaves each head's gradient in its own `.grad`)
and runs

- the hit nets and the output MLP layer by layer: Linear as one matmul over the K heads'
  concatenated weights where the input is shared ([R, in] @ [in, K*out]: the encoded hit net's
  first layer, the raw one's without a frame), else as a batched matmul ([K, R, in] @ [K, in, out]);
  ReLU and SwiGLU elementwise; LayerNorm as the normalisation of [K, R, H] then each head's affine;
  StreamDropout as each head's own mask (`StreamDropout.draw`, the shape it draws alone), stacked;
- the pools through the sparse head's own `pooled_features` on [P, K, D] (column-wise: exact);
- frame="track": pass 1 once (`frame_refs_sparse`, shared through `pairs`), the frame columns once
  (`_frame_columns` of the first head), each head's standardisation (`standardise_frame`) and
  target offset (`frame_offset`) with its own buffers.

Heads stack when `stack_key` is equal: the same head config except dropout (so the same layer
shapes, hit net, frame, threshold, fields and targets); lr, weight decay, seed and dropout may
differ. The heads must be sparse heads on one device; the forward issues no host read and no
op with a data-dependent shape (the lean step of issue 14).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cachefeat.head.inputs import HeadBatch
from cachefeat.head.regression import (
    PairWeights,
    RegressionHead,
    StreamDropout,
    SwiGLU,
    frame_offset,
    frame_refs_sparse,
    pooled_features,
    standardise_frame,
)


def stack_key(head: RegressionHead) -> str:
    """What heads must share to be stacked: the head config without dropout, as text."""
    config = head.head_config()
    config.pop("dropout")
    return json.dumps(config, sort_keys=True)


def stack_groups(heads: Sequence[RegressionHead]) -> list[list[int]]:
    """Indices of `heads` grouped by `stack_key`, groups in order of their first head, indices ascending."""
    groups: dict[str, list[int]] = {}
    for i, head in enumerate(heads):
        groups.setdefault(stack_key(head), []).append(i)
    return list(groups.values())


class StackedHeads:
    """K sparse `RegressionHead`s of one `stack_key`, predicting as one batched computation.

    Not a module: it holds no parameters of its own and reads the heads' parameters, buffers and
    training mode at every call. Build it once the heads are on their device (its dropout scales
    are put there at construction, so that a step copies nothing from the host).
    """

    def __init__(self, heads: Sequence[RegressionHead]):
        heads = list(heads)
        if not heads:
            raise ValueError("StackedHeads needs at least one head")
        keys = {stack_key(h) for h in heads}
        if len(keys) > 1:
            raise ValueError("StackedHeads: the heads differ in more than dropout (see stack_key)")
        if heads[0].impl != "sparse":
            raise ValueError("StackedHeads stacks sparse heads")
        self.heads = heads
        device = heads[0].target_mean.device
        # 1 / (1 - p) as float32 [K, 1, 1] per dropout layer of the MLP (by index), on the heads' device.
        self._keep_scale = {
            i: torch.tensor([1.0 - h.mlp[i].p for h in heads], device=device).view(-1, 1, 1)
            for i, layer in enumerate(heads[0].mlp) if isinstance(layer, StreamDropout)
        }

    def __len__(self) -> int:
        return len(self.heads)

    def predict_from_pairs(self, hb: HeadBatch, pairs: PairWeights) -> Tensor:
        """float32 [K, Q, T] scaled predictions, row k: heads[k].predict_from_pairs(hb, pairs).

        hb: the batch (float32 embeddings, `step_input`); pairs: `pair_weights(hb, tau)` at the heads'
        shared threshold. Under autocast the matmuls run in its dtype, the pools and the frame in
        float32 / float64, as for one head.
        """
        heads, first = self.heads, self.heads[0]
        if first.frame == "none":
            raw = first._raw_inputs(pairs.raw)  # [P, F'], shared
        else:
            phi_ref, eta_ref = frame_refs_sparse(pairs, first._phi_column, first._eta_column)
            columns = first._frame_columns(pairs.raw, phi_ref[pairs.query], eta_ref[pairs.query])  # [P, F'] float64
            raw = standardise_frame(columns, self._buffers("frame_center"), self._buffers("frame_scale"))  # [K, P, F']
        hit_features = tuple(self._sequential([getattr(h, net) for h in heads], x).transpose(0, 1)  # [P, K, D]
                             for net, x in (("raw_hit_net", raw), ("encoded_hit_net", pairs.embed)))
        z = pooled_features(hb.query_embed, hit_features, pairs)  # [Q, K, 9D]
        pred = self._sequential([h.mlp for h in heads], z.transpose(0, 1)).float()  # [K, Q, T]
        if first.frame == "none":
            return pred
        maps = self._buffers("_frame_map")  # [K, 1, 2, T]
        return frame_offset(pred, phi_ref, eta_ref, maps[..., 0, :], maps[..., 1, :], self._buffers("target_std"))

    def _buffers(self, name: str) -> Tensor:
        """The heads' buffer `name` stacked as [K, 1, *shape] (broadcasts against [K, R, ...])."""
        return torch.stack([getattr(h, name) for h in self.heads])[:, None]

    def _sequential(self, nets: list[nn.Sequential], x: Tensor) -> Tensor:
        """[K, R, out]: nets[k](x) for each k, layer by layer; x [R, in] (the same input for every
        net) or [K, R, in] (net k's own input)."""
        for i, layers in enumerate(zip(*nets)):
            layer = layers[0]
            if isinstance(layer, nn.Linear):
                x = _stacked_linear(x, torch.stack([m.weight for m in layers]), torch.stack([m.bias for m in layers]))
            elif isinstance(layer, (nn.ReLU, SwiGLU)):  # elementwise over the last dim: any leading shape
                x = layer(x)
            elif isinstance(layer, nn.LayerNorm):
                weight = torch.stack([m.weight for m in layers])[:, None]
                bias = torch.stack([m.bias for m in layers])[:, None]
                x = F.layer_norm(x, layer.normalized_shape, eps=layer.eps) * weight + bias
            elif isinstance(layer, StreamDropout):
                masks = [m.draw(x.shape[1:], x.device) for m in layers]
                if any(mask is not None for mask in masks):  # None: eval mode or p = 0, as one head would skip
                    keep = torch.stack([torch.ones(x.shape[1:], dtype=torch.bool, device=x.device)
                                        if mask is None else mask for mask in masks])
                    x = x * keep / self._keep_scale[i]
            else:
                raise TypeError(f"StackedHeads cannot stack a {type(layer).__name__} layer")
        return x


def _stacked_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[K, R, out] = x @ weight[k].T + bias[k] for weight [K, out, in], bias [K, out]; x [R, in]
    shared by the K layers (one matmul over the concatenated weights) or [K, R, in] (batched)."""
    K, out, _ = weight.shape
    if x.dim() == 2:
        y = torch.addmm(bias.flatten(), x, weight.flatten(0, 1).t())  # [R, K*out]
        return y.view(x.shape[0], K, out).transpose(0, 1)
    return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
