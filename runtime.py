"""Where a run executes: distributed setup, the device and its precision policy, its peak FLOPs (for MFU).

Everything that reads torchrun's environment lives here; the rest of the code takes the
`DistInfo` record it returns. The precision policy (bf16 autocast and TF32 on CUDA, float32 on CPU,
torch.compile on CUDA only) is decided here once, for the trainer, hellaswag.py, sample.py and bench.py.

    uv run python -c "import runtime; print(runtime.setup_distributed('cpu'))"
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


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


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda -> a torch.device (one GPU per process under torchrun)."""
    if flag not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {flag!r}: use auto, cpu or cuda")
    if flag == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible: use --device cpu (or auto)")
    if flag == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs visible: "
            "set torchrun --nproc_per_node to the number of GPUs"
        )
    return torch.device("cuda", local_rank)


def setup_distributed(device_flag: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else run alone.
    NCCL on GPUs, gloo on CPU. Multi-node works through torchrun's rendezvous environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
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
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank,
                                    world_size=world_size, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, device, rank == 0)


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
    return isinstance(e, RuntimeError) and dist.is_initialized() and any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused", "Timed out",
        "timed out", "NCCL communicator was aborted", "ProcessGroupNCCL"))


# FSDP2's sharded tensors (DTensors) are recognised by their methods: importing
# torch.distributed.tensor for an isinstance check would cost every script ~0.8 s at start-up.
def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor under FSDP2); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, all-gathered from the ranks' shards (a DTensor under FSDP2); any other as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


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


def autocast(device: torch.device):
    """The compute precision of forward passes: bf16 autocast on CUDA, plain float32 on CPU (bf16
    matmuls are slow on most CPUs). A context manager, reusable."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiles(device: torch.device, enabled: bool, on_cpu: bool = False, warn: bool = True) -> bool:
    """Whether --compile takes effect on `device`: on CUDA; on CPU compiling costs more than it saves,
    so `enabled` is ignored there (with a warning when `warn`) unless `on_cpu` (--compile-on-cpu:
    the compiled path tested without a GPU, with inductor's C++ backend)."""
    if enabled and device.type != "cuda" and not on_cpu:
        if warn:
            warnings.warn("--compile is ignored on CPU (compiling costs more than it saves there)", stacklevel=3)
        return False
    return enabled


def compile_model(model: torch.nn.Module, enabled: bool, mode: str = "default", warn: bool = True,
                  on_cpu: bool = False) -> torch.nn.Module:
    """torch.compile `model` where `compiles` says so; the model as it is otherwise."""
    if not compiles(next(model.parameters()).device, enabled, on_cpu, warn):
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def sdpa_backend(name: str):
    """Context forcing one scaled-dot-product-attention kernel ('auto': PyTorch's own choice).
    A forced kernel that cannot run the inputs raises instead of silently falling back."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([kernel])


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


# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets. Matched
# against torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("A6000", 154.8),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device`, or None where unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak_per_device: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction: achieved training FLOP/s over the devices' peak.
    None when the peak is unknown; clamped to 1.0, since more than the peak means a wrong entry."""
    if not peak_per_device or tokens_per_sec <= 0:
        return None
    return min(1.0, flops_per_token * tokens_per_sec / (peak_per_device * world_size))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
