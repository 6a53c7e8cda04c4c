"""The README's demo. The numbers it quotes are those of the recorded demo run in docs/demo/metrics.jsonl
(the run behind docs/demo's figures), and the code still gives that run: its first steps, rerun here,
match the record. When a change moves the demo's numbers, the second test fails: run the demo again
(`uv run train_gpt2.py --demo`), copy its log/metrics.jsonl into docs/demo, redraw the figures
(`uv run plot.py --log-dir log --out-dir docs/demo`) and update the README's sentence."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "docs" / "demo" / "metrics.jsonl"
STEPS_RERUN = 10  # the demo's first steps, rerun: ~1 minute on 2 cores (the whole demo takes ~5)
# A different CPU rounds the float sums differently (the demo's final val loss: 7.4860 on one machine's
# AMD EPYC, 7.4832 on another's); after 10 steps that is ~1e-5, a change of the computation far more.
TOLERANCE = 1e-3


def readme_claim() -> tuple[int, float, float]:
    """(steps, first val loss, last val loss) as the README's quick start states them."""
    text = " ".join((ROOT / "README.md").read_text().split())  # sentences may wrap anywhere
    steps = re.search(r"for ([\d,]+) steps of [\d,]+ tokens on the CPU", text)
    losses = re.search(r"the validation loss going from (\d+\.\d+) to (\d+\.\d+)", text)
    assert steps and losses, "the README no longer states the demo's steps and validation losses"
    return int(steps.group(1).replace(",", "")), float(losses.group(1)), float(losses.group(2))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_readme_quotes_the_recorded_demo_run():
    recorded = records(RECORD)
    val = [r["val_loss"] for r in recorded if r["type"] == "val"]
    steps, first, last = readme_claim()
    assert max(r["step"] for r in recorded if r["type"] == "train") + 1 == steps
    assert (round(val[0], 2), round(val[-1], 2)) == (first, last), f"the record's val loss went {val[0]} -> {val[-1]}"
    assert [r["config"]["demo"] for r in recorded if r["type"] == "config"] == [True]  # one uninterrupted demo


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_still_gives_the_recorded_run(tmp_path):
    """`train_gpt2.py --demo` in a fresh folder, as a user runs it, stopped after its first steps: its
    validation at step 0 and its train losses are the record's."""
    log = tmp_path / "log" / "metrics.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_gpt2.py"), "--demo"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 800
        while not (log.exists() and any(r["type"] == "train" and r["step"] == STEPS_RERUN - 1 for r in records(log))):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the demo did not reach its 10th step"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    ran, recorded = records(log), records(RECORD)

    def losses(rs: list[dict]) -> list[float]:
        return [r["train_loss"] for r in rs if r["type"] == "train" and r["step"] < STEPS_RERUN]

    def first_val(rs: list[dict]) -> float:
        return next(r["val_loss"] for r in rs if r["type"] == "val")

    assert losses(ran) == pytest.approx(losses(recorded), abs=TOLERANCE)
    assert first_val(ran) == pytest.approx(first_val(recorded), abs=TOLERANCE)
