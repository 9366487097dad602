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



# --- servers for remote caches (root:// and s3://): tests/cache/test_remote.py, benchmarks ---------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    """Terminate a server process started by a fixture; kill it if it does not exit within 10 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for(ready, what: str, proc, log: Path, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            pytest.fail(f"{what} did not start: {tail}")
        time.sleep(0.05)


class RemoteServer:
    """A running server and how to reach it: `url(name)` is the location of a cache `name` on
    it; `put(name, key, data)` / `get(name, key)` write and read one key through the server's
    own client (not through cachefeat), for tests that damage or inspect a cache."""

    def __init__(self, kind: str, base: str, put, get):
        self.kind, self.base, self.put, self.get = kind, base, put, get

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture(scope="session")
def xrootd_server(tmp_path_factory):
    """A real xrootd server (Debian's xrootd-server) on a free localhost port, exporting a fresh
    directory; as `nobody` when the tests run as root (the server refuses to run as root).
    Skips with the reason when the server or the `xrootd` client wheel is missing."""
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("xrootd") is None:
        pytest.skip("no xrootd server binary (apt-get install xrootd-server)")
    client = pytest.importorskip("XRootD.client", reason="the xrootd client: pip install -e '.[remote]'")
    flags = pytest.importorskip("XRootD.client.flags")
    # not under pytest's 0700 tmp root: the server's user must reach it
    top = Path(tempfile.mkdtemp(prefix="cachefeat-xrootd-"))
    data, admin = top / "data", top / "admin"
    data.mkdir()
    admin.mkdir()
    port = _free_port()
    config = top / "xrootd.cfg"
    config.write_text(f"all.export /\noss.localroot {data}\nxrd.port {port}\nxrootd.fslib libXrdOfs.so\n"
                      f"all.role server\nall.adminpath {admin}\nall.pidpath {admin}\n")
    user = {}
    if os.geteuid() == 0:
        for path in (top, data, admin, config):
            shutil.chown(path, "nobody")
        user = {"user": "nobody"}
    log = top / "xrootd.log"  # the server logs to stderr without -l
    with open(log, "wb") as out:
        proc = subprocess.Popen(["xrootd", "-c", str(config), "-n", "cachefeat"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=top, **user)
    _wait_for(lambda: "initialization completed" in log.read_text(errors="replace"), "xrootd", proc, log)
    server = f"root://127.0.0.1:{port}/"

    def put(name, key, payload: bytes):
        f = client.File()
        status, _ = f.open(f"{server}/{name}/{key}", flags.OpenFlags.DELETE | flags.OpenFlags.MAKEPATH)
        assert status.ok, status.message
        assert f.write(payload)[0].ok
        assert f.close()[0].ok

    def get(name, key) -> bytes | None:
        f = client.File()
        status, _ = f.open(f"{server}/{name}/{key}", flags.OpenFlags.READ)
        if not status.ok:
            return None
        status, payload = f.read()
        f.close()
        return payload

    try:
        yield RemoteServer("xrootd", f"root://127.0.0.1:{port}/", put, get)
    finally:
        _stop(proc)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 API server (moto) on a free localhost port with one bucket; the standard AWS_*
    environment variables point at it while it runs (so cachefeat, and commands the tests start,
    find it as a user's S3 setup). Skips with the reason when moto or obstore is missing."""
    import os
    import subprocess
    import sys
    import tempfile
    import urllib.request

    pytest.importorskip("moto", reason="the local S3 server: pip install -e '.[remote]'")
    obstore = pytest.importorskip("obstore", reason="the S3 client: pip install -e '.[remote]'")
    from obstore.store import S3Store

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="cachefeat-moto-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
        except OSError:
            return False
        return True

    _wait_for(up, "moto", proc, log)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = "cachefeat-test"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).close()
    s3 = S3Store(bucket, client_options={"allow_http": True})

    def put(name, key, payload: bytes):
        obstore.put(s3, f"{name}/{key}", payload)

    def get(name, key) -> bytes | None:
        try:
            return bytes(obstore.get(s3, f"{name}/{key}").bytes())
        except FileNotFoundError:
            return None

    try:
        yield RemoteServer("s3", f"s3://{bucket}", put, get)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)
        log.unlink(missing_ok=True)
