"""`--parallel fsdp` (FSDP2) on CPU with gloo: training, evaluation and sampling like one process,
sharded DCP checkpoints that reshard (2 -> 1, 1 -> 2, FSDP <-> DDP), SIGKILL resume, an incomplete
checkpoint skipped, and every script taking a sharded checkpoint.

The runs are tests/test_train_gpt2.py's tiny setup (`BASE_FLAGS`, its pinned one-thread environment)
with `--grad-clip 0`: the gradient norm is still measured and logged, but not applied. Without the
clip, 2 FSDP ranks give one process's numbers bit for bit, so a resharded resume can be held to
that. With it, the clip factor differs: one process sums the squares of the 6.4M-entry embedding
gradient in float32 and loses up to 1e-3 of the norm (measured against float64: 1.99366 vs 1.99504
at step 1), 2 shards of half the size lose less (1.99504); the losses then differ by up to 1.05e-5
by step 20. Clipping under FSDP is covered by the Muon run in tests/test_recipe.py (clip on).

    uv run pytest tests/test_fsdp.py -q
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

import test_train_gpt2 as trainer_tests  # noqa: E402  (helpers and pinned environment of the trainer tests)

import checkpoint  # noqa: E402
import fileio  # noqa: E402

pytestmark = pytest.mark.xdist_group("fsdp_runs")  # one worker builds the module's runs once

NO_CLIP = ("--grad-clip", "0")
EVALS = ("--sample-every", "10", "--hellaswag-every", "10")  # val every 10 is in BASE_FLAGS
FSDP = ("--parallel", "fsdp")
HELLASWAG_EXAMPLES = 24  # 96 rows in 6 batches of 16: 3 per rank


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_model(path).state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def loss_gap(log_dir: Path, reference: list[float], first_step: int = 0) -> float:
    losses = trainer_tests.train_losses(log_dir)
    assert len(losses) == trainer_tests.MAX_STEPS
    return max(abs(a - b) for a, b in list(zip(losses, reference))[first_step:])


@pytest.fixture(scope="module")
def hellaswag_subset(hellaswag_val_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "subset.jsonl"
    path.write_text("".join(hellaswag_val_path.read_text().splitlines(keepends=True)[:HELLASWAG_EXAMPLES]))
    return path


def _run(data_dir: Path, work: Path, *extra: str, nproc: int = 1) -> dict:
    log_dir = work / "log"
    trainer_tests.run_ok(trainer_tests.trainer_cmd(data_dir, log_dir, *NO_CLIP, *extra, nproc=nproc), work)
    return {
        "log_dir": log_dir,
        "losses": trainer_tests.train_losses(log_dir),
        "metrics": trainer_tests.read_metrics(log_dir),
    }


@pytest.fixture(scope="module")
def one_process(data_dir, hellaswag_subset, tmp_path_factory) -> dict:
    """One process, no wrapper: the numbers FSDP must give. Checkpoints model_00005.pt ... model_final.pt."""
    return _run(data_dir, tmp_path_factory.mktemp("one"), *EVALS, "--hellaswag-data", str(hellaswag_subset))


@pytest.fixture(scope="module")
def fsdp_two(data_dir, hellaswag_subset, tmp_path_factory) -> dict:
    """2 ranks of `--parallel fsdp` (one micro-step each), val + HellaSwag + samples on."""
    return _run(
        data_dir, tmp_path_factory.mktemp("fsdp2"), *EVALS, "--hellaswag-data", str(hellaswag_subset), *FSDP, nproc=2
    )


def children(pid: int) -> list[int]:
    """The process ids `pid` started (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def of_type(metrics: list[dict], kind: str, drop: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in metrics if r["type"] == kind]


@pytest.mark.timeout(600)
def test_two_fsdp_ranks_train_evaluate_and_sample_like_one_process(one_process, fsdp_two):
    config = of_type(fsdp_two["metrics"], "config")[0]
    assert config["parallel"] == "fsdp" and config["world_size"] == 2 and config["grad_accum_steps"] == 1
    assert loss_gap(fsdp_two["log_dir"], one_process["losses"]) < 1e-6  # bitwise, measured
    # the global norm, from the shards: within the float32 error of the 1-process norm (see above)
    norms = [[r["grad_norm"] for r in of_type(run["metrics"], "train")] for run in (one_process, fsdp_two)]
    assert max(abs(a - b) / b for a, b in zip(*norms)) < 2e-3
    val = [[r["val_loss"] for r in of_type(run["metrics"], "val")] for run in (one_process, fsdp_two)]
    assert len(val[1]) == 3 and val[1] == pytest.approx(val[0], abs=1e-6)
    # every rank ran the same HellaSwag forwards (a padding one where a rank had a batch fewer) and samples
    assert of_type(fsdp_two["metrics"], "hellaswag", drop=("time",)) == of_type(
        one_process["metrics"], "hellaswag", drop=("time",)
    )
    assert of_type(fsdp_two["metrics"], "hellaswag")[0]["count"] == HELLASWAG_EXAMPLES
    samples = of_type(fsdp_two["metrics"], "sample")
    assert [r["step"] for r in samples] == [10, 20]
    assert of_type(fsdp_two["metrics"], "sample", drop=("time",)) == of_type(
        one_process["metrics"], "sample", drop=("time",)
    )

    # Sharded checkpoints: one folder per step, each rank's shard file, the index, the train state;
    # no temp folder left; the newest 3 step checkpoints kept.
    log_dir = fsdp_two["log_dir"]
    assert [p.name for _, p in checkpoint.paths(log_dir)] == [
        "model_final",
        "model_00015",
        "model_00010",
        "model_00005",
    ]
    for _, folder in checkpoint.paths(log_dir):
        assert {p.name for p in folder.iterdir()} == {
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            checkpoint.STATE_FILE,
        }
    assert not list(log_dir.glob(".model_*"))
    state = checkpoint.load_file(log_dir / "model_final", required=checkpoint.TRAINING_KEYS)
    assert state["sharded"] and state["step"] == trainer_tests.MAX_STEPS and state["config"]["parallel"] == "fsdp"
    # The same weights as one process, read from the shards (tied head stored once, still tied).
    assert (
        max_difference(weights_of(log_dir / "model_final"), weights_of(one_process["log_dir"] / "model_final.pt"))
        < 1e-6
    )
    model = checkpoint.load_model(log_dir / "model_final")
    assert model.lm_head.weight is model.transformer.wte.weight


def _resume_from(source: Path, data_dir: Path, work: Path, *extra: str, nproc: int) -> Path:
    """A fresh log dir holding only `source` (a step-10 checkpoint) and its metrics; the run resumes there."""
    log_dir = work / "log"
    log_dir.mkdir(parents=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, log_dir / source.name)
    shutil.copy(source.parent / "metrics.jsonl", log_dir / "metrics.jsonl")
    result = trainer_tests.run_ok(trainer_tests.trainer_cmd(data_dir, log_dir, *NO_CLIP, *extra, nproc=nproc), work)
    assert f"resuming from {log_dir / source.name} at step 10" in result.stdout
    return log_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["fsdp2-to-ddp2", "fsdp2-to-fsdp1", "single-to-fsdp2"])
def test_a_checkpoint_reshards_to_other_world_sizes_and_strategies(case, one_process, fsdp_two, data_dir, tmp_path):
    """Saved on N ranks, resumed on M, by the other strategy: the run continues as the M-rank run
    does (which, without clipping, is one process's run bit for bit)."""
    source, extra, nproc = {
        "fsdp2-to-ddp2": (fsdp_two["log_dir"] / "model_00010", (), 2),
        # FSDP alone (a one-rank group), with activation checkpointing (recomputed blocks: the same numbers)
        "fsdp2-to-fsdp1": (fsdp_two["log_dir"] / "model_00010", (*FSDP, "--activation-checkpointing"), 1),
        "single-to-fsdp2": (one_process["log_dir"] / "model_00010.pt", FSDP, 2),
    }[case]
    log_dir = _resume_from(source, data_dir, tmp_path, *extra, nproc=nproc)
    assert loss_gap(log_dir, one_process["losses"], first_step=10) < 1e-6
    final = next(p for s, p in checkpoint.paths(log_dir) if checkpoint.is_final(p))
    assert final.is_dir() == ("fsdp" in extra)  # the resumed run writes its own kind
    expected = "fsdp" if "fsdp" in extra else "ddp" if nproc == 2 else "single"
    assert trainer_tests.records(log_dir, "config")[-1]["parallel"] == expected
    assert max_difference(weights_of(final), weights_of(one_process["log_dir"] / "model_final.pt")) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_between_sharded_checkpoints_then_rerun_gives_the_same_weights(fsdp_two, data_dir, tmp_path):
    """kill -9 of torchrun and both ranks after the step-3 checkpoint; the same command again: the
    final weights of the uninterrupted 2-rank run, bit for bit, and each train step logged once."""
    log_dir = tmp_path / "log"
    cmd = trainer_tests.trainer_cmd(data_dir, log_dir, *NO_CLIP, *FSDP, "--ckpt-every", "3", nproc=2)
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=trainer_tests.run_env(),
        stdout=open(tmp_path / "killed.out", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        trainer_tests.wait_for(
            proc,
            lambda: (log_dir / "model_00003").is_dir() and trainer_tests.last_train_step(log_dir) >= 4,
            "the step-3 checkpoint and two more steps",
        )
    finally:
        ranks = children(proc.pid)  # torchrun starts its ranks in sessions of their own
        for pid in [*ranks, proc.pid]:  # the ranks and torchrun, as a node failure would
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and len(ranks) == 2, "the run finished before it could be killed"
    assert not (log_dir / "model_final").exists()
    result = trainer_tests.run_ok(cmd, tmp_path)
    assert "resuming from" in result.stdout
    assert max_difference(weights_of(log_dir / "model_final"), weights_of(fsdp_two["log_dir"] / "model_final")) == 0.0
    trainer_tests.assert_train_steps_once(log_dir)
    assert trainer_tests.train_losses(log_dir) == fsdp_two["losses"]


def test_an_incomplete_sharded_checkpoint_is_skipped_with_a_warning(fsdp_two, tmp_path):
    """A folder missing one rank's shard, one with a shard cut short, one without its index, and a
    temp folder of a save that was killed: --resume auto uses the newest complete checkpoint."""
    for name in ("model_00005", "model_00010", "model_00015", "model_final"):
        shutil.copytree(fsdp_two["log_dir"] / name, tmp_path / name)
    shutil.rmtree(tmp_path / "model_final")
    (tmp_path / "model_00015" / "__1_0.distcp").unlink()  # a copy that missed rank 1's file
    shard = tmp_path / "model_00010" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 1)
    shutil.copytree(tmp_path / "model_00005", tmp_path / ".model_00020.sharded.tmp")  # a save cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = checkpoint.load_latest(tmp_path)
    messages = [str(w.message) for w in caught]
    assert latest["path"] == str(tmp_path / "model_00005") and latest["step"] == 5
    assert any("model_00015 is incomplete: shard __1_0.distcp is missing" in m for m in messages), messages
    assert any("model_00010 is incomplete: shard __0_0.distcp is cut short" in m for m in messages), messages
    (tmp_path / "model_00005" / ".metadata").unlink()
    with pytest.raises(ValueError, match="no readable .metadata"):
        checkpoint.load_file(tmp_path / "model_00005")
    fileio.remove_temps(tmp_path, checkpoint.TMP_PREFIX)  # what the trainer does at start-up
    assert not (tmp_path / ".model_00020.sharded.tmp").exists()


def test_a_sharded_checkpoint_of_another_model_fails_in_one_line(fsdp_two, data_dir, tmp_path, capsys):
    """The run's --model and the checkpoint's, both named (a preset edited since the run, here)."""
    log_dir = tmp_path / "log"
    shutil.copytree(fsdp_two["log_dir"] / "model_00010", log_dir / "model_00010")
    state_file = log_dir / "model_00010" / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["model_config"] = {**state["model_config"], "n_layer": 2}
    torch.save(state, state_file)
    code, err = trainer_tests._main_in_process(
        [*trainer_tests.BASE_FLAGS, *NO_CLIP, "--data-dir", str(data_dir), "--log-dir", str(log_dir)], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "model_00010 holds another model" in lines[0] and "'n_layer': 2" in lines[0] and "--model tiny" in lines[0]


@pytest.mark.timeout(300)
def test_every_script_takes_a_sharded_checkpoint(fsdp_two, tmp_path):
    """export_hf.py turns the folder into a transformers model with our logits (< 1e-4); sample.py
    and hellaswag.py read it as they read a .pt."""
    from transformers import GPT2LMHeadModel

    folder = fsdp_two["log_dir"] / "model_final"
    out_dir = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "export_hf.py", "--checkpoint", str(folder), "--out-dir", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=trainer_tests.run_env(),
    )
    assert export.returncode == 0, export.stderr
    ours, hf = checkpoint.load_model(folder), GPT2LMHeadModel.from_pretrained(out_dir).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
    sample = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--checkpoint",
            str(folder),
            "--max-new-tokens",
            "8",
            "--num-samples",
            "1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=trainer_tests.run_env(),
    )
    assert sample.returncode == 0 and sample.stdout.strip(), sample.stderr
    read = checkpoint.read_step(folder)
    assert read == trainer_tests.MAX_STEPS
    assert json.loads(json.dumps(checkpoint.load_file(folder)["model_config"]))["n_layer"] == 4


def test_memory_formula_counts_the_model_built_on_the_meta_device():
    """memory.py (bench/memory_table.py's table, the trainer's check): parameter counts from shapes
    alone, model state sharded by N under FSDP, activation checkpointing cutting activations, the
    optimizer step's temporary on the CPU. (Its predictions against real CPU steps are in
    BENCHMARKS.md: within 10%.)"""
    import memory as memory_table
    from model import GPT, GPTConfig
    from train_config import MODEL_PRESETS

    counts = memory_table.parameter_counts("tiny")
    real = GPT(GPTConfig(**MODEL_PRESETS["tiny"]))
    assert counts["total"] == real.num_params() and counts["block"] == sum(
        p.numel() for p in real.transformer.h[0].parameters()
    )
    assert memory_table.parameter_counts("gpt2")["total"] == 124_475_904  # GPT-2 124M with the vocab padded to 50,304
    ddp = memory_table.memory_bytes("gpt2-xl", "ddp", False, 8, 1024, gpus=8)
    fsdp = memory_table.memory_bytes("gpt2-xl", "fsdp", False, 8, 1024, gpus=8)
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] * 8 == ddp[part]
    assert ddp["ddp_buckets"] == ddp["gradients"] and fsdp["ddp_buckets"] == 0
    assert fsdp["activations"] == ddp["activations"]  # FSDP shards the model state, not the activations
    checkpointed = memory_table.memory_bytes("gpt2-xl", "fsdp", True, 8, 1024, gpus=8)
    assert checkpointed["activations"] < fsdp["activations"] / 5
    cpu = memory_table.memory_bytes("gpt2-medium", "ddp", True, 1, 1024, gpus=1, precision="fp32")
    assert cpu["total"] == 20 * memory_table.parameter_counts("gpt2-medium")["total"]  # the optimizer step's peak
