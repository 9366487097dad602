"""The head on a CUDA device against the dense head on the CPU (the independent reference).

The sparse path's kernels are where a GPU can differ from the CPU: the sparse CSR products and
their transpose (`_PairSums`), the int64 `scatter_reduce` amax/amin of the extrema pools, the
stable sort of the pairs, and `StreamDropout`'s generator on the device. Each test runs on the CPU
too (so its logic is checked without a GPU) and on CUDA where one is present (marked gpu).
"""

import copy

import pytest
import torch
from head_testing import close, close_grad
from test_regression import PARTICLE, RAW, dense_args, make_head, make_padded

from cachefeat.head.inputs import from_model_outputs
from cachefeat.head.regression import StreamDropout

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _projection(out, head, seed=0):
    """Gradients of the head's parameters for a fixed random projection of `out` (drawn on the CPU)."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return torch.autograd.grad((out * weight).sum(), list(head.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hit_net", ["mlp", "dense"])
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_head_on_device_equals_dense_on_cpu(device, hit_net, ties):
    """Outputs and parameter gradients of the sparse head on `device` equal the dense head's on the
    CPU, with exact ties in the max/min pools (two hits of one query with the same features) or not."""
    head = make_head(7, hit_net=hit_net)
    outputs, batch, target_index = make_padded(7, B=4, hit_counts=[12, 0, 5, 9])
    if ties:
        for f in RAW:
            batch[f"hit_{f}"][0, 1] = batch[f"hit_{f}"][0, 0]
        outputs["track_hit_logit"][0, 0, :2] = 4.0
    reference = head.forward_dense(*dense_args(outputs, batch)).flatten(0, 1)
    reference_grads = _projection(reference, head)

    hb = from_model_outputs(outputs, batch, target_index, 0.05, RAW, PARTICLE)
    assert hb.pair_logit.shape[0] > 0
    moved = copy.deepcopy(head).to(device)
    got = moved.forward_sparse(hb.to(device))
    assert got.device.type == device
    close(got.cpu(), reference)
    for g, r in zip(_projection(got, moved), reference_grads):
        close_grad(g.cpu(), r)


@pytest.mark.parametrize("device", DEVICES)
def test_stream_dropout_on_device_follows_its_stream(device):
    """On `device` a dropout layer's masks depend on its stream alone (not the global RNG), drop a
    fraction p and scale the rest by 1/(1-p), and a layer loaded from its state draws the same masks."""
    torch.manual_seed(0)
    layer = StreamDropout(0.3).to(device).train()
    start = copy.deepcopy(layer.state_dict())
    x = torch.ones(400, 500, device=device)
    torch.manual_seed(1)
    first = layer(x)
    assert (first == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)  # 200k Bernoulli draws
    assert torch.allclose(first[first != 0], torch.tensor(1 / 0.7, device=device))
    second = layer(x)
    assert not torch.equal(first, second)
    again = StreamDropout(0.3).to(device).train()
    again.load_state_dict(start)
    torch.manual_seed(2)
    assert torch.equal(again(x), first) and torch.equal(again(x), second)
