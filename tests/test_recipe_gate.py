"""bench/recipe_gate.py's arithmetic: the pass criterion, the tokens-to-target interpolation, the
hold-out split and the run-folder naming that lets an interrupted gate continue. The gate's
training runs themselves are a benchmark (~65 min on 2 cores), not a CI test."""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gate():
    spec = importlib.util.spec_from_file_location("recipe_gate", ROOT / "bench" / "recipe_gate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_gate"] = module
    spec.loader.exec_module(module)
    return module


def runs(recipe, finals, tokens, curves):
    return [
        {"recipe": recipe, "seed": i + 1, "final": f, "tokens": tokens, "curve": c}
        for i, (f, c) in enumerate(zip(finals, curves))
    ]


def test_mean_and_standard_error_match_the_statistics_module(gate):
    values = [6.7787, 6.8231, 6.8012]
    mean, stderr = gate.mean_and_stderr(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / math.sqrt(3))
    assert math.isnan(gate.mean_and_stderr([1.0])[1])  # one seed: no noise estimate, never a pass by accident


def test_tokens_to_reach_interpolates_between_evaluations(gate):
    curve = [(0, 10.0), (100, 8.0), (200, 6.0)]
    assert gate.tokens_to_reach(curve, 7.0) == pytest.approx(150.0)
    assert gate.tokens_to_reach(curve, 8.0) == pytest.approx(100.0)
    assert gate.tokens_to_reach(curve, 5.9) is None


def test_gate_passes_only_when_every_fast_seed_is_below_mean_minus_two_stderr(gate):
    base_curves = [[(0, 10.0), (1000, f)] for f in (6.80, 6.82, 6.78)]
    baseline = runs("baseline", [6.80, 6.82, 6.78], 1000, base_curves)
    _, stderr = gate.mean_and_stderr([6.80, 6.82, 6.78])
    threshold = 6.80 - 2 * stderr

    good = runs("fast", [6.5, 6.55, 6.6], 769, [[(0, 10.0), (400, 6.8), (769, f)] for f in (6.5, 6.55, 6.6)])
    summary = gate.summarise(None, {"baseline": baseline, "fast": good})
    assert summary["threshold"] == pytest.approx(threshold)
    assert summary["passed"] is True
    assert summary["fast"]["tokens_to_target"] == pytest.approx(400.0)
    assert summary["token_saving"] == pytest.approx(1000 / 400)

    # one seed between the threshold and the baseline mean fails the whole gate
    one_bad = runs(
        "fast", [6.5, threshold + 0.001, 6.6], 769, [[(0, 10.0), (769, f)] for f in (6.5, threshold + 0.001, 6.6)]
    )
    assert gate.summarise(None, {"baseline": baseline, "fast": one_bad})["passed"] is False


def test_hold_out_is_fixed_whatever_the_document_order(gate):
    ids = [f"<urn:uuid:{i:04d}>" for i in range(200)]
    held = gate.held_out_ids(ids, 0.1)
    assert len(held) == 20 and held == gate.held_out_ids(list(reversed(ids)), 0.1)


def test_run_folder_ignores_checkpoint_flags_but_not_settings(gate, tmp_path):
    cfg = gate.GateConfig()
    flags = gate.run_flags(cfg, "baseline", 1)
    same = list(flags)
    i = same.index("--ckpt-every")
    same[i + 1] = "7"  # how often a run checkpoints changes no number: a killed run is resumed, not redone
    assert gate.run_dir(tmp_path, "baseline", 1, flags) == gate.run_dir(tmp_path, "baseline", 1, same)
    assert gate.run_dir(tmp_path, "baseline", 1, flags) != gate.run_dir(
        tmp_path, "baseline", 2, gate.run_flags(cfg, "baseline", 2)
    )
    other_lr = gate.run_flags(gate.GateConfig(baseline_lr=3e-3), "baseline", 1)
    assert gate.run_dir(tmp_path, "baseline", 1, flags) != gate.run_dir(tmp_path, "baseline", 1, other_lr)
