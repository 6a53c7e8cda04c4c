"""The run's metrics log, `<log dir>/metrics.jsonl`, its optional TensorBoard / W&B mirrors, the records
and the console lines made of them (train_record, line), and the training clock (StepClock).

One JSON object per line, appended and flushed as it happens (`tail -f` and plot.py read it mid-run).
It is the source of truth; the mirrors get the same records. Only the main rank writes.

Resume without repeats, whatever the record types: a checkpoint stores how many bytes the log held
when it was saved (`state_dict()`); a resumed run cuts the log back to that length
(`load_state_dict`), dropping exactly what the killed run logged after its checkpoint (train
steps, evals, samples, any type added later, a torn last line) and nothing before it.

    uv run python -c "import metrics; m = metrics.MetricsLog('/tmp/m.jsonl', True); m.clear(); \\
        m.write({'type': 'x', 'step': 0})"
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import fileio
from cli import UserError

FILE_NAME = "metrics.jsonl"
# What the records of metrics.jsonl hold, by version: each (re)start's first record, its "config"
# record, says it. Bump it when a record type or field changes meaning; readers (plot.py) read the
# versions they know and refuse others in one line.
FORMAT_VERSION = 1


class MetricsLog:
    """`path` on the main rank (`enabled`); a no-op elsewhere. A checkpoint part: `state_dict` is the
    log's length, `load_state_dict` cuts the log back to it (a resumed run); `clear` empties it (a
    fresh one). `mirrors`: TensorBoard / W&B, given every record too."""

    def __init__(self, path: str | Path, enabled: bool, mirrors: list | None = None):
        self.path, self.enabled, self.mirrors = Path(path), enabled, mirrors or []

    def clear(self) -> None:
        """A fresh run's log: empty."""
        if self.enabled:
            fileio.atomic_write_bytes(self.path, b"")

    def load_state_dict(self, state: dict) -> None:
        """Cut the log back to the length a checkpoint saw: what the killed run logged after it goes."""
        if not self.enabled or not self.path.exists():
            return
        length, size = state["bytes"], self.path.stat().st_size
        if length > size:
            # a log shortened by hand: keep it all (plot.py keeps the last record of each
            # (type, step), so a repeat draws once)
            warnings.warn(
                f"{self.path} does not match the checkpoint's record of it: appending to it as it is", stacklevel=2
            )
            return
        with open(self.path, "rb") as f:
            kept = f.read(length)
        fileio.atomic_write_bytes(self.path, kept)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the log: its length now (main rank; 0 elsewhere)."""
        return {"bytes": self.path.stat().st_size if self.enabled and self.path.exists() else 0}

    def write(self, record: dict) -> None:
        if self.enabled:
            record = {**record, "time": time.time()}
            fileio.append_jsonl(self.path, record)
            for mirror in self.mirrors:
                mirror.write(record)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()


def _numbers(record: dict) -> dict:
    return {
        k: v
        for k, v in record.items()
        if k not in ("type", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardMirror:
    """Every numeric field of every record as a TensorBoard scalar `<type>/<field>` at its step."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: run `uv sync --extra loggers`") from None
        self.writer = SummaryWriter(str(log_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        import json

        kind, step = record["type"], record["step"]
        if kind == "config":
            self.writer.add_text("config", f"```\n{json.dumps(record, indent=1)}\n```", step)
        elif kind == "sample":
            self.writer.add_text("samples", "\n\n".join(record["samples"]), step)
        for key, value in _numbers(record).items():
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
            raise UserError("--wandb needs the wandb package: run `uv sync --extra loggers`") from None
        id_file = log_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        fileio.atomic_write_bytes(id_file, run_id.encode())
        self.wandb = wandb
        self.run = wandb.init(
            project=project, id=run_id, resume="allow", dir=str(log_dir), config=config, name=log_dir.resolve().name
        )
        self.run.define_metric("*", step_metric="step")  # our step, not wandb's own counter

    def write(self, record: dict) -> None:
        kind = record["type"]
        if kind == "sample":
            data = {"sample/text": self.wandb.Html("<br>".join(record["samples"]))}
        else:
            data = {f"{kind}/{k}": v for k, v in _numbers(record).items()}
        if data:
            self.run.log({"step": record["step"], **data})

    def close(self) -> None:
        self.run.finish()


def mirrors(
    log_dir: Path,
    enabled: bool,
    tensorboard: bool = False,
    wandb_project: str | None = None,
    config: dict | None = None,
) -> list:
    """The TensorBoard / W&B mirrors asked for (main rank only)."""
    out = []
    if enabled and tensorboard:
        out.append(TensorBoardMirror(log_dir))
    if enabled and wandb_project:
        out.append(WandbMirror(log_dir, wandb_project, config or {}))
    return out


class StepClock:
    """Training time only: paused (after a device sync) around evaluations and checkpoints, so the
    step time, tokens/s and the ETA measure training alone. Elapsed time is the wall clock."""

    def __init__(self, sync: Callable[[], None] | None = None):
        # sync: waits for the device's queued work (runtime.device_sync), so a pause counts it
        self.sync, self.started = sync, time.perf_counter()
        self.window_seconds, self.window_steps = 0.0, 0  # since the last logged step
        self.total_seconds, self.total_steps = 0.0, 0  # since this process started training
        self._since: float | None = None

    def start(self) -> None:
        """Count time from now (again, after a pause); counting already: nothing changes."""
        if self._since is None:
            self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            if self.sync is not None:
                self.sync()
            seconds = time.perf_counter() - self._since
            self.window_seconds += seconds
            self.total_seconds += seconds
            self._since = None

    def step_done(self) -> None:
        self.window_steps += 1
        self.total_steps += 1

    def lap(self) -> tuple[float, int]:
        """(training seconds, steps) since the last lap."""
        lap = (self.window_seconds, self.window_steps)
        self.window_seconds, self.window_steps = 0.0, 0
        return lap

    def eta(self, steps_left: int) -> float:
        return steps_left * self.total_seconds / max(self.total_steps, 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class SlowStepNotice:
    """A line every so often while a step runs long (the first one: compiling, a big model on a slow
    device), `status()` saying what it is doing, instead of minutes of silence. A context manager."""

    FIRST_AFTER, EVERY = 30.0, 60.0  # seconds

    def __init__(self, step: int, status: Callable[[], str], enabled: bool = True):
        self.step, self.status, self.enabled = step, status, enabled
        self.done = threading.Event()

    def __enter__(self):
        if self.enabled:
            threading.Thread(target=self._report, name="slow-step", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def _report(self) -> None:
        started, wait = time.perf_counter(), self.FIRST_AFTER
        while not self.done.wait(wait):
            running = hms(time.perf_counter() - started)
            print(f"step {self.step:6d} | still running after {running}: {self.status()}", flush=True)
            wait = self.EVERY


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float | None, world_size: int = 1):
    """Model FLOPs utilisation as a fraction: achieved training FLOP/s over the devices' peak.
    None when the peak is unknown; clamped to 1.0, since more than the peak means a wrong entry."""
    if not peak_per_device or tokens_per_sec <= 0:
        return None
    return min(1.0, flops_per_token * tokens_per_sec / (peak_per_device * world_size))


def train_record(
    step: int,
    loss: float,
    lr: float,
    grad_norm: float,
    lap: tuple[float, int],
    tokens_per_step: int,
    flops_per_token: int,
    peak_flops: float | None,
) -> dict:
    """The record of a logged training step: its loss (mean over ranks), lr, gradient norm (before
    clipping) and the speed over `lap` (training seconds, steps) since the last logged step, with its
    MFU against `peak_flops` (all the run's devices together; None where unknown)."""
    seconds, steps = lap
    tokens_per_sec = steps * tokens_per_step / max(seconds, 1e-9)
    return {
        "type": "train",
        "step": step,
        "tokens": (step + 1) * tokens_per_step,
        "train_loss": loss,
        "lr": lr,
        "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # an fp16 overflow: no norm (JSON has no inf)
        "step_ms": 1000 * seconds / max(steps, 1),
        "tokens_per_sec": tokens_per_sec,
        "mfu": mfu(flops_per_token, tokens_per_sec, peak_flops),
    }


def line(record: dict, max_steps: int = 0, clock: StepClock | None = None) -> str:
    """The console line of a metrics record, for a human (stdout): one fixed-width line a step,
    `clock` giving a train line its elapsed time and ETA to `max_steps`."""
    kind, step = record["type"], record["step"]
    if kind == "train":
        mfu_text = f"{100 * record['mfu']:4.1f}%" if record["mfu"] is not None else "  n/a"
        norm_text = f"{record['grad_norm']:6.3f}" if record["grad_norm"] is not None else "   inf"
        elapsed, eta = (clock.elapsed(), clock.eta(max_steps - step - 1)) if clock else (0.0, 0.0)
        return (
            f"step {step:6d}/{max_steps} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
            f"norm {norm_text} | {record['step_ms']:7.0f} ms | {record['tokens_per_sec']:11,.0f} "
            f"tok/s | mfu {mfu_text} | {hms(elapsed)} | eta {hms(eta)}"
            + (" | update skipped" if record.get("skipped") else "")
        )
    if kind == "val":
        return f"step {step:6d} | val loss {record['val_loss']:.4f} | bpb {record['val_bpb']:.4f}"
    if kind == "hellaswag":
        return (
            f"step {step:6d} | hellaswag acc {record['hellaswag_acc']:.4f} acc_norm "
            f"{record['hellaswag_acc_norm']:.4f} ({record['count']} examples)"
        )
    if kind == "core":
        name, score = (
            ("core", record["core"]) if record["core"] is not None else ("core-partial", record["core_partial"])
        )
        per_task = record["max_per_task"] or "all"
        return f"step {step:6d} | {name} {score:.4f} ({record['count']:,} examples, {per_task} per task)"
    if kind == "sample":
        return "\n".join(f"sample: {text!r}" for text in record["samples"])
    if kind == "skip":
        return f"step {step:6d} | update skipped: {record['reason']}"
    return f"step {step:6d} | {kind}"
