"""Train GPT-2 on FineWeb-Edu token shards: the reference recipe, DDP, exact resume, honest metrics.

    uv run train_gpt2.py --demo                                  # CPU, ~3 minutes, no network
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the reference run (124M, 10B tokens)

With no flags this is the reference run: GPT-2 124M, 524,288 tokens per step (64 x 1024 per
micro-batch, gradient accumulation derived from the world size), AdamW (0.9, 0.95) lr 6e-4 with 715
warmup steps and cosine decay to 10% at step 19,073, bf16 autocast, torch.compile on CUDA.

A run is resumable at any moment: checkpoints (model, optimizer, data position, RNG states) are
written atomically to <log dir>/model_{step:05d}.pt; `--resume auto` continues from the newest one.
SIGTERM / SIGUSR1 (SLURM before a time limit) save a checkpoint at the next step boundary and exit 0.
Metrics: <log dir>/metrics.jsonl, one JSON object per line (schema in the README).
"""

from __future__ import annotations

import json
import math
import random
import re
import secrets
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime
from cli import build_parser, field, given_flags
from dataloader import TrainLoader, ValLoader
from model import GPT, MODEL_PRESETS, GPTConfig, generate, gpt_config_from_hf, load_checkpoint_file, load_hf_state_dict
from muon import CombinedOptimizer, Muon
from tokenizer import EOT_TOKEN, get_encoding

__all__ = ["GPT", "GPTConfig", "TrainConfig", "main"]  # `from train_gpt2 import GPT` keeps working

REPO = Path(__file__).resolve().parent
DEMO_CORPUS = REPO / "assets" / "demo" / "fineweb_demo.parquet"


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = field("gpt2", "model size", choices=tuple(MODEL_PRESETS))
    init_from: str = field("", "start from OpenAI's weights via transformers (gpt2, gpt2-medium, ...) instead of random init")
    # data and outputs
    data_dir: str = field("edu_fineweb10B", "folder of token shards written by fineweb.py")
    log_dir: str = field("log", "folder for metrics.jsonl and checkpoints")
    shuffle: bool = field(True, "shuffle shard and window order each epoch (--no-shuffle: the reference's sequential order)")
    # batch: sizes in tokens and rows; gradient accumulation is derived, never set
    tokens_per_step: int = field(524_288, "tokens per optimizer step, all ranks together (2**19, GPT-3 small's 0.5M)")
    micro_batch_size: int = field(64, "sequences per forward/backward on each rank")
    seq_len: int = field(1024, "tokens per sequence")
    # optimisation (GPT-3 paper's small-model settings, as in the reference)
    max_steps: int = field(19_073, "optimizer steps (19,073 x 524,288 = 10B tokens: one epoch of sample-10BT)")
    warmup_steps: int = field(715, "linear warmup steps (375M tokens, GPT-3's warmup)")
    max_lr: float = field(6e-4, "peak learning rate")
    min_lr_frac: float = field(0.1, "final learning rate as a fraction of max-lr")
    weight_decay: float = field(0.1, "AdamW weight decay, on tensors of 2+ dims only")
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.95, "AdamW beta2")
    eps: float = field(1e-8, "AdamW epsilon")
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0: off)")
    schedule: str = field("cosine", "lr schedule: cosine (reference) or wsd (warmup, stable, linear decay)", choices=("cosine", "wsd"))
    decay_frac: float = field(0.2, "wsd: fraction of the steps spent in the final linear decay to min-lr-frac")
    optimizer: str = field("adamw", "adamw (reference) or muon (Muon on the blocks' matrices, AdamW at --max-lr on the rest)", choices=("adamw", "muon"))
    muon_lr: float = field(0.02, "muon: peak learning rate of the Muon matrices (follows the same schedule)")
    muon_momentum: float = field(0.95, "muon: momentum (Nesterov)")
    recipe: str = field("", "named recipe setting optimizer, schedule, learning rates and step budget: fast (see RECIPES)", choices=("", "fast"))
    seed: int = field(1337, "seed for init and data order")
    # evaluation, sampling, checkpoints, logging
    val_every: int = field(250, "validate every N steps and at the end (0: off)")
    val_tokens: int = field(10_485_760, "fixed validation set: the first N tokens of the val shard (= the reference's 8-GPU 20 x 64 x 1024 x 8)")
    hellaswag_every: int = field(250, "HellaSwag (reference style) every N steps and at the end (0: off)")
    hellaswag_data: str = field("hellaswag/hellaswag_val.jsonl", "HellaSwag validation file (get it with `uv run hellaswag.py --download-only`)")
    sample_every: int = field(250, "print samples every N steps (0: off)")
    sample_prompt: str = field("Hello, I'm a language model,", "prompt of the in-training samples")
    ckpt_every: int = field(1000, "checkpoint every N steps (and at the end, and on SIGTERM/SIGUSR1)")
    keep_checkpoints: int = field(3, "keep the newest K step checkpoints (model_final.pt is always kept)")
    log_every: int = field(1, "log (and sync with the device) every N steps")
    tensorboard: bool = field(False, "also write every metrics record to TensorBoard (<log dir>/tensorboard; `uv sync --extra loggers`)")
    wandb: bool = field(False, "also send every metrics record to Weights & Biases (WANDB_MODE=offline works without an account)")
    wandb_project: str = field("gpt2-fineweb", "Weights & Biases project")
    resume: str = field("auto", "auto: continue from the newest valid checkpoint in --log-dir; never: start fresh", choices=("auto", "never"))
    # machine and speed levers (bench.py measures each; none changes the recipe's math beyond rounding)
    device: str = field("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    compile: bool = field(True, "torch.compile the model (CUDA only; ignored with a warning on CPU)")
    compile_mode: str = field("default", "torch.compile mode", choices=("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"))
    attn_backend: str = field("auto", "scaled-dot-product attention kernel (auto: PyTorch picks)", choices=runtime.SDPA_BACKENDS)
    loss_chunk_rows: int = field(0, "compute lm_head + cross-entropy in chunks of N rows, never building the full logits (0: plain path)")
    fused_adamw: bool = field(True, "fused AdamW kernel on CUDA")
    activation_checkpointing: bool = field(False, "recompute each block in backward to save memory (gpt2-large/xl on one GPU)")
    ddp_bucket_mb: int = field(25, "DDP gradient all-reduce bucket size in MB")
    demo: bool = field(False, "CPU demo: tiny model on the small corpus shipped in assets/demo (~3 minutes)")

    @property
    def model_config(self) -> GPTConfig:
        return GPTConfig(**MODEL_PRESETS[self.model])

    def validate(self, world_size: int = 1) -> None:
        """One-line errors for impossible settings (raised before any work)."""
        rows = self.micro_batch_size * self.seq_len * world_size
        if min(self.micro_batch_size, self.seq_len, self.tokens_per_step, self.max_steps) <= 0:
            raise ValueError("--micro-batch-size, --seq-len, --tokens-per-step and --max-steps must be positive")
        if self.tokens_per_step % rows:
            raise ValueError(
                f"--tokens-per-step {self.tokens_per_step} is not a multiple of micro-batch x seq-len x world size "
                f"= {self.micro_batch_size} x {self.seq_len} x {world_size} = {rows}: change one of them"
            )
        if self.seq_len > self.model_config.block_size:
            raise ValueError(f"--seq-len {self.seq_len} exceeds the {self.model} model's context of {self.model_config.block_size}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} exceeds --max-steps {self.max_steps}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError("--min-lr-frac must be between 0 and 1")
        if self.schedule == "wsd" and not 0 < self.decay_frac <= 1:
            raise ValueError("--decay-frac must be in (0, 1] with --schedule wsd")
        if self.val_every and self.val_tokens < self.seq_len:
            raise ValueError(f"--val-tokens {self.val_tokens} is shorter than one sequence ({self.seq_len})")
        if min(self.val_every, self.hellaswag_every, self.sample_every, self.ckpt_every) < 0 or self.log_every < 1:
            raise ValueError("--*-every flags must be >= 0 (and --log-every >= 1)")
        if self.keep_checkpoints < 1:
            raise ValueError("--keep-checkpoints must be at least 1")
        if self.loss_chunk_rows < 0 or self.ddp_bucket_mb < 1:
            raise ValueError("--loss-chunk-rows must be >= 0 and --ddp-bucket-mb >= 1")

    def grad_accum_steps(self, world_size: int) -> int:
        return self.tokens_per_step // (self.micro_batch_size * self.seq_len * world_size)


# --demo: a tiny GPT-2 that learns visibly in ~3 minutes on 2 CPU cores (~1 s/step). 2,048 tokens per step as
# 2 micro-batches of 4 x 256 (so gradient accumulation runs too); a higher lr than 124M's because
# small models tolerate it; the shipped ~0.6M-token corpus in 100K-token shards (shard 0 = val).
DEMO_PRESET = dict(
    model="tiny", data_dir="demo_fineweb", tokens_per_step=2048, micro_batch_size=4, seq_len=256,
    max_steps=120, warmup_steps=10, max_lr=3e-3, val_every=30, val_tokens=32_768,
    hellaswag_every=0, sample_every=60, ckpt_every=40, device="cpu",
    loss_chunk_rows=256,  # the 50304-wide output layer is most of a tiny model's work: 1.5x faster on CPU (BENCHMARKS.md)
)
DEMO_SHARD_SIZE = 100_000


# Named recipes: overrides on top of the reference (and of --demo), below explicit flags.
RECIPES: dict[str, dict] = {
    # fast: Muon on the block matrices + warmup-stable-decay; embeddings, LayerNorms and biases stay
    # on AdamW at max_lr. Where each number comes from (pilots: bench/recipe_gate.py at tiny scale,
    # one seed, 115 steps of 2,048 tokens; the table is in BENCHMARKS.md):
    #   muon_lr 0.02        best of 0.01 / 0.02 / 0.03 / 0.04 / 0.06 (the speedrun community uses 0.02-0.05)
    #   muon_momentum 0.95  Muon's usual value, Nesterov, 5 Newton-Schulz steps (not tuned)
    #   decay_frac 0.3      0.2 / 0.3 / 0.5 were within 0.01 of each other; decaying to 0 instead
    #                       of min_lr_frac 0.1 did not help
    #   max_lr 2.4e-3       AdamW lr under Muon: 4x the AdamW-only lr was best at tiny scale (6e-3 vs
    #                       the baseline's 1.5e-3; 3e-3, 4e-3 and 1e-2 were worse), so 4 x the
    #                       reference's 6e-4 here. (With Muon, AdamW trains only these tensors.)
    # The warmup is left to the preset (715 steps at 124M, 10 in --demo); the gate found a short one
    # (2% of the steps) slightly better at tiny scale. NONE of this is tuned at 124M scale.
    "fast": dict(optimizer="muon", schedule="wsd", muon_lr=0.02, muon_momentum=0.95, decay_frac=0.3, max_lr=2.4e-3),
}
# The fast recipe's 124M step budget: the reference's 19,073 steps / 2.15, the token saving the
# CPU gate measured at tiny scale (3 seeds; BENCHMARKS.md). Not measured at 124M. Not applied to --demo.
FAST_RECIPE_MAX_STEPS = 8_870


def resolve_flags(flags: dict) -> dict:
    """Layer the presets: TrainConfig defaults < --demo < --recipe < flags given explicitly."""
    layered = {}
    if flags.get("demo"):
        layered.update(DEMO_PRESET)
    if flags.get("recipe"):
        layered.update(RECIPES[flags["recipe"]])
        if flags["recipe"] == "fast" and not flags.get("demo"):
            layered["max_steps"] = FAST_RECIPE_MAX_STEPS
    return {**layered, **flags}


def parse_args(argv=None) -> TrainConfig:
    parser = build_parser(TrainConfig, description=__doc__)
    flags = resolve_flags(given_flags(parser.parse_args(argv)))
    try:
        return TrainConfig(**flags)
    except ValueError as e:
        parser.error(str(e))


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


# The blocks' hidden matrices (Linear weights, (out, in)) that Muon trains with --optimizer muon.
MUON_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device):
    """AdamW over everything (reference), or Muon over the block matrices + AdamW over the rest.
    Each param group may carry `lr_scale`: train_step sets its lr to schedule(step) * lr_scale."""
    fused = cfg.fused_adamw and device.type == "cuda"  # one kernel for all parameters on GPU
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps, fused=fused)
    matrices = {name: p for name, p in model.named_parameters() if name.startswith("transformer.h.") and name.endswith(MUON_MATRICES)}
    muon_ids = {id(p) for p in matrices.values()}
    rest = torch.nn.ParameterList([p for p in model.parameters() if id(p) not in muon_ids])
    adamw = torch.optim.AdamW(param_groups(rest, cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                              eps=cfg.eps, fused=fused)
    lr_scale = cfg.muon_lr / cfg.max_lr  # Muon follows the same schedule shape at its own peak
    muon = Muon([
        # c_attn is q, k and v stacked (3C, C): three matrices, orthogonalised separately.
        {"params": [p for n, p in matrices.items() if n.endswith("attn.c_attn.weight")], "split": 3, "lr_scale": lr_scale},
        {"params": [p for n, p in matrices.items() if not n.endswith("attn.c_attn.weight")], "lr_scale": lr_scale},
    ], lr=cfg.muon_lr, momentum=cfg.muon_momentum)
    return CombinedOptimizer(adamw=adamw, muon=muon)


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state but keep this run's `lr_scale`s: learning rates follow
    the flags on resume (train_step sets them every step), and torch's load_state_dict would bring
    back the saved groups' lr_scale, silently ignoring a changed --muon-lr (or --max-lr) for Muon."""
    scales = [group.get("lr_scale") for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, scale in zip(optimizer.param_groups, scales):
        if scale is not None:
            group["lr_scale"] = scale


# ---- checkpoints --------------------------------------------------------------------------------
CKPT_PATTERN = re.compile(r"model_(\d{5,})\.pt$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_paths(log_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every model_NNNNN.pt and model_final.pt, newest first."""
    found = []
    for path in log_dir.glob("model_*.pt"):
        match = CKPT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), 0, path))
        elif path.name == "model_final.pt":
            found.append((math.inf, 1, path))  # final is newest; its real step is inside
    return [(step, path) for step, _, path in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def load_latest_checkpoint(log_dir: Path, is_main: bool) -> dict | None:
    """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
    for _, path in checkpoint_paths(log_dir):
        try:
            ckpt = load_checkpoint_file(path)
            if not {"model", "optimizer", "step", "loader", "config"} <= set(ckpt):
                raise ValueError("keys missing")
        except (ValueError, OSError) as e:
            if is_main:
                warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=1)
            continue
        ckpt["path"] = str(path)
        return ckpt
    return None


def save_checkpoint(path: Path, model: GPT, optimizer, step: int, loader: TrainLoader, cfg: TrainConfig,
                    evals_done: bool, keep: int | None) -> None:
    state = {
        "model": model.state_dict(),  # the unwrapped module: no "module." / "_orig_mod." prefixes
        "model_config": model.model_config_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,  # optimizer steps completed
        "loader": loader.state_dict(),
        "rng": rng_state(),
        "config": asdict(cfg),
        "evals_done": evals_done,  # were step's val/HellaSwag/sample logged before this save?
    }
    runtime.atomic_torch_save(state, path)
    if keep is not None:  # prune old step checkpoints, never the final one
        steps = [(s, p) for s, p in checkpoint_paths(path.parent) if s != math.inf]
        for _, old in steps[keep:]:
            old.unlink(missing_ok=True)


# ---- metrics log --------------------------------------------------------------------------------
class TensorBoardMirror:
    """Every numeric field of every record as a TensorBoard scalar `<type>/<field>` at its step."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: run `uv sync --extra loggers`") from None
        self.writer = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        kind, step = record["type"], record["step"]
        if kind == "config":
            self.writer.add_text("config", f"```\n{json.dumps(record, indent=1)}\n```", step)
        elif kind == "sample":
            self.writer.add_text("samples", "\n\n".join(record["samples"]), step)
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbMirror:
    """Every record to a Weights & Biases run that a resumed job continues (its id is kept in the
    log dir). WANDB_MODE=offline writes it locally for a later `wandb sync`."""

    def __init__(self, log_dir: Path, project: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb needs the wandb package: run `uv sync --extra loggers`") from None
        id_file = log_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        runtime.atomic_write_bytes(id_file, run_id.encode())
        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(log_dir), config=config,
                              name=log_dir.resolve().name)
        self.run.define_metric("*", step_metric="step")  # our step, not wandb's own counter

    def write(self, record: dict) -> None:
        kind = record["type"]
        if kind == "sample":
            data = {"sample/text": self.wandb.Html("<br>".join(record["samples"]))}
        else:
            data = {f"{kind}/{k}": v for k, v in record.items()
                    if k not in ("type", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if data:
            self.run.log({"step": record["step"], **data})

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """<log dir>/metrics.jsonl on the main rank: one JSON object per line, appended and flushed.
    It is the source of truth; TensorBoard / W&B mirrors, when asked for, get the same records."""

    def __init__(self, path: Path, enabled: bool, mirrors: list | None = None):
        self.path, self.enabled, self.mirrors = path, enabled, mirrors or []

    def start(self, resume_step: int | None, evals_done: bool) -> None:
        """Fresh run: empty the file. Resumed run at step S: drop what the killed run logged past
        its checkpoint, so no step appears twice."""
        if not self.enabled:
            return
        if resume_step is None or not self.path.exists():
            runtime.atomic_write_bytes(self.path, b"")
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                step, kind = int(record["step"]), record.get("type")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a kill
            if kind == "train" and step >= resume_step:
                continue
            if kind in ("val", "hellaswag", "sample") and (step > resume_step or (step == resume_step and not evals_done)):
                continue
            if kind == "config" and step > resume_step:
                continue
            kept.append(line + "\n")
        runtime.atomic_write_bytes(self.path, "".join(kept).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            record = {**record, "time": time.time()}
            runtime.append_jsonl(self.path, record)
            for mirror in self.mirrors:
                mirror.write(record)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()


# ---- evaluation and sampling --------------------------------------------------------------------
@torch.no_grad()
def evaluate_val_loss(model, val_loader: ValLoader, dist_info: runtime.DistInfo, autocast) -> float:
    """Mean cross-entropy over the fixed validation tokens, identical for any world/batch size.
    Padded rows (ValLoader keeps batch shapes fixed for compile) get target -1 and are ignored."""
    device = dist_info.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    for x, y, num_valid in val_loader:
        if num_valid == 0:
            continue  # an all-padding batch (ranks with fewer windows): nothing to score
        y = y.clone()
        y[num_valid:] = -1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            _, loss = model(x, y)
        tokens = num_valid * y.size(1)
        totals += torch.stack([loss.double() * tokens, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
    if dist_info.distributed:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def sample_texts(model: GPT, cfg: TrainConfig, step: int, dist_info: runtime.DistInfo, num_samples: int = 4,
                 max_new_tokens: int = 32) -> list[str]:
    enc = get_encoding()
    generator = torch.Generator(device=dist_info.device).manual_seed(cfg.seed + step)
    rows = generate(model, enc.encode(cfg.sample_prompt), max_new_tokens, num_samples=num_samples,
                    top_k=50, generator=generator, stop_token=EOT_TOKEN)
    return [cfg.sample_prompt + enc.decode(row) for row in rows]


# ---- setup helpers ------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checkpoints and exits 0 at the next step boundary."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.signal_name is not None


def prepare_demo_data(cfg: TrainConfig, is_main: bool) -> None:
    """--demo: tokenize the shipped corpus with fineweb.py. Run every time: it resumes an
    interrupted preparation and answers "already complete" in a fraction of a second."""
    data_dir = Path(cfg.data_dir)
    if not is_main:
        return
    print(f"demo: token shards of {DEMO_CORPUS.relative_to(REPO)} in {data_dir}/ (fineweb.py)")
    cmd = [sys.executable, str(REPO / "fineweb.py"), "--input", str(DEMO_CORPUS), "--out-dir", str(data_dir),
           "--shard-size", str(DEMO_SHARD_SIZE), "--workers", "1"]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if result.returncode != 0:
        raise ValueError(f"demo data preparation failed (exit {result.returncode}): see the message above")


def check_hellaswag_data(cfg: TrainConfig) -> None:
    if cfg.hellaswag_every and not Path(cfg.hellaswag_data).is_file():
        raise ValueError(
            f"HellaSwag file {cfg.hellaswag_data} not found: run `uv run hellaswag.py --download-only` on a "
            "machine with network (or pass --hellaswag-data PATH), or turn it off with --hellaswag-every 0"
        )


def build_model(cfg: TrainConfig, is_main: bool) -> GPT:
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = GPT(cfg.model_config)
    if cfg.init_from:
        try:
            from transformers import GPT2LMHeadModel

            hf = GPT2LMHeadModel.from_pretrained(cfg.init_from)
        except OSError as e:
            raise ValueError(
                f"--init-from {cfg.init_from}: could not load the weights ({str(e).splitlines()[0]}); they need "
                "the network once, or a Hugging Face cache that has them (HF_HOME)"
            ) from None
        model = load_hf_state_dict(GPT(gpt_config_from_hf(hf.config)), hf.state_dict())
        if is_main:
            print(f"initialised from Hugging Face {cfg.init_from}")
    return model


def format_step_line(step: int, max_steps: int, loss: float, lr: float, grad_norm: float, step_ms: float,
                     tokens_per_sec: float, mfu: float | None) -> str:
    mfu_text = f"{100 * mfu:4.1f}%" if mfu is not None else "  n/a"
    return (f"step {step:6d}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:6.3f} | "
            f"{step_ms:7.0f} ms | {tokens_per_sec:11,.0f} tok/s | mfu {mfu_text}")


# ---- the run ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, dist_info: runtime.DistInfo, stop: StopFlag | None = None) -> int:
    cfg.validate(dist_info.world_size)
    device, is_main = dist_info.device, dist_info.is_main
    stop = stop or StopFlag()
    log_dir = Path(cfg.log_dir)
    if is_main:
        log_dir.mkdir(parents=True, exist_ok=True)
        for stale in log_dir.glob(".model_*.pt.*.tmp"):  # a save cut short by a kill
            stale.unlink(missing_ok=True)
    if cfg.demo:
        prepare_demo_data(cfg, is_main)
    if dist_info.distributed:
        dist.barrier()
    check_hellaswag_data(cfg)
    if cfg.compile and device.type != "cuda" and is_main:
        warnings.warn("--compile is ignored on CPU (compiling costs more than it saves there)", stacklevel=1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True

    grad_accum = cfg.grad_accum_steps(dist_info.world_size)
    train_loader = TrainLoader(cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, dist_info.rank, dist_info.world_size,
                               seed=cfg.seed, shuffle=cfg.shuffle, pin_memory=device.type == "cuda")
    val_loader = (ValLoader(cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_tokens, dist_info.rank,
                            dist_info.world_size) if cfg.val_every else None)

    raw_model = build_model(cfg, is_main).to(device)
    optimizer = make_optimizer(raw_model, cfg, device)

    # Resume: the newest valid checkpoint in the log dir, whatever world size wrote it.
    ckpt = load_latest_checkpoint(log_dir, is_main) if cfg.resume == "auto" else None
    if cfg.resume == "never" and checkpoint_paths(log_dir):
        raise ValueError(f"{log_dir} already holds checkpoints of another run: pass a new --log-dir, or delete them, or use --resume auto")
    start_step, evals_done, resumed_from = 0, False, None
    if ckpt is not None:
        # A signal during the last step leaves model_{max_steps}.pt, saved before the final evals:
        # resuming it runs them and writes model_final.pt. Only that file (or a checkpoint past
        # --max-steps) means the run is over.
        if ckpt["step"] > cfg.max_steps or (ckpt["step"] == cfg.max_steps and Path(ckpt["path"]).name == "model_final.pt"):
            if is_main:
                print(f"training already finished: {ckpt['path']} is at step {ckpt['step']} of {cfg.max_steps}. "
                      "Use a new --log-dir (or --resume never after deleting it) for another run.")
            return 0
        if ckpt["config"].get("optimizer", "adamw") != cfg.optimizer:
            raise ValueError(f"{ckpt['path']} was trained with --optimizer {ckpt['config'].get('optimizer', 'adamw')}: "
                             f"resume with it, or start --optimizer {cfg.optimizer} in a new --log-dir")
        if ckpt.get("model_config") != raw_model.model_config_dict():
            raise ValueError(f"{ckpt['path']} holds another model ({ckpt['config'].get('model')}: {ckpt.get('model_config')}) "
                             f"than --model {cfg.model}: resume with its --model, or start this run in a new --log-dir")
        raw_model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step, evals_done, resumed_from = ckpt["step"], ckpt.get("evals_done", False), ckpt["path"]
        if is_main:
            print(f"resuming from {ckpt['path']} at step {start_step}")
    mirrors = []
    if is_main and cfg.tensorboard:
        mirrors.append(TensorBoardMirror(log_dir))
    if is_main and cfg.wandb:
        mirrors.append(WandbMirror(log_dir, cfg.wandb_project, asdict(cfg)))
    metrics = MetricsLog(log_dir / "metrics.jsonl", is_main, mirrors)
    metrics.start(start_step if ckpt is not None else None, evals_done)
    del ckpt

    model, train_model, autocast = wrap_model(raw_model, cfg, dist_info)

    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = runtime.peak_flops(device)
    metrics.write({
        "type": "config", "step": start_step, "config": asdict(cfg), "git_sha": runtime.git_sha(),
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device_name": runtime.device_name(device), "world_size": dist_info.world_size,
        "resumed_from": resumed_from, "flops_per_token": flops_per_token,
        "peak_flops": peak, "grad_accum_steps": grad_accum, "num_params": raw_model.num_params(),
    })
    if is_main:
        print(f"{cfg.model}: {raw_model.num_params():,} parameters | {dist_info.world_size} x {runtime.device_name(device)} | "
              f"{cfg.tokens_per_step:,} tokens/step = {dist_info.world_size} ranks x {grad_accum} micro-steps x "
              f"{cfg.micro_batch_size} x {cfg.seq_len}")

    # Throughput counts training only: the clock is paused (after a device sync) around evals.
    train_seconds, steps_since_log, clock = 0.0, 0, None
    stop_agreed = False  # set only from the all-reduced flag (log steps), never from a local signal

    def sync_clock():
        nonlocal train_seconds, clock
        if clock is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - clock
            clock = None

    step = start_step
    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        skip_evals = step == start_step and evals_done  # the resumed checkpoint's step already logged them

        if stop_agreed:
            sync_clock()
            if is_main:
                save_checkpoint(log_dir / f"model_{step:05d}.pt", raw_model, optimizer, step, train_loader, cfg,
                                evals_done=False, keep=cfg.keep_checkpoints)
                print(f"{stop.signal_name or 'signal on another rank'}: checkpoint saved at step {step}"
                      + ("; finishing the final evaluation" if last_step else "; exiting so the job can be requeued"))
            if not last_step:
                metrics.close()
                return 0
            stop_agreed = False  # training is done: run the final evals and write model_final.pt

        def due(every: int) -> bool:
            return bool(every) and (step % every == 0 or last_step) and not skip_evals

        if due(cfg.val_every):
            sync_clock()
            val_loss = evaluate_val_loss(model, val_loader, dist_info, autocast)
            metrics.write({"type": "val", "step": step, "tokens": step * cfg.tokens_per_step, "val_loss": val_loss})
            if is_main:
                print(f"step {step:6d} | val loss {val_loss:.4f}")
        if due(cfg.hellaswag_every):
            sync_clock()
            run_hellaswag(raw_model, model, cfg, step, dist_info, autocast, metrics)
        if due(cfg.sample_every) and step > 0 and is_main:
            sync_clock()
            texts = sample_texts(raw_model, cfg, step, dist_info)
            metrics.write({"type": "sample", "step": step, "samples": texts})
            for text in texts:
                print(f"sample: {text!r}")
        if last_step:
            break
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step > start_step and is_main:
            sync_clock()
            save_checkpoint(log_dir / f"model_{step:05d}.pt", raw_model, optimizer, step, train_loader, cfg,
                            evals_done=True, keep=cfg.keep_checkpoints)

        if clock is None:
            clock = time.perf_counter()
        loss_accum, grad_norm, lr = train_step(train_model, raw_model, optimizer, train_loader, cfg, step,
                                               grad_accum, dist_info, autocast)
        steps_since_log += 1

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            # The one host-device sync of the hot loop: loss, norm and the stop flag of every rank.
            stats = torch.stack([loss_accum, grad_norm.to(loss_accum.dtype), torch.tensor(float(stop.set), device=device)])
            if dist_info.distributed:
                dist.all_reduce(stats)
            loss_sum, norm_sum, stops = stats.tolist()
            sync_clock()
            loss_value = loss_sum / dist_info.world_size
            grad_norm_value = norm_sum / dist_info.world_size  # identical on every rank after all-reduce
            if not math.isfinite(loss_value):
                if is_main:
                    print(f"error: loss is {loss_value} at step {step}: stopping. The last good checkpoint in "
                          f"{log_dir} is untouched; lower --max-lr or resume from it.", file=sys.stderr)
                metrics.close()
                return 1
            stop_agreed = stops > 0  # every rank sees the same sum, so all stop at the same step
            tokens_per_sec = steps_since_log * cfg.tokens_per_step / max(train_seconds, 1e-9)
            step_ms = 1000 * train_seconds / steps_since_log
            step_mfu = runtime.mfu(flops_per_token, tokens_per_sec, peak, dist_info.world_size)
            metrics.write({"type": "train", "step": step, "tokens": (step + 1) * cfg.tokens_per_step,
                           "train_loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, "step_ms": step_ms,
                           "tokens_per_sec": tokens_per_sec, "mfu": step_mfu})
            if is_main:
                print(format_step_line(step, cfg.max_steps, loss_value, lr, grad_norm_value, step_ms, tokens_per_sec, step_mfu))
            train_seconds, steps_since_log = 0.0, 0

    if is_main:
        save_checkpoint(log_dir / "model_final.pt", raw_model, optimizer, cfg.max_steps, train_loader, cfg,
                        evals_done=True, keep=None)
        print(f"done: {cfg.max_steps} steps, final checkpoint {log_dir / 'model_final.pt'}")
    metrics.close()
    return 0


def wrap_model(raw_model: GPT, cfg: TrainConfig, dist_info: runtime.DistInfo):
    """Apply the speed settings and return (model, train_model, autocast): `model` is the compiled
    module (evaluation calls it), `train_model` its DDP wrapper under torchrun (training calls it)."""
    device = dist_info.device
    raw_model.loss_chunk_rows = cfg.loss_chunk_rows
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    model = raw_model
    if cfg.compile and device.type == "cuda":
        model = torch.compile(raw_model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    train_model = model
    if dist_info.distributed:
        # DDP all-reduces gradients in buckets while the last micro-step's backward still runs.
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          bucket_cap_mb=cfg.ddp_bucket_mb)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return model, train_model, autocast


def train_step(train_model, raw_model: GPT, optimizer, train_loader: TrainLoader, cfg: TrainConfig, step: int,
               grad_accum: int, dist_info: runtime.DistInfo, autocast):
    """One optimizer step: grad_accum micro-steps, clip, AdamW. Returns (mean loss, grad norm) as
    device tensors (no sync) and the learning rate used."""
    device = dist_info.device
    loss_accum = torch.zeros((), device=device)
    with runtime.sdpa_backend(cfg.attn_backend):
        for micro_step in range(grad_accum):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last_micro = micro_step == grad_accum - 1
            # Gradients are all-reduced only on the last micro-step; no_sync covers forward and backward.
            sync_context = train_model.no_sync() if dist_info.distributed and not last_micro else nullcontext()
            with sync_context:
                with autocast:
                    _, loss = train_model(x, y)
                loss = loss / grad_accum  # the step's loss is the mean over its micro-batches
                loss_accum += loss.detach()
                loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum, grad_norm, lr


def run_hellaswag(raw_model, model, cfg, step, dist_info, autocast, metrics) -> None:
    """HellaSwag (reference style) on every rank, split across ranks; logged by the main rank."""
    from hellaswag_eval import evaluate_hellaswag, load_examples

    result = evaluate_hellaswag(model, load_examples(cfg.hellaswag_data), dist_info, autocast=autocast,
                                styles=("reference",))  # the user's metric; hellaswag.py adds the harness style
    metrics.write({"type": "hellaswag", "step": step, "tokens": step * cfg.tokens_per_step,
                   "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"], "count": result["count"]})
    if dist_info.is_main:
        print(f"step {step:6d} | hellaswag acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} ({result['count']} examples)")


def main(argv=None) -> int:
    # Catch SIGTERM / SIGUSR1 from the first moment: one sent during start-up must not be lost.
    stop = StopFlag()
    stop.install()
    cfg = parse_args(argv)
    try:
        dist_info = runtime.setup_distributed(cfg.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return train(cfg, dist_info, stop)
    except ValueError as e:  # user-fixable problems (data, flags): one line, no traceback
        if dist_info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        if dist_info.is_main:
            print(f"error: out of GPU memory at --micro-batch-size {cfg.micro_batch_size}: halve it (gradient "
                  "accumulation grows to keep --tokens-per-step, so the run is unchanged)", file=sys.stderr)
        return 3
    finally:
        runtime.teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
