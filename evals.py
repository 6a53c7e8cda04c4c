"""The evaluations a training run makes as it goes: validation loss and bits per byte, HellaSwag, CORE
and samples; which of them are due at a step; the records they log.

    uv run python -c "import evals; print(evals.due(250, every={'val': 250, 'hellaswag': 0, \\
        'core': 0, 'sample': 250}, max_steps=19073, start_step=0, evals_done=False))"

Every function runs on every rank and returns the same records there (the main rank logs them):
validation is split across ranks and all-reduced, HellaSwag and CORE go through the one scorer
(scoring.py), and samples are drawn from a generator seeded by the step, the same on every rank.
Under FSDP2 every rank must join every forward, so none of them stops early on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import core_eval
import runtime
from cli import UserError
from dataloader import ValLoader
from hellaswag_eval import evaluate_hellaswag, load_examples
from model import generate
from tokenizer import EOT_TOKEN, get_encoding, token_byte_lengths

KINDS = ("val", "hellaswag", "core", "sample")


class Due(NamedTuple):
    val: bool
    hellaswag: bool
    core: bool
    sample: bool


def due(step: int, every: dict[str, int], max_steps: int, *, start_step: int, evals_done: bool) -> Due:
    """Which evaluations run before step `step`'s update: each every `every[kind]` steps (0: never)
    and at the last step, samples not at step 0; none on the resumed checkpoint's step when its
    evaluations were logged before it was saved."""
    if step == start_step and evals_done:
        return Due(False, False, False, False)
    at = {kind: bool(every[kind]) and (step % every[kind] == 0 or step == max_steps) for kind in KINDS}
    return Due(at["val"], at["hellaswag"], at["core"], at["sample"] and step > 0)


def load_hellaswag(path: str) -> list[dict]:
    """The examples --hellaswag-data names (any subset is scored; its count is logged), read at
    start-up: a missing or malformed file fails now, not after hours of training."""
    if not Path(path).is_file():
        raise UserError(
            f"HellaSwag file {path} not found: run `uv run hellaswag.py --download-only` on a machine with "
            "network (or pass --hellaswag-data PATH), or turn it off with --hellaswag-every 0"
        )
    return load_examples(path, verify=False)


def load_core(data_dir: str, max_per_task: int, verify: bool) -> core_eval.Suite:
    """The CORE tasks --core-data holds, cut to --core-max-per-task, read at start-up."""
    try:
        return core_eval.load_suite(
            data_dir, max_per_task=max_per_task, verify=verify, per_task_flag="--core-max-per-task"
        )
    except UserError as e:
        raise UserError(f"{e} (or turn CORE off with --core-every 0)") from None


@dataclass
class Evaluator:
    """What the evaluations of one run need, on this rank: the model they call (compiled or not:
    `compiled` says which, and the scorer then keeps its shapes fixed), its precision, the data."""

    model: torch.nn.Module
    compiled: bool
    autocast: object  # runtime.Precision.autocast(): a reusable context
    dist_info: runtime.DistInfo
    all_reduce: Callable[[torch.Tensor], torch.Tensor]  # a sum over ranks (parallel.Parallel.all_reduce)
    tokens_per_step: int
    val_loader: ValLoader | None = None
    hellaswag: list[dict] | None = None
    core: core_eval.Suite | None = None
    sample_prompt: str = ""
    seed: int = 0
    _val_bytes: int | None = None  # UTF-8 bytes of the text the val targets encode: counted once

    def records(self, step: int, due: Due) -> list[dict]:
        """The records of the evaluations `due` at `step`, in the reference's order."""
        base = {"step": step, "tokens": step * self.tokens_per_step}
        out = []
        if due.val:
            val_loss = self.validation_loss()
            out.append({"type": "val", **base, "val_loss": val_loss, "val_bpb": self.bits_per_byte(val_loss)})
        if due.hellaswag:
            out.append({"type": "hellaswag", **base, **self.hellaswag_scores()})
        if due.core:
            out.append({"type": "core", **base, **self.core_scores()})
        if due.sample:
            out.append({"type": "sample", "step": step, "samples": self.samples(step)})
        return out

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean cross-entropy over the fixed validation tokens, identical for any world/batch size.
        Padded rows (ValLoader keeps batch shapes fixed for compile) get target -1 and are ignored; an
        all-padding batch still runs its forward (under FSDP2 every rank must join every all-gather)."""
        device = self.dist_info.device
        # [sum of token losses, tokens] in float64, on the device (no host copy per batch); MPS has no
        # float64, so there they are summed on the host (one 4-byte copy per batch; one process only)
        sums_on = torch.device("cpu") if device.type == "mps" else device
        totals = torch.zeros(2, dtype=torch.float64, device=sums_on)
        for x, y, num_valid in self.val_loader:
            y = y.clone()
            y[num_valid:] = -1
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.autocast:
                _, loss = self.model(x, y)
            if num_valid == 0:
                continue  # all padding (ranks with fewer windows): nothing scored, the loss is NaN
            tokens = num_valid * y.size(1)
            totals[0] += loss.to(sums_on).double() * tokens
            totals[1] += tokens  # a scalar add where the sums are, not a host-to-device copy per batch
        self.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    def bits_per_byte(self, val_loss: float) -> float:
        """The validation loss in bits per UTF-8 byte of the text its targets encode (each target
        counted once; <|endoftext|> predicted like any token but 0 bytes): comparable across
        tokenizers. The bytes are the same at every validation: counted the first time (~10M lookups)."""
        targets = self.val_loader.targets
        if self._val_bytes is None:
            self._val_bytes = int(token_byte_lengths()[targets].sum())
        return val_loss * len(targets) / (math.log(2) * self._val_bytes)

    def hellaswag_scores(self) -> dict:
        """HellaSwag in the reference style (the user's metric; hellaswag.py adds the harness style),
        with the number of examples: a subset file gives a subset's score, and says so."""
        result = evaluate_hellaswag(
            self.model,
            self.hellaswag,
            self.dist_info,
            autocast=self.autocast,
            styles=("reference",),
            fixed_shapes=self.compiled,
        )
        return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"], "count": result["count"]}

    def core_scores(self) -> dict:
        """CORE (or CORE-PARTIAL over the tasks found), with each task's accuracy."""
        result = core_eval.evaluate_core(
            self.model, self.core, self.dist_info, autocast=self.autocast, fixed_shapes=self.compiled
        )
        return {
            "core": result["core"],
            "core_partial": result["core_partial"],
            "count": result["count"],
            "max_per_task": self.core.max_per_task,
            "tasks": {label: task["accuracy"] for label, task in result["tasks"].items()},
        }

    def samples(self, step: int, num_samples: int = 4, max_new_tokens: int = 32) -> list[str]:
        """Continuations of the prompt, the same on every rank (a generator seeded by the step, not the
        global RNG), from the model the evaluations call (compiled: two graphs, the prompt and one
        token at any cache length). Always max_new_tokens forwards, cut at <|endoftext|> afterwards."""
        enc = get_encoding()
        generator = torch.Generator(device=self.dist_info.device).manual_seed(self.seed + step)
        rows = generate(
            self.model,
            enc.encode(self.sample_prompt),
            max_new_tokens,
            num_samples=num_samples,
            top_k=50,
            generator=generator,
            autocast=self.autocast,
        )
        rows = [row[: row.index(EOT_TOKEN)] if EOT_TOKEN in row else row for row in rows]
        return [self.sample_prompt + enc.decode(row) for row in rows]
