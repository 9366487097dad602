"""TrackML scale (`--benchmark --trackml`): the same measurements where they are feasible.

Needs a trained `configs/trackml.yaml` stage-1 checkpoint, given as
CACHEFEAT_BENCH_TRACKML_CHECKPOINT (the CPU-trained `data/trackml_stage1_cpu.ckpt` is shipped;
see data/README.md). The dense head is left out: its padded [B, N, M, D] tensors do not fit in
memory at N ~ 1000, M ~ 10^4. Results go under `results["trackml"]`; a run of this set alone
(`-k trackml`) is reported on its own (see `harness.finalize`), so point CACHEFEAT_BENCH_RESULTS
at a folder of its own, e.g. benchmarks/results/cpu-trackml.
"""

from __future__ import annotations

import harness
import pytest

pytestmark = pytest.mark.trackml
MODES = harness.TRACKML_MODES


@pytest.fixture(scope="module")
def tml_settings():
    settings = harness.settings_from_env("trackml")
    if not settings.checkpoint:
        pytest.skip("set CACHEFEAT_BENCH_TRACKML_CHECKPOINT to a trained configs/trackml.yaml stage-1 checkpoint")
    harness.apply_threads(settings)
    return settings


@pytest.fixture(scope="module")
def tml_data(tml_settings, results):
    from dataclasses import asdict

    data = harness.prepare_data(tml_settings)
    out = results.setdefault("trackml", {})
    out["settings"] = asdict(tml_settings)
    out["machine"] = harness.machine_info(tml_settings.device)
    out["data"] = {"folder": str(data.root), "build_s": data.build_s, "reused": data.build_s == 0.0}
    return data


@pytest.mark.benchmark(group="trackml-train-throughput")
@pytest.mark.parametrize("mode", MODES)
def test_trackml_train_throughput(benchmark, mode, tml_settings, tml_data, results):
    steps, rounds, events, rate = harness.timed_training(benchmark, mode, tml_settings, tml_data)
    assert events == steps * tml_settings.batch_size
    out = results.setdefault("trackml", {})
    out.setdefault("train_plan", {})[mode] = [steps, rounds]
    if rate is not None:
        benchmark.extra_info["events_per_s"] = rate
        out.setdefault("train_events_per_s", {})[mode] = rate


@pytest.mark.benchmark(group="trackml-extract")
def test_trackml_extract_vs_forward(benchmark, tml_settings, tml_data, results, tmp_path):
    """As `test_bench_extract.py`: extraction rounds alternate with bare-forward rounds (the setup)."""
    timed = harness.extraction_vs_forward(benchmark, tml_settings, tml_data, tmp_path / "extract.zarr")
    if timed:
        n = tml_settings.n_extract
        out = results.setdefault("trackml", {})
        out["extract_events_per_s"] = n / timed["extract_s"]
        out["forward_events_per_s"] = n / timed["forward_s"]
        out["extract_host_ms_per_event"] = 1e3 * timed["host_s_median"] / n
        out["extract_vs_forward_paired"] = timed["ratio_median"]
        out["extract_round_s"] = timed["extract_round_s"]
        out["forward_round_s"] = timed["forward_round_s"]


@pytest.mark.parametrize("dtype", harness.DTYPES)
def test_trackml_cache_size(dtype, tml_data, results):
    from cachefeat.cache import CacheReader, cache_summary

    summary = cache_summary(CacheReader(tml_data.caches[dtype]))
    E = summary["num_events"]
    out = results.setdefault("trackml", {})
    out.setdefault("cache_bytes_per_event", {})[dtype] = summary["bytes"]["per_event"]
    out["dense_bytes_per_event"] = summary["dense_float32"]["per_event"]
    out.setdefault("cache_over_dense", {})[dtype] = summary["dense_float32"]["cache_over_dense"]
    out.setdefault("compression_ratio", {})[dtype] = summary["bytes"]["compression_ratio"]
    # What the bytes are: stored bytes per event of each array, and the kept counts per event.
    out.setdefault("stored_bytes_per_event_by_array", {})[dtype] = {
        k: v / E for k, v in sorted(summary["bytes"]["stored"].items(), key=lambda kv: -kv[1])}
    out["counts_per_event"] = {k: v["per_event"] for k, v in summary["counts"].items()}


def test_trackml_cache_read_vs_memcpy(tml_data, results):
    """A whole read of the float32 TrackML cache against a memory copy of its decoded bytes."""
    timed = harness.read_vs_memcpy(tml_data.caches["float32"])
    out = results.setdefault("trackml", {})
    out["cache_read_bytes"] = timed["bytes"]
    out["cache_read_gbps"], out["memcpy_gbps"] = timed["cache_read_gbps"], timed["memcpy_gbps"]
    out["raw_read_gbps"], out["cache_read_vs_raw_read"] = timed["raw_read_gbps"], timed["cache_read_vs_raw_read"]
    out["stream_read_gbps"] = timed["stream_read_gbps"]


@pytest.mark.parametrize("mode", MODES)
def test_trackml_peak_rss(mode, tml_settings, tml_data, results):
    report = harness.peak_rss(mode, tml_settings, tml_data)
    assert report["events"] == tml_settings.rss_steps * tml_settings.batch_size
    out = results.setdefault("trackml", {})
    out.setdefault("peak_rss_mb", {})[mode] = report["peak_rss_mb"]
    if "cuda_peak_mb" in report:
        out.setdefault("peak_cuda_mb", {})[mode] = report["cuda_peak_mb"]


def test_trackml_peak_rss_idle(tml_settings, tml_data, results):
    results.setdefault("trackml", {})["rss_idle_mb"] = harness.peak_rss("idle", tml_settings, tml_data)["peak_rss_mb"]
