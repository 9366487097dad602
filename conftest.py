"""Root pytest hooks: `--benchmark` (and `--trackml`) must be registered here, at the rootdir,
so both `pytest --benchmark` and `pytest benchmarks/ --benchmark` accept them."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ (skipped otherwise)")
    parser.addoption("--trackml", action="store_true", default=False,
                     help="also run the TrackML-scale benchmarks (slow on a CPU)")


def pytest_collection_modifyitems(config, items):
    run_bench = config.getoption("--benchmark")
    run_trackml = config.getoption("--trackml")
    skip_bench = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks/ --benchmark`")
    skip_trackml = pytest.mark.skip(reason="TrackML scale: add --trackml")
    for item in items:
        is_bench = "benchmark" in getattr(item, "fixturenames", ()) or item.path.parts[-2:-1] == ("benchmarks",)
        if is_bench and not run_bench:
            item.add_marker(skip_bench)
        elif "trackml" in item.keywords and not run_trackml:
            item.add_marker(skip_trackml)
    gpu = pytest.mark.skip(reason="needs a CUDA device")
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(gpu)
