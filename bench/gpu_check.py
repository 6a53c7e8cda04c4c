"""The one-call GPU acceptance check: everything that matters about this repo on one GPU, in one run
of under 8 minutes, with the machine's own python3 (no uv, no `datasets`, no network).

    python3 bench/gpu_check.py --data-dir gpu_shards                  # on the GPU machine; OUT=... for the results
    uv run bench/gpu_check.py --dry-run --out /tmp/gpu_check          # the same script on CPU, tiny, minutes

Prepare the token shards on a CPU machine first (fineweb.py needs `datasets`), then carry the folder
(and, for the full HellaSwag timing, hellaswag/hellaswag_val.jsonl) to the GPU machine:

    uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards --shard-size 200000

It runs the repo's own scripts (train_gpt2.py, hellaswag.py, export_hf.py, bench.py) in
subprocesses, one after the other, each with a time budget so a hang cannot eat the rest, and stops
starting new checks when --budget is spent. In this order:

  1 environment   GPU, memory, driver, torch / CUDA, the SDPA kernel PyTorch picks for GPT-2's shapes
  2 train         GPT-2 124M, compiled, bf16: 100 steps of 65,536 real tokens; the loss must fall by 3;
                  validation, in-training HellaSwag and samples run, checkpoints at 50 and the end
  3 resume        from the step-50 checkpoint in a new process: steps 50-99 again, train losses within
                  RESUME_TOLERANCE of the first run's (bitwise is not promised on a GPU)
  4 hellaswag     hellaswag.py on the final checkpoint, compiled: the full 10,042 examples when
                  --hellaswag gives the file, else the 300 shipped ones; examples/s
  5 export        export_hf.py, then transformers' GPT2LMHeadModel on the GPU: logits within 1e-4 (fp32)
  6 throughput    bench.py at T=1024, 4 micro-steps of 64: the reference trainer's settings (compile
                  off, fused AdamW, plain loss) vs our defaults (compile on) vs each lever (--loss-chunk-rows,
                  each attention kernel, micro-batch 32 / 128) and --optimizer muon: tokens/s, MFU, memory

Writes <out>/gpu_check.json (a verdict per check and every number) and <out>/gpu_check.log (every
subprocess's output), <out> being --out, else $OUT, else gpu_check_out. Exit 0 when every check that
ran passed. --dry-run: the tiny preset, a few steps, the CPU, eager; the same checks and JSON (CI
runs it, so the script cannot rot between GPU sessions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli import field, parse_config  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "hellaswag_val_300.jsonl"
RESUME_TOLERANCE = {"cuda": 0.02, "cpu": 0.0}  # |loss difference| per step after a resume
LOSS_DROP = {"cuda": 3.0, "cpu": 0.5}  # the train loss must fall at least this much (nats) (CPU: 10 tiny steps)


@dataclass(frozen=True)
class CheckConfig:
    data_dir: str = field("", "token shards from fineweb.py (default: made from the demo corpus here, if `datasets` is installed)")
    hellaswag: str = field("", "the full hellaswag_val.jsonl for the full-set timing (default: the 300 shipped examples)")
    out: str = field("", "where gpu_check.json and gpu_check.log go (default: $OUT, else gpu_check_out)")
    work_dir: str = field("", "checkpoints and run logs (default: <out>/work, deleted at the end unless --keep-work)")
    keep_work: bool = field(False, "keep the work dir (checkpoints: ~1.5 GB at 124M)")
    budget: int = field(450, "seconds after which no new check starts (the GPU machine's 8 minutes, less the start-up)")
    dry_run: bool = field(False, "the tiny preset on the CPU, a few steps, eager: the same checks, for CI")

    def __post_init__(self):
        if self.budget < 1:
            raise ValueError("--budget must be at least 1 second")


# Sizes of each check, GPU vs dry run. The GPU's are the reference model at its context; the dry
# run's keep every check's code path on a 2-core CPU in about two minutes.
GPU_RUN = dict(model="gpt2", seq_len=1024, micro_batch_size=64, tokens_per_step=65_536, max_steps=100,
               warmup_steps=10, max_lr=6e-4, val_every=50, val_tokens=131_072, ckpt_every=50,
               hellaswag_every=100, sample_every=100, device="cuda")
DRY_RUN = dict(model="tiny", seq_len=64, micro_batch_size=4, tokens_per_step=512, max_steps=10,
               warmup_steps=2, max_lr=3e-3, val_every=5, val_tokens=2048, ckpt_every=5,
               hellaswag_every=10, sample_every=10, device="cpu")
GPU_BENCH = ["--model", "gpt2", "--seq-len", "1024", "--micro-batch-size", "64", "--tokens-per-step", "262144",
             "--steps", "6", "--warmup", "2", "--device", "cuda"]
DRY_BENCH = ["--model", "tiny", "--seq-len", "64", "--micro-batch-size", "2", "--tokens-per-step", "256",
             "--steps", "1", "--warmup", "0", "--device", "cpu"]


def throughput_settings(dry_run: bool) -> list[tuple[str, list[str]]]:
    """(name, extra bench.py flags): the reference trainer's settings first, then ours, then one lever
    at a time. A dry run keeps the rows whose code path differs (a sweep, a second strategy); the
    other levers are plain bench.py flags, tested in tests/test_bench.py, at ~8 s of CI per process."""
    micro_batches = "1,4" if dry_run else "32,128"
    rows = [
        ("reference settings (compile off, fused AdamW, plain loss)", ["--no-compile", "--spike-guard", "0"]),
        ("defaults (compile on)", []),
        ("lever: --spike-guard 0 (no per-step sync)", ["--spike-guard", "0"]),
        ("lever: --loss-chunk-rows 8192", ["--loss-chunk-rows", "8192"]),
        ("lever: attention kernels", ["--sweep", "attn_backend=flash,cudnn,efficient,math"]),
        (f"lever: micro-batch {micro_batches.replace(',', ' / ')}", ["--sweep", f"micro_batch_size={micro_batches}"]),
        ("--optimizer muon", ["--optimizer", "muon"]),
        ("--parallel ddp vs fsdp (one GPU)", ["--sweep", "parallel=ddp,fsdp"]),
    ]
    dry_rows = ("reference", "defaults", "lever: attention", "--parallel")
    return [row for row in rows if row[0].startswith(dry_rows)] if dry_run else rows


# Bigger models under FSDP2 on the one GPU (world size 1: the code path, compile, memory): the
# measured peak next to bench/memory_table.py's prediction for the same setting.
BIGGER_GPU = dict(models=("gpt2-medium", "gpt2-xl"), micro_batch_size=8, seq_len=1024, precision="bf16")
BIGGER_DRY = dict(models=("tiny",), micro_batch_size=2, seq_len=64, precision="fp32")


class Checker:
    """Runs the checks in order within the budget; records each one's verdict, numbers and log."""

    def __init__(self, cfg: CheckConfig, out: Path, work: Path):
        self.cfg, self.out, self.work = cfg, out, work
        self.started = time.monotonic()
        self.results: list[dict] = []
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        self.device = "cpu" if cfg.dry_run else "cuda"

    def left(self) -> float:
        return self.cfg.budget - (time.monotonic() - self.started)

    def run(self, name: str, args: list[str], timeout: float) -> tuple[int, str]:
        """One subprocess of the repo's scripts, its output to the log; (exit code, output)."""
        timeout = max(5.0, min(timeout, self.left() + 60))
        self.log.write(f"\n===== {name}: {' '.join(args)} (timeout {timeout:.0f} s)\n")
        self.log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code = 124
            output = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) \
                + f"\n[killed after {timeout:.0f} s]"
        self.log.write(output)
        self.log.flush()
        return code, output

    def check(self, name: str, fn) -> None:
        """Run fn() -> (passed, numbers) unless the budget is spent; never let one check stop the rest."""
        if self.left() <= 0:
            self.results.append({"check": name, "verdict": "SKIPPED", "reason": "time budget spent"})
            return
        start = time.monotonic()
        try:
            passed, numbers = fn()
            verdict = "PASS" if passed else "FAIL"
        except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, and the next one runs
            verdict, numbers = "FAIL", {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        result = {"check": name, "verdict": verdict, "seconds": round(time.monotonic() - start, 1), **numbers}
        self.results.append(result)
        print(f"{verdict:7s} {name:12s} {json.dumps({k: v for k, v in result.items() if k not in ('check', 'verdict')})}",
              flush=True)

    def finish(self, config: dict) -> int:
        self.log.close()
        summary = {"config": config, "device": self.device, "seconds": round(time.monotonic() - self.started, 1),
                   "passed": all(r["verdict"] in ("PASS", "SKIPPED") for r in self.results), "checks": self.results}
        (self.out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{'PASS' if summary['passed'] else 'FAIL'}: {sum(r['verdict'] == 'PASS' for r in self.results)} of "
              f"{len(self.results)} checks passed in {summary['seconds']:.0f} s; {self.out / 'gpu_check.json'}")
        return 0 if summary["passed"] else 1


# ---- the checks ---------------------------------------------------------------------------------
def environment(dry_run: bool) -> tuple[bool, dict]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if dry_run:
        return True, {**info, "device": "cpu"}
    if not torch.cuda.is_available():
        return False, {**info, "error": "no CUDA device visible"}
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = out.stdout.strip()
    # The kernel PyTorch's SDPA picks for GPT-2 124M's attention (B 8, 12 heads, T 1024, head 64, bf16, causal).
    from bench import detect_attention_kernel

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
    """The JSON rows bench.py --json prints among its human lines (one object per line)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def metrics_of(log_dir: Path) -> list[dict]:
    return read_jsonl(log_dir / "metrics.jsonl")


def train_flags(sizes: dict) -> list[str]:
    flags = []
    for name, value in sizes.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def train(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    """In-training HellaSwag scores the 300 shipped examples (20 in a dry run): the full set is timed below."""
    log_dir = ck.work / "run"
    hellaswag = ck.work / "hellaswag_train.jsonl"
    lines = FIXTURE.read_text(encoding="utf-8").splitlines(keepends=True)
    hellaswag.write_text("".join(lines[:20] if ck.cfg.dry_run else lines), encoding="utf-8")
    code, out = ck.run("train", ["train_gpt2.py", *train_flags(sizes), "--data-dir", str(data_dir), "--log-dir",
                                 str(log_dir), "--hellaswag-data", str(hellaswag)], timeout=240)
    records = metrics_of(log_dir)
    losses = [r["train_loss"] for r in records if r["type"] == "train"]
    val = [r["val_loss"] for r in records if r["type"] == "val"]
    hs = [r for r in records if r["type"] == "hellaswag"]
    rates = [r["tokens_per_sec"] for r in records if r["type"] == "train"][1:]  # the first window holds the compile
    mfus = [r["mfu"] for r in records if r["type"] == "train" and r.get("mfu") is not None][1:]
    numbers = {"exit": code, "steps": len(losses), "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "val_losses": val,
               "hellaswag_acc_norm": hs[-1]["hellaswag_acc_norm"] if hs else None,
               "hellaswag_count": hs[-1]["count"] if hs else None,
               "samples": sum(r["type"] == "sample" for r in records),
               "tokens_per_sec": round(sum(rates) / len(rates)) if rates else None,
               "mfu": round(sum(mfus) / len(mfus), 4) if mfus else None,
               "checkpoints": sorted(p.name for p in log_dir.glob("model_*.pt"))}
    drop = LOSS_DROP[ck.device]
    numbers["loss_drop_required"] = drop
    passed = (code == 0 and len(losses) >= 2 and losses[0] - min(losses[-3:]) >= drop and len(val) >= 2
              and val[-1] < val[0] and bool(hs) and numbers["samples"] >= 1 and "model_final.pt" in numbers["checkpoints"])
    return passed, numbers


def resume(ck: Checker, data_dir: Path, sizes: dict) -> tuple[bool, dict]:
    """The first run's log dir as it was after its middle checkpoint, resumed in a new process."""
    first, again = ck.work / "run", ck.work / "resumed"
    middle = sizes["ckpt_every"]
    shutil.rmtree(again, ignore_errors=True)
    again.mkdir(parents=True)
    shutil.copy(first / f"model_{middle:05d}.pt", again / f"model_{middle:05d}.pt")
    code, out = ck.run("resume", ["train_gpt2.py", *train_flags({**sizes, "hellaswag_every": 0, "sample_every": 0}),
                                  "--data-dir", str(data_dir), "--log-dir", str(again)], timeout=200)
    before = {r["step"]: r["train_loss"] for r in metrics_of(first) if r["type"] == "train" and r["step"] >= middle}
    after = {r["step"]: r["train_loss"] for r in metrics_of(again) if r["type"] == "train"}
    common = sorted(set(before) & set(after))
    worst = max((abs(before[s] - after[s]) for s in common), default=None)
    tolerance = RESUME_TOLERANCE[ck.device]
    passed = code == 0 and "resuming from" in out and len(common) >= 2 and worst is not None and worst <= tolerance
    return passed, {"exit": code, "steps_compared": len(common), "max_loss_difference": worst, "tolerance": tolerance}


def hellaswag_eval(ck: Checker, hellaswag: Path, full: bool) -> tuple[bool, dict]:
    extra = [] if full else ["--no-verify"]
    if ck.cfg.dry_run:
        extra += ["--limit", "20", "--device", "cpu"]
    else:
        extra += ["--compile"]
    code, out = ck.run("hellaswag", ["hellaswag.py", "--checkpoint", str(ck.work / "run" / "model_final.pt"),
                                     "--data", str(hellaswag), "--log-dir", str(ck.work / "hs"), *extra], timeout=240)
    results = read_jsonl(ck.work / "hs" / "hellaswag_results.jsonl")
    if code != 0 or not results:
        return False, {"exit": code}
    r = results[-1]
    return True, {"count": r["count"], "seconds": r["seconds"], "examples_per_sec": round(r["count"] / r["seconds"], 1),
                  "acc_norm": r["acc_norm"], "harness_acc_norm": r["harness_acc_norm"], "full_set": full}


def export(ck: Checker) -> tuple[bool, dict]:
    out_dir = ck.work / "hf"
    code, _ = ck.run("export", ["export_hf.py", "--checkpoint", str(ck.work / "run" / "model_final.pt"),
                                "--out-dir", str(out_dir)], timeout=120)
    if code != 0:
        return False, {"exit": code}
    import torch
    from transformers import GPT2LMHeadModel

    import checkpoint

    device = torch.device(ck.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # parity in true fp32
    ours = checkpoint.load_model(ck.work / "run" / "model_final.pt").to(device)
    theirs = GPT2LMHeadModel.from_pretrained(out_dir).to(device).eval()
    idx = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    return diff < 1e-4, {"max_logit_difference": diff, "tolerance": 1e-4}


def throughput(ck: Checker) -> tuple[bool, dict]:
    """Each setting in its own bench.py process (a hang or a crash costs that setting only). An
    attention kernel that cannot run these shapes is a row with its error, not a failure."""
    rows, errors = [], 0
    base = DRY_BENCH if ck.cfg.dry_run else GPU_BENCH
    for name, extra in throughput_settings(ck.cfg.dry_run):
        if ck.left() <= 0:
            rows.append({"setting": name, "error": "skipped: time budget spent"})
            continue
        code, out = ck.run(f"throughput: {name}", ["bench.py", *base, *extra, "--json"], timeout=150)
        for row in json_rows(out) or [{"error": f"exit {code}, no result"}]:
            rows.append({"setting": name, **{k: row[k] for k in (
                "attn_backend", "micro_batch_size", "parallel", "tokens_per_sec", "mfu", "step_ms", "peak_memory_gb",
                "attention", "compile", "error") if k in row}})
            errors += "error" in row and not name.startswith("lever: attention")
    reference = next((r for r in rows if r["setting"].startswith("reference") and r.get("tokens_per_sec")), None)
    ours = next((r for r in rows if r["setting"].startswith("defaults") and r.get("tokens_per_sec")), None)
    speedup = round(ours["tokens_per_sec"] / reference["tokens_per_sec"], 3) if reference and ours else None
    return errors == 0 and reference is not None and ours is not None, {"rows": rows, "defaults_vs_reference": speedup}


def bigger_models(ck: Checker) -> tuple[bool, dict]:
    """gpt2-medium and gpt2-xl steps under --parallel fsdp (tiny in a dry run), one bench.py process;
    each row's peak memory with the formula's prediction (on the CPU the peak is the whole process's)."""
    sizes = BIGGER_DRY if ck.cfg.dry_run else BIGGER_GPU
    mbs, seq_len = sizes["micro_batch_size"], sizes["seq_len"]
    base = DRY_BENCH if ck.cfg.dry_run else GPU_BENCH
    predictions = ck.work / "memory_table.jsonl"
    ck.run("bigger models: the formula", ["bench/memory_table.py", "--models", *sizes["models"], "--gpus", "1",
                                          "--micro-batch-sizes", str(mbs), "--seq-len", str(seq_len),
                                          "--precision", sizes["precision"], "--json-out", str(predictions)], timeout=120)
    predicted = {r["model"]: r["total"] for r in read_jsonl(predictions)
                 if r["parallel"] == "fsdp" and not r["activation_checkpointing"]}
    code, out = ck.run("bigger models: --parallel fsdp", [
        "bench.py", *base, "--parallel", "fsdp", "--micro-batch-size", str(mbs), "--seq-len", str(seq_len),
        "--tokens-per-step", str(mbs * seq_len), "--sweep", "model=" + ",".join(sizes["models"]), "--json"], timeout=300)
    rows = [{k: row[k] for k in ("model", "tokens_per_sec", "mfu", "step_ms", "peak_memory_gb", "error") if k in row}
            for row in json_rows(out)]
    for row in rows:
        row["predicted_gib"] = round(predicted[row["model"]], 2) if row.get("model") in predicted else None
    ok = code == 0 and len(rows) == len(sizes["models"]) and all("error" not in r for r in rows)
    return ok, {"rows": rows, "micro_batch_size": mbs, "seq_len": seq_len}


# ---- the run ------------------------------------------------------------------------------------
def prepare_data(cfg: CheckConfig, work: Path) -> Path:
    if cfg.data_dir:
        if not Path(cfg.data_dir).is_dir():
            raise SystemExit(f"gpu_check: --data-dir {cfg.data_dir} does not exist: prepare it on a CPU machine with "
                             "`uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards "
                             "--shard-size 200000` and carry it here")
        return Path(cfg.data_dir)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise SystemExit("gpu_check: no --data-dir, and `datasets` is not installed here to make shards: prepare them on a "
                         "CPU machine (`uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir gpu_shards "
                         "--shard-size 200000`) and pass --data-dir gpu_shards") from None
    out = work / "shards"
    subprocess.run([sys.executable, str(ROOT / "fineweb.py"), "--input", str(ROOT / "assets/demo/fineweb_demo.parquet"),
                    "--out-dir", str(out), "--shard-size", "200000", "--workers", "1"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return out


def main(argv=None) -> int:
    try:
        cfg = parse_config(CheckConfig, argv, description=__doc__)
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work_dir) if cfg.work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(cfg, work)
    hellaswag = Path(cfg.hellaswag) if cfg.hellaswag else FIXTURE
    sizes = DRY_RUN if cfg.dry_run else GPU_RUN
    ck = Checker(cfg, out, work)
    print(f"gpu_check: {'dry run on the CPU' if cfg.dry_run else 'GPU'}, data {data_dir}, HellaSwag {hellaswag}, "
          f"budget {cfg.budget} s, results in {out}", flush=True)
    ck.check("environment", lambda: environment(cfg.dry_run))
    ck.check("train", lambda: train(ck, data_dir, sizes))
    ck.check("resume", lambda: resume(ck, data_dir, sizes))
    ck.check("hellaswag", lambda: hellaswag_eval(ck, hellaswag, full=bool(cfg.hellaswag)))
    ck.check("export", lambda: export(ck))
    ck.check("throughput", lambda: throughput(ck))
    ck.check("bigger models", lambda: bigger_models(ck))
    code = ck.finish({**asdict(cfg), "data_dir": str(data_dir), "sizes": sizes})
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
