"""Apple silicon's GPU (torch's MPS backend), run on the CPU (tests/fake_cuda.py's fake_mps: a Mac with
MPS and no CUDA): every entry point on fake MPS tensors, so a CPU tensor meeting an MPS one, a float64
MPS tensor (Metal has none) or a CUDA-only call fails here and not on the first Mac; and the one-line
answers to what MPS lacks (torchrun's ranks, torch.compile, the device itself on another machine).
None of it has run on a Mac.

Entry points: device auto-detection, the training step (plain and chunked loss, AdamW and Muon),
validation, HellaSwag, CORE and samples through the trainer's Evaluator, generate, train_gpt2.main
(a CPU-written checkpoint resumed on MPS with every evaluation and checkpoints, then an MPS-written one
resumed on MPS), sample.py, hellaswag.py, core.py, export_hf.py and bench/throughput.py.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from unittest import mock

import pytest
import test_cuda_paths as cuda_tests
import torch
from conftest import HELLASWAG_FIXTURE
from fake_cuda import (
    MPS_RECOMMENDED_MAX_MEMORY,
    RNG_STATE_BYTES,
    DeviceMismatch,
    fake_device,
    fake_mps,
    is_fake,
)
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import cli
import core
import core_eval
import evals
import export_hf
import hellaswag
import memory
import runtime
import sample
import train_gpt2
from bench import throughput
from hellaswag_eval import load_examples
from model import GPT, GPTConfig, generate
from train_gpt2 import TrainConfig, build_run, train_step

ROOT = Path(__file__).resolve().parent.parent
MPS = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("mps"), is_main=True)
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
MPS_NAME = runtime.device_name(torch.device("mps"))
MPS_OUT_OF_MEMORY = (
    "MPS backend out of memory (MPS allocated: 9.07 GB, other allocations: 1.20 GB, max allowed: 10.67 GB). "
    "Tried to allocate 256.00 MB on private pool."
)


def tiny_config(data_dir, **overrides) -> TrainConfig:
    """The trainer's tiny preset at 2 x 32 tokens, 2 micro-steps per step, as a Mac run would set it."""
    return cuda_tests.tiny_config(data_dir, **{"device": "mps", **overrides})


def on_mps(tensor: torch.Tensor) -> bool:
    return is_fake(tensor) and tensor.device.type == "mps"


class MatmulDtypes(TorchDispatchMode):
    """The dtypes the matrix products of a block run in (under the fake mode: nothing is computed)."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.seen.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def stand_in_core_data(root: Path) -> Path:
    return core_eval.stand_in_data_dir(root, ROOT / "tests" / "data" / "core")  # scores mean nothing


# ---- the kit itself ------------------------------------------------------------------------------
def test_the_kit_fails_where_a_mac_would():
    real_cpu = torch.ones(3)  # made outside: a loader's batch, a checkpoint's weights
    with fake_mps():
        assert runtime.mps_available() and not torch.cuda.is_available()
        x = torch.ones(3, device="mps")
        for mixed in (
            lambda: x + real_cpu,
            lambda: x + torch.ones(3),
            lambda: torch.cat([x, torch.ones(3)]),
            lambda: torch.nn.functional.embedding(torch.zeros(2, dtype=torch.long), x.view(3, 1)),
        ):
            with pytest.raises(DeviceMismatch):
                mixed()
        assert on_mps(x + torch.tensor(2.0))  # a CPU scalar may mix, as on a real GPU
        assert on_mps(real_cpu.to("mps", non_blocking=True)) and real_cpu.to("mps").device == torch.device("mps", 0)
        probabilities = torch.softmax(torch.ones(2, 5, device="mps"), dim=-1)
        with pytest.raises(DeviceMismatch):
            torch.multinomial(probabilities, 1, generator=torch.Generator())  # a CPU generator, MPS draws
        assert on_mps(torch.multinomial(probabilities, 1, generator=torch.Generator(device="mps")))
        for float64 in (lambda: torch.zeros(2, dtype=torch.float64, device="mps"), lambda: x.double()):
            with pytest.raises(TypeError, match="float64"):  # Metal has no float64
                float64()
        assert x.cpu().double().dtype == torch.float64  # on the host it may
        with torch.autocast("mps", dtype=torch.float16):  # MPS's autocast, not CUDA's
            assert (x.view(1, 3) @ x.view(3, 1)).dtype == torch.float16
        layer = torch.nn.Linear(3, 2, device="mps")  # autograd records MPS tensors (a Linux build cannot)
        layer(x).sum().backward()
        assert on_mps(layer.weight.grad)
        state = torch.mps.get_rng_state()
        assert state.dtype == torch.uint8 and state.numel() == RNG_STATE_BYTES["mps"] and not is_fake(state)
        with pytest.raises(TypeError):
            torch.mps.set_rng_state(state.to(torch.int64))
    assert not runtime.mps_available()  # the patches are gone
    with pytest.raises(RuntimeError, match="not linked with support for mps"):  # and so is the lent guard
        torch.ones(1).to("mps")


# ---- choosing the device -------------------------------------------------------------------------
def test_auto_picks_cuda_then_mps_then_cpu():
    cuda_too = (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
    )
    with fake_mps():
        assert runtime.resolve_device("auto") == torch.device("mps")
        assert runtime.resolve_device("mps") == torch.device("mps")
        assert runtime.resolve_device("cpu") == torch.device("cpu")
        with cuda_too[0], cuda_too[1]:
            assert runtime.resolve_device("auto") == torch.device("cuda", 0)  # both there: CUDA first
    no_mps = mock.patch("torch.backends.mps.is_available", return_value=False)
    with no_mps, mock.patch("torch.cuda.is_available", return_value=False):
        assert runtime.resolve_device("auto") == torch.device("cpu")


def test_device_mps_without_mps_is_one_line(tiny_checkpoint, capsys):
    """--device mps on a machine without MPS (this one): exit 2, one line naming --device cpu."""
    with mock.patch("torch.backends.mps.is_available", return_value=False):
        code = cli.run_main(sample.main, ["--checkpoint", str(tiny_checkpoint), "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device cpu" in err, err


def test_torchrun_with_two_ranks_on_mps_is_one_line():
    """torch has no MPS backend for collectives: refused before any process group is made."""
    with fake_mps(), mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}):
        for flag in ("mps", "auto"):
            with pytest.raises(cli.UserError) as refused:
                runtime.setup_distributed(flag)
            assert "\n" not in str(refused.value) and "--device cpu" in str(refused.value)
    assert not torch.distributed.is_initialized()


def test_fsdp_on_mps_is_one_line(data_dir, tmp_path, capsys):
    """FSDP2 runs collectives even for one rank, and gloo takes no MPS tensors: refused, not a traceback
    from the first all-gather (before this change the fake run went on: nothing refused it)."""
    with fake_mps():
        code = cli.run_main(
            train_gpt2.main,
            [*trainer_flags(data_dir, tmp_path / "log"), "--device", "mps", "--max-steps", "1", "--parallel", "fsdp"],
        )
    err = capsys.readouterr().err
    assert code == 2 and "--parallel fsdp on MPS" in err and len(err.strip().splitlines()) == 1, err
    assert not torch.distributed.is_initialized()


def test_auto_precision_on_mps_is_fp32_and_fp16_when_asked(data_dir):
    """fp32 by default (MPS's autocast covers fewer ops); --precision fp16 is MPS's autocast, asked for."""
    assert runtime.precision(torch.device("mps")).dtype is None
    assert runtime.precision(torch.device("mps"), "fp16").dtype == torch.float16
    with fake_mps():
        for precision, logits_dtype in (("auto", torch.float32), ("fp16", torch.float16)):
            run = build_run(tiny_config(data_dir, val_every=0, precision=precision), MPS)
            x, _ = (t.to("mps") for t in run.train_loader.next_batch())
            with run.autocast:
                logits, _ = run.model(x)
            assert on_mps(logits) and logits.dtype == logits_dtype, precision


def test_bf16_on_a_mac_older_than_macos_14_is_one_line():
    """Metal has bf16 from macOS 14: earlier, --precision bf16 is refused naming the fix, not a Metal
    error from the first matmul; the kit's Mac runs macOS 14, where it is taken."""
    with fake_mps():
        assert runtime.precision(torch.device("mps"), "bf16").dtype == torch.bfloat16
        with mock.patch("torch.backends.mps.is_macos_or_newer", return_value=False):
            with pytest.raises(cli.UserError) as refused:
                runtime.precision(torch.device("mps"), "bf16")
            assert runtime.precision(torch.device("mps")).dtype is None  # auto is untouched
    assert "macOS 14" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_a_cuda_attention_kernel_on_mps_is_one_line(kernel, data_dir, tmp_path, capsys):
    with fake_mps():
        flags = [*trainer_flags(data_dir, tmp_path / "log"), "--device", "mps", "--max-steps", "1"]
        code = cli.run_main(train_gpt2.main, [*flags, "--attn-backend", kernel])
    err = capsys.readouterr().err
    assert code == 2 and f"--attn-backend {kernel}" in err and len(err.strip().splitlines()) == 1, err


# ---- the trainer's entry points --------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("loss_chunk_rows", [0, 32])
def test_training_step_on_mps(data_dir, optimizer, loss_chunk_rows):
    """Also what MPS lacks: no fused AdamW (its single-tensor path), no pinned batches (unified memory,
    and the loader's pin_memory warning), Muon's Newton-Schulz in float32 (bf16 needs macOS 14, and the
    M1 has no bf16 units: the old code cast to bf16 on every device)."""
    with fake_mps() as host, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = build_run(tiny_config(data_dir, optimizer=optimizer, loss_chunk_rows=loss_chunk_rows, val_every=0), MPS)
        assert all(on_mps(p) for p in run.model.parameters()) and on_mps(run.model.vocab_bias)
        for step in range(2):
            loss, grad_norm, lr, skipped = train_step(run, step)
        assert on_mps(loss) and on_mps(grad_norm) and skipped is None
        states = [s for opt in checkpoint.optimizer_parts(run.optimizer).values() for s in opt.state.values()]
        assert states and all(on_mps(t) for s in states for t in s.values() if isinstance(t, torch.Tensor) and t.dim())
        assert not run.fused_adamw and not run.train_loader.pin_memory and host.pinned == 0
        if optimizer == "muon":
            x, y = (t.to("mps") for t in run.train_loader.next_batch())
            run.model(x, y)[1].backward()
            with MatmulDtypes() as newton_schulz:
                checkpoint.optimizer_parts(run.optimizer)["muon"].step()
            assert newton_schulz.seen == {torch.float32}, newton_schulz.seen
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_validation_hellaswag_core_and_samples_on_mps(data_dir, tmp_path):
    """Validation fails on the code before this change (its float64 sums on the device)."""
    examples = load_examples(HELLASWAG_FIXTURE, limit=6, verify=False)
    suite = evals.load_core(str(stand_in_core_data(tmp_path / "core")), max_per_task=12, verify=False)
    with fake_mps() as host:
        run = build_run(tiny_config(data_dir, val_every=1), MPS, hellaswag=examples, core=suite)
        assert isinstance(run.evals.validation_loss(), float)
        assert run.evals.hellaswag_scores()["count"] == 6
        assert run.evals.core_scores()["count"] > 0
        texts = run.evals.samples(10, num_samples=2, max_new_tokens=5)
        assert len(texts) == 2 and all(t.startswith(run.cfg.sample_prompt) for t in texts)
    assert host.pinned == 0  # the scorer pins its batches for CUDA only


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_generate_on_mps_under_fp16_autocast(use_kv_cache):
    """generate's tokens and draws on the model's device, under MPS's autocast (--precision fp16)."""
    with fake_mps():
        with torch.device("mps"):
            model = GPT(TINY)
        autocast = runtime.autocast(torch.device("mps"), "fp16")
        for kwargs in (
            {"temperature": 0},
            {"top_k": 5, "generator": torch.Generator(device="mps")},
            {"top_k": None, "stop_token": 50256, "generator": torch.Generator(device="mps")},
        ):
            rows = generate(model, [1, 2, 3], 4, num_samples=2, use_kv_cache=use_kv_cache, autocast=autocast, **kwargs)
            assert len(rows) == 2


def trainer_flags(data_dir: Path, log_dir: Path) -> list[str]:
    flags = ["--model", "tiny", "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--micro-batch-size", "2"]
    flags += ["--seq-len", "32", "--tokens-per-step", "128", "--val-tokens", "256", "--warmup-steps", "1"]
    return flags + ["--val-every", "2", "--hellaswag-every", "0", "--sample-every", "0", "--no-compile"]


def test_trainer_on_mps_resumes_a_cpu_checkpoint_then_its_own(data_dir, tmp_path, capsys):
    """train_gpt2.main as a Mac user runs it: 2 steps on the CPU, then the same run continued with
    --device mps to step 4 with validation, HellaSwag, CORE, samples and checkpoints, then resumed on
    MPS from its own checkpoint (MPS's RNG state restored) to step 5."""
    log_dir = tmp_path / "log"
    flags = trainer_flags(data_dir, log_dir)
    assert train_gpt2.main([*flags, "--device", "cpu", "--max-steps", "2"]) == 0
    hellaswag_data = tmp_path / "hellaswag.jsonl"
    hellaswag_data.write_text("".join(HELLASWAG_FIXTURE.read_text().splitlines(keepends=True)[:4]))
    every = ["--hellaswag-every", "4", "--hellaswag-data", str(hellaswag_data), "--sample-every", "4"]
    every += ["--core-every", "4", "--core-data", str(stand_in_core_data(tmp_path / "core")), "--no-core-verify"]
    with fake_mps():
        code = train_gpt2.main([*flags, *every, "--device", "mps", "--max-steps", "4", "--ckpt-every", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"resuming from {log_dir / 'model_final.pt'} at step 2" in out
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["device_name"] for r in records if r["type"] == "config"][-1] == MPS_NAME
    kinds = {r["type"] for r in records if r["step"] == 4}
    assert {"val", "hellaswag", "core", "sample"} <= kinds, kinds
    assert (log_dir / "model_00003.pt").exists() and checkpoint.read_step(log_dir / "model_final.pt") == 4
    saved = torch.load(log_dir / "model_final.pt", weights_only=True)
    assert saved["rng"]["mps"].numel() == RNG_STATE_BYTES["mps"] and saved["rng"]["cuda"] is None
    with fake_mps():
        code = train_gpt2.main([*flags, "--device", "mps", "--max-steps", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"resuming from {log_dir / 'model_final.pt'} at step 4" in out


def test_compile_on_mps_is_ignored_with_one_warning(data_dir, tmp_path, capsys):
    with fake_mps(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = train_gpt2.main(
            [*trainer_flags(data_dir, tmp_path / "log"), "--device", "mps", "--max-steps", "1", "--compile"]
        )
    assert code == 0, capsys.readouterr().err
    said = [str(w.message) for w in caught if "--compile" in str(w.message)]
    assert len(said) == 1 and "MPS" in said[0], said


def test_memory_check_on_mps_counts_metal_budget(data_dir, tmp_path, capsys):
    """A Mac's GPU shares the RAM: the budget is Metal's recommended working set, not the host's free
    memory (the old code read /proc/meminfo, which a Mac does not have: it never refused anything)."""
    with fake_mps():
        have, where = memory.available_bytes(torch.device("mps"))
        code = cli.run_main(
            train_gpt2.main,
            ["--model", "gpt2-xl", "--data-dir", str(data_dir), "--log-dir", str(tmp_path / "log"), "--device", "mps"]
            + ["--micro-batch-size", "16", "--no-compile"],
        )
    assert have == MPS_RECOMMENDED_MAX_MEMORY and "recommended_max_memory" in where
    err = capsys.readouterr().err
    assert code == 2 and "Metal's recommended working set" in err and len(err.strip().splitlines()) == 1, err


def test_out_of_memory_on_mps_is_one_line(data_dir, tmp_path, capsys):
    """MPS's allocator raises a plain RuntimeError, not torch.OutOfMemoryError: the old code printed
    its traceback instead of the flag that fixes it."""
    with fake_mps(), mock.patch("train_gpt2.train_step", side_effect=RuntimeError(MPS_OUT_OF_MEMORY)):
        code = cli.run_main(
            train_gpt2.main, [*trainer_flags(data_dir, tmp_path / "log"), "--device", "mps", "--max-steps", "1"]
        )
    err = capsys.readouterr().err
    assert code == 2 and "--micro-batch-size" in err and len(err.strip().splitlines()) == 1, err


# ---- the scripts, as a Mac user runs them ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pt"
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 3}, path)
    return path


def test_sample_py_auto_picks_mps(tiny_checkpoint, capsys):
    load_model = checkpoint.load_model
    with fake_mps(), mock.patch("checkpoint.load_model", side_effect=load_model) as loaded:
        code = sample.main(["--checkpoint", str(tiny_checkpoint), "--num-samples", "2", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("--- sample") == 2
    assert loaded.call_args.args[1] == torch.device("mps")  # --device auto, on a Mac


def test_hellaswag_py_on_mps(tiny_checkpoint, tmp_path, capsys):
    with fake_mps():
        code = hellaswag.main(
            ["--checkpoint", str(tiny_checkpoint), "--device", "mps", "--data", str(HELLASWAG_FIXTURE), "--no-verify"]
            + ["--limit", "5", "--log-dir", str(tmp_path)]
        )
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "hellaswag_results.jsonl").read_text())["count"] == 5


def test_core_py_on_mps(tiny_checkpoint, tmp_path, capsys):
    data = stand_in_core_data(tmp_path / "core_data")
    with fake_mps():
        code = core.main(
            ["--checkpoint", str(tiny_checkpoint), "--device", "mps", "--data-dir", str(data), "--no-verify"]
            + ["--tasks", "copa,winograd,lambada_openai", "--log-dir", str(tmp_path)]
        )
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "core_results.jsonl").read_text())
    assert record["count"] > 0 and record["device"] == MPS_NAME


def test_export_on_a_mac_stays_on_the_cpu(tiny_checkpoint, tmp_path, capsys):
    """export_hf.py has no --device: it copies weights from the checkpoint into safetensors, on the
    CPU on any machine. On a Mac (MPS visible, real tensors: any MPS tensor fails on this Linux torch)
    it must not pick MPS up through `auto`."""
    with fake_device("mps", tensors=False):
        code = export_hf.main(["--checkpoint", str(tiny_checkpoint), "--out-dir", str(tmp_path / "hf")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_throughput_bench_on_mps(capsys):
    """The timed steps end with a wait for the GPU (MPS queues its work: without it the clock read
    the time to queue them, the old code's number)."""
    argv = ["--model", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--tokens-per-step", "128"]
    argv += ["--steps", "2", "--warmup", "1", "--device", "mps", "--no-compile", "--json"]
    step = throughput.train_step
    waits_after_timed_steps = []

    def counted_step(run, index):  # the waits for the GPU since the last timed step
        waits_after_timed_steps.append(host.synchronized)
        return step(run, index)

    with fake_mps() as host, mock.patch("bench.throughput.train_step", counted_step):
        code = throughput.main(argv)
        synchronized = host.synchronized
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["device"] == MPS_NAME and not row["fused_adamw"] and row["mfu"] is None and not row["compile"]
    assert synchronized > waits_after_timed_steps[-1]  # waited once the last timed step was queued


def test_throughput_bench_out_of_memory_on_mps_is_status_3(capsys):
    """bench/gpu_check.py tells an out-of-memory row (3) from a failure (2): MPS's is a RuntimeError."""
    argv = ["--model", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--tokens-per-step", "128"]
    argv += ["--steps", "1", "--warmup", "0", "--device", "mps", "--no-compile", "--json"]
    with fake_mps(), mock.patch("bench.throughput.train_step", side_effect=RuntimeError(MPS_OUT_OF_MEMORY)):
        code = throughput.main(argv)
    out, _ = capsys.readouterr()
    assert code == 3 and "out of memory" in json.loads(out.strip().splitlines()[-1])["error"]
