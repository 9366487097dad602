"""Root pytest hooks: `--benchmark` (and `--trackml`) must be registered here, at the rootdir,
so both `pytest --benchmark` and `pytest benchmarks/ --benchmark` accept them; and the
`hepattn_src` fixture, which tests and benchmarks of the hepattn path share."""

from pathlib import Path

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


HEPATTN_SRC = (Path(__file__).resolve().parent / ".." / "shared" / "hepattn" / "src").resolve()
HEPATTN_PACKAGES = ("jsonargparse", "lightning", "einops", "lion_pytorch", "torchjd")


@pytest.fixture(scope="session")
def hepattn_src() -> Path:
    """The real hepattn, importable: ../shared/hepattn/src on sys.path and on PYTHONPATH (for the
    commands the tests start), or a skip that says what is missing (a user's clone has no
    shared folder; `pip install -e ".[hepattn]"` brings the runtime packages)."""
    import importlib
    import importlib.util
    import os
    import sys
    import warnings

    if not HEPATTN_SRC.is_dir():
        pytest.skip(f"hepattn source not found at {HEPATTN_SRC} (the shared folder next to the repository)")
    missing = [name for name in HEPATTN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"hepattn's runtime packages are not installed ({', '.join(missing)}): "
                    "pip install -e '.[hepattn]'")
    if str(HEPATTN_SRC) not in sys.path:
        sys.path.insert(0, str(HEPATTN_SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HEPATTN_SRC), os.environ.get("PYTHONPATH")) if p)
    try:
        with warnings.catch_warnings():  # hepattn's imports use deprecated torch.jit APIs
            warnings.simplefilter("ignore")
            importlib.import_module("hepattn.models")
    except Exception as exc:  # a broken runtime package surfaces as any import-time error
        pytest.skip(f"cannot import hepattn from {HEPATTN_SRC}: {type(exc).__name__}: {exc}")
    return HEPATTN_SRC

