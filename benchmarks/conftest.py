"""Fixtures of `pytest benchmarks/ --benchmark` (the flag itself is registered by the root conftest).

`results` is a session-wide dict: a test stores what it measured under a top-level key
(`results["train_events_per_s"]["joint"] = ...`, or a new key such as `results["sweep"] = {...}`,
any JSON-serialisable value). At the end of the session the dict, plus the derived ratios, is
written to summary.json / summary.md / throughput.png in CACHEFEAT_BENCH_RESULTS (default
benchmarks/results/); keys the report does not know are shown under "Other results".
"""

from __future__ import annotations

import logging
import time

import harness
import pytest

log = logging.getLogger("cachefeat.benchmarks")


@pytest.fixture(scope="session")
def results():
    """Measured values by summary key; written out (with derived ratios) when the session ends."""
    started = time.perf_counter()
    store: dict = {}
    yield store
    if not store:
        return
    store["session_wall_s"] = time.perf_counter() - started
    summary = harness.finalize(store)
    paths = harness.write_results(summary, harness.results_dir())
    if summary["missing"]:
        log.warning("benchmark summary is partial (missing: %s)", ", ".join(summary["missing"]))
    print("\nbenchmark results: " + ", ".join(str(p) for p in paths))


@pytest.fixture(scope="session")
def bench_settings() -> harness.BenchSettings:
    settings = harness.settings_from_env("muon")
    harness.apply_threads(settings)
    return settings


@pytest.fixture(scope="session")
def bench_data(bench_settings, results) -> harness.BenchData:
    """The muon events and caches, built once per settings key under CACHEFEAT_BENCH_DATA."""
    from dataclasses import asdict

    data = harness.prepare_data(bench_settings)
    results["settings"] = asdict(bench_settings)
    results["machine"] = harness.machine_info(bench_settings.device)
    results["data"] = {"folder": str(data.root), "build_s": data.build_s, "reused": data.build_s == 0.0}
    return data
