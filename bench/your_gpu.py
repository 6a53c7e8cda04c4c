"""docs/your_gpu.md's table: for each common card, the precision `--precision auto` picks and the
micro-batch `--micro-batch-size auto` picks for GPT-2 124M and 350M (the reference's 524,288 tokens per
step, one GPU), computed by the trainer's own rules (runtime.auto_precision's, memory.py's formula),
not guessed. tests/test_your_gpu.py keeps the doc equal to this output.

    uv run bench/your_gpu.py            # the markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402
import runtime  # noqa: E402


class Card(NamedTuple):
    name: str
    free_gib: float  # what torch.cuda.mem_get_info reports free on an idle card (the CUDA context taken)
    arch: tuple[int, int] | str  # NVIDIA compute capability, or AMD architecture (gcnArchName)
    note: str

    @property
    def precision(self) -> str:
        """What --precision auto picks on it (runtime.auto_precision's rule)."""
        return runtime.gpu_precision(self.arch)


# The memory an idle card reports free: its size less ~0.5 GiB of CUDA context (an H100's 79.1 of 79.6).
CARDS = (
    Card("Tesla T4 (Colab, Kaggle)", 14.2, (7, 5), "sm75: fp16 with loss scaling"),
    Card("Tesla V100 16 GB", 15.3, (7, 0), "sm70: needs a CUDA 12.6 build of torch (below)"),
    Card("Tesla V100 32 GB", 31.3, (7, 0), "sm70: needs a CUDA 12.6 build of torch (below)"),
    Card("RTX 2080 Ti 11 GB", 10.3, (7, 5), "sm75"),
    Card("RTX 3060 12 GB", 11.3, (8, 6), "sm86"),
    Card("RTX 4080 / 4070 Ti SUPER 16 GB", 15.3, (8, 9), "sm89"),
    Card("RTX 3090 / 4090, A10G, L4 24 GB", 23.1, (8, 9), "sm86 / sm89"),
    Card("RTX 5090 32 GB", 31.1, (12, 0), "sm120"),
    Card("RTX A6000 / 6000 Ada, L40S 48 GB", 47.1, (8, 9), "sm86 / sm89"),
    Card("A100 40 GB", 39.1, (8, 0), "sm80"),
    Card("A100 / H100 80 GB", 79.1, (9, 0), "sm80 / sm90: the reference's 64"),
    Card("AMD MI250X (one GCD) 64 GB", 63.5, "gfx90a", "ROCm build of torch"),
    Card("AMD MI300X 192 GB", 191.5, "gfx942", "ROCm build of torch"),
)
TOKENS_PER_STEP, SEQ_LEN = 524_288, 1024


def micro_batch(model: str, card: Card) -> str:
    chosen, need = memory.fitting_micro_batch(
        model, "ddp", False, SEQ_LEN, TOKENS_PER_STEP, 1, card.precision, 0, card.free_gib * memory.GiB
    )
    if need > card.free_gib * memory.GiB:
        return "does not fit: `--activation-checkpointing`"
    return f"{chosen} (x{TOKENS_PER_STEP // (chosen * SEQ_LEN)}, ~{need / memory.GiB:.0f} GiB)"


def table() -> str:
    lines = [
        "| card | free memory | `--precision auto` | micro-batch auto, 124M | micro-batch auto, 350M | note |",
        "|---|---:|---|---|---|---|",
    ]
    for card in CARDS:
        lines.append(
            f"| {card.name} | {card.free_gib:.1f} GiB | {card.precision} | {micro_batch('gpt2', card)} | "
            f"{micro_batch('gpt2-medium', card)} | {card.note} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
