"""train_gpt2.py, the training core: schedule, decay groups, DDP equivalence, exact resume (also after
SIGKILL), SIGTERM/SIGUSR1, corrupt checkpoints, one-line errors, MFU, metrics.jsonl, golden losses.

Real parts only: shards of real GPT-2 tokens (the FineWeb demo corpus shipped in assets/demo, np.save'd
uint16 like fineweb.py writes them; the `data_dir` fixture of conftest.py), the real trainer CLI in
fresh processes, real torchrun + gloo for DDP, real signals.

Every trainer run here uses one small config (`BASE_FLAGS`: the tiny preset, 2 x 32 tokens per
micro-batch, 128 tokens per step = 2 micro-steps on 1 process, 20 steps) and one pinned numeric
environment (`TRAIN_ENV`: 1 thread, AVX2 kernels), so runs can be compared bit for bit, and the
first 20 losses against tests/golden/tiny_losses.json. To regenerate that file after a change that
is MEANT to change the computation:

    REGENERATE_GOLDEN=1 uv run pytest tests/test_train_gpt2.py -k golden

(This file is also the DDP gradient worker: `torchrun ... tests/test_train_gpt2.py grad-worker OUT CONFIG_JSON`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also run as a script (the DDP worker below)
    sys.path.insert(0, str(ROOT))

from conftest import VAL_TOKENS, demo_token_stream  # noqa: E402

import cli  # noqa: E402
import fileio  # noqa: E402
import metrics  # noqa: E402
import runtime  # noqa: E402
import train_config  # noqa: E402
import train_gpt2  # noqa: E402
from metrics import MetricsLog  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train_config import MODEL_PRESETS  # noqa: E402
from train_gpt2 import TrainConfig, learning_rate, make_optimizer, param_groups  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_losses.json"
RUN_TIMEOUT = 240  # seconds for one trainer process (a 20-step run takes ~15 s on a busy 2-core box)

# The run every CLI test uses (data and log dirs are added per test). 128 tokens per step = 2
# micro-steps of 2 x 32 on one process, 1 micro-step on each of 2 DDP ranks.
BASE_FLAGS = [
    "--model",
    "tiny",
    "--micro-batch-size",
    "2",
    "--seq-len",
    "32",
    "--tokens-per-step",
    "128",
    "--max-steps",
    "20",
    "--warmup-steps",
    "5",
    "--max-lr",
    "3e-3",
    "--val-every",
    "10",
    "--val-tokens",
    "256",
    "--ckpt-every",
    "5",
    "--sample-every",
    "0",
    "--hellaswag-every",
    "0",
    "--device",
    "cpu",
    "--no-compile",
]
MAX_STEPS, TOKENS_PER_STEP = 20, 128
CPU = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)

# Same numbers in every run, and nearly the same on any x86 machine with AVX2: one thread (the order
# of float sums depends on the thread count) and the AVX2 code paths of MKL and ATen (not AVX-512's).
# oneDNN is left free: the float32 runs never call it (same losses with it pinned), and pinning it
# to AVX2 sends the Muon tests' bf16 matmuls (Newton-Schulz) to its reference kernel, 4x slower per
# step on an AVX-512 CPU; each machine still gives the same bf16 numbers in every run.
TRAIN_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "PYTHONUNBUFFERED": "1",
}
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


# ---------------------------------------------------------------------------------------- helpers


def run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(TRAIN_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def trainer_cmd(data_dir: Path, log_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    args = [str(ROOT / "train_gpt2.py"), *BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir), *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(cmd: list[str], cwd: Path, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=timeout)


def run_ok(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = run(cmd, cwd)
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def records(log_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(log_dir) if r["type"] == kind]


def train_losses(log_dir: Path) -> list[float]:
    return [r["train_loss"] for r in records(log_dir, "train")]


def last_train_step(log_dir: Path) -> int:
    """Largest train step logged so far (-1 if none); tolerates a line being written right now."""
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [-1]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            steps.append(record["step"])
    return max(steps)


def final_weights(log_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(log_dir / "model_final.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == MAX_STEPS
    return ckpt["model"]


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"parameters not bitwise equal: {different}"


def assert_train_steps_once(log_dir: Path) -> None:
    steps = [r["step"] for r in records(log_dir, "train")]
    assert steps == list(range(MAX_STEPS)), f"train steps logged: {steps}"


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = RUN_TIMEOUT) -> None:
    """Poll `condition()` every 10 ms while `proc` runs; fail if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def start(cmd: list[str], cwd: Path, out_path: Path) -> subprocess.Popen:
    out = open(out_path, "w")  # a file, not a pipe: a full pipe would block the trainer
    return subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """The uninterrupted reference run: BASE_FLAGS for 20 steps, plus samples every 10 steps (the one
    run that samples: the resumed runs below do not, so equal weights also show sampling leaves
    training untouched). Checkpoints at steps 5, 10, 15 and model_final.pt. Tests copy, never modify."""
    work = tmp_path_factory.mktemp("straight")
    log_dir = work / "log"
    result = run_ok(trainer_cmd(data_dir, log_dir, "--sample-every", "10"), work)
    return {
        "log_dir": log_dir,
        "stdout": result.stdout,
        "weights": final_weights(log_dir),
        "losses": train_losses(log_dir),
    }


# ---------------------------------------------------------------------------------------- schedule, optimizer


def test_learning_rate_schedule_of_the_reference_run():
    cfg = TrainConfig()  # 6e-4, 715 warmup steps, cosine to 10% at 19,073
    max_lr, min_lr, warmup, total = 6e-4, 6e-5, 715, 19_073
    assert (cfg.max_lr, cfg.max_lr * cfg.min_lr_frac, cfg.warmup_steps, cfg.max_steps) == (
        max_lr,
        pytest.approx(min_lr),
        warmup,
        total,
    )

    def cosine(step):
        return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (max_lr - min_lr)

    assert learning_rate(0, cfg) == pytest.approx(max_lr / 715, rel=1e-12)  # the first step already moves
    assert learning_rate(1, cfg) == pytest.approx(2 * max_lr / 715, rel=1e-12)
    assert learning_rate(714, cfg) == pytest.approx(max_lr, rel=1e-12)  # warmup ends at the peak...
    assert learning_rate(715, cfg) == pytest.approx(max_lr, rel=1e-12)  # ...where the cosine starts
    middle = (warmup + total) // 2
    assert learning_rate(middle, cfg) == pytest.approx(cosine(middle), rel=1e-12)
    assert learning_rate(19_072, cfg) == pytest.approx(cosine(19_072), rel=1e-12)
    assert 0 < learning_rate(19_072, cfg) - min_lr < 1e-10  # the last step: a hair above the floor
    for step in (19_073, 19_074, 25_000, 10**7):
        assert learning_rate(step, cfg) == pytest.approx(min_lr, rel=1e-12)
    lrs = [learning_rate(s, cfg) for s in range(warmup, total + 1, 97)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "lr must not rise after warmup"


def test_weight_decay_groups_matrices_and_embeddings_only():
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    groups = param_groups(model, 0.1)
    decay, no_decay = groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied embedding is listed once
    decayed = [names[id(p)] for p in decay["params"]]
    not_decayed = [names[id(p)] for p in no_decay["params"]]

    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert set(decayed) == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert all(n.endswith(".bias") or ".ln_" in n or n.startswith("transformer.ln_f") for n in not_decayed)
    assert not any(n.endswith(".bias") or "ln_" in n for n in decayed)
    # the tied wte / lm_head tensor once, and every parameter in exactly one group
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert all_ids.count(id(model.lm_head.weight)) == 1
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()

    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_loss_falls_when_overfitting_one_batch(one_thread):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))  # small: 30 steps in a few seconds
    tokens = demo_token_stream()[: 4 * 33].astype(np.int64)
    batch = torch.from_numpy(tokens).view(4, 33)  # (B, T+1)
    x, y = batch[:, :-1], batch[:, 1:]
    opt = make_optimizer(model, TrainConfig(max_lr=1e-2), torch.device("cpu"))  # the trainer's AdamW and groups
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 10  # ~ln(50257) = 10.8 at init
    assert losses[-1] < losses[0] / 4, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


# ---------------------------------------------------------------------------------------- MFU


def test_mfu_formula_for_gpt2_124m_on_h100():
    with torch.device("meta"):  # sizes without allocating 124M parameters
        model = GPT(GPTConfig(**MODEL_PRESETS["gpt2"]))
    L, C, T, V = 12, 768, 1024, 50304
    per_layer = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C  # attn, mlp, 2 LNs
    weights = L * per_layer + V * C + 2 * C  # + tied embedding/lm_head + ln_f (position table excluded)
    expected_flops = 6 * weights + 12 * L * C * T
    assert model.flops_per_token(T) == expected_flops
    assert 0.84e9 < expected_flops < 0.88e9  # the well-known ~0.86 GFLOP/token of GPT-2 small at T=1024

    h100_sxm = 989.4e12
    assert metrics.mfu(expected_flops, 300_000, h100_sxm) == pytest.approx(
        expected_flops * 300_000 / h100_sxm, rel=1e-12
    )
    assert metrics.mfu(expected_flops, 300_000, h100_sxm) == pytest.approx(
        0.2594, abs=1e-4
    )  # 855.4 MFLOP x 300K / 989.4T
    # 8 GPUs at 8x the tokens: the same utilisation
    assert metrics.mfu(expected_flops, 8 * 300_000, h100_sxm, world_size=8) == pytest.approx(
        metrics.mfu(expected_flops, 300_000, h100_sxm)
    )
    assert metrics.mfu(expected_flops, 300_000, None) is None  # unknown GPU
    assert metrics.mfu(expected_flops, 0.0, h100_sxm) is None
    assert metrics.mfu(expected_flops, 10**7, h100_sxm) == 1.0  # impossible numbers never exceed 100%
    assert runtime.peak_flops(torch.device("cpu")) is None
    assert {key: bf16 for key, bf16, _ in runtime.PEAK_TFLOPS}["H100"] == 989.4


# ---------------------------------------------------------------------------------------- bad inputs


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run train_gpt2.main like the CLI does; return (exit code, stdout, stderr)."""
    try:
        code = cli.run_main(train_gpt2.main, argv)
        out, err = capsys.readouterr()
    except SystemExit as e:  # raise SystemExit("message"): Python prints the message and exits 1
        out, err = capsys.readouterr()
        err += e.code if isinstance(e.code, str) else ""
        code = 1 if isinstance(e.code, str) else e.code
    return code, out, err


def _main_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """Run train_gpt2.main like the CLI does; return (exit code, what it printed to stderr)."""
    code, _, err = _run_main(argv, capsys)
    return code, err


BAD_INPUTS = {
    # name: (extra flags, setup(tmp, data_dir) -> data dir to use, phrase the error must contain)
    "missing data dir": ([], lambda tmp, data: tmp / "nowhere", "does not exist"),
    "no val shard": ([], lambda tmp, data: _train_shards_only(tmp, data), "no val shard"),
    "tokens per step not divisible": (["--tokens-per-step", "100"], lambda tmp, data: data, "not a multiple"),
    "seq len above block size": (["--seq-len", "512", "--tokens-per-step", "1024"], lambda tmp, data: data, "exceeds"),
    "missing hellaswag file": (
        ["--hellaswag-every", "5", "--hellaswag-data", "no/such.jsonl"],
        lambda tmp, data: data,
        "hellaswag",
    ),
    "resume never over checkpoints": (
        ["--resume", "never"],
        lambda tmp, data: _log_dir_with_checkpoint(tmp, data),
        "--resume",
    ),
    "resume another model's checkpoint": ([], lambda tmp, data: _log_dir_of_another_model(tmp, data), "another model"),
    "resume another format": ([], lambda tmp, data: _edited_checkpoint(tmp, data, format=0), "format 0"),
    "resume without a part": ([], lambda tmp, data: _edited_checkpoint(tmp, data, drop="spike_guard"), "spike_guard"),
}


def _train_shards_only(tmp: Path, data: Path) -> Path:
    out = tmp / "train_only"
    out.mkdir()
    for path in data.glob("*_train_*.npy"):
        shutil.copy(path, out / path.name)
    return out


def _log_dir_with_checkpoint(tmp: Path, data: Path) -> Path:
    (tmp / "log").mkdir()
    (tmp / "log" / "model_00005.pt").write_bytes(b"a previous run's checkpoint")
    return data


def _log_dir_of_another_model(tmp: Path, data: Path) -> Path:
    """A real checkpoint whose model differs from --model tiny's (another preset, or a preset edited since)."""
    cfg = TrainConfig(
        model="tiny", data_dir=str(data), micro_batch_size=2, seq_len=32, tokens_per_step=128, device="cpu", val_every=0
    )
    run = train_gpt2.build_run(cfg, CPU)
    run.model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    (tmp / "log").mkdir()
    train_gpt2.save_checkpoint(
        run, MetricsLog(tmp / "m.jsonl", False), tmp / "log" / "model_00005", step=5, evals_done=True, keep=None
    )
    return data


def _edited_checkpoint(tmp: Path, data: Path, drop: str | None = None, **values) -> Path:
    """A real checkpoint of this run's settings, then edited: a key dropped or a value replaced (an
    older or newer writer)."""
    cfg = TrainConfig(
        **{
            **train_config.resolve_flags(cli.parse_flags(cli.build_parser(TrainConfig), BASE_FLAGS)),
            "data_dir": str(data),
        }
    )
    (tmp / "log").mkdir()
    path = train_gpt2.save_checkpoint(
        train_gpt2.build_run(cfg, CPU),
        MetricsLog(tmp / "m.jsonl", False),
        tmp / "log" / "model_00005",
        step=5,
        evals_done=True,
        keep=None,
    )
    state = torch.load(path, weights_only=True)
    state.pop(drop, None)
    torch.save({**state, **values}, path)
    return data


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error(case, data_dir, tmp_path, capsys):
    extra, setup, phrase = BAD_INPUTS[case]
    data = setup(tmp_path, data_dir)
    argv = [*BASE_FLAGS, "--data-dir", str(data), "--log-dir", str(tmp_path / "log"), *extra]
    code, err = _main_in_process(argv, capsys)
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert phrase.lower() in lines[0].lower()
    if case == "resume never over checkpoints":
        assert (tmp_path / "log" / "model_00005.pt").exists()  # refused, and nothing deleted


@pytest.mark.timeout(120)
def test_bad_input_cli_exits_nonzero_without_traceback(data_dir, tmp_path):
    """A bad flag (UserError) and a missing file (OSError) leave the CLI alike: exit 2, one line, in real processes."""
    cmds = {
        "flags": trainer_cmd(data_dir, tmp_path / "log1", "--tokens-per-step", "100"),
        "files": trainer_cmd(
            data_dir, tmp_path / "log2", "--hellaswag-every", "5", "--hellaswag-data", "no/such.jsonl"
        ),
    }
    procs = {
        k: subprocess.Popen(c, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in cmds.items()
    }
    try:
        results = {name: proc.communicate(timeout=100) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for name, (_, err) in results.items():
        assert procs[name].returncode == 2, name
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, f"{name}:\n{err}"


# ---------------------------------------------------------------------------------------- metrics and golden


@pytest.mark.timeout(300)
def test_metrics_jsonl_records_config_train_val_and_samples(straight_run, data_dir):
    log_dir = straight_run["log_dir"]
    rows = read_metrics(log_dir)
    cfg = train_config.parse_args(
        [*BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--sample-every", "10"]
    )

    config = rows[0]
    assert config["type"] == "config" and config["step"] == 0
    assert config["config"] == dataclasses.asdict(cfg)
    assert config["world_size"] == 1 and config["resumed_from"] is None and config["peak_flops"] is None
    assert config["flops_per_token"] == GPT(cfg.model_config).flops_per_token(32)
    assert config["torch"] == torch.__version__ and config["cuda"] is None
    assert {"git_sha", "device_name", "time"} <= config.keys()
    assert [r["type"] for r in rows].count("config") == 1

    train = records(log_dir, "train")
    assert [r["step"] for r in train] == list(range(MAX_STEPS))
    fields = {"type", "step", "tokens", "train_loss", "lr", "grad_norm", "step_ms", "tokens_per_sec", "mfu", "time"}
    for r in train:
        assert fields <= r.keys(), fields - r.keys()
        assert r["tokens"] == (r["step"] + 1) * TOKENS_PER_STEP
        assert r["lr"] == pytest.approx(learning_rate(r["step"], cfg), rel=1e-12)
        assert math.isfinite(r["train_loss"]) and r["grad_norm"] > 0
        assert r["step_ms"] > 0 and r["tokens_per_sec"] > 0 and r["mfu"] is None  # no known peak on CPU
    assert train[0]["train_loss"] > 10 and train[-1]["train_loss"] < train[0]["train_loss"] - 1.5  # 10.88 -> 8.96

    val = records(log_dir, "val")
    assert [r["step"] for r in val] == [0, 10, 20]  # every --val-every steps and at the end
    assert all(r["tokens"] == r["step"] * TOKENS_PER_STEP and math.isfinite(r["val_loss"]) for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"]

    samples = records(log_dir, "sample")
    assert [r["step"] for r in samples] == [10, 20]
    for r in samples:
        assert len(r["samples"]) == 4 and all(s.startswith(cfg.sample_prompt) for s in r["samples"])

    # human lines: one fixed-format line per step
    step_lines = [line for line in straight_run["stdout"].splitlines() if re.match(r"step +\d+/20 \| loss ", line)]
    assert len(step_lines) == MAX_STEPS


def cpu_vendor() -> str:
    """The float results of MKL's kernels depend on the CPU maker even with MKL_CBWR pinned (the
    same losses differed by ~1e-6 between an Intel and an AMD machine): goldens are kept per maker."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


GOLDEN_TOLERANCE = 1e-4  # on a CPU maker without a golden of its own: far below any real change of the math


def test_val_records_give_bits_per_byte_of_the_val_text(straight_run):
    """val_bpb = the val loss in bits over the UTF-8 bytes of the text its 256 target tokens decode to
    (<|endoftext|> counted as a prediction, not as text), the bytes counted here by decoding them."""
    from tokenizer import EOT_TOKEN, get_encoding

    targets = demo_token_stream()[1 : 256 + 1]  # --val-tokens 256: the val shard's first 256 targets
    text_bytes = len(get_encoding().decode_bytes([int(t) for t in targets if t != EOT_TOKEN]))
    vals = records(straight_run["log_dir"], "val")
    assert len(vals) == 3
    for r in vals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * 256 / (math.log(2) * text_bytes), rel=1e-12)


@pytest.mark.timeout(300)
def test_golden_losses_of_the_tiny_preset(straight_run):
    """The tiny preset's first 20 train losses under BASE_FLAGS and TRAIN_ENV, exactly, on a CPU
    maker the golden file has numbers for (within GOLDEN_TOLERANCE elsewhere). A refactor that is
    not meant to change the computation must reproduce them bit for bit."""
    losses = straight_run["losses"]
    assert len(losses) == MAX_STEPS
    vendor, key = cpu_vendor(), f"{cpu_vendor()} torch {torch.__version__}"
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"losses": {}}
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        golden = {
            "what": "train_loss of steps 0..19 from metrics.jsonl "
            "(tests/test_train_gpt2.py::test_golden_losses_of_the_tiny_preset)",
            "command": "train_gpt2.py " + " ".join(BASE_FLAGS) + " --sample-every 10 --data-dir SHARDS --log-dir LOG",
            "data": f"SHARDS = assets/demo/fineweb_demo.parquet as GPT-2 tokens ([50256] + encode_ordinary(text) per "
            f"document): val = the first {VAL_TOKENS:,} tokens, then 3 train shards of np.array_split(the rest, 3) "
            "(the data_dir fixture of tests/conftest.py)",
            "env": TRAIN_ENV,
            "regenerate": "REGENERATE_GOLDEN=1 uv run pytest tests/test_train_gpt2.py -k golden (adds or replaces this "
            "machine's entry; only after a change MEANT to alter the computation)",
            "losses": {**golden.get("losses", {}), key: losses},  # per "<CPU vendor> torch <version>"
        }
        fileio.atomic_write_json(GOLDEN, golden)
        pytest.skip(f"wrote {GOLDEN} for {key}")
    entries = golden["losses"]
    exact = entries.get(key) or next((v for k, v in entries.items() if k.startswith(vendor + " ")), None)
    if exact is not None:
        mismatch = [(i, a, b) for i, (a, b) in enumerate(zip(losses, exact)) if a != b]
        assert len(exact) == MAX_STEPS and not mismatch, (
            f"losses differ from {GOLDEN.name} ({vendor}) at (step, now, golden): {mismatch[:5]}"
        )
    else:
        reference = next(iter(entries.values()))
        worst = max(abs(a - b) for a, b in zip(losses, reference))
        assert worst < GOLDEN_TOLERANCE, f"losses differ from {GOLDEN.name} by up to {worst:.3g} on a {vendor} CPU"


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.timeout(300)
def test_resume_skips_corrupt_newest_checkpoint_and_matches_uninterrupted_run(straight_run, data_dir, tmp_path):
    """N/2 + stop + fresh process + N/2 == N straight, bit for bit. The straight run's files stand for a
    run stopped after step 15's checkpoint (its later output removed), with that newest checkpoint
    torn (a disk that filled up, a bad copy): it is skipped with a warning and step 10's is used."""
    log_dir = tmp_path / "log"
    shutil.copytree(straight_run["log_dir"], log_dir)
    (log_dir / "model_final.pt").unlink()
    newest = log_dir / "model_00015.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    result = run_ok(trainer_cmd(data_dir, log_dir), tmp_path)
    assert "skipping unreadable checkpoint" in result.stderr and "model_00015.pt" in result.stderr
    assert f"resuming from {log_dir / 'model_00010.pt'} at step 10" in result.stdout
    assert_same_weights(final_weights(log_dir), straight_run["weights"])
    assert train_losses(log_dir) == straight_run["losses"]
    assert_train_steps_once(log_dir)  # the copied records past step 10 were dropped, not duplicated
    assert [r["step"] for r in records(log_dir, "val")] == [0, 10, 20]  # step 10's val kept, not redone
    config = records(log_dir, "config")
    assert [r["step"] for r in config] == [0, 10] and config[1]["resumed_from"] == str(log_dir / "model_00010.pt")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_after_sigkill_matches_uninterrupted_run(straight_run, data_dir, tmp_path):
    """kill -9 between checkpoints, rerun the same command: same weights, and metrics.jsonl holds each
    train step once, with the uninterrupted run's losses."""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir, "--ckpt-every", "3")
    proc = start(cmd, tmp_path, tmp_path / "killed.out")
    try:
        # past the step-3 checkpoint by two logged steps, before the step-6 one
        wait_for(
            proc,
            lambda: (log_dir / "model_00003.pt").exists() and last_train_step(log_dir) >= 4,
            "the step-3 checkpoint and two more steps",
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"
    # Steps 3 and 4 were logged after the step-3 checkpoint: the rerun must drop, not repeat, them. (A
    # very late kill may also have caught the step-6 checkpoint: the rerun then starts there.)
    newest = max(int(p.stem.split("_")[1]) for p in log_dir.glob("model_0*.pt"))
    assert newest in (3, 6) and last_train_step(log_dir) >= 4

    result = run_ok(cmd, tmp_path)
    assert f"resuming from {log_dir / f'model_{newest:05d}.pt'} at step {newest}" in result.stdout
    assert_same_weights(final_weights(log_dir), straight_run["weights"])
    assert_train_steps_once(log_dir)
    assert train_losses(log_dir) == straight_run["losses"]
    assert [r["step"] for r in records(log_dir, "val")] == [0, 10, 20]
    assert sorted(p.name for p in log_dir.glob("model_0*.pt")) == [
        "model_00012.pt",
        "model_00015.pt",
        "model_00018.pt",
    ]  # newest 3 kept


def _run_until_signal(
    cmd,
    cwd: Path,
    log_dir: Path,
    after_step: int,
    sig: signal.Signals,
    name: str,
    expect_code: int = 0,
    group: bool = False,
) -> str:
    """Start the trainer, send `sig` once train step `after_step` is logged, wait; return its output.
    group: start it in its own session and signal the whole process group, as a terminal's Ctrl-C does."""
    out_path = cwd / f"{name}.out"
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=run_env(),
        stdout=open(out_path, "w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=group,
    )
    try:
        wait_for(proc, lambda: last_train_step(log_dir) >= after_step, f"train step {after_step}")
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    out = out_path.read_text()
    assert proc.returncode == expect_code, f"{sig.name}: exit {proc.returncode}\n{out[-3000:]}"
    return out


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigterm_and_sigusr1_checkpoint_at_step_boundary_exit_zero_and_resume_exactly(straight_run, data_dir, tmp_path):
    """What SLURM sends before a time limit: the run saves at the next step boundary and exits 0, and
    the requeued command continues to the uninterrupted run's weights. SIGTERM mid-run, then SIGUSR1
    during the last step (checkpoint, then the final evals and model_final.pt in the same process)."""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir)

    out = _run_until_signal(cmd, tmp_path, log_dir, 1, signal.SIGTERM, "sigterm")
    match = re.search(r"SIGTERM: checkpoint saved at step (\d+)", out)
    assert match, out[-3000:]
    stop_step = int(match.group(1))
    assert 2 <= stop_step < MAX_STEPS - 2 and not (log_dir / "model_final.pt").exists()
    assert torch.load(log_dir / f"model_{stop_step:05d}.pt", map_location="cpu", weights_only=True)["step"] == stop_step
    assert last_train_step(log_dir) == stop_step - 1  # saved at the step boundary right after the signal

    out = _run_until_signal(cmd, tmp_path, log_dir, MAX_STEPS - 2, signal.SIGUSR1, "sigusr1")
    assert f"resuming from {log_dir / f'model_{stop_step:05d}.pt'} at step {stop_step}" in out
    if f"SIGUSR1: checkpoint saved at step {MAX_STEPS}" in out:
        # Stopped after the last step: the checkpoint is written first (a kill during the final
        # evals loses nothing), then the final evals run and model_final.pt ends the run.
        assert "finishing the final evaluation" in out and "done:" in out
        assert (log_dir / f"model_{MAX_STEPS:05d}.pt").exists() and (log_dir / "model_final.pt").exists()
        assert "training already finished" in run_ok(cmd, tmp_path).stdout  # a requeued job has nothing left
    else:  # rare: the test process was too slow and the signal landed after the last step's log line
        assert "SIGUSR1" not in out and "done:" in out
    assert_same_weights(final_weights(log_dir), straight_run["weights"])
    assert_train_steps_once(log_dir)
    assert train_losses(log_dir) == straight_run["losses"]
    assert [r["step"] for r in records(log_dir, "val")] == [0, 10, 20]


# ---------------------------------------------------------------------------------------- DDP


class GradRecorder(torch.optim.Optimizer):
    """An optimizer whose step() records the gradients it is handed (after clipping) and moves nothing."""

    def __init__(self, model: torch.nn.Module):
        self.named = list(model.named_parameters())  # the tied embedding once
        super().__init__([p for _, p in self.named], {"lr": 0.0})
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        self.grads = {name: p.grad.detach().clone() for name, p in self.named}


def run_gloo_pair(test_file: Path, out: Path, cfg: TrainConfig, cwd: Path) -> None:
    """Run `test_file`'s `grad-worker` entry point as 2 gloo ranks (real env:// rendezvous on a
    free local port) writing `out`; fail with both ranks' output if either fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **run_env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, str(test_file.resolve()), "grad-worker", str(out), json.dumps(dataclasses.asdict(cfg))]
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    try:
        outputs = [proc.communicate(timeout=150)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outputs


def one_step_gradients(cfg: TrainConfig, dist_info: runtime.DistInfo) -> dict:
    """Step 0 of `cfg` through the trainer's own build_run + train_step (micro-steps, gradient sync
    only on the last, DDP all-reduce, clipping); returns the mean loss, the grad norm and the
    gradients the optimizer gets."""
    run = train_gpt2.build_run(cfg, dist_info)
    recorder = run.optimizer = GradRecorder(run.model)
    loss, grad_norm, _, _ = train_gpt2.train_step(run, 0)
    if dist_info.distributed:
        torch.distributed.all_reduce(loss)
        loss /= dist_info.world_size
    return {"loss": loss, "grad_norm": grad_norm, "grads": recorder.grads}


def grad_worker_main(compute) -> None:
    """The `grad-worker` entry point that run_gloo_pair starts in each rank (this file's and
    test_recipe.py's): `compute(TrainConfig, DistInfo)` on every rank, rank 0 saves its result."""
    if len(sys.argv) != 4 or sys.argv[1] != "grad-worker":
        sys.exit(f"usage: torchrun --nproc_per_node=2 {sys.argv[0]} grad-worker OUT_PATH CONFIG_JSON")
    out_path, cfg_json = sys.argv[2], sys.argv[3]
    dist_info = runtime.setup_distributed("cpu")
    try:
        result = compute(TrainConfig(**json.loads(cfg_json)), dist_info)
        if dist_info.is_main:
            torch.save(result, out_path)
        torch.distributed.barrier()  # no rank tears down while rank 0 still saves
    finally:
        runtime.teardown_distributed()


@pytest.mark.timeout(200)
def test_ddp_two_ranks_give_the_gradients_of_one_process_with_twice_the_accumulation(data_dir, tmp_path, one_thread):
    # 256 tokens per step: 4 micro-steps of 2 x 32 on 1 process, 2 per rank on 2 (so no_sync is used)
    cfg = TrainConfig(
        model="tiny",
        data_dir=str(data_dir),
        micro_batch_size=2,
        seq_len=32,
        tokens_per_step=256,
        device="cpu",
        compile=False,
        val_every=0,
    )
    assert (cfg.grad_accum_steps(1), cfg.grad_accum_steps(2)) == (4, 2)
    out = tmp_path / "ddp_grads.pt"
    # two ranks as plain processes with torchrun's environment (the launcher itself is tested below)
    run_gloo_pair(Path(__file__), out, cfg, tmp_path)
    ddp = torch.load(out, weights_only=True)

    single = one_step_gradients(cfg, CPU)
    assert ddp["grads"].keys() == single["grads"].keys()
    assert abs(ddp["loss"].item() - single["loss"].item()) < 1e-6
    assert abs(ddp["grad_norm"].item() - single["grad_norm"].item()) < 1e-6
    worst = max((ddp["grads"][n] - g).abs().max().item() for n, g in single["grads"].items())
    assert worst < 1e-6, f"largest gradient difference {worst:.3g}"
    assert min(g.abs().max().item() for n, g in single["grads"].items() if "c_attn.bias" not in n) > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_process_torchrun_run_matches_single_process_loss_curve(straight_run, data_dir, tmp_path):
    """A 2-process torchrun CPU run of the tiny preset (gloo): same tokens per step as the 1-process
    run with 2 micro-steps, so the same loss curve to 1e-5, and a checkpoint any world size resumes."""
    log_dir = tmp_path / "log"
    run_ok(trainer_cmd(data_dir, log_dir, nproc=2), tmp_path)
    config = records(log_dir, "config")
    assert len(config) == 1 and config[0]["world_size"] == 2 and config[0]["grad_accum_steps"] == 1
    train = records(log_dir, "train")
    assert [r["step"] for r in train] == list(range(MAX_STEPS))
    assert [r["tokens"] for r in train] == [(s + 1) * TOKENS_PER_STEP for s in range(MAX_STEPS)]
    diffs = [abs(a - b) for a, b in zip(train_losses(log_dir), straight_run["losses"])]
    assert max(diffs) < 1e-5, f"loss curves differ by up to {max(diffs):.3g}"
    straight_val = [r["val_loss"] for r in records(straight_run["log_dir"], "val")]
    assert [r["val_loss"] for r in records(log_dir, "val")] == pytest.approx(straight_val, abs=1e-5)
    assert final_weights(log_dir).keys() == straight_run["weights"].keys()  # unwrapped: no "module." prefix


if __name__ == "__main__":
    grad_worker_main(one_step_gradients)


# ---------------------------------------------------------------------------- logging mirrors


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensorboard_and_wandb_mirror_every_metrics_record(data_dir, tmp_path, monkeypatch):
    """--tensorboard and --wandb (offline: no account, no network) get the records metrics.jsonl
    gets; metrics.jsonl stays the source of truth."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "log"
    cmd = trainer_cmd(
        data_dir,
        log_dir,
        "--max-steps",
        "6",
        "--warmup-steps",
        "2",
        "--val-every",
        "3",
        "--tensorboard",
        "--wandb",
        "--wandb-project",
        "test",
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_ok(cmd, tmp_path)

    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    train = records(log_dir, "train")
    logged = [(e.step, e.value) for e in events.Scalars("train/train_loss")]
    assert [s for s, _ in logged] == [r["step"] for r in train]
    assert [v for _, v in logged] == pytest.approx([r["train_loss"] for r in train], rel=1e-6)
    assert [e.step for e in events.Scalars("val/val_loss")] == [0, 3, 6]

    offline_runs = list((log_dir / "wandb").glob("offline-run-*"))
    run_id = (log_dir / "wandb_run_id.txt").read_text().strip()
    assert len(offline_runs) == 1 and offline_runs[0].name.endswith(run_id)
    assert list(offline_runs[0].glob("*.wandb"))  # the run's records, for `wandb sync`


def test_logging_mirror_without_its_package_is_a_one_line_error(data_dir, tmp_path):
    # A fresh interpreter where importing tensorboard fails, as on an install without the extra.
    blocker = tmp_path / "site"
    (blocker / "tensorboard").mkdir(parents=True)
    (blocker / "tensorboard" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    result = subprocess.run(
        trainer_cmd(data_dir, tmp_path / "log", "--tensorboard"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "uv sync --extra loggers" in result.stderr


def test_init_from_openai_weights_offline_fails_at_once_in_one_line(data_dir, tmp_path, monkeypatch):
    """Without the weights in the cache: HF_HUB_OFFLINE set, or a Hub that cannot be reached (here a
    closed local port as the endpoint, the same on any machine): one line saying which, decided
    before transformers is asked to download (which alone retries for ~30 s before giving up)."""
    env = {**run_env(), "HF_HOME": str(tmp_path / "empty_hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        trainer_cmd(data_dir, tmp_path / "log", "--init-from", "gpt2"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: --init-from gpt2: not in the local")
    assert "HF_HUB_OFFLINE is set" in lines[0]

    from huggingface_hub import constants  # the same loader in-process, the Hub unreachable instead

    import checkpoint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(
        ValueError, match=f"not in the local Hugging Face cache, and the Hub \\({closed}\\) is not reachable"
    ):
        checkpoint.load_hf_model("gpt2", flag="--init-from")


# ---------------------------------------------------------------------------- nothing lost, nothing silent


def finished_copy(straight_run, tmp_path: Path, stop_after: int | None = None) -> Path:
    """A copy of the straight run's log dir; with `stop_after`, as it was right after that step's
    checkpoint (later checkpoints removed; metrics.jsonl still holds what came after)."""
    log_dir = tmp_path / "log"
    shutil.copytree(straight_run["log_dir"], log_dir)
    if stop_after is not None:
        for path in log_dir.glob("model_*.pt"):
            if path.name == "model_final.pt" or int(path.stem.split("_")[1]) > stop_after:
                path.unlink()
    return log_dir


@pytest.mark.timeout(300)
def test_resume_lists_changed_settings_and_refuses_those_that_change_the_run(straight_run, data_dir, tmp_path, capsys):
    log_dir = finished_copy(straight_run, tmp_path, stop_after=15)
    base = [*BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir)]
    for flags, listed in (
        (["--tokens-per-step", "256"], "--tokens-per-step 128 -> 256"),
        (["--seed", "7"], "--seed 1337 -> 7"),
        (["--no-shuffle"], "--shuffle True -> False"),
    ):
        code, err = _main_in_process([*base, *flags], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and listed in lines[0] and "--allow-config-change" in lines[0], err
    assert sorted(p.name for p in log_dir.glob("model_*.pt")) == ["model_00005.pt", "model_00010.pt", "model_00015.pt"]

    # learning rate and step budget: allowed, and said
    code, out, _ = _run_main([*base, "--max-lr", "1e-3", "--max-steps", "18"], capsys)
    assert code == 0
    assert "changed since the checkpoint: --max-lr 0.003 -> 0.001" in out
    assert "changed since the checkpoint: --max-steps 20 -> 18" in out
    # an intended change of the batch: continues from the same token position
    log_dir2 = finished_copy(straight_run, tmp_path / "b", stop_after=15)
    code, out, _ = _run_main(
        [
            *BASE_FLAGS,
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(log_dir2),
            "--tokens-per-step",
            "256",
            "--allow-config-change",
        ],
        capsys,
    )
    assert code == 0 and "--tokens-per-step 128 -> 256" in out
    assert torch.load(log_dir2 / "model_final.pt", weights_only=True)["loader"]["rows_consumed"] == 15 * 4 + 5 * 8


def test_finished_run_says_what_to_type_and_refuses_other_settings(straight_run, data_dir, tmp_path, capsys):
    log_dir = finished_copy(straight_run, tmp_path)
    base = [*BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir)]
    code, out, _ = _run_main(base, capsys)  # a requeued job that has nothing left: exit 0, and says so
    assert code == 0 and "training already finished" in out and f"--log-dir {log_dir}_2" in out
    code, err = _main_in_process([*base, "--recipe", "fast", "--max-steps", "20"], capsys)  # looks like a new run
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "finished run with other settings" in lines[0]
    assert "--optimizer 'adamw' -> 'muon'" in lines[0] and "--log-dir" in lines[0]


@pytest.mark.timeout(300)
def test_resume_drops_every_record_logged_after_the_checkpoint_whatever_its_type(straight_run, data_dir, tmp_path):
    """metrics.jsonl is cut back to its length at the checkpoint: a record type the trainer does
    not know (a new eval, a user's note) logged after the checkpoint is not repeated either."""
    log_dir = finished_copy(straight_run, tmp_path, stop_after=10)
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "probe", "step": 12, "value": 1.0}) + "\n")
        f.write('{"type": "train", "step": 13, "trai')  # and a line torn by the kill
    run_ok(trainer_cmd(data_dir, log_dir), tmp_path)
    assert not [r for r in read_metrics(log_dir) if r["type"] == "probe"]
    assert_train_steps_once(log_dir)
    assert train_losses(log_dir) == straight_run["losses"]
    assert [r["step"] for r in records(log_dir, "val")] == [0, 10, 20]
    assert [r["step"] for r in records(log_dir, "sample")] == [10]  # the resumed run does not sample


def test_metrics_log_cuts_back_to_the_checkpoint_length(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", True)
    log.clear()
    log.write({"type": "train", "step": 0, "train_loss": 1.0})
    state = log.state_dict()
    log.write({"type": "new_eval", "step": 1, "score": 0.5})
    resumed = MetricsLog(tmp_path / "metrics.jsonl", True)
    resumed.load_state_dict(state)
    assert [json.loads(line)["type"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ["train"]


@pytest.mark.timeout(200)
def test_diverged_run_never_saves_a_checkpoint(data_dir, tmp_path, capsys):
    """A loss that turns NaN between log steps (--log-every 10) before a checkpoint step
    (--ckpt-every 5): the run stops before saving non-finite weights, with one line."""
    log_dir = tmp_path / "log"
    argv = [
        *BASE_FLAGS,
        "--data-dir",
        str(data_dir),
        "--log-dir",
        str(log_dir),
        "--log-every",
        "10",
        "--max-lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--grad-clip",
        "0",
        "--val-every",
        "0",
    ]
    code, err = _main_in_process(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "finite" in lines[0] and "lower --max-lr" in lines[0], err
    assert not list(log_dir.glob("model_*.pt")) and not list(log_dir.glob(".model_*"))
    # and save_checkpoint itself refuses non-finite weights
    cfg = TrainConfig(
        model="tiny",
        data_dir=str(data_dir),
        micro_batch_size=2,
        seq_len=32,
        tokens_per_step=128,
        device="cpu",
        val_every=0,
    )
    run = train_gpt2.build_run(cfg, CPU)
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(train_gpt2.Diverged):
        train_gpt2.save_checkpoint(
            run, MetricsLog(tmp_path / "m", False), tmp_path / "model_00001", step=1, evals_done=True, keep=None
        )
    assert not (tmp_path / "model_00001.pt").exists()


def test_negative_numbers_parse_and_bad_values_fail_before_anything_is_made(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    code, err = _main_in_process(
        [*BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--max-lr=-1e-3"], capsys
    )
    assert code == 2 and err.strip() == f"{cli.script_name()}: error: --max-lr must be positive, got -0.001"
    assert not log_dir.exists()  # refused while parsing: no folder left behind


def test_help_lists_choices_and_a_model_preset_brings_its_context():
    text = cli.build_parser(TrainConfig).format_help()
    for choices in (
        "{gpt2,gpt2-medium,gpt2-large,gpt2-xl,tiny}",
        "{auto,cpu,cuda,mps}",
        "{cosine,wsd}",
        "{auto,flash,cudnn,efficient,math}",
        "{adamw,muon}",
        "{,fast}",
    ):
        assert choices in text, choices
    assert "(default: gpt2)" in text and "(default: on)" in text  # --compile
    tiny = train_config.parse_args(["--model", "tiny"])
    assert tiny.seq_len == 256 and tiny.tokens_per_step == 524_288  # the reference batch, tiny's context
    tiny.check_world_size(8)
    assert train_config.parse_args(["--model", "tiny", "--seq-len", "128"]).seq_len == 128


@pytest.mark.timeout(200)
def test_token_id_out_of_range_names_the_shard_and_the_verify_command(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad_data"
    shutil.copytree(data_dir, bad)
    shard = bad / "edufineweb_train_000001.npy"  # read first with --no-shuffle
    tokens = np.load(shard)
    tokens[:] = np.random.default_rng(0).integers(0, 2**16, size=tokens.size, dtype=np.uint16)  # random bytes
    np.save(shard, tokens)
    code, err = _main_in_process(
        [*BASE_FLAGS, "--data-dir", str(bad), "--log-dir", str(tmp_path / "log"), "--no-shuffle"], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert str(shard) in lines[0] and "fineweb.py" in lines[0] and "--verify" in lines[0]


def test_step_line_shows_elapsed_time_and_eta(straight_run):
    lines = [line for line in straight_run["stdout"].splitlines() if re.match(r"step +\d+/20 \| loss ", line)]
    assert all(re.search(r"\| \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", line) for line in lines), lines[:2]
    assert lines[-1].endswith("eta 0:00:00")


@pytest.mark.timeout(200)
def test_checkpoints_and_metrics_follow_the_umask(data_dir, tmp_path):
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir, "--max-steps", "2", "--warmup-steps", "1", "--val-every", "0")
    result = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert result.returncode == 0, result.stderr
    for name in ("model_final.pt", "metrics.jsonl"):
        assert (log_dir / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_checkpoints_at_the_step_boundary_exits_130_and_resumes_exactly(straight_run, data_dir, tmp_path):
    """The first Ctrl-C (SIGINT to the process group, as a terminal sends it) is a stop request like
    SLURM's: one line, a checkpoint at the next step boundary, exit 130, no traceback; the rerun
    continues to the uninterrupted run's weights."""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir)
    out = _run_until_signal(cmd, tmp_path, log_dir, 1, signal.SIGINT, "sigint", expect_code=130, group=True)
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert "Ctrl-C: finishing this step and saving a checkpoint" in out
    stop_step = int(re.search(r"SIGINT: checkpoint saved at step (\d+)", out).group(1))
    assert last_train_step(log_dir) == stop_step - 1 and (log_dir / f"model_{stop_step:05d}.pt").exists()
    result = run_ok(cmd, tmp_path)
    assert f"resuming from {log_dir / f'model_{stop_step:05d}.pt'} at step {stop_step}" in result.stdout
    assert_same_weights(final_weights(log_dir), straight_run["weights"])
    assert train_losses(log_dir) == straight_run["losses"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, name, code", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_second_ctrl_c_or_sigterm_stops_at_once_without_a_checkpoint(data_dir, tmp_path, sig, name, code):
    """Steps of several seconds (4 micro-steps of 8 x 256): the second Ctrl-C (or SIGTERM: `kill`
    twice), 2 s after the first, ends the process during the step, before the checkpoint the first
    one asked for."""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(
        data_dir,
        log_dir,
        "--micro-batch-size",
        "8",
        "--seq-len",
        "256",
        "--tokens-per-step",
        "8192",
        "--val-every",
        "0",
        "--ckpt-every",
        "0",
    )
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=run_env(), stdout=open(tmp_path / "out", "w"), stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(proc, lambda: last_train_step(log_dir) >= 0, "train step 0")
        proc.send_signal(sig)
        time.sleep(2.0)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    out = (tmp_path / "out").read_text()
    assert proc.returncode == code and f"second {name}: stopping now, without a checkpoint" in out, out[-2000:]
    assert "Traceback" not in out and not list(log_dir.glob("model_*.pt"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_run_into_a_held_log_dir_is_refused_and_the_first_goes_on_untouched(straight_run, data_dir, tmp_path):
    """The same command twice at once: the second stops in one line naming the first (its pid and
    command), writes nothing, and the first ends as an uninterrupted run (its checkpoints, its
    metrics, each step once). The first is paused (SIGSTOP) while the second tries, so the two
    really overlap."""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir, "--sample-every", "10")
    first = start(cmd, tmp_path, tmp_path / "first.out")
    try:
        wait_for(first, lambda: last_train_step(log_dir) >= 2, "train step 2 of the first run")
        first.send_signal(signal.SIGSTOP)
        before = {p.name: p.stat().st_mtime_ns for p in log_dir.iterdir()}
        second = run(cmd, tmp_path)
        after = {p.name: p.stat().st_mtime_ns for p in log_dir.iterdir()}
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=RUN_TIMEOUT)
    finally:
        first.kill()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"{log_dir} is in use by another run (pid {first.pid} on " in second.stderr
    assert "train_gpt2.py" in second.stderr and "--log-dir" in second.stderr
    assert after == before  # the second run wrote nothing
    assert first.returncode == 0, (tmp_path / "first.out").read_text()[-2000:]
    assert_same_weights(final_weights(log_dir), straight_run["weights"])
    assert_train_steps_once(log_dir)
    assert len(records(log_dir, "config")) == 1


def test_log_dir_that_cannot_be_used_is_one_line_and_a_failed_start_leaves_no_folder(data_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for log_dir, expected in (
        (a_file, "is a file, not a folder"),
        (Path("/proc/self/no/log"), "cannot write in --log-dir"),
    ):
        code, err = _main_in_process([*BASE_FLAGS, "--data-dir", str(data_dir), "--log-dir", str(log_dir)], capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
    new = tmp_path / "new" / "log"
    code, err = _main_in_process([*BASE_FLAGS, "--data-dir", str(tmp_path / "no_data"), "--log-dir", str(new)], capsys)
    assert code == 2 and "no_data" in err
    assert not new.exists()  # the folder this run made, with nothing in it but its lock, is gone again


def test_a_run_that_cannot_fit_is_refused_before_it_starts(data_dir, tmp_path, capsys):
    """gpt2-xl on the CPU: the formula's estimate against the memory there is, in one line with the
    fixes, before any folder or model exists (it used to start, grow past 10 GB and never finish a
    step)."""
    log_dir = tmp_path / "log"
    code, err = _main_in_process(
        [
            "--model",
            "gpt2-xl",
            "--device",
            "cpu",
            "--data-dir",
            str(data_dir),
            "--log-dir",
            str(log_dir),
            "--micro-batch-size",
            "1",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "needs about" in err and "GiB per process" in err and "--parallel fsdp" in err and "--no-memory-check" in err
    assert not log_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_ctrl_c_under_torchrun_every_rank_stops_at_the_same_step(straight_run, data_dir, tmp_path):
    """Under torchrun Ctrl-C reaches every rank (torchrun forwards it): the ranks agree on the step
    through the log-step all-reduce, rank 0 saves once, no training process prints a traceback, and a
    rerun finishes with the 1-process run's loss curve. (torchrun itself reports the signal with
    its own SignalException traceback: that is torchrun's, not ours.)"""
    log_dir = tmp_path / "log"
    cmd = trainer_cmd(data_dir, log_dir, nproc=2)
    out = _run_until_signal(cmd, tmp_path, log_dir, 1, signal.SIGINT, "torchrun_sigint", expect_code=1, group=True)
    assert 'train_gpt2.py", line' not in out and "KeyboardInterrupt" not in out, out[-3000:]
    saved = re.findall(r"SIGINT: checkpoint saved at step (\d+)", out)
    assert len(saved) == 1, out[-3000:]  # rank 0 saves and says it, once
    stop_step = int(saved[0])
    assert last_train_step(log_dir) == stop_step - 1 and (log_dir / f"model_{stop_step:05d}.pt").exists()
    run_ok(cmd, tmp_path)
    assert_train_steps_once(log_dir)
    diffs = [abs(a - b) for a, b in zip(train_losses(log_dir), straight_run["losses"])]
    assert max(diffs) < 1e-5, f"loss curves differ by up to {max(diffs):.3g}"


@pytest.mark.timeout(300)
def test_core_in_training_is_logged_and_equals_core_py_on_the_final_weights(data_dir, tmp_path):
    """--core-every: CORE at steps 0 and 10 with every task's accuracy; the last one is what
    core_eval gives the saved final weights (the same scorer core.py uses). The task files are the
    hand-written fixtures of tests/data/core/ under every real task's name (--no-core-verify)."""
    import checkpoint
    import core_eval

    core_data = core_eval.stand_in_data_dir(tmp_path / "core_data", Path(__file__).parent / "data" / "core")
    log_dir = tmp_path / "log"
    run_ok(
        trainer_cmd(
            data_dir,
            log_dir,
            "--core-every",
            "10",
            "--core-data",
            str(core_data),
            "--no-core-verify",
            "--core-max-per-task",
            "0",
            "--max-steps",
            "10",
            "--val-every",
            "0",
        ),
        tmp_path,
    )
    cores = records(log_dir, "core")
    assert [r["step"] for r in cores] == [0, 10]
    assert all(len(r["tasks"]) == len(core_eval.TASKS) and r["core_partial"] is None for r in cores)
    suite = core_eval.load_suite(core_data, verify=False)
    expected = core_eval.evaluate_core(checkpoint.load_model(log_dir / "model_final.pt"), suite, CPU)
    assert cores[-1]["core"] == expected["core"]
    assert cores[-1]["tasks"] == {label: t["accuracy"] for label, t in expected["tasks"].items()}
