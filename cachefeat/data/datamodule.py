"""Events from a hepattn (Lightning) data module, read as cachefeat's padded batches.

The config's `data.module` block is the data module as hepattn's LightningCLI config writes it
(`class_path` e.g. `hepattn.experiments.atlas_muon.data.AtlasMuonDataModule`, `init_args` its
`data:` block), built with jsonargparse. One split (`train`, `val`, `test`) is one event source:
event k is item k of the split's dataset (hepattn's `sample_id`), so the same config always gives
the same events in the same order with the same ids.

Determinism: a hepattn dataset may draw from torch's global RNG (AtlasMuonDataset's
`dummy_data: true` draws its hit-to-particle links so); every item is read under a torch RNG
seeded with (data.seed, k) and restored afterwards, so event k is the same in any process, any
read order, any batch, also while torch.compile compiles on another thread (see `_compile_lock`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachefeat.config import HEPATTN_HINT, build_tree, did_you_mean
from cachefeat.errors import UserError

SPLITS = {"train": ("fit", "train_dataset"), "val": ("validate", "val_dataset"), "test": ("test", "test_dataset")}


@dataclass(frozen=True)
class DataSplit:
    """A split of the config's data module, given where an event file path would be (`--split`)."""

    name: str

    def __str__(self) -> str:
        return f"split '{self.name}'"


def build_datamodule(block: dict):
    """The data module of a `class_path`/`init_args` block, built as LightningCLI builds it."""
    try:
        from lightning.pytorch import LightningDataModule
    except ImportError as exc:
        raise UserError(f"a data module needs lightning ({exc}): {HEPATTN_HINT}") from exc
    return build_tree(block, LightningDataModule, "data.module")


@functools.cache
def _compile_lock():
    """The lock torch.compile holds while it compiles, as a context manager (a no-op where torch
    has none); looked up once per process.

    torch.compile saves torch's global CPU RNG state before each compilation and restores it after
    (torch._dynamo's `preserve_global_state`, under `compile_lock`, torch 2.x). An event drawn from
    that RNG on another thread in between is drawn, in part, from the restored state: measured, 1-2
    of the 160 events of the tests' hepattn extraction differed, now and then (hepattn's matching
    costs are compiled functions, and extraction matches on one thread while it reads events on
    another). Seeding and drawing an event under the same lock makes the two exclusive.
    """
    try:
        from torch._dynamo.convert_frame import compile_lock
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
    return compile_lock


class DataModuleEvents:
    """One split of a data module, with `EventFile`'s reading interface.

    Hit field f is the item's `hit_<f>`; particle field f is its `particle_<particle_sources[f]>`
    (default f itself), so hepattn's `truthMuon_pt` can be cachefeat's `pt`.

    Attributes:
        event_id: int64 [E], the dataset index of each event.
        path: a name for messages ("<DataModule class> split 'train'").

    Extraction may read its blocks in forked worker processes (`worker_processes`,
    `data.prefetch`): the events are built in Python, which would hold the GIL beside the forward.
    """

    worker_processes = True

    def __init__(self, block: dict, split: str, hit_fields: list[str], particle_fields: list[str],
                 max_hits: int | None = None, seed: int = 0, particle_sources: dict[str, str] | None = None):
        if split not in SPLITS:
            raise UserError(f"--split must be one of {', '.join(SPLITS)}, not '{split}'")
        self.block, self.split, self.seed = block, split, int(seed)
        self.hit_fields, self.particle_fields = list(hit_fields), list(particle_fields)
        self.max_hits = max_hits
        self.particle_sources = {f: str((particle_sources or {}).get(f, f)) for f in self.particle_fields}
        unknown = sorted(set(particle_sources or {}) - set(self.particle_fields))
        if unknown:
            raise UserError(f"data.particle_sources names '{unknown[0]}', which is not in data.particle_fields"
                            f"{did_you_mean(unknown[0], self.particle_fields)}")
        stage, attr = SPLITS[split]
        module = build_datamodule(block)
        quiet = io.StringIO()  # hepattn's datasets print when created; the library does not
        try:
            with contextlib.redirect_stdout(quiet):
                module.setup(stage)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"data module {block.get('class_path')}: cannot set up split '{split}': {first}") from exc
        self.dataset = getattr(module, attr, None)
        if self.dataset is None:
            raise UserError(f"data module {block.get('class_path')} has no {attr} after setup('{stage}')")
        self.path = f"{block.get('class_path', 'data module').rsplit('.', 1)[-1]} split '{split}'"
        self.event_id = np.arange(len(self.dataset), dtype=np.int64)
        self._hash = None
        if len(self):
            self.read(np.array([0]))  # missing fields fail here, before a command writes anything

    def __len__(self) -> int:
        return len(self.event_id)

    def _item(self, k: int) -> tuple[dict, dict]:
        with _compile_lock(), torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding per call
            torch.random.default_generator.manual_seed(self.seed * 1_000_003 + k)
            item = self.dataset[k]
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, dict) for x in item)):
            raise UserError(f"{self.path}: event {k} is not an (inputs, targets) pair of dicts")
        return item

    def _event(self, k: int) -> tuple[dict[str, np.ndarray], int, tuple]:
        """Event k checked and unpadded: ({hit field: float32 [n]}, n, (particle valid [P],
        {particle field: float32 [P]}, particle hits bool [P, n]))."""
        inputs, targets = self._item(k)
        if "hit_valid" not in inputs:
            raise UserError(f"{self.path}: event {k} has no hit_valid in its inputs (keys: {', '.join(inputs)})")
        valid = inputs["hit_valid"].reshape(-1).bool().numpy()
        if self.max_hits is not None and valid.sum() > self.max_hits:
            raise UserError(f"{self.path}: event {k} has {valid.sum()} hits, more than max_hits={self.max_hits}")
        hits = {}
        for name in self.hit_fields:
            if f"hit_{name}" not in inputs:
                raise UserError(f"{self.path}: event {k} has no hit field '{name}' (data.hit_fields); "
                                f"it has {', '.join(key[4:] for key in inputs if key.startswith('hit_'))}")
            values = inputs[f"hit_{name}"].reshape(-1).float().numpy()[valid]
            if not np.isfinite(values).all():
                raise UserError(f"{self.path}: hit field '{name}' is NaN or infinite in event {k}")
            hits[name] = values
        return hits, int(valid.sum()), self._particles(targets, valid, k)

    def read(self, indices) -> dict[str, torch.Tensor]:
        """Padded batch of the events `indices`, as `EventFile.read` returns it (same keys, dtypes, shapes)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"event index out of range [0, {len(self)}) in {self.path}")
        return self._pad(idx, [self._event(k) for k in idx.tolist()])

    def block_batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
        """As `EventFile.block_batches`; each event of the block is read from the data module once
        (its hit count is only known then), the block held in memory meanwhile."""
        from cachefeat.data.events import bucketed_batches

        events = [self._event(k) for k in range(start, stop)]
        counts = np.array([n for _, n, _ in events], dtype=np.int64)
        for local in bucketed_batches(counts, batch_size, seed=None):
            yield local, self._pad(start + local, [events[i] for i in local.tolist()])

    def _pad(self, idx: np.ndarray, events: list) -> dict[str, torch.Tensor]:
        B = idx.size
        M = max([n for _, n, _ in events] + [1])
        P = max([p[0].size for _, _, p in events] + [1])
        out = {"event_id": torch.from_numpy(self.event_id[idx].copy()),
               "hit_valid": torch.zeros(B, M, dtype=torch.bool),
               "particle_valid": torch.zeros(B, P, dtype=torch.bool),
               "particle_hit_valid": torch.zeros(B, P, M, dtype=torch.bool),
               "hit_particle_index": torch.full((B, M), -1, dtype=torch.int64)}
        for name in self.hit_fields:
            out[f"hit_{name}"] = torch.zeros(B, M)
        for name in self.particle_fields:
            out[f"particle_{name}"] = torch.zeros(B, P)
        for b, (hits, n, (pvalid, pfields, phits)) in enumerate(events):
            p = pvalid.size
            out["hit_valid"][b, :n] = True
            for name, values in hits.items():
                out[f"hit_{name}"][b, :n] = torch.from_numpy(values)
            out["particle_valid"][b, :p] = torch.from_numpy(pvalid)
            for name, values in pfields.items():
                out[f"particle_{name}"][b, :p] = torch.from_numpy(values)
            out["particle_hit_valid"][b, :p, :n] = torch.from_numpy(phits)
            out["hit_particle_index"][b, :n] = torch.from_numpy(np.where(phits.any(0), phits.argmax(0), -1))
        return out

    def _particles(self, targets: dict, hit_valid: np.ndarray, k: int):
        """(valid bool [P], {field: float32 [P]} with 0 in empty slots, hits bool [P, n_valid_hits])."""
        for key in ("particle_valid", "particle_hit_valid"):
            if key not in targets:
                raise UserError(f"{self.path}: event {k} has no {key} in its targets")
        valid = targets["particle_valid"].reshape(-1).bool().numpy()
        hits = targets["particle_hit_valid"].reshape(valid.size, -1).bool().numpy()[:, hit_valid]
        fields = {}
        for name in self.particle_fields:
            key = f"particle_{self.particle_sources[name]}"
            if key not in targets:
                raise UserError(f"{self.path}: event {k} has no {key} in its targets (data.particle_fields, "
                                "data.particle_sources)")
            values = targets[key].reshape(-1).float().numpy()
            if not np.isfinite(values[valid]).all():
                raise UserError(f"{self.path}: particle field '{name}' is NaN or infinite in event {k}")
            fields[name] = np.where(valid, values, 0.0).astype(np.float32)
        return valid, fields, hits & valid[:, None]

    def content_hash(self) -> str:
        """sha256 of the data module block, the split, the seed, the fields and, when the split's
        dataset reads a directory (`dirpath`), every file's relative path and bytes."""
        if self._hash is None:
            spec = {"module": self.block, "split": self.split, "seed": self.seed,
                    "hit_fields": self.hit_fields, "particle_sources": self.particle_sources}
            h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
            root = getattr(self.dataset, "dirpath", None)
            if root is not None and Path(root).is_dir():
                for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
                    h.update(str(path.relative_to(root)).encode())
                    with path.open("rb") as f:
                        for chunk in iter(lambda: f.read(1 << 24), b""):
                            h.update(chunk)
            self._hash = h.hexdigest()
        return self._hash

    def close(self) -> None:
        """Nothing to release (the dataset opens its files per item)."""

    def __enter__(self) -> DataModuleEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
