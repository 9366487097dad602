"""`evaluate`: a trained head's predictions per query, the helix-fit baseline on the same
assigned hits, their resolutions, and plots.

Outputs in the evaluation directory:

- `predictions.h5`: one dataset per column (`COLUMNS` lists them), one row per query of every
  event, in event order. `head_<f>`, `true_<f>` and `fit_<f>` for f in TRACK_FIELDS (pt in GeV,
  eta, phi in rad, q in e); `true_<f>` is NaN where the query is unmatched, `fit_<f>` where the
  fit failed, and a `head_<f>` column exists only when the head regresses f.
- `metrics.json`: counts and `regression_metrics` of the head and of the fit.
- PNG plots (`cachefeat.evaluation.plots`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from cachefeat.config import Allowed, section
from cachefeat.errors import UserError
from cachefeat.evaluation.trackfit import fit_helices
from cachefeat.head.checkpoint import load_head
from cachefeat.head.inputs import HeadBatch
from cachefeat.head.metrics import regression_metrics

log = logging.getLogger(__name__)

TRACK_FIELDS = ("pt", "eta", "phi", "q")
UNITS = {"pt": "GeV", "eta": "1", "phi": "rad", "q": "e"}
FIT_INPUTS = ("x", "y", "z")
# Every column predictions.h5 may hold, with its dtype; head_<f> only for the head's targets.
COLUMNS = {
    "event_id": "int64", "query_slot": "int64", "target_valid": "bool", "track_valid_prob": "float32",
    "n_assigned": "int64", "fit_status": "bool",
    **{f"{kind}_{f}": "float64" for kind in ("head", "true", "fit") for f in TRACK_FIELDS},
}
EVALUATE_DEFAULTS = {"bz": None, "fit": True}  # fit: false for data without solenoid hit coordinates
EVALUATE_ALLOWED = {"bz": Allowed(none=True)}  # the field in tesla; its sign is the field's direction


@torch.no_grad()
def predict_batch(head, hb: HeadBatch, bz: float) -> dict[str, np.ndarray]:
    """The prediction columns (see `COLUMNS`) of every query of `hb`, as numpy arrays [Q].

    The fit uses the hits the head pools: pairs with sigmoid(logit) >= head.assignment_threshold;
    `bz` None: no fit (fit columns NaN, fit_status False).
    """
    device = next(head.parameters()).device
    hb = hb.to(device).float()
    Q = hb.query_embed.shape[0]
    decoded = head.decode(head(hb))
    keep = torch.sigmoid(hb.pair_logit) >= head.assignment_threshold
    query, hit = hb.pair_query[keep], hb.pair_hit[keep]
    if bz is None:
        nan = np.full(Q, np.nan)
        fit = {"n_hits": np.bincount(query.cpu().numpy(), minlength=Q).astype(np.int64),
               "status": np.zeros(Q, dtype=bool), **{f: nan for f in TRACK_FIELDS}}
    else:
        xyz = hb.hit_raw[hit][:, [head.raw_fields.index(f) for f in FIT_INPUTS]].double().cpu().numpy()
        fit = fit_helices(xyz[:, 0], xyz[:, 1], xyz[:, 2], query.cpu().numpy(), Q, bz)

    valid = hb.target_valid.bool().cpu().numpy()
    out = {
        "event_id": hb.event_id[hb.query_event()].cpu().numpy().astype(np.int64),
        "query_slot": hb.query_slot.cpu().numpy().astype(np.int64),
        "target_valid": valid,
        "track_valid_prob": torch.sigmoid(hb.query_valid_logit.float()).cpu().numpy(),
        "n_assigned": fit["n_hits"],
        "fit_status": fit["status"],
    }
    targets = hb.targets.double().cpu().numpy()
    for f in TRACK_FIELDS:
        if f in decoded:
            out[f"head_{f}"] = decoded[f].double().cpu().numpy()
        truth = targets[:, head.particle_fields.index(f)] if f in head.particle_fields else np.full(Q, np.nan)
        out[f"true_{f}"] = np.where(valid, truth, np.nan)
        out[f"fit_{f}"] = fit[f]
    return out


def predict(head, batches: Iterable[HeadBatch], bz: float) -> dict[str, np.ndarray]:
    """`predict_batch` over `batches`, concatenated."""
    parts = [predict_batch(head, hb, bz) for hb in batches]
    if not parts:
        raise UserError("nothing to evaluate: the source holds no events")
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _select(columns: dict, kind: str, rows: np.ndarray) -> tuple[dict, dict]:
    fields = [f for f in TRACK_FIELDS if f"{kind}_{f}" in columns and not np.isnan(columns[f"true_{f}"][rows]).all()]
    pred = {f: columns[f"{kind}_{f}"][rows] for f in fields}
    true = {f: columns[f"true_{f}"][rows] for f in fields}
    return pred, true


def resolution_summary(columns: dict[str, np.ndarray], num_events: int) -> dict:
    """metrics.json content from the prediction columns of `num_events` events.

    Tracks are the matched queries (target_valid). `head` is measured on all of them;
    `fit` and `head_on_fit_tracks` on those the fit succeeded on (the same tracks for both).
    """
    matched = columns["target_valid"]
    fitted = matched & columns["fit_status"]
    return {
        "counts": {
            "events": int(num_events),
            "queries": int(matched.size),
            "matched": int(matched.sum()),
            "fit_ok": int(fitted.sum()),
            "fit_failed": int((matched & ~columns["fit_status"]).sum()),
            "fit_failed_few_hits": int((matched & (columns["n_assigned"] < 3)).sum()),
        },
        "head": regression_metrics(*_select(columns, "head", matched)),
        "head_on_fit_tracks": regression_metrics(*_select(columns, "head", fitted)),
        "fit": regression_metrics(*_select(columns, "fit", fitted)),
    }


def write_predictions(path, columns: dict[str, np.ndarray], attrs: dict) -> None:
    """One HDF5 dataset per column (gzip); `attrs` values stored as JSON strings."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for name, values in columns.items():
            f.create_dataset(name, data=values.astype(COLUMNS[name]), compression="gzip", shuffle=True)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value)
    tmp.replace(path)


def read_predictions(path) -> tuple[dict[str, np.ndarray], dict]:
    """(columns, attrs) of a predictions.h5."""
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}, {k: json.loads(v) for k, v in f.attrs.items()}


def resolve_bz(config: dict, bz: float | None) -> float:
    """The field (T): `bz` when given, else the config's `evaluate.bz`."""
    if bz is None:
        bz = section(config, "evaluate", EVALUATE_DEFAULTS, EVALUATE_ALLOWED)["bz"]
    if bz is None:
        raise UserError("the helix fit needs the solenoid field: pass --bz TESLA or set evaluate.bz in the config")
    if not isinstance(bz, (int, float)) or not math.isfinite(bz) or bz == 0:
        raise UserError(f"the field bz must be a non-zero number of tesla, not {bz!r}")
    return float(bz)


def _check_fields(head, raw_fields: list[str], particle_fields: list[str], what: str, fit: bool = True) -> None:
    if list(raw_fields) != list(head.raw_fields):
        raise UserError(f"the head reads raw hit fields [{', '.join(head.raw_fields)}] but {what} holds "
                        f"[{', '.join(raw_fields)}]")
    if list(particle_fields) != list(head.particle_fields):
        raise UserError(f"the head expects particle fields [{', '.join(head.particle_fields)}] but {what} holds "
                        f"[{', '.join(particle_fields)}]")
    missing = [f for f in FIT_INPUTS if f not in head.raw_fields]
    if fit and missing:
        raise UserError(f"the helix fit needs the raw hit fields x, y, z; {what} lacks {', '.join(missing)} "
                        "(set evaluate.fit: false to evaluate the head alone)")


def _check_backbone(ckpt: dict, features: dict, what: str) -> None:
    """The head must be evaluated on features of the backbone it was trained on.

    `features`: the fingerprint entries (`BACKBONE_KEYS`) of the backbone that made the features.
    Entries the head's checkpoint does not record (a head trained live) are not compared.
    """
    from cachefeat.cache.fingerprint import cache_differences

    trained = ckpt.get("cache_fingerprint") or {}
    weights = cache_differences(features, checkpoint_sha256=trained.get("checkpoint_sha256") or None)
    config = cache_differences(features, backbone_config_hash=trained.get("backbone_config_hash") or None)
    kinds = []
    if weights:
        kinds.append("other backbone weights")
    if config:
        kinds.append("another backbone config")
    if kinds:
        raise UserError(f"{what} comes from {' and '.join(kinds)} than the head was trained on "
                        f"(features vs head: {'; '.join(weights + config)})")


def _json_safe(obj):
    """NaN -> None (JSON null), recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", desc="evaluate", disable=not enabled, dynamic_ncols=True)


def _cache_batches(reader, batch_size: int, bar) -> Iterator[HeadBatch]:
    for start in range(0, reader.num_events, batch_size):
        stop = min(start + batch_size, reader.num_events)
        yield reader.read_events(start, stop)
        bar.update(stop - start)


def _live_batches(frozen, events, batch_size: int, floor: float, bar) -> Iterator[HeadBatch]:
    for start in range(0, len(events), batch_size):
        stop = min(start + batch_size, len(events))
        hb, _ = frozen.head_batch(events.read(np.arange(start, stop)), floor)
        yield hb
        bar.update(stop - start)


def evaluate(config: dict, head_ckpt, output, *, source: str = "cache", cache=None, checkpoint=None, input=None,
             bz: float | None = None, batch_size: int = 256, device="cpu", plots: bool = True,
             progress: bool = False) -> dict:
    """Predict every query of a test set, fit helices on the same hits, write the outputs.

    Args:
        config: the run's config (`evaluate.bz`; for source "live" also `data` and `model`).
        head_ckpt: head.ckpt written by `cachefeat train`.
        output: evaluation directory (created; existing outputs are replaced).
        source: "cache" (reads `cache`) or "live" (runs the stage-1 `checkpoint` on `input`).
        bz: solenoid field (T); default `evaluate.bz` from the config. With `evaluate.fit: false`
            there is no helix fit (its columns are NaN) and no field is needed.
        batch_size: events per batch.

    Returns:
        The metrics written to metrics.json.
    """
    if source not in ("cache", "live"):
        raise UserError(f"source must be 'cache' or 'live', not {source!r}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    fit = section(config, "evaluate", EVALUATE_DEFAULTS, EVALUATE_ALLOWED)["fit"]
    bz = resolve_bz(config, bz) if fit else None
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r}") from exc
    head, ckpt = load_head(head_ckpt, device)

    if source == "cache":
        from cachefeat.cache.reader import CacheReader

        if cache is None:
            raise UserError("--source cache needs --cache TEST.zarr")
        reader = CacheReader(cache)
        what = f"cache {cache}"
        _check_fields(head, reader.raw_fields, reader.particle_fields, what, fit)
        _check_backbone(ckpt, reader.fingerprint, what)
        floor = float(reader.settings.get("floor", 0.0))
        if floor > head.assignment_threshold:
            raise UserError(f"cache {cache} holds pairs with p >= {floor}, above the head's threshold "
                            f"{head.assignment_threshold}: re-extract it with a lower floor")
        total = reader.num_events
        make_batches = functools.partial(_cache_batches, reader, batch_size)
    else:
        from cachefeat.cache.fingerprint import config_hash
        from cachefeat.cache.frozen import FrozenBackbone
        from cachefeat.data.loading import open_events

        if checkpoint is None or input is None:
            raise UserError("--source live needs --checkpoint STAGE1.ckpt and --input TEST.h5")
        frozen = FrozenBackbone(config, checkpoint, device)
        events = open_events(config, input)
        _check_fields(head, frozen.raw_fields, frozen.particle_fields, "the config's data section", fit)
        live = {"checkpoint_sha256": frozen.checkpoint_sha256, "backbone_config_hash": config_hash(config)}
        _check_backbone(ckpt, live, f"checkpoint {checkpoint}")
        total = len(events)
        make_batches = functools.partial(_live_batches, frozen, events, batch_size, head.assignment_threshold)

    with _progress(total, progress) as bar:
        columns = predict(head, make_batches(bar), bz)
    metrics = resolution_summary(columns, total)
    metrics["settings"] = {"source": source, "bz": bz, "assignment_threshold": head.assignment_threshold,
                           "head_checkpoint": str(head_ckpt), "head_weights_sha256": ckpt["weights_sha256"]}

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.h5", columns, {**metrics["settings"], "units": UNITS})
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    if plots:
        from cachefeat.evaluation.plots import make_plots

        make_plots(columns, out)
    c = metrics["counts"]
    log.info("evaluated %d events, %d matched tracks; relative pT resolution (68%% half-width): head %.4g, "
             "fit %.4g (on %d fitted tracks)", c["events"], c["matched"], metrics["head"].get("pt_rel_res68", math.nan),
             metrics["fit"].get("pt_rel_res68", math.nan), c["fit_ok"])
    return metrics
