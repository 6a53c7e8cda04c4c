"""Where a run executes: distributed setup, the device and its precision policy, its peak FLOPs (for MFU),
and the stop signals a process gets (StopFlag: SIGTERM / SIGUSR1 / Ctrl-C at a step boundary).

Everything that reads torchrun's environment lives here; the rest of the code takes the
`DistInfo` record it returns. The precision policy (bf16 autocast and TF32 on CUDA, float32 on CPU,
torch.compile on CUDA only) is decided here once, for the trainer, the evaluations, sample.py and the benchmarks.

    uv run python -c "import runtime; print(runtime.setup_distributed('cpu'))"
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import DEVICE_CHOICES, PRECISIONS, UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the one process that prints, logs and writes checkpoints

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def mps_available() -> bool:
    """Whether this process can use Apple silicon's GPU (torch's MPS backend)."""
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda|mps -> a torch.device (one GPU per process under torchrun). auto: a CUDA
    GPU, else Apple silicon's GPU, else the CPU."""
    if flag not in DEVICE_CHOICES:
        raise UserError(f"--device {flag!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if flag == "mps" and not mps_available():
        raise UserError(
            "--device mps but this machine has no MPS device (Apple silicon, macOS 12.3+): use --device cpu"
        )
    if flag == "mps" or (flag == "auto" and not torch.cuda.is_available() and mps_available()):
        return torch.device("mps")
    if flag == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible: "
            "set torchrun --nproc_per_node to the number of GPUs"
        )
    return torch.device("cuda", local_rank)


def setup_distributed(device_flag: str = "auto", timeout_minutes: float = 30) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.
    NCCL on GPUs, gloo on CPU. Multi-node works through torchrun's rendezvous environment.
    timeout_minutes: how long a collective may wait for the slowest rank. NCCL's default, 10 minutes,
    is shorter than rank 0 writing a gpt2-xl checkpoint (~19 GB) on a slow filesystem while the others
    wait in the next collective; a dead rank is noticed by torchrun at once, not through this timeout."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if device.type == "mps" and world_size > 1:
        raise UserError(
            f"{world_size} ranks on MPS: a Mac has one GPU and torch has no MPS backend for collectives; run one "
            "process (python/uv run, not torchrun), or --device cpu for gloo ranks"
        )
    if device.type == "cuda":
        check_cuda_build(device)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker torchrun started
        stop_with_parent(signal.SIGTERM)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # torchrun keeps one store for all the attempts of a job (--max-restarts): keys written by
            # the ranks of a failed attempt (e.g. gloo's listening addresses) are still there, and a
            # new rank that reads a dead rank's address fails ("Connection refused", measured). Each
            # attempt gets its own key prefix.
            store, _, _ = next(dist.rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                store=dist.PrefixStore(f"attempt{attempt}", store),
                rank=rank,
                world_size=world_size,
                device_id=device if device.type == "cuda" else None,
                timeout=datetime.timedelta(minutes=timeout_minutes),
            )
    return DistInfo(rank, local_rank, world_size, device, rank == 0)


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the process that started it dies (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). torchrun starts each worker in a session of its own, so a
    SIGKILLed torchrun (kill -9, the OOM killer) left its workers training on into the log dir, where a
    rerun then met them. With SIGTERM the trainer's stop flag checkpoints at the next step boundary if
    the ranks can still agree, and otherwise the first collective fails and the rank exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def host_names() -> list[str]:
    """The host name of every rank, in rank order (a collective under torchrun: every rank calls it)."""
    name = socket.gethostname()
    if not dist.is_initialized():
        return [name]
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return names


def is_peer_failure(e: BaseException) -> bool:
    """Did a collective fail because another rank died (its connection closed or timed out)?"""
    text = str(e)
    return (
        isinstance(e, RuntimeError)
        and dist.is_initialized()
        and any(
            s in text
            for s in (
                "Connection reset by peer",
                "Connection closed by peer",
                "Broken pipe",
                "Connection refused",
                "Timed out",
                "timed out",
                "NCCL communicator was aborted",
                "ProcessGroupNCCL",
            )
        )
    )


def is_out_of_memory(e: BaseException) -> bool:
    """Did the device run out of memory? CUDA raises torch.OutOfMemoryError; MPS's allocator a plain
    RuntimeError ("MPS backend out of memory (MPS allocated: ...")."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and str(e).startswith("MPS backend out of memory")
    )


# FSDP2's sharded tensors (DTensors) are recognised by their methods: importing
# torch.distributed.tensor for an isinstance check would cost every script ~0.8 s at start-up.
def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor under FSDP2); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, all-gathered from the ranks' shards (a DTensor under FSDP2); any other as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; alone, `obj` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_problem(problem: str | None, name_rank: bool = True) -> str | None:
    """What stops the job, the same on every rank: each rank says what stops it (None: nothing) and
    all learn the first rank's problem, named with that rank and its host (`name_rank`). A collective
    (every rank calls it), so a rank that must refuse does not leave the others waiting in their next
    collective until they conclude it died ("lost contact"). Alone: `problem` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    said = [None] * dist.get_world_size()
    dist.all_gather_object(said, (problem, socket.gethostname()))
    failing = [(rank, text, host) for rank, (text, host) in enumerate(said) if text]
    if not failing:
        return None
    rank, text, host = failing[0]
    if not name_rank:
        return text
    others = f" (and {len(failing) - 1} more rank(s))" if len(failing) > 1 else ""
    return f"rank {rank} on {host}{others}: {text}"


def agree_min(value: int) -> int:
    """The smallest of every rank's `value` (a collective; alone: `value`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return min(values)


def env_world_size() -> int:
    """The number of ranks torchrun announces (1 without torchrun), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun announces it, before (or without) a process group: for
    printing a start-up error once instead of once per rank."""
    return int(os.environ.get("RANK", "0"))


# ---- the precision policy ----------------------------------------------------------------------
def configure_device(device: torch.device) -> None:
    """Process-wide math settings: TF32 for any float32 matmul left outside autocast on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Precision:
    """How forward passes compute. bf16 / fp16: autocast to that dtype over float32 weights; the
    residual stream, LayerNorms, softmax and loss stay float32. fp16's 5 exponent bits overflow past
    65,504 and underflow small gradients, so an fp16 run scales its loss (LossScaler). None: float32
    throughout (the CPU's default: bf16 matmuls are slow on most CPUs). Asking for bf16 or fp16 on a
    CPU runs that policy there, so the tests can check what it does without a GPU."""

    device_type: str
    dtype: torch.dtype | None  # the autocast dtype, None = no autocast

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def scaled(self) -> bool:
        """Whether the loss must be scaled (fp16: gradients below 6e-8 would flush to zero)."""
        return self.dtype == torch.float16

    def autocast(self):
        """A reusable context manager for a forward pass."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# AMD Instinct / Radeon architectures (gcnArchName) with bf16 matrix cores: MI200 (gfx90a), MI300
# (gfx94x), MI350 (gfx95x), RDNA 3 and 4 (gfx11xx, gfx12xx). Older (MI100, gfx908: bf16 at fp32's
# rate; gfx906) compute fp16 natively.
AMD_BF16_ARCHS = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: NVIDIA from Ampere (sm80: A100, RTX 30xx) on, AMD
    from MI200. torch.cuda.is_bf16_supported() says yes on a V100 or T4 too, where bf16 is emulated:
    slower than fp32, and flash / memory-efficient attention refuse it (the math kernel's T^2 memory)."""
    if device.type != "cuda":
        return device.type == "cpu"  # CPU autocast takes bf16 (the tests ask for it); MPS: see precision
    return has_bf16_units(gpu_arch(device))


def gpu_arch(device: torch.device) -> tuple[int, int] | str:
    """A CUDA device's NVIDIA compute capability, (9, 0) for an H100; under ROCm its AMD architecture,
    "gfx942" for an MI300X (gcnArchName)."""
    if torch.version.hip:
        return torch.cuda.get_device_properties(device).gcnArchName
    return torch.cuda.get_device_capability(device)


def has_bf16_units(arch: tuple[int, int] | str) -> bool:
    """Whether a GPU of this architecture (`gpu_arch`'s) multiplies bf16 natively: NVIDIA sm80+, AMD
    AMD_BF16_ARCHS."""
    if isinstance(arch, str):
        return arch.startswith(AMD_BF16_ARCHS)
    return tuple(arch) >= (8, 0)


def gpu_precision(arch: tuple[int, int] | str) -> str:
    """--precision auto on a GPU of this architecture (`gpu_arch`'s): bf16 where it has bf16 units,
    else fp16 with loss scaling."""
    return "bf16" if has_bf16_units(arch) else "fp16"


def half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit dtype `device` multiplies fastest (Muon's Newton-Schulz runs in it): bf16 where it is
    native (and on the CPU, whose numbers the tests pin), fp16 on older CUDA GPUs, float32 on MPS."""
    if device.type == "mps":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def auto_precision(device: torch.device) -> str:
    """--precision auto: bf16 where the GPU computes it natively (sm80+, AMD MI200+), fp16 with loss
    scaling on older GPUs (V100 sm70, T4 / RTX 20xx sm75, MI100), fp32 on CPU and on Apple's MPS
    (torch's MPS autocast covers fewer ops; --precision fp16 asks for it)."""
    if device.type != "cuda":
        return "fp32"
    return gpu_precision(gpu_arch(device))


def precision(device: torch.device, name: str = "auto") -> Precision:
    """--precision auto|bf16|fp16|fp32 on `device` (auto: `auto_precision`). bf16 on a GPU that only
    emulates it is refused in one line: slower than fp32, and no fused attention kernel takes it."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        name = auto_precision(device)
    elif name == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UserError(
            f"--precision bf16 on {device_name(device)}, which has no bf16 matrix units (it emulates bf16, slower "
            "than fp32, and flash attention refuses it): use --precision auto (fp16 with loss scaling) or fp32"
        )
    elif name == "bf16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError(
            "--precision bf16 on a Mac needs macOS 14 (Sonoma) or newer, whose Metal has bf16: update macOS, or use "
            "--precision auto (fp32) or fp16"
        )
    return Precision(device.type, DTYPES[name])


def autocast(device: torch.device, name: str = "auto"):
    """The forward passes' precision context on `device` (see Precision)."""
    return precision(device, name).autocast()


class LossScaler:
    """Dynamic loss scaling for fp16 (a checkpoint part): the loss is multiplied by `scale` before
    backward, so that small gradients do not flush to zero in fp16, and the gradients are divided by
    it before clipping and the optimizer. A step whose gradients overflowed (a non-finite gradient
    norm: the global norm, the same on every rank, also under FSDP2 where each rank holds a shard) is
    not applied and the scale halves; after GROWTH_INTERVAL good steps in a row it doubles. Off (bf16,
    fp32): scale 1, nothing skipped. torch.amp.GradScaler decides per rank, from its gradients alone:
    under FSDP2 an inf in one rank's shard would skip the step there only."""

    INITIAL, GROWTH_INTERVAL, MIN_SCALE = 2.0**16, 2000, 2.0**-14

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = self.INITIAL if enabled else 1.0
        self.good_steps = 0  # in a row, since the last overflow or growth

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What backward starts from: the loss times the scale (off: the loss itself, no extra op)."""
        return loss * self.scale if self.enabled else loss

    def unscale_(self, parameters) -> None:
        """Divide the gradients by the scale, in place (after the last micro-step's backward)."""
        if not self.enabled:
            return
        grads = [local_part(p.grad) for p in parameters if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, grad_norm: float) -> str | None:
        """After a step whose unscaled gradients have the global norm `grad_norm`: why its update must
        be skipped (an overflow; the scale halved), or None (and the scale may grow)."""
        if not self.enabled:
            return None
        if not math.isfinite(grad_norm):
            self.scale, self.good_steps = max(self.scale / 2, self.MIN_SCALE), 0
            return f"fp16 gradients overflowed: update skipped, loss scale lowered to {self.scale:g}"
        self.good_steps += 1
        if self.good_steps == self.GROWTH_INTERVAL:
            self.scale, self.good_steps = self.scale * 2, 0
        return None

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.scale, self.good_steps = state["scale"], state["good_steps"]

    # A checkpoint of a bf16 / fp32 run has no scaler state: resumed in fp16 (other hardware) the
    # scaler starts afresh, as a new run's would (checkpoint.resume_problem reads this).
    fresh_if_missing = True


def check_cuda_build(device: torch.device) -> None:
    """Refuse, in one line, a GPU the installed torch has no kernels for (its first kernel would fail
    with "no kernel image is available"): CUDA 12.8+ and 13 builds start at Turing (sm75), so a V100
    (sm70) needs a CUDA 12.6 build. A build runs a GPU whose sm_XY it lists, or a newer one through a
    compute_XY (PTX) entry it can compile."""
    if torch.version.hip:
        return
    arches = torch.cuda.get_arch_list()
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    built = {int(a.split("_")[1]) for a in arches if a.startswith("sm_")}
    ptx = [int(a.split("_")[1]) for a in arches if a.startswith("compute_")]
    if not arches or cap in built or any(p <= cap for p in ptx):
        return
    if cap < min(built, default=0):
        fix = (
            "install a CUDA 12.6 build of torch, the last that has it: `uv pip install --reinstall torch "
            "--index-url https://download.pytorch.org/whl/cu126` (docs/your_gpu.md)"
        )
    else:
        fix = "install a newer torch (`uv lock --upgrade-package torch && uv sync`) (docs/your_gpu.md)"
    raise UserError(
        f"{torch.cuda.get_device_name(device)} (sm_{cap}) is not among the GPUs this torch {torch.__version__} "
        f"was built for ({' '.join(sorted(a for a in arches if a.startswith('sm_')))}): {fix}"
    )


def compiles(device: torch.device, enabled: bool, on_cpu: bool = False, warn: bool = True) -> bool:
    """Whether --compile takes effect on `device`: on CUDA, where Triton is installed; on CPU compiling
    costs more than it saves, so `enabled` is ignored there (with a warning when `warn`) unless
    `on_cpu` (--compile-on-cpu: the compiled path tested without a GPU, with inductor's C++ backend);
    on MPS torch.compile is experimental: ignored. Without Triton (native Windows, some clusters)
    inductor cannot generate GPU kernels: eager, with a warning."""
    if not enabled:
        return False
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        if warn:
            warnings.warn(
                "--compile needs Triton, which is not installed here (native Windows, some clusters): running "
                "eager (on Windows, WSL2 has it)",
                stacklevel=3,
            )
        return False
    if device.type == "mps" or (device.type == "cpu" and not on_cpu):
        if warn:
            where = (
                "on MPS (torch.compile's MPS backend is experimental)"
                if device.type == "mps"
                else "on CPU (compiling costs more than it saves there)"
            )
            warnings.warn(f"--compile is ignored {where}", stacklevel=3)
        return False
    return True


def compile_model(
    model: torch.nn.Module, enabled: bool, mode: str = "default", warn: bool = True, on_cpu: bool = False
) -> torch.nn.Module:
    """torch.compile `model` where `compiles` says so; the model as it is otherwise."""
    if not compiles(next(model.parameters()).device, enabled, on_cpu, warn):
        return model
    return torch.compile(model, **compile_kwargs(mode, getattr(model, "attention_backend", "auto")))


def compile_kwargs(mode: str = "default", attention_backend: str = "auto") -> dict:
    """torch.compile's arguments for --compile-mode and the model's attention backend. Forced to
    "math", inductor's pattern matcher is switched off: it recognises the math kernel's matmul /
    softmax / matmul and rewrites it into PyTorch's fused attention (measured on CPU: FLASH's kernel
    ran), which would time another kernel than the one asked for. (torch.compile takes a mode or
    options, not both: TrainConfig refuses math with another mode.)"""
    if attention_backend == "math":
        return {"options": {"pattern_matcher": False}}
    return {"mode": None if mode == "default" else mode}


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if dist.is_initialized():
        dist.barrier()


def teardown_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group; after an error, without the barrier (a dead peer never reaches it).
    First collect garbage: an FSDP2 model is a reference cycle holding the group and its last
    collectives; left to the interpreter's exit, gloo's threads were torn down mid-way (rank 1 died of
    "terminate called without an active exception" after a finished run, once in ~10)."""
    if dist.is_initialized():
        gc.collect()
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


# Dense (no sparsity) tensor-core peaks per GPU, TFLOP/s, (bf16, fp16), from NVIDIA's and AMD's
# datasheets and architecture whitepapers (their headline figures assume 2:4 sparsity: twice these).
# bf16 None: the card has no bf16 matrix units (V100, T4, RTX 20xx, MI100's runs at a quarter rate).
# GeForce cards multiply fp16/bf16 with fp32 accumulation (what autocast's matmuls use) at half their
# fp16-accumulate headline: these are the fp32-accumulate rates (AI TOPS / 8 from Ada on). Each key is
# matched as whole words of torch.cuda.get_device_name() ("NVIDIA A100-SXM4-80GB" -> NVIDIA A100 SXM4
# 80GB), case aside, so "L4" is not found in "L40", nor "H200" in "GH200"; the first match wins, so a
# variant ("H100 PCIe", "RTX 4080 SUPER") comes before its family's default. Unlisted: --peak-tflops.
PEAK_TFLOPS: tuple[tuple[str, float | None, float], ...] = (
    ("H100 PCIe", 756.0, 756.0),
    ("H100 NVL", 835.0, 835.0),
    ("H100", 989.4, 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0, 835.0),
    ("H200", 989.4, 989.4),  # SXM
    ("GH200", 989.4, 989.4),  # the Hopper GPU of Grace Hopper
    ("H800 PCIe", 756.0, 756.0),
    ("H800", 989.4, 989.4),  # SXM
    ("GB200", 2500.0, 2500.0),  # per Blackwell GPU of Grace Blackwell (NVL72: 180 PFLOP/s dense for 72)
    ("B200", 2250.0, 2250.0),
    ("A100", 312.0, 312.0),
    ("A800", 312.0, 312.0),
    ("A30", 165.0, 165.0),
    ("A40", 149.7, 149.7),
    ("L40S", 362.05, 362.05),
    ("L40", 181.05, 181.05),
    ("L4", 121.0, 121.0),
    ("A10G", 70.0, 70.0),
    ("A10", 125.0, 125.0),
    ("V100S", None, 130.0),
    ("V100 PCIe", None, 112.0),
    ("V100", None, 125.0),  # SXM2
    ("T4", None, 65.0),
    ("RTX 6000 Ada", 364.2, 364.2),  # workstation cards: full-rate fp32 accumulation
    ("RTX A6000", 154.8, 154.8),
    ("RTX A5000", 111.1, 111.1),
    ("RTX A4000", 76.7, 76.7),
    ("TITAN RTX", None, 130.5),
    ("RTX 5090", 209.5, 209.5),  # GeForce: the fp32-accumulate rate
    ("RTX 5080", 112.6, 112.6),
    ("RTX 5070 Ti", 87.9, 87.9),
    ("RTX 5070", 61.8, 61.8),
    ("RTX 4090", 165.2, 165.2),
    ("RTX 4080 SUPER", 104.5, 104.5),
    ("RTX 4080", 97.5, 97.5),
    ("RTX 4070 Ti SUPER", 88.2, 88.2),
    ("RTX 4070 Ti", 80.2, 80.2),
    ("RTX 4070 SUPER", 71.0, 71.0),
    ("RTX 4070", 58.3, 58.3),
    ("RTX 3090 Ti", 80.0, 80.0),
    ("RTX 3090", 71.0, 71.0),
    ("RTX 3080 Ti", 68.2, 68.2),
    ("RTX 3080", 59.5, 59.5),
    ("RTX 3070", 40.6, 40.6),
    ("RTX 3060", 25.6, 25.6),
    ("RTX 2080 Ti", None, 53.8),  # Turing: reference-board clocks
    ("RTX 2080 SUPER", None, 44.6),
    ("RTX 2080", None, 40.3),
    ("RTX 2070 SUPER", None, 36.3),
    ("RTX 2070", None, 29.9),
    ("RTX 2060", None, 25.8),
    ("MI325X", 1307.4, 1307.4),  # AMD Instinct
    ("MI300X", 1307.4, 1307.4),
    ("MI300A", 980.6, 980.6),
    ("MI250X", 383.0, 383.0),
    ("MI250", 362.1, 362.1),
    ("MI210", 181.0, 181.0),
    ("MI100", None, 184.6),
)


def peak_flops_of_name(name: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s at `precision` (bf16 or fp16) of the GPU torch names `name`; None where it is
    not listed, or has no units for that precision."""
    words = name.upper().replace("-", " ").split()
    for key, bf16, fp16 in PEAK_TFLOPS:
        want = key.upper().split()
        if any(words[i : i + len(want)] == want for i in range(len(words) - len(want) + 1)):
            tflops = {"bf16": bf16, "fp16": fp16}.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def peak_flops(device: torch.device, precision: str = "bf16", tflops: float = 0.0) -> float | None:
    """Dense peak FLOP/s of `device` at the run's `precision`: `tflops` (--peak-tflops) when given, else
    the table's; None where unknown (CPU, MPS, an unlisted GPU, float32)."""
    if tflops:
        return tflops * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_of_name(torch.cuda.get_device_name(device), precision)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"cpu ({os.cpu_count()} cores)"


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class StopFlag:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit) and the first Ctrl-C (SIGINT) ask for
    a checkpoint at the next step boundary; a second Ctrl-C or a second SIGTERM, more than a second
    after the first, aborts at once (exit 130 / 143, no checkpoint). (Within a second it is the same
    request delivered twice: by the terminal, or a `kill` of the process group, and by a launcher that
    forwards it.) SIGUSR1 then SIGTERM is SLURM's time limit arriving during the checkpoint USR1 asked
    for: the checkpoint goes on (SLURM's SIGKILL follows after its KillWait).

    "At once" whatever the process is computing: Python runs a signal handler only between bytecodes
    of the main thread, so during one long C++ call (a gpt2-xl backward on a CPU: 30 s and more) the
    handler waits for it to return. The abort is therefore decided by a watcher thread, woken by the
    signal number the C-level handler writes to a pipe (signal.set_wakeup_fd) as the signal arrives:
    torch's long calls release the GIL, so the thread runs while they do."""

    SAME_PRESS_SECONDS = 1.0
    ABORTS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}

    def __init__(self):
        self.signal_name: str | None = None
        self.interrupted_at: float | None = None
        self.first_at: dict[int, float] = {}  # signal -> when it first came (the handler's view)
        self.quiet = env_rank() != 0  # one message per job, not one per rank
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) of the watcher's pipe
        self._previous_wakeup = -1

    def install(self) -> dict:
        """Handle the stop signals from now on (main thread only); returns the handlers they had, for
        `uninstall`."""
        previous = {
            sig: signal.signal(sig, self._handle)
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT)
            if sig is not None
        }
        if hasattr(os, "pipe") and os.name == "posix":
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)  # the C handler must never block on a full pipe
            self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            self._wakeup = (read_end, write_end)
            threading.Thread(target=self._watch, args=(read_end,), name="stop-signals", daemon=True).start()
        return previous

    def uninstall(self, previous: dict) -> None:
        """Put back the handlers `install` replaced, and stop the watcher."""
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read_end, write_end = self._wakeup
            os.close(write_end)  # the watcher reads end-of-file and returns
            self._wakeup = None

    def _say(self, text: str) -> None:
        if not self.quiet:
            os.write(2, text.encode())  # a signal handler must not use print (it may interrupt one)

    def _abort_if_repeated(self, signum: int, first_at: dict[int, float]) -> None:
        """Exit now if `signum` is an abort signal that first came more than SAME_PRESS_SECONDS ago."""
        now = time.monotonic()
        first = first_at.setdefault(signum, now)
        if signum in self.ABORTS and now - first > self.SAME_PRESS_SECONDS:
            name, code = self.ABORTS[signum]
            self._say(f"\nsecond {name}: stopping now, without a checkpoint\n")
            os._exit(code)

    def _watch(self, read_end: int) -> None:
        arrivals: dict[int, float] = {}  # the watcher's own record: it may see a signal before the handler
        try:
            while data := os.read(read_end, 64):
                for signum in data:
                    self._abort_if_repeated(signum, arrivals)
        finally:
            os.close(read_end)

    def _handle(self, signum, frame) -> None:
        if signum in self.first_at:
            self._abort_if_repeated(signum, self.first_at)
            return
        self.first_at[signum] = time.monotonic()
        if signum == signal.SIGINT:
            self.interrupted_at = self.first_at[signum]
            self._say("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)\n")
        elif signum == signal.SIGTERM:
            self._say("\nSIGTERM: finishing this step and saving a checkpoint (SIGTERM again to stop at once)\n")
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (a checkpoint at the next step boundary, then exit)."""
        return self.signal_name is not None

    @property
    def interrupted(self) -> bool:
        return self.interrupted_at is not None


class RandomState:
    """Every random state a run draws from, as a checkpoint part. The CUDA one only when the run is on
    a GPU: asking for it otherwise creates a CUDA context on GPU 0 for every rank of a --device cpu run
    on a GPU host."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "mps": torch.mps.get_rng_state() if self.device.type == "mps" else None,
            "numpy": {
                "key": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        if state.get("mps") is not None and self.device.type == "mps":  # .get: checkpoints from before MPS
            torch.mps.set_rng_state(state["mps"])
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What waits for `device`'s queued work (None on a CPU: nothing is queued)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None
