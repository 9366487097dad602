"""Attention masking, window attention and padding invariance of the stage-1 model."""

import math

import pytest
import torch

from cachefeat.model.layers import Attention, Encoder, count_parameters
from cachefeat.model.maskformer import MaskFormer


def _model(hit_fields, **kwargs):
    torch.manual_seed(0)
    args = dict(dim=16, num_queries=3, num_heads=4, num_encoder_layers=2, num_decoder_layers=2)
    args.update(kwargs)
    return MaskFormer(hit_fields, **args).eval()


def _valid_outputs(out, valid):
    """Outputs restricted to valid hits, as a flat list of tensors."""
    M = valid.shape[1]
    logit = out["track_hit_logit"][..., :M]
    return [out["hit_embed"][:, :M][valid], out["query_embed"], out["track_valid"], logit.transpose(1, 2)[valid]]


def _reference_attention(attn, x, allowed):
    """Dense softmax attention with an explicit [Lq, Lk] allowed matrix (one event, float64)."""
    D = x.shape[-1]
    H = attn.num_heads
    q = attn.q_proj(x).double().view(-1, H, D // H).transpose(0, 1)
    k, v = (t.double().view(-1, H, D // H).transpose(0, 1) for t in attn.kv_proj(x).chunk(2, -1))
    scores = q @ k.transpose(1, 2) / math.sqrt(D // H)
    scores = scores.masked_fill(~allowed, -math.inf)
    out = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(-1, D)
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


def test_attention_empty_row_is_zero_and_full_row_equals_unmasked():
    torch.manual_seed(1)
    attn = Attention(8, 2).eval()
    x, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 1] = False  # no key for this query
    out = attn(x, kv, mask)
    assert torch.equal(out[0, 1], torch.zeros(8))
    unmasked = attn(x, kv)
    rows = torch.ones(2, 3, dtype=torch.bool)
    rows[0, 1] = False
    torch.testing.assert_close(out[rows], unmasked[rows], rtol=0, atol=1e-6)


def test_empty_query_mask_attends_to_all_valid_hits(make_batch, hit_fields):
    """Threshold 1 empties every mask (a fresh model's mask probabilities are all below 1; fallback:
    all valid hits); threshold 0 selects all valid hits."""
    batch = make_batch(seed=3)
    fallback = _model(hit_fields, mask_attention_threshold=1.0)
    unmasked = _model(hit_fields, mask_attention_threshold=0.0)
    masked = _model(hit_fields, mask_attention_threshold=0.5)
    valid = batch["hit_valid"]
    ref = _valid_outputs(unmasked(batch), valid)
    for a, b in zip(_valid_outputs(fallback(batch), valid), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the mask does restrict attention when it is not empty
    assert not torch.allclose(masked(batch)["query_embed"], unmasked(batch)["query_embed"], atol=1e-4)


@pytest.mark.parametrize("attention", ["full", "window"])
def test_padding_never_influences_valid_outputs(make_batch, repad_batch, hit_fields, attention):
    batch = make_batch(seed=4, num_events=3, num_particles=(2, 3, 1))
    model = _model(hit_fields, encoder_attention=attention, window_size=4)
    valid = batch["hit_valid"]
    ref = _valid_outputs(model(batch), valid)
    for extra, pad_value in [(0, 1e3), (9, -50.0), (23, 7.0)]:
        other = repad_batch(batch, extra, pad_value, seed=extra)
        out = model(other)
        for a, b in zip(_valid_outputs(out, valid), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.isfinite(out["track_hit_logit"]).all()
        assert (out["track_hit_logit"][..., valid.shape[1] :] == -1e4).all()


@pytest.mark.parametrize("attention", ["full", "window"])
def test_event_without_valid_hits_is_finite_and_isolated(make_batch, hit_fields, attention):
    batch = make_batch(seed=5, num_events=2, num_particles=(2, 1))
    model = _model(hit_fields, encoder_attention=attention, window_size=4)
    alone = {k: v[:1] for k, v in batch.items()}
    batch["hit_valid"][1] = False
    batch["particle_hit_valid"][1] = False
    out = model(batch)
    for key in ("hit_embed", "query_embed", "track_valid", "track_hit_logit"):
        assert torch.isfinite(out[key]).all(), key
    ref = model(alone)
    valid = alone["hit_valid"]
    for a, b in zip(
        _valid_outputs({k: v[:1] for k, v in out.items() if k != "layers"}, valid), _valid_outputs(ref, valid)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    loss, _ = model.loss(out, batch)
    assert torch.isfinite(loss)


def test_window_equals_full_when_window_covers_event(make_batch, hit_fields):
    batch = make_batch(seed=6, num_events=3, num_particles=(3, 2, 1))
    full = _model(hit_fields)
    window = _model(hit_fields, encoder_attention="window", window_size=batch["hit_valid"].shape[1])
    window.load_state_dict(full.state_dict())
    valid = batch["hit_valid"]
    for a, b in zip(_valid_outputs(window(batch), valid), _valid_outputs(full(batch), valid)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window_size", [2, 3, 4, 5, 16])
def test_window_attention_matches_brute_force_block_mask(window_size):
    """One encoder layer with window attention vs a dense reference whose allowed matrix is built
    by hand: rank valid hits by phi, block = rank // W, allowed iff cyclic block distance ≤ 1."""
    torch.manual_seed(7)
    B, M, D = 3, 13, 8
    encoder = Encoder(D, 1, 2, 2, 0.0, attention="window", window_size=window_size).eval()
    layer = encoder.layers[0]
    x = torch.randn(B, M, D)
    phi = torch.rand(B, M) * 2 * math.pi - math.pi
    valid = torch.rand(B, M) < 0.8
    valid[2, :] = False
    valid[2, :3] = True  # a single block
    out = encoder(x, valid, phi)
    for b in range(B):
        idx = valid[b].nonzero().squeeze(1)
        rank = torch.empty(len(idx), dtype=torch.long)
        rank[torch.argsort(phi[b, idx], stable=True)] = torch.arange(len(idx))
        block = rank // window_size
        n_blocks = max(1, math.ceil(len(idx) / window_size))
        dist = (block[:, None] - block[None, :]).abs()
        allowed = torch.minimum(dist, n_blocks - dist) <= 1
        xv = x[b, idx]
        y = xv.double() + _reference_attention(layer.attn, layer.attn_norm(xv), allowed)
        y = y + layer.mlp(layer.mlp_norm(y.float())).double()
        torch.testing.assert_close(out[b, idx].double(), y, rtol=0, atol=1e-5)
        assert torch.isfinite(out[b]).all()


def test_positional_encoding_is_periodic_in_phi(make_batch, hit_fields):
    batch = make_batch(seed=8)
    model = _model(hit_fields[:-4])  # phi not among the MLP inputs: only the positional encoding sees it
    shifted = dict(batch, hit_phi=batch["hit_phi"] + 2 * math.pi)
    torch.testing.assert_close(model(shifted)["query_embed"], model(batch)["query_embed"], rtol=0, atol=1e-4)


def test_eval_forward_is_bit_identical(make_batch, hit_fields):
    batch = make_batch(seed=9)
    model = _model(hit_fields, dropout=0.1)
    a, b = model(batch), model(batch)
    for key in ("hit_embed", "query_embed", "track_valid", "track_hit_logit"):
        assert torch.equal(a[key], b[key])


def test_reference_config_parameter_count(hit_fields):
    n = count_parameters(
        MaskFormer(hit_fields, dim=32, num_queries=2, num_encoder_layers=2, num_decoder_layers=2, num_heads=8)
    )
    assert 70_000 <= n <= 135_000, n
