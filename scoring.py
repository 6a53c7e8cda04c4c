"""The one batched scorer behind HellaSwag and CORE: how likely a model finds the end of each sequence.

Every multiple-choice, schema and language-modeling evaluation in this repo reduces to the same
question about a token sequence whose last n tokens are the "continuation": the summed log p of those
n tokens given everything before them, and whether each of them is the model's greedy (argmax) pick.
`score_all` answers it for many sequences at once, across ranks; hellaswag_eval.py and core_eval.py
only build the sequences and turn the answers into accuracies.

What the numbers are: the log-probabilities come from float32 logits at the scored positions on every
device (GPT.forward's `positions`), and each sequence's sum is one reduction in a fixed order, so a
rerun on the same device gives the same bits, at any world size. Across devices they differ: under
bf16 autocast (CUDA's default) the transformer blocks compute in bf16 (8 bits of mantissa), so a
GPU's scores of a checkpoint differ from a CPU's float32 ones by far more than 1e-6, enough to flip a
near tie (not yet measured on a GPU).

    uv run python -c "import scoring, model, runtime, torch; \\
        m = model.GPT(model.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16)); \\
        d = runtime.DistInfo(0, 0, 1, torch.device('cpu'), True); \\
        print(scoring.score_all(m, [[1, 2, 3], [4, 5]], [2, 1], d))"
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import runtime
from cli import UserError
from tokenizer import EOT_TOKEN

# Rows (sequences) per forward when not given. A GPU wants big batches; on a CPU the (rows, T, 50257)
# float32 logits of more than ~16 HellaSwag rows (T ~ 100) fall out of cache and it gets slower.
DEFAULT_BATCH_ROWS = {"cuda": 128, "cpu": 16}
# Fixed shapes (a compiled model) round a batch's length up to a multiple of this: few distinct shapes.
LENGTH_MULTIPLE = 32


class Scores(NamedTuple):
    """Per sequence, every rank the same: `logprob` (N,) float64, the summed log p of its scored tokens;
    `greedy` (N,) bool, whether every scored token was the argmax of the model's prediction there."""

    logprob: np.ndarray
    greedy: np.ndarray


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def score_all(
    model,
    sequences: list[list[int]],
    n_scored: list[int],
    dist_info: runtime.DistInfo,
    autocast=None,
    batch_size: int | None = None,
    fixed_shapes: bool = False,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """`score_sequences` on this rank's share of the batches, all-reduced: every rank returns all
    scores, identical (bit for bit) to one process scoring them alone on the same kind of device
    (each row is computed in the same batch whatever the world size, and the all-reduce adds zeros)."""
    scores = score_sequences(
        model,
        sequences,
        n_scored,
        dist_info.device,
        autocast,
        batch_size,
        fixed_shapes,
        dist_info.rank,
        dist_info.world_size,
        progress,
        max_tokens,
    )
    if dist_info.distributed:
        dist.all_reduce(scores)  # each row is nonzero on exactly one rank: the sum is that row
    scores = np.asarray(scores.tolist(), dtype=np.float64).reshape(len(sequences), 2)
    return Scores(scores[:, 0], scores[:, 1] == np.asarray(n_scored, dtype=np.float64))


def plan_batches(
    lengths: list[int], batch_size: int, max_tokens: int | None, fixed_shapes: bool, block_size: int
) -> list[tuple[list[int], int, int]]:
    """(row indices, rows R, input length T) of each forward. Rows sorted by length, longest first (an
    out-of-memory shows at once); a batch takes up to `batch_size` rows and, with `max_tokens`, no more
    than max_tokens // T of them (the (R, T, vocab) logits are what fills memory). Depends on the
    lengths only: the same batches on every rank and for every world size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        T = lengths[order[start]] - 1  # the input is all but the last token
        if fixed_shapes:
            T = min(-(-T // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, block_size)
        R = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // T))
        rows = order[start : start + R]
        batches.append((rows, R if fixed_shapes else len(rows), T))
        start += len(rows)
    return batches


@torch.no_grad()
def score_sequences(
    model,
    sequences: list[list[int]],
    n_scored: list[int],
    device: torch.device,
    autocast=None,
    batch_size: int | None = None,
    fixed_shapes: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """For the last n_scored[i] tokens of each sequence, given the tokens before them: (N, 2) float32 on
    `device`, column 0 the summed log p, column 1 how many were the argmax prediction.

    Sequences longer than the model's context keep their last block_size + 1 tokens (the context is
    cut from the left; callers with another rule crop before). Batches (`plan_batches`) are padded on
    the right; batch j runs on rank j % world_size, so a row is computed in exactly the same batch
    whatever the world size. Rows of other ranks stay 0; a rank with a batch fewer than the others
    runs one forward of padding (as ValLoader pads validation). fixed_shapes (for a torch.compile'd
    model: the caller knows whether it compiled) pads each batch to its full row count and its length
    to a multiple of 32, so a compiled model sees a handful of shapes, not hundreds. `progress(rows)` is called after
    each of this rank's batches."""
    autocast = autocast if autocast is not None else nullcontext()
    batch_size = batch_size or DEFAULT_BATCH_ROWS.get(device.type, DEFAULT_BATCH_ROWS["cuda"])
    block_size = unwrap(model).config.block_size
    seqs = []
    for tokens, n in zip(sequences, n_scored, strict=True):
        if not 0 <= n <= block_size or n >= len(tokens):  # 0: nothing to score (log p 0, greedy)
            raise UserError(
                f"a continuation of {n} tokens does not fit the model's context of {block_size} "
                "tokens after at least one token of context"
            )
        seqs.append(tokens[-(block_size + 1) :])
    scores = torch.zeros(len(seqs), 2, dtype=torch.float32, device=device)
    batches = plan_batches([len(s) for s in seqs], batch_size, max_tokens, fixed_shapes, block_size)
    for rows, R, T in batches[rank::world_size]:
        _score_batch(model, seqs, n_scored, rows, R, T, scores, autocast, fixed_shapes)
        if progress is not None:
            progress(len(rows))
    # Every rank runs the same number of forwards (a sharded model all-gathers its weights in each):
    # a rank with one batch fewer runs one of padding, whose scores nobody reads.
    if len(batches[rank::world_size]) < -(-len(batches) // world_size):
        _, R, T = batches[-1] if fixed_shapes else ([], 1, 2)  # a shape a compiled model has seen
        padding = [EOT_TOKEN] * 3  # 2 scored tokens: a count a dynamic graph takes (1 is specialised)
        _score_batch(model, [padding], [2], [0], R, T, torch.zeros(1, 2, device=device), autocast, fixed_shapes)
    return scores


def _score_batch(
    model,
    seqs: list[list[int]],
    n_scored: list[int],
    rows: list[int],
    R: int,
    T: int,
    scores: torch.Tensor,
    autocast,
    fixed_shapes: bool = False,
) -> None:
    """One forward over `rows` right-padded to (R, T); writes their [summed log p, argmax hits] into
    those rows of `scores` (N, 2). The model runs its output layer only at the scored positions, and
    in float32 whatever the autocast (GPT.forward's `positions`: 6x faster for the tiny model on CPU
    than every position's logits). With fixed_shapes (a compiled model) the number of positions is
    marked dynamic, so that it is not one more shape to compile for."""
    device = scores.device
    inputs = np.full((R, T), EOT_TOKEN, dtype=np.int64)  # padding: never scored
    positions, targets, counts = [], [], []
    for r, i in enumerate(rows):
        seq, n = seqs[i], n_scored[i]
        L = len(seq) - 1
        inputs[r, :L] = seq[:-1]
        positions.extend(range(r * T + L - n, r * T + L))  # logits at these (row, t) predict...
        targets.extend(seq[L + 1 - n :])  # ...these tokens: the continuation's
        counts.append(n)
    # Each row's scored tokens as one row of a (rows, longest) table of indices into them, padded
    # with index 0 and masked: the per-row sums are then one reduction in a fixed order, the same
    # bits on every run (index_add_ sums with atomics on CUDA: the order, and the last bit, vary).
    n_max = max(counts, default=0)
    column = np.arange(n_max)[None, :]
    valid = column < np.asarray(counts)[:, None]  # (rows, n_max)
    take = np.where(valid, np.cumsum([0, *counts[:-1]])[:, None] + column, 0)
    inputs, positions, targets, take, valid, row_index = _to_device(
        device, inputs, positions, targets, take, valid, rows
    )
    if fixed_shapes:
        torch._dynamo.maybe_mark_dynamic(positions, 0)
    with autocast:
        logits = model(inputs, positions=positions)[0]  # (N, vocab) float32
    if not n_max:
        return  # nothing scored in this batch (its rows stay 0: log p 0, every token greedy)
    logprobs = logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    hits = (logits.argmax(dim=-1) == targets).float()  # (N,): the greedy pick is the true token
    per_token = torch.stack([logprobs, hits], dim=1)  # (N, 2)
    scores[row_index] = (per_token[take] * valid[..., None]).sum(dim=1)  # (rows, 2)


def _to_device(device: torch.device, *parts) -> list[torch.Tensor]:
    """Integer arrays / lists -> int64 tensors on `device` (each part keeps its shape), in ONE copy
    from pinned memory that does not make the host wait (one copy per part from pageable memory would,
    once per batch on a GPU)."""
    arrays = [np.asarray(part, dtype=np.int64) for part in parts]
    packed = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return [chunk.view(a.shape) for chunk, a in zip(packed.split([a.size for a in arrays]), arrays)]
