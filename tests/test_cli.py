"""The one CLI convention and the flag rules derived from each config field's metadata (cli.py):
`<script>: error: <message>` with exit 2 for what the user can fix, 130 for Ctrl-C; the lists the
trainer and the benchmark use (run-defining, refused on resume, shapes a step), the --help sections
and the range checks all come from the fields, so a new flag cannot be forgotten in a hand-kept list."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import train_gpt2
from train_gpt2 import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def test_every_training_flag_says_where_it_belongs():
    """A new TrainConfig field without a section fails here, and so does a group name that is not one."""
    for name, f in FIELDS.items():
        assert f.metadata["section"], f"{name} has no --help section"
        assert set(f.metadata["groups"]) <= set(cli.GROUPS), name
    assert set(train_gpt2.RESUME_REFUSED) <= set(train_gpt2.RUN_SETTINGS)  # refusing a change = it defines the run
    assert {"tokens_per_step", "seq_len", "seed", "shuffle"} == set(train_gpt2.RESUME_REFUSED)
    assert {"resume", "allow_config_change"} == set(train_gpt2.RESUME_FLAGS)
    assert not set(train_gpt2.STEP_FLAGS) & {"max_steps", "val_every", "log_dir", "ckpt_every", "resume"}


def test_help_lists_the_flags_by_section():
    text = train_gpt2.build_parser(TrainConfig).format_help()
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
