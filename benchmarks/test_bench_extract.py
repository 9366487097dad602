"""Phase 1: extraction (forward, matching, sparsification, compressed writes) vs the bare frozen forward
over the same events in the same batches, with nothing written.

The two alternate round by round (forward, extraction, forward, ...) so that a change in the
machine's load hits both alike: pytest-benchmark times the extraction rounds; the forward round
run before each of them (its `setup`, which also removes the previous round's cache) is timed
here and reported in `extra_info`.
"""

from __future__ import annotations

import shutil
import statistics
import time

import harness
import pytest


@pytest.mark.benchmark(group="extract")
def test_extract_vs_forward(benchmark, bench_settings, bench_data, results, tmp_path):
    output = tmp_path / "extract.zarr"
    extract = harness.extraction(bench_settings, bench_data, output)
    forward, close = harness.frozen_forward(bench_settings, bench_data)
    forward_s = []

    def timed_forward():
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        assert forward() == bench_settings.n_extract
        forward_s.append(time.perf_counter() - start)

    try:
        summary = benchmark.pedantic(extract, setup=timed_forward, rounds=bench_settings.timing_rounds,
                                     warmup_rounds=1)
    finally:
        close()
    assert summary["events"] == bench_settings.n_extract
    if benchmark.stats:
        n = bench_settings.n_extract
        forward_rate = n / statistics.median(forward_s[1:])  # [0]: the warm-up round
        # Host time per event beyond the forward: what extraction adds (loading the model, matching,
        # sparsifying, writing) that its pipeline did not hide behind the forward.
        host_ms = 1e3 * (benchmark.stats.stats.median - statistics.median(forward_s[1:])) / n
        benchmark.extra_info.update(events_per_s=n / benchmark.stats.stats.median, extract_host_ms_per_event=host_ms,
                                    forward_events_per_s=forward_rate, forward_round_s=forward_s[1:])
        results["extract_events_per_s"] = n / benchmark.stats.stats.median
        results["forward_events_per_s"] = forward_rate
        results["extract_host_ms_per_event"] = host_ms
