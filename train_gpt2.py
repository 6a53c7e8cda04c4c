"""Train GPT-2 on FineWeb-Edu token shards: the reference recipe, DDP or FSDP2, exact resume, honest metrics.

    uv run train_gpt2.py --demo                                  # CPU, minutes, no network (README: measured)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the reference run (124M, 10B tokens)

With no flags this is the reference run: GPT-2 124M, 524,288 tokens per step (64 x 1024 per
micro-batch, gradient accumulation derived from the world size), AdamW (0.9, 0.95) lr 6e-4 with 715
warmup steps and cosine decay to 10% at step 19,073, bf16 autocast, torch.compile on CUDA.

A run is resumable at any moment: checkpoints (model, optimizer, data position, RNG states, metrics
length) are written atomically to <log dir>/model_{step:05d}.pt (a sharded folder model_{step:05d}/
under --parallel fsdp); `--resume auto` continues from the newest one, at any world size. SIGTERM /
SIGUSR1 (SLURM before a time limit) save a checkpoint at the next step boundary and exit 0; so does
the first Ctrl-C (exit 130; a second one aborts at once). A step whose loss
spikes far above the recent ones (a bad batch) is not applied (--spike-guard, spike_guard.py).
Metrics: <log dir>/metrics.jsonl, one JSON object per line (schema in the README).

Reading order: the config and its presets, the schedule and optimizer, `build_run` (everything a run
needs) and `train_step`, checkpoints and resume, evaluation, then `train` (the loop) and `main`.
"""

from __future__ import annotations

import sys

import cli
from train_config import (
    DEMO_SHARD_SIZE,
    RESUME_FLAGS,
    RESUME_REFUSED,
    RUN_SETTINGS,
    TrainConfig,
    parse_args,
)

if __name__ == "__main__":
    cli.parse_first(lambda argv: parse_args(argv, description=__doc__))  # --help, a bad flag: before torch loads

import math
import os
import random
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import checkpoint
import core_eval
import fileio
import memory
import metrics as metrics_log
import runtime
from cli import UserError
from dataloader import TrainLoader, ValLoader, describe_source
from hellaswag_eval import evaluate_hellaswag, load_examples
from model import BLOCK_MATRICES, GPT, GPTConfig, generate
from muon import CombinedOptimizer, Muon
from parallel import Parallel, parallelize
from spike_guard import SpikeGuard, TooManySkips
from tokenizer import EOT_TOKEN, get_encoding, token_byte_lengths

__all__ = ["GPT", "GPTConfig", "TrainConfig", "build_run", "train_step", "main"]  # `from train_gpt2 import GPT` works

REPO = Path(__file__).resolve().parent
DEMO_CORPUS = REPO / "assets" / "demo" / "fineweb_demo.parquet"


# ---- schedule and optimizer ---------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then either cosine decay to min_lr at max_steps
    (reference) or, with wsd, max_lr until the last decay_frac of the steps and a linear decay to
    min_lr there; min_lr after max_steps."""
    min_lr = cfg.max_lr * cfg.min_lr_frac
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_frac * cfg.max_steps))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return cfg.max_lr
        return min_lr + (cfg.max_lr - min_lr) * (cfg.max_steps - step) / decay_steps  # max_lr -> min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices and embeddings (2+ dims); never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device):
    """AdamW over everything (reference), or Muon over the block matrices + AdamW over the rest.
    Each param group may carry `lr_scale`: set_learning_rates gives it schedule(step) * lr_scale."""
    fused = cfg.fused_adamw and device.type == "cuda"  # one kernel for all parameters on GPU
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
        )
    matrices = {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("transformer.h.") and name.endswith(BLOCK_MATRICES)
    }
    muon_ids = {id(p) for p in matrices.values()}
    rest = torch.nn.ParameterList([p for p in model.parameters() if id(p) not in muon_ids])
    adamw = torch.optim.AdamW(
        param_groups(rest, cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )
    lr_scale = cfg.muon_lr / cfg.max_lr  # Muon follows the same schedule shape at its own peak
    muon = Muon(
        [
            # c_attn is q, k and v stacked (3C, C): three matrices, orthogonalised separately.
            {
                "params": [p for n, p in matrices.items() if n.endswith("attn.c_attn.weight")],
                "split": 3,
                "lr_scale": lr_scale,
            },
            {"params": [p for n, p in matrices.items() if not n.endswith("attn.c_attn.weight")], "lr_scale": lr_scale},
        ],
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
    )
    return CombinedOptimizer(adamw=adamw, muon=muon)


def set_learning_rates(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


# ---- everything a run needs, and one optimizer step ---------------------------------------------
@dataclass
class Run:
    """What one training run holds, built once by `build_run` (the trainer, bench/throughput.py and the tests)."""

    cfg: TrainConfig
    dist_info: runtime.DistInfo
    model: GPT  # the module itself (under FSDP2: its parameters are this rank's shards)
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    parallel: Parallel  # how the model is spread over ranks (the seam: one process, DDP or FSDP2)
    train_model: torch.nn.Module  # what train_step calls (compiled, wrapped for the ranks)
    eval_model: torch.nn.Module  # what evaluation calls (compiled)
    train_loader: TrainLoader
    val_loader: ValLoader | None
    autocast: object  # the forward passes' precision context (runtime.Precision: bf16 on CUDA)
    grad_accum: int  # micro-steps per optimizer step on each rank
    spike_guard: SpikeGuard  # decides whether a step's update is applied (off: always)
    log_dir_lock: fileio.FolderLock | None = None  # the trainer's hold on --log-dir (rank 0)
    micro_steps_done: int = 0  # by this process: what the first step's progress line reports

    @property
    def compiled(self) -> bool:
        """Whether torch.compile runs the training step: the whole model, or block by block (FSDP2)."""
        return any(
            isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None)
            for m in self.train_model.modules()
        )

    @property
    def fused_adamw(self) -> bool:
        """Whether AdamW runs as one fused kernel (CUDA only)."""
        return any(group.get("fused") for group in self.optimizer.param_groups)

    def say(self, text: str) -> None:
        """A line for the human on stdout, once per job (the main rank)."""
        if self.dist_info.is_main:
            print(text)


def build_model(cfg: TrainConfig, device: torch.device, is_main: bool) -> GPT:
    """The model, made on `device` (initialised there: no host copy, seconds less for gpt2-xl on a
    GPU; the same init on every rank, from --seed)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = checkpoint.load_hf_model(cfg.init_from, flag="--init-from", device=device)
        if is_main:
            print(f"initialised from Hugging Face {cfg.init_from}")
    else:
        with torch.device(device):
            model = GPT(cfg.model_config)
    model.loss_chunk_rows = cfg.loss_chunk_rows
    model.activation_checkpointing = cfg.activation_checkpointing
    model.attention_backend = cfg.attn_backend
    return model


def build_run(cfg: TrainConfig, dist_info: runtime.DistInfo, train_loader=None) -> Run:
    """Model, optimizer, the ranks' wrapping, loaders and precision for `cfg` on this process.
    `train_loader`: anything with next_batch() (bench/throughput.py's synthetic tokens); default: the shards."""
    cfg.check_world_size(dist_info.world_size)
    device = dist_info.device
    runtime.configure_device(device)
    if train_loader is None:
        train_loader = TrainLoader(
            cfg.data_dir,
            cfg.micro_batch_size,
            cfg.seq_len,
            dist_info.rank,
            dist_info.world_size,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            pin_memory=device.type == "cuda",
        )
    val_loader = (
        ValLoader(cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_tokens, dist_info.rank, dist_info.world_size)
        if cfg.val_every
        else None
    )
    model = build_model(cfg, device, dist_info.is_main)
    precision = runtime.precision(device, cfg.precision)
    parallel = parallelize(dist_info, cfg.parallel, cfg.ddp_bucket_mb, precision.dtype)
    # Wrapped first: FSDP2 replaces the parameters by their shards, which the optimizer must hold.
    train_model, eval_model = parallel.prepare(model, cfg.compile, cfg.compile_mode, cfg.compile_on_cpu)
    optimizer = make_optimizer(model, cfg, device)
    return Run(
        cfg,
        dist_info,
        model,
        optimizer,
        parallel,
        train_model,
        eval_model,
        train_loader,
        val_loader,
        precision.autocast(),
        cfg.grad_accum_steps(dist_info.world_size),
        SpikeGuard(cfg.spike_guard, cfg.spike_guard_norm, cfg.spike_window, cfg.spike_warmup),
    )


class StepResult(NamedTuple):
    loss: torch.Tensor  # () this rank's mean loss over its micro-batches, on the device
    grad_norm: torch.Tensor  # () the global gradient norm before clipping, on the device
    lr: float
    skipped: str | None  # why the spike guard refused this update (None: applied)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step: grad_accum micro-steps (gradients reduced across ranks on the last only),
    clip to the global norm, then the optimizer (AdamW, or Muon + AdamW) unless the spike guard
    refuses the update. Without the guard nothing waits for the device (no host sync); with it, one
    small all-reduce of the loss and a host sync decide, the same on every rank: the decision must be
    known before optimizer.step(), so the host waits for the backward (the one sync of a step that
    is not a log step; `--spike-guard 0` removes it, bench/throughput.py measures the difference)."""
    device = run.dist_info.device
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(run.grad_accum):
        x, y = run.train_loader.next_batch()  # (B, T) int64 each, pinned on CUDA
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with run.parallel.gradient_sync(run.train_model, micro_step == run.grad_accum - 1):
            with run.autocast:
                _, loss = run.train_model(x, y)
            loss = loss / run.grad_accum  # the step's loss is the mean over its micro-batches
            loss_accum += loss.detach()
            loss.backward()
        run.micro_steps_done += 1
    grad_norm = run.parallel.clip_grad_norm_(run.model, run.cfg.grad_clip)
    lr = learning_rate(step, run.cfg)
    skipped = None
    if run.spike_guard.enabled:
        both = run.parallel.all_reduce(torch.stack([loss_accum, grad_norm.to(loss_accum.dtype)]))
        mean_loss, norm = (both / run.dist_info.world_size).tolist()  # the norm is already global: sum / ranks = it
        if not (
            math.isfinite(mean_loss) and math.isfinite(norm)
        ):  # diverging weights, far more often than one bad batch
            raise Diverged(
                f"the loss or gradient norm stopped being finite at step {step} (loss {mean_loss}, norm "
                f"{norm}): stopping before its update. The last good checkpoint in {run.cfg.log_dir} is "
                "untouched; lower --max-lr or resume from it"
            )
        try:
            skipped = run.spike_guard.check(loss=mean_loss, grad_norm=norm)
        except TooManySkips as e:
            fix = (
                "the loss stopped being finite: lower --max-lr or resume from it"
                if e.nonfinite
                else "check the data and --max-lr, or raise --spike-guard"
            )
            raise Diverged(
                f"{e}; stopping at step {step}. The last good checkpoint in {run.cfg.log_dir} is untouched; {fix}"
            ) from None
    if skipped is None:
        set_learning_rates(run.optimizer, lr)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_accum, grad_norm, lr, skipped)


# ---- checkpoints and resume ---------------------------------------------------------------------
# A checkpoint is the run's state as one dict: the weights and optimizer state (written by the
# parallel seam: one file, or every rank's shards), a header that says which run it belongs to and
# where it stopped, and one entry per stateful part below. Each part gives its own state
# (state_dict) and takes it back (load_state_dict); what may resume is decided in ONE place,
# `resume_problem`. A new piece of run state is one line in `stateful_parts`.
class RandomState:
    """Every random state a run draws from. The CUDA one only when the run is on a GPU: asking for it
    otherwise creates a CUDA context on GPU 0 for every rank of a --device cpu run on a GPU host."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "numpy": {
                "key": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def stateful_parts(run: Run, log: metrics_log.MetricsLog | None) -> dict:
    """{checkpoint key: part}: everything besides the weights and the optimizer that a resumed run
    needs to continue exactly as the uninterrupted one."""
    return {
        "loader": run.train_loader,  # the data position (rows read, any world size)
        "rng": RandomState(run.dist_info.device),
        "spike_guard": run.spike_guard,  # its history decides the next steps' skips
        "metrics": log,  # the log's length: a resume cuts it back to this
    }


class Diverged(Exception):
    """The loss or the weights stopped being finite: nothing more may be trained or saved."""


class CheckpointNotWritten(Exception):
    """A checkpoint could not be written (full disk, quota, permissions): every rank stops."""


def save_checkpoint(
    run: Run, log: metrics_log.MetricsLog, stem: Path, *, step: int, evals_done: bool, keep: int | None
) -> Path:
    """The one writer, called on every rank; the seam decides who writes what (one model_NNNNN.pt
    from the main rank, or every rank its shards of a model_NNNNN/ folder). Refuses to save weights
    that are not finite (a checkpoint is always a point a run can continue from)."""
    if run.parallel.count_nonfinite(run.model):
        raise Diverged(f"weights are not finite at step {step}: not saving them")
    state = {
        "format": checkpoint.FORMAT_VERSION,
        "model_config": run.model.model_config_dict(),
        "config": asdict(run.cfg),
        "step": step,  # optimizer steps completed
        "evals_done": evals_done,  # were step's val/HellaSwag/sample logged before this save?
        **{name: part.state_dict() for name, part in stateful_parts(run, log).items()},
    }
    failure, path = None, run.parallel.checkpoint_path(stem)
    try:
        run.parallel.save_checkpoint(run.model, run.optimizer, state, stem, keep)
    except OSError as e:  # the temp file is gone, the previous checkpoints are untouched
        failure = e
    # Every rank learns whether the write failed, so all stop together with one clear line instead
    # of the others dying of a vanished peer at the next collective.
    failed = run.parallel.all_reduce(torch.full((), float(failure is not None), device=run.dist_info.device))
    if failed.item():
        raise CheckpointNotWritten(checkpoint_failure_message(path, failure))
    return path


def load_checkpoint(ckpt: dict, run: Run, log: metrics_log.MetricsLog) -> None:
    """The one reader, the mirror of save_checkpoint: weights and optimizer (any kind of checkpoint,
    any world size and strategy), then each stateful part its own state."""
    checkpoint.load_training_state(ckpt, run.model, run.optimizer)
    for name, part in stateful_parts(run, log).items():
        part.load_state_dict(ckpt[name])


def checkpoint_failure_message(path: Path, e: OSError | None) -> str:
    if e is None:
        return f"the main rank could not write {path}"
    newest = checkpoint.paths(path.parent)
    kept = (
        f"{newest[0][1]} is intact and `--resume auto` continues from it"
        if newest
        else "no earlier checkpoint exists, so a rerun starts from step 0"
    )
    size = f" (a checkpoint takes {checkpoint.size_bytes(newest[0][1]) / 2**20:,.0f} MiB)" if newest else ""
    room = f"free space on that disk{size}, or move the run to a bigger one (--log-dir)"
    if fileio.is_disk_full(e):
        return (
            f"no room to write {path} ({e.strerror}); nothing else was lost: {kept}. Fix: {room}, "
            "then rerun the same command"
        )
    return (
        f"cannot write {path} ({e.strerror}): {kept}. Fix the folder's permissions or choose another --log-dir, "
        "then rerun"
    )


def config_changes(saved: dict, cfg: TrainConfig, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """{setting: "--flag old -> new"} for every setting (of `only`, if given) that differs from the
    checkpoint's config (flags that only say how to resume are not compared)."""
    now = asdict(cfg)
    return {
        name: f"--{name.replace('_', '-')} {saved[name]!r} -> {now[name]!r}"
        for name in (only or now)
        if name in saved and saved[name] != now[name] and name not in RESUME_FLAGS
    }


def resume_problem(ckpt: dict, run: Run) -> tuple[str | None, list[str]]:
    """THE place that decides whether `ckpt` can continue as this run: (why it cannot, or None; the
    changes it continues with). Refused even with --allow-config-change when the state cannot be
    loaded at all (another format, model or optimizer); a changed RESUME_REFUSED setting or changed
    data only without that flag."""
    cfg, saved, path = run.cfg, ckpt["config"], ckpt["path"]
    if ckpt.get("format") != checkpoint.FORMAT_VERSION:
        return (
            f"{path} is a checkpoint of format {ckpt.get('format', 'none')}, this train_gpt2.py reads format "
            f"{checkpoint.FORMAT_VERSION}: resume with the version of the repo that wrote it, or start this run "
            "in a new --log-dir"
        ), []
    missing = [name for name in stateful_parts(run, log=None) if name not in ckpt]
    if missing:  # a part added since it was written: its state is not there to restore
        return (
            f"{path} holds no state for {', '.join(missing)} (written before it was added): resume with the "
            "version of the repo that wrote it, or start this run in a new --log-dir"
        ), []
    if ckpt["model_config"] != run.model.model_config_dict():
        return (
            f"{path} holds another model ({saved['model']}: {ckpt['model_config']}) than --model {cfg.model}: "
            "resume with its --model, or start this run in a new --log-dir"
        ), []
    if saved["optimizer"] != cfg.optimizer:
        return (
            f"{path} was trained with --optimizer {saved['optimizer']}: resume with it, or start "
            f"--optimizer {cfg.optimizer} in a new --log-dir"
        ), []
    changes = config_changes(saved, cfg)
    refused = [text for name, text in changes.items() if name in RESUME_REFUSED]
    loader = run.train_loader
    if ckpt["loader"]["num_windows"] != loader.num_windows:
        refused.append(
            f"data changed: the checkpoint's train split had {ckpt['loader']['num_windows']} windows, "
            f"the {len(loader.paths)} shards in {cfg.data_dir} now hold {loader.num_windows}"
        )
    if refused and not cfg.allow_config_change:
        return (
            f"{path} was saved with other settings ({'; '.join(refused)}): resuming would not continue that "
            "run. Use the checkpoint's settings and data, a new --log-dir, or --allow-config-change if intended"
        ), []
    return None, refused + [text for name, text in changes.items() if name not in RESUME_REFUSED]


class RunFinished(Exception):
    """--resume auto found this run already finished: nothing to train (exit code in .code)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def check_not_finished(ckpt: dict, cfg: TrainConfig) -> None:
    """A signal during the last step leaves model_{max_steps}.pt, saved before the final evals:
    resuming it runs them and writes model_final.pt. Only that file (or a checkpoint past
    --max-steps) means the run is over: RunFinished."""
    log_dir = Path(cfg.log_dir)
    if ckpt["step"] < cfg.max_steps or (ckpt["step"] == cfg.max_steps and not checkpoint.is_final(ckpt["path"])):
        return
    changes = config_changes(ckpt["config"], cfg, only=RUN_SETTINGS)
    if changes:
        raise RunFinished(
            f"{log_dir} holds a finished run with other settings ({'; '.join(changes.values())}): to train "
            f"with these settings, give the run its own folder, e.g. --log-dir {log_dir}_2",
            2,
        )
    raise RunFinished(
        f"training already finished: {ckpt['path']} is at step {ckpt['step']} of {cfg.max_steps}, "
        f"nothing to do. To train again, pass a new --log-dir (e.g. --log-dir {log_dir}_2) or delete "
        f"{log_dir}/; to train longer, raise --max-steps",
        0,
    )


def resume(run: Run, log: metrics_log.MetricsLog) -> tuple[int, bool, str | None]:
    """Continue from the newest checkpoint in --log-dir, whatever world size wrote it: load its state
    into `run` and `log`. Returns (start step, evals of that step already logged, the checkpoint)."""
    cfg, log_dir = run.cfg, Path(run.cfg.log_dir)
    if cfg.resume == "never":
        if checkpoint.paths(log_dir):
            raise UserError(
                f"{log_dir} already holds checkpoints of another run: pass a new --log-dir, "
                "or delete them, or use --resume auto"
            )
        return 0, False, None
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return 0, False, None
    check_not_finished(ckpt, cfg)
    problem, changes = resume_problem(ckpt, run)
    if problem:
        raise UserError(problem)
    load_checkpoint(ckpt, run, log)
    run.say(f"resuming from {ckpt['path']} at step {ckpt['step']}")
    for change in changes:
        run.say(f"  changed since the checkpoint: {change}")
    return ckpt["step"], ckpt["evals_done"], ckpt["path"]


def latest_checkpoint(run: Run) -> dict | None:
    """The checkpoint every rank resumes from: rank 0 picks the newest one that loads, and every rank
    loads that one. (Each rank choosing for itself could pick different steps: a file half-visible on
    one node of a shared filesystem, a torn newest one that only some ranks can read.)"""
    log_dir, dist_info = Path(run.cfg.log_dir), run.dist_info
    chosen, problem = None, None
    if dist_info.is_main:
        try:
            ckpt = checkpoint.load_latest(log_dir, warn=True)
            chosen = ckpt and ckpt["path"]
        except OSError as e:  # an unreadable folder: every rank learns it, none waits for rank 0
            problem = cli.os_error_message(e)
    chosen, problem = runtime.broadcast_object((chosen, problem))
    if problem:
        raise UserError(
            f"cannot read the checkpoints in {log_dir} ({problem}): fix its permissions or choose another --log-dir"
        )
    if chosen is None:
        return None
    problem = None
    if not dist_info.is_main:
        try:
            ckpt = {**checkpoint.load_file(chosen, required=checkpoint.TRAINING_KEYS), "path": chosen}
        except (ValueError, OSError) as e:
            problem = str(e)
    unreadable = run.parallel.all_reduce(torch.full((), float(problem is not None), device=dist_info.device))
    if unreadable.item():
        raise UserError(
            problem
            or f"{int(unreadable.item())} other rank(s) cannot read {chosen}, which rank 0 resumes from: "
            "the ranks see different files; put --log-dir on a filesystem every node shares"
        )
    return ckpt


# ---- evaluation and sampling --------------------------------------------------------------------
@torch.no_grad()
def evaluate_val_loss(run: Run) -> float:
    """Mean cross-entropy over the fixed validation tokens, identical for any world/batch size.
    Padded rows (ValLoader keeps batch shapes fixed for compile) get target -1 and are ignored; an
    all-padding batch still runs its forward (under FSDP2 every rank must join every all-gather)."""
    device = run.dist_info.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    for x, y, num_valid in run.val_loader:
        y = y.clone()
        y[num_valid:] = -1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with run.autocast:
            _, loss = run.eval_model(x, y)
        if num_valid == 0:
            continue  # all padding (ranks with fewer windows): nothing scored, the loss is NaN
        tokens = num_valid * y.size(1)
        totals[0] += loss.double() * tokens
        totals[1] += tokens  # a scalar add on the device, not a host-to-device copy per batch
    run.parallel.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def bits_per_byte(val_loss: float, val_loader: ValLoader) -> float:
    """The validation loss in bits per UTF-8 byte of the text its targets encode (each target counted
    once; <|endoftext|> predicted like any token but 0 bytes): comparable across tokenizers."""
    targets = val_loader.targets
    text_bytes = int(token_byte_lengths()[targets].sum())  # ~10M lookups: tens of ms
    return val_loss * len(targets) / (math.log(2) * text_bytes)


def run_hellaswag(run: Run, examples: list[dict], step: int, log: metrics_log.MetricsLog) -> None:
    """HellaSwag (reference style) on every rank, split across ranks; logged by the main rank with
    the number of examples (a subset file gives a subset's score, and says so)."""
    result = evaluate_hellaswag(
        run.eval_model, examples, run.dist_info, autocast=run.autocast, styles=("reference",)
    )  # the user's metric; hellaswag.py adds the harness style
    log.write(
        {
            "type": "hellaswag",
            "step": step,
            "tokens": step * run.cfg.tokens_per_step,
            "hellaswag_acc": result["acc"],
            "hellaswag_acc_norm": result["acc_norm"],
            "count": result["count"],
        }
    )
    run.say(
        f"step {step:6d} | hellaswag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
        f"({result['count']} examples)"
    )


def run_core(run: Run, suite: core_eval.Suite, step: int, log: metrics_log.MetricsLog) -> None:
    """CORE on every rank, split across ranks (the same scorer as HellaSwag and core.py), logged by the
    main rank with each task's accuracy."""
    result = core_eval.evaluate_core(run.eval_model, suite, run.dist_info, autocast=run.autocast)
    log.write(
        {
            "type": "core",
            "step": step,
            "tokens": step * run.cfg.tokens_per_step,
            "core": result["core"],
            "core_partial": result["core_partial"],
            "count": result["count"],
            "max_per_task": suite.max_per_task,
            "tasks": {label: task["accuracy"] for label, task in result["tasks"].items()},
        }
    )
    score = result["core"] if result["core"] is not None else result["core_partial"]
    name = "core" if result["core"] is not None else "core-partial"
    run.say(
        f"step {step:6d} | {name} {score:.4f} ({result['count']:,} examples, {suite.max_per_task or 'all'} per task)"
    )


def sample_texts(run: Run, step: int, num_samples: int = 4, max_new_tokens: int = 32) -> list[str]:
    """Samples of the prompt, the same on every rank (a generator seeded by step, not the global RNG),
    from the compiled model (two graphs, compiled once: the prompt, and one token at any cache length).
    Always max_new_tokens forwards, cut at <|endoftext|> afterwards: under FSDP2 every rank must run
    the same forwards, and none may stop early on its own."""
    enc = get_encoding()
    generator = torch.Generator(device=run.dist_info.device).manual_seed(run.cfg.seed + step)
    rows = generate(
        run.eval_model,
        enc.encode(run.cfg.sample_prompt),
        max_new_tokens,
        num_samples=num_samples,
        top_k=50,
        generator=generator,
        autocast=run.autocast,
    )
    rows = [row[: row.index(EOT_TOKEN)] if EOT_TOKEN in row else row for row in rows]
    return [run.cfg.sample_prompt + enc.decode(row) for row in rows]


# ---- the loop's helpers --------------------------------------------------------------------------
class FirstStepNotice:
    """A line every so often while this process's first step runs (compiling, a big model on a slow
    device): what it is doing and how many micro-steps are done, instead of minutes of silence."""

    FIRST_AFTER, EVERY = 30.0, 60.0  # seconds

    def __init__(self, run: Run, step: int, enabled: bool):
        self.run, self.step, self.enabled = run, step, enabled
        self.done = threading.Event()

    def __enter__(self):
        if self.enabled:
            threading.Thread(target=self._report, name="first-step", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def _report(self) -> None:
        started, wait = time.perf_counter(), self.FIRST_AFTER
        run, cfg = self.run, self.run.cfg
        while not self.done.wait(wait):
            done = run.micro_steps_done
            compiling = done == 0 and runtime.compiles(
                run.dist_info.device, cfg.compile, cfg.compile_on_cpu, warn=False
            )
            doing = (
                "torch.compile is compiling the model (minutes, the first time)"
                if compiling
                else f"a {cfg.model} step of {cfg.tokens_per_step:,} tokens on "
                f"{runtime.device_name(run.dist_info.device)}"
            )
            running = metrics_log.hms(time.perf_counter() - started)
            print(
                f"step {self.step:6d} | still running after {running}: {done} of "
                f"{run.grad_accum} micro-steps done; {doing}",
                flush=True,
            )
            wait = self.EVERY


def prepare_demo_data(cfg: TrainConfig) -> None:
    """--demo: tokenize the shipped corpus with fineweb.py. Run every time: it resumes an
    interrupted preparation and answers "already complete" in a fraction of a second."""
    print(f"demo: token shards of {DEMO_CORPUS.relative_to(REPO)} in {cfg.data_dir}/ (fineweb.py)")
    cmd = [
        sys.executable,
        str(REPO / "fineweb.py"),
        "--input",
        str(DEMO_CORPUS),
        "--out-dir",
        cfg.data_dir,
        "--shard-size",
        str(DEMO_SHARD_SIZE),
        "--workers",
        "1",
    ]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise UserError(f"demo data preparation failed (exit {result.returncode}): see the message above")


def hold_log_dir(cfg: TrainConfig, dist_info: runtime.DistInfo) -> fileio.FolderLock | None:
    """Rank 0 holds --log-dir (fileio.FolderLock) before anything is written there: a second run into
    it stops here, every rank with it, having written nothing."""
    lock, problem = None, None
    if dist_info.is_main:
        try:
            lock = fileio.FolderLock(cfg.log_dir, [Path(sys.argv[0]).name, *sys.argv[1:]]).acquire()
        except fileio.FolderInUse as e:
            problem = str(e)
    problem = runtime.first_problem(problem, name_rank=False)
    if problem:
        raise fileio.FolderInUse(problem)
    return lock


def check_memory(cfg: TrainConfig, dist_info: runtime.DistInfo) -> None:
    """Refuse, before anything is built, a run the memory formula says cannot fit (--no-memory-check).
    Each rank measures its own GPU (one may still be held by a stale process) and every rank stops
    with the first refusal, which names its rank and host."""
    if not cfg.memory_check:
        return
    device = dist_info.device
    needed = memory.memory_bytes(
        cfg.model,
        cfg.parallel,
        cfg.activation_checkpointing,
        cfg.micro_batch_size,
        cfg.seq_len,
        dist_info.world_size,
        cfg.grad_accum_steps(dist_info.world_size),
        "bf16" if runtime.precision(device, cfg.precision).dtype else "fp32",
        cfg.loss_chunk_rows,
    )
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1  # they share RAM
    problem = None
    try:
        memory.check_fits(needed, device, processes_here)
    except UserError as e:
        problem = str(e)
    problem = runtime.first_problem(problem)
    if problem:
        raise UserError(problem)


class EvalData(NamedTuple):
    hellaswag: list[dict]  # the HellaSwag examples ([] when off)
    core: core_eval.Suite | None  # the CORE tasks, cut to --core-max-per-task (None when off)


def prepare_run_dir(cfg: TrainConfig, dist_info: runtime.DistInfo) -> EvalData:
    """Before anything is built (the log dir is held): its temp files from a killed save, the demo's
    data, the evaluations' data (a missing or malformed file fails now, not after hours of training)."""
    problem = None
    if dist_info.is_main:
        try:
            fileio.remove_temps(cfg.log_dir, checkpoint.TMP_PREFIX)
            if cfg.demo:
                prepare_demo_data(cfg)
        except (UserError, OSError) as e:
            problem = str(e) if isinstance(e, UserError) else cli.os_error_message(e)
    # Every rank waits here for the demo's data, and learns if rank 0 could not make it.
    problem = runtime.first_problem(problem, name_rank=False)
    if problem:
        raise UserError(problem)
    core = None
    if cfg.core_every:
        try:
            core = core_eval.load_suite(
                cfg.core_data,
                max_per_task=cfg.core_max_per_task,
                verify=cfg.core_verify,
                per_task_flag="--core-max-per-task",
            )
        except UserError as e:
            raise UserError(f"{e} (or turn CORE off with --core-every 0)") from None
    if not cfg.hellaswag_every:
        return EvalData([], core)
    if not Path(cfg.hellaswag_data).is_file():
        raise UserError(
            f"HellaSwag file {cfg.hellaswag_data} not found: run `uv run hellaswag.py --download-only` on a "
            "machine with network (or pass --hellaswag-data PATH), or turn it off with --hellaswag-every 0"
        )
    return EvalData(load_examples(cfg.hellaswag_data, verify=False), core)  # any subset is scored; its count is logged


def write_config_record(run: Run, log: metrics_log.MetricsLog, start_step: int, resumed_from: str | None) -> None:
    """The first record of each (re)start: the resolved config and where it runs."""
    cfg, device, world = run.cfg, run.dist_info.device, run.dist_info.world_size
    log.write(
        {
            "type": "config",
            "step": start_step,
            "config": asdict(cfg),
            "git_sha": runtime.git_sha(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "device_name": runtime.device_name(device),
            "world_size": world,
            "parallel": run.parallel.name,
            "resumed_from": resumed_from,
            "flops_per_token": run.model.flops_per_token(cfg.seq_len),
            "peak_flops": runtime.peak_flops(device),
            "grad_accum_steps": run.grad_accum,
            "num_params": run.model.num_params(),
            "data_source": describe_source(cfg.data_dir),
            "hosts": runtime.host_names(),  # rank i ran on hosts[i]
        }
    )
    run.say(
        f"{cfg.model}: {run.model.num_params():,} parameters | {world} x {runtime.device_name(device)} | "
        f"{cfg.tokens_per_step:,} tokens/step = {world} ranks x {run.grad_accum} micro-steps x "
        f"{cfg.micro_batch_size} x {cfg.seq_len}"
    )


# ---- the run ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, dist_info: runtime.DistInfo, stop: runtime.StopFlag | None = None) -> int:
    stop = stop or runtime.StopFlag()
    check_memory(cfg, dist_info)
    lock = hold_log_dir(cfg, dist_info)
    try:
        eval_data = prepare_run_dir(cfg, dist_info)
        run = build_run(cfg, dist_info)
        run.log_dir_lock = lock
        log = metrics_log.MetricsLog(Path(cfg.log_dir) / metrics_log.FILE_NAME, dist_info.is_main)
        start_step, evals_done, resumed_from = resume(run, log)
        log.start(
            mirrors=metrics_log.mirrors(
                Path(cfg.log_dir),
                dist_info.is_main,
                cfg.tensorboard,
                cfg.wandb_project if cfg.wandb else None,
                asdict(cfg),
            )
        )
        write_config_record(run, log, start_step, resumed_from)
        try:
            return loop(run, log, stop, start_step=start_step, evals_done=evals_done, eval_data=eval_data)
        finally:
            log.close()
    finally:
        if lock is not None:
            lock.release()


class EvalsDue(NamedTuple):
    val: bool
    hellaswag: bool
    core: bool
    sample: bool


def evals_due(cfg: TrainConfig, step: int, *, start_step: int, evals_done: bool) -> EvalsDue:
    """Which evaluations run before step `step`'s update: each every N steps and at the last step,
    except on the resumed checkpoint's step when its evals were logged before it was saved."""
    if step == start_step and evals_done:
        return EvalsDue(False, False, False, False)

    def due(every: int) -> bool:
        return bool(every) and (step % every == 0 or step == cfg.max_steps)

    return EvalsDue(
        due(cfg.val_every), due(cfg.hellaswag_every), due(cfg.core_every), due(cfg.sample_every) and step > 0
    )


def checkpoint_due(cfg: TrainConfig, step: int, *, start_step: int) -> bool:
    """A periodic checkpoint before step `step`'s update (after its evals); not on the step a run
    started from (it is the checkpoint it resumed, or step 0)."""
    return bool(cfg.ckpt_every) and step % cfg.ckpt_every == 0 and step > start_step


def sync_due(cfg: TrainConfig, step: int) -> tuple[bool, bool]:
    """(log this step, sync after it): every --log-every steps, the last step, and the step before a
    periodic checkpoint (none is saved after a non-finite step nobody looked at)."""
    log_due = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
    return log_due, log_due or (bool(cfg.ckpt_every) and (step + 1) % cfg.ckpt_every == 0)


class Agreed(NamedTuple):
    loss: float  # the step's mean loss over ranks
    grad_norm: float  # the global gradient norm (the same on every rank)
    stop: bool  # some rank got SIGTERM / SIGUSR1 / Ctrl-C: every rank checkpoints and stops
    interrupted: bool  # ... and one of them was a Ctrl-C (exit 130)


def agree(run: Run, stop: runtime.StopFlag, result: StepResult, nonfinite_steps: torch.Tensor | None) -> Agreed:
    """The loop's host-device sync: every rank's loss, norm, health and stop flags, summed in one
    all-reduce so that every rank takes the same decisions. Raises when another run took --log-dir
    or (without the spike guard, which decides every step) a step since the last sync was not finite.
    The flags go in as fill kernels, not host-to-device copies, which would block the host earlier."""
    device, world = run.dist_info.device, run.dist_info.world_size
    lock = run.log_dir_lock
    flags = [
        nonfinite_steps if nonfinite_steps is not None else 0.0,
        stop.set,
        stop.interrupted,
        lock is not None and lock.lost is not None,
    ]
    stats = torch.stack(
        [
            result.loss,
            result.grad_norm.to(result.loss.dtype),
            *(f if isinstance(f, torch.Tensor) else torch.full((), float(f), device=device) for f in flags),
        ]
    )
    loss_sum, norm_sum, nonfinite, stops, interrupts, lost = run.parallel.all_reduce(stats).tolist()
    if lost:  # another run writes into --log-dir (fileio.FolderLock): no checkpoint of ours over its
        raise fileio.FolderInUse(
            lock.lost if lock and lock.lost else f"another run took over {run.cfg.log_dir}: stopping on every rank"
        )
    if nonfinite:
        raise Diverged(
            f"the loss or gradient norm stopped being finite (loss now {loss_sum / world}): stopping. The "
            f"last good checkpoint in {run.cfg.log_dir} is untouched; lower --max-lr or resume from it"
        )
    return Agreed(loss_sum / world, norm_sum / world, stops > 0, interrupts > 0)


def run_evals(run: Run, log: metrics_log.MetricsLog, step: int, due: EvalsDue, eval_data: EvalData) -> None:
    """Validation loss, HellaSwag, CORE and samples before step `step`'s update, as due."""
    cfg = run.cfg
    if due.val:
        val_loss = evaluate_val_loss(run)
        val_bpb = bits_per_byte(val_loss, run.val_loader)
        log.write(
            {
                "type": "val",
                "step": step,
                "tokens": step * cfg.tokens_per_step,
                "val_loss": val_loss,
                "val_bpb": val_bpb,
            }
        )
        run.say(f"step {step:6d} | val loss {val_loss:.4f} | bpb {val_bpb:.4f}")
    if due.hellaswag:
        run_hellaswag(run, eval_data.hellaswag, step, log)
    if due.core:
        run_core(run, eval_data.core, step, log)
    if due.sample:
        texts = sample_texts(run, step)
        log.write({"type": "sample", "step": step, "samples": texts})
        for text in texts:
            run.say(f"sample: {text!r}")


def loop(
    run: Run,
    log: metrics_log.MetricsLog,
    stop: runtime.StopFlag,
    *,
    start_step: int,
    evals_done: bool,
    eval_data: EvalData,
) -> int:
    """Steps start_step..max_steps in the reference order: evals -> checkpoint -> the training step
    and its log line. Returns the exit code (130 after a Ctrl-C).

    Where the host waits for the device: the agreed sync (`agree`) on log steps and before each
    checkpoint, and, with the spike guard on (the default), once per step in train_step (its
    decision must be known before optimizer.step()). Stop signals act only through the agreed sync,
    so every rank saves the same step and stops together."""
    cfg, log_dir = run.cfg, Path(run.cfg.log_dir)
    clock = metrics_log.StepClock(runtime.device_sync(run.dist_info.device))
    peak, flops_per_token = runtime.peak_flops(run.dist_info.device), run.model.flops_per_token(cfg.seq_len)
    # Steps with a non-finite loss or norm since the last sync, counted on the device: only without
    # the guard (with it, train_step stops at the first one).
    nonfinite_steps = None if run.spike_guard.enabled else torch.zeros((), device=run.dist_info.device)
    interrupted = False

    for step in range(start_step, cfg.max_steps + 1):
        due = evals_due(cfg, step, start_step=start_step, evals_done=evals_done)
        if any(due):
            clock.pause()
            run_evals(run, log, step, due, eval_data)
        if step == cfg.max_steps:
            break
        if checkpoint_due(cfg, step, start_step=start_step):
            clock.pause()
            save_checkpoint(
                run, log, log_dir / f"model_{step:05d}", step=step, evals_done=True, keep=cfg.keep_checkpoints
            )

        clock.run()
        with FirstStepNotice(run, step, enabled=run.dist_info.is_main and step == start_step):
            result = train_step(run, step)
        clock.step_done()
        if result.skipped:  # the guard's decision is a host value, the same on every rank
            log.write(
                {"type": "skip", "step": step, "tokens": (step + 1) * cfg.tokens_per_step, "reason": result.skipped}
            )
            run.say(f"step {step:6d} | update skipped: {result.skipped}")
        if nonfinite_steps is not None:
            nonfinite_steps += (~(torch.isfinite(result.loss) & torch.isfinite(result.grad_norm))).float()

        log_due, sync = sync_due(cfg, step)
        if not sync:
            continue
        agreed = agree(run, stop, result, nonfinite_steps)
        clock.pause()
        if log_due:
            log_train_step(
                run, log, clock, step, agreed, result.lr, flops_per_token, peak, skipped=bool(result.skipped)
            )
        if agreed.stop:  # every rank saves step + 1 (its evals not yet run) and stops
            interrupted = interrupted or agreed.interrupted
            save_checkpoint(
                run, log, log_dir / f"model_{step + 1:05d}", step=step + 1, evals_done=False, keep=cfg.keep_checkpoints
            )
            last = step + 1 == cfg.max_steps
            # A Ctrl-C is a person at a terminal; SIGTERM / SIGUSR1 are a scheduler that requeues the job.
            then = "exiting; the same command resumes from it" if interrupted else "exiting so the job can be requeued"
            run.say(
                f"{stop.signal_name or 'signal on another rank'}: checkpoint saved at step {step + 1}"
                + ("; finishing the final evaluation" if last else f"; {then}")
            )
            if not last:
                return 130 if interrupted else 0

    final = save_checkpoint(run, log, log_dir / checkpoint.FINAL_NAME, step=cfg.max_steps, evals_done=True, keep=None)
    run.say(f"done: {cfg.max_steps} steps, final checkpoint {final}")
    return 130 if interrupted else 0


def log_train_step(
    run: Run,
    log: metrics_log.MetricsLog,
    clock: metrics_log.StepClock,
    step: int,
    agreed: Agreed,
    lr: float,
    flops_per_token: int,
    peak: float | None,
    *,
    skipped: bool = False,
) -> None:
    """The train record and the console line of a log step (grad norm: identical on every rank)."""
    seconds, steps = clock.lap()
    tokens_per_sec = steps * run.cfg.tokens_per_step / max(seconds, 1e-9)
    step_ms = 1000 * seconds / max(steps, 1)
    step_mfu = runtime.mfu(flops_per_token, tokens_per_sec, peak, run.dist_info.world_size)
    log.write(
        {
            "type": "train",
            "step": step,
            "tokens": (step + 1) * run.cfg.tokens_per_step,
            "train_loss": agreed.loss,
            "lr": lr,
            "grad_norm": agreed.grad_norm,
            "step_ms": step_ms,
            "tokens_per_sec": tokens_per_sec,
            "mfu": step_mfu,
            **({"skipped": True} if skipped else {}),
        }
    )
    run.say(
        metrics_log.format_step_line(
            step,
            run.cfg.max_steps,
            agreed.loss,
            lr,
            agreed.grad_norm,
            step_ms,
            tokens_per_sec,
            step_mfu,
            clock.elapsed(),
            clock.eta(run.cfg.max_steps - step - 1),
        )
        + (" | update skipped" if skipped else "")
    )


def main(argv=None) -> int:
    """Train; run under cli.run_main, which prints a UserError or OSError as one line and exits 2.
    Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 with a checkpoint), 130 Ctrl-C; 2 a user error,
    nothing trained: a flag, the data, the folder, a model too big for the memory (change it, rerun);
    1 a run that trained and then failed (diverged, a checkpoint or the log not written, a lost rank):
    its newest checkpoint is intact and the same command resumes from it, once the cause is fixed."""
    # Catch SIGTERM / SIGUSR1 / Ctrl-C from the first moment: one sent during start-up must not be lost.
    stop = runtime.StopFlag()
    if hasattr(sys.stdout, "reconfigure"):  # `python train_gpt2.py > run.log`: each line at once for tail -f
        sys.stdout.reconfigure(line_buffering=True)
    previous_handlers = stop.install()
    try:
        cfg = parse_args(argv, description=__doc__)
        cfg.check_world_size(runtime.env_world_size())  # before any process group, data or folder
        dist_info = runtime.setup_distributed(cfg.device, timeout_minutes=cfg.dist_timeout_minutes)
    except BaseException:
        stop.uninstall(previous_handlers)
        raise
    clean_exit = False
    try:
        code = train(cfg, dist_info, stop)
        clean_exit = True
        return code
    except RunFinished as e:
        clean_exit = True
        if e.code:
            cli.print_error(str(e))
        elif dist_info.is_main:
            print(e)
        return e.code
    except (Diverged, CheckpointNotWritten) as e:
        cli.print_error(str(e))
        return 1
    except OSError as e:  # e.g. metrics.jsonl on a disk that filled up between checkpoints
        if not fileio.is_disk_full(e):
            raise
        cli.print_error(
            f"disk full writing {e.filename or cfg.log_dir} ({e.strerror}): free space, then rerun the "
            "same command: it resumes from the newest checkpoint"
        )
        return 1
    except torch.cuda.OutOfMemoryError:  # fixed by a flag, as memory.py's refusal before the start: exit 2
        cli.print_error(
            f"out of GPU memory at --micro-batch-size {cfg.micro_batch_size}: halve it (gradient "
            "accumulation grows to keep --tokens-per-step, so the run is unchanged), or add "
            "--activation-checkpointing / --loss-chunk-rows 8192"
        )
        return 2
    except RuntimeError as e:  # after OutOfMemoryError, one of its kind
        if not runtime.is_peer_failure(e):
            raise
        # Exit 1, not a user error: nothing to change, torchrun restarts every rank from the newest
        # checkpoint. Every rank that sees it says so (the dead one, maybe rank 0, cannot).
        cli.print_error(
            f"rank {dist_info.rank} lost contact with another rank ({str(e).splitlines()[0][:200]}); "
            "under train.sh, torchrun restarts every rank from the newest checkpoint",
            every_rank=True,
        )
        return 1
    finally:
        runtime.teardown_distributed(wait_for_peers=clean_exit)
        stop.uninstall(previous_handlers)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
