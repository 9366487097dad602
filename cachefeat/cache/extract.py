"""Phase 1: run the frozen backbone once over an event file and write the cache.

The work is split into the store's commit blocks (contiguous event ranges). Inside a block,
events are forwarded in hit-count-bucketed batches (less padding), then put back in file
order and handed to the asynchronous writer, so the forward never waits on disk.

Under `accelerate launch` / `torchrun`, rank 0 creates the store, every rank writes its own
contiguous range of blocks, and rank 0 marks the cache complete once all ranks are done.
Block boundaries do not depend on the number of processes, so the cache is the same.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from cachefeat.cache import schema
from cachefeat.cache.store import is_url
from cachefeat.cache.writer import MODES
from cachefeat.config import POSITIVE_INT, at_least, check_allowed, one_of, section
from cachefeat.errors import UserError
from cachefeat.head.inputs import HeadBatch, concat

log = logging.getLogger(__name__)

EXTRACT_DEFAULTS = {
    "batch_size": 64,
    "block_size": 4096,
    "dtype": "float32",
    "keep_hits": "assigned",
    "keep_queries": "all",
    "precision": "fp32",
    "read_workers": 1,
}
CHOICES = {
    "dtype": schema.EMBED_DTYPES,
    "keep_hits": schema.KEEP_HITS,
    "keep_queries": schema.KEEP_QUERIES,
    "precision": schema.PRECISIONS,
}
EXTRACT_ALLOWED = {"batch_size": POSITIVE_INT, "block_size": POSITIVE_INT, "read_workers": at_least(0, integer=True),
                   **{key: one_of(*allowed) for key, allowed in CHOICES.items()}}


def default_floor(config: dict) -> float:
    """The head's `assignment_threshold` (0.1 if the config does not set one)."""
    head = config.get("head") or {}
    return float((head.get("init_args") or {}).get("assignment_threshold", 0.1))


def resolve_options(config: dict, **given) -> dict:
    """Extraction options: explicit values (not None) over the config's `extract` section over defaults.

    Also resolves `floor` (default: `default_floor(config)`). Invalid values raise UserError.
    """
    opts = section(config, "extract", EXTRACT_DEFAULTS, EXTRACT_ALLOWED)
    opts.update({k: v for k, v in given.items() if v is not None and k != "floor"})
    check_allowed("extract", opts, EXTRACT_ALLOWED)
    floor = given.get("floor")
    opts["floor"] = default_floor(config) if floor is None else float(floor)
    if not 0.0 < opts["floor"] < 1.0:
        raise UserError(f"floor must be a probability in (0, 1), not {opts['floor']}")
    if opts["floor"] > default_floor(config):
        log.warning(
            "floor %.3g is above the head's assignment_threshold %.3g: the head will miss pairs",
            opts["floor"],
            default_floor(config),
        )
    return opts


def fingerprint_settings(opts: dict) -> dict:
    """The extraction settings that change the cache's content."""
    return {
        "floor": opts["floor"],
        "embed_dtype": opts["dtype"],
        "precision": opts["precision"],
        "keep_hits": opts["keep_hits"],
        "keep_queries": opts["keep_queries"],
    }


def gather_events(hb: HeadBatch, order: torch.Tensor) -> HeadBatch:
    """Reorder the events of `hb`: event i of the result is event `order[i]` of `hb`.

    `order` is a permutation (int64 [B]). Rows keep their order inside each event, pair
    indices are remapped to the new batch-global rows. Vectorised: no loop over events.
    """
    order = order.to(torch.long)

    def rows(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = offsets.diff()[order]
        new_offsets = torch.cat([offsets.new_zeros(1), counts.cumsum(0)])
        shift = torch.repeat_interleave(offsets[:-1][order] - new_offsets[:-1], counts)
        return shift + torch.arange(int(new_offsets[-1]), dtype=torch.long), new_offsets

    hit_rows, hit_offsets = rows(hb.hit_offsets)
    query_rows, query_offsets = rows(hb.query_offsets)
    # old row -> new row, to remap the pairs' batch-global indices
    new_hit = torch.empty_like(hit_rows)
    new_hit[hit_rows] = torch.arange(hit_rows.numel())
    new_query = torch.empty_like(query_rows)
    new_query[query_rows] = torch.arange(query_rows.numel())
    new_event = torch.empty_like(order)
    new_event[order] = torch.arange(order.numel())
    pair_event = new_event[hb.query_event()[hb.pair_query]]
    pair_rows = torch.sort(pair_event, stable=True).indices

    return HeadBatch(
        event_id=hb.event_id[order],
        hit_offsets=hit_offsets,
        query_offsets=query_offsets,
        hit_raw=hb.hit_raw[hit_rows],
        hit_embed=hb.hit_embed[hit_rows],
        **hb.query_rows(query_rows),
        pair_query=new_query[hb.pair_query[pair_rows]],
        pair_hit=new_hit[hb.pair_hit[pair_rows]],
        pair_logit=hb.pair_logit[pair_rows],
    )


def assemble_block(parts: list[tuple[np.ndarray, HeadBatch, dict]]) -> tuple[HeadBatch, dict[str, np.ndarray]]:
    """One block's HeadBatch and counts in file order, from its batches' (event indices relative to
    the block start, HeadBatch on the CPU, counts) in the order they ran."""
    inverse = torch.from_numpy(np.argsort(np.concatenate([local for local, _, _ in parts]), kind="stable"))
    hb = gather_events(concat([hb for _, hb, _ in parts]), inverse)
    counts = [m for _, _, m in parts]
    metrics = {k: np.concatenate([m[k] for m in counts])[inverse.numpy()] for k in counts[0]}
    return hb, metrics


PIPELINE_DEPTH = 2  # batches read ahead, and batches whose forward is done but not yet sparsified


def extract_blocks(backbone, events, blocks, block_range, opts: dict, on_block, depth: int = PIPELINE_DEPTH) -> None:
    """Extract each of `blocks` in order and call `on_block(block, HeadBatch on the CPU, counts)`.

    Three stages run overlapped: the next batches are read and padded ahead
    (`prefetch.block_batches_ahead`: on a thread, or a data module's in `opts["read_workers"]`
    worker processes; on the thread it is the only user of torch's global RNG during extraction,
    which a data module's events may draw from), this thread runs the frozen forward, and a second
    thread matches and sparsifies each batch (`FrozenBackbone.sparsify`), assembles each block
    (`assemble_block`) and calls `on_block` there; its single worker keeps the matcher's calls and
    the blocks in order. At most `depth` batches wait between two stages (a worker process hands
    over whole blocks), so memory stays bounded. The results are those of running the stages one
    after another: the same operations on the same tensors, in order. An error in any stage is
    raised here.
    """
    from concurrent.futures import ThreadPoolExecutor

    from cachefeat.data.prefetch import block_batches_ahead

    parts: list = []

    def sparsify(block: int, local: np.ndarray, batch: dict, outputs: dict, last: bool) -> None:
        hb, metrics = backbone.sparsify(outputs, batch, opts["floor"], keep_hits=opts["keep_hits"],
                                        keep_queries=opts["keep_queries"])
        parts.append((local, hb.to("cpu"), metrics))
        if last:
            on_block(block, *assemble_block(parts))
            parts.clear()

    pending: list = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachefeat-sparsify") as post:
        try:
            for block, local, batch, last in block_batches_ahead(events, blocks, block_range, opts["batch_size"],
                                                                 depth, opts["read_workers"]):
                batch = backbone.to_device(batch)
                pending.append(post.submit(sparsify, block, local, batch, backbone.forward(batch), last))
                while len(pending) > depth or (pending and pending[0].done()):
                    pending.pop(0).result()
            while pending:
                pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def _disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _as_user_error(exc: BaseException, output) -> BaseException:
    """A disk-full error as one clear line naming the cache; any other error unchanged."""
    if _disk_full(exc):
        return UserError(f"disk full while writing {output}: free space, then rerun with --resume")
    return exc


def extract(
    config: dict,
    checkpoint,
    input,
    output,
    *,
    mode: str = "create",
    batch_size: int | None = None,
    block_size: int | None = None,
    dtype: str | None = None,
    floor: float | None = None,
    keep_hits: str | None = None,
    keep_queries: str | None = None,
    precision: str | None = None,
    read_workers: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Extract the cache of `input` (HDF5 events) through the frozen backbone of `checkpoint` into `output`.

    Options left as None come from the config's `extract` section (floor: the head's
    assignment_threshold). `mode`: "create", "resume" (skip committed blocks; the
    fingerprint must match) or "overwrite". `read_workers`: processes that read a data module's
    events (`data.prefetch`; 0: a thread), no effect on the cache. `device`: default cuda if available, else cpu;
    under a multi-process launch each rank uses its own device.

    Returns a summary (all ranks together): events, blocks written/skipped, stored hits,
    queries and pairs, valid hits seen, seconds, events/s, bytes written; plus output, world,
    this process's rank and the content settings.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from cachefeat.cache.fingerprint import make_fingerprint
    from cachefeat.cache.frozen import FrozenBackbone, backbone_fingerprint_inputs
    from cachefeat.cache.writer import CacheWriter
    from cachefeat.data.loading import open_events
    from cachefeat.model.metrics import COUNT_KEYS

    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    opts = resolve_options(
        config,
        batch_size=batch_size,
        block_size=block_size,
        dtype=dtype,
        floor=floor,
        keep_hits=keep_hits,
        keep_queries=keep_queries,
        precision=precision,
        read_workers=read_workers,
    )
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    distributed = state.num_processes > 1
    if device is None or distributed:
        device = state.device if distributed else ("cuda" if torch.cuda.is_available() else "cpu")
    device = _check_device(device)
    output = output if is_url(output) else Path(output)

    backbone = FrozenBackbone(config, checkpoint, device=device, precision=opts["precision"])
    events = open_events(config, input)
    settings = fingerprint_settings(opts)
    # One process: the input's content hash (a full pass over the input) is computed alongside
    # the extraction, and the writer stores it before its first commit. Several processes: every
    # rank needs it before rank 0 creates the root, as the others compare the root with theirs.
    input_hash = None if distributed else _in_background(events.content_hash, "cachefeat-input-hash")
    fingerprint = make_fingerprint(
        checkpoint_sha256=backbone.checkpoint_sha256,
        backbone_config=backbone_fingerprint_inputs(config),
        input_hash=events.content_hash() if distributed else None,
        settings=settings,
    )
    writer_args = dict(
        fingerprint=fingerprint,
        settings=settings,
        raw_fields=backbone.raw_fields,
        particle_fields=backbone.particle_fields,
        dim=backbone.model.dim,
        embed_dtype=opts["dtype"],
        num_events=len(events),
        metric_names=[*COUNT_KEYS, "n_valid_hits"],
        block_size=opts["block_size"],
        rank=state.process_index,
        world=state.num_processes,
    )

    # Rank 0 creates (or checks) the store, then the others open it.
    writer = _on_main(state, output, lambda: CacheWriter(output, mode=mode, input_hash=input_hash, **writer_args))
    if writer is None:
        writer = CacheWriter(output, mode="resume", **writer_args)

    pending = writer.pending_blocks()
    stats = {
        "events": 0,
        "valid_hits": 0,
        "hits": 0,
        "queries": 0,
        "pairs": 0,
        "blocks_written": 0,
        "blocks_skipped": len(writer.my_blocks()) - len(pending),
    }
    total = sum(writer.block_range(b)[1] - writer.block_range(b)[0] for b in pending)
    started = time.perf_counter()
    bar = _progress_bar(total, state.num_processes, enabled=progress and state.is_main_process)
    error = None
    try:
        def write(block: int, hb: HeadBatch, metrics: dict) -> None:
            start, stop = writer.block_range(block)
            writer.write_block(block, hb, metrics)
            stats["events"] += stop - start
            stats["valid_hits"] += int(metrics["n_valid_hits"].sum())
            stats["hits"] += int(hb.hit_offsets[-1])
            stats["queries"] += int(hb.query_offsets[-1])
            stats["pairs"] += hb.pair_logit.numel()
            stats["blocks_written"] += 1
            _update_bar(bar, stop - start, stats, writer, started)

        extract_blocks(backbone, events, pending, writer.block_range, opts, write)
        writer.close()
    except Exception as exc:  # recorded, so every rank reaches the collective below
        error = exc
        _close_quietly(writer)
    finally:
        bar.close()
        if input_hash is not None and input_hash.done():
            input_hash.thread.join()  # finishing; after an error it may still be reading `events`
        events.close()
    stats["bytes_written"] = writer.bytes_written
    stats["seconds"] = time.perf_counter() - started

    if error is not None:
        error = _as_user_error(error, output)
    reports = gather_object([(str(error) if error is not None else None, stats)]) if distributed else [(None, stats)]
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, (msg, _) in enumerate(reports) if msg is not None]
    if failed:
        raise UserError(f"extraction failed on rank {failed[0][0]}: {failed[0][1]}")
    _on_main(state, output, writer.finalize)

    summary = {key: sum(s[key] for _, s in reports) for key in stats if key != "seconds"}
    summary["seconds"] = max(s["seconds"] for _, s in reports)
    summary["events_per_s"] = summary["events"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    summary.update(output=str(output), world=state.num_processes, rank=state.process_index, **settings)
    return summary


def _in_background(fn, name: str) -> Future:
    """A Future of fn(), run on a new thread (`future.thread`). A daemon thread: a failed
    extraction exits without waiting for it, and nothing reads its result."""
    future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(exc)

    future.thread = threading.Thread(target=run, name=name, daemon=True)
    future.thread.start()
    return future


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return device


def _on_main(state, output, fn):
    """fn() on rank 0 only (None elsewhere). A failure is broadcast and raised on every rank,
    so that no rank waits forever at a later collective."""
    from accelerate.utils import broadcast_object_list

    result, error, message = None, None, [None]
    if state.is_main_process:
        try:
            result = fn()
        except Exception as exc:
            error = _as_user_error(exc, output)
            message = [str(error)]
    if state.num_processes > 1:
        broadcast_object_list(message)
    if error is not None:
        raise error
    if message[0] is not None:
        raise UserError(f"rank 0 failed: {message[0]}")
    return result


def _progress_bar(total: int, world: int, enabled: bool):
    """Rank 0's bar (its own blocks) on stderr."""
    from tqdm import tqdm

    desc = "extract" if world == 1 else f"extract (rank 0 of {world})"
    return tqdm(total=total, unit="ev", desc=desc, disable=not enabled, dynamic_ncols=True)


def _update_bar(bar, n: int, stats: dict, writer, started: float) -> None:
    bar.update(n)
    elapsed = max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{stats['valid_hits'] / elapsed:,.0f} hits/s, {writer.bytes_written / 1e6:.1f} MB written")


def _close_quietly(writer) -> None:
    try:
        writer.close()
    except Exception:  # the first error is the one reported
        log.debug("writer close after a failure raised", exc_info=True)
