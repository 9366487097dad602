"""The random-init row of STAGE1.md: pretrain's `validate()` on a freshly built configs/trackml.yaml
MaskFormer (torch.manual_seed(pretrain.seed) before building it, as `cachefeat pretrain` does).

    python benchmarks/results/cpu-trackml/random_init_val.py configs/trackml.yaml val.h5 RUN_DIR OUT.json
"""

import json
import sys
import time

import torch

from cachefeat.config import load_config, section
from cachefeat.data.events import EventFile
from cachefeat.training.loop import make_accelerator
from cachefeat.training.pretrain import ALLOWED, DEFAULTS, Stage1Step, build_stage1, validate

config_path, val_path, run_dir, out_path = sys.argv[1:5]
config = load_config(config_path)
settings = section(config, "pretrain", DEFAULTS, ALLOWED)
data = config["data"]
accelerator = make_accelerator(run_dir, device="cpu")
torch.manual_seed(settings["seed"])
val = EventFile(val_path, data["hit_fields"], data["particle_fields"], data.get("max_hits"))
backbone, head = build_stage1(config, False)
step = Stage1Step(backbone, head, data["hit_fields"], data["particle_fields"], settings["head_loss_weight"])
start = time.perf_counter()
metrics = validate(step, val, settings["batch_size"], accelerator)
metrics["seconds"] = time.perf_counter() - start
with open(out_path, "w") as f:
    json.dump(metrics, f, indent=1)
