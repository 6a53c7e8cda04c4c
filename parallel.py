"""How the model is spread over ranks: the one seam between the training loop and DDP.

The loop never asks which strategy runs (torchtitan's `parallelize` idea). It asks a `Parallel`:

    train_model, eval_model = parallel.prepare(model, compile=..., compile_mode=...)
    with parallel.gradient_sync(train_model, last_micro_step): ...   # reduce only on the last micro-step
    grad_norm = parallel.clip_grad_norm_(model, max_norm)            # the global norm, a plain tensor
    state = parallel.model_state_dict(model)                         # full weights for a checkpoint
    parallel.all_reduce(stats)                                       # a sum over ranks

One process: no wrapper, nothing to reduce. DDP (several ranks): every rank holds the whole model;
gradients are all-reduced in buckets during the last micro-step's backward. The model file never
imports torch.distributed; the checkpoint code gets full state dicts from here.

    uv run python -c "import parallel, runtime; print(parallel.parallelize(runtime.setup_distributed('cpu')))"
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime


class Parallel:
    """One process, or the base of the strategies: the model as it is."""

    name = "single"

    def __init__(self, dist_info: runtime.DistInfo):
        self.dist_info = dist_info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.dist_info.world_size})"

    def prepare(self, model: torch.nn.Module, compile: bool = False, compile_mode: str = "default",
                compile_on_cpu: bool = False):
        """(train_model, eval_model): what the training step calls and what evaluation calls."""
        compiled = runtime.compile_model(model, compile, compile_mode, warn=self.dist_info.is_main, on_cpu=compile_on_cpu)
        return self._wrap(compiled), compiled

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def gradient_sync(self, train_model: torch.nn.Module, enabled: bool):
        """A context for one micro-step's forward and backward: gradients are reduced across ranks
        only when `enabled` (the last micro-step of an optimizer step)."""
        return nullcontext()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to the global norm `max_norm` (0: measure only); returns that norm."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)

    def model_state_dict(self, model: torch.nn.Module) -> dict:
        """The full (unwrapped, unsharded) weights: no "module." / "_orig_mod." prefixes."""
        return model.state_dict()

    def load_model_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (and return it)."""
        return tensor

    @property
    def writes_checkpoints(self) -> bool:
        """Whether this rank writes the checkpoint file (whole-model strategies: the main rank)."""
        return self.dist_info.is_main


class DDPParallel(Parallel):
    """Data parallel: the whole model on every rank, gradients all-reduced (NCCL on GPUs, gloo on CPU)."""

    name = "ddp"

    def __init__(self, dist_info: runtime.DistInfo, bucket_mb: int = 25):
        super().__init__(dist_info)
        self.bucket_mb = bucket_mb

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # All-reduce in buckets of bucket_mb while the last micro-step's backward still runs.
        device = self.dist_info.device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=self.bucket_mb)

    def gradient_sync(self, train_model: DDP, enabled: bool):
        # no_sync covers the forward and the backward of a micro-step: gradients only accumulate
        return nullcontext() if enabled else train_model.no_sync()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor


def parallelize(dist_info: runtime.DistInfo, ddp_bucket_mb: int = 25) -> Parallel:
    """The strategy for this world size: the model as it is alone, DDP under torchrun."""
    if dist_info.distributed:
        return DDPParallel(dist_info, ddp_bucket_mb)
    return Parallel(dist_info)
