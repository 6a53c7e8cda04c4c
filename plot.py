"""Plot a training run from its JSONL logs: losses, learning rate, throughput, HellaSwag, CORE.

Reads `<log-dir>/metrics.jsonl` (train_gpt2.py) and, where present, the `hellaswag_results.jsonl`
(hellaswag.py) and `core_results.jsonl` (core.py) beside it; writes training_loss.png,
validation_loss.png, learning_rate.png, throughput.png, hellaswag_accuracy.png, core.png and
overview.png (all six panels) into the log dir. Runs on CPU in seconds, also while training writes:

    uv run plot.py                                              # log/ -> log/*.png
    uv run plot.py --summary                                    # + markdown table, log/summary.md
    uv run plot.py --log-dir runA --log-dir runB --out-dir cmp  # several runs in one figure

The rules behind each figure and column: the "Plotting a run" docs. Figures are drawn on
`Figure` objects with the Agg canvas (no pyplot: no GUI backend, no global state), and every file is
written through `fileio.atomic_path`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cli

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
except ModuleNotFoundError as e:  # `python plot.py` with a Python outside the repo's venv
    if __name__ != "__main__":
        raise
    package = (e.name or "matplotlib").split(".")[0]  # what to install: matplotlib, not matplotlib.backends
    cli.print_error(
        f"{package} is not installed for {sys.executable}: run `uv run plot.py`, or activate the repo's "
        "venv first (source .venv/bin/activate)"
    )
    raise SystemExit(2) from None

from cli import DEFAULT_LOG_DIR, UserError
from fileio import atomic_path
from metrics import FILE_NAME as METRICS_FILE
from metrics import FORMAT_VERSION  # metrics.py imports no torch: the one source of the number

HELLASWAG_FILE = "hellaswag_results.jsonl"
CORE_FILE = "core_results.jsonl"
SERIES = ("train", "val", "hellaswag", "core")  # metrics.jsonl record types drawn

# Val loss of OpenAI's GPT-2 124M on the FineWeb-Edu val shard, the number the reference run compares
# against: not comparable with a loss on another corpus.
GPT2_VAL_LOSS = (3.2924, "OpenAI GPT-2 124M")
FINEWEB_EDU = "fineweb-edu"
# HellaSwag acc_norm on the 10,042 val examples. 0.2955: GPT-2 124M with completion-style scoring (the
# training loop's and hellaswag.py's); 0.3114: the same model with lm-evaluation-harness scoring, for
# the harness-style points; 0.337: GPT-3 Small zero-shot (Brown et al. 2020); 0.25: random.
GPT2_HELLASWAG = (0.2955, "OpenAI GPT-2 124M")
GPT2_HELLASWAG_HARNESS = (0.3114, "OpenAI GPT-2 124M, harness style")
GPT3_HELLASWAG = (0.337, "GPT-3 124M (paper)")
RANDOM_HELLASWAG = (0.25, "random")
HELLASWAG_VAL_SIZE = 10_042
# CORE of OpenAI's GPT-2 as the "time to GPT-2" leaderboard (nanochat) reports it: quoted, not measured.
GPT2_CORE = ((0.1139, "GPT-2 124M"), (0.1849, "GPT-2 355M"), (0.2146, "GPT-2 774M"), (0.2565, "GPT-2 1.5B"))
CORE_SOURCE = "leaderboard, not measured here"
CORE_TASK_COUNT = 22  # len(core_eval.TASKS), not imported: it pulls the tokenizer into a plotting script
CORE_TITLE = f"CORE (DCLM, {CORE_TASK_COUNT} tasks)"
CORE_AND_PARTIAL_TITLE = "CORE and CORE-PARTIAL (task counts in the legend)"


@dataclass(frozen=True)
class PlotConfig:
    log_dirs: tuple[str, ...] = cli.field(
        (DEFAULT_LOG_DIR,),
        "run directory holding metrics.jsonl; repeat to compare runs",
        flag="--log-dir",
        metavar="DIR",
    )
    out_dir: str = cli.field("", "where figures and summary.md go (default: the first --log-dir)")
    summary: bool = cli.field(False, "print a markdown table of each run's results and write summary.md")
    smoothing: float = cli.field(
        0.95, "EMA weight of the past for the smoothed train loss; 0 = no smoothing", at_least=0.0, below=1.0
    )
    # 10: torch.compile's first step and a few recompiles/cache warm-ups on H100s.
    warmup_steps: int = cli.field(
        10, "train records skipped after each (re)start when averaging tokens/s and MFU", at_least=0
    )

    def __post_init__(self):
        if not self.log_dirs:
            raise UserError(f"no log dir given: pass --log-dir DIR (default: {DEFAULT_LOG_DIR})")
        cli.check_bounds(self)


@dataclass(frozen=True)
class Run:
    """One run's logs. Each series is its records sorted by step, the last one per step."""

    name: str
    log_dir: Path
    configs: list[dict]  # the config records, one per (re)start
    train: list[dict]  # with "since_restart": 0 for the first train record after a (re)start
    val: list[dict]
    hellaswag: list[dict]  # the training loop's evaluations
    core: list[dict]
    results: list[dict]  # hellaswag.py's rows, each with "label" and "foreign"
    core_results: list[dict]  # core.py's rows, the same
    restarts: list[tuple[float, float]]  # (first, last) record time of each (re)start
    skipped: list[str]  # "file:line: reason" for every line not read

    @property
    def tokens_per_step(self) -> int:
        return self.configs[-1]["config"]["tokens_per_step"]


# ---------------------------------------------------------------- reading


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a JSON-lines file, and "file:line: reason" for each line that is not JSON."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records, skipped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A live run may be caught mid-write: its last line has no newline yet.
            torn = n == len(lines) and not text.endswith("\n")
            why = "incomplete last line (the run may still be writing it)" if torn else "not valid JSON"
            skipped.append(f"{path}:{n}: {why}")
    return records, skipped


def _check_format(path: Path, configs: list[dict]) -> None:
    """A log of another format would be misread field by field: refuse it whole."""
    for record in configs or [{}]:
        version = record.get("format")
        if version != FORMAT_VERSION:
            what = "none (written before formats were recorded)" if version is None else version
            raise UserError(
                f"{path} is a metrics log of format {what}, this plot.py reads format {FORMAT_VERSION}: "
                "plot it with the version of the repo that wrote it"
            )


def _read_results(path: Path, log_dir: Path, skipped: list[str]) -> list[dict]:
    """A results file's rows, sorted by step (None last), each with a "label" and "foreign": a Hugging
    Face model's row, or a checkpoint in another folder (as recorded where the script ran, relative or
    absolute: its folder's name is not this run's, so a run copied or moved since still matches)."""
    if not path.is_file():
        return []
    rows, bad = _read_jsonl(path)
    skipped += bad
    latest = {}
    for row in rows:  # appended as scored: a later row of the same (checkpoint, step) replaces an earlier one
        name, checkpoint = row["checkpoint"] or row["model"], row["checkpoint"]
        foreign = not checkpoint or Path(checkpoint).parent.name not in ("", log_dir.resolve().name)
        label = str(Path(*Path(name).parts[-2:]))  # "gpt2", "log_fast/model_final.pt"
        latest[(name, row["step"])] = {**row, "label": label, "foreign": foreign}
    return sorted(latest.values(), key=lambda r: (r["step"] is None, r["step"] or 0))


def load_run(log_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Read one run directory. Raises UserError (one line) when there is no usable metrics.jsonl."""
    log_dir = Path(log_dir)
    path = log_dir / METRICS_FILE
    if not log_dir.is_dir():
        raise UserError(f"log dir {log_dir} does not exist: train first (uv run train_gpt2.py) or pass --log-dir DIR")
    if not path.is_file():
        raise UserError(f"{path} not found: train first (uv run train_gpt2.py) or pass the run's --log-dir")
    records, skipped = _read_jsonl(path)
    if not records:
        raise UserError(
            f"{path} has no records (empty, or only bad lines): wait for the first log step or check --log-dir"
        )
    configs = [r for r in records if r["type"] == "config"]
    _check_format(path, configs)

    by_step: dict[str, dict[int, dict]] = {kind: {} for kind in SERIES}  # the last wins: the resumed run's
    times: list[list[float]] = [[]]  # record times per (re)start
    since_restart = 0  # train records since the last config record (compile, warm-up: the first are slow)
    for rec in records:
        if rec["type"] == "config":
            times.append([])
            since_restart = 0
        elif rec["type"] == "train":
            by_step["train"][rec["step"]] = {**rec, "since_restart": since_restart}
            since_restart += 1
        elif rec["type"] in SERIES:
            by_step[rec["type"]][rec["step"]] = rec
        times[-1].append(rec["time"])  # other types ("sample", "skip", ...) count for the wall time only
    series = {kind: [steps[s] for s in sorted(steps)] for kind, steps in by_step.items()}
    return Run(
        name=name or log_dir.resolve().name or str(log_dir),
        log_dir=log_dir,
        configs=configs,
        **series,
        results=_read_results(log_dir / HELLASWAG_FILE, log_dir, skipped),
        core_results=_read_results(log_dir / CORE_FILE, log_dir, skipped),
        restarts=[(min(t), max(t)) for t in times if t],
        skipped=skipped,
    )


def load_runs(log_dirs) -> list[Run]:
    """load_run for each dir, named by the dir's name, or by the path as given where names collide."""
    names = [Path(d).resolve().name or str(d) for d in log_dirs]
    runs = []
    for i, d in enumerate(log_dirs):
        name = names[i] if names.count(names[i]) == 1 else str(d)
        if any(r.name == name for r in runs):
            name = f"{name}#{i + 1}"
        runs.append(load_run(d, name=name))
    return runs


# ---------------------------------------------------------------- derived numbers


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): no pull towards 0 at the start."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(acc / norm)
    return out


def ema_weight(smoothing: float, n_points: int) -> float:
    """`smoothing`, lowered for short logs so the EMA's time constant 1/(1-w) stays within 2% of the
    logged steps: a 200-step run falls too fast for a 20-step lag."""
    return max(0.0, min(smoothing, 1.0 - 50.0 / max(n_points, 1)))


def _distinct(values) -> list:
    return list(dict.fromkeys(values))


def data_sources(run: Run) -> list[str | None]:
    """What the run's token shards were made from (fineweb.py's manifest; None: no manifest)."""
    return _distinct(c["data_source"] for c in run.configs)


def val_baseline_applies(runs: list[Run]) -> bool:
    """GPT-2 124M's 3.2924 is a FineWeb-Edu val loss: drawn when every run's shards are FineWeb-Edu
    (or of unknown source: shards without a manifest)."""
    return all(s is None or FINEWEB_EDU in s.lower() for run in runs for s in data_sources(run))


def _own(rows: list[dict]) -> list[dict]:
    """The results rows scoring this run's checkpoints (not the foreign ones)."""
    return [r for r in rows if not r["foreign"]]


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if _is_number(r.get(key))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _task_set(row: dict) -> frozenset[str]:
    """The CORE tasks a record's mean is over (the training loop's and core.py's both list them)."""
    return frozenset(row["tasks"])


def _cell(value, fmt: str = ".4f", *notes) -> str:
    """A table cell: "–" for None, else the value and its notes: "0.2970 (10,042 ex)"."""
    if value is None:
        return "–"
    notes = [n for n in notes if n]
    return format(value, fmt) + (f" ({', '.join(notes)})" if notes else "")


def _best_score(rows: list[dict], key: str) -> str:
    """The best `key` with the example count of its row (a tie: the row on more examples): a score on
    a subset must not pass for a full-set one."""
    scored = [(r[key], r.get("count") or 0) for r in rows if _is_number(r.get(key))]
    value, count = max(scored) if scored else (None, 0)
    return _cell(value, ".4f", count and f"{count:,} ex")


def _best_core(run: Run) -> str:
    """The run's best CORE (training loop and core.py on its own checkpoints), with its examples per
    task. A partial mean counts only where no row has the full CORE, and says so with its task count;
    among partial means, those over the most tasks (fewer tasks is another measure). On a tie, the
    row scored on every example."""
    rows = [*run.core, *_own(run.core_results)]
    for key in ("core", "core_partial"):
        scored = [r for r in rows if _is_number(r.get(key))]
        if scored:
            n_tasks = (lambda r: 0) if key == "core" else (lambda r: len(_task_set(r)))
            best = max(scored, key=lambda r: (n_tasks(r), r[key], not r.get("max_per_task")))
            partial = key == "core_partial" and f"partial: {n_tasks(best)} of {CORE_TASK_COUNT} tasks"
            per_task = best.get("max_per_task") and f"{best['max_per_task']:,}/task"
            return _cell(best[key], ".4f", partial, per_task)
    return "–"


def _fmt_count(x: float) -> str:
    """1234567890 -> '1.23B', 524288 -> '524K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def summary_row(run: Run, warmup_steps: int = PlotConfig.warmup_steps) -> dict[str, str]:
    """One run's summary: column -> cell ("–" where the log has nothing to say)."""
    config, last = run.configs[-1]["config"], run.train[-1] if run.train else None
    val_losses, bpb = _values(run.val, "val_loss"), _values(run.val, "val_bpb")
    steady = [r for r in run.train if r["since_restart"] >= warmup_steps]  # past compile and warm-up
    mfu = _mean(_values(steady, "mfu"))
    wall = round(sum(end - start for start, end in run.restarts))
    return {
        "run": run.name.replace("|", "\\|"),
        "model": ", ".join(_distinct(c["config"]["model"] for c in run.configs)),
        "steps": f"{last['step'] + 1:,} / {config['max_steps']:,}" if last else "–",
        "tokens": _fmt_count(last["tokens"]) if last else "–",
        "final val loss": _cell(val_losses[-1] if val_losses else None),
        "best val loss": _cell(min(val_losses, default=None)),
        "final val bpb": _cell(bpb[-1] if bpb else None),
        "HellaSwag (training loop)": _best_score(run.hellaswag, "hellaswag_acc_norm"),
        "HellaSwag (hellaswag.py)": _best_score(_own(run.results), "acc_norm"),
        "HellaSwag (harness style)": _best_score(_own(run.results), "harness_acc_norm"),
        "CORE": _best_core(run),
        "tokens/s": _cell(_mean(_values(steady, "tokens_per_sec")), ",.0f"),
        "MFU": "–" if mfu is None else f"{100 * mfu:.1f}%",
        "wall time": f"{wall // 3600}:{wall % 3600 // 60:02d}:{wall % 60:02d}",
    }


def summarize(runs: list[Run], warmup_steps: int = PlotConfig.warmup_steps) -> str:
    """A markdown table, one row per run, and a note on how each column is computed."""
    rows = [summary_row(run, warmup_steps) for run in runs]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    if val_baseline_applies(runs):
        val_note = f"Val loss baseline: OpenAI GPT-2 124M {GPT2_VAL_LOSS[0]} on the FineWeb-Edu val shard."
    else:
        sources = "; ".join(_distinct(s or "unknown" for run in runs for s in data_sources(run)))
        val_note = (
            f"Val losses are on the val shards of {sources}: not comparable with OpenAI GPT-2 124M's "
            f"{GPT2_VAL_LOSS[0]}, measured on the FineWeb-Edu val shard."
        )
    refs = ", ".join(f"{label.removeprefix('GPT-2 ')} {value}" for value, label in GPT2_CORE)
    note = (
        "model: the config records' preset. HellaSwag: best acc_norm and the examples it was scored on "
        f"({HELLASWAG_VAL_SIZE:,} ex = the full val set; fewer: a demo or --limit run, noisier, not comparable "
        "with the baselines); the training loop and hellaswag.py score completion-style (GPT-2 124M: "
        f"{GPT2_HELLASWAG[0]}, GPT-3 124M: {GPT3_HELLASWAG[0]}), harness style as lm-evaluation-harness "
        f"(GPT-2 124M: {GPT2_HELLASWAG_HARNESS[0]}). {val_note} val bpb: bits per byte of the last val loss. "
        f"CORE: best DCLM CORE ({CORE_TASK_COUNT} tasks, centered accuracy); N/task: on the first N examples "
        "of each task; partial: CORE-PARTIAL, a mean over those tasks only, not CORE (the best of those over "
        f"the most tasks). GPT-2 CORE ({CORE_SOURCE}): {refs}. HellaSwag and CORE are the run's own "
        "checkpoints' scores: rows of its results files for checkpoints in other folders or Hugging Face "
        "models are drawn as levels only. tokens/s, MFU: means over train steps past the first "
        f"{warmup_steps} of each (re)start; wall time: sum over (re)starts of first-to-last record time."
    )
    return "\n".join([*lines, "", note]) + "\n"


# ---------------------------------------------------------------- drawing


def _xy(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    pairs = [(r["step"], r[key] * scale) for r in rows if r["step"] is not None and _is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot(ax, rows: list[dict], key: str, gid: str, label: str, scale: float = 1.0, **style) -> list:
    """Draw `key` over the steps of `rows` where it was logged; returns the line(s) drawn (none: no data)."""
    x, y = _xy(rows, key, scale)
    return ax.plot(x, y, gid=gid, label=label, **style) if x else []


def _label(text: str, run: Run, runs: list[Run]) -> str:
    return f"{run.name}: {text}" if len(runs) > 1 else text


def _no_data(ax, what: str) -> None:
    box = {"facecolor": "white", "edgecolor": "0.8", "boxstyle": "round"}
    style = {"ha": "center", "va": "center", "fontsize": 12, "color": "0.35", "bbox": box}
    ax.text(0.5, 0.62, f"no data: {what}", transform=ax.transAxes, gid="no-data", **style)


def _baseline(ax, value_label: tuple[float, str], style: str, color: str) -> None:
    value, label = value_label
    label, gid = f"{label} ({value:g})", f"baseline/{label}"
    ax.axhline(value, linestyle=style, color=color, linewidth=1.3, gid=gid, label=label)


def _levels(ax, levels: dict[tuple[str, str, float], str], gid_prefix: str) -> None:
    """Scores without an x on this run's curve (no step, or foreign): dotted horizontal levels, each
    labelled with what was scored. `levels`: (label, what, value) -> colour."""
    for j, ((label, what, value), color) in enumerate(levels.items()):
        style = {"color": color, "linestyle": (j, (1, 2)), "linewidth": 1.4}
        ax.axhline(value, gid=f"{gid_prefix}/{label}", label=f"{label}, {what} ({value:.4f})", **style)


def _focus_ylim(ax, curves: list[tuple[list, list]], keep: tuple[float, ...] = (), skip: float = 0.05) -> None:
    """Zoom y onto everything after the first `skip` of each curve's steps (plus `keep` values): the
    first steps' loss (~11 at init) would otherwise squash the part of the curve worth reading."""
    tail = [y for xs, ys in curves if xs for x, y in zip(xs, ys) if x >= xs[0] + skip * (xs[-1] - xs[0])]
    if len(tail) < 2:
        return
    lo, hi = min(tail + list(keep)), max(tail + list(keep))
    pad = 0.06 * (hi - lo) or 0.05 * abs(hi) or 0.1
    ax.set_ylim(lo - pad, hi + pad)


def _draw_training_loss(ax, runs: list[Run], smoothing: float) -> None:
    curves = []
    for i, run in enumerate(runs):
        x, y = _xy(run.train, "train_loss")
        color, weight, gid = f"C{i % 10}", ema_weight(smoothing, len(y)), f"{run.name}/train_loss"
        if x and weight > 0:  # faint raw curve under the smoothed one, which carries the run's legend entry
            raw = "train loss (raw)" if len(runs) == 1 else "_raw"
            ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8, gid=gid, label=raw)
            label = _label(f"train loss (EMA {weight:.3g})", run, runs)
            ax.plot(x, ema(y, weight), color=color, linewidth=1.8, gid=f"{gid}_ema", label=label)
        elif x:  # too few steps to smooth (or --smoothing 0): the raw curve is the run's curve, drawn full
            unsmoothed = f", {len(y)} steps: not smoothed" if smoothing else ""
            label = _label(f"train loss (raw{unsmoothed})", run, runs)
            style = {"linewidth": 1.4, "marker": "o" if len(y) <= 20 else None, "markersize": 3}
            ax.plot(x, y, color=color, gid=gid, label=label, **style)
        curves.append((x, y))
    if not any(x for x, _ in curves):
        _no_data(ax, "no train records yet")
    _focus_ylim(ax, curves)
    ax.set_title("Training loss")
    ax.set_ylabel("cross-entropy loss (nats/token)")


CURVE = {"marker": "o", "markersize": 3, "linewidth": 1.6}  # an evaluation every N steps: points joined


def _draw_validation_loss(ax, runs: list[Run], smoothing: float) -> None:
    curves = []
    for i, run in enumerate(runs):
        # the legend names the data, not the title: several runs' sources would not fit one line
        sources = "; ".join(s for s in data_sources(run) if s)
        label = _label(f"val loss ({sources})" if sources else "val loss", run, runs)
        if _plot(ax, run.val, "val_loss", f"{run.name}/val_loss", label, color=f"C{i % 10}", **CURVE):
            curves.append(_xy(run.val, "val_loss"))
    baseline = val_baseline_applies(runs)
    if baseline:
        _baseline(ax, GPT2_VAL_LOSS, "--", "0.35")
    if not curves:
        _no_data(ax, "no val records yet")
    _focus_ylim(ax, curves, keep=(GPT2_VAL_LOSS[0],) if baseline else ())
    ax.set_title("Validation loss")
    ax.set_ylabel("cross-entropy loss (nats/token)")


def _draw_learning_rate(ax, runs: list[Run], smoothing: float) -> None:
    for i, run in enumerate(runs):
        _plot(ax, run.train, "lr", f"{run.name}/lr", _label("learning rate", run, runs), color=f"C{i % 10}")
    if not any(run.train for run in runs):
        _no_data(ax, "no train records yet")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")


def _draw_throughput(ax, runs: list[Run], smoothing: float) -> None:
    # MFU on its own axis; logged as null where the device's peak FLOPS is unknown (CPU)
    mfu_ax = ax.twinx() if any(_xy(run.train, "mfu")[0] for run in runs) else None
    handles = []
    for i, run in enumerate(runs):
        label, gid = _label("tokens/s", run, runs), f"{run.name}/tokens_per_sec"
        handles += _plot(ax, run.train, "tokens_per_sec", gid, label, color=f"C{i % 10}", linewidth=1.2)
        if mfu_ax is not None:
            label, style = _label("MFU (%)", run, runs), {"linewidth": 1.0, "linestyle": ":", "alpha": 0.9}
            handles += _plot(mfu_ax, run.train, "mfu", f"{run.name}/mfu", label, 100.0, color=f"C{i % 10}", **style)
    if not handles:
        _no_data(ax, "no train records yet")
    ax.set_ylim(bottom=0)
    if mfu_ax is not None:
        mfu_ax.set_ylim(bottom=0)
        mfu_ax.set_ylabel("MFU (%)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v)))
    ax.set_title("Throughput (left) and MFU (right)" if mfu_ax is not None else "Throughput (MFU not logged)")
    ax.set_ylabel("tokens/s")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)


# hellaswag.py's points: reference style □, harness style ▲ (compare those with the harness baseline)
HELLASWAG_POINTS = {
    "acc_norm": ("acc_norm, hellaswag.py", {"marker": "s", "markerfacecolor": "none", "markeredgewidth": 1.5}),
    "harness_acc_norm": ("harness acc_norm, hellaswag.py", {"marker": "^"}),
}


def _draw_hellaswag(ax, runs: list[Run], smoothing: float) -> None:
    drawn, levels, several = [], {}, len(runs) > 1
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        # with several runs, the legend names each run once and explains the markers once, below
        label = run.name if several else "acc_norm, training loop"
        gid = f"{run.name}/hellaswag_acc_norm"
        lines = _plot(ax, run.hellaswag, "hellaswag_acc_norm", gid, label, color=color, **CURVE)
        for key, (what, marker) in HELLASWAG_POINTS.items():
            label = ("_" if lines else run.name) if several else what
            style = {"color": color, "linestyle": "none", "markersize": 7, **marker}
            lines += _plot(ax, _own(run.results), key, f"{run.name}/results_{key}", label, **style)
        drawn += [y for line in lines for y in line.get_ydata()]
        for row in run.results:
            if (row["step"] is None or row["foreign"]) and _is_number(row.get("acc_norm")):
                levels[(row["label"], "hellaswag.py", row["acc_norm"])] = "tab:purple"
    _levels(ax, levels, "results")
    points = {key for key in HELLASWAG_POINTS for run in runs if _xy(_own(run.results), key)[0]}
    for key, (what, marker) in HELLASWAG_POINTS.items():
        if several and key in points:  # marker meaning, once, in a neutral colour
            ax.plot([], [], color="0.3", linestyle="none", markersize=7, label=what, **marker)
    _baseline(ax, GPT3_HELLASWAG, "--", "tab:red")
    if "harness_acc_norm" in points:
        _baseline(ax, GPT2_HELLASWAG_HARNESS, "-.", "0.55")
    _baseline(ax, GPT2_HELLASWAG, "--", "0.35")
    _baseline(ax, RANDOM_HELLASWAG, ":", "0.6")
    if not drawn and not levels:
        _no_data(ax, "no HellaSwag evaluations yet")
    # Room below the random line for the legend (up to eight entries), so it hides no curve.
    values = drawn + [value for _, _, value in levels] + [RANDOM_HELLASWAG[0], GPT3_HELLASWAG[0]]
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.4 * (hi - lo), hi + 0.08 * (hi - lo))
    ax.legend(loc="lower right", ncol=2, fontsize=7)
    counts = {r.get("count") for run in runs for r in (*run.hellaswag, *run.results)} - {None}
    ax.set_title("HellaSwag accuracy" + (f" ({counts.pop():,} val examples)" if len(counts) == 1 else ""))
    ax.set_ylabel("acc_norm (length-normalized)")


def _per_task(max_per_task) -> str:
    """ " (500/task)" when points were scored on the first N examples of each task; "" when all were
    scored on every example. Mixed: each size, "all" for the full ones."""
    sizes = [m if _is_number(m) and m > 0 else None for m in max_per_task]
    subsets, full = sorted({m for m in sizes if m}), None in sizes
    return f" ({', '.join([f'{m:,}/task' for m in subsets] + ['all'] * full)})" if subsets else ""


class PartialSeries(NamedTuple):
    """How one CORE-PARTIAL task set is drawn: legend text, gid suffix, marker."""

    text: str  # "CORE-PARTIAL, 18 of 22 tasks", with " (task set 2)" when another set has as many tasks
    gid: str  # "18of22", "18of22-2"
    marker: str


def _partial_series(runs: list[Run]) -> dict[frozenset[str], PartialSeries]:
    """A series for every task set a CORE-PARTIAL score drawn is over, shared by all runs, most tasks
    first; sets of the same size are numbered, as their means still differ."""
    rows = (r for run in runs for r in (*run.core, *run.core_results) if _is_number(r.get("core_partial")))
    ordered = sorted({_task_set(r) for r in rows}, key=lambda s: (-len(s), sorted(s)))
    series = {}
    for i, task_set in enumerate(ordered):
        same_size = [s for s in ordered if len(s) == len(task_set)]
        text, gid = f"CORE-PARTIAL, {len(task_set)} of {CORE_TASK_COUNT} tasks", f"{len(task_set)}of{CORE_TASK_COUNT}"
        if len(same_size) > 1:
            n = same_size.index(task_set) + 1
            text, gid = f"{text} (task set {n})", f"{gid}-{n}"
        series[task_set] = PartialSeries(text, gid, "x+dv^<>"[i % 7])
    return series


# The training loop's CORE is a curve, core.py's checkpoint scores are points. CORE-PARTIAL: dotted,
# a marker per task set.
CORE_STYLE = {
    "training loop": {"linestyle": "-", "marker": "o", "linewidth": 1.6, "markersize": 4},
    "core.py": {"linestyle": "none", "marker": "s", "markerfacecolor": "none", "markeredgewidth": 1.5, "markersize": 7},
}
PARTIAL_STYLE = {
    "training loop": {"linestyle": ":", "linewidth": 1.0, "markersize": 5},
    "core.py": {"linestyle": "none", "markeredgewidth": 1.5, "markersize": 7},
}


def _draw_core_run(ax, run: Run, runs: list[Run], color: str, partial: dict[frozenset, PartialSeries]) -> list[float]:
    """One run's CORE: a series for CORE and one per CORE-PARTIAL task set, from the training loop and
    from core.py on the run's own checkpoints; returns the values drawn."""
    drawn = []
    own_points = [r for r in _own(run.core_results) if r["step"] is not None]
    for rows, prefix, where in ((run.core, "", "training loop"), (own_points, "results_", "core.py")):
        groups: dict[str, tuple[str, dict, list[dict]]] = {}  # gid suffix -> (name, style, rows)
        for r in rows:
            if _is_number(r.get("core")):
                groups.setdefault("core", ("CORE", CORE_STYLE[where], []))[2].append(r)
            elif _is_number(r.get("core_partial")):
                s = partial[_task_set(r)]
                style = {**PARTIAL_STYLE[where], "marker": s.marker}
                groups.setdefault(f"core_partial/{s.gid}", (s.text, style, []))[2].append(r)
        for key, (name, style, group) in groups.items():
            values = [r["core"] if key == "core" else r["core_partial"] for r in group]
            label = _label(f"{name}, {where}{_per_task(r.get('max_per_task') for r in group)}", run, runs)
            steps = [r["step"] for r in group]
            ax.plot(steps, values, color=color, gid=f"{run.name}/{prefix}{key}", label=label, **style)
            drawn += values
    return drawn


def _draw_core(ax, runs: list[Run], smoothing: float) -> None:
    drawn, levels = [], {}
    partial = _partial_series(runs)
    for i, run in enumerate(runs):
        drawn += _draw_core_run(ax, run, runs, f"C{i % 10}", partial)
        for r in run.core_results:
            if r["step"] is not None and not r["foreign"]:
                continue
            per_task = _per_task([r.get("max_per_task")])
            if _is_number(r.get("core")):
                levels[(r["label"], f"core.py CORE{per_task}", r["core"])] = "tab:purple"
            elif _is_number(r.get("core_partial")):
                levels[(r["label"], f"core.py {partial[_task_set(r)].text}{per_task}", r["core_partial"])] = "tab:brown"
    _levels(ax, levels, "core_results")
    drawn += [value for _, _, value in levels]
    for (value, label), shade in zip(GPT2_CORE, ("0.25", "0.4", "0.55", "0.7")):
        _baseline(ax, (value, f"{label}, {CORE_SOURCE}"), "--", shade)
    if not drawn:
        _no_data(ax, "no CORE evaluations yet")
    # Room above the largest reference for the legend, so it hides no curve.
    lo, hi = min(drawn + [0.0]), max(drawn + [GPT2_CORE[-1][0]])
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.6 * (hi - lo))
    ax.legend(loc="upper left", fontsize=7)
    # "22 tasks" only when it is true of every score drawn (the GPT-2 references are CORE).
    ax.set_title(CORE_AND_PARTIAL_TITLE if partial else CORE_TITLE)
    ax.set_ylabel("CORE (centered accuracy, mean)")


PANELS = {  # name (of its .png) -> what draws it
    "training_loss": _draw_training_loss,
    "validation_loss": _draw_validation_loss,
    "learning_rate": _draw_learning_rate,
    "throughput": _draw_throughput,
    "hellaswag_accuracy": _draw_hellaswag,
    "core": _draw_core,
}
OWN_LEGEND = ("throughput", "hellaswag_accuracy", "core")  # panels that place their own legend


def _draw_panel(ax, name: str, runs: list[Run], smoothing: float, last_step: int) -> None:
    PANELS[name](ax, runs, smoothing)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, max(1.0, 1.02 * last_step))  # every panel spans the same steps, so they line up
    batches = {run.tokens_per_step for run in runs}
    if len(batches) == 1:  # a tokens axis only when every run takes the same tokens per step
        tps = batches.pop()
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v) if v else "0"))
    if name not in OWN_LEGEND and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def build_figures(runs: list[Run], smoothing: float = PlotConfig.smoothing) -> dict[str, Figure]:
    """One Figure per panel plus "overview" (all panels), each with an Agg canvas, not yet saved."""
    rows = (r for run in runs for rows in (run.train, run.val, run.hellaswag, run.core) for r in rows)
    scores = (r for run in runs for r in (*_own(run.results), *_own(run.core_results)))
    last_step = max((r["step"] for r in (*rows, *scores) if r["step"] is not None), default=0)
    title = ", ".join(r.name for r in runs)
    figures = {}
    for name in PANELS:
        fig = Figure(figsize=(9, 5.5), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)
        _draw_panel(fig.add_subplot(), name, runs, smoothing, last_step)
        fig.suptitle(title, fontsize=9, color="0.4", x=0.99, ha="right")
        figures[name] = fig

    fig = Figure(figsize=(24, 10), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4)
    # Training loss gets two columns: it is the curve people read first; throughput, over the same
    # steps, the two below it.
    slots = (grid[0, :2], grid[0, 2], grid[0, 3], grid[1, :2], grid[1, 2], grid[1, 3])
    for name, slot in zip(PANELS, slots):
        _draw_panel(fig.add_subplot(slot), name, runs, smoothing, last_step)
    fig.suptitle(f"GPT-2 training: {title}", fontsize=14)
    figures["overview"] = fig
    return figures


# ---------------------------------------------------------------- writing and CLI


def make_figures(
    runs: list[Run], out_dir: str | os.PathLike, smoothing: float = PlotConfig.smoothing
) -> dict[str, Path]:
    """Draw and save every figure as out_dir/<name>.png; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in build_figures(runs, smoothing).items():
        paths[name] = out_dir / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            fig.savefig(tmp, format="png")
    return paths


def parse_config(argv: list[str] | None = None) -> PlotConfig:
    """The flags given, over PlotConfig's defaults; a value PlotConfig refuses raises UserError."""
    return cli.parse_config(PlotConfig, argv, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    runs = load_runs(cfg.log_dirs)
    for run in runs:
        if run.skipped:
            more = f"; ... {len(run.skipped) - 5} more" if len(run.skipped) > 5 else ""
            shown = "; ".join(run.skipped[:5])
            print(
                f"plot.py: warning: skipped {len(run.skipped)} bad line(s) in {run.log_dir}: {shown}{more}",
                file=sys.stderr,
            )
    out_dir = Path(cfg.out_dir or cfg.log_dirs[0])
    try:
        paths = make_figures(runs, out_dir, cfg.smoothing)
    except OSError as e:
        raise UserError(f"cannot write figures to {out_dir}: {e.strerror}: pass a writable --out-dir") from None
    print(f"wrote {', '.join(p.name for p in paths.values())} to {out_dir}")
    if cfg.summary:
        table = summarize(runs, cfg.warmup_steps)
        with atomic_path(out_dir / "summary.md") as tmp:
            Path(tmp).write_text(table, encoding="utf-8")
        print(table, end="")
        print(f"wrote {out_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
