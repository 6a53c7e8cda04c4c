"""Plot a training run from its JSONL logs: losses, learning rate, throughput, HellaSwag, CORE.

Reads `<log-dir>/metrics.jsonl` (written by train_gpt2.py) and, if present,
`<log-dir>/hellaswag_results.jsonl` (written by hellaswag.py) and `<log-dir>/core_results.jsonl`
(written by core.py), and writes into the log dir:

    training_loss.png  validation_loss.png  learning_rate.png  throughput.png
    hellaswag_accuracy.png  core.png  overview.png (all six panels in one figure)

Runs on CPU in a few seconds, also while training is still writing the log:

    uv run plot.py                                              # log/ -> log/*.png
    uv run plot.py --summary                                    # + markdown table, log/summary.md
    uv run plot.py --log-dir runA --log-dir runB --out-dir cmp  # several runs in one figure

Conventions (the README's "Plotting a run" section says the same):
- A resumed run appends a new config record and may repeat steps: the last record per (type, step)
  wins, as the resumed process is the one whose weights continue.
- Smoothed train loss is a debiased exponential moving average over the logged steps, drawn over the
  raw curve: `--smoothing` is the weight of the past (0 = off), lowered for short logs so the lag
  stays within 2% of the steps (the legend shows the weight used). A log too short to smooth (50
  train records or fewer) is drawn as its raw curve, in full, with its own legend entry.
- A hellaswag.py or core.py score counts for the run whose folder holds its checkpoint: a row in one
  run's hellaswag_results.jsonl or core_results.jsonl for a checkpoint in another folder moves to that
  run when it is plotted too, and is otherwise left out (the summary and a warning say so).
- Mean tokens/s and MFU skip the first `--warmup-steps` train records after each (re)start
  (torch.compile and CUDA warm-up make those steps slow). Wall time sums, over the (re)starts,
  the time from the config record to that process's last record; gaps between jobs do not count.
- The val panel names what the token shards were made from (the config record's `data_source`, from
  fineweb.py's manifest: "HuggingFaceFW/fineweb-edu (sample-10BT)", "fineweb_demo.parquet", or unknown
  for older logs). OpenAI GPT-2 124M's val loss 3.2924 was measured on the FineWeb-Edu val shard, so it
  is drawn only when every run's source is FineWeb-Edu or unknown; next to another corpus it would mislead.
- HellaSwag scores in the summary carry the number of examples scored: 10,042 is the full val set,
  fewer is a demo or `--limit` run, a noisier estimate, not directly comparable with the baselines.
- CORE is the DCLM 22-task score; a score on the first N examples per task says "(N/task)". A mean over
  fewer tasks (some missing) is CORE-PARTIAL: drawn and summarised apart, never as CORE, always with its
  task count ("CORE-PARTIAL, 18 of 22 tasks", from the record's "tasks"; "task count unknown" for older
  records without them). Means over different task sets are not comparable: each task set is its own
  series, and points over different (or unknown) task sets are never joined by a line.
- The summary's model column is the preset of the run's config records ("gpt2", "tiny"; "–" without one).

Figures are drawn with matplotlib's Agg canvas on `Figure` objects (no pyplot, so no GUI backend
and no global figure state), and every file (figures, summary.md) is written through
`fileio.atomic_path`: a temp file, fsynced, given the mode the umask allows, then renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

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

METRICS_FILE = "metrics.jsonl"
HELLASWAG_FILE = "hellaswag_results.jsonl"
CORE_FILE = "core_results.jsonl"
PANELS = ("training_loss", "validation_loss", "learning_rate", "throughput", "hellaswag_accuracy", "core")

# Baselines (value, label). Val loss: OpenAI's GPT-2 124M checkpoint on the FineWeb-Edu val shard
# (edufineweb_val_000000), the number the reference run compares against. A loss on another corpus
# (the FineWeb demo parquet, a custom dataset) is not comparable: the line is drawn only when every
# run's data_source names FineWeb-Edu (FINEWEB_EDU, case-insensitive) or is unknown (older logs).
GPT2_VAL_LOSS = (3.2924, "OpenAI GPT-2 124M")
FINEWEB_EDU = "fineweb-edu"
# HellaSwag acc_norm on the 10,042 val examples. 0.2955: GPT-2 124M with completion-style scoring,
# the metric hellaswag.py and the training loop compute; 0.3114: the same model with
# lm-evaluation-harness (multiple-choice) scoring, comparable to the harness-style points only;
# 0.337: GPT-3 Small (125M), zero-shot, Brown et al. 2020; 0.25: one of four endings at random.
GPT2_HELLASWAG = (0.2955, "OpenAI GPT-2 124M")
GPT2_HELLASWAG_HARNESS = (0.3114, "OpenAI GPT-2 124M, harness style")
GPT3_HELLASWAG = (0.337, "GPT-3 124M (paper)")
RANDOM_HELLASWAG = (0.25, "random")
HELLASWAG_VAL_SIZE = 10_042  # examples in the full val set; a demo or --limit score uses fewer
# CORE of OpenAI's GPT-2 checkpoints as the "time to GPT-2" leaderboard (nanochat) reports them: quoted,
# not measured by this repo's core.py, so the labels say where they come from.
GPT2_CORE = ((0.1139, "GPT-2 124M"), (0.1849, "GPT-2 355M"), (0.2146, "GPT-2 774M"), (0.2565, "GPT-2 1.5B"))
CORE_SOURCE = "leaderboard, not measured here"
# Tasks in DCLM's CORE (core_eval.TASKS, not imported: it pulls the tokenizer into a plotting script).
CORE_TASK_COUNT = 22

# metrics.jsonl record types plotted and their numeric fields (core also gets "task_set": _task_set).
SERIES_FIELDS = {
    "train": ("tokens", "train_loss", "lr", "grad_norm", "step_ms", "tokens_per_sec", "mfu", "time"),
    "val": ("tokens", "val_loss", "val_bpb", "time"),  # val_bpb: absent (None) in older logs
    "hellaswag": ("tokens", "hellaswag_acc", "hellaswag_acc_norm", "count", "time"),
    # core: None and core_partial set when tasks were missing (a mean over fewer tasks is not CORE)
    "core": ("tokens", "core", "core_partial", "count", "max_per_task", "time"),
}
RESULT_FIELDS = ("acc", "acc_norm", "harness_acc", "harness_acc_norm", "count", "seconds", "time")
CORE_RESULT_FIELDS = ("core", "core_partial", "missing", "max_per_task", "count", "seconds", "time", "task_set")
# Results files a script appends to a log dir: file -> (Run field holding its rows, writer, fields kept).
RESULT_FILES = {
    HELLASWAG_FILE: ("results", "hellaswag.py", RESULT_FIELDS),
    CORE_FILE: ("core_results", "core.py", CORE_RESULT_FIELDS),
}


@dataclass(frozen=True)
class PlotConfig:
    log_dirs: tuple[str, ...] = field(
        default=(DEFAULT_LOG_DIR,),
        metadata={
            "flag": "--log-dir",
            "metavar": "DIR",
            "help": "run directory holding metrics.jsonl; repeat the flag to compare runs",
        },
    )
    out_dir: str = field(
        default="", metadata={"help": "where figures and summary.md go (default: the first --log-dir)"}
    )
    summary: bool = field(
        default=False, metadata={"help": "print a markdown table of each run's results and write summary.md"}
    )
    smoothing: float = field(
        default=0.95,
        metadata={"help": "EMA weight of the past for the smoothed train loss, in [0, 1); 0 = no smoothing"},
    )
    # 10: torch.compile's first step and a few recompiles/cache warm-ups on H100s; 0.05% of a 19,073-step run.
    warmup_steps: int = field(
        default=10,
        metadata={
            "help": "train records skipped after each (re)start when averaging tokens/s and MFU (compile, warm-up)"
        },
    )

    def __post_init__(self):
        if not self.log_dirs:
            raise UserError(f"no log dir given: pass --log-dir DIR (default: {DEFAULT_LOG_DIR})")
        if not 0.0 <= self.smoothing < 1.0:
            raise UserError(f"--smoothing {self.smoothing} is outside [0, 1): use e.g. 0.95, or 0 for none")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps} is negative: use 0 or more")


@dataclass(frozen=True)
class Run:
    """One run's logs, cleaned: each series is a dict of equal-length lists sorted by step."""

    name: str
    log_dir: Path
    configs: list[dict]  # the config records, one per (re)start, in file order
    train: dict[str, list]  # "step", SERIES_FIELDS["train"], "since_restart" (0 = first record after a (re)start)
    val: dict[str, list]  # "step", SERIES_FIELDS["val"]
    hellaswag: dict[str, list]  # "step", SERIES_FIELDS["hellaswag"]  (in-training evaluations)
    results: dict[str, list]  # hellaswag.py: "step" (int or None), "label", "checkpoint", "model", RESULT_FIELDS
    restarts: list[tuple[float, float]]  # (first, last) record time of each (re)start
    skipped: list[str]  # "file:line: reason" for every line that was not used
    # rows of this run's results files (each with its "results_file") whose checkpoint lies in another
    # folder (an older hellaswag.py filed every score under log/): not this run's, neither drawn nor summarised
    elsewhere: list[dict] = field(default_factory=list)
    # "step", SERIES_FIELDS["core"], "task_set" (in-training CORE evaluations)
    core: dict[str, list] = field(default_factory=lambda: _columns([], ("step", *SERIES_FIELDS["core"], "task_set")))
    core_results: dict[str, list] = field(default_factory=lambda: _result_columns([], CORE_RESULT_FIELDS))


# ---------------------------------------------------------------- reading


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, record) for every JSON line; a reason string for each line that is not JSON. The
    records are the ones train_gpt2.py / hellaswag.py write: their fields are not checked again here."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records, skipped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            # A live run may be caught mid-write: its last line has no newline yet.
            partial = n == len(lines) and not text.endswith("\n")
            why = "incomplete last line (the run may still be writing it)" if partial else "not valid JSON"
            skipped.append(f"{path}:{n}: {why}")
            continue
        records.append((n, obj))
    return records, skipped


def _line_order(skipped: str) -> tuple[str, int]:
    """Sort key for "file:line: reason" strings: by file, then line number."""
    m = re.match(r"(.*?):(\d+): ", skipped)
    return (m[1], int(m[2])) if m else (skipped, 0)


def _columns(rows: list[dict], keys) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in keys}


def _task_set(record: dict) -> frozenset[str] | None:
    """The labels of the CORE tasks a record's mean is over: the keys of its "tasks" (core.py rows and
    the training loop's records both carry them). None where unknown: a record from before the field."""
    tasks = record.get("tasks")
    return frozenset(tasks) if isinstance(tasks, dict) and tasks else None


def load_run(log_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Read one run directory. Raises UserError (one line) when there is no usable metrics.jsonl."""
    log_dir = Path(log_dir)
    path = log_dir / METRICS_FILE
    if not log_dir.is_dir():
        raise UserError(f"log dir {log_dir} does not exist: train first (uv run train_gpt2.py) or pass --log-dir DIR")
    if not path.is_file():
        raise UserError(f"{path} not found: train first (uv run train_gpt2.py) or pass the run's --log-dir")
    try:
        lines, skipped = _read_jsonl(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}: check its permissions") from None

    configs: list[dict] = []
    latest: dict[tuple[str, int], dict] = {}  # (type, step) -> last record: a resumed run's record wins
    times: list[list[float]] = [[]]  # record times per (re)start; index 0 = records before any config
    n_train = [0]  # train records seen in each (re)start, in file order
    for _, rec in lines:
        kind, step = rec["type"], rec["step"]
        if kind == "config":
            configs.append(rec)
            times.append([])
            n_train.append(0)
        elif kind in SERIES_FIELDS:
            if kind == "train":
                rec = {**rec, "since_restart": n_train[-1]}
                n_train[-1] += 1
            elif kind == "core":
                rec = {**rec, "task_set": _task_set(rec)}
            latest[(kind, step)] = rec
        # other types ("sample", future ones) are valid but not plotted
        if _is_number(rec.get("time")):
            times[-1].append(float(rec["time"]))
    if not configs and not latest:
        raise UserError(
            f"{path} has no records (empty, or only bad lines): wait for the first log step or check --log-dir"
        )

    series = {}
    for kind, fields in SERIES_FIELDS.items():
        rows = sorted((r for (k, _), r in latest.items() if k == kind), key=lambda r: r["step"])
        extra = {"train": ("since_restart",), "core": ("task_set",)}.get(kind, ())
        keys = ("step", *fields, *extra)
        series[kind] = _columns(rows, keys)

    own, elsewhere = {}, []
    for file, (attr, _, fields) in RESULT_FILES.items():
        rows = _load_results(log_dir / file, skipped)
        own[attr] = _result_columns([r for r in rows if _is_own(r, log_dir)], fields)
        elsewhere += [r for r in rows if not _is_own(r, log_dir)]
    return Run(
        name=name or log_dir.resolve().name or str(log_dir),
        log_dir=log_dir,
        configs=configs,
        train=series["train"],
        val=series["val"],
        hellaswag=series["hellaswag"],
        core=series["core"],
        restarts=[(min(t), max(t)) for t in times if t],
        skipped=sorted(skipped, key=_line_order),
        elsewhere=elsewhere,
        **own,
    )


def _in_folder(checkpoint: str, log_dir: Path) -> bool:
    """Whether a checkpoint path as hellaswag.py recorded it (relative to where it ran, or absolute)
    lies in `log_dir`: the same folder from here, or a folder of the same name (the run was copied or
    moved since), or no folder at all (scored from inside it)."""
    folder = Path(checkpoint).parent
    return not folder.name or folder.resolve() == log_dir.resolve() or folder.name == log_dir.resolve().name


def _is_own(row: dict, log_dir: Path) -> bool:
    """A row scores this run unless it names a checkpoint in another folder (HF models: kept as levels)."""
    return not row["checkpoint"] or _in_folder(row["checkpoint"], log_dir)


def _result_columns(rows: list[dict], fields: tuple[str, ...] = RESULT_FIELDS) -> dict[str, list]:
    """Rows of one results file as columns sorted by step (None last); re-evaluating the same
    (checkpoint, model, step) replaces the older row."""
    latest: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: r.get("time") or 0):  # stable: file order among equal times
        latest[(row["checkpoint"], row["model"], row["step"])] = row
    ordered = sorted(latest.values(), key=lambda r: (r["step"] is None, r["step"] or 0))
    return _columns(ordered, ("step", "label", "checkpoint", "model", *fields))


def _load_results(path: Path, skipped: list[str]) -> list[dict]:
    """A results file's rows (hellaswag.py's, core.py's), one dict per valid line with its "label" and
    "results_file" (the file's name: which Run field the row belongs in), in file order."""
    if not path.is_file():
        return []
    try:
        lines, bad = _read_jsonl(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}: check its permissions") from None
    skipped.extend(bad)
    rows = []
    for _, rec in lines:
        step, ckpt, model = rec.get("step"), rec.get("checkpoint"), rec.get("model")
        label = Path(str(ckpt or model)).name or str(ckpt or model)
        rows.append(
            {
                **rec,
                "checkpoint": ckpt,
                "model": model,
                "step": step,
                "label": label,
                "results_file": path.name,
                "task_set": _task_set(rec),  # kept for core.py's rows (CORE_RESULT_FIELDS)
            }
        )
    return rows


def load_runs(log_dirs) -> list[Run]:
    """load_run for each dir, named by the dir's name, or by the path as given where names collide.
    A hellaswag.py or core.py score filed in one run's folder for a checkpoint of another run given
    here moves to that run (each score in its own run's row)."""
    names = [Path(d).resolve().name or str(d) for d in log_dirs]
    runs = []
    for i, d in enumerate(log_dirs):
        name = names[i] if names.count(names[i]) == 1 else str(d)
        if any(r.name == name for r in runs):
            name = f"{name}#{i + 1}"
        runs.append(load_run(d, name=name))
    moved: dict[tuple[int, str], list[dict]] = {}  # (run index, results file) -> rows moving there
    for i, run in enumerate(runs):
        stay = []
        for row in run.elsewhere:
            home = next(
                (j for j, other in enumerate(runs) if j != i and _in_folder(row["checkpoint"], other.log_dir)), None
            )
            if home is None:
                stay.append(row)
            else:
                moved.setdefault((home, row["results_file"]), []).append(row)
        runs[i] = replace(run, elsewhere=stay)
    for (j, file), rows in moved.items():
        attr, _, fields = RESULT_FILES[file]
        columns = getattr(runs[j], attr)
        own = [dict(zip(columns, values)) for values in zip(*columns.values())]
        runs[j] = replace(runs[j], **{attr: _result_columns(own + rows, fields)})
    return runs


# ---------------------------------------------------------------- derived numbers


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); non-finite values are held over."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if v is not None and math.isfinite(v):
            acc = weight * acc + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
        out.append(acc / norm if norm > 0 else math.nan)
    return out


def ema_weight(smoothing: float, n_points: int) -> float:
    """`smoothing`, lowered for short logs so the EMA's time constant 1/(1-w) stays within 2% of the
    logged steps: a 200-step run (or a big run's first minutes) falls too fast for a 20-step lag."""
    return max(0.0, min(smoothing, 1.0 - 50.0 / max(n_points, 1)))


def _train_config(record: dict) -> dict:
    """The TrainConfig fields of a config record ({} when absent)."""
    cfg = record.get("config")
    return cfg if isinstance(cfg, dict) else {}


def model_presets(run: Run) -> list[str]:
    """The model preset(s) the run trained, per its config records' `model` ("gpt2", "tiny", ...),
    distinct, in file order; [] for a log without a config record (or one without the field)."""
    presets = []
    for record in run.configs:
        preset = _train_config(record).get("model")
        if isinstance(preset, str) and preset and preset not in presets:
            presets.append(preset)
    return presets


def data_sources(run: Run) -> list[str | None]:
    """What the run's token shards were made from, per its config records' `data_source` (distinct,
    in file order; None = unknown: a log from before the field, shards without a manifest)."""
    sources = []
    for cfg in run.configs or [{}]:
        source = cfg.get("data_source")
        source = source.strip() if isinstance(source, str) and source.strip() else None
        if source not in sources:
            sources.append(source)
    return sources


def val_baseline_applies(runs: list[Run]) -> bool:
    """GPT-2 124M's 3.2924 is a FineWeb-Edu val-shard loss: comparable only when every run's source
    is FineWeb-Edu, or unknown (older logs, shards without a manifest: drawn as before the field)."""
    return all(s is None or FINEWEB_EDU in s.lower() for run in runs for s in data_sources(run))


def val_title(runs: list[Run]) -> str:
    """ "Validation loss (val shard of X)", "(val shards: X; Y)" for several sources, "(val shard)" unknown."""
    sources = list(dict.fromkeys(s for run in runs for s in data_sources(run)))
    if sources == [None]:
        return "Validation loss (val shard)"
    if len(sources) == 1:
        pieces = [f"val shard of {sources[0]}"]
    else:
        names = [s or "unknown" for s in sources]
        pieces = [f"val shards: {names[0]}", *names[1:]]
    if len("; ".join(pieces)) <= 40:
        return f"Validation loss ({'; '.join(pieces)})"
    # Long sources (a Hub dataset and config, several runs) go below, wrapped between sources, so
    # the title fits the overview's one-column panel.
    lines = [""]
    for i, piece in enumerate(pieces):
        piece += ";" if i < len(pieces) - 1 else ""
        if lines[-1] and len(lines[-1]) + 1 + len(piece) > 56:
            lines.append(piece)
        else:
            lines[-1] = f"{lines[-1]} {piece}".strip()
    return "Validation loss\n(" + "\n".join(lines) + ")"


def tokens_per_step(run: Run) -> float | None:
    """Tokens per optimizer step, from the records (train: tokens after step i = (i+1) * tokens/step)."""
    for step, tokens in zip(reversed(run.train["step"]), reversed(run.train["tokens"])):
        if _is_number(tokens) and tokens > 0:
            return tokens / (step + 1)
    for step, tokens in zip(run.val["step"], run.val["tokens"]):
        if _is_number(tokens) and step > 0:
            return tokens / step
    for cfg in reversed(run.configs):
        value = _train_config(cfg).get("tokens_per_step")
        if _is_number(value) and value > 0:
            return float(value)
    return None


def _finite(values) -> list[float]:
    return [float(v) for v in values if _is_number(v) and math.isfinite(v)]


def _mean(values) -> float | None:
    values = _finite(values)
    return sum(values) / len(values) if values else None


def _best(values, counts) -> tuple[float | None, int | None]:
    """The best finite value and the example count of the row that gave it (None: not logged); on a
    tie, the row scored on the most examples."""
    rows = [
        (float(v), c if _is_number(c) else None) for v, c in zip(values, counts) if _is_number(v) and math.isfinite(v)
    ]
    if not rows:
        return None, None
    return max(rows, key=lambda vc: (vc[0], vc[1] or 0))


def _best_core(run: Run) -> tuple[float | None, int | None, bool, int | None]:
    """The run's best CORE (training loop and core.py on its own checkpoints), the max_per_task of the
    row that gave it (None: every example), whether it is CORE-PARTIAL, and the number of tasks it is a
    mean over (None: unknown, a partial row from before "tasks" was logged). A partial mean counts only
    where no row has the full CORE, and is then never called CORE. Partial means over fewer tasks are
    not comparable with those over more: the best is taken among the rows over the most tasks (a
    known count before an unknown one). On a tie, the full-set row wins."""
    res = run.core_results
    own = [i for i, c in enumerate(res["checkpoint"]) if c]  # not HF models' scores
    per_task = [*run.core["max_per_task"], *(res["max_per_task"][i] for i in own)]
    task_sets = [*run.core["task_set"], *(res["task_set"][i] for i in own)]
    for key, partial in (("core", False), ("core_partial", True)):
        values = [*run.core[key], *(res[key][i] for i in own)]
        rows = [
            (float(v), m if _is_number(m) and m > 0 else None, core_task_count(partial, tasks))
            for v, m, tasks in zip(values, per_task, task_sets)
            if _is_number(v) and math.isfinite(v)
        ]
        if rows:
            value, m, n_tasks = max(rows, key=lambda row: (row[2] or -1, row[0], row[1] is None))
            return value, m, partial, n_tasks
    return None, None, False, None


def core_task_count(partial: bool, task_set: frozenset[str] | None) -> int | None:
    """How many tasks a CORE score is a mean over: all of them for CORE (by definition), the record's
    task set for CORE-PARTIAL (None: not recorded)."""
    if not partial:
        return CORE_TASK_COUNT
    return len(task_set) if task_set is not None else None


def task_count_text(n_tasks: int | None) -> str:
    """ "18 of 22 tasks", or "task count unknown" (None)."""
    return "task count unknown" if n_tasks is None else f"{n_tasks} of {CORE_TASK_COUNT} tasks"


def core_name(partial: bool, task_set: frozenset[str] | None) -> str:
    """ "CORE", or "CORE-PARTIAL, 18 of 22 tasks" (never without the count: partial means over
    different task sets are different measures), or "CORE-PARTIAL, task count unknown"."""
    return f"CORE-PARTIAL, {task_count_text(core_task_count(True, task_set))}" if partial else "CORE"


def run_stats(run: Run, warmup_steps: int = PlotConfig.warmup_steps) -> dict:
    """The numbers behind one summary row (None where the log has nothing to say)."""
    train, val = run.train, run.val
    steady = [i for i, k in enumerate(train["since_restart"]) if k >= warmup_steps]
    val_pairs = [(s, v) for s, v in zip(val["step"], val["val_loss"]) if math.isfinite(v)]
    max_steps = next(
        (
            _train_config(c)["max_steps"]
            for c in reversed(run.configs)
            if isinstance(_train_config(c).get("max_steps"), int)
        ),
        None,
    )
    own = [i for i, c in enumerate(run.results["checkpoint"]) if c]  # this run's checkpoints, not e.g. HF gpt2
    wall = sum(last - first for first, last in run.restarts) if run.restarts else None
    # Each best HellaSwag score with the number of examples it was taken on (count of its own row).
    hs_train = _best(run.hellaswag["hellaswag_acc_norm"], run.hellaswag["count"])
    own_counts = [run.results["count"][i] for i in own]
    hs_ref = _best([run.results["acc_norm"][i] for i in own], own_counts)
    hs_harness = _best([run.results["harness_acc_norm"][i] for i in own], own_counts)
    core, core_per_task, core_partial, core_tasks = _best_core(run)
    bpb = _finite(val["val_bpb"])
    return {
        "run": run.name,
        "model": ", ".join(model_presets(run)) or None,
        "steps": train["step"][-1] + 1 if train["step"] else None,
        "max_steps": max_steps,
        "tokens": train["tokens"][-1] if train["tokens"] and _is_number(train["tokens"][-1]) else None,
        "final_val_loss": val_pairs[-1][1] if val_pairs else None,
        "best_val_loss": min(v for _, v in val_pairs) if val_pairs else None,
        "final_val_bpb": bpb[-1] if bpb else None,
        "hellaswag_train": hs_train[0],
        "hellaswag_train_count": hs_train[1],
        "hellaswag_ref": hs_ref[0],
        "hellaswag_ref_count": hs_ref[1],
        "hellaswag_harness": hs_harness[0],
        "hellaswag_harness_count": hs_harness[1],
        "core": core,
        "core_max_per_task": core_per_task,
        "core_partial": core_partial,
        "core_tasks": core_tasks,
        "tokens_per_sec": _mean(train["tokens_per_sec"][i] for i in steady),
        "mfu": _mean(train["mfu"][i] for i in steady),
        "wall_seconds": wall,
    }


def _fmt_count(x: float) -> str:
    """1234567890 -> '1.23B', 524288 -> '524K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _fmt_duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summarize(runs: list[Run], warmup_steps: int = PlotConfig.warmup_steps) -> str:
    """A markdown table, one row per run, and a note on how each column is computed."""
    dash = "–"

    def num(v, fmt):
        return dash if v is None else format(v, fmt)

    def score(s, key):  # "0.2970 (10,042 ex)": a 200-example score must not pass for a full-set one
        if s[key] is None:
            return dash
        count = s[f"{key}_count"]
        return f"{s[key]:.4f}" + ("" if count is None else f" ({count:,.0f} ex)")

    def core(s):  # "0.1234 (partial: 18 of 22 tasks, 500/task)": a partial or subset score must not pass for CORE
        notes = [f"partial: {task_count_text(s['core_tasks'])}"] if s["core_partial"] else []
        if s["core_max_per_task"]:
            notes.append(f"{s['core_max_per_task']:,}/task")
        return num(s["core"], ".4f") + (f" ({', '.join(notes)})" if notes else "")

    header = [
        "run",
        "model",
        "steps",
        "tokens",
        "final val loss",
        "best val loss",
        "final val bpb",
        "HellaSwag (training loop)",
        "HellaSwag (hellaswag.py)",
        "HellaSwag (harness style)",
        "CORE",
        "tokens/s",
        "MFU",
        "wall time",
    ]
    rows = []
    for run in runs:
        s = run_stats(run, warmup_steps)
        steps = dash if s["steps"] is None else f"{s['steps']:,}"
        if s["max_steps"] is not None and s["steps"] is not None:
            steps += f" / {s['max_steps']:,}"
        rows.append(
            [
                s["run"].replace("|", "\\|"),
                dash if s["model"] is None else s["model"].replace("|", "\\|"),
                steps,
                dash if s["tokens"] is None else _fmt_count(s["tokens"]),
                num(s["final_val_loss"], ".4f"),
                num(s["best_val_loss"], ".4f"),
                num(s["final_val_bpb"], ".4f"),
                score(s, "hellaswag_train"),
                score(s, "hellaswag_ref"),
                score(s, "hellaswag_harness"),
                core(s),
                dash if s["tokens_per_sec"] is None else f"{s['tokens_per_sec']:,.0f}",
                dash if s["mfu"] is None else f"{100 * s['mfu']:.1f}%",
                dash if s["wall_seconds"] is None else _fmt_duration(s["wall_seconds"]),
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if val_baseline_applies(runs):
        val_note = f"Val loss baseline: OpenAI GPT-2 124M {GPT2_VAL_LOSS[0]} on the FineWeb-Edu val shard. "
    else:
        sources = "; ".join(dict.fromkeys(s or "unknown" for run in runs for s in data_sources(run)))
        val_note = (
            f"Val losses are on the val shards of {sources}: not comparable with OpenAI GPT-2 124M's "
            f"{GPT2_VAL_LOSS[0]}, measured on the FineWeb-Edu val shard. "
        )
    note = (
        "HellaSwag columns: best acc_norm on the val set, with the number of examples it was scored on "
        f"({HELLASWAG_VAL_SIZE:,} ex = the full val set; fewer = a demo or --limit run: a noisier estimate, "
        "not directly comparable with the full-set baselines). Training loop and hellaswag.py use the same "
        f"completion-style scoring (OpenAI GPT-2 124M: {GPT2_HELLASWAG[0]}, GPT-3 124M: {GPT3_HELLASWAG[0]}); "
        f"harness style is lm-evaluation-harness's multiple-choice scoring (GPT-2 124M: {GPT2_HELLASWAG_HARNESS[0]}). "
        + val_note
        + core_note()
        + f"tokens/s and MFU: means over train steps, skipping the first {warmup_steps} after each (re)start; "
        "wall time (h:mm:ss): sum over (re)starts of first-to-last record time."
    )
    lines += ["", note]
    lines += ["\n" + elsewhere_note(run) for run in runs if run.elsewhere]
    return "\n".join(lines) + "\n"


def core_note() -> str:
    refs = ", ".join(f"{label.removeprefix('GPT-2 ')} {value}" for value, label in GPT2_CORE)
    return (
        "model: the preset in the run's config records. "
        "val bpb: bits per byte of the last val loss (older logs: –). CORE: best DCLM CORE (22 tasks, "
        "centered accuracy) of the training loop and core.py on this run's checkpoints; N/task = the first N "
        "examples of each task, a noisier estimate; partial: N of 22 tasks = CORE-PARTIAL, a mean over those "
        "N tasks only (the others missing or not asked for), not CORE and not comparable with a mean over other "
        "tasks (the best of the scores over the most tasks; task count unknown: a log from before tasks were "
        "recorded). "
        f"OpenAI GPT-2 CORE ({CORE_SOURCE}): {refs}. "
    )


def elsewhere_note(run: Run) -> str:
    """What was left out of a run's row: scores filed in its folder for checkpoints of other runs."""
    parts, folders = [], {}
    for file, (_, writer, _) in RESULT_FILES.items():
        checkpoints = list(dict.fromkeys(r["checkpoint"] for r in run.elsewhere if r["results_file"] == file))
        if checkpoints:
            shown = ", ".join(checkpoints[:3]) + (f" and {len(checkpoints) - 3} more" if len(checkpoints) > 3 else "")
            parts.append(f"{run.log_dir / file} also holds {writer} scores of checkpoints in other folders ({shown})")
            folders.update(dict.fromkeys(str(Path(c).parent) for c in checkpoints))
    return (
        f"Not in {run.name}'s row: {'; '.join(parts)}; add --log-dir {' '.join(folders)} to show each in its "
        "own run's row."
    )


# ---------------------------------------------------------------- drawing


def _xy(series: dict[str, list], key: str, scale: float = 1.0) -> tuple[list, list]:
    pairs = [(s, v * scale) for s, v in zip(series["step"], series[key]) if v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _label(text: str, run: Run, runs: list[Run]) -> str:
    return f"{run.name}: {text}" if len(runs) > 1 else text


def _no_data(ax, what: str) -> None:
    ax.text(
        0.5,
        0.62,
        f"no data: {what}",
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="0.35",
        gid="no-data",
        bbox={"facecolor": "white", "edgecolor": "0.8", "boxstyle": "round"},
    )


def _baseline(ax, value_label: tuple[float, str], style: str, color: str) -> None:
    value, label = value_label
    ax.axhline(
        value, linestyle=style, color=color, linewidth=1.3, label=f"{label} ({value:g})", gid=f"baseline/{label}"
    )


def _focus_ylim(ax, curves: list[tuple[list, list]], keep: tuple[float, ...] = (), skip: float = 0.05) -> None:
    """Zoom y onto everything after the first `skip` of each curve's steps (plus `keep` values):
    the first steps' loss (~11 at init) would otherwise squash the part of the curve worth reading."""
    tail = []
    for xs, ys in curves:
        if xs:
            cut = xs[0] + skip * (xs[-1] - xs[0])
            tail += [y for x, y in zip(xs, ys) if x >= cut and math.isfinite(y)]
    if len(tail) < 2:
        return
    lo, hi = min(tail + list(keep)), max(tail + list(keep))
    pad = 0.06 * (hi - lo) or 0.05 * abs(hi) or 0.1
    ax.set_ylim(lo - pad, hi + pad)


def _draw_training_loss(ax, runs: list[Run], smoothing: float) -> None:
    curves = []
    for i, run in enumerate(runs):
        x, y = _xy(run.train, "train_loss")
        if not x:
            continue
        color = f"C{i % 10}"
        weight = ema_weight(smoothing, len(y))
        if weight > 0:  # faint raw curve under the smoothed one, which carries the run's legend entry
            ax.plot(
                x,
                y,
                color=color,
                alpha=0.3,
                linewidth=0.8,
                gid=f"{run.name}/train_loss",
                label=_label("train loss (raw)", run, runs) if len(runs) == 1 else "_raw",
            )
            ax.plot(
                x,
                ema(y, weight),
                color=color,
                linewidth=1.8,
                gid=f"{run.name}/train_loss_ema",
                label=_label(f"train loss (EMA {weight:.3g})", run, runs),
            )
        else:  # too few steps to smooth (or --smoothing 0): the raw curve is the run's curve, drawn full
            unsmoothed = f", {len(y)} steps: not smoothed" if smoothing > 0 else ""
            ax.plot(
                x,
                y,
                color=color,
                linewidth=1.4,
                marker="o" if len(y) <= 20 else None,
                markersize=3,
                gid=f"{run.name}/train_loss",
                label=_label(f"train loss (raw{unsmoothed})", run, runs),
            )
        curves.append((x, y))
    if not curves:
        _no_data(ax, "no train records yet")
    _focus_ylim(ax, curves)
    ax.set_title("Training loss")
    ax.set_ylabel("cross-entropy loss (nats/token)")


def _draw_validation_loss(ax, runs: list[Run], smoothing: float) -> None:
    curves = []
    for i, run in enumerate(runs):
        x, y = _xy(run.val, "val_loss")
        if x:
            ax.plot(
                x,
                y,
                color=f"C{i % 10}",
                marker="o",
                markersize=3,
                linewidth=1.6,
                gid=f"{run.name}/val_loss",
                label=_label("val loss", run, runs),
            )
            curves.append((x, y))
    baseline = val_baseline_applies(runs)
    if baseline:
        _baseline(ax, GPT2_VAL_LOSS, "--", "0.35")
    if not curves:
        _no_data(ax, "no val records yet")
    _focus_ylim(ax, curves, keep=(GPT2_VAL_LOSS[0],) if baseline else ())
    ax.set_title(val_title(runs))
    ax.set_ylabel("cross-entropy loss (nats/token)")


def _draw_learning_rate(ax, runs: list[Run], smoothing: float) -> None:
    drawn = False
    for i, run in enumerate(runs):
        x, y = _xy(run.train, "lr")
        if x:
            ax.plot(
                x, y, color=f"C{i % 10}", linewidth=1.6, gid=f"{run.name}/lr", label=_label("learning rate", run, runs)
            )
            drawn = True
    if not drawn:
        _no_data(ax, "no train records yet")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")


def _draw_throughput(ax, runs: list[Run], smoothing: float) -> None:
    handles, drawn = [], False
    mfu_ax = None
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x, y = _xy(run.train, "tokens_per_sec")
        if x:
            handles += ax.plot(
                x, y, color=color, linewidth=1.2, gid=f"{run.name}/tokens_per_sec", label=_label("tokens/s", run, runs)
            )
            drawn = True
        mx, my = _xy(run.train, "mfu", scale=100.0)
        if mx:
            if mfu_ax is None:
                mfu_ax = ax.twinx()
                mfu_ax.set_ylabel("MFU (%)")
            handles += mfu_ax.plot(
                mx,
                my,
                color=color,
                linewidth=1.0,
                linestyle=":",
                alpha=0.9,
                gid=f"{run.name}/mfu",
                label=_label("MFU (%)", run, runs),
            )
    if not drawn:
        _no_data(ax, "no train records yet")
    ax.set_ylim(bottom=0)
    if mfu_ax is not None:
        mfu_ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v)))
    ax.set_title("Throughput (left) and MFU (right)" if mfu_ax is not None else "Throughput (MFU not logged)")
    ax.set_ylabel("tokens/s")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)


def _draw_hellaswag(ax, runs: list[Run], smoothing: float) -> None:
    drawn, harness, levels = False, False, {}
    several = len(runs) > 1
    marks = {
        "acc_norm": {"marker": "s", "markerfacecolor": "none", "markeredgewidth": 1.5},
        "harness_acc_norm": {"marker": "^"},
    }
    what = {"acc_norm": "acc_norm, hellaswag.py", "harness_acc_norm": "harness acc_norm, hellaswag.py"}
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        named = False  # with several runs, the legend names each run once and explains markers once
        x, y = _xy(run.hellaswag, "hellaswag_acc_norm")
        if x:
            ax.plot(
                x,
                y,
                color=color,
                marker="o",
                markersize=3,
                linewidth=1.6,
                gid=f"{run.name}/hellaswag_acc_norm",
                label=run.name if several else "acc_norm, training loop",
            )
            drawn = named = True
        res = run.results
        for key in ("acc_norm", "harness_acc_norm"):
            pairs = [(s, v) for s, v in zip(res["step"], res[key]) if s is not None and v is not None]
            if not pairs:
                continue
            label = what[key] if not several else ("_" if named else run.name)
            ax.plot(
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                color=color,
                markersize=7,
                linestyle="none",
                gid=f"{run.name}/results_{key}",
                label=label,
                **marks[key],
            )
            drawn = named = True
            harness |= key == "harness_acc_norm"
        # Evaluations with no step (e.g. `hellaswag.py --model gpt2`) have no x: drawn once as levels.
        for label, value, step in zip(res["label"], res["acc_norm"], res["step"]):
            if step is None:
                levels[(label, value)] = True
    for j, (label, value) in enumerate(levels):
        ax.axhline(
            value,
            color="tab:purple",
            linestyle=(j, (1, 2)),
            linewidth=1.4,
            gid=f"results/{label}",
            label=f"{label}, hellaswag.py ({value:.4f})",
        )
        drawn = True
    if several:  # marker meaning, once, in a neutral colour
        for key in ("acc_norm", "harness_acc_norm"):
            pairs = (sv for run in runs for sv in zip(run.results["step"], run.results[key]))
            if any(s is not None and v is not None for s, v in pairs):
                ax.plot([], [], color="0.3", linestyle="none", markersize=7, label=what[key], **marks[key])
    _baseline(ax, GPT3_HELLASWAG, "--", "tab:red")
    if harness:
        _baseline(ax, GPT2_HELLASWAG_HARNESS, "-.", "0.55")
    _baseline(ax, GPT2_HELLASWAG, "--", "0.35")
    _baseline(ax, RANDOM_HELLASWAG, ":", "0.6")
    if not drawn:
        _no_data(ax, "no HellaSwag evaluations yet")
    # Room below the random line for the legend (up to eight entries), so it hides no curve.
    values = _finite(
        v
        for run in runs
        for v in (*run.hellaswag["hellaswag_acc_norm"], *run.results["acc_norm"], *run.results["harness_acc_norm"])
    )
    lo, hi = min(values + [RANDOM_HELLASWAG[0]]), max(values + [GPT3_HELLASWAG[0]])
    ax.set_ylim(lo - 0.4 * (hi - lo), hi + 0.08 * (hi - lo))
    ax.legend(loc="lower right", ncol=2, fontsize=7)
    counts = {c for run in runs for c in (*run.hellaswag["count"], *run.results["count"]) if c is not None}
    ax.set_title("HellaSwag accuracy" + (f" ({counts.pop():,} val examples)" if len(counts) == 1 else ""))
    ax.set_ylabel("acc_norm (length-normalized)")


def _per_task(max_per_task) -> str:
    """ " (500/task)" when points were scored on the first N examples of each task; "" when all were
    scored on every example. Mixed: each size, "all" for the full ones."""
    sizes = [int(m) if _is_number(m) and m > 0 else None for m in max_per_task]
    subsets, full = sorted({m for m in sizes if m}), None in sizes
    return f" ({', '.join([f'{m:,}/task' for m in subsets] + ['all'] * full)})" if subsets else ""


# How each source draws its scores: the training loop's as a curve, core.py's checkpoint scores as points.
# CORE (every score over the same 22 tasks) may be joined by a line; CORE-PARTIAL gets one series per
# task set, dotted, with a marker per task set (PARTIAL_MARKERS), and unknown task sets stay unjoined.
CORE_STYLE = {
    "training loop": {"linestyle": "-", "marker": "o", "linewidth": 1.6, "markersize": 4},
    "core.py": {"linestyle": "none", "marker": "s", "markerfacecolor": "none", "markeredgewidth": 1.5, "markersize": 7},
}
PARTIAL_STYLE = {
    "training loop": {"linestyle": ":", "linewidth": 1.0, "markersize": 5},
    "core.py": {"linestyle": "none", "markeredgewidth": 1.5, "markersize": 7},
}
PARTIAL_MARKERS = ("x", "+", "d", "v", "^", "<", ">")
CORE_TITLE = f"CORE (DCLM, {CORE_TASK_COUNT} tasks)"
# Shown whenever a partial score is drawn: the panel then holds means over different task sets.
CORE_AND_PARTIAL_TITLE = (
    f"CORE (DCLM, {CORE_TASK_COUNT} tasks) and CORE-PARTIAL\n(fewer tasks, not CORE: task counts in the legend)"
)


@dataclass(frozen=True)
class TaskSetName:
    """How one CORE-PARTIAL task set is named in the panel: legend text, gid suffix, marker."""

    n_tasks: int | None  # None: a record without "tasks", its task set unknown
    text: str  # "CORE-PARTIAL, 18 of 22 tasks", with " (task set 2)" when another set has as many tasks
    gid: str  # "18of22", "18of22-2", "unknown"
    marker: str


def _partial_task_sets(runs: list[Run]) -> dict[frozenset[str] | None, TaskSetName]:
    """A name for every task set a drawn CORE-PARTIAL score is over, shared by all runs in the panel,
    most tasks first; sets of the same size are told apart by a number, as their means still differ."""
    sets = {
        task_set
        for run in runs
        for series in (run.core, run.core_results)
        for task_set, value in zip(series["task_set"], series["core_partial"])
        if _is_number(value)
    }
    ordered = sorted(sets, key=lambda t: (t is None, -len(t or ()), sorted(t or ())))
    by_size: dict[int | None, list] = {}
    for task_set in ordered:
        by_size.setdefault(core_task_count(True, task_set), []).append(task_set)
    names = {}
    for i, task_set in enumerate(ordered):
        n_tasks = core_task_count(True, task_set)
        text, gid = core_name(True, task_set), "unknown" if n_tasks is None else f"{n_tasks}of{CORE_TASK_COUNT}"
        if n_tasks is not None and len(by_size[n_tasks]) > 1:
            number = by_size[n_tasks].index(task_set) + 1
            text, gid = f"{text} (task set {number})", f"{gid}-{number}"
        names[task_set] = TaskSetName(n_tasks, text, gid, PARTIAL_MARKERS[i % len(PARTIAL_MARKERS)])
    return names


def _draw_core_run(
    ax, run: Run, runs: list[Run], color: str, partial_names: dict[frozenset[str] | None, TaskSetName]
) -> tuple[list[float], bool]:
    """One run's CORE: the training loop's evaluations as a curve, core.py's checkpoint scores as points,
    each CORE-PARTIAL task set apart; returns the values drawn and whether any was partial."""
    drawn, any_partial = [], False
    for series, prefix, where in ((run.core, "", "training loop"), (run.core_results, "results_", "core.py")):
        full = [
            (s, v, m)
            for s, v, m in zip(series["step"], series["core"], series["max_per_task"])
            if s is not None and _is_number(v)
        ]
        # gid suffix -> (task set name, None for CORE; its (step, value, max_per_task) rows)
        groups: dict[str, tuple[TaskSetName | None, list[tuple]]] = {"core": (None, full)} if full else {}
        partial = zip(series["step"], series["core_partial"], series["max_per_task"], series["task_set"])
        for s, v, m, task_set in partial:
            if s is not None and _is_number(v):
                name = partial_names[task_set]
                groups.setdefault(f"core_partial/{name.gid}", (name, []))[1].append((s, v, m))
        for key, (name, rows) in groups.items():
            if name is None:
                text, style = "CORE", CORE_STYLE[where]
            else:
                text, style = name.text, {**PARTIAL_STYLE[where], "marker": name.marker}
                if name.n_tasks is None:  # the points may be over different tasks: not a curve
                    style["linestyle"] = "none"
                any_partial = True
            ax.plot(
                [r[0] for r in rows],
                [r[1] for r in rows],
                color=color,
                gid=f"{run.name}/{prefix}{key}",
                label=_label(f"{text}, {where}{_per_task(r[2] for r in rows)}", run, runs),
                **style,
            )
            drawn += [r[1] for r in rows]
    return drawn, any_partial


def _draw_core(ax, runs: list[Run], smoothing: float) -> None:
    drawn, any_partial, levels = [], False, {}
    partial_names = _partial_task_sets(runs)
    for i, run in enumerate(runs):
        values, partial = _draw_core_run(ax, run, runs, f"C{i % 10}", partial_names)
        drawn += values
        any_partial |= partial
        # Scores with no step (core.py --hf gpt2) have no x: drawn once as levels, CORE-PARTIAL ones in
        # another colour and each named with its task count.
        res = run.core_results
        for label, step, core, partial_value, m, task_set in zip(
            res["label"], res["step"], res["core"], res["core_partial"], res["max_per_task"], res["task_set"]
        ):
            if step is None and _is_number(core):
                levels[(label, "CORE", core, _per_task([m]))] = "tab:purple"
            elif step is None and _is_number(partial_value):
                levels[(label, partial_names[task_set].text, partial_value, _per_task([m]))] = "tab:brown"
                any_partial = True
    for j, ((label, name, value, per_task), color) in enumerate(levels.items()):
        ax.axhline(
            value,
            color=color,
            linestyle=(j, (1, 2)),
            linewidth=1.4,
            gid=f"core_results/{label}",
            label=f"{label}, core.py {name}{per_task} ({value:.4f})",
        )
        drawn.append(value)
    shades = ("0.25", "0.4", "0.55", "0.7")
    for (value, label), shade in zip(GPT2_CORE, shades):
        ax.axhline(
            value,
            linestyle="--",
            color=shade,
            linewidth=1.2,
            gid=f"baseline/{label}",
            label=f"{label} {value:g} ({CORE_SOURCE})",
        )
    if not drawn:
        _no_data(ax, "no CORE evaluations yet")
    # Room above the largest reference for the legend, so it hides no curve.
    lo, hi = min(drawn + [0.0]), max(drawn + [GPT2_CORE[-1][0]])
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.6 * (hi - lo))
    ax.legend(loc="upper left", fontsize=7)
    # "22 tasks" only when it is true of every score drawn (the GPT-2 references are CORE).
    ax.set_title(CORE_AND_PARTIAL_TITLE if any_partial else CORE_TITLE)
    ax.set_ylabel("CORE (centered accuracy, mean)")


DRAW = {
    "training_loss": _draw_training_loss,
    "validation_loss": _draw_validation_loss,
    "learning_rate": _draw_learning_rate,
    "throughput": _draw_throughput,
    "hellaswag_accuracy": _draw_hellaswag,
    "core": _draw_core,
}
OWN_LEGEND = ("throughput", "hellaswag_accuracy", "core")  # panels that place their own legend


def _finish_axes(ax, tps: float | None, legend: bool, last_step: int) -> None:
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, max(1.0, 1.02 * last_step))  # every panel spans the same steps, so they line up
    if tps:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tps, lambda t: t / tps))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v) if v else "0"))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _shared_tokens_per_step(runs: list[Run]) -> float | None:
    """The tokens axis only makes sense when every run with a known batch uses the same one."""
    known = [t for t in (tokens_per_step(r) for r in runs) if t]
    if known and max(known) - min(known) <= 1e-6 * max(known):
        return known[0]
    return None


def build_figures(runs: list[Run], smoothing: float = PlotConfig.smoothing) -> dict[str, Figure]:
    """One Figure per panel plus "overview" (all panels), each with an Agg canvas, not yet saved."""
    tps = _shared_tokens_per_step(runs)
    every = [series for r in runs for series in (r.train, r.val, r.hellaswag, r.results, r.core, r.core_results)]
    last_step = max((s for series in every for s in series["step"] if s is not None), default=0)
    title = ", ".join(r.name for r in runs)
    figures = {}
    for name in PANELS:
        fig = Figure(figsize=(9, 5.5), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        DRAW[name](ax, runs, smoothing)
        _finish_axes(ax, tps, legend=name not in OWN_LEGEND, last_step=last_step)
        fig.suptitle(title, fontsize=9, color="0.4", x=0.99, ha="right")
        figures[name] = fig

    fig = Figure(figsize=(24, 10), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4)
    # Training loss gets two columns: it is the curve people read first; throughput, over the same
    # steps, the two below it.
    slots = {
        "training_loss": grid[0, :2],
        "validation_loss": grid[0, 2],
        "learning_rate": grid[0, 3],
        "throughput": grid[1, :2],
        "hellaswag_accuracy": grid[1, 2],
        "core": grid[1, 3],
    }
    for name, slot in slots.items():
        ax = fig.add_subplot(slot)
        DRAW[name](ax, runs, smoothing)
        _finish_axes(ax, tps, legend=name not in OWN_LEGEND, last_step=last_step)
    fig.suptitle(f"GPT-2 training: {title}", fontsize=14)
    figures["overview"] = fig
    return figures


# ---------------------------------------------------------------- writing


def make_figures(
    runs: list[Run], out_dir: str | os.PathLike, smoothing: float = PlotConfig.smoothing
) -> dict[str, Path]:
    """Draw and save every figure as out_dir/<name>.png; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in build_figures(runs, smoothing).items():
        path = out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        paths[name] = path
    return paths


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- CLI


def parse_config(argv: list[str] | None = None) -> PlotConfig:
    """The flags given, over PlotConfig's defaults; a value PlotConfig refuses raises UserError."""
    return cli.parse_config(PlotConfig, argv, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    runs = load_runs(cfg.log_dirs)
    for run in runs:
        if run.skipped:
            more = f"; ... {len(run.skipped) - 5} more" if len(run.skipped) > 5 else ""
            print(
                f"plot.py: warning: skipped {len(run.skipped)} bad line(s) in {run.log_dir}: "
                f"{'; '.join(run.skipped[:5])}{more}",
                file=sys.stderr,
            )
        if run.elsewhere:
            print(f"plot.py: warning: {elsewhere_note(run)}", file=sys.stderr)
    out_dir = Path(cfg.out_dir or cfg.log_dirs[0])
    try:
        paths = make_figures(runs, out_dir, cfg.smoothing)
    except OSError as e:
        raise UserError(f"cannot write figures to {out_dir}: {e.strerror}: pass a writable --out-dir") from None
    print(f"wrote {', '.join(p.name for p in paths.values())} to {out_dir}")
    if cfg.summary:
        table = summarize(runs, cfg.warmup_steps)
        write_text(out_dir / "summary.md", table)
        print(table, end="")
        print(f"wrote {out_dir / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
