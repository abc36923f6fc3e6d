"""`qtale train`: routers (QTALE or the D-LLM baseline) on a base model -> a checkpoint folder."""
from __future__ import annotations

import argparse
import json

from .. import checkpoint, validate
from ..train import TrainConfig, dist_info, train
from ..validate import arg
from .common import print_table


HELP = {"target_ratio": "Omega",
        "full_every": "every Nth step runs every layer on the task/distillation loss alone, against the adapter's "
                      "drift on the all-layers path (0: never)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="embedded name or HF folder (default %(default)s)")
    p.add_argument("--data", nargs="+", required=True, help="LLM-Adapters JSON file(s) or plain text")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--method", choices=["qtale", "dllm"], default=d.method)
    p.add_argument("--loss", choices=["auto", "task", "distill"], default=d.loss)
    for name, kind in validate.TRAIN_KINDS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=arg(kind, flag), default=getattr(d, name), help=HELP.get(name))
    p.add_argument("--lora-lr", type=arg(validate.positive, "--lora-lr"), default=None,
                   help="LoRA learning rate (default: --lr)")
    p.add_argument("--max-examples", type=arg(validate.positive_int, "--max-examples"), default=None)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base model (FSDP2)")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the distillation teacher's outputs per batch in DIR and reuse them (another "
                        "method or a rerun on the same data, batch shape and seed skips the teacher's forward)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="base weights (bfloat16 for large models on GPUs; routers stay float32)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    fields = TrainConfig.__dataclass_fields__
    out = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}),
                resume=args.resume, force=args.force)
    if dist_info()[0] != 0:  # under torchrun only rank 0 reports
        return 0
    meta = checkpoint.read_meta(out)
    summary = {"checkpoint": str(out), "steps": meta["training"]["steps_done"],
               "final": meta["training"]["final_losses"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(f"trained {out}", ["metric", "value"], [[k, v] for k, v in summary["final"].items()])
    return 0
