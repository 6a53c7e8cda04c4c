"""How the model is spread over ranks: the one seam between the training loop and DDP / FSDP2.

The loop never asks which strategy runs (torchtitan's `parallelize` idea). It asks a `Parallel`:

    train_model, eval_model = parallel.prepare(model, compile=..., compile_mode=...)
    with parallel.gradient_sync(train_model, last_micro_step): ...   # reduce only on the last micro-step
    grad_norm = parallel.clip_grad_norm_(model, max_norm)            # the global norm, a plain tensor
    parallel.count_nonfinite(model)                                  # weights that are NaN/inf, all ranks
    parallel.sharded                                                 # checkpoints: one file, or every rank's shards
    parallel.all_reduce(stats)                                       # a sum over ranks

- One process: no wrapper, nothing to reduce.
- DDP (`--parallel ddp`, several ranks): every rank holds the whole model, its gradients and its
  optimizer state; gradients are all-reduced in buckets during the last micro-step's backward; the
  main rank writes one checkpoint file (checkpoint.save_training_state).
- FSDP2 (`--parallel fsdp`, any number of ranks, one included): each block and the root (embeddings,
  tied head, final LayerNorm) are sharded with `fully_shard`; a rank holds 1/N of the fp32 weights,
  gradients and optimizer state, all-gathers a block's weights (bf16 on CUDA) just before it runs and
  reduce-scatters its gradients (fp32) after its backward. Every rank writes its shard of a DCP
  checkpoint folder. Any checkpoint loads into any strategy at any world size (checkpoint.py).

The model file never imports torch.distributed.

    uv run python -c "import parallel, runtime; print(parallel.parallelize(runtime.setup_distributed('cpu')))"
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import runtime
from cli import STRATEGIES, WITHOUT_CUDA_GRAPHS, UserError


class Parallel:
    """One process, or the base of the strategies: the model as it is."""

    name = "single"
    sharded = False  # checkpoints: one file from the main rank (every rank holds the whole model)

    def __init__(self, dist_info: runtime.DistInfo):
        self.dist_info = dist_info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.dist_info.world_size})"

    def prepare(
        self, model: torch.nn.Module, compile: bool = False, compile_mode: str = "default", compile_on_cpu: bool = False
    ):
        """(train_model, eval_model): what the training step calls and what evaluation calls. Under a
        mode that captures CUDA graphs the evaluations get a compile of their own without them: a
        graph replays fixed memory for fixed shapes, while validation, the scorer and sampling run
        shapes the training step never does (a graph per shape, each holding its own memory pool)."""
        compiled = runtime.compile_model(
            model, compile, compile_mode, warn=self.dist_info.is_main, on_cpu=compile_on_cpu
        )
        eval_mode = WITHOUT_CUDA_GRAPHS.get(compile_mode)
        if eval_mode is None or compiled is model:
            return self._wrap(compiled), compiled
        return self._wrap(compiled), runtime.compile_model(model, compile, eval_mode, warn=False, on_cpu=compile_on_cpu)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def gradient_sync(self, train_model: torch.nn.Module, enabled: bool):
        """A context for one micro-step's forward and backward: gradients are reduced across ranks
        only when `enabled` (the last micro-step of an optimizer step)."""
        return nullcontext()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients to the global norm `max_norm` (0: measure only); returns that norm."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)

    def count_nonfinite(self, model: torch.nn.Module) -> float:
        """How many weights are NaN or inf (counted over every rank's part; > 0 on every rank alike)."""
        bad = torch.stack([(~torch.isfinite(runtime.local_part(p))).sum() for p in model.parameters()]).sum().float()
        return self.all_reduce(bad).item()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (and return it); alone, there is nothing to sum."""
        if self.dist_info.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


class DDPParallel(Parallel):
    """Data parallel: the whole model on every rank, gradients all-reduced (NCCL on GPUs, gloo on CPU)."""

    name = "ddp"

    def __init__(self, dist_info: runtime.DistInfo, bucket_mb: int = 25):
        super().__init__(dist_info)
        self.bucket_mb = bucket_mb

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # All-reduce in buckets of bucket_mb while the last micro-step's backward still runs. The one
        # buffer (vocab_bias) is a constant every rank builds alike: no broadcast before each forward.
        device = self.dist_info.device
        return DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_mb,
            broadcast_buffers=False,
        )

    def gradient_sync(self, train_model: DDP, enabled: bool):
        # no_sync covers the forward and the backward of a micro-step: gradients only accumulate
        return nullcontext() if enabled else train_model.no_sync()


class FSDPParallel(Parallel):
    """Fully sharded data parallel (FSDP2, `fully_shard`): each block is one unit of all-gather /
    reduce-scatter, the root (embeddings, the tied lm_head, ln_f) another. One process works too:
    a one-rank group, nothing to communicate (the code path of a cluster, tested on a laptop)."""

    name = "fsdp"
    sharded = True  # checkpoints: a folder of every rank's shards (checkpoint.save_sharded)

    def __init__(self, dist_info: runtime.DistInfo, compute_dtype: torch.dtype | None = None):
        super().__init__(dist_info)
        self.compute_dtype = compute_dtype  # runtime.Precision.dtype: the blocks' gathered weights
        if not dist.is_initialized():  # alone: FSDP2 still needs a process group and a device mesh
            dist.init_process_group(
                "nccl" if dist_info.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )

    def prepare(
        self, model: torch.nn.Module, compile: bool = False, compile_mode: str = "default", compile_on_cpu: bool = False
    ):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = self.dist_info.device
        mesh = init_device_mesh(device.type, (self.dist_info.world_size,))
        blocks_policy, root_policy = self.mixed_precision()
        compile_blocks = runtime.compiles(device, compile, compile_on_cpu, warn=self.dist_info.is_main)
        for block in model.transformer.h:
            if compile_blocks:  # per block, before sharding (torchtitan's order): the FSDP hooks between
                # blocks stay outside the graphs; Module.compile keeps the parameter names
                block.compile(**runtime.compile_kwargs(compile_mode, block.attn.backend))
            fully_shard(block, mesh=mesh, mp_policy=blocks_policy)
        # The root: wte (= lm_head.weight, one tied parameter), wpe, ln_f. Kept gathered after the
        # forward: the tied weight is needed again at once by the output layer's backward.
        fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
        return model, model

    def mixed_precision(self):
        """(blocks' policy, root's policy). Under bf16 the numerics are those of one process with
        autocast: each block all-gathers its weights in bf16 (what autocast would cast them to) and
        computes under autocast, but its input is NOT cast (cast_forward_inputs=False): the residual
        stream x + attn(..) + mlp(..) stays float32 across the blocks, as it does without FSDP. The
        root (embeddings, tied head, ln_f) keeps float32 weights, so x starts float32 too (bf16
        embeddings would make the whole stream bf16); the head's matmul is cast by autocast. Gradients
        are reduce-scattered and the optimizer steps in float32 (the sharded master weights)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.compute_dtype is None:  # float32 throughout
            return MixedPrecisionPolicy(), MixedPrecisionPolicy()
        return (
            MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False),
            MixedPrecisionPolicy(reduce_dtype=torch.float32),
        )

    @contextmanager
    def gradient_sync(self, train_model: torch.nn.Module, enabled: bool):
        # Off: gradients accumulate unsharded on each rank; the last micro-step reduce-scatters the sum.
        train_model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        # Each rank holds a shard of every gradient: the norm of the shards is a partial sum until
        # it is reduced (full_tensor), then every rank clips its shards by the same global factor.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = runtime.whole(torch.nn.utils.get_total_norm(grads))
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total)
        return total


def parallelize(
    dist_info: runtime.DistInfo,
    strategy: str = "ddp",
    ddp_bucket_mb: int = 25,
    compute_dtype: torch.dtype | None = None,
) -> Parallel:
    """The strategy for `--parallel` at this world size: FSDP2 whenever asked (one rank included);
    DDP under torchrun; the model as it is alone. compute_dtype: runtime.Precision.dtype (FSDP2
    gathers the blocks' weights in it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--parallel {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and dist_info.device.type == "mps":
        raise UserError(
            "--parallel fsdp on MPS: FSDP2 needs collectives even for one rank, and gloo (a Mac's only process "
            "group) takes no MPS tensors: leave --parallel at its default (one process trains the whole model)"
        )
    if strategy == "fsdp":
        return FSDPParallel(dist_info, compute_dtype)
    if dist_info.distributed:
        return DDPParallel(dist_info, ddp_bucket_mb)
    return Parallel(dist_info)
