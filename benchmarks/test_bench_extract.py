"""Phase 1: extraction (forward, matching, sparsification, compressed writes) vs the bare frozen forward
over the same events in the same batches, with nothing written.

The two alternate round by round (forward, extraction, forward, ...) so that a change in the
machine's load hits both alike: pytest-benchmark times the extraction rounds; the forward round
run before each of them (its `setup`, which also removes the previous round's cache) is timed
here and reported in `extra_info`. The summary's extraction / forward and host time are medians
over the rounds of each round against the forward round just before it.
"""

from __future__ import annotations

import harness
import pytest


@pytest.mark.benchmark(group="extract")
def test_extract_vs_forward(benchmark, bench_settings, bench_data, results, tmp_path):
    timed = harness.extraction_vs_forward(benchmark, bench_settings, bench_data, tmp_path / "extract.zarr")
    if timed:
        n = bench_settings.n_extract
        forward_rate = n / timed["forward_s"]
        # Host time per event beyond the forward: what extraction adds (loading the model, matching,
        # sparsifying, writing) that its pipeline did not hide behind the forward; per round, against
        # the forward round just before it.
        host_ms = 1e3 * timed["host_s_median"] / n
        benchmark.extra_info.update(events_per_s=n / timed["extract_s"], extract_host_ms_per_event=host_ms,
                                    forward_events_per_s=forward_rate, forward_round_s=timed["forward_round_s"])
        results["extract_events_per_s"] = n / timed["extract_s"]
        results["forward_events_per_s"] = forward_rate
        results["extract_host_ms_per_event"] = host_ms
        results["extract_vs_forward_paired"] = timed["ratio_median"]
