"""The one-call GPU acceptance check: everything that matters about this repo on one GPU, in one run
of about 8 minutes, with the machine's own python3 (no uv, no `datasets`, no network).

    python3 bench/gpu_check.py --data-dir gpu_shards                  # on the GPU machine; OUT=... for the results
    uv run bench/gpu_check.py --dry-run --out /tmp/gpu_check          # the same script on CPU, tiny, minutes

Prepare the token shards on a CPU machine first (fineweb.py needs `datasets`), then carry the folder
(and, for the full HellaSwag timing, hellaswag/hellaswag_val.jsonl) to the GPU machine:

    uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards --shard-size 200000

It runs the repo's own scripts (train_gpt2.py, hellaswag.py, core.py, export_hf.py, bench/throughput.py) in
subprocesses, one after the other, most valuable first, each with a time limit cut to what is left of
--budget, so a hang cannot eat the rest and nothing is killed by the machine's own limit:

  1 environment   GPU, memory, driver, torch / CUDA, the SDPA kernel PyTorch picks for GPT-2's shapes
  2 train         GPT-2 124M, compiled, bf16: 100 steps of 65,536 real tokens; the loss must fall by 3;
                  validation, in-training HellaSwag, in-training CORE (the stand-in tasks, through the
                  compiled model) and samples run, checkpoints at 50 and the end
  3 resume        from the step-50 checkpoint in a new process: steps 50-99 again, train losses within
                  RESUME_TOLERANCE of the first run's (bitwise is not promised on a GPU); SKIPPED when
                  the train run left no step-50 checkpoint
  4 hellaswag     hellaswag.py, compiled: the full 10,042 examples when --hellaswag gives the file,
                  else the 300 shipped ones; examples/s
  5 core          core.py, eager, then compiled (--compile) when time is left: CORE at 500 examples per
                  task with --core-data (the real task files), else the shipped stand-ins (the path and
                  examples/s only)
  6 export        export_hf.py, then transformers' GPT2LMHeadModel on the GPU: logits within 1e-4 (fp32)
  7 fp16          the tiny model in fp16 with loss scaling, eager, 20 steps: the scaler on real CUDA
                  (what a V100 or T4 runs); the loss falls, its scale is checkpointed
  8 throughput    bench/throughput.py at T=1024, 4 micro-steps of 64, one process per row: the reference trainer's
                  settings (compile off, fused AdamW, plain loss), our defaults (compile on), then each
                  lever. Only those two rows are required: a lever that runs out of memory, cannot run
                  these shapes or outruns its time reads "not measured: <why>"
  9 bigger models gpt2-medium and gpt2-xl under --parallel fsdp: what fits, and at what speed

Results: <out>/gpu_check.json and <out>/gpu_check.log, <out> being --out, else $OUT, else
gpu_check_out. The JSON is rewritten (atomically) after every check and every throughput row, with
"finished": false until the end, so a run cut off anywhere still tells what it measured. The output
folder holds those two files only (the tool that lends GPUs returns at most 8 files of 16 MiB): the
checkpoints (~1.5 GB each at 124M), the HF export and the subprocesses' full output go to a work
folder outside it (a fresh temp folder, deleted at the end unless --keep-work), and the log keeps
each subprocess's first LOG_HEAD_BYTES and last LOG_TAIL_BYTES per stream, LOG_LIMIT_BYTES in all.
Exit 0 when the run finished and every check that ran passed. --dry-run: the tiny preset, a few
steps, the CPU, eager: the same checks and JSON (`uv run pytest --heavy tests/test_gpu_check.py` runs
it, before every GPU session, so the script cannot rot between them).

Every check stands alone. The evaluations (hellaswag, core, export) read the newest checkpoint the
train runs left: the train run's model_final.pt, else the resume's (the same run, from step 50 to the
end), else the highest model_NNNNN.pt of either; with none, the first of them makes its own (one eager
step of GPT-2 124M, ~25 s) and the others reuse it. Each records which one it read ("checkpoint",
"checkpoint_step", "train_final") and passes if its own work is right: a train run cut at its cap
fails the train check, not four.

Time. The lending tool kills a command at 600 s and counts the machine's start in a session's 15
minutes, so the run must end in about 8.5 minutes. --budget (480 s) counts from this process's start
and is a deadline, not a hint: each subprocess's limit is min(its cap, what is left of the budget), a
check or row starts only if its `needs` is left (else: "time budget spent"), so the last one ends by
480 s and the rest (a kill, writing the JSON, deleting the work folder) takes seconds: ~8.1 minutes.
The caps and needs (STEPS below, throughput_settings) are estimates for a cold H100 (an H200 alike)
with torch 2.11, from these parts: ~10-15 s to start a Python process that imports torch and
initialises CUDA; ~40-60 s for inductor to compile GPT-2 124M's training step from a cold cache, ~15 s
each for validation, HellaSwag's and CORE's scoring and sampling's two graphs, 10-20 s for any graph
found in the cache; ~0.1 s per 65,536-token step; ~3 s per 1.5 GB checkpoint. So, in order:

  check              estimate  cap  needs
  environment            15     -     -
  train             170-280   240   150   150-260 s before CORE; in-training CORE adds ~20 s: the
                                           275 stand-in examples at step 0 (compiling) and at 100
  resume                 45   150    60   the cache warm
  (own checkpoint)       25    60    25   only when the train runs left none: added to the needs
                                           of the evaluation that makes it
  hellaswag              45   150    45
  core, eager            25   120    40
  core, compiled         45    90    45   + 115 kept: starts only with 160 s left, and its limit
                                           leaves export's needs and the two throughput rows' (40 + 30
                                           + 45); else "not measured: time budget spent"
  export                 30    90    40   plus 30 s kept for the comparison in this process
  fp16                   20    60    20   the tiny model, eager: a process start and 20 short steps
  throughput             75     -    30   the reference row (eager, ~30 s, needs 30) and the defaults
                                           row (the train run's shapes, cached: ~45 s, needs 45)
                                           always, then levers in order until the budget ends
  bigger models         240   300   120   two cold compiles of 24 and 48 layers

On the estimate (train ~170 s) the checks before throughput end at ~375 s: the two required rows fit,
and a lever only on a faster machine. With the train run at its 240 s cap they reach ~370 s without
the compiled core row (110 s left < 160: not measured), and export and both required rows still fit
(30 + 30 + 45 s); the evaluations read the resume's model_final.pt, else model_00050.pt. Bigger models
run only on a machine much faster than this estimate. Every check and row records its seconds in the
JSON: retune these numbers from a measured run.

Compiled kernels are shared: every subprocess uses torch's inductor cache (TORCHINDUCTOR_CACHE_DIR
if set, else torch's default per-user temp folder), so resume, hellaswag.py and the bench rows at
the train run's shapes load the train run's graphs instead of compiling them again, and a second run
on a machine still warm finds everything compiled. The environment check records whether the cache
held anything at the start (compile times depend on it).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

STARTED = time.monotonic()  # the budget counts from here: imports and data preparation spend it too
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import core_eval  # noqa: E402
import fileio  # noqa: E402
from cli import UserError, field, parse_config  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "hellaswag_val_300.jsonl"
CORE_FIXTURES = ROOT / "tests" / "data" / "core"  # one hand-written file per CORE task kind
RESUME_TOLERANCE = {"cuda": 0.02, "cpu": 0.0}  # |loss difference| per step after a resume
LOSS_DROP = {"cuda": 3.0, "cpu": 0.5}  # the train loss must fall at least this much (nats) (CPU: 10 tiny steps)
# The output folder comes back through a tool that returns at most 8 files of 16 MiB each. Per
# subprocess and stream, the log keeps the start (the command's settings, the first error) and the
# end (the traceback, the result rows); ~14 subprocesses x 2 streams x 220 KB < 7 MB, and the whole
# log stops at LOG_LIMIT_BYTES whatever happens.
LOG_HEAD_BYTES, LOG_TAIL_BYTES, LOG_LIMIT_BYTES = 20_000, 200_000, 8 * 2**20
NOT_MEASURED = "not measured: "


class Step(NamedTuple):
    cap: float  # the most seconds its subprocess may run (also cut to what is left of the budget)
    needs: float  # it starts only with this many seconds of the budget left


# The checks before throughput (see "Time" above for where each number comes from). The export's
# subprocess also leaves EXPORT_COMPARE_S for loading both models and comparing logits here.
STEPS = {
    "train": Step(240, 150),
    "resume": Step(150, 60),
    "own checkpoint": Step(60, 25),  # one eager step and one save, for an evaluation the train runs left nothing
    "hellaswag": Step(150, 45),
    "core": Step(120, 40),
    "core compiled": Step(90, 45),  # one new process, the eval graphs maybe cached by the train run's CORE
    "export": Step(90, 40),
    "memory formula": Step(60, 10),
    "fp16": Step(60, 20),  # one process, eager: ~15 s to start, 20 tiny steps, one checkpoint
    "bigger models": Step(300, 120),
}
# The fp16 check: the tiny model, eager, 2 micro-steps a step (the scaler across an accumulation):
# 20 steps of 8 x 256 on the GPU, the loss scaler on real CUDA once, in seconds. A dry run takes 4
# steps of 2 x 32: a CPU has no fp16 matmul units (a step of 4,096 tokens took 84 s on 2 cores).
FP16_RUN = {
    "cuda": {"model": "tiny", "seq_len": 256, "micro_batch_size": 8, "tokens_per_step": 4096, "warmup_steps": 2},
    "cpu": {"model": "tiny", "seq_len": 32, "micro_batch_size": 2, "tokens_per_step": 128, "warmup_steps": 2},
}
FP16_STEPS = {"cuda": 20, "cpu": 4}
EXPORT_COMPARE_S = 30
# The train check's log dir, then the resume check's (the same run from its middle checkpoint to the
# end): an evaluation check reads the newest checkpoint either left, so one run cut at its cap costs
# that check alone, not the four that read its model_final.pt.
TRAIN_DIRS = ("run", "resumed")
OWN_DIR = "own"  # where an evaluation check makes its own checkpoint when those hold none
OWN_ROWS = 8  # its micro-batch: one step of 8 x 1024 tokens (~1 s eager on a GPU) is all it trains


@dataclass(frozen=True)
class CheckConfig:
    data_dir: str = field(
        "", "token shards from fineweb.py (default: made from the demo corpus here, if `datasets` is installed)"
    )
    hellaswag: str = field(
        "", "the full hellaswag_val.jsonl for the full-set timing (default: the 300 shipped examples)"
    )
    core_data: str = field(
        "",
        "CORE's task files (`uv run core.py --download-only`; a partial set is scored as CORE-PARTIAL) "
        "for a real CORE at 500 per task (default: stand-ins from the shipped test fixtures: the path and speed only)",
    )
    out: str = field("", "where gpu_check.json and gpu_check.log go (default: $OUT, else gpu_check_out)")
    work_dir: str = field(
        "",
        "checkpoints, exports and full logs, outside --out (default: a fresh temp folder, deleted at the end unless "
        "--keep-work; a folder given here is kept)",
    )
    keep_work: bool = field(False, "keep the work folder (checkpoints: ~1.5 GB each at 124M)")
    budget: int = field(480, "seconds from the start by which every check has ended (the lending tool kills at 600 s)")
    dry_run: bool = field(False, "the tiny preset on the CPU, a few steps, eager: the same checks, for CI")

    def __post_init__(self):
        if self.budget < 1:
            raise UserError("--budget must be at least 1 second")


# Sizes of each check, GPU vs dry run. The GPU's are the reference model at its context; the dry
# run's keep every check's code path on a 2-core CPU in about two and a half minutes.
GPU_RUN = dict(
    model="gpt2",
    seq_len=1024,
    micro_batch_size=64,
    tokens_per_step=65_536,
    max_steps=100,
    warmup_steps=10,
    max_lr=6e-4,
    val_every=50,
    val_tokens=131_072,
    ckpt_every=50,
    hellaswag_every=100,
    sample_every=100,
    device="cuda",
)
DRY_RUN = dict(
    model="tiny",
    seq_len=64,
    micro_batch_size=4,
    tokens_per_step=512,
    max_steps=10,
    warmup_steps=2,
    max_lr=3e-3,
    val_every=5,
    val_tokens=2048,
    ckpt_every=5,
    hellaswag_every=10,
    sample_every=10,
    device="cpu",
)
GPU_BENCH = [
    "--model",
    "gpt2",
    "--seq-len",
    "1024",
    "--micro-batch-size",
    "64",
    "--tokens-per-step",
    "262144",
    "--steps",
    "6",
    "--warmup",
    "2",
    "--device",
    "cuda",
]
DRY_BENCH = [
    "--model",
    "tiny",
    "--seq-len",
    "64",
    "--micro-batch-size",
    "2",
    "--tokens-per-step",
    "256",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
]


class Setting(NamedTuple):
    name: str
    flags: list[str]  # bench/throughput.py's, after the base sizes
    step: Step


def throughput_settings(dry_run: bool) -> list[Setting]:
    """The bench/throughput.py rows in order of value: the reference trainer's settings, ours, then one lever at
    a time, cheapest first where the value is alike (a lever whose graph is the defaults' is found in
    the inductor cache; each new graph is a cold compile, ~60 s). A dry run keeps the rows whose code
    path differs (a sweep, a second strategy); the other levers are plain bench/throughput.py flags, tested in
    tests/test_bench.py, at ~8 s of CI per process."""
    micro_batches = "1,4" if dry_run else "32,128"
    rows = [
        # eager: ~15 s to start, 8 steps of ~0.8 s, one profiled step for the attention kernel
        Setting(
            "reference settings (compile off, fused AdamW, plain loss)",
            ["--no-compile", "--spike-guard", "0"],
            Step(90, 30),
        ),
        Setting("defaults (compile on)", [], Step(150, 45)),  # the train run's shapes: cached, ~70 s if cold
        Setting("lever: --spike-guard 0 (no per-step sync)", ["--spike-guard", "0"], Step(120, 40)),  # the same graph
        Setting("lever: --loss-chunk-rows 8192", ["--loss-chunk-rows", "8192"], Step(150, 75)),  # one new graph
        Setting("lever: attention kernels", ["--sweep", "attn_backend=flash,cudnn,efficient,math"], Step(300, 120)),
        Setting(
            f"lever: micro-batch {micro_batches.replace(',', ' / ')}",
            ["--sweep", f"micro_batch_size={micro_batches}"],
            Step(240, 100),
        ),  # two new shapes
        Setting("--optimizer muon", ["--optimizer", "muon"], Step(150, 60)),  # the model's graph is cached
        Setting("--parallel ddp vs fsdp (one GPU)", ["--sweep", "parallel=ddp,fsdp"], Step(200, 90)),
    ]
    dry_rows = ("reference", "defaults", "lever: attention", "--parallel")
    return [row for row in rows if row.name.startswith(dry_rows)] if dry_run else rows


# Bigger models under FSDP2 on the one GPU (world size 1: the code path, compile, memory): the
# measured peak next to bench/memory_table.py's prediction for the same setting.
BIGGER_GPU = dict(models=("gpt2-medium", "gpt2-xl"), micro_batch_size=8, seq_len=1024, precision="bf16")
BIGGER_DRY = dict(models=("tiny",), micro_batch_size=2, seq_len=64, precision="fp32")


# ---- running the scripts ------------------------------------------------------------------------
class Ran(NamedTuple):
    code: int  # the exit status; 124: killed at its time limit
    output: str  # stdout then stderr, each clipped as the log keeps it
    timeout: float  # the limit it ran under


def read_clipped(path: Path, head: int = LOG_HEAD_BYTES, tail: int = LOG_TAIL_BYTES) -> str:
    """A file's first `head` and last `tail` bytes, with a marker saying how much was cut between."""
    if not path.exists():
        return ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= head + tail:
            return f.read().decode("utf-8", errors="replace")
        first = f.read(head)
        f.seek(size - tail)
        last = f.read()
    return (
        first.decode("utf-8", errors="replace")
        + f"\n[... {size - head - tail} bytes cut ...]\n"
        + last.decode("utf-8", errors="replace")
    )


class BoundedLog:
    """gpu_check.log, which stops at `limit` bytes with a line saying so."""

    def __init__(self, path: Path, limit: int = LOG_LIMIT_BYTES):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.written, self.limit, self.full = 0, limit, False

    def write(self, text: str) -> None:
        if self.full:
            return
        data = text.encode("utf-8", errors="replace")
        if self.written + len(data) > self.limit:
            self.full = True
            text = f"\n[gpu_check.log reached {self.limit} bytes: nothing more is logged]\n"
        self.file.write(text)
        self.file.flush()
        self.written += len(data)

    def close(self) -> None:
        self.file.close()


def die_with_parent(parent_pid: int):
    """preexec_fn (Linux): the child gets SIGKILL when gpu_check dies, killed by the lending tool or
    a test, so no orphan keeps the GPU busy or writes into a work folder being read. prctl is looked
    up here, in the parent: between fork and exec the child (of a process with torch's threads) does
    as little as it can."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def arm():
        if prctl is not None:
            prctl(pr_set_pdeathsig, sigkill)
            if os.getppid() != parent_pid:  # the parent died before the line above
                os._exit(1)

    return arm


class Checker:
    """Runs the checks in order within the budget; records each one's verdict, numbers and log, and
    rewrites gpu_check.json after each."""

    def __init__(self, cfg: CheckConfig, out: Path, work: Path, config: dict, started: float = STARTED):
        self.cfg, self.out, self.work, self.config, self.started = cfg, out, work, config, started
        self.results: list[dict] = []
        self.running: dict | None = None  # the check under way, with what it has measured so far
        self.log = BoundedLog(out / "gpu_check.log")
        self.device = "cpu" if cfg.dry_run else "cuda"
        self.runs = 0
        self.own: dict | None = None  # own_checkpoint's result (path or None, exit, seconds), once made or tried
        self.save()

    def left(self) -> float:
        return self.cfg.budget - (time.monotonic() - self.started)

    def run(self, name: str, args: list[str], step: Step, reserve: float = 0.0) -> Ran:
        """One of the repo's scripts in a subprocess, stopped at min(step.cap, what is left of the
        budget less `reserve`); its full output goes to the work folder, the clipped output to the log."""
        timeout = min(step.cap, self.left() - reserve)
        if timeout < 1:
            return Ran(124, "[not started: time budget spent]", 0.0)
        self.runs += 1
        stdout, stderr = (self.work / "output" / f"{self.runs:02d}.{stream}" for stream in ("stdout", "stderr"))
        stdout.parent.mkdir(parents=True, exist_ok=True)
        self.log.write(f"\n===== {name}: {' '.join(args)} (timeout {timeout:.0f} s)\n")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        start = time.monotonic()
        with open(stdout, "wb") as out_file, open(stderr, "wb") as err_file:
            # Its own process group, so a kill at the limit takes its workers (inductor's compilers) too.
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = 124
        seconds = time.monotonic() - start
        output = read_clipped(stdout) + read_clipped(stderr)
        if code == 124:
            output += f"\n[killed after {seconds:.0f} s: its limit was {timeout:.0f} s]\n"
        self.log.write(output + f"\n===== {name}: exit {code} after {seconds:.1f} s\n")
        return Ran(code, output, timeout)

    def check(self, name: str, fn, needs: float = 0.0) -> None:
        """Run fn() -> (passed, numbers) if `needs` seconds of the budget are left; never let one check
        stop the rest. passed None: SKIPPED, with numbers["reason"] (nothing for it to check)."""
        if self.left() < needs:
            self.results.append(
                {
                    "check": name,
                    "verdict": "SKIPPED",
                    "reason": "time budget spent",
                    "needs_s": needs,
                    "left_s": round(self.left(), 1),
                }
            )
            self.save()
            return
        start = time.monotonic()
        self.running = {"check": name, "verdict": "RUNNING"}
        self.save()
        try:
            passed, numbers = fn()
            verdict = "SKIPPED" if passed is None else "PASS" if passed else "FAIL"
        except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, and the next one runs
            verdict, numbers = (
                "FAIL",
                {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"},
            )
        result = {"check": name, "verdict": verdict, "seconds": round(time.monotonic() - start, 1), **numbers}
        self.results.append(result)
        self.running = None
        self.save()
        print(
            f"{verdict:7s} {name:12s} {json.dumps({k: v for k, v in result.items() if k not in ('check', 'verdict')})}",
            flush=True,
        )

    def progress(self, numbers: dict) -> None:
        """What the running check has measured so far, saved at once (a throughput row at a time)."""
        if self.running is not None:
            self.running = {"check": self.running["check"], "verdict": "RUNNING", **numbers}
            self.save()

    def save(self, finished: bool = False) -> dict:
        """Write gpu_check.json as things stand: a temp file renamed over it, never half a file."""
        summary = {
            "config": self.config,
            "device": self.device,
            "seconds": round(time.monotonic() - self.started, 1),
            "finished": finished,
            "passed": finished and all(r["verdict"] in ("PASS", "SKIPPED") for r in self.results),
            "checks": self.results + ([self.running] if self.running else []),
        }
        fileio.atomic_write_json(self.out / "gpu_check.json", summary)
        return summary

    def finish(self) -> int:
        self.log.close()
        summary = self.save(finished=True)
        print(
            f"{'PASS' if summary['passed'] else 'FAIL'}: {sum(r['verdict'] == 'PASS' for r in self.results)} of "
            f"{len(self.results)} checks passed in {summary['seconds']:.0f} s; {self.out / 'gpu_check.json'}"
        )
        return 0 if summary["passed"] else 1


# ---- the checks ---------------------------------------------------------------------------------
def inductor_cache() -> dict:
    """Where every subprocess's compiled kernels go, and how many files it held at the start."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # moved in a later torch: the record goes without it
        return {}
    folder = Path(cache_dir())
    return {"inductor_cache": str(folder), "inductor_cache_files_at_start": sum(1 for _ in folder.rglob("*"))}


def environment(dry_run: bool) -> tuple[bool, dict]:
    import torch

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        **inductor_cache(),
    }
    if dry_run:
        return True, {**info, "device": "cpu"}
    if not torch.cuda.is_available():
        return False, {**info, "error": "no CUDA device visible"}
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        info["driver"] = out.stdout.strip()
    # The kernel PyTorch's SDPA picks for GPT-2 124M's attention (B 8, 12 heads, T 1024, head 64, bf16, causal).
    from throughput import detect_attention_kernel  # bench/throughput.py: bench/ is sys.path[0]

    q = torch.randn(8, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    attention()
    info["sdpa_kernel"] = detect_attention_kernel(attention)
    return True, info


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it was never written)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def json_rows(stdout: str) -> list[dict]:
    """The JSON rows bench/throughput.py --json prints among its human lines (one object per line; a line the
    log's clipping cut in two is not a row)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def metrics_of(log_dir: Path) -> list[dict]:
    return read_jsonl(log_dir / "metrics.jsonl")


def train_flags(sizes: dict) -> list[str]:
    flags = []
    for name, value in sizes.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def stand_in_core_data(ck: Checker) -> Path:
    """Every CORE task's file name holding the shipped fixture of its kind: 12-13 examples each, 275 in
    all, every one scored (each 10-shot example draws its shots from the other 11-12)."""
    return core_eval.stand_in_data_dir(ck.work / "core_data", CORE_FIXTURES)


def train(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    """In-training HellaSwag scores the 300 shipped examples (20 in a dry run): the full set is timed below.
    In-training CORE scores the stand-ins through the compiled model (fixed shapes, float32 logits at
    the scored tokens) with --core-every max_steps: at step 0 and at the end, as every evaluation also
    runs at step 0; the check requires the end's record."""
    log_dir = ck.work / "run"
    hellaswag = ck.work / "hellaswag_train.jsonl"
    lines = FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)
    hellaswag.write_text("".join(lines[:20] if ck.cfg.dry_run else lines), encoding="utf-8")
    core_flags = ["--core-every", str(sizes["max_steps"]), "--core-data", str(stand_in_core_data(ck))]
    # 0: every stand-in, 12-13 a task (a cut to 11 or fewer could not give a 10-shot example its shots)
    core_flags += ["--core-max-per-task", "0", "--no-core-verify"]
    ran = ck.run(
        "train",
        [
            "train_gpt2.py",
            *train_flags(sizes),
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(log_dir),
            "--hellaswag-data",
            str(hellaswag),
            *core_flags,
        ],
        STEPS["train"],
    )
    records = metrics_of(log_dir)
    losses = [r["train_loss"] for r in records if r["type"] == "train"]
    val = [r["val_loss"] for r in records if r["type"] == "val"]
    hs = [r for r in records if r["type"] == "hellaswag"]
    rates = [r["tokens_per_sec"] for r in records if r["type"] == "train"][1:]  # the first window holds the compile
    mfus = [r["mfu"] for r in records if r["type"] == "train" and r.get("mfu") is not None][1:]
    core = core_in_training(records, sizes["max_steps"])
    numbers = {
        "exit": ran.code,
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_losses": val,
        "hellaswag_acc_norm": hs[-1]["hellaswag_acc_norm"] if hs else None,
        "hellaswag_count": hs[-1]["count"] if hs else None,
        "core_in_training": core,
        "core_steps": [r["step"] for r in records if r["type"] == "core"],
        "samples": sum(r["type"] == "sample" for r in records),
        "tokens_per_sec": round(sum(rates) / len(rates)) if rates else None,
        "mfu": round(sum(mfus) / len(mfus), 4) if mfus else None,
        "checkpoints": sorted(p.name for p in log_dir.glob("model_*.pt")),
    }
    drop = LOSS_DROP[ck.device]
    numbers["loss_drop_required"] = drop
    passed = (
        ran.code == 0
        and len(losses) >= 2
        and losses[0] - min(losses[-3:]) >= drop
        and len(val) >= 2
        and val[-1] < val[0]
        and bool(hs)
        and core is not None
        and core["count"] > 0
        and numbers["samples"] >= 1
        and "model_final.pt" in numbers["checkpoints"]
    )
    return passed, numbers


def fp16(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    """A short eager run in fp16 with loss scaling (--precision fp16: what a V100 or T4 runs), so that
    the scaler runs on real CUDA once: the loss falls, nothing stops it, its scale is checkpointed."""
    log_dir, steps = ck.work / "fp16", FP16_STEPS[ck.device]
    quiet = {"val_every": 0, "hellaswag_every": 0, "sample_every": 0, "ckpt_every": 0, "max_steps": steps}
    flags = [*train_flags({**sizes, **FP16_RUN[ck.device], **quiet}), "--precision", "fp16", "--no-compile"]
    ran = ck.run(
        "fp16", ["train_gpt2.py", *flags, "--data-dir", str(data_dir), "--log-dir", str(log_dir)], STEPS["fp16"]
    )
    records = metrics_of(log_dir)
    losses = [r["train_loss"] for r in records if r["type"] == "train"]
    skipped = [r["reason"] for r in records if r["type"] == "skip"]
    scale = None
    final = log_dir / "model_final.pt"
    if final.exists():
        import checkpoint

        scale = checkpoint.load_file(final, required=checkpoint.TRAINING_KEYS).get("loss_scale")
    numbers = {"exit": ran.code, "steps": len(losses), "losses": losses, "skipped": skipped, "loss_scale": scale}
    passed = ran.code == 0 and len(losses) == steps and losses[-1] < losses[0] and scale is not None
    return passed, numbers


def core_in_training(records: list[dict], last_step: int) -> dict | None:
    """The train run's CORE record at its last step (None if it has none). Its seconds: the record's own
    if train_gpt2.py writes them, else the time since the record before it (each record carries its
    time; at the last step that is HellaSwag's, written just before CORE started)."""
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r["type"] != "core" or r["step"] != last_step:
            continue
        seconds = r.get("seconds")
        if seconds is None and i > 0 and "time" in r and "time" in records[i - 1]:
            seconds = round(r["time"] - records[i - 1]["time"], 1)
        return {
            "step": r["step"],
            "core": r["core"],
            "core_partial": r["core_partial"],
            "count": r["count"],
            "max_per_task": r.get("max_per_task"),
            "seconds": seconds,
        }
    return None


def resume(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool | None, dict]:
    """The first run's log dir as it was after its middle checkpoint, resumed in a new process.

    Without that checkpoint (the train run crashed, or its cap cut it before step ckpt_every) the check
    is SKIPPED, not remade: a resume is compared with a first run's losses after the checkpoint, so
    making its own means two train_gpt2.py processes (~2 x 25 s eager on a GPU) out of what the train
    run's 240 s cap left, which the evaluation checks after it put to better use; and the train check's
    FAIL already says that run went wrong."""
    first, again = ck.work / "run", ck.work / "resumed"
    middle = sizes["ckpt_every"]
    middle_checkpoint = first / f"model_{middle:05d}.pt"
    if not middle_checkpoint.exists():
        return None, {"reason": f"no middle checkpoint: the train run left no {middle_checkpoint.name}"}
    shutil.rmtree(again, ignore_errors=True)
    again.mkdir(parents=True)
    shutil.copy(middle_checkpoint, again / middle_checkpoint.name)
    ran = ck.run(
        "resume",
        [
            "train_gpt2.py",
            *train_flags({**sizes, "hellaswag_every": 0, "sample_every": 0}),
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(again),
        ],
        STEPS["resume"],
    )
    before = {r["step"]: r["train_loss"] for r in metrics_of(first) if r["type"] == "train" and r["step"] >= middle}
    after = {r["step"]: r["train_loss"] for r in metrics_of(again) if r["type"] == "train"}
    common = sorted(set(before) & set(after))
    worst = max((abs(before[s] - after[s]) for s in common), default=None)
    tolerance = RESUME_TOLERANCE[ck.device]
    passed = (
        ran.code == 0
        and "resuming from" in ran.output
        and len(common) >= 2
        and worst is not None
        and worst <= tolerance
    )
    return passed, {
        "exit": ran.code,
        "steps_compared": len(common),
        "max_loss_difference": worst,
        "tolerance": tolerance,
    }


# ---- the checkpoint an evaluation reads ---------------------------------------------------------
def pick_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint the train runs left (TRAIN_DIRS): a model_final.pt (the train run's before
    the resume's), else the model_NNNNN.pt of the highest step (checkpoint.paths' order); None if none."""
    import checkpoint

    found = [
        (step, -order, path)
        for order, folder in enumerate(TRAIN_DIRS)
        for step, path in checkpoint.paths(work / folder)
    ]
    return max(found, key=lambda t: t[:2])[2] if found else None


def own_checkpoint(ck: Checker, data_dir: Path, sizes: dict) -> dict:
    """A checkpoint of the check's own, made once per run (the checks after it reuse it, or its failure):
    the same model and context as the train run, one eager step (--no-compile: the ~50 s compile would
    be most of its cost) of OWN_ROWS sequences, no evaluation, then its model_final.pt. Untrained, it
    checks the evaluations' code path and speed, not their scores."""
    if ck.own is None:
        import checkpoint

        log_dir = ck.work / OWN_DIR
        shutil.rmtree(log_dir, ignore_errors=True)  # a kept --work-dir's old one would be resumed, not made
        rows = min(OWN_ROWS, sizes["micro_batch_size"])
        own = {**sizes, "micro_batch_size": rows, "tokens_per_step": rows * sizes["seq_len"], "max_steps": 1}
        own.update(warmup_steps=0, val_every=0, hellaswag_every=0, sample_every=0, ckpt_every=0)
        start = time.monotonic()
        ran = ck.run(
            "own checkpoint",
            [
                "train_gpt2.py",
                *train_flags(own),
                "--no-compile",
                "--data-dir",
                str(data_dir),
                "--log-dir",
                str(log_dir),
            ],
            STEPS["own checkpoint"],
        )
        final = log_dir / checkpoint.FINAL
        ck.own = {
            "path": final if ran.code == 0 and final.exists() else None,
            "exit": ran.code,
            "seconds": round(time.monotonic() - start, 1),
        }
    return ck.own


def eval_checkpoint(ck: Checker, data_dir: Path, sizes: dict) -> tuple[Path | None, dict]:
    """The checkpoint an evaluation check reads (pick_checkpoint, else own_checkpoint), and what its JSON
    says of it: the path in the work folder, its step, whether it is the train run's final one, and
    the seconds spent making it (in the check that made it)."""
    import checkpoint

    path = pick_checkpoint(ck.work)
    info = {}
    if path is None:
        made_now = ck.own is None
        own = own_checkpoint(ck, data_dir, sizes)
        if own["path"] is None:
            error = f"no checkpoint: the train runs left none, and making one failed (exit {own['exit']})"
            return None, {"checkpoint": None, "error": error}
        path = own["path"]
        if made_now:
            info["own_checkpoint_seconds"] = own["seconds"]
    return path, {
        "checkpoint": path.relative_to(ck.work).as_posix(),
        "checkpoint_step": checkpoint.read_step(path),
        "train_final": path == ck.work / TRAIN_DIRS[0] / checkpoint.FINAL,
        **info,
    }


def eval_needs(ck: Checker, name: str) -> float:
    """An evaluation check's needs, plus the own checkpoint's when it will have to make one."""
    making = ck.own is None and pick_checkpoint(ck.work) is None
    return STEPS[name].needs + (STEPS["own checkpoint"].needs if making else 0)


# ---- the evaluations ----------------------------------------------------------------------------
def hellaswag_eval(ck: Checker, hellaswag: Path, full: bool, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    model, used = eval_checkpoint(ck, data_dir, sizes)
    if model is None:
        return False, used
    extra = [] if full else ["--no-verify"]
    if ck.cfg.dry_run:
        extra += ["--limit", "20", "--device", "cpu"]
    else:
        extra += ["--compile"]
    ran = ck.run(
        "hellaswag",
        [
            "hellaswag.py",
            "--checkpoint",
            str(model),
            "--data",
            str(hellaswag),
            "--log-dir",
            str(ck.work / "hs"),
            *extra,
        ],
        STEPS["hellaswag"],
    )
    results = read_jsonl(ck.work / "hs" / "hellaswag_results.jsonl")
    if ran.code != 0 or not results:
        return False, {**used, "exit": ran.code}
    r = results[-1]
    return True, {
        **used,
        "count": r["count"],
        "eval_seconds": r["seconds"],
        "examples_per_sec": round(r["count"] / r["seconds"], 1),
        "acc_norm": r["acc_norm"],
        "harness_acc_norm": r["harness_acc_norm"],
        "full_set": full,
    }


def core_run(ck: Checker, name: str, model: Path, args: list[str], log_dir: Path, reserve: float = 0.0) -> dict:
    """One core.py process on `model` (args: its data and options): its result's numbers, or its exit."""
    ran = ck.run(
        name,
        ["core.py", "--checkpoint", str(model), *args, "--log-dir", str(log_dir)],
        STEPS[name],
        reserve=reserve,
    )
    results = read_jsonl(log_dir / "core_results.jsonl")
    if ran.code != 0 or not results:
        return {"exit": ran.code, "timeout": ran.timeout}
    r = results[-1]
    return {
        "core": r["core"],
        "core_partial": r["core_partial"],
        "missing": r["missing"],
        "count": r["count"],
        "eval_seconds": r["seconds"],
        "examples_per_sec": round(r["count"] / r["seconds"], 1),
    }


def after_core_compiled(dry_run: bool) -> float:
    """Seconds the compiled core row leaves to the checks after it worth more than its timing: export's
    needs and those of throughput's two required rows (reference, defaults): 40 + 30 + 45 = 115."""
    return STEPS["export"].needs + sum(row.step.needs for row in throughput_settings(dry_run)[:2])


def core(ck: Checker, core_data: str, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    """core.py on the checkpoint, eager, then again with --compile. With --core-data: 500 examples per
    task, CORE (or CORE-PARTIAL) and examples/s; without: the shipped fixtures under every task's name,
    which checks the path and the speed, not the score.

    The compiled row (fixed shapes: each batch padded to its full rows and a multiple of 32 tokens, so a
    few graphs; the number of scored tokens dynamic) runs only with its needs left beyond
    after_core_compiled(), within a limit that keeps those seconds (else "not measured: time budget
    spent"); out of time is not a failure, a crash is. Its eval_seconds include its compiles (a warm
    inductor cache: the train run's CORE graphs may be found there). core.py compiles on CUDA only: on
    the dry run's CPU --compile is ignored with a warning, and the row runs the same path eager
    ("compiled": false)."""
    model, used = eval_checkpoint(ck, data_dir, sizes)
    if model is None:
        return False, used
    if core_data:
        args = ["--data-dir", core_data, "--max-per-task", "500", "--allow-missing"]
    else:
        args = ["--data-dir", str(stand_in_core_data(ck)), "--no-verify"]
    if ck.cfg.dry_run:
        args += ["--device", "cpu"]
    eager = core_run(ck, "core", model, args, ck.work / "core")
    if "exit" in eager:
        return False, {**used, "exit": eager["exit"]}
    reserve = after_core_compiled(ck.cfg.dry_run)
    if ck.left() < STEPS["core compiled"].needs + reserve:
        compiled = {"result": NOT_MEASURED + "time budget spent"}
    else:
        compiled = core_run(ck, "core compiled", model, [*args, "--compile"], ck.work / "core_compiled", reserve)
        if compiled.get("exit") == 124:
            compiled = {"result": NOT_MEASURED + f"killed at its time limit ({compiled['timeout']:.0f} s)"}
        elif "exit" in compiled:
            compiled = {"error": f"core.py --compile: exit {compiled['exit']}"}
        else:
            compiled["compiled"] = ck.device == "cuda"
    speedup = compiled["examples_per_sec"] / eager["examples_per_sec"] if "examples_per_sec" in compiled else None
    numbers = {**used, **eager, "real_data": bool(core_data), "compiled": compiled}
    numbers["compiled_vs_eager"] = round(speedup, 3) if speedup is not None else None
    return "error" not in compiled, numbers


def export(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    model, used = eval_checkpoint(ck, data_dir, sizes)
    if model is None:
        return False, used
    out_dir = ck.work / "hf"
    ran = ck.run(
        "export",
        ["export_hf.py", "--checkpoint", str(model), "--out-dir", str(out_dir)],
        STEPS["export"],
        reserve=EXPORT_COMPARE_S,
    )
    if ran.code != 0:
        return False, {**used, "exit": ran.code}
    import torch
    from transformers import GPT2LMHeadModel

    import checkpoint

    device = torch.device(ck.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # parity in true fp32
    ours = checkpoint.load_model(model).to(device)
    theirs = GPT2LMHeadModel.from_pretrained(out_dir).to(device).eval()
    idx = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    del ours, theirs
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the bench rows measure what fits: this process keeps none of the GPU
    return diff < 1e-4, {**used, "max_logit_difference": diff, "tolerance": 1e-4}


ROW_KEYS = (
    "model",
    "attn_backend",
    "micro_batch_size",
    "parallel",
    "tokens_per_sec",
    "mfu",
    "step_ms",
    "peak_memory_gb",
    "attention",
    "compile",
    "error",
)


def classify_bench(setting: str, code: int, output: str, timeout: float) -> list[dict]:
    """bench/throughput.py's rows for one setting, each measured (its numbers), "not measured: <why>" in "result"
    (out of memory: a measurement of what fits; an attention kernel that cannot run these shapes;
    killed at its time limit, after the rows it printed), or an "error" (a crash: a bug)."""
    rows = []
    for printed in json_rows(output):
        row = {"setting": setting, **{k: printed[k] for k in ROW_KEYS if k in printed}}
        error = row.pop("error", None)
        if error is None:
            rows.append(row)
        elif "out of memory" in error.lower():
            rows.append({**row, "result": NOT_MEASURED + error})
        elif setting.startswith("lever: attention"):
            rows.append({**row, "result": NOT_MEASURED + f"this kernel cannot run these shapes: {error}"})
        else:
            rows.append({**row, "error": error})
    if code == 124:
        rows.append({"setting": setting, "result": NOT_MEASURED + f"killed at its time limit ({timeout:.0f} s)"})
    elif code not in (0, 2, 3) or not rows:  # 2 / 3: bench/throughput.py's own exits after an error / out-of-memory row
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        rows.append({"setting": setting, "error": f"exit {code}: {last.strip()[:300]}"})
    return rows


def measured(row: dict) -> bool:
    return "error" not in row and "result" not in row


def throughput_passed(rows: list[dict]) -> bool:
    """The reference and defaults rows measured, and no row an error: a lever not measured (out of
    memory, no such kernel here, no time left) is an answer, not a failure."""
    required = ("reference", "defaults")
    return all(any(r["setting"].startswith(name) and measured(r) for r in rows) for name in required) and not any(
        "error" in r for r in rows
    )


def throughput(ck: Checker) -> tuple[bool, dict]:
    """Each setting in its own bench/throughput.py process (a hang or a crash costs that setting only), in
    order of value; a setting that does not have its `needs` left of the budget is not started."""
    rows = []
    base = DRY_BENCH if ck.cfg.dry_run else GPU_BENCH
    for setting in throughput_settings(ck.cfg.dry_run):
        if ck.left() < setting.step.needs:
            rows.append({"setting": setting.name, "result": NOT_MEASURED + "time budget spent"})
            continue
        start = time.monotonic()
        ran = ck.run(
            f"throughput: {setting.name}", ["bench/throughput.py", *base, *setting.flags, "--json"], setting.step
        )
        new = classify_bench(setting.name, ran.code, ran.output, ran.timeout)
        for row in new:
            row["process_seconds"] = round(time.monotonic() - start, 1)
        rows += new
        ck.progress({"rows": rows})
    reference = next((r for r in rows if r["setting"].startswith("reference") and measured(r)), None)
    ours = next((r for r in rows if r["setting"].startswith("defaults") and measured(r)), None)
    speedup = round(ours["tokens_per_sec"] / reference["tokens_per_sec"], 3) if reference and ours else None
    return throughput_passed(rows), {"rows": rows, "defaults_vs_reference": speedup}


def bigger_models(ck: Checker) -> tuple[bool, dict]:
    """gpt2-medium and gpt2-xl steps under --parallel fsdp (tiny in a dry run), one bench/throughput.py process;
    each row's peak memory with the formula's prediction (on the CPU the peak is the whole process's).
    A model that runs out of memory or out of time is "not measured": that is what fits, not a bug."""
    sizes = BIGGER_DRY if ck.cfg.dry_run else BIGGER_GPU
    mbs, seq_len = sizes["micro_batch_size"], sizes["seq_len"]
    base = DRY_BENCH if ck.cfg.dry_run else GPU_BENCH
    predictions = ck.work / "memory_table.jsonl"
    formula = ck.run(
        "bigger models: the formula",
        [
            "bench/memory_table.py",
            "--models",
            *sizes["models"],
            "--gpus",
            "1",
            "--micro-batch-sizes",
            str(mbs),
            "--seq-len",
            str(seq_len),
            "--precision",
            sizes["precision"],
            "--json-out",
            str(predictions),
        ],
        STEPS["memory formula"],
    )
    predicted = {
        r["model"]: r["total"]
        for r in read_jsonl(predictions)
        if r["parallel"] == "fsdp" and not r["activation_checkpointing"]
    }
    name = "bigger models: --parallel fsdp"
    ran = ck.run(
        name,
        [
            "bench/throughput.py",
            *base,
            "--parallel",
            "fsdp",
            "--micro-batch-size",
            str(mbs),
            "--seq-len",
            str(seq_len),
            "--tokens-per-step",
            str(mbs * seq_len),
            "--sweep",
            "model=" + ",".join(sizes["models"]),
            "--json",
        ],
        STEPS["bigger models"],
    )
    rows = [
        {k: v for k, v in row.items() if k != "setting"}
        for row in classify_bench(name, ran.code, ran.output, ran.timeout)
    ]
    # A row for no model in particular (killed at the limit, a crash) stands for each model without a row.
    missing = [m for m in sizes["models"] if m not in {r.get("model") for r in rows}]
    loose = [r for r in rows if "model" not in r]
    if loose and missing:
        rows = [r for r in rows if "model" in r] + [{"model": m, **r} for r in loose for m in missing]
    for row in rows:
        row["predicted_gib"] = round(predicted[row["model"]], 2) if row.get("model") in predicted else None
    ok = formula.code == 0 and not any("error" in r for r in rows)
    return ok, {"rows": rows, "micro_batch_size": mbs, "seq_len": seq_len, "formula_exit": formula.code}


# ---- the run ------------------------------------------------------------------------------------
def prepare_data(cfg: CheckConfig, work: Path) -> Path:
    if cfg.data_dir:
        if not Path(cfg.data_dir).is_dir():
            raise UserError(
                f"--data-dir {cfg.data_dir} does not exist: prepare it on a CPU machine with "
                "`uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards "
                "--shard-size 200000` and carry it here"
            )
        return Path(cfg.data_dir)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UserError(
            "no --data-dir, and `datasets` is not installed here to make shards: prepare them on a "
            "CPU machine (`uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards "
            "--shard-size 200000`) and pass --data-dir gpu_shards"
        ) from None
    out = work / "shards"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "fineweb.py"),
            "--input",
            str(ROOT / "assets/demo/fineweb_demo.parquet"),
            "--out-dir",
            str(out),
            "--shard-size",
            "200000",
            "--workers",
            "1",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return out


def work_folder(cfg: CheckConfig, out: Path) -> Path:
    """--work-dir, which must not be inside the output folder (that comes back from the GPU machine,
    8 files at most), else a fresh temp folder."""
    if not cfg.work_dir:
        return Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    work = Path(cfg.work_dir).resolve()
    if work == out.resolve() or out.resolve() in work.parents:
        raise UserError(f"--work-dir {cfg.work_dir} is inside the output folder {out}: give one outside it")
    work.mkdir(parents=True, exist_ok=True)
    return work


def run_checks(ck: Checker, cfg: CheckConfig, data_dir: Path, sizes: dict) -> None:
    """The checks, most valuable first: a run cut short loses the least."""
    hellaswag = Path(cfg.hellaswag) if cfg.hellaswag else FIXTURE
    ck.check("environment", lambda: environment(cfg.dry_run))
    ck.check("train", lambda: train(ck, data_dir, sizes), STEPS["train"].needs)
    ck.check("resume", lambda: resume(ck, data_dir, sizes), STEPS["resume"].needs)
    # Each evaluation reads the newest checkpoint the train runs left, else makes its own (its needs then
    # count the making): none waits on the train run's model_final.pt.
    full = bool(cfg.hellaswag)
    ck.check("hellaswag", lambda: hellaswag_eval(ck, hellaswag, full, data_dir, sizes), eval_needs(ck, "hellaswag"))
    ck.check("core", lambda: core(ck, cfg.core_data, data_dir, sizes), eval_needs(ck, "core"))
    ck.check("export", lambda: export(ck, data_dir, sizes), eval_needs(ck, "export"))
    ck.check("fp16", lambda: fp16(ck, data_dir, sizes), STEPS["fp16"].needs)
    ck.check("throughput", lambda: throughput(ck), throughput_settings(cfg.dry_run)[0].step.needs)
    ck.check("bigger models", lambda: bigger_models(ck), STEPS["bigger models"].needs)


def main(argv=None) -> int:
    """Exit 0 when every check passed, 1 when one failed (the verdict), 2 for a user error."""
    cfg = parse_config(CheckConfig, argv, description=__doc__)
    out = Path(cfg.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = work_folder(cfg, out)
    remove_work = not cfg.work_dir and not cfg.keep_work
    try:
        data_dir = prepare_data(cfg, work)
        sizes = DRY_RUN if cfg.dry_run else GPU_RUN
        ck = Checker(cfg, out, work, {**asdict(cfg), "data_dir": str(data_dir), "work_dir": str(work), "sizes": sizes})
        print(
            f"gpu_check: {'dry run on the CPU' if cfg.dry_run else 'GPU'}, data {data_dir}, HellaSwag "
            f"{cfg.hellaswag or FIXTURE}, budget {cfg.budget} s, results in {out}, work in {work}",
            flush=True,
        )
        run_checks(ck, cfg, data_dir, sizes)
        return ck.finish()
    finally:
        if remove_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"gpu_check: the work folder is kept: {work}", flush=True)


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
