"""The cached training step never waits for the device (issue 14): from the device-resident batch
(`CacheMemorySource`, `ResidentCache.batch`) through `step_input`, the head's forward and loss,
backward, clipping, the optimizer and schedule to the loop's loss sums, no op reads a value on the
host or has an output shape that depends on the values.

On the CPU, `DeviceWaits` (a dispatch mode: it sees every aten op of the step, the backward's too)
records the ops that would make a GPU step wait; on a GPU (`gpu` marker), CUDA's sync debug mode
raises on any synchronising call. `torch.compile(fullgraph=True)` cannot serve as the CPU check:
dynamo refuses sparse tensors (the head's pooling matrices) and `warnings.catch_warnings`.
"""

from __future__ import annotations

import copy
import math
import os
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cachefeat
from cachefeat.head.checkpoint import build_head
from cachefeat.training import loop
from cachefeat.training import train as train_module
from cachefeat.training.loop import fit, head_step, make_accelerator, prepare_trainee, scaling_batch, step_input
from cachefeat.training.sources import CacheMemorySource, epoch_event_batches

aten = torch.ops.aten
PACKAGE = os.path.dirname(os.path.realpath(cachefeat.__file__)) + os.sep  # frames of the library, not of tests


class DeviceWaits(TorchDispatchMode):
    """Records (op, the innermost cachefeat line that issued it) of every op that waits for the device
    on a GPU: reading values on the host (`.item()`, `int()`, `float()`, `bool()` of a tensor:
    aten._local_scalar_dense and the ops tagged data_dependent_output; `.tolist()` and `.numpy()`,
    which on the CPU dispatch no op: wrapped while the mode is on) and the ops whose output shape
    depends on the values (tagged dynamic_output_shape: nonzero, masked_select, bincount, unique, ...;
    boolean-mask indexing; repeat_interleave without output_size)."""

    HOST_READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._saved = {}

    def __enter__(self):
        for name in self.HOST_READS:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._recording(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _recording(self, name, original):
        def read(tensor, *args, **kwargs):
            self._record(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)
        return read

    def _record(self, what: str) -> None:
        files = ((os.path.realpath(f.filename), f) for f in traceback.extract_stack())
        where = [f"{path[len(PACKAGE):]}:{f.lineno} {f.line}" for path, f in files if path.startswith(PACKAGE)]
        self.found.append((what, where[-1] if where else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            self._record(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _waits(func, args, kwargs) -> bool:
        if torch.Tag.data_dependent_output in func.tags:
            return True
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return torch.Tag.dynamic_output_shape in func.tags


HEADS = {
    # the shipped head: frame="track", dropout 0.1, tau = the cache's floor (0.1)
    "shipped": {},
    # tau above the floor (pairs below tau are masked), no frame, a subset of the raw fields, gated hit nets
    "masked": {"frame": "none", "assignment_threshold": 0.3, "raw_hit_fields": ["x", "y", "z", "eta", "phi"],
               "hit_net": "dense", "dropout": 0.2},
}


def _trainee(config, reader, accelerator, head_args: dict, total_steps: int):
    config = copy.deepcopy(config)
    config["head"]["init_args"].update(head_args)
    head = build_head(config, list(reader.raw_fields), list(reader.particle_fields), "sparse", seed=1)
    first = scaling_batch(reader)
    head.fit_scaling(first.targets, first.target_valid, first)
    return prepare_trainee(accelerator, head, 3e-3, 1e-5, total_steps)


@pytest.mark.parametrize("head_args", HEADS.values(), ids=HEADS.keys())
def test_cached_training_never_waits_for_the_device(muon_config, cache32, tmp_path, monkeypatch, head_args):
    """Two epochs of `fit` over a resident cache with the head step of `train`; every op the step
    issues is seen, none would wait for a GPU. The losses the loop sums (read after it) are the ones
    `head_step` returned."""
    monkeypatch.setattr(loop, "PROGRESS_S", math.inf)  # the progress bar reads the losses: not in this test
    accelerator = make_accelerator(tmp_path, device="cpu")
    source = CacheMemorySource(cache32, 32, 1, 0, 1, accelerator.device)
    trainee = _trainee(muon_config, cache32, accelerator, head_args, 2 * source.num_batches(0) + 1)
    state, stats, losses = loop.TrainState(), [], []

    def step(hb):
        out = head_step(accelerator, [trainee], step_input(hb, accelerator.device), grad_clip=1.0)
        losses.append(out.values)
        return out

    with DeviceWaits() as waits:
        fit(accelerator, state, [trainee], source.batches, step, stats.append, epochs=2,
            steps_per_epoch=source.num_batches(0), events_of=lambda hb: hb.num_events)
    assert waits.found == []
    assert state.global_step == len(losses) == 2 * source.num_batches(0) > 0
    values = torch.cat(losses).tolist()
    assert all(math.isfinite(v) for v in values) and len(set(values)) > 1
    per_epoch = len(values) // 2
    assert [s.train_loss() for s in stats] == [sum(values[:per_epoch]) / per_epoch, sum(values[per_epoch:]) / per_epoch]


def watch_steps(module, monkeypatch) -> DeviceWaits:
    """Patch `module.fit` (a trainer module's import of the loop) so that each step it takes runs under
    one `DeviceWaits`, which is returned."""
    waits, real_fit = DeviceWaits(), module.fit

    def watched_fit(accelerator, state, trainees, batches, step, end_epoch, **kwargs):
        def watched(batch):
            with waits:
                return step(batch)
        real_fit(accelerator, state, trainees, batches, watched, end_epoch, **kwargs)

    monkeypatch.setattr(module, "fit", watched_fit)
    return waits


def test_train_steps_never_wait_for_the_device(muon_config, cache32, val_cache32, tmp_path, monkeypatch):
    """`train`'s own step (`head_step` and its loss bookkeeping) over a resident cache, each step
    under `DeviceWaits`; its step losses are read at the end of each epoch."""
    waits = watch_steps(train_module, monkeypatch)
    monkeypatch.setattr(loop, "PROGRESS_S", math.inf)
    config = copy.deepcopy(muon_config)
    config["train"].update(batch_size=32, epochs=2)
    result = train_module.train(config, tmp_path / "run", cache=cache32.path, val_cache=val_cache32.path,
                                data_mode="memory", device="cpu")
    assert waits.found == []
    assert len(result["step_losses"]) == 2 * (cache32.num_events // 32)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result["step_losses"])


def test_the_check_sees_what_waits(cache32):
    """`DeviceWaits` records a value read, a boolean mask, a ragged size the device would have to
    give and a `.tolist()` (the waits the cached step had before issue 14), each at its line."""
    hb = cache32.load().batch(range(20))
    assert not hb.target_valid.all()
    events = torch.arange(hb.num_events)
    with DeviceWaits() as waits:
        bool(hb.target_valid.all())
        hb.with_valid_targets_only()
        torch.repeat_interleave(events, hb.query_offsets.diff())
        torch.repeat_interleave(events, hb.query_offsets.diff(), output_size=hb.query_embed.shape[0])
        hb.query_offsets.tolist()
    ops = [op for op, _ in waits.found]
    assert ops[0] == "aten._local_scalar_dense.default" and ops[-1] == "Tensor.tolist"
    assert "aten.index.Tensor" in ops  # with_valid_targets_only's boolean masks
    assert any(where.startswith("head/inputs.py") for _, where in waits.found)
    assert ops[-2] == "aten.repeat_interleave.Tensor" and ops.count("aten.repeat_interleave.Tensor") == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_valid_targets_only_batches_equal_the_masked_full_batches(cache32, device):
    """`ResidentCache.batch(..., valid_targets_only=True)` (sizes from the host) is exactly
    `batch(...).with_valid_targets_only()`, for any order, repeats and the empty batch."""
    resident = cache32.load(device)
    rng = np.random.default_rng(4)
    batches = epoch_event_batches(cache32.num_events, 40, 2, 0)
    for indices in ([], [5], rng.integers(0, cache32.num_events, 17), *batches):
        lean, full = resident.batch(indices, valid_targets_only=True), resident.batch(indices).with_valid_targets_only()
        for name, value in vars(full).items():
            assert getattr(lean, name).dtype == value.dtype and torch.equal(getattr(lean, name), value), name
    with pytest.raises(IndexError, match="outside"):
        resident.batch([0, cache32.num_events], valid_targets_only=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_args", HEADS.values(), ids=HEADS.keys())
def test_cached_steps_on_a_gpu_never_synchronise(muon_config, cache32, tmp_path, head_args):
    """Cached steps on a CUDA-resident cache under `torch.cuda.set_sync_debug_mode("error")`: any call
    that makes the host wait for the GPU (a value read, a blocking copy, a data-dependent size) raises.
    One step runs before, outside the check: it creates AdamW's state (step counters copied to the
    device) and the CUDA library handles."""
    accelerator = make_accelerator(tmp_path, device="cuda")
    assert accelerator.device.type == "cuda"
    source = CacheMemorySource(cache32, 32, 1, 0, 1, accelerator.device)
    trainee = _trainee(muon_config, cache32, accelerator, head_args, 2 * source.num_batches(0) + 1)
    trainee.model.train()
    batches = source.batches(0)
    head_step(accelerator, [trainee], step_input(next(batches), accelerator.device), grad_clip=1.0)
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for epoch in range(2):
            for hb in batches if epoch == 0 else source.batches(epoch):
                losses.append(head_step(accelerator, [trainee], step_input(hb, accelerator.device),
                                        grad_clip=1.0).values)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = torch.cat(losses).tolist()
    assert len(values) == 2 * source.num_batches(0) - 1
    assert all(math.isfinite(v) for v in values) and len(set(values)) > 1
