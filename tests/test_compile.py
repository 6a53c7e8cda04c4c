"""The compiled path, on CPU with inductor (what CUDA runs, minus the GPU): the training step (plain
loss and --loss-chunk-rows) with gradient accumulation, validation, in-training HellaSwag and
sampling all run compiled, give eager's numbers within 1e-4, the training step has no graph break,
and after warm-up nothing recompiles across train -> eval -> HellaSwag -> sample -> train.

Compiles are counted from dynamo's own "Recompiling function" log (torch._logging "recompiles") and
its frame counter, so a failure says which guard failed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import HELLASWAG_FIXTURE
from test_train_gpt2 import CPU
from torch._dynamo.utils import counters

import cli
import runtime
import train_config
import train_gpt2
from hellaswag_eval import load_examples
from train_gpt2 import TrainConfig, build_run, train_step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def tiny_config(data_dir, **overrides) -> TrainConfig:
    """The tiny preset at 2 x 32 tokens per micro-batch, 2 micro-steps per step (accumulation runs)."""
    return TrainConfig(
        model="tiny",
        data_dir=str(data_dir),
        micro_batch_size=2,
        seq_len=32,
        tokens_per_step=128,
        val_tokens=256,
        device="cpu",
        seed=1337,
        **overrides,
    )


class Recompiles(logging.Handler):
    """Collects dynamo's recompile messages (the guard that failed, and where)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Recompiling function" in message:
            self.messages.append(message)


@pytest.fixture
def recompiles():
    torch._dynamo.reset()
    counters.clear()
    handler = Recompiles()
    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    torch._logging.set_logs()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def examples():
    return load_examples(HELLASWAG_FIXTURE, limit=12, verify=False)


def frames() -> int:
    return counters["frames"]["ok"]


@pytest.mark.parametrize("loss_chunk_rows", [0, 32])
def test_training_step_has_no_graph_break(data_dir, loss_chunk_rows):
    run = build_run(tiny_config(data_dir, loss_chunk_rows=loss_chunk_rows, val_every=0), CPU)
    x, y = run.train_loader.next_batch()
    for fn in (lambda: run.model(x, y), lambda: run.model(x)):  # the training forward, and logits only
        explanation = torch._dynamo.explain(fn)()
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_compiled_run_equals_eager_and_nothing_recompiles_after_warm_up(data_dir, examples, recompiles, one_thread):
    """Eager and compiled runs from the same seed: train 2 steps, validate, HellaSwag, sample, train;
    then the same again. The first round compiles what it must (listed below); the second, nothing."""
    results = {}
    for compiled in (False, True):
        run = build_run(tiny_config(data_dir, compile_on_cpu=compiled), CPU, hellaswag=examples)
        rounds = []
        for round_ in range(2):
            before = frames()
            losses = [train_step(run, 2 * round_ + i)[0].item() for i in range(2)]
            val = run.evals.validation_loss()
            run.evals.hellaswag_scores()
            texts = run.evals.samples(10)
            losses.append(train_step(run, 2 * round_ + 2)[0].item())
            rounds.append({"losses": losses, "val": val, "texts": texts, "compiles": frames() - before})
        results[compiled] = rounds
    eager, compiled = results[False], results[True]
    for e, c in zip(eager, compiled):
        assert c["losses"] == pytest.approx(e["losses"], abs=1e-4) and c["val"] == pytest.approx(e["val"], abs=1e-4)
    # Expected compiles of the first round, each a new graph of GPT.forward for a reason of its own
    # (measured: 5, the guard each recompile names in parentheses):
    #   1 the training forward (grad on, targets given)
    #   2 validation (GLOBAL_STATE changed: grad_mode)
    #   3 HellaSwag: the scored positions' logits, 16 fixed-shape rows (idx size mismatch at index 0;
    #     the number of positions is dynamic); a later batch of another length would add one, after
    #     which dynamo treats the length as dynamic
    #   4 sampling's prompt (kv_cache is None), 5 its one-token steps (kv_cache.length == 0), at
    #     any cache length
    assert compiled[0]["compiles"] <= 6, "\n".join(recompiles.messages)
    assert compiled[1]["compiles"] == 0, "recompiled after warm-up:\n" + "\n".join(recompiles.messages[-5:])
    assert eager[0]["compiles"] == eager[1]["compiles"] == 0


def test_compiled_chunked_loss_and_accumulation_equal_eager(data_dir, one_thread):
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        run = build_run(tiny_config(data_dir, compile_on_cpu=compiled, loss_chunk_rows=32), CPU)
        assert run.grad_accum == 2
        losses[compiled] = [train_step(run, step)[0].item() for step in range(3)] + [run.evals.validation_loss()]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_compile_is_ignored_on_cpu_unless_asked(data_dir):
    with pytest.warns(UserWarning, match="--compile is ignored on CPU"):
        run = build_run(tiny_config(data_dir, val_every=0), CPU)
    assert run.evals.model is run.model and not run.compiled  # not compiled
    forced = build_run(tiny_config(data_dir, val_every=0, compile_on_cpu=True), CPU)
    assert isinstance(forced.evals.model, torch._dynamo.eval_frame.OptimizedModule) and forced.compiled
    assert train_config.parse_args(["--compile-on-cpu"]).compile_on_cpu


def attention_ops(run_step) -> set[str]:
    """The attention kernels the profiler saw in one call of run_step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_step()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_each_attention_backend_compiles_its_own_kernel(recompiles, one_thread):
    """--attn-backend under torch.compile: a compile under MATH after one under FLASH must run MATH's
    kernel, and FLASH again after it FLASH's. Chosen outside the compiled model, the kernel was not part
    of dynamo's guards nor of the on-disk AOTAutograd cache key: the second compile was a cache hit
    replaying FLASH's kernel. And inductor's pattern matcher rewrote MATH's matmul / softmax / matmul
    into the fused kernel (runtime.compile_kwargs turns it off for math)."""
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    idx = torch.randint(0, 50257, (2, 65), generator=torch.Generator().manual_seed(1))
    seen = {}
    for backend in ("flash", "math", "flash"):
        torch._dynamo.reset()
        model.attention_backend = backend
        compiled = runtime.compile_model(model, True, on_cpu=True)

        def step():
            compiled(idx[:, :-1], idx[:, 1:])[1].backward()

        step()  # compile
        seen.setdefault(backend, []).append(attention_ops(step))
    assert all(ops and all("flash" in op for op in ops) for ops in seen["flash"]), seen
    assert not seen["math"][0], seen  # math: plain matmuls and softmax, no fused attention kernel


def test_cuda_graph_compile_modes_are_refused_with_gradient_accumulation(capsys):
    flags = ["--model", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--device", "cpu"]
    for mode in ("reduce-overhead", "max-autotune"):
        cfg = train_config.parse_args([*flags, "--tokens-per-step", "128", "--compile-mode", mode])
        with pytest.raises(ValueError, match="CUDA graphs.*2 micro-steps"):
            cfg.check_world_size(1)
        cfg.check_world_size(2)  # 2 ranks x 1 micro-step: nothing to accumulate
        assert cli.run_main(train_gpt2.main, [*flags, "--tokens-per-step", "128", "--compile-mode", mode]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "max-autotune-no-cudagraphs" in err
    train_config.parse_args(
        [*flags, "--tokens-per-step", "128", "--compile-mode", "max-autotune-no-cudagraphs"]
    ).check_world_size(1)


def test_evaluations_never_run_the_cuda_graph_compile(data_dir, monkeypatch):
    """Under a mode that captures CUDA graphs (one micro-step per rank: allowed), the training step is
    compiled in it, validation / scoring / sampling in the same mode without graphs; FSDP2, whose
    evaluations run the training step's per-block graphs, refuses such modes in one line."""
    compiled_with = []
    real_compile = torch.compile

    def record(model, **kwargs):
        compiled_with.append(kwargs.get("mode"))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", record)
    for mode, eval_mode in (("reduce-overhead", None), ("max-autotune", "max-autotune-no-cudagraphs")):
        compiled_with.clear()
        cfg = tiny_config(data_dir, compile_on_cpu=True, compile_mode=mode, val_every=0)
        run = build_run(dataclasses.replace(cfg, tokens_per_step=64), CPU)  # one micro-step
        assert run.train_model is not run.evals.model and compiled_with == [mode, eval_mode]  # None: default
    with pytest.raises(ValueError, match="--parallel fsdp"):
        dataclasses.replace(tiny_config(data_dir), compile_mode="reduce-overhead", tokens_per_step=64, parallel="fsdp")


def fsdp_sampling_worker(data_dir: str) -> None:
    """One process under --parallel fsdp with per-block compile on CPU inductor: the recompiles and
    frames dynamo compiles in a first and a second round of in-training samples, as JSON on stdout."""
    import json

    from test_cuda_paths import CPU

    handler = Recompiles()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    run = build_run(tiny_config(data_dir, compile_on_cpu=True, parallel="fsdp", val_every=0), CPU)
    rounds = []
    for step in (10, 20):
        before, recompiled = frames(), len(handler.messages)
        run.evals.samples(step, num_samples=2, max_new_tokens=12)
        rounds.append({"frames": frames() - before, "recompiles": len(handler.messages) - recompiled})
    print(json.dumps({"rounds": rounds, "layers": run.model.config.n_layer, "messages": handler.messages}))
    torch.distributed.destroy_process_group()


def test_fsdp_compiled_blocks_sample_without_a_recompile_per_layer(data_dir, tmp_path):
    """Under FSDP2 each block is compiled on its own, all sharing Block.forward's code. Sampling passed
    each block its layer number, which indexes the KV cache's list: dynamo specialised on it, compiled
    Block.forward once per layer, and hit its recompile limit (8) on gpt2's 12 layers. Each block now
    gets its own cache object: the prompt's graph, the one-token steps' graph, then nothing."""
    import json
    import os
    import subprocess
    import sys

    from test_train_gpt2 import run_env

    code = f"import test_compile as t; t.fsdp_sampling_worker({str(data_dir)!r})"
    env = {**run_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    first, second = counts["rounds"]
    # 1 recompile: the prompt's graph, then the one-token steps' (the cache length then stays dynamic)
    assert first["recompiles"] <= 1 < counts["layers"] - 1, counts["messages"]
    assert second == {"frames": 0, "recompiles": 0}, counts["messages"]
