"""`cachefeat pretrain`: stage-1 training (MaskFormer), optionally joint with the regression head."""

from __future__ import annotations

from pathlib import Path

from cachefeat.cli import add_set_option, example_epilog, require_positive
from cachefeat.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the stage-1 MaskFormer (or backbone + head jointly)",
        description="Stage-1 training with Accelerate: AdamW, one-cycle schedule, validation with tracking "
        "metrics every epoch, best/last checkpoints. Multi-GPU: accelerate launch -m cachefeat pretrain ...",
        epilog=example_epilog(
            "cachefeat pretrain --config configs/muon.yaml --train train.h5 --val val.h5 --output runs/stage1",
            "cachefeat pretrain --config configs/muon.yaml --train train.h5 --val val.h5 --output runs/joint --joint",
            "cachefeat pretrain --config configs/muon.yaml --train train.h5 --val val.h5 --output runs/joint-ft "
            "--joint --init data/muon_stage1.ckpt --epochs 4",
        ),
    )
    p.add_argument("--config", required=True, help="YAML config (model, data, pretrain sections)")
    p.add_argument("--train", required=True, help="training events (HDF5 from `cachefeat simulate`)")
    p.add_argument("--val", required=True, help="validation events (HDF5)")
    p.add_argument("--output", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--epochs", type=int, help="override pretrain.epochs")
    p.add_argument("--batch-size", type=int, help="override pretrain.batch_size")
    p.add_argument("--seed", type=int, help="override pretrain.seed")
    p.add_argument("--joint", action="store_true", default=None,
                   help="train the regression head together with the backbone (the joint baseline)")
    p.add_argument("--init", metavar="STAGE1.ckpt",
                   help="start the backbone from this checkpoint's weights (pretrain.init), e.g. to fine-tune "
                        "a trained stage 1 jointly with a fresh head")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add_set_option(p, "pretrain.lr=1e-3")
    p.set_defaults(func=run, outputs=("output",))


def run(args) -> int:
    from cachefeat.cli import load_checked_config
    from cachefeat.training.pretrain import pretrain

    config = load_checked_config(args.config, args.set, require=("data", "model"))
    require_positive(args, "epochs", "batch_size")
    out = Path(args.output)
    if not args.resume and (out / "stage1_last.ckpt").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --output")
    if args.init is not None and not Path(args.init).is_file():
        raise UserError(f"--init checkpoint not found: {args.init}")
    if args.resume and not out.is_dir():
        raise UserError(f"nothing to resume: {out} does not exist")
    pretrain(config, args.train, args.val, out, epochs=args.epochs, batch_size=args.batch_size,
             joint=args.joint, resume=args.resume, seed=args.seed, device=args.device, init=args.init)
    return 0
