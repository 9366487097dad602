"""TrackML scale (`--benchmark --trackml`): the same measurements where they are feasible.

Needs a trained `configs/trackml.yaml` stage-1 checkpoint (none is shipped; see that config's
header for the pretrain command), given as CACHEFEAT_BENCH_TRACKML_CHECKPOINT. The dense head
is left out: its padded [B, N, M, D] tensors do not fit in memory at N ~ 1000, M ~ 10^4.
Results go under `results["trackml"]`.
"""

from __future__ import annotations

import shutil

import harness
import pytest

pytestmark = pytest.mark.trackml
MODES = ("live_frozen_sparse", "cached_stream", "cached_memory")


@pytest.fixture(scope="module")
def tml_settings():
    settings = harness.settings_from_env("trackml")
    if not settings.checkpoint:
        pytest.skip("set CACHEFEAT_BENCH_TRACKML_CHECKPOINT to a trained configs/trackml.yaml stage-1 checkpoint")
    harness.apply_threads(settings)
    return settings


@pytest.fixture(scope="module")
def tml_data(tml_settings, results):
    data = harness.prepare_data(tml_settings)
    results.setdefault("trackml", {})["settings"] = {k: getattr(tml_settings, k) for k in
                                                      ("n_train", "n_extract", "batch_size", "device")}
    return data


@pytest.mark.benchmark(group="trackml-train-throughput")
@pytest.mark.parametrize("mode", MODES)
def test_trackml_train_throughput(benchmark, mode, tml_settings, tml_data, results):
    *_, rate = harness.timed_training(benchmark, mode, tml_settings, tml_data)
    if rate is not None:
        results.setdefault("trackml", {}).setdefault("train_events_per_s", {})[mode] = rate


@pytest.mark.benchmark(group="trackml-extract")
def test_trackml_extract(benchmark, tml_settings, tml_data, results, tmp_path):
    output = tmp_path / "extract.zarr"
    run = harness.extraction(tml_settings, tml_data, output)
    summary = benchmark.pedantic(run, setup=lambda: shutil.rmtree(output, ignore_errors=True),
                                 rounds=tml_settings.timing_rounds)
    assert summary["events"] == tml_settings.n_extract
    if benchmark.stats:
        results.setdefault("trackml", {})["extract_events_per_s"] = (
            tml_settings.n_extract / benchmark.stats.stats.median)


@pytest.mark.parametrize("dtype", harness.DTYPES)
def test_trackml_cache_size(dtype, tml_data, results):
    from cachefeat.cache import CacheReader, cache_summary

    summary = cache_summary(CacheReader(tml_data.caches[dtype]))
    out = results.setdefault("trackml", {})
    out.setdefault("cache_bytes_per_event", {})[dtype] = summary["bytes"]["per_event"]
    out["dense_bytes_per_event"] = summary["dense_float32"]["per_event"]
    out.setdefault("cache_over_dense", {})[dtype] = summary["dense_float32"]["cache_over_dense"]
