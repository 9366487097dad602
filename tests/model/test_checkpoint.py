"""Checkpoint round trip, config mismatch and corruption."""

import hashlib

import pytest
import torch

from cachefeat.errors import UserError
from cachefeat.model.checkpoint import load_checkpoint, load_model_state, save_checkpoint, weights_sha256
from cachefeat.model.maskformer import MaskFormer


def _model(hit_fields, dim=16, seed=0):
    torch.manual_seed(seed)
    return MaskFormer(
        hit_fields, dim=dim, num_queries=2, num_heads=4, num_encoder_layers=1, num_decoder_layers=1
    ).eval()


def test_round_trip_restores_identical_outputs(tmp_path, make_batch, hit_fields):
    batch = make_batch(seed=1)
    model = _model(hit_fields, seed=0)
    config = {"model": {"init_args": {"dim": 16}}}
    path = tmp_path / "sub" / "stage1.ckpt"
    save_checkpoint(path, model, config, metrics={"eff_050": 0.5}, step=7)
    assert [p.name for p in path.parent.iterdir()] == ["stage1.ckpt"]  # no temporary file left

    ckpt = load_checkpoint(path)
    assert ckpt["config"] == config and ckpt["step"] == 7 and ckpt["metrics"] == {"eff_050": 0.5}
    assert all(key.startswith("model.") for key in ckpt["state_dict"])
    other = _model(hit_fields, seed=1)
    load_model_state(other, ckpt)
    a, b = model(batch), other(batch)
    for key in ("hit_embed", "query_embed", "track_valid", "track_hit_logit"):
        assert torch.equal(a[key], b[key])


def test_weights_sha256_matches_hand_hash():
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.arange(6, dtype=torch.int64).view(2, 3)}
    digest = hashlib.sha256()
    for name in ("a", "b"):
        t = state[name]
        digest.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    assert weights_sha256(state) == digest.hexdigest()
    assert weights_sha256({"b": state["b"], "a": state["a"].reshape(3, 2)}) != digest.hexdigest()


def test_other_dim_is_a_clear_user_error(tmp_path, hit_fields):
    path = tmp_path / "stage1.ckpt"
    save_checkpoint(path, _model(hit_fields, dim=16), {})
    with pytest.raises(
        UserError,
        match=r"does not fit this config: model\.query_embed has shape \(2, 16\) "
        r"in the checkpoint, \(2, 32\) in the config",
    ):
        load_model_state(_model(hit_fields, dim=32), load_checkpoint(path))


def test_other_architecture_is_a_user_error(tmp_path, hit_fields):
    path = tmp_path / "stage1.ckpt"
    save_checkpoint(path, _model(hit_fields), {})
    deeper = MaskFormer(hit_fields, dim=16, num_queries=2, num_heads=4, num_encoder_layers=2, num_decoder_layers=1)
    with pytest.raises(UserError, match=r"1 missing|missing \(e\.g\. model\.encoder\.layers\.1"):
        load_model_state(deeper, load_checkpoint(path))


def test_corrupt_weights_are_refused(tmp_path, hit_fields):
    path = tmp_path / "stage1.ckpt"
    save_checkpoint(path, _model(hit_fields), {})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["model.query_embed"][0, 0] += 1.0  # changed after hashing
    torch.save(payload, path)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)


def test_damaged_file_is_refused(tmp_path, hit_fields):
    path = tmp_path / "stage1.ckpt"
    save_checkpoint(path, _model(hit_fields), {})
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match="not a readable cachefeat checkpoint"):
        load_checkpoint(path)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not a cachefeat checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a readable cachefeat checkpoint"):
        load_checkpoint(text)
