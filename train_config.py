"""The trainer's configuration: the model presets, `TrainConfig` (one field per train_gpt2.py flag,
defaults = the reference run), the --demo preset, the named recipes, and how flags are layered on them.

No torch here (nor anything that imports it): a script parses and checks its flags before its heavy
imports, so `--help` and a bad flag are answered in the time Python takes to start (cli.parse_first).

    uv run python -c "import train_config; print(train_config.parse_args(['--demo']))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cli
from cli import UserError, build_parser, field, parse_flags

if TYPE_CHECKING:
    from model import GPTConfig

# Model presets: keyword overrides of model.GPTConfig. The four GPT-2 sizes are OpenAI's.
MODEL_PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    # CPU-sized: 4 layers of width 128 (~7M parameters, most of them the 50304 x 128 embedding),
    # context 256: trains at a few thousand tokens/s on 2 cores, enough to watch loss fall in minutes.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
}


def context_length(model: str) -> int:
    """The longest sequence the `model` preset takes (its learned position table)."""
    return MODEL_PRESETS[model]["block_size"]


# --demo: a tiny GPT-2 that learns visibly in minutes on 2 CPU cores. 2,048 tokens per step as
# 2 micro-batches of 4 x 256 (so gradient accumulation runs too); a higher lr than 124M's because
# small models tolerate it; the shipped ~0.6M-token corpus in 100K-token shards (shard 0 = val).
DEMO_PRESET = dict(
    model="tiny",
    data_dir=cli.DEMO_DATA_DIR,
    tokens_per_step=2048,
    micro_batch_size=4,
    seq_len=256,
    max_steps=120,
    warmup_steps=10,
    max_lr=3e-3,
    val_every=30,
    val_tokens=32_768,
    hellaswag_every=0,
    sample_every=60,
    ckpt_every=40,
    device="cpu",
    compile=False,
    # the 50304-wide output layer is most of a tiny model's work: 1.5x faster on CPU (BENCHMARKS.md)
    loss_chunk_rows=256,
)

# --spike-guard default: standard deviations above the last 100 steps' mean loss (spike_guard.py).
# Clean tiny runs never scored above 4.27, a step of random tokens scored 9.3 (BENCHMARKS.md).
SPIKE_GUARD = 6.0

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
    #   max_steps 8,870     the reference's 19,073 steps / 2.15, the token saving the CPU gate measured
    #                       at tiny scale (3 seeds). Not measured at 124M. --demo keeps its own 120.
    # The warmup is left to the preset (715 steps at 124M, 10 in --demo); the gate found a short one
    # (2% of the steps) slightly better at tiny scale. NONE of this is tuned at 124M scale.
    "fast": dict(
        optimizer="muon",
        schedule="wsd",
        muon_lr=0.02,
        muon_momentum=0.95,
        decay_frac=0.3,
        max_lr=2.4e-3,
        max_steps=8_870,
    ),
}


@cli.sections(
    model="model",
    data_dir="data and outputs",
    tokens_per_step="batch",
    max_steps="optimisation",
    val_every="evaluation, sampling, checkpoints, logging",
    device="machine and speed levers",
)
@dataclass(frozen=True)
class TrainConfig:
    model: str = field("gpt2", "model size; a preset brings its context (tiny: 256)", choices=tuple(MODEL_PRESETS))
    init_from: str = field("", "start from OpenAI's weights via transformers (gpt2, gpt2-medium, ...)")
    data_dir: str = field(cli.DEFAULT_DATA_DIR, "folder of token shards written by fineweb.py")
    log_dir: str = field(cli.DEFAULT_LOG_DIR, "folder for metrics.jsonl and checkpoints")
    shuffle: bool = field(True, "shuffle shards and windows each epoch (off: the reference's order)")
    # Sizes in tokens and rows; gradient accumulation is derived from them and the world size, never set.
    # 2**19 = 524,288: GPT-3 small's 0.5M tokens per step.
    tokens_per_step: int = field(524_288, "tokens per optimizer step, all ranks together", above=0)
    # auto: the largest of 64, 32, ... that this device's free memory holds by memory.py's formula (then,
    # on one CUDA process or DDP, one real forward and backward at it); tokens_per_step stays the same.
    micro_batch_size: int = field(0, "sequences per forward/backward on each rank", auto=True, at_least=0)
    seq_len: int = field(1024, "tokens per sequence (default: the model's context)", above=0)
    # GPT-3 small's settings, as in the reference: 19,073 x 524,288 = 10B tokens (one epoch of
    # sample-10BT), 715 warmup steps = 375M tokens, cosine to 10% of the peak.
    max_steps: int = field(19_073, "optimizer steps", above=0)
    warmup_steps: int = field(715, "linear warmup steps", at_least=0)
    max_lr: float = field(6e-4, "peak learning rate", above=0)
    min_lr_frac: float = field(0.1, "final learning rate as a fraction of --max-lr", at_least=0, at_most=1)
    weight_decay: float = field(0.1, "AdamW weight decay, on tensors of 2+ dims only", at_least=0)
    beta1: float = field(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = field(0.95, "AdamW beta2", at_least=0, below=1)
    eps: float = field(1e-8, "AdamW epsilon", above=0)
    grad_clip: float = field(1.0, "clip the global gradient norm to this (0: off)", at_least=0)
    schedule: str = field("cosine", "lr schedule: cosine (reference) or wsd (warmup-stable-decay)", ("cosine", "wsd"))
    decay_frac: float = field(0.2, "wsd: fraction of the steps in the final decay", above=0, at_most=1)
    # muon: Muon on the blocks' matrices; embeddings, LayerNorms and biases stay on AdamW at --max-lr.
    optimizer: str = field("adamw", "adamw (reference) or muon", choices=("adamw", "muon"))
    muon_lr: float = field(0.02, "muon: peak learning rate of the matrices", above=0)
    muon_momentum: float = field(0.95, "muon: momentum (Nesterov)", at_least=0, below=1)
    recipe: str = field("", "named recipe: optimizer, schedule, rates, steps (RECIPES)", choices=("", *RECIPES))
    seed: int = field(1337, "seed for init and data order", at_least=0)
    # Every evaluation also runs at the last step. The validation set is fixed: the first N tokens of the
    # val shard; 10,485,760 = the reference's 20 x 64 x 1024 on each of 8 GPUs.
    val_every: int = field(250, "validate every N steps (0: off)", at_least=0)
    val_tokens: int = field(10_485_760, "validation tokens (the val shard's first N)", above=0)
    hellaswag_every: int = field(250, "HellaSwag (reference style) every N steps (0: off)", at_least=0)
    # CORE: DCLM's 22 in-context tasks (core.py). nanochat runs it every 2000 steps on 500 per task.
    core_every: int = field(0, "CORE every N steps (0: off)", at_least=0)
    core_max_per_task: int = field(500, "CORE: the first N of each task's examples (0: all ~90k)", at_least=0)
    core_data: str = field(cli.DEFAULT_CORE_DATA, "CORE task files (uv run core.py --download-only)")
    core_verify: bool = field(True, "check each CORE task file's size and hash (off: hand-made files)")
    hellaswag_data: str = field(cli.DEFAULT_HELLASWAG_DATA, "HellaSwag file (uv run hellaswag.py --download-only)")
    sample_every: int = field(250, "print samples every N steps (0: off)", at_least=0)
    sample_prompt: str = field("Hello, I'm a language model,", "prompt of the in-training samples")
    # Also at the end, on SIGTERM / SIGUSR1 and on the first Ctrl-C.
    ckpt_every: int = field(1000, "checkpoint every N steps (0: only at the end)", at_least=0)
    keep_checkpoints: int = field(3, "keep the newest K step checkpoints (and the final one)", at_least=1)
    # A step whose loss is N standard deviations above the last --spike-window steps' is not applied
    # (spike_guard.py); SPIKE_GUARD says where 6 comes from.
    spike_guard: float = field(SPIKE_GUARD, "skip a step whose loss is N std above the window (0: off)", at_least=0)
    spike_guard_norm: float = field(0.0, "also skip on the grad norm, N std above (0: off)", at_least=0)
    spike_window: int = field(100, "steps of history the spike guard compares with")
    spike_warmup: int = field(50, "steps of history before the guard may skip", at_least=2)
    log_every: int = field(1, "log (and sync with the device) every N steps", at_least=1)
    tensorboard: bool = field(False, "mirror the records to TensorBoard (uv sync --extra loggers)")
    wandb: bool = field(False, "mirror the records to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = field("gpt2-fineweb", "Weights & Biases project")
    resume: str = field("auto", "auto: continue from the newest checkpoint; never: start fresh", ("auto", "never"))
    # On purpose, e.g. a new data order after a loss spike: checkpoint.RESUME_REFUSED lists what it allows.
    allow_config_change: bool = field(False, "resume although the batch, data order or data changed")
    # Speed levers: bench/throughput.py measures each; none changes the math beyond rounding.
    device: str = field("auto", cli.DEVICE_HELP, choices=cli.DEVICE_CHOICES)
    compile: bool = field(True, "torch.compile the model (CUDA; on CPU see --compile-on-cpu)")
    compile_on_cpu: bool = field(False, "compile on CPU too (inductor: the compiled path's tests)")
    # reduce-overhead and max-autotune capture CUDA graphs: one micro-step per rank only.
    compile_mode: str = field("default", "torch.compile mode", choices=cli.COMPILE_MODES)
    # auto: bf16 autocast where the GPU has bf16 units (sm80+), fp16 with loss scaling on older GPUs,
    # float32 on CPU and MPS (runtime.auto_precision); bf16 or fp16 asks for that policy on any device.
    precision: str = field("auto", "autocast precision", choices=cli.PRECISIONS)
    attn_backend: str = field("auto", "attention kernel (auto: PyTorch picks)", choices=cli.ATTENTION_KERNELS)
    loss_chunk_rows: int = field(0, "lm_head + loss in chunks of N rows, no full logits (0: off)", at_least=0)
    fused_adamw: bool = field(True, "fused AdamW kernel on CUDA")
    activation_checkpointing: bool = field(False, "recompute each block in backward (less memory)")
    # ddp: the whole model on every GPU (the reference); fsdp: FSDP2, weights, gradients and optimizer
    # state sharded (gpt2-large/xl).
    parallel: str = field("ddp", "how the model is spread over ranks", choices=cli.STRATEGIES)
    ddp_bucket_mb: int = field(25, "DDP gradient all-reduce bucket size in MB", at_least=1)
    memory_check: bool = field(True, "refuse at start a run memory.py says cannot fit")
    # For MFU on a GPU runtime.PEAK_TFLOPS does not list (it says so once): its dense peak at the run's precision.
    peak_tflops: float = field(0.0, "the GPU's peak TFLOP/s for MFU (0: runtime's table)", at_least=0)
    plan: bool = field(False, "print what this command would do here (memory, speed, time) and exit")
    # 30 covers rank 0 writing a gpt2-xl checkpoint (~19 GB) at >= 11 MB/s while the others wait.
    dist_timeout_minutes: int = field(30, "how long a rank waits in a collective", at_least=1)
    demo: bool = field(False, "CPU demo: the tiny model on the corpus in assets/demo (minutes)")

    def __post_init__(self):
        """One-line errors for settings that can never work, raised while parsing (before any process
        group, data or folder is touched). What depends on the world size: check_world_size."""
        cli.check_bounds(self)  # each field's own range (its metadata): one line naming the flag
        if self.micro_batch_size and self.tokens_per_step % (self.micro_batch_size * self.seq_len):
            raise UserError(
                f"--tokens-per-step {self.tokens_per_step} is not a multiple of micro-batch x seq-len = "
                f"{self.micro_batch_size} x {self.seq_len}: change one of them"
            )
        if self.seq_len > context_length(self.model):
            raise UserError(
                f"--seq-len {self.seq_len} exceeds the {self.model} model's context of {context_length(self.model)}"
            )
        if self.warmup_steps > self.max_steps:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be between 0 and --max-steps {self.max_steps}")
        if self.attn_backend == "math" and self.compile_mode != "default":
            raise UserError(
                f"--attn-backend math compiles with inductor's pattern matcher off (else it fuses the math "
                f"kernel back into PyTorch's fused attention), which torch.compile cannot combine with "
                f"--compile-mode {self.compile_mode}: use the default mode, or --no-compile"
            )
        if self.compile_mode in cli.WITHOUT_CUDA_GRAPHS and self.parallel == "fsdp":
            # FSDP2 compiles block by block, and the evaluations run the same blocks: every eval shape
            # would be captured and replayed as a graph too (and the all-gathers between them are not).
            raise UserError(
                f"--compile-mode {self.compile_mode} captures CUDA graphs, which --parallel fsdp does not take here: "
                f"use --compile-mode {cli.WITHOUT_CUDA_GRAPHS[self.compile_mode]}"
            )
        if self.val_every and self.val_tokens < self.seq_len:
            raise UserError(f"--val-tokens {self.val_tokens} is shorter than one sequence ({self.seq_len})")
        if self.spike_warmup > self.spike_window:
            raise UserError(f"--spike-warmup {self.spike_warmup} must be at most --spike-window {self.spike_window}")

    @property
    def model_config(self) -> GPTConfig:
        from model import GPTConfig  # torch: imported where a model is built, not where flags are parsed

        return GPTConfig(**MODEL_PRESETS[self.model])

    def check_world_size(self, world_size: int) -> None:
        """What depends on the number of ranks (known from torchrun's environment before any process
        group): the step must split evenly, and CUDA graphs need one micro-step per rank. An auto
        micro-batch is checked again once chosen (train_gpt2.choose_micro_batch)."""
        rows = max(self.micro_batch_size, 1) * self.seq_len * world_size
        if self.tokens_per_step % rows:
            raise UserError(
                f"--tokens-per-step {self.tokens_per_step} is not a multiple of micro-batch x seq-len x world size "
                f"= {self.micro_batch_size} x {self.seq_len} x {world_size} = {rows}: lower --micro-batch-size"
            )
        accumulation = self.grad_accum_steps(world_size) if self.micro_batch_size else 0
        if self.compile_mode in cli.WITHOUT_CUDA_GRAPHS and accumulation > 1:
            # A CUDA graph replays into the same output memory: the gradients of micro-step 1 are
            # overwritten by micro-step 2's before they are summed (torch 2.15 raises; older versions
            # summed silently wrong gradients, pytorch/pytorch#96693).
            raise UserError(
                f"--compile-mode {self.compile_mode} uses CUDA graphs, which cannot accumulate gradients, and this run "
                f"has {accumulation} micro-steps per rank: use --compile-mode max-autotune-no-cudagraphs (or default), "
                f"or make --tokens-per-step = --micro-batch-size x --seq-len x {world_size} ranks"
            )

    def grad_accum_steps(self, world_size: int) -> int:
        return self.tokens_per_step // (self.micro_batch_size * self.seq_len * world_size)


def resolve_flags(flags: dict) -> dict:
    """Layer the presets: TrainConfig defaults < --demo < --recipe < flags given explicitly. A model
    preset brings its context length unless --seq-len is given."""
    layered = {}
    if flags.get("demo"):
        layered.update(DEMO_PRESET)
    if flags.get("recipe"):
        recipe = RECIPES[flags["recipe"]]
        layered.update({k: v for k, v in recipe.items() if not (k == "max_steps" and flags.get("demo"))})
    layered.update(flags)
    if "model" in flags and "seq_len" not in flags:
        layered["seq_len"] = min(TrainConfig.seq_len, context_length(flags["model"]))
    return layered


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    """The run's config from the command line; UserError (one line) for a value validation refuses.
    `description`: what --help prints above the flags (the trainer's docstring)."""
    return TrainConfig(**resolve_flags(parse_flags(build_parser(TrainConfig, description=description), argv)))
