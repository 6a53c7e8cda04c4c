"""Train GPT-2 on FineWeb-Edu token shards: the reference recipe, DDP or FSDP2, exact resume, honest metrics.

    uv run train_gpt2.py --demo                                  # CPU, minutes, no network
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the reference run (124M, 10B tokens)

With no flags this is the reference run: GPT-2 124M, 524,288 tokens per step (64 x 1024 per
micro-batch, gradient accumulation derived from the world size), AdamW (0.9, 0.95) lr 6e-4 with 715
warmup steps and cosine decay to 10% at step 19,073, bf16 autocast, torch.compile on CUDA
(train_config.py holds every flag, the presets and the recipes).

A run is resumable at any moment: checkpoints (model, optimizer, data position, RNG states, metrics
length) are written atomically to <log dir>/model_{step:05d}.pt (a sharded folder model_{step:05d}/
under --parallel fsdp); `--resume auto` continues from the newest one, at any world size
(checkpoint.py). SIGTERM / SIGUSR1 (SLURM before a time limit) save a checkpoint at the next step
boundary and exit 0; so does the first Ctrl-C (exit 130; a second one aborts at once). A step whose
loss spikes far above the recent ones (a bad batch) is not applied (--spike-guard, spike_guard.py).
Metrics: <log dir>/metrics.jsonl, one JSON object per line (docs/training.md#metrics).

Reading order: the schedule and the optimizer, what a run holds (`build_run`), one optimizer step
(`train_step`), what a checkpoint holds, the loop's decisions, the loop, and `train` / `main`, which
start it. The evaluations are evals.py's; resume and saving are checkpoint.py's.
"""

from __future__ import annotations

import sys

import cli
from train_config import TrainConfig, parse_args

if __name__ == "__main__":
    cli.parse_first(lambda argv: parse_args(argv, description=__doc__))  # --help, a bad flag: before torch loads

import math
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoint
import evals
import fileio
import memory
import metrics
import runtime
from cli import UserError
from dataloader import RandomTokens, TrainLoader, ValLoader, describe_source
from model import BLOCK_MATRICES, GPT, GPTConfig
from muon import CombinedOptimizer, Muon
from parallel import Parallel, parallelize
from spike_guard import SpikeGuard, TooManySkips

__all__ = ["GPT", "GPTConfig", "TrainConfig", "build_run", "train_step", "main"]  # `from train_gpt2 import GPT` works

REPO = Path(__file__).resolve().parent


# ---- the schedule and the optimizer -------------------------------------------------------------
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
        ns_dtype=runtime.half_dtype(device),
    )
    return CombinedOptimizer(adamw=adamw, muon=muon)


def set_learning_rates(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


# ---- what a run holds ---------------------------------------------------------------------------
@dataclass
class Run:
    """What one training run holds, built once by `build_run` (the trainer, bench/throughput.py and the tests)."""

    cfg: TrainConfig
    dist_info: runtime.DistInfo
    model: GPT  # the module itself (under FSDP2: its parameters are this rank's shards)
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    parallel: Parallel  # how the model is spread over ranks (the seam: one process, DDP or FSDP2)
    train_model: torch.nn.Module  # what train_step calls (compiled, wrapped for the ranks)
    compiled: bool  # whether torch.compile runs the model (whole, or block by block under FSDP2)
    train_loader: TrainLoader
    precision: runtime.Precision  # what the forward passes compute in (bf16, fp16 with loss scaling, fp32)
    autocast: object  # its context for a forward pass
    grad_accum: int  # micro-steps per optimizer step on each rank
    spike_guard: SpikeGuard  # decides whether a step's update is applied (off: always)
    scaler: runtime.LossScaler  # fp16's loss scale (off: scale 1, nothing skipped)
    evals: evals.Evaluator  # validation, HellaSwag, CORE, samples (their model: compiled, unwrapped)
    log_dir_lock: fileio.FolderLock | None = None  # the trainer's hold on --log-dir (rank 0)
    micro_steps_done: int = 0  # by this process: what a slow first step's notice reports

    @property
    def decides_every_step(self) -> bool:
        """Whether skip_reason decides each step's update (the spike guard, fp16's scaler): one host sync a step."""
        return self.spike_guard.enabled or self.scaler.enabled

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
    if device.type == "mps" and cfg.attn_backend in ("flash", "cudnn", "efficient"):
        raise UserError(
            f"--attn-backend {cfg.attn_backend} is a CUDA kernel and this run is on Apple's MPS: use --attn-backend "
            "auto (MPS's own kernel) or math"
        )
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


def build_run(cfg: TrainConfig, dist_info: runtime.DistInfo, train_loader=None, hellaswag=None, core=None) -> Run:
    """Model, optimizer, the ranks' wrapping, loaders, precision and evaluations for `cfg` on this
    process. `train_loader`: anything with next_batch() (bench/throughput.py's synthetic tokens);
    default: the shards. `hellaswag` / `core`: the evaluations' data (evals.load_hellaswag / load_core)."""
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
    val_loader = None
    if cfg.val_every:
        val_loader = ValLoader(
            cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_tokens, dist_info.rank, dist_info.world_size
        )
    model = build_model(cfg, device, dist_info.is_main)
    precision = runtime.precision(device, cfg.precision)
    parallel = parallelize(dist_info, cfg.parallel, cfg.ddp_bucket_mb, precision.dtype)
    # Wrapped first: FSDP2 replaces the parameters by their shards, which the optimizer must hold.
    train_model, eval_model = parallel.prepare(model, cfg.compile, cfg.compile_mode, cfg.compile_on_cpu)
    compiled = runtime.compiles(device, cfg.compile, cfg.compile_on_cpu, warn=False)
    autocast = precision.autocast()
    evaluator = evals.Evaluator(
        eval_model,
        compiled,
        autocast,
        dist_info,
        parallel.all_reduce,
        cfg.tokens_per_step,
        val_loader,
        hellaswag,
        core,
        cfg.sample_prompt,
        cfg.seed,
    )
    return Run(
        cfg,
        dist_info,
        model,
        make_optimizer(model, cfg, device),
        parallel,
        train_model,
        compiled,
        train_loader,
        precision,
        autocast,
        cfg.grad_accum_steps(dist_info.world_size),
        SpikeGuard(cfg.spike_guard, cfg.spike_guard_norm, cfg.spike_window, cfg.spike_warmup),
        runtime.LossScaler(precision.scaled),
        evaluator,
    )


# ---- one optimizer step -------------------------------------------------------------------------
class Diverged(cli.RunFailed):
    """The loss or the weights stopped being finite: nothing more may be trained or saved."""


class StepResult(NamedTuple):
    loss: torch.Tensor  # () this rank's mean loss over its micro-batches, on the device
    grad_norm: torch.Tensor  # () the global gradient norm before clipping, on the device
    lr: float
    skipped: str | None  # why the spike guard refused this update (None: applied)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step: grad_accum micro-steps (gradients reduced across ranks on the last only),
    clip to the global norm, then the optimizer (AdamW, or Muon + AdamW) unless the spike guard
    refuses the update. Without the guard nothing waits for the device (no host sync)."""
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
            run.scaler.scaled(loss).backward()
        run.micro_steps_done += 1
    run.scaler.unscale_(run.model.parameters())  # fp16: the gradients of the loss itself, before clipping
    grad_norm = run.parallel.clip_grad_norm_(run.model, run.cfg.grad_clip)
    lr = learning_rate(step, run.cfg)
    skipped = skip_reason(run, step, loss_accum, grad_norm) if run.decides_every_step else None
    if skipped is None:
        set_learning_rates(run.optimizer, lr)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_accum, grad_norm, lr, skipped)


def skip_reason(run: Run, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> str | None:
    """Why this step's update is not applied (fp16 gradients that overflowed, a loss spike), or None;
    the same on every rank: one small all-reduce of the loss and a host sync. It must be known before
    optimizer.step(), so the host waits for the backward: the one sync of a step that is not a log
    step (`--spike-guard 0` removes it in bf16 / fp32; bench/throughput.py measures the difference).
    An overflow is fp16's range, not a diverging run: its step is skipped (the scaler lowers the
    scale), the spike guard never sees it, and only a non-finite loss (or an overflow even at the
    smallest scale) stops the run."""
    both = run.parallel.all_reduce(torch.stack([loss, grad_norm.to(loss.dtype)]))
    mean_loss, norm = (both / run.dist_info.world_size).tolist()  # the norm is already global: sum / ranks = it
    if math.isfinite(mean_loss):
        overflow = run.scaler.update(norm)
        if overflow and run.scaler.scale > runtime.LossScaler.MIN_SCALE:
            return overflow
    if not (math.isfinite(mean_loss) and math.isfinite(norm)):  # diverging weights, more often than a bad batch
        raise Diverged(
            f"the loss or gradient norm stopped being finite at step {step} (loss {mean_loss}, norm "
            f"{norm}): stopping before its update. The last good checkpoint in {run.cfg.log_dir} is "
            "untouched; lower --max-lr or resume from it"
        )
    if not run.spike_guard.enabled:
        return None
    try:
        return run.spike_guard.check(loss=mean_loss, grad_norm=norm)
    except TooManySkips as e:
        fix = (
            "the loss stopped being finite: lower --max-lr or resume from it"
            if e.nonfinite
            else "check the data and --max-lr, or raise --spike-guard"
        )
        raise Diverged(
            f"{e}; stopping at step {step}. The last good checkpoint in {run.cfg.log_dir} is untouched; {fix}"
        ) from None


# ---- what a checkpoint holds --------------------------------------------------------------------
# A checkpoint is the run's state as one dict: the weights and optimizer state (one file, or every
# rank's shards: checkpoint.save_training_state), a header that says which run it belongs to and where
# it stopped, and one entry per stateful part below. Each part gives its own state (state_dict) and
# takes it back (load_state_dict); checkpoint.resume_problem decides what may resume. A new piece of
# run state is one line here.
def stateful_parts(run: Run, log: metrics.MetricsLog) -> dict:
    """{checkpoint key: part}: everything besides the weights and the optimizer that a resumed run
    needs to continue exactly as the uninterrupted one."""
    return {
        "loader": run.train_loader,  # the data position (rows read, any world size)
        "rng": runtime.RandomState(run.dist_info.device),
        "spike_guard": run.spike_guard,  # its history decides the next steps' skips
        "loss_scale": run.scaler,  # fp16's scale (starts afresh when a checkpoint has none)
        "metrics": log,  # the log's length: a resume cuts it back to this
    }


def save_checkpoint(run: Run, log: metrics.MetricsLog, stem: Path, *, step: int, evals_done: bool, keep: int | None):
    """Save the run at `step` (every rank calls it). Refuses to save weights that are not finite: a
    checkpoint is always a point a run can continue from."""
    if run.parallel.count_nonfinite(run.model):
        raise Diverged(f"weights are not finite at step {step}: not saving them")
    state = {
        "format": checkpoint.FORMAT_VERSION,
        "model_config": run.model.model_config_dict(),
        "config": asdict(run.cfg),
        "step": step,  # optimizer steps completed
        "evals_done": evals_done,  # were step's evaluations logged before this save?
        **{name: part.state_dict() for name, part in stateful_parts(run, log).items()},
    }
    return checkpoint.save_training_state(
        run.model, run.optimizer, state, stem, keep, sharded=run.parallel.sharded, is_main=run.dist_info.is_main
    )


# ---- the loop's decisions -----------------------------------------------------------------------
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
        stop.requested,
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


def loop(run: Run, log: metrics.MetricsLog, stop: runtime.StopFlag, *, start_step: int, evals_done: bool) -> int:
    """Steps start_step..max_steps in the reference order: evaluations -> checkpoint -> the training
    step and its log line. Returns the exit code (130 after a Ctrl-C).

    Where the host waits for the device: the agreed sync (`agree`) on log steps and before each
    checkpoint, and, with the spike guard on (the default), once per step in train_step (its
    decision must be known before optimizer.step()). Stop signals act only through the agreed sync,
    so every rank saves the same step and stops together."""
    cfg, log_dir = run.cfg, Path(run.cfg.log_dir)
    every = {"val": cfg.val_every, "hellaswag": cfg.hellaswag_every, "core": cfg.core_every, "sample": cfg.sample_every}
    clock = metrics.StepClock(runtime.device_sync(run.dist_info.device))
    peak = run_peak_flops(run)
    # Steps with a non-finite loss or norm since the last sync, counted on the device: only when no
    # step is decided on the host (else train_step stops at the first one).
    nonfinite_steps = None if run.decides_every_step else torch.zeros((), device=run.dist_info.device)
    interrupted = False

    for step in range(start_step, cfg.max_steps + 1):
        due = evals.due(step, every, cfg.max_steps, start_step=start_step, evals_done=evals_done)
        if any(due):
            clock.pause()
            for record in run.evals.records(step, due):
                log_and_say(run, log, record)
        if step == cfg.max_steps:
            break
        if checkpoint_due(cfg, step, start_step=start_step):
            clock.pause()
            save_checkpoint(
                run, log, log_dir / f"model_{step:05d}", step=step, evals_done=True, keep=cfg.keep_checkpoints
            )

        clock.start()
        with metrics.SlowStepNotice(
            step, lambda: first_step_status(run), enabled=run.dist_info.is_main and step == start_step
        ):
            result = train_step(run, step)
        clock.step_done()
        if result.skipped:  # the guard's decision is a host value, the same on every rank
            skip = {"type": "skip", "step": step, "tokens": (step + 1) * cfg.tokens_per_step, "reason": result.skipped}
            log_and_say(run, log, skip)
        if nonfinite_steps is not None:
            nonfinite_steps += (~(torch.isfinite(result.loss) & torch.isfinite(result.grad_norm))).float()

        log_due, sync = sync_due(cfg, step)
        if not sync:
            continue
        agreed = agree(run, stop, result, nonfinite_steps)
        clock.pause()
        if log_due:
            lap, flops = clock.lap(), run.model.flops_per_token(cfg.seq_len)
            record = metrics.train_record(
                step, agreed.loss, result.lr, agreed.grad_norm, lap, cfg.tokens_per_step, flops, peak
            )
            log_and_say(run, log, {**record, **({"skipped": True} if result.skipped else {})}, clock)
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


def run_peak_flops(run: Run) -> float | None:
    """The run's devices' dense peak FLOP/s at its precision, for MFU (None: MFU n/a). A GPU the table
    does not list says so once, with the flag that fills it in."""
    device, world = run.dist_info.device, run.dist_info.world_size
    peak = runtime.peak_flops(device, run.precision.name, run.cfg.peak_tflops)
    if peak is None and device.type == "cuda":
        run.say(
            f"MFU: {runtime.device_name(device)} has no {run.precision.name} peak in runtime.PEAK_TFLOPS: pass "
            f"--peak-tflops N (its dense {run.precision.name} tensor TFLOP/s from its datasheet) to have it"
        )
    return peak and peak * world


def log_and_say(run: Run, log: metrics.MetricsLog, record: dict, clock: metrics.StepClock | None = None) -> None:
    """A record into metrics.jsonl, and its line on the console (metrics.line: one place for both)."""
    log.write(record)
    run.say(metrics.line(record, run.cfg.max_steps, clock))


def first_step_status(run: Run) -> str:
    """What a slow first step is doing, for metrics.SlowStepNotice's line."""
    cfg, done = run.cfg, run.micro_steps_done
    if done == 0 and run.compiled:
        doing = "torch.compile is compiling the model (minutes, the first time)"
    else:
        doing = f"a {cfg.model} step of {cfg.tokens_per_step:,} tokens on {runtime.device_name(run.dist_info.device)}"
    return f"{done} of {run.grad_accum} micro-steps done; {doing}"


# ---- starting the run ---------------------------------------------------------------------------
def train(cfg: TrainConfig, dist_info: runtime.DistInfo, stop: runtime.StopFlag | None = None) -> int:
    """Start (or resume) the run and train it to the end; the exit code (0, or 130 after a Ctrl-C; 2
    when --resume found a finished run with other settings). Every start-up refusal is agreed by all
    ranks, before anything is built (memory) or written (the log dir). --plan: say what it would do."""
    stop = stop or runtime.StopFlag()
    cfg, choice = choose_micro_batch(cfg, dist_info)
    if cfg.plan:
        return plan(cfg, dist_info, choice)
    refuse_if_too_big(cfg, dist_info)
    lock = hold_log_dir(cfg, dist_info)
    try:
        clear_log_dir(cfg, dist_info)
        hellaswag = evals.load_hellaswag(cfg.hellaswag_data) if cfg.hellaswag_every else None
        core = evals.load_core(cfg.core_data, cfg.core_max_per_task, cfg.core_verify) if cfg.core_every else None
        run = build_run(cfg, dist_info, hellaswag=hellaswag, core=core)
        run.log_dir_lock = lock
        log = metrics.MetricsLog(Path(cfg.log_dir) / metrics.FILE_NAME, dist_info.is_main)
        start = checkpoint.resume(asdict(cfg), run.model, run.optimizer, stateful_parts(run, log))
        if isinstance(start, checkpoint.Finished):
            (cli.print_error if start.code else run.say)(start.message)
            return start.code
        if start.path is None:
            log.clear()
        else:
            run.say(f"resuming from {start.path} at step {start.step}")
            for change in start.changes:
                run.say(f"  changed since the checkpoint: {change}")
        log.mirrors = metrics.mirrors(
            Path(cfg.log_dir), dist_info.is_main, cfg.tensorboard, cfg.wandb_project if cfg.wandb else None, asdict(cfg)
        )
        write_config_record(run, log, start, choice)
        try:
            return loop(run, log, stop, start_step=start.step, evals_done=start.evals_done)
        finally:
            log.close()
    finally:
        if lock is not None:
            lock.release()


def local_processes(dist_info: runtime.DistInfo) -> int:
    """How many processes share this process's memory: a node's ranks share its RAM, a GPU is its own."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist_info.device.type == "cpu" else 1


def choose_micro_batch(cfg: TrainConfig, dist_info: runtime.DistInfo) -> tuple[TrainConfig, dict | None]:
    """--micro-batch-size auto: the largest that fits this device by memory.py's formula (every rank
    takes the smallest any rank can: one GPU of a node may be half full), then, on CUDA (one process or
    DDP), one real forward and backward at it, halving on out-of-memory. The step's tokens never change:
    gradient accumulation grows instead, so it is the same recipe. (the config, how it was chosen)."""
    if cfg.micro_batch_size:
        return cfg, None
    device, world = dist_info.device, dist_info.world_size
    precision = runtime.precision(device, cfg.precision).name
    args = (cfg.model, cfg.parallel, cfg.activation_checkpointing, cfg.seq_len, cfg.tokens_per_step, world)
    chosen, need, have, where = memory.largest_micro_batch(
        *args, precision, cfg.loss_chunk_rows, device, local_processes(dist_info)
    )
    chosen = runtime.agree_min(chosen)
    tried = device.type == "cuda" and cfg.parallel != "fsdp"  # FSDP2's forward is collective: formula only
    if tried:
        chosen = runtime.agree_min(largest_that_runs(cfg, dist_info, chosen))
    cfg = replace(cfg, micro_batch_size=chosen)
    cfg.check_world_size(world)  # CUDA graphs: now that the accumulation is known
    choice = {"chosen": chosen, "estimate_gib": need / memory.GiB, "available": where, "tried": tried}
    if dist_info.is_main:
        ran = "; a forward and backward at it ran" if tried else ""
        print(
            f"micro-batch auto: {chosen} x {cfg.seq_len} tokens, {cfg.grad_accum_steps(world)} micro-steps per step "
            f"(the largest of {', '.join(map(str, memory.MICRO_BATCHES))} that fits: ~{need / memory.GiB:.1f} GiB "
            f"by memory.py's formula; {where}{ran})"
        )
    return cfg, choice


def largest_that_runs(cfg: TrainConfig, dist_info: runtime.DistInfo, micro_batch: int) -> int:
    """`micro_batch`, or the largest smaller one a forward and backward of the bare model (eager: a
    compiled step needs no more) runs at on this GPU without running out of memory."""
    precision = runtime.precision(dist_info.device, cfg.precision)
    while True:
        model = build_model(cfg, dist_info.device, is_main=False)
        try:
            x = torch.randint(0, model.config.vocab_size, (micro_batch, cfg.seq_len), device=dist_info.device)
            with precision.autocast():
                model(x, x)[1].backward()
            return micro_batch
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            micro_batch //= 2
        finally:
            del model
            torch.cuda.empty_cache()


def plan(cfg: TrainConfig, dist_info: runtime.DistInfo, choice: dict | None, timed: int = 2) -> int:
    """--plan: what this command would do on this machine and how long it would take, printed, then
    exit 0; nothing is written. The time comes from `timed` micro-steps on random tokens after one that
    warms up (torch.compile compiles in it), times the run's micro-steps: a few seconds on a GPU, minutes
    for a big model on a CPU; evaluations and checkpoints are not counted."""
    device, world = dist_info.device, dist_info.world_size
    precision, accumulation = runtime.precision(device, cfg.precision), cfg.grad_accum_steps(world)
    needed = memory_needed(cfg, dist_info)["total"] + memory.overhead_bytes(device.type)
    _, where = memory.available_bytes(device, local_processes(dist_info))
    micro_tokens = cfg.micro_batch_size * cfg.seq_len * world
    say = print if dist_info.is_main else (lambda *_: None)
    say(f"plan: {cfg.model} on {world} x {runtime.device_name(device)}, {precision.name} ({cfg.precision})")
    say(
        f"  step: {cfg.tokens_per_step:,} tokens = {world} rank(s) x {accumulation} micro-steps x "
        f"{cfg.micro_batch_size} x {cfg.seq_len}" + (" (micro-batch auto)" if choice else "")
    )
    say(f"  memory: ~{needed / memory.GiB:.1f} GiB per process by memory.py's formula; {where}")
    say(f"  run: {cfg.max_steps:,} steps, {cfg.max_steps * cfg.tokens_per_step / 1e9:.2f}B tokens, into {cfg.log_dir}/")
    say(f"  speed: timing 1 + {timed} micro-steps of {micro_tokens:,} tokens (random ids) ...")
    timing = replace(cfg, tokens_per_step=micro_tokens, val_every=0, hellaswag_every=0, core_every=0)
    loader = RandomTokens(cfg.micro_batch_size, cfg.seq_len, 50257, device.type == "cuda", seed=dist_info.rank)
    run = build_run(timing, dist_info, train_loader=loader)
    train_step(run, 0)  # warm-up: compiling, the allocator, kernel choices
    sync = runtime.device_sync(device) or (lambda: None)
    sync()
    started = time.perf_counter()
    for step in range(timed):
        train_step(run, step + 1)
    sync()
    seconds = (time.perf_counter() - started) / timed * accumulation  # per optimizer step
    total = seconds * cfg.max_steps
    duration = f"{metrics.hms(total)} (h:mm:ss)" if total < 2 * 86400 else f"{total / 86400:,.1f} days"
    say(
        f"  speed: {seconds:.2f} s per step, {cfg.tokens_per_step / max(seconds, 1e-9):,.0f} tokens/s; "
        f"{cfg.max_steps:,} steps: ~{duration}, evaluations and checkpoints not counted"
    )
    return 0


def memory_needed(cfg: TrainConfig, dist_info: runtime.DistInfo) -> dict[str, float]:
    """memory.py's formula for this run on this process: bytes per component, and "total"."""
    return memory.memory_bytes(
        cfg.model,
        cfg.parallel,
        cfg.activation_checkpointing,
        cfg.micro_batch_size,
        cfg.seq_len,
        dist_info.world_size,
        cfg.grad_accum_steps(dist_info.world_size),
        runtime.precision(dist_info.device, cfg.precision).name,
        cfg.loss_chunk_rows,
    )


def refuse_if_too_big(cfg: TrainConfig, dist_info: runtime.DistInfo) -> None:
    """Refuse, before anything is built, a run memory.py's formula says cannot fit (--no-memory-check)."""
    if cfg.memory_check:
        memory.refuse_if_too_big(memory_needed(cfg, dist_info), dist_info.device, local_processes(dist_info))


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


def clear_log_dir(cfg: TrainConfig, dist_info: runtime.DistInfo) -> None:
    """Rank 0 deletes the temp files a killed save left in the (held) log dir and, for --demo, makes
    the demo's token shards (`fineweb.py --demo`: it resumes an interrupted preparation and answers
    "already complete" in a fraction of a second); every rank waits for it and learns if it failed."""
    problem = None
    if dist_info.is_main:
        try:
            fileio.remove_temps(cfg.log_dir, checkpoint.TMP_PREFIX)
            if cfg.demo:
                print(f"demo: token shards of the corpus in assets/demo in {cfg.data_dir}/ (fineweb.py --demo)")
                command = [sys.executable, str(REPO / "fineweb.py"), "--demo", "--out-dir", cfg.data_dir]
                if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
                    raise UserError("demo data preparation failed: see fineweb.py's message above")
        except (UserError, OSError) as e:
            problem = str(e) if isinstance(e, UserError) else cli.os_error_message(e)
    problem = runtime.first_problem(problem, name_rank=False)
    if problem:
        raise UserError(problem)


def write_config_record(run: Run, log: metrics.MetricsLog, start: checkpoint.Resumed, choice: dict | None) -> None:
    """The first record of each (re)start: the resolved config and where it runs (`choice`: how an auto
    micro-batch was chosen; it may differ on resume on other hardware)."""
    cfg, device, world = run.cfg, run.dist_info.device, run.dist_info.world_size
    log.write(
        {
            "type": "config",
            "step": start.step,
            "format": metrics.FORMAT_VERSION,
            "config": asdict(cfg),
            "git_sha": runtime.git_sha(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "device_name": runtime.device_name(device),
            "world_size": world,
            "parallel": run.parallel.name,
            "resumed_from": start.path,
            "flops_per_token": run.model.flops_per_token(cfg.seq_len),
            "peak_flops": runtime.peak_flops(device, run.precision.name, cfg.peak_tflops),
            "grad_accum_steps": run.grad_accum,
            "num_params": run.model.num_params(),
            "data_source": describe_source(cfg.data_dir),
            "hosts": runtime.host_names(),  # rank i ran on hosts[i]
            "precision": run.precision.name,
            "micro_batch_choice": choice,
        }
    )
    run.say(
        f"{cfg.model}: {run.model.num_params():,} parameters | {world} x {runtime.device_name(device)} | "
        f"{cfg.tokens_per_step:,} tokens/step = {world} ranks x {run.grad_accum} micro-steps x "
        f"{cfg.micro_batch_size} x {cfg.seq_len}"
    )


@contextmanager
def exit_codes(cfg: TrainConfig, dist_info: runtime.DistInfo):
    """What ends a started run, as the exception carrying its one line and exit code (cli.run_main
    prints it): 2 for what a flag fixes, 1 for a run that trained and then failed (its newest
    checkpoint is intact and the same command resumes from it)."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one; so is MPS's out of memory
        if runtime.is_out_of_memory(e):  # fixed by a flag, as memory.py's refusal before the start
            raise UserError(
                f"out of GPU memory at --micro-batch-size {cfg.micro_batch_size}: halve it (gradient "
                "accumulation grows to keep --tokens-per-step, so the run is unchanged), or add "
                "--activation-checkpointing / --loss-chunk-rows 8192"
            ) from None
        if not runtime.is_peer_failure(e):
            raise
        # Every rank that sees it says so (the dead one, maybe rank 0, cannot). Not a user error:
        # nothing to change, torchrun restarts every rank from the newest checkpoint.
        raise cli.RunFailed(
            f"rank {dist_info.rank} lost contact with another rank ({str(e).splitlines()[0][:200]}); "
            "under train.sh, torchrun restarts every rank from the newest checkpoint",
            every_rank=True,
        ) from None
    except OSError as e:  # e.g. metrics.jsonl on a disk that filled up between checkpoints
        if not fileio.is_disk_full(e):
            raise
        raise cli.RunFailed(
            f"disk full writing {e.filename or cfg.log_dir} ({e.strerror}): free space, then rerun the "
            "same command: it resumes from the newest checkpoint"
        ) from None


def main(argv=None) -> int:
    """Train, under cli.run_main (which prints an error's one line and returns its exit code): 0 done
    (or stopped by SIGTERM/SIGUSR1 with a checkpoint), 130 Ctrl-C; 2 a user error, nothing trained;
    1 a run that trained and then failed, resumed by the same command once the cause is fixed."""
    # Catch SIGTERM / SIGUSR1 / Ctrl-C from the first moment: one sent during start-up must not be lost.
    stop = runtime.StopFlag()
    if hasattr(sys.stdout, "reconfigure"):  # `python train_gpt2.py > run.log`: each line at once for tail -f
        sys.stdout.reconfigure(line_buffering=True)
    previous_handlers = stop.install()
    try:
        cfg = parse_args(argv, description=__doc__)
        cfg.check_world_size(runtime.env_world_size())  # before any process group, data or folder
        dist_info = runtime.setup_distributed(cfg.device, timeout_minutes=cfg.dist_timeout_minutes)
        ended_together = False  # every rank reached the end: leave the group at a barrier
        try:
            with exit_codes(cfg, dist_info):
                code = train(cfg, dist_info, stop)
            ended_together = True
            return code
        finally:
            runtime.teardown_distributed(wait_for_peers=ended_together)
    finally:
        stop.uninstall(previous_handlers)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
