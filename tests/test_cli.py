"""The one CLI convention and the flag rules derived from each config field's metadata (cli.py):
`<script>: error: <message>` with exit 2 for what the user can fix, 130 for Ctrl-C; the lists the
trainer and the benchmark use (run-defining, refused on resume, shapes a step), the --help sections
and the range checks all come from the fields, so a new flag cannot be forgotten in a hand-kept list."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint
import cli
from train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def test_every_training_flag_has_a_section_and_every_named_setting_exists():
    """A new TrainConfig field without a --help section fails here, and so does a name in the short
    lists kept beside their one reader (checkpoint.py's resume rules, bench/throughput.py's step flags)
    that is not a field: a renamed flag cannot silently drop out of them."""
    from bench.throughput import STEP_FLAGS

    for name, f in FIELDS.items():
        assert f.metadata["section"], f"{name} has no --help section"
    for names in (checkpoint.RUN_SETTINGS, checkpoint.RESUME_REFUSED, checkpoint.RESUME_FLAGS, STEP_FLAGS):
        assert set(names) <= set(FIELDS), set(names) - set(FIELDS)
    assert set(checkpoint.RESUME_REFUSED) <= set(checkpoint.RUN_SETTINGS)  # refusing a change = it defines the run
    assert not set(STEP_FLAGS) & {"max_steps", "val_every", "log_dir", "ckpt_every", "resume"}  # not a step's shape
    assert not set(checkpoint.RESUME_FLAGS) & set(checkpoint.RUN_SETTINGS)  # how to resume is not what a run is


def test_each_flag_is_one_line_of_the_config():
    """One clause of help a flag: a field fits on one line (the reasons go in comments above it)."""
    import inspect

    lines = inspect.getsource(TrainConfig).splitlines()
    declarations = [line for line in lines if re.match(r"    \w+: .+ = field\(", line)]
    assert len(declarations) == len(FIELDS), "a field spans several lines: shorten its help to one clause"


def test_help_lists_the_flags_by_section():
    text = cli.build_parser(TrainConfig).format_help()
    sections = dict.fromkeys(f.metadata["section"] for f in FIELDS.values())
    positions = [text.index(f"\n{section}:\n") for section in sections]
    assert positions == sorted(positions)  # in field order, each once
    body = text[text.index("\nbatch:\n") :]
    assert body.index("--micro-batch-size") < body.index("\noptimisation:\n")  # under its own section


BOUNDED = [
    (name, f.metadata["bounds"]) for name, f in FIELDS.items() if any(b is not None for b in f.metadata["bounds"])
]


@pytest.mark.parametrize("name,bounds", BOUNDED, ids=[name for name, _ in BOUNDED])
def test_each_range_check_names_its_flag(name, bounds):
    above, at_least, below, at_most = bounds
    low = above if above is not None else at_least
    outside = low - 1 if low is not None else (below if below is not None else at_most) + 1
    outside = type(FIELDS[name].default)(outside)
    with pytest.raises(cli.UserError, match=rf"^{cli.flag_name(FIELDS[name])} must be .*, got {outside}$"):
        TrainConfig(**{name: outside})


@pytest.mark.parametrize(
    "script,args",
    [
        ("train_gpt2.py", ["--max-lr=-1e-3"]),
        ("sample.py", ["--checkpoint", "no/such.pt"]),
        ("hellaswag.py", ["--checkpoint", "no/such.pt"]),
        ("export_hf.py", ["--checkpoint", "no/such.pt"]),
        ("plot.py", ["--log-dir", "no/such/log"]),
        ("fineweb.py", ["--input", "no/such.parquet", "--out-dir", "x"]),
    ],
)
def test_every_script_reports_a_user_error_the_same_way(script, args, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), result.stderr
    assert not list(tmp_path.iterdir())  # nothing made on the way out


def test_run_main_maps_ctrl_c_to_130_and_keeps_a_bugs_traceback(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def buggy(argv):
        raise KeyError("a bug")

    assert cli.run_main(interrupted) == 130
    with pytest.raises(KeyError):
        cli.run_main(buggy)


SCRIPTS = [
    "train_gpt2.py",
    "core.py",
    "hellaswag.py",
    "sample.py",
    "export_hf.py",
    "dataloader.py",
    "plot.py",
    "fineweb.py",
    "bench/throughput.py",
    "bench/gpu_check.py",
    "bench/memory_table.py",
    "bench/bench_hellaswag.py",
    "bench/bench_loss.py",
    "bench/bench_fineweb.py",
    "bench/recipe_gate.py",
    "bench/spike_stats.py",
]


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its report on stderr."""
    lines = importtime_stderr.splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_or_help_is_answered_before_torch_is_imported(script, tmp_path):
    """A typo costs the time Python takes to start (torch's import took 27 s on a loaded node): one
    line and exit 2, or the help and exit 0, and torch never imported."""
    for args, code in ((["--bogus-flag"], 2), (["--help"], 0)):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", str(ROOT / script), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == code, result.stderr[-2000:]
        assert "torch" not in imported_modules(result.stderr), f"{script} {args[0]} imported torch"
        errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        if code:
            name = Path(script).name
            assert errors == [f"{name}: error: unrecognized arguments: --bogus-flag (--help lists the flags)"]
        else:
            assert "usage:" in result.stdout and not errors


def test_a_flag_value_the_trainer_refuses_is_answered_before_torch_is_imported(tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train_gpt2.py"), "--max_lr", "1", "--max-steps", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and "torch" not in imported_modules(result.stderr)
    assert errors == [
        "train_gpt2.py: error: unrecognized arguments: --max_lr 1: did you mean --max-lr? (--help lists the flags)"
    ]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train_gpt2.py"), "--max-steps", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "torch" not in imported_modules(result.stderr)
    assert [line for line in result.stderr.splitlines() if not line.startswith("import time:")] == [
        "train_gpt2.py: error: --max-steps must be positive, got 0"
    ]
