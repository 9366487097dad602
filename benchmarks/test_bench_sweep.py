"""A K = 8 sweep in one pass against 8 separate cached runs and 8 separate live frozen runs.

All runs use the benchmark's training and validation events, the same epochs (EPOCHS) and batch
size, through the production entry points (`sweep(...)`, `train(...)`), in memory. The grid is
the one of the issue: hidden_dim {64, 120} x dropout {0.0, 0.1} x lr {1e-3, 3e-3}.

Both sides get the machine's cores (CORES): on CPU the sweep steps its variants on CORES worker
threads (one torch thread each); the separate runs are timed with 1 and with CORES torch threads
and the faster setting is the baseline. On CUDA both use the benchmark's thread setting (the
sweep's variants then step one after another).

To show where the time goes, each round also runs the sweep with 1 worker and 1 torch thread:
the variants' own host seconds (steps and validations) against the rest (shared work) give the
best a sweep on CORES cores could do, `ideal_sweep_s` = shared + own / CORES.

Each round also runs the stacked sweep (`sweep.stack: true`: the variants of one shape, here
the 4 of each hidden_dim, step as one `StackedHeads` forward and backward; on CPU its 2 groups on
CORES worker threads), `sweep_stacked_s`; the plain sweep is run with `stack: false` (its
variants step separately, as before stacking existed, on CPU and CUDA alike).

Summary keys: `sweep_k8_vs_separate` = time(8 separate cached runs) / time(sweep),
`sweep_k8_stacked_vs_separate` = time(8 separate cached runs) / time(stacked sweep),
`sweep_k8_stacked_vs_unstacked` = time(sweep) / time(stacked sweep) and
`sweep_k8_vs_live` = time(8 live frozen runs) / time(sweep), with medians over ROUNDS rounds
(sweep and separate runs alternate within a round). The live time is ONE live frozen run of the
first variant, timed once and multiplied by 8 (all variants cost the same backbone forward).
`sweep` holds the times and notes.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time

import torch
from harness import ROOT

from cachefeat.training.sweep import sweep, sweep_variants
from cachefeat.training.train import train

EPOCHS = 2
ROUNDS = 3
GRID = {"head.init_args.hidden_dim": [64, 120], "head.init_args.dropout": [0.0, 0.1], "train.lr": [1.0e-3, 3.0e-3]}
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _timed(threads: int, fn, *args, **kwargs) -> float:
    """Wall seconds of fn(*args, **kwargs) with `threads` torch threads (0: leave as set)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        fn(*args, **kwargs)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def _ideal(serial_s: list, serial_own_s: list, single_s: float) -> dict:
    """The best sweep time CORES cores allow: the serial sweep's shared part + its variant part / CORES."""
    own, total = statistics.median(serial_own_s), statistics.median(serial_s)
    ideal = (total - own) + own / CORES
    return {"serial_shared_s": total - own, "ideal_sweep_s": ideal, "ideal_over_single_run": ideal / single_s}


def test_sweep_k8_vs_separate_and_live(bench_settings, bench_data, results, tmp_path):
    config = copy.deepcopy(bench_settings.load_config())
    config["train"].update(epochs=EPOCHS, batch_size=bench_settings.batch_size)
    config["sweep"] = {"metric": "val_loss", "grid": GRID, "stack": False}
    stacked = copy.deepcopy(config)
    stacked["sweep"]["stack"] = True
    variants = sweep_variants(config)
    assert len(variants) == 8
    common = dict(cache=bench_data.caches["float32"], val_cache=bench_data.val_cache, data_mode="memory",
                  device=bench_settings.device)
    cpu = bench_settings.device == "cpu"
    sweep_threads = CORES if cpu else 0
    separate_threads = sorted({1, CORES}) if cpu else [0]

    sweep_s, own_s, serial_s, serial_own_s, stacked_s = [], [], [], [], []
    separate_s = {t: [] for t in separate_threads}
    single_s = {t: [] for t in separate_threads}
    for r in range(ROUNDS):
        order = ("sweep", "stacked", "separate") if r % 2 == 0 else ("separate", "stacked", "sweep")
        for what in order:  # alternate against drift
            if what == "stacked":
                stacked_s.append(_timed(sweep_threads, sweep, stacked, tmp_path / f"stacked-{r}", **common,
                                        workers=CORES if cpu else None))
                rows = json.loads((tmp_path / f"stacked-{r}" / "sweep.json").read_text())["rows"]
                assert len(rows) == len(variants)
                continue
            if what == "sweep":
                sweep_s.append(_timed(sweep_threads, sweep, config, tmp_path / f"sweep-{r}", **common,
                                      workers=CORES if cpu else None))
                rows = json.loads((tmp_path / f"sweep-{r}" / "sweep.json").read_text())["rows"]
                assert len(rows) == len(variants)
                own_s.append(sum(row["train_s"] for row in rows))
                if cpu:
                    serial_s.append(_timed(1, sweep, config, tmp_path / f"serial-{r}", **common, workers=1))
                    rows = json.loads((tmp_path / f"serial-{r}" / "sweep.json").read_text())["rows"]
                    serial_own_s.append(sum(row["train_s"] for row in rows))
                continue
            for threads in separate_threads:
                times = [_timed(threads, train, v.config, tmp_path / f"alone-{r}-{threads}" / v.name, **common)
                         for v in variants]
                separate_s[threads].append(sum(times))
                single_s[threads].append(statistics.median(times))

    live_s = _timed(0, train, variants[0].config, tmp_path / "live", source="live",
                    checkpoint=ROOT / bench_settings.checkpoint, input=bench_data.train, val_input=bench_data.val,
                    device=bench_settings.device)

    best = min(separate_threads, key=lambda t: statistics.median(separate_s[t]))
    sweep_med = statistics.median(sweep_s)
    separate_med, single_med = statistics.median(separate_s[best]), statistics.median(single_s[best])
    results["sweep_k8_vs_separate"] = separate_med / sweep_med
    results["sweep_k8_vs_live"] = 8 * live_s / sweep_med
    stacked_med = statistics.median(stacked_s)
    results["sweep_k8_stacked_vs_separate"] = separate_med / stacked_med
    results["sweep_k8_stacked_vs_unstacked"] = sweep_med / stacked_med
    results["sweep"] = {
        "k": len(variants), "epochs": EPOCHS, "rounds": ROUNDS, "grid": GRID,
        "train_events": bench_settings.n_train, "batch_size": bench_settings.batch_size,
        "cores": CORES, "sweep_workers": CORES if cpu else 1, "sweep_torch_threads": sweep_threads,
        "sweep_s": sweep_s, "sweep_stacked_s": stacked_s,
        "separate_8_s_by_threads": separate_s, "single_run_s_by_threads": single_s,
        "separate_best_threads": best, "live_run_s": live_s,
        "sweep_over_single_run": sweep_med / single_med,
        "serial_sweep_s": serial_s, "serial_variant_s": serial_own_s,
        **(_ideal(serial_s, serial_own_s, single_med) if cpu else {}),
        "variant_time_over_sweep_wall": statistics.median(o / s for o, s in zip(own_s, sweep_s)),
        "notes": "medians over rounds; separate/single = the faster of the thread settings (0 = the benchmark's); "
                 "live = 1 live frozen run (first variant) x 8; separate and single runs are in-process train() "
                 "calls (no interpreter start-up counted); variant_time_over_sweep_wall = host seconds inside the "
                 "variants' own steps and validations, summed over worker threads, / sweep wall time; "
                 "serial = 1 worker, 1 torch thread; ideal_sweep_s = serial shared part + serial variant part / cores; "
                 "sweep_s: stack false; sweep_stacked_s: stack true (2 groups of 4 variants, same workers)",
    }
