"""`verify_cache`: the equivalence contract (DESIGN.md §8.2, 8.3, 8.5) as a check of one cache.

The frozen backbone runs live on a seeded random sample of the cache's events, at two batch
sizes (B, padded, and 1, unpadded), and every field of the cached `HeadBatch` of the same
events is compared with the live one. Then the config's regression head computes its loss and
the gradient of every parameter on the cached batch and on the live one.

Tolerances: the table of `tolerance` (`field_tolerances`), the one the equivalence tests use.

A pair whose probability lies within rounding of the floor, or a hit on the decoder's mask
threshold, can differ between batch compositions; verify then reports the shapes that differ.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from cachefeat.cache.tolerance import FIELDS, Tolerance, field_tolerances
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch, concat

log = logging.getLogger(__name__)


def compare(cached: torch.Tensor, live: torch.Tensor, tol: Tolerance) -> dict:
    """One row of the report: max_abs, max_rel (max_abs over max|live|), ok, detail.

    Shapes must match; values are compared in float64 on the CPU.
    """
    c = cached.detach().cpu()
    ref = live.detach().cpu()
    if c.shape != ref.shape:
        return {"max_abs": None, "max_rel": None, "tolerance": str(tol), "ok": False,
                "detail": f"shape {tuple(c.shape)} in the cache, {tuple(ref.shape)} live"}
    c, ref = c.to(torch.float64), ref.to(torch.float64)
    if c.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "tolerance": str(tol), "ok": True, "detail": ""}
    diff = (c - ref).abs()
    scale = float(ref.abs().max())
    allowed = tol.rtol * ref.abs() + tol.atol * scale
    ok = bool((diff <= allowed).all())  # False on NaN
    max_abs = float(diff.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    detail = ""
    if not ok:
        worst = int(torch.argmax(torch.where(diff <= allowed, -math.inf, diff - allowed).flatten()))
        index = tuple(int(i) for i in np.unravel_index(worst, tuple(c.shape)))
        detail = f"at {index}: {float(c.flatten()[worst]):.7g} in the cache, {float(ref.flatten()[worst]):.7g} live"
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": str(tol), "ok": ok, "detail": detail}


def _worst(rows: list[dict]) -> dict:
    """The rows of one field over several live batch sizes, merged: worst errors, all must pass."""
    failed = [r for r in rows if not r["ok"]]
    pick = failed[0] if failed else rows[0]
    numbers = [r for r in rows if r["max_abs"] is not None]
    return {
        "max_abs": max((r["max_abs"] for r in numbers), default=None),
        "max_rel": max((r["max_rel"] for r in numbers), default=None),
        "tolerance": pick["tolerance"],
        "ok": not failed,
        "detail": pick["detail"],
    }


def as_stored(hb: HeadBatch, embed_dtype: str) -> HeadBatch:
    """`hb` with its embeddings rounded to the storage dtype and widened back to float32."""
    dtype = getattr(torch, embed_dtype)
    return dataclasses.replace(hb, hit_embed=hb.hit_embed.to(dtype).float(),
                               query_embed=hb.query_embed.to(dtype).float())


def sample_events(num_events: int, events: int, seed: int) -> np.ndarray:
    """min(events, num_events) distinct event indices in a random order drawn from `seed`."""
    return np.random.default_rng(seed).choice(num_events, size=min(events, num_events), replace=False)


def read_sample(reader, indices: np.ndarray) -> HeadBatch:
    """The cached events `indices`, in that order: contiguous runs read from disk, then gathered
    by `ResidentCache.batch` (the training path's gather)."""
    from cachefeat.cache.resident import ResidentCache

    order = np.sort(indices)
    runs = np.split(order, np.flatnonzero(np.diff(order) != 1) + 1)
    resident = ResidentCache(concat([reader.read_events(int(r[0]), int(r[-1]) + 1) for r in runs]))
    return resident.batch(np.searchsorted(order, indices))


def live_sample(backbone, events, indices: np.ndarray, batch_size: int, settings: dict) -> HeadBatch:
    """The live `HeadBatch` of `indices` (in that order), forwarded `batch_size` events at a time (CPU)."""
    parts = []
    for start in range(0, len(indices), batch_size):
        hb, _ = backbone.head_batch(
            events.read(indices[start:start + batch_size]), float(settings["floor"]),
            keep_hits=settings.get("keep_hits", "assigned"), keep_queries=settings.get("keep_queries", "all"),
        )
        parts.append(hb.to("cpu"))
    return concat(parts)


def head_loss_and_grads(head, hb: HeadBatch, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The head's loss on `hb` and the gradient of every parameter (CPU copies)."""
    head.zero_grad(set_to_none=True)
    hb = hb.to(device).float()
    loss = head.loss(head(hb), hb)
    loss.backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().clone()
             for name, p in head.named_parameters()}
    return loss.detach().cpu(), grads


def compare_head(head, cached: HeadBatch, live: HeadBatch, tol: Tolerance, device) -> dict[str, dict]:
    """Rows "head loss" (element-wise rule) and "head gradients": max_abs over every gradient
    element, max_rel = |g_cached - g_live|_2 / |g_live|_2 over all parameters, ok when that is
    within `tol.rtol`; `detail` names the parameter with the largest share of the difference."""
    loss_c, grads_c = head_loss_and_grads(head, cached, device)
    loss_l, grads_l = head_loss_and_grads(head, live, device)
    names = list(grads_l)
    diff = {name: (grads_c[name].double() - grads_l[name].double()).flatten() for name in names}
    err = float(torch.cat(list(diff.values())).norm())
    ref = float(torch.cat([grads_l[name].double().flatten() for name in names]).norm())
    rel = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    worst = max(names, key=lambda name: float(diff[name].norm()))
    grad_row = {"max_abs": max(float(d.abs().max()) if d.numel() else 0.0 for d in diff.values()),
                "max_rel": rel, "tolerance": f"rtol {tol.rtol:.2g} (2-norm)", "ok": err <= tol.rtol * ref,
                "detail": f"largest share: {worst}"}
    return {"head loss": compare(loss_c, loss_l, tol), "head gradients": grad_row}


def verify_cache(config: dict, cache, checkpoint, input, *, events: int = 64, seed: int = 0,
                 batch_size: int | None = None, device="cpu") -> dict:
    """Check a cache against live frozen inference on a random sample of its events.

    Args:
        config: the config the cache was extracted with (data, model, head, extract sections).
        cache: the cache directory; checkpoint: the stage-1 checkpoint; input: the event file.
        events: how many events to sample (all of them when the cache holds fewer).
        seed: draws the sample and seeds the head's initial weights.
        batch_size: the padded live batch size B (default: extract.batch_size); the sample is
            also forwarded one event at a time.
        device: where the backbone and the head run.

    Returns:
        {"ok", "cache", "events" (sampled indices), "batch_sizes", "embed_dtype", "precision",
        "warnings" (library version changes), "fields": {name: {"max_abs", "max_rel",
        "tolerance", "ok", "detail"}}}; fields are "fingerprint", "checksums", every `FIELDS`
        entry, "head loss" and "head gradients". When the checksums fail, nothing else is compared.

    Raises:
        UserError on bad input: out-of-range options, a missing or foreign file, or a cache whose
        fingerprint does not match the checkpoint, the config or the input.
    """
    from cachefeat.cache.extract import EXTRACT_DEFAULTS
    from cachefeat.cache.fingerprint import check_cache, library_versions, version_changes
    from cachefeat.cache.frozen import FrozenBackbone
    from cachefeat.cache.reader import CacheReader
    from cachefeat.config import section
    from cachefeat.data.loading import open_events
    from cachefeat.head.checkpoint import build_head

    if events < 1:
        raise UserError(f"--events must be at least 1, got {events}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if batch_size is None:
        batch_size = section(config, "extract", EXTRACT_DEFAULTS)["batch_size"]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")

    reader = CacheReader(cache)
    if reader.num_events == 0:
        raise UserError(f"cache {cache} holds no events: nothing to verify")
    fingerprint = reader.fingerprint
    settings = {**reader.settings, **(fingerprint.get("settings") or {})}
    precision = settings.get("precision", "fp32")
    backbone = FrozenBackbone(config, checkpoint, device=device, precision=precision)
    with open_events(config, input) as event_file:
        check_cache(reader, config, checkpoint_sha256=backbone.checkpoint_sha256,
                    input_hash=event_file.content_hash(), what="cache",
                    hint="pass the config, checkpoint and input it was extracted from, or re-extract it")
        warnings = version_changes(fingerprint.get("versions"), library_versions())
        for line in warnings:
            log.warning("cache %s was extracted with another library version: %s", cache, line)

        report = {"ok": False, "cache": str(cache), "events": [], "batch_sizes": [],
                  "embed_dtype": reader.embed_dtype, "precision": precision, "warnings": warnings,
                  "fields": {"fingerprint": {"max_abs": None, "max_rel": None, "tolerance": "equal",
                                             "ok": True, "detail": "matches checkpoint, config and input"}}}
        try:
            reader.verify()
        except UserError as exc:
            report["fields"]["checksums"] = {"max_abs": None, "max_rel": None, "tolerance": "crc32c",
                                             "ok": False, "detail": str(exc)}
            return report
        report["fields"]["checksums"] = {"max_abs": None, "max_rel": None, "tolerance": "crc32c", "ok": True,
                                         "detail": "every file matches its manifest"}

        indices = sample_events(reader.num_events, events, seed)
        sizes = sorted({min(batch_size, len(indices)), 1}, reverse=True)
        report["events"], report["batch_sizes"] = indices.tolist(), sizes
        log.info("verifying %d of %d events of %s live at batch sizes %s", len(indices), reader.num_events,
                 cache, " and ".join(map(str, sizes)))
        cached = read_sample(reader, indices)
        lives = [live_sample(backbone, event_file, indices, size, settings) for size in sizes]

    tol = field_tolerances(reader.embed_dtype, precision)
    rows = {name: _worst([compare(getattr(cached, name), getattr(live, name), tol[name]) for live in lives])
            for name in FIELDS}

    with torch.random.fork_rng(devices=[]):
        head = build_head(config, list(reader.raw_fields), list(reader.particle_fields), seed=seed)
    head.to(device).eval()  # eval: dropout off, so both sources see the same function
    head.fit_scaling(cached.targets.to(device), cached.target_valid.to(device), cached.to(device))
    head_rows = [compare_head(head, cached, as_stored(live, reader.embed_dtype), tol["head gradients"], device)
                 for live in lives]
    for name in ("head loss", "head gradients"):
        rows[name] = _worst([r[name] for r in head_rows])

    report["fields"].update(rows)
    report["ok"] = all(row["ok"] for row in report["fields"].values())
    return report


def failed_fields(report: dict) -> list[str]:
    """Names of the report's rows beyond tolerance."""
    return [name for name, row in report["fields"].items() if not row["ok"]]


def format_report(report: dict) -> str:
    """The report as a table: field, worst absolute error, worst relative error, tolerance, status."""
    def number(x):
        return "-" if x is None else f"{x:.3g}"

    head = (f"cache {report['cache']}: {len(report['events'])} events, live batch sizes "
            f"{' and '.join(map(str, report['batch_sizes'])) or '-'}, embeddings {report['embed_dtype']}, "
            f"forward {report['precision']}")
    lines = [head, f"{'field':<18} {'max abs err':>12} {'max rel err':>12}  {'tolerance':<24} status"]
    for name, row in report["fields"].items():
        status = "OK" if row["ok"] else "FAIL"
        line = f"{name:<18} {number(row['max_abs']):>12} {number(row['max_rel']):>12}  {row['tolerance']:<24} {status}"
        if row["detail"] and (not row["ok"] or name.startswith("head grad")):
            line += f"  {row['detail']}"
        lines.append(line)
    lines.append("rel err: worst absolute error over the field's largest live magnitude; "
                 "head gradients: error in the 2-norm over all parameters")
    return "\n".join(lines)
