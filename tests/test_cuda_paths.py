"""The paths only a GPU takes, run on the CPU (tests/fake_cuda.py): every entry point on fake CUDA
tensors, so a CPU tensor meeting a CUDA one fails here and not in the first GPU run; and the CUDA
precision policy asked for on the CPU, so the numerics the strategies train with can be compared.

Entry points: the training step (plain and chunked loss, AdamW and Muon), validation, HellaSwag
scoring, generate (KV cache or not, greedy, top-k, a stop token), the in-training samples,
sample.py and hellaswag.py as a user runs them with --device cuda.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import HELLASWAG_FIXTURE
from fake_cuda import DEVICE_NAME, DeviceMismatch, fake_cuda, is_fake

import checkpoint
import core
import core_eval
import hellaswag
import runtime
import sample
import train_gpt2
from bench import throughput
from hellaswag_eval import evaluate_hellaswag, load_examples
from model import GPT, GPTConfig, generate
from train_gpt2 import TrainConfig, build_run, train_step

ROOT = Path(__file__).resolve().parent.parent
CUDA = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0), is_main=True)
CPU = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def tiny_config(data_dir, **overrides) -> TrainConfig:
    """The trainer's tiny preset at 2 x 32 tokens, 2 micro-steps per step, as a GPU run would set it."""
    return TrainConfig(
        **{
            "model": "tiny",
            "data_dir": str(data_dir),
            "micro_batch_size": 2,
            "seq_len": 32,
            "tokens_per_step": 128,
            "val_tokens": 256,
            "device": "cuda",
            "compile": False,
            **overrides,
        }
    )


def on_cuda(tensor: torch.Tensor) -> bool:
    return is_fake(tensor) and tensor.device.type == "cuda"


# ---- the kit itself ------------------------------------------------------------------------------
def test_the_kit_fails_where_a_cpu_tensor_meets_a_cuda_one():
    real_cpu = torch.ones(3)  # made outside: a loader's batch, a checkpoint's weights
    with fake_cuda():
        x = torch.ones(3, device="cuda")
        for mixed in (
            lambda: x + real_cpu,
            lambda: x + torch.ones(3),
            lambda: torch.cat([x, torch.ones(3)]),
            lambda: torch.nn.functional.embedding(torch.zeros(2, dtype=torch.long), x.view(3, 1)),
        ):
            with pytest.raises(DeviceMismatch):
                mixed()
        assert on_cuda(x + torch.tensor(2.0))  # a CPU scalar may mix, as on a real GPU
        probabilities = torch.softmax(torch.ones(2, 5, device="cuda"), dim=-1)
        with pytest.raises(DeviceMismatch):
            torch.multinomial(probabilities, 1, generator=torch.Generator())  # a CPU generator, CUDA draws
        assert on_cuda(torch.multinomial(probabilities, 1, generator=torch.Generator(device="cuda")))
        # autocast is CUDA's: matmuls in bf16, LayerNorm in float32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert (x.view(1, 3) @ x.view(3, 1)).dtype == torch.bfloat16
    assert not torch.cuda.is_available() or torch.cuda.device_count() > 0  # the patches are gone


def test_the_old_sampler_fails_under_the_kit():
    """The defect this kit was built for: generate() made its tokens on the CPU (every CUDA run crashed
    at its first in-training sample). The same lines, replayed, fail here."""
    with fake_cuda():
        with torch.device("cuda"):
            model = GPT(TINY).eval()
        tokens = torch.tensor([1, 2, 3], dtype=torch.long).unsqueeze(0)  # no device=: the CPU
        with pytest.raises(DeviceMismatch):
            model(tokens)


# ---- the trainer's entry points --------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("loss_chunk_rows", [0, 32])
def test_training_step_on_cuda(data_dir, optimizer, loss_chunk_rows):
    with fake_cuda():
        run = build_run(tiny_config(data_dir, optimizer=optimizer, loss_chunk_rows=loss_chunk_rows, val_every=0), CUDA)
        assert all(on_cuda(p) for p in run.model.parameters()) and on_cuda(run.model.vocab_bias)
        for step in range(2):
            loss, grad_norm, lr, skipped = train_step(run, step)
        assert on_cuda(loss) and on_cuda(grad_norm) and skipped is None
        states = [s for opt in checkpoint.optimizer_parts(run.optimizer).values() for s in opt.state.values()]
        assert states and all(on_cuda(t) for s in states for t in s.values() if isinstance(t, torch.Tensor) and t.dim())
        adamw = checkpoint.optimizer_parts(run.optimizer)["adamw"]
        assert adamw.defaults["fused"] is True  # the fused kernel, chosen on CUDA only


def test_validation_hellaswag_and_samples_on_cuda(data_dir):
    examples = load_examples(HELLASWAG_FIXTURE, limit=6, verify=False)
    with fake_cuda():
        run = build_run(tiny_config(data_dir, val_every=1), CUDA, hellaswag=examples)
        run.evals.validation_loss()
        run.evals.hellaswag_scores()
        texts = run.evals.samples(10, num_samples=2, max_new_tokens=5)
        assert len(texts) == 2 and all(t.startswith(run.cfg.sample_prompt) for t in texts)
        result = evaluate_hellaswag(run.evals.model, examples, CUDA, autocast=run.autocast, batch_size=8)
        assert result["count"] == 6


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_generate_on_cuda(use_kv_cache):
    with fake_cuda():
        with torch.device("cuda"):
            model = GPT(TINY)
        autocast = runtime.autocast(torch.device("cuda"))
        for kwargs in (
            {"temperature": 0},
            {"top_k": 5, "generator": torch.Generator(device="cuda")},
            {"top_k": None, "stop_token": 50256, "generator": torch.Generator(device="cuda")},
        ):
            rows = generate(model, [1, 2, 3], 4, num_samples=2, use_kv_cache=use_kv_cache, autocast=autocast, **kwargs)
            assert len(rows) == 2


# ---- the scripts, as a user runs them with --device cuda ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pt"
    torch.save({"model": model.state_dict(), "model_config": model.model_config_dict(), "step": 3}, path)
    return path


def test_sample_py_on_cuda(tiny_checkpoint, capsys):
    with fake_cuda():
        code = sample.main(
            ["--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--num-samples", "2", "--max-new-tokens", "4"]
        )
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("--- sample") == 2


def test_hellaswag_py_on_cuda(tiny_checkpoint, tmp_path, capsys):
    with fake_cuda():
        code = hellaswag.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--device",
                "cuda",
                "--data",
                str(HELLASWAG_FIXTURE),
                "--no-verify",
                "--limit",
                "5",
                "--log-dir",
                str(tmp_path),
            ]
        )
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "hellaswag_results.jsonl").read_text())["count"] == 5


def stand_in_core_data(root: Path) -> Path:
    return core_eval.stand_in_data_dir(root, ROOT / "tests" / "data" / "core")  # scores mean nothing


def test_core_py_on_cuda(tiny_checkpoint, tmp_path, capsys):
    data = stand_in_core_data(tmp_path / "core_data")
    with fake_cuda():
        code = core.main(
            ["--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--data-dir", str(data), "--no-verify"]
            + ["--tasks", "copa,winograd,lambada_openai", "--log-dir", str(tmp_path)]
        )
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "core_results.jsonl").read_text())
    assert record["count"] > 0 and set(record["tasks"]) == {"copa", "winograd", "lambada_openai"}


def test_scored_logits_are_float32_under_cuda_autocast():
    """Scores come from float32 logits at the scored positions, whatever autocast the trunk runs in."""
    with fake_cuda():
        with torch.device("cuda"):
            model = GPT(TINY)
            idx = torch.zeros(2, 8, dtype=torch.long)
            positions = torch.tensor([3, 4, 12])
        with runtime.autocast(torch.device("cuda")):
            assert model(idx, positions=positions)[0].dtype == torch.float32
            assert model(idx)[0].dtype == torch.bfloat16  # the full logits (samples): autocast's


def test_trainer_resumes_a_cpu_checkpoint_on_cuda_with_every_evaluation(data_dir, tmp_path, capsys):
    """train_gpt2.main as a user runs it: 2 steps on the CPU, then the same run continued on a GPU to
    step 4 with validation, HellaSwag, CORE (--core-every), samples and checkpoints."""
    log_dir = tmp_path / "log"
    flags = ["--model", "tiny", "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--micro-batch-size", "2"]
    flags += ["--seq-len", "32", "--tokens-per-step", "128", "--val-tokens", "256", "--warmup-steps", "1"]
    flags += ["--val-every", "2", "--hellaswag-every", "0", "--sample-every", "0", "--no-compile"]
    assert train_gpt2.main([*flags, "--device", "cpu", "--max-steps", "2"]) == 0
    hellaswag_data = tmp_path / "hellaswag.jsonl"
    hellaswag_data.write_text("".join(HELLASWAG_FIXTURE.read_text().splitlines(keepends=True)[:4]))
    evals = ["--hellaswag-every", "4", "--hellaswag-data", str(hellaswag_data), "--sample-every", "4"]
    evals += ["--core-every", "4", "--core-data", str(stand_in_core_data(tmp_path / "core")), "--no-core-verify"]
    with fake_cuda():
        code = train_gpt2.main([*flags, *evals, "--device", "cuda", "--max-steps", "4", "--ckpt-every", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"resuming from {log_dir / 'model_final.pt'} at step 2" in out
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["device_name"] for r in records if r["type"] == "config"][-1] == DEVICE_NAME
    kinds = {r["type"] for r in records if r["step"] == 4}
    assert {"val", "hellaswag", "core", "sample"} <= kinds, kinds
    assert (log_dir / "model_00003.pt").exists() and checkpoint.read_step(log_dir / "model_final.pt") == 4


def test_throughput_bench_on_cuda(capsys):
    with fake_cuda():
        code = throughput.main(
            ["--model", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--tokens-per-step", "128"]
            + ["--steps", "2", "--warmup", "1", "--device", "cuda", "--no-compile", "--json"]
        )
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["device"] == DEVICE_NAME and row["fused_adamw"] and row["tokens_per_sec"] > 0


# ---- the precision policy ----------------------------------------------------------------------------
def residual_dtypes(model: torch.nn.Module, forward) -> set[torch.dtype]:
    """The dtypes of the residual stream: what enters each block and the final LayerNorm."""
    seen, hooks = set(), []
    for module in (*model.transformer.h, model.transformer.ln_f):
        hooks.append(module.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype)))
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_precision_policy_defaults_and_requests():
    with fake_cuda():  # an sm90 card: bf16 is native
        assert runtime.precision(torch.device("cuda")).dtype == torch.bfloat16  # what a GPU run gets
        assert runtime.precision(torch.device("cuda"), "fp32").dtype is None
    assert runtime.precision(torch.device("cpu")).dtype is None
    assert runtime.precision(torch.device("cpu"), "bf16").dtype == torch.bfloat16  # CUDA's, asked for on CPU
    assert runtime.precision(torch.device("cpu"), "fp16").dtype == torch.float16  # a V100's, asked for on CPU
    with pytest.raises(ValueError, match="--precision"):
        runtime.precision(torch.device("cpu"), "fp8")


def test_residual_stream_is_float32_under_bf16_on_cuda(data_dir):
    with fake_cuda():
        run = build_run(tiny_config(data_dir, val_every=0), CUDA)
        x, y = (t.to("cuda") for t in run.train_loader.next_batch())
        with run.autocast:
            assert residual_dtypes(run.model, lambda: run.model(x, y)) == {torch.float32}
            logits, _ = run.model(x)
        assert logits.dtype == torch.bfloat16  # the matmuls did run in bf16


def precision_worker(out_path: str, data_dir: str) -> None:
    """One process, a 1-rank gloo group: the residual stream's dtypes under each strategy with the
    bf16 policy, and the parameter dtypes FSDP2 computes with."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    import parallel

    result = {}
    for name, make in (
        ("single", lambda: parallel.Parallel(CPU)),
        ("ddp", lambda: parallel.DDPParallel(CPU)),
        ("fsdp", lambda: parallel.FSDPParallel(CPU, torch.bfloat16)),
    ):
        cfg = tiny_config(data_dir, device="cpu", precision="bf16", val_every=0, parallel="ddp")
        model = train_gpt2.build_model(cfg, CPU.device, True)
        train_model, _ = make().prepare(model)
        x, y = train_gpt2.TrainLoader(data_dir, 2, 32, 0, 1).next_batch()
        with runtime.autocast(CPU.device, "bf16"):
            dtypes = residual_dtypes(model, lambda: train_model(x, y)[1].backward())
        result[name] = sorted(str(d) for d in dtypes)
    torch.distributed.destroy_process_group()
    Path(out_path).write_text(json.dumps(result))


def test_residual_stream_has_the_same_dtype_under_single_ddp_and_fsdp(data_dir, tmp_path):
    """With bf16 autocast (CUDA's policy, asked for on the CPU), one process and DDP keep the residual
    stream x + attn(..) + mlp(..) in float32; FSDP2 must too (it gathered bf16 weights and cast each
    block's input to bf16: a bf16 stream across every block, other numerics than the other two)."""
    out = tmp_path / "dtypes.json"
    code = f"import test_cuda_paths as t; t.precision_worker({str(out)!r}, {str(data_dir)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dtypes = json.loads(out.read_text())
    assert dtypes == {"single": ["torch.float32"], "ddp": ["torch.float32"], "fsdp": ["torch.float32"]}


def test_rng_state_of_a_cpu_run_never_touches_cuda():
    """--device cpu on a GPU host: asking for the CUDA RNG state created a CUDA context on GPU 0 for
    every rank. Only a CUDA run's checkpoint holds (and restores) it."""
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.get_rng_state", side_effect=AssertionError("touched CUDA")),
        mock.patch("torch.cuda.set_rng_state", side_effect=AssertionError("touched CUDA")),
    ):
        rng = runtime.RandomState(torch.device("cpu"))
        state = rng.state_dict()
        assert state["cuda"] is None
        rng.load_state_dict({**state, "cuda": torch.zeros(16, dtype=torch.uint8)})
