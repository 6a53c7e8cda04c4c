"""The run's metrics log, `<log dir>/metrics.jsonl`, its optional TensorBoard / W&B mirrors, and the
training clock and step line the console shows (StepClock, format_step_line).

One JSON object per line, appended and flushed as it happens (`tail -f` and plot.py read it mid-run).
It is the source of truth; the mirrors get the same records. Only the main rank writes.

Resume without repeats, whatever the record types: a checkpoint stores how many bytes the log held
when it was saved (`state_dict()`); a resumed run cuts the log back to that length
(`start(resume_state)`), dropping exactly what the killed run logged after its checkpoint (train
steps, evals, samples, any type added later, a torn last line) and nothing before it.

    uv run python -c "import metrics; m = metrics.MetricsLog('/tmp/m.jsonl', True); m.start(None); \\
        m.write({'type': 'x', 'step': 0})"
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import fileio
from cli import UserError

FILE_NAME = "metrics.jsonl"


class MetricsLog:
    """`path` on the main rank (`enabled`); a no-op elsewhere. A checkpoint part: `state_dict` is the
    log's length, `load_state_dict` the length a resumed run's `start` cuts it back to."""

    def __init__(self, path: str | Path, enabled: bool, mirrors: list | None = None):
        self.path, self.enabled, self.mirrors = Path(path), enabled, mirrors or []
        self.resume_state: dict | None = None  # set by load_state_dict: this run continues a checkpoint

    def load_state_dict(self, state: dict) -> None:
        self.resume_state = state

    def start(self, resume_state: dict | None = None, mirrors: list | None = None) -> None:
        """A fresh run empties the log. A resumed one cuts it to the length its checkpoint saw
        (`resume_state`, or the one load_state_dict took). `mirrors`: TensorBoard / W&B from now on."""
        self.mirrors = mirrors if mirrors is not None else self.mirrors
        resume_state = resume_state if resume_state is not None else self.resume_state
        if not self.enabled:
            return
        if resume_state is None or not self.path.exists():
            fileio.atomic_write_bytes(self.path, b"")
            return
        length, size = resume_state["bytes"], self.path.stat().st_size
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

    def run(self) -> None:
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


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_step_line(
    step: int,
    max_steps: int,
    loss: float,
    lr: float,
    grad_norm: float,
    step_ms: float,
    tokens_per_sec: float,
    mfu: float | None,
    elapsed: float,
    eta: float,
) -> str:
    mfu_text = f"{100 * mfu:4.1f}%" if mfu is not None else "  n/a"
    return (
        f"step {step:6d}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:6.3f} | "
        f"{step_ms:7.0f} ms | {tokens_per_sec:11,.0f} tok/s | mfu {mfu_text} | {hms(elapsed)} | eta {hms(eta)}"
    )
