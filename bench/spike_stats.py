"""How often would the spike guard fire on these runs? Replays train records through SpikeGuard.

Reads the per-step train records (loss, grad norm) of finished runs (`--log-every 1`), feeds them
to the guard's statistics as the trainer would, and prints, per run, the largest outlier score seen
for each series and the number of updates each threshold would have skipped. A threshold that fires
on a clean run is too low: this is how --spike-guard's default was chosen (docs/reliability.md, "A loss spike").

    uv run bench/spike_stats.py --metrics log/metrics.jsonl log_fast/metrics.jsonl
    uv run bench/spike_stats.py --metrics runs/*/metrics.jsonl --window 100 --warmup 50 --thresholds 4,5,6,8
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
from cli import UserError, field, parse_config  # noqa: E402
from spike_guard import SpikeGuard  # noqa: E402


@dataclass
class StatsConfig:
    metrics: tuple[str, ...] = field((), "metrics.jsonl files of runs logged every step")
    window: int = field(100, "the guard's --spike-window")
    warmup: int = field(50, "the guard's --spike-warmup")
    thresholds: str = field("3,4,5,6,8", "comma-separated thresholds to count skips for")


def train_series(path: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) per step, the last record of each step (a resumed run rewrites some)."""
    by_step = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("type") == "train":
            by_step[rec["step"]] = (rec["step"], rec["train_loss"], rec["grad_norm"])
    return [by_step[s] for s in sorted(by_step)]


def scores(series: list[tuple[int, float, float]], window: int, warmup: int) -> list[tuple[int, float, float]]:
    """(step, loss score, grad-norm score) for each step the guard would judge, with every update accepted."""
    guard = SpikeGuard(threshold=float("inf"), norm_threshold=float("inf"), window=window, warmup=warmup)
    out = []
    for step, loss, norm in series:
        if len(guard.history["loss"]) >= warmup:
            row = [step]
            for name, value in (("loss", loss), ("grad_norm", norm)):
                mean, std = guard.stats(name)
                row.append((value - mean) / max(std, 1e-3 * abs(mean), 1e-8))
            out.append(tuple(row))
        guard.check(loss=loss, grad_norm=norm)
    return out


def main(argv=None) -> int:
    cfg = parse_config(StatsConfig, argv, description=__doc__)
    if not cfg.metrics:
        raise UserError("give the runs' files: --metrics log/metrics.jsonl ...")
    thresholds = [float(t) for t in cfg.thresholds.split(",")]
    print(
        f"window {cfg.window}, warm-up {cfg.warmup}: largest scores (standard deviations above the window's mean, "
        "@ step), and the updates each threshold would skip, on the loss / on the grad norm"
    )
    print(
        f"{'run':40s} {'steps':>6s} {'judged':>6s} {'max z loss':>10s} {'max z norm':>10s}  "
        + "  ".join(f"skip@{t:g}" for t in thresholds)
    )
    for path in map(Path, cfg.metrics):
        series = train_series(path)
        judged = scores(series, cfg.window, cfg.warmup)
        if not judged:
            print(f"{str(path):40s} {len(series):6d}  (shorter than the warm-up)")
            continue
        worst_loss = max(judged, key=lambda r: r[1])
        worst_norm = max(judged, key=lambda r: r[2])
        skips = [f"{sum(r[1] > t for r in judged)}/{sum(r[2] > t for r in judged)}" for t in thresholds]
        print(
            f"{str(path)[-40:]:40s} {len(series):6d} {len(judged):6d} {worst_loss[1]:7.2f}@{worst_loss[0]:<5d}"
            f"{worst_norm[2]:6.2f}@{worst_norm[0]:<5d} " + "  ".join(f"{s:>7s}" for s in skips)
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
