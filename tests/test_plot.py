"""plot.py: real metrics.jsonl / hellaswag_results.jsonl / core_results.jsonl files in temp dirs, real
matplotlib figures.

The logs are written the way train_gpt2.py, hellaswag.py and core.py write them (format 1: every config
record says "format": 1 and holds every TrainConfig field): a decaying loss curve, a run that crashed and
resumed from an earlier checkpoint (second config record, repeated steps), a run still being written, bad
lines, logs without val or HellaSwag records.
"""

import dataclasses
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import core_eval
import metrics
import plot
import train_config

ROOT = Path(__file__).resolve().parent.parent
TPS = 524_288  # tokens per optimizer step of the reference run
T0 = 1_750_000_000.0
WARMUP = plot.PlotConfig.warmup_steps
EDU = "HuggingFaceFW/fineweb-edu (sample-10BT)"  # describe_source of the reference run's shards
DEMO = "fineweb_demo.parquet"  # the CPU demo corpus: FineWeb, not FineWeb-Edu


def _config(step, time, resumed_from=None, source=EDU, **settings):
    """A config record as train_gpt2.write_config_record writes it: the format, every TrainConfig field."""
    cfg = train_config.TrainConfig(**{"max_steps": 200, "warmup_steps": 20, "tokens_per_step": TPS, **settings})
    return {
        "type": "config",
        "step": step,
        "format": metrics.FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "git_sha": "abc123",
        "torch": "2.11.0",
        "cuda": None,
        "device_name": "cpu",
        "world_size": 1,
        "parallel": "ddp",
        "resumed_from": resumed_from,
        "flops_per_token": 850_000_000,
        "peak_flops": 989e12,
        "grad_accum_steps": 8,
        "num_params": 124_475_904,
        "data_source": source,
        "hosts": ["node0"],
        "time": time,
    }


def _segment(start, stop, time, seed, *, val_every=25, hs_every=50, mfu=True, val=True, hs=True, **config):
    """Records of one training process from step `start` (its config record first) to step `stop`."""
    rng = random.Random(seed)
    recs = [_config(start, time, None if start == 0 else f"log/model_{start:05d}.pt", **config)]
    time += 30.0  # compile before the first step
    for i in range(start, stop):
        s = i  # steps completed before step i; evaluations run first, as in the loop
        if val and s % val_every == 0:
            loss = 3.1 + 8.0 * math.exp(-s / 40) + rng.gauss(0, 0.01)
            recs.append(
                {"type": "val", "step": s, "tokens": s * TPS, "val_loss": loss, "val_bpb": loss / 3, "time": time}
            )
        if hs and s % hs_every == 0 and s > 0:
            acc_norm = 0.25 + 0.05 * (1 - math.exp(-s / 80)) + rng.gauss(0, 0.002)
            recs.append(
                {
                    "type": "hellaswag",
                    "step": s,
                    "tokens": s * TPS,
                    "hellaswag_acc": acc_norm - 0.01,
                    "hellaswag_acc_norm": acc_norm,
                    "count": 10042,
                    "time": time,
                }
            )
        warm = i - start < WARMUP
        step_ms = 4000.0 if warm else 500.0 + rng.uniform(-20, 20)
        time += step_ms / 1000
        lr = 6e-4 * min(1.0, (i + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * i / 200))
        recs.append(
            {
                "type": "train",
                "step": i,
                "tokens": (i + 1) * TPS,
                "train_loss": 3.0 + 8.0 * math.exp(-i / 40) + rng.gauss(0, 0.05),
                "lr": lr,
                "grad_norm": 0.5 + rng.random(),
                "step_ms": step_ms,
                "tokens_per_sec": TPS / (step_ms / 1000),
                "mfu": (0.4 + rng.uniform(-0.01, 0.01)) * (0.1 if warm else 1.0) if mfu else None,
                "time": time,
            }
        )
        if i % 60 == 7:  # records plot.py does not draw
            recs.append({"type": "sample", "step": i, "samples": ["Hello"], "time": time})
            recs.append({"type": "skip", "step": i, "tokens": (i + 1) * TPS, "reason": "spike", "time": time})
    if val:  # the last step evaluates too
        loss = 3.1 + 8.0 * math.exp(-stop / 40)
        recs.append(
            {"type": "val", "step": stop, "tokens": stop * TPS, "val_loss": loss, "val_bpb": loss / 3, "time": time + 5}
        )
    return recs


def _write(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("".join(line + "\n" for line in lines))


def _run_dir(tmp_path, name, records):
    log = tmp_path / name
    log.mkdir()
    _write(log / "metrics.jsonl", records)
    return log


def _by_step(records, kind):
    """The contract's rule, applied by the test: last record per step wins."""
    out = {}
    for r in records:
        if r["type"] == kind:
            out[r["step"]] = r
    return dict(sorted(out.items()))


def _hs_result(checkpoint, acc_norm, step=200, model=None, count=10042):
    """A hellaswag.py row of hellaswag_results.jsonl."""
    return {
        "checkpoint": checkpoint,
        "model": model,
        "step": step,
        "acc": acc_norm - 0.01,
        "acc_norm": acc_norm,
        "harness_acc": acc_norm - 0.005,
        "harness_acc_norm": acc_norm + 0.008,
        "count": count,
        "seconds": 60.0,
        "time": T0 + 20_000 + (step or 0),
    }


@pytest.fixture
def resumed_run(tmp_path):
    """A 200-step run that crashed after step 119 and resumed from its step-100 checkpoint, plus
    hellaswag.py results for two of its checkpoints and for HF gpt2 (no step)."""
    first = _segment(0, 120, T0, seed=1)[:-1]  # crashed: no final val
    second = _segment(100, 200, T0 + 10_000, seed=2)
    records = first + second
    log = _run_dir(tmp_path, "resumed", records)
    results = [
        _hs_result("resumed/model_00100.pt", 0.281, step=100),
        _hs_result("resumed/model_00200.pt", 0.297, step=200),
        _hs_result(None, 0.2955, step=None, model="gpt2"),
    ]
    _write(log / "hellaswag_results.jsonl", results)
    return log, records, results


def _line(fig, gid):
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(lines) == 1, f"expected one line {gid!r}, found {len(lines)}"
    return lines[0]


def _axes_with(fig, gid):
    return next(ax for ax in fig.axes if any(ln.get_gid() == gid for ln in ax.get_lines()))


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _error(capsys, *argv: str) -> str:
    """plot.py's one-line error for argv (exit status 2)."""
    assert cli.run_main(plot.main, list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{cli.script_name()}: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- reading


def test_resumed_run_keeps_last_record_per_type_and_step(resumed_run):
    log, records, _ = resumed_run
    run = plot.load_run(log)
    train, val = _by_step(records, "train"), _by_step(records, "val")
    assert [r["step"] for r in run.train] == list(range(200))  # 20 repeated steps collapsed, in order
    assert run.train == [{**r, "since_restart": run.train[i]["since_restart"]} for i, r in enumerate(train.values())]
    # Step 110 was logged by both processes: the resumed one wins.
    first_110, second_110 = [r for r in records if r["type"] == "train" and r["step"] == 110]
    assert first_110["train_loss"] != second_110["train_loss"]
    assert run.train[110]["train_loss"] == second_110["train_loss"]
    assert run.val == list(val.values()) and list(val) == [0, 25, 50, 75, 100, 125, 150, 175, 200]
    assert len(run.configs) == 2 and run.configs[1]["resumed_from"] == "log/model_00100.pt"
    # Position since each (re)start: steps 100.. restart the count.
    assert [r["since_restart"] for r in run.train[:3]] == [0, 1, 2] and run.train[100]["since_restart"] == 0
    assert run.skipped == []


def test_bad_lines_and_partial_last_line_are_skipped_with_line_numbers(tmp_path, capsys):
    records = _segment(0, 60, T0, seed=3)[:-1]
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "{not json")  # line 11
    # A run still writing: the last line is cut mid-record, with no newline yet.
    text = "\n".join(lines) + "\n" + json.dumps({"type": "train", "step": 60, "train_loss": 4.0})[:25]
    log = tmp_path / "live"
    log.mkdir()
    (log / "metrics.jsonl").write_text(text)

    run = plot.load_run(log)
    assert [r["step"] for r in run.train] == list(range(60))
    assert [s.split(":")[1] for s in run.skipped] == ["11", str(len(lines) + 1)]
    assert "still be writing" in run.skipped[-1]

    plot.main(["--log-dir", str(log)])
    err = capsys.readouterr().err
    assert "skipped 2 bad line(s)" in err and "metrics.jsonl:11: not valid JSON" in err
    assert (log / "overview.png").is_file()


def test_empty_or_missing_log_exits_with_one_line_message(tmp_path, capsys):
    missing = _error(capsys, "--log-dir", str(tmp_path / "nope"))
    assert "does not exist" in missing and "--log-dir" in missing

    (tmp_path / "empty").mkdir()
    assert "metrics.jsonl not found" in _error(capsys, "--log-dir", str(tmp_path / "empty"))

    (tmp_path / "empty" / "metrics.jsonl").write_text("\n\n")
    assert "has no records" in _error(capsys, "--log-dir", str(tmp_path / "empty"))
    assert list((tmp_path / "empty").glob("*.png")) == []

    assert "--smoothing" in _error(capsys, "--log-dir", str(tmp_path / "empty"), "--smoothing", "1.5")
    assert "--warmup-steps" in _error(capsys, "--log-dir", str(tmp_path / "empty"), "--warmup-steps", "-1")


@pytest.mark.parametrize(
    "change, what",
    [
        ("no format", "none (written before formats were recorded)"),
        ("format 2", "2"),
        ("resumed by format 2", "2"),  # a newer trainer resumed the run: its records may mean other things
        ("no config record", "none (written before formats were recorded)"),
    ],
)
def test_a_log_of_another_format_is_refused_in_one_line(tmp_path, capsys, change, what):
    records = _segment(0, 30, T0, seed=22) + _segment(30, 40, T0 + 1_000, seed=23)
    first, resume = [i for i, r in enumerate(records) if r["type"] == "config"]
    if change == "no format":
        records[first] = records[resume] = {k: v for k, v in records[first].items() if k != "format"}
    elif change == "format 2":
        records[first] = records[resume] = {**records[first], "format": 2}
    elif change == "resumed by format 2":
        records[resume] = {**records[resume], "format": 2}
    else:
        records = [r for r in records if r["type"] != "config"]
    log = _run_dir(tmp_path, "run", records)
    err = _error(capsys, "--log-dir", str(log))
    assert err.strip() == (
        f"{cli.script_name()}: error: {log / 'metrics.jsonl'} is a metrics log of format {what}, this plot.py "
        "reads format 1: plot it with the version of the repo that wrote it"
    )
    assert list(log.glob("*.png")) == []
    assert plot.FORMAT_VERSION is metrics.FORMAT_VERSION


def test_flags_are_generated_from_config_fields():
    assert plot.parse_config([]) == plot.PlotConfig()
    assert plot.PlotConfig().log_dirs == ("log",)
    cfg = plot.parse_config(
        ["--log-dir", "a", "--log-dir", "b", "--out-dir", "o", "--summary", "--smoothing", "0.5", "--warmup-steps", "3"]
    )
    assert cfg == plot.PlotConfig(log_dirs=("a", "b"), out_dir="o", summary=True, smoothing=0.5, warmup_steps=3)


# ---------------------------------------------------------------- figures


def test_figures_are_written_as_pngs_into_the_log_dir(resumed_run):
    log, _, _ = resumed_run
    paths = plot.make_figures([plot.load_run(log)], log)
    assert set(paths) == {*plot.PANELS, "overview"} and len(paths) == 7
    for name, path in paths.items():
        assert path == log / f"{name}.png"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 20_000, (name, len(data))  # a drawn figure, not an empty canvas
    assert not [p for p in log.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp file


@pytest.mark.parametrize(
    "umask, mode", [(0o027, 0o640), (0o022, 0o644), (0o077, 0o600)], ids=["umask027", "umask022", "umask077"]
)
def test_figures_and_summary_follow_the_umask(resumed_run, tmp_path, umask, mode):
    out = tmp_path / "out"
    expected = sorted([f"{n}.png" for n in (*plot.PANELS, "overview")] + ["summary.md"])
    old = os.umask(umask)
    try:
        plot.main(["--log-dir", str(resumed_run[0]), "--out-dir", str(out), "--summary"])
        assert sorted(p.name for p in out.iterdir()) == expected  # and no temp file left behind
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
        assert modes == dict.fromkeys(expected, oct(mode))
        # Rewriting replaces the files: the new ones follow the umask too, not the old files' modes.
        for p in out.iterdir():
            p.chmod(0o666)
        plot.main(["--log-dir", str(resumed_run[0]), "--out-dir", str(out), "--summary"])
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == modes
    finally:
        os.umask(old)


def test_plotted_series_equal_logged_values(resumed_run):
    log, records, _ = resumed_run
    run = plot.load_run(log)
    train, val, hs = _by_step(records, "train"), _by_step(records, "val"), _by_step(records, "hellaswag")
    figs = plot.build_figures([run])
    for fig_name in ("training_loss", "overview"):
        raw = _line(figs[fig_name], "resumed/train_loss")
        assert list(raw.get_xdata()) == list(train)
        assert list(raw.get_ydata()) == [r["train_loss"] for r in train.values()]
    checks = {
        ("validation_loss", "val_loss"): (list(val), [r["val_loss"] for r in val.values()]),
        ("learning_rate", "lr"): (list(train), [r["lr"] for r in train.values()]),
        ("throughput", "tokens_per_sec"): (list(train), [r["tokens_per_sec"] for r in train.values()]),
        ("throughput", "mfu"): (list(train), [100 * r["mfu"] for r in train.values()]),
        ("hellaswag_accuracy", "hellaswag_acc_norm"): (list(hs), [r["hellaswag_acc_norm"] for r in hs.values()]),
        ("hellaswag_accuracy", "results_acc_norm"): ([100, 200], [0.281, 0.297]),
        ("hellaswag_accuracy", "results_harness_acc_norm"): ([100, 200], [0.289, 0.305]),
    }
    for (fig_name, key), (xs, ys) in checks.items():
        line = _line(figs[fig_name], f"resumed/{key}")
        assert list(line.get_xdata()) == xs, key
        assert list(line.get_ydata()) == pytest.approx(ys, rel=1e-12), key
    # The HF gpt2 row has no step: drawn as a level at its acc_norm.
    level = _line(figs["hellaswag_accuracy"], "results/gpt2")
    assert set(level.get_ydata()) == {0.2955} and level.get_label() == "gpt2, hellaswag.py (0.2955)"
    # MFU lives on its own (twin) y-axis, tokens/s on the main one.
    tput = figs["throughput"]
    assert _axes_with(tput, "resumed/mfu") is not _axes_with(tput, "resumed/tokens_per_sec")
    assert _axes_with(tput, "resumed/mfu").get_ylabel() == "MFU (%)"


def test_smoothed_train_loss_is_a_debiased_ema_of_the_raw_curve(resumed_run):
    run = plot.load_run(resumed_run[0])
    fig = plot.build_figures([run], smoothing=0.7)["training_loss"]
    raw = list(_line(fig, "resumed/train_loss").get_ydata())
    smooth = list(_line(fig, "resumed/train_loss_ema").get_ydata())
    assert smooth[0] == pytest.approx(raw[0])  # debiased: no pull towards 0 at the start
    assert smooth[1] == pytest.approx((0.7 * 0.3 * raw[0] + 0.3 * raw[1]) / (1 - 0.7**2))

    def noise(ys):
        return sum((b - a) ** 2 for a, b in itertools.pairwise(ys[150:]))

    assert noise(smooth) < noise(raw) / 4
    assert plot.ema([2.0] * 5, 0.95) == pytest.approx([2.0] * 5)
    assert "EMA 0.7" in _line(fig, "resumed/train_loss_ema").get_label()
    # The default 0.95 lags 20 steps: kept for a 19,073-step run, lowered to a 4-step lag for 200 steps.
    assert plot.ema_weight(0.95, 19_073) == 0.95
    assert plot.ema_weight(0.95, 200) == pytest.approx(0.75)
    assert plot.ema_weight(0.95, 30) == 0.0
    default = plot.build_figures([run])["training_loss"]
    assert "EMA 0.75" in _line(default, "resumed/train_loss_ema").get_label()


def test_baselines_are_labelled_lines_and_inside_the_view(resumed_run):
    figs = plot.build_figures([plot.load_run(resumed_run[0])])
    for fig_name, values in (("validation_loss", {3.2924}), ("hellaswag_accuracy", {0.2955, 0.337, 0.25, 0.3114})):
        ax = figs[fig_name].axes[0]
        assert _baseline_values(ax) == values
        lo, hi = ax.get_ylim()
        assert all(lo < v < hi for v in values), (fig_name, lo, hi)
        assert any("GPT-2 124M" in t for t in _legend(ax))
    hs_legend = _legend(figs["hellaswag_accuracy"].axes[0])
    assert "GPT-3 124M (paper) (0.337)" in hs_legend and "OpenAI GPT-2 124M (0.2955)" in hs_legend


def _val_panels(runs):
    """The val-loss axes of validation_loss.png and of overview.png."""
    figs = plot.build_figures(runs)
    return [figs["validation_loss"].axes[0], _axes_with(figs["overview"], f"{runs[0].name}/val_loss")]


def _baseline_values(ax):
    return {ln.get_ydata()[0] for ln in ax.get_lines() if str(ln.get_gid()).startswith("baseline/")}


@pytest.mark.parametrize(
    "source, baseline",
    [(DEMO, False), (EDU, True), ("my-mirror/FineWeb-Edu", True), (None, True)],  # None: shards without a manifest
    ids=["demo", "fineweb-edu", "fineweb-edu-mirror", "unknown"],
)
def test_val_legend_names_the_data_source_and_gpt2_baseline_is_drawn_only_on_fineweb_edu(tmp_path, source, baseline):
    run = plot.load_run(_run_dir(tmp_path, "run", _segment(0, 200, T0, seed=7, source=source)))
    for ax in _val_panels([run]):
        assert ax.get_title() == "Validation loss"  # short: the source, maybe long, is in the legend
        assert _legend(ax)[0] == (f"val loss ({source})" if source else "val loss")
        assert _baseline_values(ax) == ({3.2924} if baseline else set())
        assert any("3.2924" in t for t in _legend(ax)) == baseline
    note = plot.summarize([run]).split("\n\n")[1]
    assert ("Val loss baseline: OpenAI GPT-2 124M 3.2924" in note) == baseline
    if not baseline:
        assert f"Val losses are on the val shards of {source}: not comparable" in note


def test_val_panel_names_each_runs_source_and_drops_the_baseline_if_any_is_not_fineweb_edu(tmp_path):
    edu, demo, unknown = (
        plot.load_run(_run_dir(tmp_path, name, _segment(0, 60, T0, seed=8, source=source)))
        for name, source in (("edu", EDU), ("demo", DEMO), ("unknown", None))
    )
    for ax in _val_panels([edu, demo]):
        assert _legend(ax) == [f"edu: val loss ({EDU})", f"demo: val loss ({DEMO})"]
        assert _baseline_values(ax) == set()
    for ax in _val_panels([edu, unknown]):
        assert _baseline_values(ax) == {3.2924}
    assert plot.data_sources(plot.load_run(tmp_path / "edu")) == [EDU]


def test_tokens_axis_uses_the_config_records_tokens_per_step(tmp_path):
    """The top axis converts steps with tokens_per_step from the config record (not from the records'
    tokens), also before any train record; runs with different batches get no tokens axis."""
    starting = plot.load_run(
        _run_dir(
            tmp_path, "starting", [_config(0, T0, tokens_per_step=2048, model="tiny", seq_len=256, micro_batch_size=4)]
        )
    )
    assert starting.tokens_per_step == 2048
    for runs, tps in (
        ([starting], 2048),
        ([starting, plot.load_run(_run_dir(tmp_path, "big", _segment(0, 30, T0, 9)))], None),
    ):
        fig = plot.build_figures(runs)["validation_loss"]
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_xlabel() == "step"
        if tps is None:
            assert ax.child_axes == []
        else:
            (top,) = ax.child_axes
            assert top.get_xlabel() == "tokens"
            lo, hi = ax.get_xlim()
            assert top.get_xlim() == pytest.approx((lo * tps, hi * tps))


def test_log_without_val_or_hellaswag_shows_no_data_panels(tmp_path):
    log = _run_dir(tmp_path, "bare", _segment(0, 30, T0, seed=4, val=False, hs=False, mfu=False))
    run = plot.load_run(log)
    assert run.val == [] and run.hellaswag == [] and run.results == []
    figs = plot.build_figures([run])
    for name in ("validation_loss", "hellaswag_accuracy", "core"):
        texts = [t.get_text() for t in figs[name].axes[0].texts if t.get_gid() == "no-data"]
        assert len(texts) == 1 and texts[0].startswith("no data"), name
    assert not [t for t in figs["training_loss"].axes[0].texts if t.get_gid() == "no-data"]
    # Empty panels still span the run's steps, like the others, so panels line up.
    assert figs["validation_loss"].axes[0].get_xlim() == figs["training_loss"].axes[0].get_xlim() == (0, 29 * 1.02)
    assert "MFU not logged" in figs["throughput"].axes[0].get_title()
    paths = plot.make_figures([run], log)
    assert all(p.stat().st_size > 10_000 for p in paths.values())
    (row,) = _parse_table(plot.summarize([run]))
    assert row["best val loss"] == row["MFU"] == row["HellaSwag (training loop)"] == row["CORE"] == "–"


def test_run_with_only_a_config_record_plots_empty_panels(tmp_path):
    log = _run_dir(tmp_path, "starting", [_config(0, T0)])
    paths = plot.make_figures([plot.load_run(log)], log)
    assert len(paths) == 7 and all(p.is_file() for p in paths.values())


def test_several_runs_in_one_figure_labelled_by_dir(resumed_run, tmp_path):
    log_a = resumed_run[0]
    log_b = _run_dir(tmp_path, "short", _segment(0, 80, T0, seed=5))
    out = tmp_path / "compare"
    plot.main(["--log-dir", str(log_a), "--log-dir", str(log_b), "--out-dir", str(out), "--summary"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in (*plot.PANELS, "overview"))
    assert not list(log_a.glob("training_loss.png"))  # --out-dir given: log dirs untouched
    runs = plot.load_runs([log_a, log_b])
    fig = plot.build_figures(runs)["validation_loss"]
    assert _legend(fig.axes[0])[:2] == [f"resumed: val loss ({EDU})", f"short: val loss ({EDU})"]
    assert _line(fig, "short/val_loss").get_color() != _line(fig, "resumed/val_loss").get_color()
    hs = plot.build_figures(runs)["hellaswag_accuracy"].axes[0]
    # each run named once, the markers' meaning once
    assert {"resumed", "short", "acc_norm, hellaswag.py", "harness acc_norm, hellaswag.py"} <= set(_legend(hs))
    assert [row["run"] for row in _parse_table((out / "summary.md").read_text())] == ["resumed", "short"]


def test_every_run_has_a_legend_entry_and_a_short_one_is_drawn_in_full(resumed_run, tmp_path):
    """A run of 50 logged steps or fewer is too short to smooth: its raw curve is its curve, drawn at
    full strength and named in the legend, next to the smoothed curve of a long run."""
    short = _run_dir(tmp_path, "short", _segment(0, 30, T0, seed=7))
    runs = plot.load_runs([resumed_run[0], short])
    for fig_name in ("training_loss", "overview"):
        fig = plot.build_figures(runs)[fig_name]
        ax = _axes_with(fig, "short/train_loss")
        assert _legend(ax) == ["resumed: train loss (EMA 0.75)", "short: train loss (raw, 30 steps: not smoothed)"]
        line = _line(fig, "short/train_loss")
        assert line.get_alpha() in (None, 1.0) and line.get_linewidth() >= 1.4
        assert list(line.get_ydata()) == [r["train_loss"] for r in plot.load_run(short).train]
    alone = plot.build_figures([runs[1]], smoothing=0.0)["training_loss"]
    assert _legend(alone.axes[0]) == ["train loss (raw)"]


def test_runs_with_the_same_dir_name_get_distinct_labels(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
        _run_dir(tmp_path / parent, "log", _segment(0, 12, T0, seed=6))
    runs = plot.load_runs([tmp_path / "a" / "log", tmp_path / "b" / "log"])
    assert len({r.name for r in runs}) == 2


def test_no_title_is_wrapped_by_hand(resumed_run, tmp_path):
    long_source = "some-org/a-very-long-dataset-name-on-the-hub (a-long-config-name)"
    other = plot.load_run(_run_dir(tmp_path, "other", _segment(0, 60, T0, seed=10, source=long_source)))
    figs = plot.build_figures([plot.load_run(resumed_run[0]), other])
    titles = [ax.get_title() for fig in figs.values() for ax in fig.axes]
    assert titles and not [t for t in titles if "\n" in t]


# ---------------------------------------------------------------- summary


def _parse_table(markdown):
    rows = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    header, body = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in body]


def test_summary_numbers_are_computed_from_the_logged_values(resumed_run):
    log, records, _ = resumed_run
    train, val, hs = _by_step(records, "train"), _by_step(records, "val"), _by_step(records, "hellaswag")
    (row,) = _parse_table(plot.summarize([plot.load_run(log)]))
    assert row["run"] == "resumed" and row["model"] == "gpt2"
    assert row["steps"] == "200 / 200"
    assert row["tokens"] == "105M"  # 200 * 524,288 = 104,857,600
    assert row["best val loss"] == f"{min(r['val_loss'] for r in val.values()):.4f}"
    assert row["final val loss"] == f"{val[200]['val_loss']:.4f}"
    assert row["final val bpb"] == f"{val[200]['val_bpb']:.4f}"
    assert row["HellaSwag (training loop)"] == f"{max(r['hellaswag_acc_norm'] for r in hs.values()):.4f} (10,042 ex)"
    assert row["HellaSwag (hellaswag.py)"] == "0.2970 (10,042 ex)"  # HF gpt2's 0.2955 is not this run's
    assert row["HellaSwag (harness style)"] == "0.3050 (10,042 ex)"
    # Warm-up: first WARMUP train records of each process; steps 100-119 of the first were replaced.
    steady = [r for s, r in train.items() if WARMUP <= s < 100 or s >= 100 + WARMUP]
    assert row["tokens/s"] == f"{sum(r['tokens_per_sec'] for r in steady) / len(steady):,.0f}"
    mfu = sum(r["mfu"] for r in steady) / len(steady)
    assert row["MFU"] == f"{100 * mfu:.1f}%" and 0.39 < mfu < 0.41  # the slow first steps (mfu 0.04) are out
    # Wall time: each process from its config record to its last record, the gap between them excluded.
    restarts = [i for i, r in enumerate(records) if r["type"] == "config"] + [len(records)]
    spans = [
        max(r["time"] for r in records[a:b]) - min(r["time"] for r in records[a:b])
        for a, b in itertools.pairwise(restarts)
    ]
    h, m, s = map(int, row["wall time"].split(":"))
    assert h * 3600 + m * 60 + s == round(sum(spans)) and sum(spans) < 10_000


def test_summary_shows_how_many_examples_each_hellaswag_score_used(tmp_path):
    """A demo run scores 200 examples in the loop; hellaswag.py scored one checkpoint with --limit 200
    and another on the full set: each best value carries the count of the row it came from."""
    records = [{**r, "count": 200} if r["type"] == "hellaswag" else r for r in _segment(0, 120, T0, seed=9)]
    log = _run_dir(tmp_path, "demo", records)
    results = [
        _hs_result("demo/model_00100.pt", 0.310, step=100, count=200),
        _hs_result("demo/model_00120.pt", 0.290, 120),
    ]
    results[1]["harness_acc_norm"] = 0.320
    _write(log / "hellaswag_results.jsonl", results)
    table = plot.summarize([plot.load_run(log)])
    (row,) = _parse_table(table)
    best_loop = max(r["hellaswag_acc_norm"] for r in records if r["type"] == "hellaswag")
    assert row["HellaSwag (training loop)"] == f"{best_loop:.4f} (200 ex)"
    assert row["HellaSwag (hellaswag.py)"] == "0.3100 (200 ex)"
    assert row["HellaSwag (harness style)"] == "0.3200 (10,042 ex)"
    assert "the examples it was scored on (10,042 ex = the full val set" in table.split("\n\n")[1]


def test_summary_has_a_model_column_from_the_config_records(tmp_path):
    tiny = {"model": "tiny", "seq_len": 256}
    tiny = _segment(0, 30, T0, seed=20, **tiny) + _segment(30, 40, T0 + 1_000, seed=21, **tiny)
    logs = [_run_dir(tmp_path, "tinyrun", tiny), _run_dir(tmp_path, "gpt2run", _segment(0, 30, T0, seed=20))]
    table = plot.summarize(plot.load_runs(logs))
    # resumed: the preset in both config records, named once
    assert [(r["run"], r["model"]) for r in _parse_table(table)] == [("tinyrun", "tiny"), ("gpt2run", "gpt2")]
    assert table.splitlines()[0].startswith("| run | model | steps |")
    assert "model: the config records' preset" in table


# ---------------------------------------------------------------- scores of other folders and models


def _core_result(checkpoint, step, core, partial=None, max_per_task=0, model=None):
    """A core.py row of core_results.jsonl."""
    task = {"accuracy": 0.4, "centered": 0.2, "count": 2376, "shots": 10, "kind": "multiple_choice"}
    return {
        "checkpoint": checkpoint,
        "model": model,
        "step": step,
        "core": core,
        "core_partial": partial,
        "missing": [] if partial is None else ["bigbench_cs_algorithms"],
        "max_per_task": max_per_task,
        "count": 2376,
        "tasks": {"arc_easy": task},
        "seconds": 60.0,
        "tokenize_seconds": 1.0,
        "device": "cpu",
        "world_size": 1,
        "time": T0 + 40_000,
    }


def test_a_foreign_score_is_a_labelled_level_not_a_point_of_the_run_nor_its_best(tmp_path, monkeypatch, capsys):
    """log/'s results files hold its own checkpoint's scores, and higher ones of log_fast/'s checkpoint
    (scored with --log-dir log) and of HF gpt2: those two are drawn as labelled levels, never as log's
    points or best, also when log_fast is plotted beside it (each run shows its own folder's files)."""
    monkeypatch.chdir(tmp_path)  # where the commands ran: checkpoints recorded relative to it
    for name in ("log", "log_fast"):
        _run_dir(tmp_path, name, _segment(0, 60, T0, seed=11))
    _write(
        Path("log") / "hellaswag_results.jsonl",
        [
            _hs_result("log/model_00060.pt", 0.2600, step=60),
            _hs_result(str(tmp_path / "log_fast" / "model_00060.pt"), 0.2900, step=60),
            _hs_result(None, 0.2955, step=None, model="gpt2"),
        ],
    )
    _write(
        Path("log") / "core_results.jsonl",
        [
            _core_result("log/model_00060.pt", 60, 0.051),
            _core_result("log_fast/model_00060.pt", 60, 0.083),
            _core_result(None, None, 0.1139, model="gpt2"),
        ],
    )
    for runs in (plot.load_runs(["log"]), plot.load_runs(["log", "log_fast"])):
        figs = plot.build_figures(runs)
        for fig in (figs["hellaswag_accuracy"], figs["overview"]):
            assert list(_line(fig, "log/results_acc_norm").get_ydata()) == [0.26]  # the own score only
            assert _line(fig, "results/log_fast/model_00060.pt").get_label() == (
                "log_fast/model_00060.pt, hellaswag.py (0.2900)"
            )
            assert set(_line(fig, "results/log_fast/model_00060.pt").get_ydata()) == {0.29}
            assert _line(fig, "results/gpt2").get_label() == "gpt2, hellaswag.py (0.2955)"
        for fig in (figs["core"], figs["overview"]):
            assert list(_line(fig, "log/results_core").get_ydata()) == [0.051]
            assert _line(fig, "core_results/log_fast/model_00060.pt").get_label() == (
                "log_fast/model_00060.pt, core.py CORE (0.0830)"
            )
            assert set(_line(fig, "core_results/gpt2").get_ydata()) == {0.1139}
        rows = _parse_table(plot.summarize(runs))
        assert (rows[0]["HellaSwag (hellaswag.py)"], rows[0]["CORE"]) == ("0.2600 (10,042 ex)", "0.0510")
        if len(runs) == 2:  # log_fast's own folder holds no results file
            assert (rows[1]["HellaSwag (hellaswag.py)"], rows[1]["CORE"]) == ("–", "–")
            assert not [ln for ln in figs["core"].axes[0].get_lines() if ln.get_gid().startswith("log_fast/results")]
    plot.main(["--log-dir", "log", "--summary"])
    out = capsys.readouterr()
    assert "warning" not in out.err and "drawn as levels only" in out.out


# ---------------------------------------------------------------- CORE


def _core_record(step, core, partial=None, max_per_task=500):
    """An in-training CORE record as train_gpt2.py logs it: core is None, core_partial set, when tasks were missing."""
    return {
        "type": "core",
        "step": step,
        "tokens": step * TPS,
        "core": core,
        "core_partial": partial,
        "count": 22 * max_per_task,
        "max_per_task": max_per_task,
        "tasks": {"arc_easy": 0.3 + step / 1000, "piqa": 0.55},
        "time": T0 + 30 + step,
    }


@pytest.fixture
def core_run(tmp_path):
    """A 120-step run with CORE on 500 examples per task at steps 40 and 80 and CORE-PARTIAL (a task file
    missing) at step 120; core.py scored its step-100 checkpoint in full, its final one partially, and HF gpt2."""
    rng = random.Random(12)
    full = {s: 0.02 + 0.0005 * s + rng.gauss(0, 0.002) for s in (40, 80)}
    partial = 0.5  # far above every CORE value: would stand out in the CORE curve or column
    records = _segment(0, 120, T0, seed=12) + [_core_record(s, v) for s, v in full.items()]
    records.append(_core_record(120, None, partial))
    log = _run_dir(tmp_path, "corerun", records)
    results = [
        _core_result("corerun/model_00100.pt", 100, 0.071),
        _core_result("corerun/model_00120.pt", 120, None, partial=0.6),
        _core_result(None, None, 0.1139 + rng.gauss(0, 0.001), model="gpt2"),
    ]
    _write(log / "core_results.jsonl", results)
    return log, full, results


def test_core_panel_draws_the_training_loop_curve_and_core_py_points(core_run):
    log, full, results = core_run
    figs = plot.build_figures([plot.load_run(log)])
    for fig_name in ("core", "overview"):
        curve = _line(figs[fig_name], "corerun/core")
        assert list(curve.get_xdata()) == list(full) and list(curve.get_ydata()) == list(full.values())
        assert curve.get_label() == "CORE, training loop (500/task)"  # a subset says so
        point = _line(figs[fig_name], "corerun/results_core")
        assert (list(point.get_xdata()), list(point.get_ydata())) == ([100], [0.071])
        assert point.get_label() == "CORE, core.py" and point.get_linestyle() == "None"
        # HF gpt2 has no step: a level at its CORE.
        assert set(_line(figs[fig_name], "core_results/gpt2").get_ydata()) == {results[2]["core"]}
        assert not [t for t in _axes_with(figs[fig_name], "corerun/core").texts if t.get_gid() == "no-data"]
    assert plot._per_task(iter([500, 0, 500])) == " (500/task, all)"  # points of both kinds: both named
    # The x-axis spans the steps of the other panels, so CORE lines up with HellaSwag and the losses.
    assert figs["core"].axes[0].get_xlim() == figs["training_loss"].axes[0].get_xlim()


def test_core_panel_draws_the_gpt2_leaderboard_references_and_says_no_data_without_core(resumed_run, core_run):
    references = {0.1139: "GPT-2 124M", 0.1849: "GPT-2 355M", 0.2146: "GPT-2 774M", 0.2565: "GPT-2 1.5B"}
    for run in (plot.load_run(resumed_run[0]), plot.load_run(core_run[0])):
        ax = plot.build_figures([run])["core"].axes[0]
        base = {ln.get_ydata()[0]: ln.get_label() for ln in ax.get_lines() if str(ln.get_gid()).startswith("baseline/")}
        assert base == {v: f"{name}, leaderboard, not measured here ({v})" for v, name in references.items()}
        lo, hi = ax.get_ylim()
        assert all(lo < v < hi for v in base)
        assert set(base.values()) <= set(_legend(ax))
        no_data = [t.get_text() for t in ax.texts if t.get_gid() == "no-data"]
        assert no_data == (["no data: no CORE evaluations yet"] if run.name == "resumed" else [])


def test_partial_core_is_never_drawn_or_summarised_as_core(core_run, tmp_path):
    log, full, _ = core_run
    run = plot.load_run(log)
    ax = plot.build_figures([run])["core"].axes[0]
    core_values = [
        y
        for ln in ax.get_lines()
        if str(ln.get_gid()).startswith("corerun/") and "partial" not in ln.get_gid()
        for y in ln.get_ydata()
    ]
    assert sorted(core_values) == sorted([*full.values(), 0.071])  # neither 0.5 nor 0.6
    # Named by task set: the loop's records are over 2 tasks, core.py's row over 1.
    loop, script = (_line(ax.figure, f"corerun/{k}") for k in ("core_partial/2of22", "results_core_partial/1of22"))
    assert (list(loop.get_xdata()), list(loop.get_ydata())) == ([120], [0.5])
    assert (list(script.get_xdata()), list(script.get_ydata())) == ([120], [0.6])
    assert all(ln.get_label().startswith("CORE-PARTIAL") for ln in (loop, script))
    (row,) = _parse_table(plot.summarize([run]))
    assert row["CORE"] == "0.0710"  # core.py's full-set score, the best CORE: not 0.5 or 0.6
    # A run with only partial scores: its best partial, marked so, in the CORE column; no CORE curve.
    records = _segment(0, 60, T0, seed=13) + [_core_record(30, None, 0.03), _core_record(60, None, 0.04)]
    partial_run = plot.load_run(_run_dir(tmp_path, "partial", records))
    (row,) = _parse_table(plot.summarize([partial_run]))
    assert row["CORE"] == "0.0400 (partial: 2 of 22 tasks, 500/task)"
    fig = plot.build_figures([partial_run])["core"]
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "partial/core"]
    assert list(_line(fig, "partial/core_partial/2of22").get_ydata()) == [0.03, 0.04]


def test_summary_core_column_says_when_a_score_is_on_a_subset_and_notes_the_references(core_run):
    log, full, _ = core_run
    table = plot.summarize([plot.load_run(log)])
    assert max(full.values()) < 0.071 and _parse_table(table)[0]["CORE"] == "0.0710"
    (log / "core_results.jsonl").unlink()  # then the training loop's best, on 500 examples per task, says so
    (row,) = _parse_table(plot.summarize([plot.load_run(log)]))
    assert row["CORE"] == f"{max(full.values()):.4f} (500/task)"
    note = table.split("\n\n")[1]
    assert "CORE-PARTIAL" in note and "124M 0.1139" in note and "leaderboard, not measured here" in note


TASK_LABELS = [task.label for task in core_eval.TASKS]


def _over(record, labels):
    """A CORE record (training loop's or core.py's) over `labels` only: its "tasks" keys, as logged."""
    template = next(iter(record["tasks"].values()))
    return {**record, "tasks": dict.fromkeys(labels, template)}


def _run_series(ax, run_name):
    """The lines of one run in a panel (not the levels or references)."""
    return [ln for ln in ax.get_lines() if str(ln.get_gid()).startswith(f"{run_name}/")]


def _joined(ax, run_name):
    """The x values of each of a run's lines drawn with a line between its points."""
    return [list(ln.get_xdata()) for ln in _run_series(ax, run_name) if ln.get_linestyle() != "None"]


@pytest.fixture
def export_run(tmp_path):
    """The walkthrough's run: CORE-PARTIAL in the loop over 18 tasks (4 task files missing), then, after a
    resume with fewer files, over 3; core.py scored the final checkpoint over the 18 tasks (-0.015, no
    step: a level, still the run's) and its Hugging Face export over 3 (0.050: a level, not the run's)."""
    eighteen, three = TASK_LABELS[:18], TASK_LABELS[:3]
    records = _segment(0, 60, T0, seed=16) + [
        _over(_core_record(20, None, -0.03), eighteen),
        _over(_core_record(40, None, -0.02), eighteen),
        _over(_core_record(60, None, 0.04), three),
    ]
    log = _run_dir(tmp_path, "exportrun", records)
    results = [
        _over(_core_result("exportrun/model_final.pt", None, None, partial=-0.015, max_per_task=500), eighteen),
        _over(_core_result(None, None, None, partial=0.050, max_per_task=500, model="exportrun/hf"), three),
    ]
    _write(log / "core_results.jsonl", results)
    return log


def test_core_partial_scores_over_different_task_sets_are_never_one_series(export_run):
    run = plot.load_run(export_run)
    figs = plot.build_figures([run])
    n_tasks_at = {20: 18, 40: 18, 60: 3}  # the loop's records: step -> tasks its mean is over
    for fig_name in ("core", "overview"):
        fig = figs[fig_name]
        ax = next(a for a in fig.axes if a.get_title().startswith("CORE"))
        task_sets_per_line = [len({n_tasks_at[x] for x in xs}) for xs in _joined(ax, "exportrun")]
        assert task_sets_per_line and set(task_sets_per_line) == {1}  # no line joins two task sets
        partial_entries = [text for text in _legend(ax) if "PARTIAL" in text]
        assert len(partial_entries) == 4 and all(" of 22 tasks" in text for text in partial_entries)
        # The title does not claim 22 tasks for what is drawn.
        assert ax.get_title() == plot.CORE_AND_PARTIAL_TITLE == "CORE and CORE-PARTIAL (task counts in the legend)"
        # One series per task set: the 18-task points joined, the 3-task point apart, each named by its count.
        wide, narrow = (_line(fig, f"exportrun/core_partial/{n}of22") for n in (18, 3))
        assert (list(wide.get_xdata()), list(wide.get_ydata())) == ([20, 40], [-0.03, -0.02])
        assert (list(narrow.get_xdata()), list(narrow.get_ydata())) == ([60], [0.04])
        assert wide.get_label() == "CORE-PARTIAL, 18 of 22 tasks, training loop (500/task)"
        assert narrow.get_label() == "CORE-PARTIAL, 3 of 22 tasks, training loop (500/task)"
        assert len(_run_series(ax, "exportrun")) == 2  # no other series holds any of these points
        # The two levels say they are means over different tasks.
        assert _line(fig, "core_results/exportrun/model_final.pt").get_label() == (
            "exportrun/model_final.pt, core.py CORE-PARTIAL, 18 of 22 tasks (500/task) (-0.0150)"
        )
        assert _line(fig, "core_results/exportrun/hf").get_label() == (
            "exportrun/hf, core.py CORE-PARTIAL, 3 of 22 tasks (500/task) (0.0500)"
        )
    # The summary's best is among the scores over the most tasks, with their count: the 3-task 0.04
    # (and the export's 0.05, a Hugging Face model's score) are higher but over other tasks.
    (row,) = _parse_table(plot.summarize([run]))
    assert row["CORE"] == "-0.0150 (partial: 18 of 22 tasks, 500/task)"
    assert plot.CORE_TASK_COUNT == len(core_eval.TASKS) == 22


def test_core_title_says_22_tasks_only_when_every_score_drawn_is_core(resumed_run, core_run, tmp_path):
    records = _segment(0, 60, T0, seed=17) + [_core_record(30, 0.03), _core_record(60, 0.04)]
    for log, title in (
        (_run_dir(tmp_path, "fullonly", records), "CORE (DCLM, 22 tasks)"),
        (resumed_run[0], "CORE (DCLM, 22 tasks)"),  # nothing scored: only the GPT-2 references, CORE
        (core_run[0], "CORE and CORE-PARTIAL (task counts in the legend)"),  # CORE and CORE-PARTIAL points
    ):
        figs = plot.build_figures([plot.load_run(log)])
        for fig in (figs["core"], figs["overview"]):
            (ax,) = [a for a in fig.axes if a.get_title().startswith("CORE")]
            assert ax.get_title() == title, log.name


def test_partial_task_sets_of_the_same_size_are_told_apart(tmp_path):
    """Two 3-task means over different tasks: two series, numbered, never one curve."""
    records = _segment(0, 60, T0, seed=19) + [
        _over(_core_record(30, None, 0.01), TASK_LABELS[:3]),
        _over(_core_record(60, None, 0.09), TASK_LABELS[3:6]),
    ]
    fig = plot.build_figures([plot.load_run(_run_dir(tmp_path, "sets", records))])["core"]
    assert _joined(fig.axes[0], "sets") == [[30], [60]]
    first, second = (_line(fig, f"sets/core_partial/3of22-{n}") for n in (1, 2))
    assert {tuple(first.get_xdata()), tuple(second.get_xdata())} == {(30,), (60,)}
    assert {first.get_label(), second.get_label()} == {
        f"CORE-PARTIAL, 3 of 22 tasks (task set {n}), training loop (500/task)" for n in (1, 2)
    }
    assert first.get_marker() != second.get_marker()


# ---------------------------------------------------------------- the script


def test_cli_subprocess_writes_figures_and_summary(resumed_run, tmp_path):
    log = resumed_run[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), "--log-dir", str(log), "--summary"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "| run | model | steps | tokens |" in out.stdout and "| resumed | gpt2 | 200 / 200 |" in out.stdout
    assert (log / "summary.md").read_text() in out.stdout
    assert (log / "overview.png").stat().st_size > 50_000

    # Default --log-dir is ./log: none here, so a one-line message and exit code 2, no traceback.
    missing = subprocess.run(
        [sys.executable, str(ROOT / "plot.py")], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.startswith("plot.py: error: ")
    assert missing.stderr.strip().count("\n") == 0 and "log" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_without_matplotlib_plot_says_to_run_it_with_uv(tmp_path):
    """`python plot.py` with a Python that lacks matplotlib (the system one, outside the venv)."""
    code = (
        "import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot.py']; "
        "runpy.run_path('plot.py', run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        f"plot.py: error: matplotlib is not installed for {sys.executable}: run `uv run plot.py`, "
        "or activate the repo's venv first (source .venv/bin/activate)"
    )


def test_importing_plot_has_no_side_effects():
    """No pyplot (no GUI backend, no global figure state), and no torch: metrics.py is read for its format."""
    code = "import sys, plot; print('matplotlib.pyplot' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "False False\n" and out.stderr == ""
