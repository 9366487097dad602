"""Train a hepattn stage 1 for a few steps with hepattn's own training code (its LightningCLI,
`ModelWrapper` and the config's data module), as `run_tracking.py fit` does, and print the
path of the Lightning checkpoint it wrote.

    python tests/fit_hepattn_stage1.py CACHEFEAT_CONFIG.yaml LOG_DIR [MAX_STEPS]

The hepattn config is assembled from the cachefeat config's `model` and `data.module` blocks,
with torch attention (CPU). hepattn must be importable (PYTHONPATH).
"""

import sys
from pathlib import Path

import yaml


def hepattn_config(config: dict, log_dir: Path, max_steps: int) -> dict:
    model = yaml.safe_load(yaml.safe_dump(config["model"]))
    model["init_args"]["encoder"]["init_args"]["attn_type"] = "torch"
    return {
        "seed_everything": 42,
        "name": "cachefeat-test",
        # One short epoch, so the validation that the checkpoint callback monitors runs.
        "data": {**config["data"]["module"]["init_args"], "batch_size": 8, "num_train": 8 * max_steps, "num_val": 8},
        "trainer": {
            "max_steps": max_steps,
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "default_root_dir": str(log_dir),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {"class_path": "hepattn.callbacks.SaveConfig"},
                {"class_path": "hepattn.callbacks.Checkpoint", "init_args": {"monitor": "val/loss", "mode": "min"}},
            ],
        },
        "model": {
            "optimizer": "Lion",
            "lrs_config": {"initial": 1e-5, "max": 5e-5, "end": 1e-5, "pct_start": 0.05,
                           "skip_scheduler": False, "weight_decay": 1e-5},
            "mtl": False,
            "model": model,
        },
    }


def main() -> None:
    from hepattn.experiments.atlas_muon.data import AtlasMuonDataModule
    from hepattn.models.wrapper import ModelWrapper
    from hepattn.utils.cli import CLI

    config_path, log_dir = Path(sys.argv[1]), Path(sys.argv[2])
    max_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    log_dir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(config_path.read_text())
    fit_config = log_dir / "fit.yaml"
    fit_config.write_text(yaml.safe_dump(hepattn_config(config, log_dir, max_steps), sort_keys=False))
    CLI(model_class=ModelWrapper, datamodule_class=AtlasMuonDataModule, args=["fit", "--config", str(fit_config)],
        parser_kwargs={"default_env": True})
    ckpts = sorted(log_dir.glob("*/ckpts/*.ckpt"))
    if not ckpts:
        raise SystemExit(f"no checkpoint written under {log_dir}")
    print(ckpts[-1])


if __name__ == "__main__":
    main()
