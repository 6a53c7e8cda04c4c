"""The CPU gate of the fast recipe (Muon + WSD): does it reach the reference recipe's loss with fewer tokens?

Trains the tiny GPT-2 (`--model tiny`: 4 layers, 4 heads, width 128, vocab padded to 50304) at seq
256 and 2,048 tokens per step (8 x 256) on the FineWeb sample, through the real pipeline: the
documents are split (a fixed 10% held out: those whose id hashes lowest), both parts are
tokenized by fineweb.py, and every run is train_gpt2.py in its own process. Two recipes, on the
same paired seeds (a seed fixes the initial weights and the data order):

  baseline  the reference recipe: AdamW + cosine, lr 1.5e-3, 5% warmup, cosine to 10%, 1M tokens
  fast      `--recipe fast` (Muon + warmup-stable-decay) given 1/1.3 of the tokens

Validation loss is measured every 25 steps on a fixed 32K-token set from the held-out documents.
The gate passes when every fast run ends at or below the baseline's mean final loss minus two
standard errors (of the baseline seeds). It also prints the tokens each recipe needs to reach the
baseline's mean final loss (linear interpolation between evaluations) and a markdown table for
BENCHMARKS.md. Finished runs are reused (their folder name is a hash of their flags), so an
interrupted gate continues where it stopped; runs checkpoint every 100 steps, so a killed run
resumes (exactly) instead of starting over. On the quiet 2-core machine here a run trains at
~1,000 tokens/s (one thread, two runs at a time): one seed's pair takes ~21 minutes, the whole gate
~65 (more when other jobs share the cores). Results: <work dir>/results.json; the recorded run is
bench/results/recipe_gate.json and its table is in BENCHMARKS.md.

    uv run bench/recipe_gate.py --sample 'fineweb_sample/*.parquet'
    uv run bench/recipe_gate.py --sample 'fineweb_sample/*.parquet' --tokens 307200 --seed 1 \\
        --fast-override muon_lr=0.04

(The recorded gate ran on 2,800 unchanged FineWeb `sample-10BT` documents, 28 parquet files, ~4.4M
GPT-2 tokens; the 348-document demo corpus in assets/demo is too small for its 1M training tokens
without repeats.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import fileio  # noqa: E402
from cli import UserError, field, parse_config, parse_value  # noqa: E402
from train_config import RECIPES, TrainConfig  # noqa: E402

TOKENS_PER_STEP = 2048  # 8 sequences x 256 tokens
SEQ_LEN = 256


@dataclass(frozen=True)
class GateConfig:
    sample: str = field("", "FineWeb parquet files, a glob (column `text`, and `id` for the split); required")
    work_dir: str = field(
        "log/recipe_gate", "folder for the split, token shards, runs and results (finished runs are reused)"
    )
    seeds: tuple[int, ...] = field(
        (1, 2, 3), "paired seeds: each fixes init and data order of both recipes", flag="--seed"
    )
    tokens: int = field(1_048_576, "the baseline's training tokens (512 steps of 2,048: the issue's 1M)")
    ratio: float = field(1.3, "the fast recipe trains on tokens / ratio (rounded down to whole steps)")
    holdout_frac: float = field(0.1, "fraction of documents held out for validation")
    val_tokens: int = field(32_768, "the fixed validation set: the first N tokens of the held-out documents")
    val_every: int = field(25, "evaluate every N steps (and at the end)")
    baseline_lr: float = field(1.5e-3, "baseline AdamW peak lr at this scale")
    warmup_frac: float = field(0.05, "baseline warmup as a fraction of its steps (the issue's 5%)")
    fast_warmup_frac: float = field(0.02, "fast recipe warmup as a fraction of its steps at this scale")
    fast_max_lr: float = field(6e-3, "fast recipe: AdamW peak lr of embeddings, LayerNorms and biases at this scale")
    fast_override: tuple[str, ...] = field(
        (), "extra NAME=VALUE train settings for the fast runs (tuning pilots), repeatable"
    )
    recipes: tuple[str, ...] = field(("baseline", "fast"), "which recipes to run", flag="--recipe")
    threads: int = field(1, "OMP/MKL threads per training process")
    parallel: int = field(2, "training processes at once")
    loss_chunk_rows: int = field(2048, "chunked lm_head + cross-entropy rows (same loss, ~2x faster on CPU)")


# ---- data: a deterministic document split, tokenized by fineweb.py ------------------------------
def held_out_ids(ids: list[str], frac: float) -> set[str]:
    """The round(frac x documents) documents whose sha256(id) sort first: a fixed hold-out, the same
    on any machine and whatever the file order."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).digest())
    return set(ranked[: round(frac * len(ids))])


def prepare_data(cfg: GateConfig, work: Path) -> Path:
    """work/data: edufineweb_val_000000.npy = held-out documents, edufineweb_train_000001.npy = the rest."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = work / "data"
    if (data / "split.json").is_file():
        return data
    files = sorted(glob.glob(cfg.sample))
    if not files:
        raise UserError(
            f"no parquet files match --sample {cfg.sample!r}: pass a glob of FineWeb parquet files, "
            "e.g. --sample 'fineweb_sample/*.parquet'"
        )
    table = pa.concat_tables([pq.read_table(f, columns=["id", "text"]) for f in files])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    held = held_out_ids(ids, cfg.holdout_frac)
    mask = [i in held for i in ids]
    split_dir = work / "split"
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, keep in (("heldout", True), ("heldin", False)):
        rows = [j for j, m in enumerate(mask) if m == keep]
        part = pa.table({"id": [ids[j] for j in rows], "text": [texts[j] for j in rows]})
        tmp = split_dir / f".{name}.parquet.tmp"
        pq.write_table(part, tmp)
        os.replace(tmp, split_dir / f"{name}.parquet")

    staging = work / ".data.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shard = {}
    for name in ("heldout", "heldin"):  # one shard each (fineweb.py names its first shard "val")
        out = work / f"tokens_{name}"
        # fineweb.prepare, not the command: the command refuses a run that leaves no train shard,
        # and a single shard is exactly what each split wants here.
        code = (
            "import sys, fineweb; fineweb.prepare(fineweb.FinewebConfig(input=(sys.argv[1],), out_dir=sys.argv[2], "
            "shard_size=10**9, workers=1), progress=False)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(split_dir / f"{name}.parquet"), str(out)],
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
        )
        shard[name] = out / "edufineweb_val_000000.npy"
    os.link(shard["heldout"], staging / "edufineweb_val_000000.npy")
    os.link(shard["heldin"], staging / "edufineweb_train_000001.npy")
    import numpy as np

    sizes = {k: int(np.load(v, mmap_mode="r").shape[0]) for k, v in shard.items()}
    summary = {
        "documents": len(ids),
        "held_out_documents": sum(mask),
        "held_out_tokens": sizes["heldout"],
        "train_tokens": sizes["heldin"],
        "sample": cfg.sample,
        "holdout_frac": cfg.holdout_frac,
    }
    (staging / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(data, ignore_errors=True)
    staging.rename(data)
    return data


# ---- runs -----------------------------------------------------------------------------------------
CHECKPOINT_FLAGS = ("--ckpt-every", "--keep-checkpoints")  # each takes one value; no effect on any number


def run_flags(cfg: GateConfig, recipe: str, seed: int) -> list[str]:
    """train_gpt2.py flags of one run (without --data-dir / --log-dir)."""
    steps = (
        cfg.tokens // TOKENS_PER_STEP if recipe == "baseline" else math.floor(cfg.tokens / cfg.ratio / TOKENS_PER_STEP)
    )
    flags = [
        "--model",
        "tiny",
        "--micro-batch-size",
        "8",
        "--seq-len",
        str(SEQ_LEN),
        "--tokens-per-step",
        str(TOKENS_PER_STEP),
        "--max-steps",
        str(steps),
        "--val-every",
        str(cfg.val_every),
        "--val-tokens",
        str(cfg.val_tokens),
        "--hellaswag-every",
        "0",
        "--sample-every",
        "0",
        "--ckpt-every",
        "100",
        "--keep-checkpoints",
        "1",
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--no-compile",
        "--loss-chunk-rows",
        str(cfg.loss_chunk_rows),
        "--log-every",
        "25",
    ]
    if recipe == "baseline":  # AdamW + cosine to 10%: train_gpt2's defaults
        return flags + ["--warmup-steps", str(max(1, round(cfg.warmup_frac * steps))), "--max-lr", str(cfg.baseline_lr)]
    flags += [
        "--recipe",
        "fast",
        "--warmup-steps",
        str(max(1, round(cfg.fast_warmup_frac * steps))),
        "--max-lr",
        str(cfg.fast_max_lr),
    ]
    for item in cfg.fast_override:
        name, _, value = item.partition("=")
        parse_value(TrainConfig, name, value)  # a one-line error for a typo before any run starts
        flags += ["--" + name.replace("_", "-"), value]
    return flags


def run_dir(work: Path, recipe: str, seed: int, flags: list[str]) -> Path:
    """Named by a hash of the run's flags (and of the recipe they name): changed settings, new run.
    The checkpoint flags are left out: they change no number, and a killed run resumes from them."""
    kept = [
        f for k, f in enumerate(flags) if f not in CHECKPOINT_FLAGS and (k == 0 or flags[k - 1] not in CHECKPOINT_FLAGS)
    ]
    what = " ".join(kept) + (json.dumps(RECIPES["fast"], sort_keys=True) if recipe == "fast" else "")
    digest = hashlib.sha256(what.encode()).hexdigest()[:10]
    return work / "runs" / f"{recipe}_s{seed}_{digest}"


def val_curve(log_dir: Path) -> list[tuple[int, float]]:
    """(tokens, val_loss) per evaluation, the last record of each step kept."""
    by_step = {}
    path = log_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "val":
            by_step[record["step"]] = (record["tokens"], record["val_loss"])
    return [by_step[s] for s in sorted(by_step)]


def train_seconds(log_dir: Path) -> float:
    """Training time (evaluations excluded) from the train records' step_ms x steps since the previous log."""
    total, last = 0.0, -1
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train":
            total += record["step_ms"] / 1000 * (record["step"] - last)
            last = record["step"]
    return total


class RunFailed(Exception):
    """A training run of the gate exited non-zero: its train.out says why."""


def run_one(cfg: GateConfig, data: Path, work: Path, recipe: str, seed: int) -> dict:
    flags = run_flags(cfg, recipe, seed)
    log_dir = run_dir(work, recipe, seed, flags)
    steps = int(flags[flags.index("--max-steps") + 1])
    curve = val_curve(log_dir)
    done = (log_dir / "model_final.pt").exists() and curve and curve[-1][0] == steps * TOKENS_PER_STEP
    if not done:
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(cfg.threads),
            "MKL_NUM_THREADS": str(cfg.threads),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *flags, "--data-dir", str(data), "--log-dir", str(log_dir)]
        (log_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        start = time.perf_counter()
        with open(log_dir / "train.out", "a") as out:  # a resumed run appends
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            raise RunFailed(f"{recipe} seed {seed} failed (exit {code}): see {log_dir / 'train.out'}")
        curve = val_curve(log_dir)
        print(
            f"  {recipe:8s} seed {seed}: {time.perf_counter() - start:6.0f} s wall, final val loss {curve[-1][1]:.4f}",
            flush=True,
        )
    return {
        "recipe": recipe,
        "seed": seed,
        "steps": steps,
        "tokens": steps * TOKENS_PER_STEP,
        "log_dir": str(log_dir),
        "curve": curve,
        "final": curve[-1][1],
        "train_seconds": train_seconds(log_dir),
        "flags": flags,
    }


# ---- statistics -------------------------------------------------------------------------------------
def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # sample variance
    return mean, math.sqrt(var / n)


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count where the val loss is <= target, linearly interpolated between evaluations."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return float(curve[0][0]) if curve and curve[0][1] <= target else None


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """The seed-mean validation curve (the runs of one recipe evaluate at the same steps)."""
    return [(points[0][0], sum(p[1] for p in points) / len(points)) for points in zip(*(r["curve"] for r in runs))]


def summarise(cfg: GateConfig, results: dict[str, list[dict]]) -> dict:
    summary = {}
    for recipe, runs in results.items():
        mean, stderr = mean_and_stderr([r["final"] for r in runs])
        summary[recipe] = {"mean": mean, "stderr": stderr, "tokens": runs[0]["tokens"]}
    if "baseline" not in summary:
        return summary
    target = summary["baseline"]["mean"]  # "the baseline's final loss"
    threshold = target - 2 * summary["baseline"]["stderr"]
    summary["target"], summary["threshold"] = target, threshold
    for recipe, runs in results.items():
        for r in runs:
            r["tokens_to_target"] = tokens_to_reach(r["curve"], target)
        summary[recipe]["tokens_to_target"] = tokens_to_reach(mean_curve(runs), target)
    if "fast" in results:
        fast = [r["final"] for r in results["fast"]]
        summary["passed"] = all(v <= threshold for v in fast)
        reach = summary["fast"]["tokens_to_target"]
        summary["token_saving"] = summary["baseline"]["tokens_to_target"] / reach if reach else None
    return summary


def fmt_tokens(t: float | None) -> str:
    return "not reached" if t is None else f"{t:,.0f}"


def markdown_table(cfg: GateConfig, results: dict[str, list[dict]], summary: dict) -> str:
    seeds = [r["seed"] for r in next(iter(results.values()))]
    head = [
        "recipe",
        "train tokens",
        *[f"seed {s}" for s in seeds],
        "mean",
        "std err",
        "tokens to baseline's final loss",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe, runs in results.items():
        s = summary[recipe]
        per_seed = [f"{r['final']:.4f}" for r in runs]
        reach = s.get("tokens_to_target")
        lines.append(
            f"| {recipe} | {s['tokens']:,} | " + " | ".join(per_seed) + f" | {s['mean']:.4f} | {s['stderr']:.4f} | "
            f"{fmt_tokens(reach)} |"
        )
    if "passed" in summary:
        saving = summary["token_saving"]
        lines.append("")
        lines.append(
            f"Gate: every fast run <= baseline mean - 2 std err = {summary['threshold']:.4f}: "
            f"**{'PASS' if summary['passed'] else 'FAIL'}**. Tokens to reach the baseline's final loss "
            f"{summary['target']:.4f} (seed-mean curves): "
            f"{'n/a' if saving is None else f'{saving:.2f}x fewer'} with fast."
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(GateConfig, argv, description=__doc__)
    unknown = set(cfg.recipes) - {"baseline", "fast"}
    if unknown or not cfg.seeds or cfg.threads < 1 or cfg.parallel < 1 or cfg.ratio <= 0:
        raise UserError(
            "--recipe takes baseline or fast; give at least one --seed; --threads, --parallel, --ratio must be positive"
        )
    for recipe in cfg.recipes:
        run_flags(cfg, recipe, cfg.seeds[0])  # validates --fast-override before any work
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    print(
        f"recipe gate | torch {torch.__version__} | {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} | "
        f"{cfg.parallel} process(es) x {cfg.threads} thread(s) | fast recipe {RECIPES['fast']}",
        flush=True,
    )
    data = prepare_data(cfg, work)
    print(f"data: {json.loads((data / 'split.json').read_text())}", flush=True)

    jobs = [(recipe, seed) for seed in cfg.seeds for recipe in cfg.recipes]
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(cfg.parallel) as pool:  # threads only wait on the training subprocesses
            done = list(pool.map(lambda job: run_one(cfg, data, work, *job), jobs))
    except RunFailed as e:  # exit 1 as a failed gate: the input was fine, a run was not
        cli.print_error(str(e))
        return 1
    wall = time.perf_counter() - start
    results = {recipe: [r for r in done if r["recipe"] == recipe] for recipe in cfg.recipes}
    summary = summarise(cfg, results)

    print(f"\n{len(jobs)} runs in {wall:.0f} s wall; load average now {os.getloadavg()[0]:.2f}")
    for recipe, runs in results.items():
        for r in runs:
            print(
                f"{recipe:8s} seed {r['seed']}: {r['tokens']:>9,} tokens | final val loss {r['final']:.4f} | "
                f"reaches baseline final at {fmt_tokens(r.get('tokens_to_target'))} tokens | "
                f"train {r['train_seconds']:.0f} s"
            )
    table = markdown_table(cfg, results, summary)
    print("\n" + table)
    out = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "wall_seconds": wall,
        "summary": summary,
        "runs": done,
        "fast_recipe": RECIPES["fast"],
        "markdown": table,
    }
    fileio.atomic_write_json(work / "results.json", out)
    print(f"\nresults: {work / 'results.json'}")
    return 0 if summary.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
