"""Fixtures of the extraction tests: a tiny random backbone, small muon event files, and the
live reference computed independently of `from_model_outputs` and of the extraction code.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

HIT_FIELDS = ["x", "y", "z", "r", "s", "eta", "phi", "u", "v", "layer"]
PARTICLE_FIELDS = ["pt", "eta", "phi", "q", "vz"]

TINY_CONFIG = {
    "data": {"hit_fields": HIT_FIELDS, "particle_fields": PARTICLE_FIELDS, "max_hits": 1024},
    "model": {
        "class_path": "cachefeat.model.maskformer.MaskFormer",
        "init_args": {
            "dim": 16,
            "num_queries": 2,
            "num_encoder_layers": 1,
            "num_decoder_layers": 1,
            "num_heads": 2,
            "input_scales": {"x": 0.1, "y": 0.1, "z": 0.1, "r": 0.1, "s": 0.1, "u": 10.0, "v": 10.0, "layer": 0.033},
        },
    },
    "head": {
        "class_path": "cachefeat.head.regression.RegressionHead",
        "init_args": {"dim": 16, "assignment_threshold": 0.1},
    },
    "extract": {
        "batch_size": 8,
        "block_size": 16,
        "dtype": "float32",
        "keep_hits": "assigned",
        "keep_queries": "all",
        "precision": "fp32",
    },
}
NUM_EVENTS = 48


def build_model(config: dict, seed: int = 0):
    from cachefeat.config import instantiate

    torch.manual_seed(seed)
    return instantiate(config["model"], "model", hit_fields=config["data"]["hit_fields"]).eval()


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="session")
def config_file(workdir) -> Path:
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def checkpoint(workdir) -> Path:
    """A random-initialised tiny backbone (seed 0)."""
    from cachefeat.model.checkpoint import save_checkpoint

    path = workdir / "tiny.ckpt"
    save_checkpoint(path, build_model(TINY_CONFIG), TINY_CONFIG)
    return path


@pytest.fixture(scope="session")
def events_file(workdir) -> Path:
    """NUM_EVENTS muon events written by `cachefeat simulate`."""
    from cachefeat.cli import main

    path = workdir / "muon.h5"
    args = ["simulate", "--preset", "muon", "--events", str(NUM_EVENTS), "--seed", "3", "--output", str(path)]
    assert main(args) == 0
    return path


def read_csr(path) -> dict:
    """The raw CSR content of an event file: {"hits": {f: [H]}, "particles": {f: [P]}, offsets, event_id}."""
    with h5py.File(path, "r") as f:
        return {
            "hits": {k: f["hits"][k][:] for k in f["hits"]},
            "particles": {k: f["particles"][k][:] for k in f["particles"]},
            "hit_offsets": f["events/hit_offsets"][:],
            "particle_offsets": f["events/particle_offsets"][:],
            "event_id": f["events/event_id"][:],
        }


def write_events(path, events: list[dict]) -> None:
    """Write an event file (schema 1) from per-event dicts {"hits": {f: [h]}, "particles": {f: [p]}, "event_id"}."""
    hit_names = list(events[0]["hits"])
    particle_names = list(events[0]["particles"])
    with h5py.File(path, "w") as f:
        for name in hit_names:
            f[f"hits/{name}"] = np.concatenate([e["hits"][name] for e in events])
        for name in particle_names:
            f[f"particles/{name}"] = np.concatenate([e["particles"][name] for e in events]).astype(np.float32)
        for kind, first in (("hit", hit_names[0]), ("particle", particle_names[0])):
            sizes = [len(e[f"{kind}s"][first]) for e in events]
            f[f"events/{kind}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        f["events/event_id"] = np.array([e["event_id"] for e in events], dtype=np.int64)
        f.attrs["schema_version"] = 1
        f.attrs["hit_fields"] = json.dumps([n for n in hit_names if n != "particle_index"])
        f.attrs["particle_fields"] = json.dumps(particle_names)


def split_events(csr: dict) -> list[dict]:
    out = []
    for e in range(len(csr["event_id"])):
        h0, h1 = csr["hit_offsets"][e : e + 2]
        p0, p1 = csr["particle_offsets"][e : e + 2]
        out.append(
            {
                "hits": {k: v[h0:h1] for k, v in csr["hits"].items()},
                "particles": {k: v[p0:p1] for k, v in csr["particles"].items()},
                "event_id": int(csr["event_id"][e]),
            }
        )
    return out


@pytest.fixture(scope="session")
def edge_events_file(workdir, events_file) -> Path:
    """24 events whose first block (8 events) has no hits at all, then noise-only events and
    events without particles, then normal muon events.

    Events 0-3: no hits, no particles; 4-7: no hits but one particle; 8-11: the hits of a muon
    event relabelled as noise, no particles; 12-15: no particles and a single noise hit; 16-23: unchanged.
    """
    events = split_events(read_csr(events_file))[:24]
    assert len(events) == 24
    for i, e in enumerate(events[:16]):
        hits, particles = e["hits"], e["particles"]
        if i < 8:
            e["hits"] = {k: v[:0] for k, v in hits.items()}
            e["particles"] = {k: v[:0] if i < 4 else v[:1] for k, v in particles.items()}
        elif i < 12:
            hits["particle_index"] = np.full_like(hits["particle_index"], -1)
            e["particles"] = {k: v[:0] for k, v in particles.items()}
        else:
            e["hits"] = {k: v[:1] for k, v in hits.items()}
            e["hits"]["particle_index"] = np.full(1, -1, dtype=hits["particle_index"].dtype)
            e["particles"] = {k: v[:0] for k, v in particles.items()}
    path = workdir / "edge.h5"
    write_events(path, events)
    return path


def extract_args(config, checkpoint, events, output) -> list[str]:
    """The `cachefeat extract` options for these paths, without a progress bar."""
    return ["--config", str(config), "--checkpoint", str(checkpoint), "--input", str(events), "--output", str(output),
            "--no-progress"]


@pytest.fixture(scope="session")
def cache(workdir, config_file, checkpoint, events_file) -> Path:
    """The muon events extracted through the CLI with the config's defaults (floor 0.1)."""
    from cachefeat.cli import main

    out = workdir / "muon.zarr"
    assert main(["extract", *extract_args(config_file, checkpoint, events_file, out)]) == 0
    return out


@pytest.fixture(scope="session")
def live(checkpoint, events_file) -> list[dict]:
    """The live reference of the muon events, batched as the config's extraction batches them."""
    opts = TINY_CONFIG["extract"]
    return live_outputs(TINY_CONFIG, checkpoint, events_file, opts["batch_size"], opts["block_size"])


# --- the live reference -------------------------------------------------------------------------


def live_batch(model, batch: dict, data: dict) -> list[dict]:
    """Run `model` directly on one padded batch; per event: the outputs over its valid hits
    (padding dropped), live matching and metrics.

    Each entry: logit [N, m] float32 over the event's m valid hits, hit_embed [m, D],
    query_embed [N, D], track_valid [N], target_index [N], raw [m, F], particles [p, T],
    particle_valid [p], metrics {name: int}, n_hits, event_id.
    """
    from cachefeat.model.metrics import event_metrics

    with torch.no_grad():
        out = model(batch)
        target = model.match(out, batch)
        counts = event_metrics(out, batch, target)
    events = []
    for j in range(batch["event_id"].shape[0]):
        m = int(batch["hit_valid"][j].sum())
        p = int(batch["particle_valid"][j].sum())
        assert batch["hit_valid"][j, :m].all() and batch["particle_valid"][j, :p].all()
        events.append(
            {
                "event_id": int(batch["event_id"][j]),
                "logit": out["track_hit_logit"][j, :, :m].float(),
                "hit_embed": out["hit_embed"][j, :m],
                "query_embed": out["query_embed"][j],
                "track_valid": out["track_valid"][j],
                "target_index": target[j],
                "raw": torch.stack([batch[f"hit_{f}"][j, :m] for f in data["hit_fields"]], dim=-1),
                "particles": torch.stack([batch[f"particle_{f}"][j, :p] for f in data["particle_fields"]], -1),
                "particle_valid": batch["particle_valid"][j, :p],
                "metrics": {k: int(v[j]) for k, v in counts.items()},
                "n_hits": m,
            }
        )
    return events


def load_tiny(config: dict, checkpoint):
    """The checkpoint's model, loaded into a model built with other initial weights."""
    from cachefeat.model.checkpoint import load_checkpoint, load_model_state

    model = build_model(config, seed=1)
    load_model_state(model, load_checkpoint(checkpoint))
    return model


def live_outputs(config: dict, checkpoint, events_path, batch_size: int, block_size: int) -> list[dict]:
    """`live_batch` for every event (file order), on the same event batches the extraction forms
    (bucketed within each commit block)."""
    from cachefeat.data.events import EventFile, bucketed_batches

    model = load_tiny(config, checkpoint)
    data = config["data"]
    per_event: dict[int, dict] = {}
    with EventFile(events_path, data["hit_fields"], data["particle_fields"]) as events:
        E = len(events)
        for start in range(0, E, block_size):
            stop = min(E, start + block_size)
            for local in bucketed_batches(events.hit_counts[start:stop], batch_size, seed=None):
                for e, ev in zip((start + local).tolist(), live_batch(model, events.read(start + local), data)):
                    per_event[e] = ev
    return [per_event[e] for e in range(E)]


def expected_event(live: dict, floor: float) -> dict:
    """What the cache must hold for one event, by brute force over the dense [N, m] probability
    matrix (keep_hits="assigned", keep_queries="all"): pairs (n, h) with p >= floor in (n, h)
    order, the hits used by some pair in event order."""
    prob = torch.sigmoid(live["logit"]).numpy()
    N, m = prob.shape
    n_idx, h_idx = np.nonzero(prob >= floor)  # row-major: sorted by (n, h)
    kept = np.flatnonzero((prob >= floor).any(axis=0))
    row = np.full(m, -1)
    row[kept] = np.arange(kept.size)
    T = live["particles"].shape[1]
    target = live["target_index"].numpy()
    ok = (target >= 0) & (target < live["particles"].shape[0])
    ok[ok] = live["particle_valid"].numpy()[target[ok]]
    targets = np.zeros((N, T), dtype=np.float32)
    targets[ok] = live["particles"].numpy()[target[ok]]
    return {
        "event_id": live["event_id"],
        "hit_raw": live["raw"][kept],
        "hit_embed": live["hit_embed"][kept],
        "query_embed": live["query_embed"],
        "query_valid_logit": live["track_valid"],
        "query_slot": torch.arange(N),
        "target_index": torch.from_numpy(np.where(ok, target, -1)),
        "targets": torch.from_numpy(targets),
        "target_valid": torch.from_numpy(ok),
        "pair_query": torch.from_numpy(n_idx),
        "pair_hit": torch.from_numpy(row[h_idx]),
        "pair_logit": live["logit"][n_idx, h_idx],
    }


def cached_event(hb, e: int) -> dict:
    """Event e of a HeadBatch, with event-local pair rows."""
    h0, h1 = int(hb.hit_offsets[e]), int(hb.hit_offsets[e + 1])
    q0, q1 = int(hb.query_offsets[e]), int(hb.query_offsets[e + 1])
    sel = (hb.pair_query >= q0) & (hb.pair_query < q1)
    return {
        "event_id": int(hb.event_id[e]),
        "hit_raw": hb.hit_raw[h0:h1],
        "hit_embed": hb.hit_embed[h0:h1],
        "query_embed": hb.query_embed[q0:q1],
        "query_valid_logit": hb.query_valid_logit[q0:q1],
        "query_slot": hb.query_slot[q0:q1],
        "target_index": hb.target_index[q0:q1],
        "targets": hb.targets[q0:q1],
        "target_valid": hb.target_valid[q0:q1],
        "pair_query": hb.pair_query[sel] - q0,
        "pair_hit": hb.pair_hit[sel] - h0,
        "pair_logit": hb.pair_logit[sel],
    }


def assert_cache_equals_live(cache_path, live: list[dict], floor: float) -> None:
    """Every array of the cache, event by event, equals the brute-force expectation, bit for bit."""
    from cachefeat.cache.reader import CacheReader

    reader = CacheReader(cache_path)
    assert reader.num_events == len(live)
    hb = reader.read_events(0, reader.num_events)
    assert hb.hit_embed.dtype == torch.float32
    for e, ev in enumerate(live):
        want, got = expected_event(ev, floor), cached_event(hb, e)
        for key, value in want.items():
            if key == "event_id":
                assert got[key] == value, (e, key)
            else:
                assert got[key].shape == value.shape and torch.equal(got[key], value.to(got[key].dtype)), (e, key)
    metrics = reader.metrics()
    for name in live[0]["metrics"]:
        np.testing.assert_array_equal(metrics[name], [ev["metrics"][name] for ev in live], err_msg=name)
    np.testing.assert_array_equal(metrics["n_valid_hits"], [ev["n_hits"] for ev in live])


def cache_arrays(path) -> dict[str, np.ndarray]:
    """Everything a complete cache holds, as numpy arrays keyed by field (for run-vs-run equality)."""
    from cachefeat.cache.reader import CacheReader

    reader = CacheReader(path)
    hb = reader.read_events(0, reader.num_events)
    out = {f"hb.{k}": v.numpy() for k, v in vars(hb).items()}
    out.update({f"metrics.{k}": v for k, v in reader.metrics().items()})
    return out


def block_manifests(path) -> dict[str, dict]:
    """Per block: its manifest's file list (relative key -> [size, checksum]), read from zarr.json."""
    out = {}
    for group in sorted(p for p in (Path(path) / "blocks").iterdir() if p.is_dir()):
        attrs = json.loads((group / "zarr.json").read_text()).get("attributes", {})
        out[group.name] = attrs.get("files")
    return out


def committed_blocks(cache: Path) -> list[str]:
    """Names of the blocks whose manifest says committed (read straight from zarr.json)."""
    out = []
    for meta in (cache / "blocks").glob("*/zarr.json") if (cache / "blocks").is_dir() else []:
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):  # being rewritten
            continue
        if attrs.get("committed"):
            out.append(meta.parent.name)
    return sorted(out)


def assert_committed_blocks_intact(cache: Path) -> None:
    """Every file a committed block's manifest lists exists with the listed size."""
    for name in committed_blocks(cache):
        files = json.loads((cache / "blocks" / name / "zarr.json").read_text())["attributes"]["files"]
        assert files
        for key, (size, _) in files.items():
            path = cache / "blocks" / name / key
            assert path.is_file() and path.stat().st_size == size, (name, key)


def assert_same_cache(a: Path, b: Path) -> None:
    """Same decoded arrays and the same bytes (every block's file sizes and checksums)."""
    arrays_a, arrays_b = cache_arrays(a), cache_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    assert block_manifests(a) == block_manifests(b)


def kill_when(args: list[str], ready) -> None:
    """Start `python -m cachefeat extract ARGS` and SIGKILL it as soon as `ready()` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachefeat", "extract", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"extract ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="session")
def ref():
    """The helpers above, for test modules (a conftest cannot be imported by name reliably)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        NUM_EVENTS=NUM_EVENTS,
        extract_args=extract_args,
        TINY_CONFIG=TINY_CONFIG,
        build_model=build_model,
        read_csr=read_csr,
        write_events=write_events,
        split_events=split_events,
        live_outputs=live_outputs,
        live_batch=live_batch,
        load_tiny=load_tiny,
        expected_event=expected_event,
        cached_event=cached_event,
        assert_cache_equals_live=assert_cache_equals_live,
        cache_arrays=cache_arrays,
        block_manifests=block_manifests,
        committed_blocks=committed_blocks,
        assert_committed_blocks_intact=assert_committed_blocks_intact,
        assert_same_cache=assert_same_cache,
        kill_when=kill_when,
    )
