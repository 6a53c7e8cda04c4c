"""The run's metrics log, `<log dir>/metrics.jsonl`, and its optional TensorBoard / W&B mirrors.

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
