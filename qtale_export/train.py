"""Router training: task or self-distillation loss + execution-ratio loss (+ QTALE's entropy term).

Runs as is on one process, or under `torchrun` (DDP; gloo on CPU, nccl on GPUs). The data order and
the Gumbel noise are functions of (seed, step), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, safe_write, validate
from .data import Example, collate, load_examples
from .errors import QtaleError
from .routing import RoutedModel, RouterConfig
from .teacher import TeacherCache

STATE = "train_state.json"
OPTIMIZER = "optimizer.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)
    out: str = "runs/qtale"
    method: str = "qtale"  # qtale: + entropy regulariser; dllm: the D-LLM baseline (lambda2 = 0)
    loss: str = "auto"  # task | distill | auto (task for instruction JSON, distill for text)
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    seq_len: int = 256
    target_ratio: float = 0.5  # Omega
    lambda1: float = 1.0  # ratio loss weight
    lambda1_warmup: int = 0  # steps of linear warm-up of lambda1
    lambda2: float = 0.1  # entropy weight (qtale only)
    full_every: int = 0  # every Nth step runs every layer, distillation only (0: never); see _train
    tau: float = 1.0
    lora_rank: int = 0
    lora_lr: float | None = None  # LoRA factors' learning rate (None: lr); routers train at lr
    seed: int = 0
    save_every: int = 50
    max_examples: int | None = None
    first_routed_layer: int = 2
    keep_initial: int = 2
    router_hidden: int = 64
    fsdp: bool = False  # shard the base model across processes (torchrun) instead of replicating it
    dtype: str = "float32"  # base weights: float32 | bfloat16 (large models on GPUs); routers stay fp32
    teacher_cache: str | None = None  # folder keeping the distillation teacher's outputs per batch (teacher.py)

    def validate(self) -> None:
        if self.method not in ("qtale", "dllm"):
            raise QtaleError(f"unknown method '{self.method}' (qtale or dllm)")
        if self.loss not in ("auto", "task", "distill"):
            raise QtaleError(f"unknown loss '{self.loss}' (task, distill or auto)")
        if not 0.0 < self.target_ratio <= 1.0:
            raise QtaleError(f"invalid target ratio {self.target_ratio}: must be in (0, 1]")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 16:
            raise QtaleError("steps must be >= 0, batch size and grad accumulation >= 1, seq_len >= 16")
        if not self.data:
            raise QtaleError("no training data given (--data FILE ...)")
        if self.dtype not in ("float32", "bfloat16"):
            raise QtaleError(f"unknown dtype '{self.dtype}' (float32 or bfloat16)")
        if self.fsdp and self.lora_rank:
            raise QtaleError("--fsdp with --lora-rank is not supported yet: train LoRA with DDP")
        validate.train_numbers(self)


# ---- losses --------------------------------------------------------------------------------
def ratio_loss(gates: list[torch.Tensor], valid: torch.Tensor, target: float) -> torch.Tensor:
    """L1 between each token's mean execution over routed layers and the target ratio Omega."""
    per_token = torch.stack(gates).mean(0)
    return ((per_token - target).abs() * valid).sum() / valid.sum().clamp(min=1)


def router_entropy(router_logits: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the execute/skip distribution over valid tokens and routed layers."""
    logp = torch.stack(router_logits).log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1).mean(0)
    return (ent * valid).sum() / valid.sum().clamp(min=1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, mean over valid tokens."""
    kl = F.kl_div(student.float().log_softmax(-1), teacher.float().log_softmax(-1),
                  log_target=True, reduction="none").sum(-1)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def path_stats(gates: list[torch.Tensor], valid: torch.Tensor) -> dict:
    """Realized ratio and distinct execution paths per 1k tokens in a batch."""
    g = torch.stack([x.detach() > 0.5 for x in gates], -1)[valid]  # [tokens, routed layers]
    n = max(g.shape[0], 1)
    return {"realized_ratio": float(g.float().mean()) if g.numel() else 0.0,
            "paths_per_1k": torch.unique(g, dim=0).shape[0] * 1000.0 / n}


# ---- distributed ---------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def device() -> torch.device:
    """This process's accelerator under torchrun (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    rank, world = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend)
    return rank, world


# ---- model and state ------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> RoutedModel:
    from .api import new_routed

    model = new_routed(cfg.model, RouterConfig(first_routed_layer=cfg.first_routed_layer,
                                               keep_initial=cfg.keep_initial,
                                               router_hidden=cfg.router_hidden, tau=cfg.tau),
                       dtype=getattr(torch, cfg.dtype))
    model.to(device())
    for p in model.base.parameters():
        p.requires_grad_(False)
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model.base = get_peft_model(model.base, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                           target_modules=targets, lora_dropout=0.0))
    return model


def shard(model: RoutedModel) -> None:
    """FSDP2: shard every module the routed forward calls as a unit (each projection, each MLP),
    then the rest (embeddings, norms, head, routers) at the root. The routed layer calls the HF
    submodules directly, not the decoder layer's forward, so the layer itself cannot be the unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.decoder.layers:
        fully_shard(layer.mlp)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fully_shard(getattr(layer.self_attn, name))
    fully_shard(model)


def optimizer_state(model: RoutedModel, optimizer, sharded: bool) -> dict:
    """Full optimizer state (a collective under FSDP: every rank must call it)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: RoutedModel, optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_resume_state(model: RoutedModel, out: Path) -> dict:
    """Routers, LoRA and trainer state of an interrupted run in `out`."""
    meta = checkpoint.read_meta(out)
    checkpoint.verify_files(out, meta)
    model.routers.load_state_dict(checkpoint.load_routers(out))
    adapter = out / checkpoint.ADAPTER / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model.base, load_file(adapter))
    state = json.loads((out / STATE).read_text())
    return state


def save_state(model: RoutedModel, cfg: TrainConfig, out: Path, step: int, opt_state: dict,
               routers: dict, losses: dict, started: float) -> None:
    tmp = safe_write.staging_dir(out.parent / "state")
    try:
        torch.save(opt_state, tmp / OPTIMIZER)  # tensors + numbers: loadable with weights_only=True
        (tmp / STATE).write_text(json.dumps({"step": step, "elapsed_s": time.time() - started}))
        extra = {OPTIMIZER: tmp / OPTIMIZER, STATE: tmp / STATE}
        logs = {LOG: out / LOG} if (out / LOG).is_file() else {}
        training = {"config": asdict(cfg), "steps_done": step, "final_losses": losses,
                    "data": [str(Path(d).name) if Path(d).is_file() else d for d in cfg.data],
                    "data_paths": cfg.data, "data_sha256": data_digests(cfg.data),
                    "ratio_reached": ratio_reached(out / LOG, cfg.target_ratio),
                    "torch": torch.__version__}
        checkpoint.save(model, out, training=training, extra_files=extra, logs=logs, routers=routers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_digests(paths: list[str]) -> dict[str, str]:
    """sha256 of each training source's text (files and named corpora), for provenance."""
    return dict(_digests(tuple(paths)))


@functools.lru_cache(maxsize=4)
def _digests(paths: tuple[str, ...]) -> tuple:
    from . import corpus
    from .data import read_source

    out = {}
    for d in paths:
        src = read_source(d)
        out[d] = corpus.sha256(src if isinstance(src, str) else json.dumps(src, sort_keys=True))
    return tuple(out.items())


RATIO_TOLERANCE = 0.03


def ratio_reached(log: Path, target: float, tail: float = 0.1) -> dict | None:
    """Mean realized training ratio over the last `tail` of the logged steps vs the target Omega."""
    if not log.is_file():
        return None
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if not r.get("all_layers")]  # full_every steps run every layer by design
    if not rows:
        return None
    last = rows[-max(1, int(len(rows) * tail)):]
    mean = sum(r["realized_ratio"] for r in last) / len(last)
    return {"mean_last": round(mean, 4), "steps": len(last), "target": target,
            "within": abs(mean - target) <= RATIO_TOLERANCE, "tolerance": RATIO_TOLERANCE}


def teacher_key(cfg: TrainConfig, model: RoutedModel, world: int) -> dict:
    """What the teacher's output for (step, micro-batch, rank) depends on: base weights and dtype,
    the data (by content), the batch shape and order. Not the routers, LoRA or loss weights."""
    return {"base": getattr(model, "base_info", None) or cfg.model, "dtype": cfg.dtype, "data": data_digests(cfg.data),
            "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "max_examples": cfg.max_examples, "seed": cfg.seed, "world": world, "torch": torch.__version__}


# ---- the loop -------------------------------------------------------------------------------
def batch_for(examples: list[Example], step: int, micro: int, cfg: TrainConfig, rank: int, world: int,
              pad_id: int) -> dict[str, torch.Tensor]:
    """Deterministic batch: sample k of the run is perm(seed, epoch)[k mod N]."""
    n = len(examples)
    first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    picked = []
    for k in range(first, first + cfg.batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        picked.append(examples[int(perm[i])])
    return collate(picked, pad_id)


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Train into cfg.out. With `force` over an existing checkpoint the run is built in a pid-tagged
    folder beside it, which replaces it only once the run has finished (the old one survives a
    failure or a kill)."""
    cfg.validate()
    final, work = Path(cfg.out), None
    if force and not resume and final.exists() and dist_info()[0] == 0:
        safe_write.check_output(final, force=True, sources=[cfg.model, *cfg.data], kind="checkpoint")
        work = safe_write.staging_dir(final)
    try:
        _train(cfg, resume=resume, force=force, progress=progress, work=work)
        if work is not None:
            safe_write.publish(work, final)
        return final
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _optimizer(model, cfg: TrainConfig):
    """AdamW over the routers (cfg.lr) and, where trained, the LoRA factors (cfg.lora_lr)."""
    router_params = [p for p in model.routers.parameters() if p.requires_grad]
    ids = {id(p) for p in router_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": router_params, "lr": cfg.lr}]
    if other:  # LoRA factors: a base-model update wants a far smaller step than fresh routers
        groups.append({"params": other, "lr": cfg.lora_lr if cfg.lora_lr is not None else cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _accumulate(cfg: TrainConfig, model, runner, teachers, examples, pad_id: int, step: int, rank: int, world: int,
                loss_kind: str, all_layers: bool, lambda1: float, lambda2: float) -> dict[str, float]:
    """One optimizer step's gradients over cfg.grad_accum micro-batches; returns the mean losses and
    path statistics."""
    sums: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        b = {k: v.to(device()) for k, v in batch_for(examples, step, micro, cfg, rank, world, pad_id).items()}
        valid = b["attention_mask"].bool()
        vf = valid.float()
        o = runner(b["input_ids"], attention_mask=b["attention_mask"],
                   labels=b["labels"] if loss_kind == "task" else None, execute_all=all_layers)
        if loss_kind == "task":
            main = o.loss
        else:
            teacher = model.head(teachers.hidden(model, b, step, micro, rank))
            main = distill_loss(o.logits, teacher, vf)
        r_loss = ratio_loss(o.gates, vf, cfg.target_ratio)
        ent = router_entropy(o.router_logits, vf)
        total = main if all_layers else main + lambda1 * r_loss - lambda2 * ent
        (total / cfg.grad_accum).backward()
        stats = path_stats(o.gates, valid)
        for k, v in {"loss": total.item(), loss_kind + "_loss": main.item(), "ratio_loss": r_loss.item(),
                     "entropy": ent.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
    return sums


def _train(cfg: TrainConfig, *, resume: bool, force: bool, progress: bool, work: Path | None) -> Path:
    out = Path(cfg.out)
    rank, world = init_distributed()
    if out.exists() and not resume and not force:
        raise QtaleError(f"output folder {out} exists: pass --resume to continue it or --force to overwrite")
    if not resume:  # never train into (or over) the base model's folder or the data
        safe_write.check_output(out, force=True, sources=[cfg.model, *cfg.data], kind="checkpoint")
    if resume and not (out / STATE).is_file():
        raise QtaleError(f"cannot resume: {out} holds no interrupted run ({STATE} missing)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    tokenizer = model.tokenizer
    examples = load_examples(cfg.data, tokenizer, cfg.seq_len, limit=cfg.max_examples)
    instruction = any(e.labels[0] == -100 for e in examples[:50])
    loss_kind = cfg.loss if cfg.loss != "auto" else ("task" if instruction else "distill")
    lambda2 = cfg.lambda2 if cfg.method == "qtale" else 0.0
    start = 0
    if resume:
        start = load_resume_state(model, out)["step"]
        if rank == 0 and (out / LOG).is_file():  # drop log lines of steps that were not saved
            lines = (out / LOG).read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
            (out / LOG).write_text("".join(ln + "\n" for ln in kept))
    if work is not None:
        out = work  # --force: the old checkpoint stays in place until this run has finished
    sharded = cfg.fsdp and world > 1
    runner = model
    if sharded:
        shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model)
    optimizer = _optimizer(model, cfg)
    if resume:
        load_optimizer_state(model, optimizer, torch.load(out / OPTIMIZER, weights_only=True, map_location="cpu"),
                             sharded)
    teachers = TeacherCache(cfg.teacher_cache, teacher_key(cfg, model, world))
    model.train()
    started = time.time()
    losses: dict = {}
    bar = tqdm(range(start, cfg.steps), desc=f"train {cfg.method}", disable=not progress or rank > 0,
               initial=start, total=cfg.steps)
    for step in bar:
        torch.manual_seed(cfg.seed * 1000003 + step * world + rank)  # Gumbel noise, resumable
        warm = 1.0 if cfg.lambda1_warmup <= 0 else min(1.0, (step + 1) / cfg.lambda1_warmup)
        lambda1 = cfg.lambda1 * warm
        # an all-layers step: the adapter is trained for routed execution only and otherwise drifts
        # from the base on the all-layers path (the high-ratio end); no router loss on such a step
        all_layers = cfg.full_every > 0 and (step + 1) % cfg.full_every == 0
        sums = _accumulate(cfg, model, runner, teachers, examples, tokenizer.pad_token_id, step, rank, world,
                           loss_kind, all_layers, lambda1, lambda2)
        if not all(math.isfinite(v) for v in sums.values()):
            raise QtaleError(f"training diverged at step {step} (non-finite loss); lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses = {k: round(v, 6) for k, v in sums.items()}
        bar.set_postfix(loss=losses["loss"], ratio=round(losses["realized_ratio"], 3),
                        ent=round(losses["entropy"], 3))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / LOG, "a") as f:
                f.write(json.dumps({"step": step + 1, "lambda1": lambda1, "lambda2": lambda2,
                                    "time_s": round(time.time() - started, 2), **losses,
                                    **({"all_layers": True} if all_layers else {})}) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            # gathering full state is a collective under FSDP: every rank takes part
            opt_state, routers = optimizer_state(model, optimizer, sharded), model.router_state()
            if rank == 0:
                save_state(model, cfg, out, step + 1, opt_state, routers, losses, started)
    if cfg.steps == start and not resume:
        opt_state, routers = optimizer_state(model, optimizer, sharded), model.router_state()
        if rank == 0:
            save_state(model, cfg, out, start, opt_state, routers, losses, started)
    if world > 1:
        torch.distributed.barrier()
    model.eval()
    return out
