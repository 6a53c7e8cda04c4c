"""The precision a run computes in, chosen by what the card does natively, and fp16 done right.

- `--precision auto`: bf16 on GPUs with bf16 matrix units (NVIDIA sm80+, AMD MI200+), fp16 with loss
  scaling on older ones (V100 sm70, T4 sm75), fp32 on CPU and MPS; bf16 asked for on a card that only
  emulates it is refused in one line; a GPU the installed torch has no kernels for is refused at start.
  The card is faked (its compute capability, its architecture list): no GPU runs here.
- fp16 on the CPU, for real (CPU autocast computes float16): single process, DDP and FSDP2 on gloo,
  losses next to fp32's; an overflow in one rank's gradient shard skips that step on every rank and
  halves the scale; SIGKILL and resume give the uninterrupted weights, the scale in the checkpoint;
  logits near fp16's range stay finite in the loss, the scorer and the sampler.
- Without Triton, --compile runs eager with one warning.
"""

from __future__ import annotations

import json
import math
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

import test_train_gpt2 as trainer_tests  # noqa: E402

import checkpoint  # noqa: E402
import muon  # noqa: E402
import runtime  # noqa: E402
import train_gpt2  # noqa: E402
from model import GPT, GPTConfig, generate  # noqa: E402
from scoring import score_all  # noqa: E402
from train_config import TrainConfig  # noqa: E402

CUDA = torch.device("cuda", 0)
FP16 = ("--precision", "fp16")
STEPS = 12  # of BASE_FLAGS' tiny run: enough to compare curves, a few seconds a step on 2 cores


# ---- which precision, on which card ----------------------------------------------------------------
def fake_card(monkeypatch, capability=(9, 0), name="NVIDIA H100 80GB HBM3", hip_arch=None, arches=None):
    """torch.cuda answering as one card would (the host-side calls only: no tensor is made)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", "6.2" if hip_arch else None)
    if hip_arch:

        class Properties:
            gcnArchName = hip_arch

        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Properties())
    if arches is not None:
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches)


@pytest.mark.parametrize(
    "capability, name, expected",
    [
        ((7, 0), "Tesla V100-SXM2-32GB", "fp16"),
        ((7, 5), "Tesla T4", "fp16"),
        ((8, 0), "NVIDIA A100-SXM4-80GB", "bf16"),
        ((8, 9), "NVIDIA GeForce RTX 4090", "bf16"),
        ((9, 0), "NVIDIA H100 80GB HBM3", "bf16"),
    ],
)
def test_auto_precision_is_what_the_card_computes_natively(monkeypatch, capability, name, expected):
    fake_card(monkeypatch, capability, name)
    chosen = runtime.precision(CUDA, "auto")
    assert chosen.name == expected and chosen.scaled == (expected == "fp16")
    assert runtime.half_dtype(CUDA) == (torch.bfloat16 if expected == "bf16" else torch.float16)  # Muon's


@pytest.mark.parametrize(
    "arch, expected", [("gfx906", "fp16"), ("gfx908", "fp16"), ("gfx90a:sramecc+:xnack-", "bf16"), ("gfx942", "bf16")]
)
def test_auto_precision_on_amd_cards(monkeypatch, arch, expected):
    fake_card(monkeypatch, name="AMD Instinct", hip_arch=arch)
    assert runtime.precision(CUDA, "auto").name == expected


def test_auto_precision_off_cuda_and_explicit_requests():
    assert runtime.precision(torch.device("cpu")).name == "fp32"
    assert runtime.precision(torch.device("mps")).name == "fp32"
    assert runtime.precision(torch.device("cpu"), "fp16").scaled  # CUDA's fp16 policy, asked for on a CPU
    assert runtime.half_dtype(torch.device("cpu")) == torch.bfloat16  # the CPU's numbers the goldens pin
    with pytest.raises(ValueError, match="--precision"):
        runtime.precision(torch.device("cpu"), "fp8")


def test_bf16_on_a_card_that_only_emulates_it_is_refused_in_one_line(monkeypatch):
    fake_card(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(ValueError) as refused:
        runtime.precision(CUDA, "bf16")
    message = str(refused.value)
    assert "Tesla T4" in message and "--precision auto" in message and "\n" not in message
    fake_card(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert runtime.precision(CUDA, "bf16").name == "bf16"


def test_a_gpu_the_installed_torch_was_not_built_for_is_refused_in_one_line(monkeypatch):
    cuda13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    fake_card(monkeypatch, (7, 0), "Tesla V100-SXM2-32GB", arches=cuda13)
    with pytest.raises(ValueError) as refused:
        runtime.check_cuda_build(CUDA)
    message = str(refused.value)
    assert "Tesla V100-SXM2-32GB (sm_70)" in message and "sm_75" in message
    assert "uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/cu126" in message
    for card in ((7, 5), (9, 0), (12, 1)):  # built for, or reachable through compute_120's PTX
        fake_card(monkeypatch, card, arches=cuda13)
        runtime.check_cuda_build(CUDA)
    fake_card(monkeypatch, (12, 0), arches=["sm_70", "sm_75", "sm_80", "sm_90"])  # a Blackwell, an old torch
    with pytest.raises(ValueError, match="install a newer torch"):
        runtime.check_cuda_build(CUDA)


def test_without_triton_compile_runs_eager_with_one_warning(monkeypatch):
    """Native Windows and some clusters have no Triton: inductor cannot make GPU kernels there."""
    monkeypatch.setitem(sys.modules, "triton", None)  # what importlib finds for a module that is not there
    with pytest.warns(UserWarning, match="--compile needs Triton") as caught:
        assert runtime.compiles(CUDA, True) is False
    assert len(caught) == 1
    assert runtime.compiles(torch.device("cpu"), True, on_cpu=True)  # inductor's C++ backend needs no Triton


# ---- fp16 on the CPU, for real -----------------------------------------------------------------------
def logits_near_fp16_range(model: GPT) -> GPT:
    """The model with its output layer scaled so that logits reach ~3e4 (fp16's largest is 65,504)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(3e4 / model(torch.zeros(1, 4, dtype=torch.long))[0].abs().max())
    return model


def test_loss_scorer_and_sampler_stay_finite_with_logits_near_fp16s_range():
    torch.manual_seed(0)
    model = logits_near_fp16_range(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)))
    idx, targets = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    reference = model(idx, targets)[1]
    fp16 = runtime.autocast(torch.device("cpu"), "fp16")
    for chunk_rows in (0, 8):  # the plain loss and the chunked one
        model.loss_chunk_rows = chunk_rows
        with fp16:
            loss = model(idx, targets)[1]
        assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=1e-2)
    cpu = runtime.DistInfo(0, 0, 1, torch.device("cpu"), True)
    scores = score_all(model, [idx[0].tolist(), idx[1].tolist()], [3, 5], cpu, autocast=fp16)
    assert all(math.isfinite(x) for x in scores.logprob)
    rows = generate(
        model, [1, 2, 3], 4, num_samples=2, top_k=5, generator=torch.Generator().manual_seed(0), autocast=fp16
    )
    assert len(rows) == 2 and all(0 <= t < 50257 for row in rows for t in row)


def test_newton_schulz_in_fp16_orthogonalises():
    """Muon on a GPU without bf16 units runs its iteration in fp16 (runtime.half_dtype)."""
    grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(muon.newton_schulz(grad, dtype=torch.float16).float())
    assert 0.5 < singular.min() and singular.max() < 1.3


def overflow_worker(out_path: str, strategy: str, data_dir: str) -> None:
    """One of 2 gloo ranks (torchrun's environment): fp16 steps 0..3 of the tiny run; at step 2 rank 1
    alone finds an inf in its own gradient shard (what fp16 overflow leaves, here after unscaling).
    Saves, per step on this rank: whether it was skipped, the scale after it, and whether the
    weights changed."""
    dist_info = runtime.setup_distributed("cpu")
    cfg = TrainConfig(**{**tiny_fp16(data_dir), "parallel": strategy})
    run = train_gpt2.build_run(cfg, dist_info)
    unscale = run.scaler.unscale_
    log = []
    for step in range(4):

        def unscale_then_overflow(parameters, step=step):
            parameters = list(parameters)
            unscale(parameters)
            if step == 2 and dist_info.rank == 1:
                runtime.local_part(parameters[-1].grad).view(-1)[0] = float("inf")

        run.scaler.unscale_ = unscale_then_overflow
        before = [runtime.local_part(p).detach().clone() for p in run.model.parameters()]
        result = train_gpt2.train_step(run, step)
        moved = any(not torch.equal(b, runtime.local_part(p)) for b, p in zip(before, run.model.parameters()))
        log.append({"skipped": result.skipped, "scale": run.scaler.scale, "moved": moved})
    Path(f"{out_path}.{dist_info.rank}").write_text(json.dumps(log))
    runtime.teardown_distributed()


def tiny_fp16(data_dir: str) -> dict:
    return dict(
        model="tiny",
        data_dir=data_dir,
        micro_batch_size=2,
        seq_len=32,
        tokens_per_step=128,
        device="cpu",
        compile=False,
        val_every=0,
        precision="fp16",
        spike_guard=0.0,  # the scaler alone decides: the step must still sync and agree
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_overflow_in_one_ranks_gradient_shard_skips_the_step_on_every_rank(strategy, data_dir, tmp_path):
    out = tmp_path / "overflow.json"
    code = f"import test_precision as t; t.overflow_worker({str(out)!r}, {strategy!r}, {str(data_dir)!r})"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python"]
    result = subprocess.run(
        [*torchrun, sys.executable, "-c", code],
        cwd=TESTS,
        env={**trainer_tests.run_env(), "PYTHONPATH": f"{ROOT}:{TESTS}"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for log in ranks:
        assert [s["skipped"] is not None for s in log] == [False, False, True, False]  # both ranks skip step 2
        assert [s["moved"] for s in log] == [True, True, False, True]  # and apply the others
        assert [s["scale"] for s in log] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]  # the scale halved once
        assert "fp16 gradients overflowed" in log[2]["skipped"]


@pytest.fixture(scope="module")
def fp32_and_fp16_runs(data_dir, tmp_path_factory) -> dict:
    """The tiny run in fp32 and in fp16 (single process), STEPS steps each: their losses."""
    runs = {}
    for name, extra in (("fp32", ()), ("fp16", FP16)):
        work = tmp_path_factory.mktemp(name)
        trainer_tests.run_ok(trainer_tests.trainer_cmd(data_dir, work / "log", "--max-steps", str(STEPS), *extra), work)
        runs[name] = {"log_dir": work / "log", "losses": trainer_tests.train_losses(work / "log")}
    return runs


@pytest.mark.xdist_group("fp16_runs")  # one worker makes the module's fp32 and fp16 runs once
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_fp16_trains_like_fp32_in_one_process_ddp_and_fsdp(strategy, fp32_and_fp16_runs, data_dir, tmp_path):
    """fp16 autocast with loss scaling follows fp32's loss curve (fp16's 10 mantissa bits: ~1e-3 apart),
    in one process and on 2 gloo ranks under DDP and FSDP2 (fp16 gathered weights, fp32 reductions)."""
    fp32 = fp32_and_fp16_runs["fp32"]["losses"]
    if strategy == "single":
        losses = fp32_and_fp16_runs["fp16"]["losses"]
    else:
        flags = ("--max-steps", str(STEPS), *FP16, "--parallel", strategy)
        trainer_tests.run_ok(trainer_tests.trainer_cmd(data_dir, tmp_path / "log", *flags, nproc=2), tmp_path)
        losses = trainer_tests.train_losses(tmp_path / "log")
    assert len(losses) == STEPS and max(abs(a - b) for a, b in zip(losses, fp32)) < 0.02, (losses, fp32)
    config = trainer_tests.records(
        tmp_path / "log" if strategy != "single" else fp32_and_fp16_runs["fp16"]["log_dir"], "config"
    )
    assert config[0]["config"]["precision"] == "fp16"
    print(f"{strategy} fp16 losses: {[round(x, 4) for x in losses]}; fp32: {[round(x, 4) for x in fp32]}")


@pytest.mark.xdist_group("fp16_runs")  # one worker makes the module's fp32 and fp16 runs once
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_and_resume_of_an_fp16_run_gives_the_uninterrupted_weights(fp32_and_fp16_runs, data_dir, tmp_path):
    straight = fp32_and_fp16_runs["fp16"]["log_dir"]
    log_dir = tmp_path / "log"
    cmd = trainer_tests.trainer_cmd(data_dir, log_dir, "--max-steps", str(STEPS), *FP16)
    proc = trainer_tests.start(cmd, tmp_path, tmp_path / "killed.out")
    try:
        trainer_tests.wait_for(proc, lambda: trainer_tests.last_train_step(log_dir) >= 7, "train step 7")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    saved = checkpoint.load_file(log_dir / "model_00005.pt", required=checkpoint.TRAINING_KEYS)
    assert saved["loss_scale"] == {"scale": 2.0**16, "good_steps": 5}  # the scaler is a part of the checkpoint
    result = trainer_tests.run_ok(cmd, tmp_path)
    assert "resuming from" in result.stdout
    final = {
        name: torch.load(d / "model_final.pt", weights_only=True)["model"]
        for name, d in (("a", log_dir), ("b", straight))
    }
    trainer_tests.assert_same_weights(final["a"], final["b"])


def test_a_checkpoint_without_a_loss_scale_resumes_in_fp16_with_a_fresh_scale():
    """A bf16 run's checkpoint (or one from before fp16 runs) moved to a V100: the scaler starts afresh."""
    scaler = runtime.LossScaler(enabled=True)
    assert getattr(scaler, "fresh_if_missing", False)
    scaler.load_state_dict({"scale": 8.0, "good_steps": 3})
    assert (scaler.scale, scaler.good_steps) == (8.0, 3)
    off = runtime.LossScaler(enabled=False)
    off.load_state_dict({"scale": 8.0, "good_steps": 3})  # an fp16 checkpoint resumed in bf16: nothing to scale
    assert off.scale == 1.0 and off.update(float("inf")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.LossScaler(enabled=True).update(1.0) is None
