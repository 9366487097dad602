"""Phase 1: extraction (forward, matching, sparsification, compressed writes) vs the bare frozen forward
over the same events in the same batches, with nothing written."""

from __future__ import annotations

import harness
import pytest


@pytest.mark.benchmark(group="extract")
def test_extract(benchmark, bench_settings, bench_data, results, tmp_path):
    run = harness.extraction(bench_settings, bench_data, tmp_path / "extract.zarr")
    run()  # warm-up: first-touch allocations, imports, the zarr thread pool
    summary = benchmark.pedantic(run, rounds=bench_settings.slow_rounds, iterations=1)
    assert summary["events"] == bench_settings.n_extract
    if benchmark.stats:
        rate = bench_settings.n_extract / benchmark.stats.stats.median
        benchmark.extra_info["events_per_s"] = rate
        results["extract_events_per_s"] = rate


@pytest.mark.benchmark(group="extract")
def test_frozen_forward(benchmark, bench_settings, bench_data, results):
    run, close = harness.frozen_forward(bench_settings, bench_data)
    try:
        run()  # warm-up
        events = benchmark.pedantic(run, rounds=bench_settings.slow_rounds, iterations=1)
    finally:
        close()
    assert events == bench_settings.n_extract
    if benchmark.stats:
        rate = events / benchmark.stats.stats.median
        benchmark.extra_info["events_per_s"] = rate
        results["forward_events_per_s"] = rate
