"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration, for the 2-D
hidden matrices of the transformer blocks. AdamW keeps the embeddings (tied with the head), the
LayerNorms and the biases (see train_gpt2.make_optimizer).

    uv run python -c "import torch, muon; print(muon.newton_schulz(torch.randn(64, 32)).T.float().matmul(\\
        muon.newton_schulz(torch.randn(64, 32)).float()).diagonal()[:4])"

Why: a gradient matrix of a transformer is nearly low-rank; orthogonalising the update (keeping its
singular vectors, setting its singular values to ~1) makes every direction move at the same rate.
Keller Jordan et al. (2024) used it to cut the GPT-2 speedrun's time; the iteration's quintic
coefficients (3.4445, -4.7750, 2.0315) are theirs, chosen to push singular values into roughly
[0.7, 1.2] in 5 steps rather than to converge exactly. The code here is written from that
description.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from runtime import local_part, whole

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    grad: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (U S V^T -> ~U V^T), in `dtype` (bf16; fp16 on a GPU
    without bf16 units: the matrix is first scaled to norm <= 1, well inside fp16's range).

    The quintic iteration X <- aX + (bXX^T + c(XX^T)^2)X maps each singular value s to
    a s + b s^3 + c s^5; after scaling the matrix to spectral norm <= 1 (via the Frobenius norm),
    5 steps bring every singular value into a band near 1. Works on the wide orientation so the
    Gram matrix X X^T is the small one."""
    if grad.ndim != 2:
        raise ValueError(f"newton_schulz takes a matrix, got shape {tuple(grad.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.t()  # (rows <= cols)
    x = x / (x.norm() + eps)  # Frobenius >= spectral norm, so all singular values <= 1
    for _ in range(steps):
        gram = x @ x.t()  # (rows, rows)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if tall else x


def this_ranks_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) split as `like` is: each rank keeps its own rows, no communication."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. Per step, for each matrix W with gradient G:

        m <- momentum * m + G                      (the momentum buffer, in the checkpoint)
        u <- G + momentum * m   (Nesterov)  or  m
        W <- W - lr * max(1, rows/cols)^0.5 * NS(u)

    A parameter group may set `split` = k to orthogonalise k equal row blocks separately: the
    fused attention projection c_attn (3C, C) is q, k and v stacked, three matrices of their own.

    Under FSDP2 each rank holds a block of rows of W, of its gradient and of m (DTensors). The
    momentum stays sharded; u is all-gathered (in ns_dtype: bf16, fp16 on older GPUs), every rank
    orthogonalises every whole matrix (the same numbers everywhere: no broadcast needed) and keeps its
    own rows of the result. That repeats the Newton-Schulz work on each rank; spreading the matrices over the ranks and
    broadcasting the results would not, at the cost of one more collective per matrix.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon: lr must be > 0 and momentum in [0, 1), got {lr}, {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, split=1)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # runtime.half_dtype: a dtype the device computes natively
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 or p.size(0) % group["split"]:
                    raise ValueError(f"Muon takes 2-D matrices whose rows divide by split, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, split = group["momentum"], group["split"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                # ns_dtype before the all-gather (FSDP2): Newton-Schulz starts with that cast anyway, so the
                # numbers are the same and half the bytes cross the network.
                blocks = whole(update.to(self.ns_dtype)).chunk(split, dim=0)  # q, k, v for c_attn; else the matrix
                ortho = torch.cat([newton_schulz(b, group["ns_steps"], dtype=self.ns_dtype) for b in blocks]).to(
                    p.dtype
                )
                scale = max(1.0, blocks[0].size(0) / blocks[0].size(1)) ** 0.5
                local_part(p).add_(local_part(this_ranks_part(ortho, p)), alpha=-group["lr"] * scale)
        return loss


class CombinedOptimizer:
    """Several optimizers stepped as one (AdamW for some parameters, Muon for the rest), with one
    state_dict for checkpoints. `param_groups` lists every group, so the trainer sets every learning
    rate in one loop (a group's `lr_scale`, if any, scales the schedule: Muon's peak vs AdamW's)."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
