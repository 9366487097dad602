"""The hepattn path side by side (when hepattn is importable): the real ATLAS-muon MaskFormer of
configs/hepattn_muon.yaml with a Lightning checkpoint from hepattn's own training (4 steps, or
CACHEFEAT_BENCH_HEPATTN_CHECKPOINT for the simulated events), on two event sets read by its
data module: `dummy` (its generated events, 10-100 random hits; results under `hepattn`) and
`sim` (`cachefeat simulate --layout atlas-muon` muon events, ~350 hits, read by its real data
path; results under `hepattn_sim`, half as many events).

The head's work grows with the pairs above the assignment threshold, so the cached step's cost
depends on the stage 1: a 4-step checkpoint passes nearly every (query, hit) pair (the results
record `pairs_per_event`), a trained tracker about the hits on its tracks.

- `hepattn_extract_vs_forward`: `cachefeat extract` of the training split vs hepattn's own frozen
  forward (the MaskFormer under inference_mode) over the same events in the same batches, each
  reading its batches from the data module; rounds alternate. Extraction includes building the
  model from its config tree (a fixed cost per command, `hepattn.model_build_s`; the ratio
  without it is `hepattn.extract_vs_forward_without_model_build`). Its events are read in the
  default worker process (`extract.read_workers: 1`); each round also times the extraction with
  them read on a thread (`read_workers: 0`, `hepattn.extract_events_per_s_read_on_thread`).
- `hepattn_speedup_cached_memory_vs_live`: `cachefeat train` over the cache in memory vs the live
  hepattn stage 2 (`--source live`, the frozen forward on every batch): same head, same batches,
  same steps; the last of 2 epochs of each (no validation), rounds alternate, medians.
  A live step is the live source's batch (data module read, frozen forward, matching,
  sparsification) plus the same head step, so the rounds also time the live source's batches of
  one epoch alone (`hepattn.live_batches_events_per_s`); `hepattn.speedup_ceiling` = 1 + cached
  rate / that rate is the ratio live / cached would have if the live step cost only its batch plus
  the cached step.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3


DATASETS = {"dummy": "hepattn", "sim": "hepattn_sim"}  # event set -> results key


@pytest.fixture(scope="module", params=list(DATASETS))
def hep(request, hepattn_src, bench_settings, tmp_path_factory):
    import os

    import yaml

    from cachefeat.config import load_config
    from cachefeat.data.atlas_muon import write_atlas_muon_dir
    from cachefeat.data.presets import PRESETS

    dataset = request.param
    work = tmp_path_factory.mktemp(f"hepattn_bench_{dataset}")
    n = max(bench_settings.n_train // (2 if dataset == "sim" else 1), 256)
    overrides = [f"data.module.init_args.num_train={n}", "data.module.init_args.num_val=256",
                 f"train.batch_size={bench_settings.batch_size}"]
    if dataset == "sim":
        for split, events, seed in (("train", n, bench_settings.seed), ("val", 256, bench_settings.seed + 1)):
            write_atlas_muon_dir(work / split, PRESETS["muon"], events, seed)
        overrides += ["data.module.init_args.dummy_data=false", f"data.module.init_args.train_dir={work / 'train'}",
                      f"data.module.init_args.val_dir={work / 'val'}", f"data.module.init_args.test_dir={work / 'val'}",
                      "data.module.init_args.num_test=256"]
    config = load_config(ROOT / "configs" / "hepattn_muon.yaml", overrides)
    path = work / "hepattn_muon.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = os.environ.get("CACHEFEAT_BENCH_HEPATTN_CHECKPOINT") if dataset == "sim" else None
    if not checkpoint:
        run = subprocess.run([sys.executable, str(ROOT / "tests" / "fit_hepattn_stage1.py"), str(path),
                              str(work / "fit"), "4"], capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        checkpoint = run.stdout.strip().splitlines()[-1]
    return {"config": config, "checkpoint": checkpoint, "work": work, "n_train": n, "key": DATASETS[dataset]}


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.benchmark(group="hepattn")
def test_hepattn_extract_vs_forward(benchmark, hep, bench_settings, results):
    import torch

    from cachefeat.cache.extract import extract, resolve_options
    from cachefeat.cache.frozen import FrozenBackbone
    from cachefeat.cache.schema import block_range, num_blocks
    from cachefeat.data.datamodule import DataSplit
    from cachefeat.data.loading import open_events
    from cachefeat.model.backbone import build_backbone

    config, ckpt, device = hep["config"], hep["checkpoint"], bench_settings.device
    opts = resolve_options(config)
    frozen = FrozenBackbone(config, ckpt, device=device)
    net = frozen.model.stage1_module
    output = hep["work"] / "extract.zarr"
    forward_s = []

    def forward():  # hepattn's own forward on extraction's batches, read from the data module as it reads them
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        events = open_events(config, DataSplit("train"))
        for block in range(num_blocks(len(events), opts["block_size"])):
            lo, hi = block_range(block, len(events), opts["block_size"])
            for _, batch in events.block_batches(lo, hi, opts["batch_size"]):
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.inference_mode():
                    net(frozen.model.hepattn_inputs(batch))
        forward_s.append(time.perf_counter() - start)

    thread_s = []
    on_thread = {**config, "extract": {**config.get("extract", {}), "read_workers": 0}}

    def forward_and_thread():  # the baseline, then extraction with its events read on a thread
        forward()
        start = time.perf_counter()
        extract(on_thread, ckpt, DataSplit("train"), output, mode="overwrite", device=device, progress=False)
        thread_s.append(time.perf_counter() - start)
        shutil.rmtree(output)

    def run():
        return extract(config, ckpt, DataSplit("train"), output, device=device, progress=False)

    summary = benchmark.pedantic(run, setup=forward_and_thread, rounds=ROUNDS, warmup_rounds=1)
    assert summary["events"] == hep["n_train"]
    build_s = []  # building the model from its config tree (jsonargparse), once per extraction
    for _ in range(ROUNDS):
        start = time.perf_counter()
        build_backbone(config)
        build_s.append(time.perf_counter() - start)
    if benchmark.stats:
        n = hep["n_train"]
        extract_s, build = benchmark.stats.stats.median, statistics.median(build_s)
        forward_rate = n / statistics.median(forward_s[1:])
        results.setdefault(hep["key"], {}).update(
            extract_events_per_s=n / extract_s, forward_events_per_s=forward_rate, n_events=n, model_build_s=build,
            extract_vs_forward_without_model_build=n / (extract_s - build) / forward_rate,
            extract_events_per_s_read_on_thread=n / statistics.median(thread_s[1:]),
            pairs_per_event=summary["pairs"] / n, hits_per_event=summary["valid_hits"] / n)
        results[f"{hep['key']}_extract_vs_forward"] = n / extract_s / forward_rate


def test_hepattn_cached_vs_live(hep, bench_settings, results):
    from cachefeat.cache.extract import extract
    from cachefeat.data.datamodule import DataSplit
    from cachefeat.training.train import train

    config, ckpt, work, device = hep["config"], hep["checkpoint"], hep["work"], bench_settings.device
    caches = {}
    for split in ("train", "val"):
        caches[split] = work / f"{split}.zarr"
        extract(config, ckpt, DataSplit(split), caches[split], mode="overwrite", device=device, progress=False)
    rates = {"cached_memory": [], "live": [], "live_batches": []}
    for r in range(ROUNDS):
        for mode in rates:
            _reset_accelerate()
            if mode == "live_batches":
                rates[mode].append(_live_batches_rate(config, ckpt, device))
                continue
            kwargs = (dict(source="cache", cache=caches["train"], val_cache=caches["val"], data_mode="memory")
                      if mode == "cached_memory" else
                      dict(source="live", checkpoint=ckpt, input=DataSplit("train"), val_input=DataSplit("val")))
            last = train(config, work / f"run-{mode}-{r}", max_epochs=2, skip_validation=True, device=device,
                         **kwargs)
            rates[mode].append(last["events_per_s"])
    _reset_accelerate()
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    live_batches = medians.pop("live_batches")
    results.setdefault(hep["key"], {}).update(train_events_per_s=medians, train_rounds=rates,
                                             live_batches_events_per_s=live_batches,
                                             speedup_ceiling=1.0 + medians["cached_memory"] / live_batches)
    results[f"{hep['key']}_speedup_cached_memory_vs_live"] = medians["cached_memory"] / medians["live"]


def _live_batches_rate(config, ckpt, device) -> float:
    """Events/s of the live source alone over the second epoch's batches (what `train --source live`
    runs before each head step), with train's batch size and seed."""
    from cachefeat.cache.frozen import FrozenBackbone
    from cachefeat.data.datamodule import DataSplit
    from cachefeat.data.loading import open_events
    from cachefeat.training.sources import LiveSource

    settings, head = config["train"], config["head"]["init_args"]
    frozen = FrozenBackbone(config, ckpt, device=device)
    source = LiveSource(frozen, open_events(config, DataSplit("train")), settings["batch_size"], settings["seed"],
                        0, 1, head["assignment_threshold"], device)
    start, events = time.perf_counter(), 0
    for hb in source.batches(epoch=1):
        events += hb.num_events
    return events / (time.perf_counter() - start)
