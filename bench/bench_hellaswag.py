"""Benchmark: the batched HellaSwag scorer against a one-example-at-a-time loop, same model, one run.

The loop is the reference's strategy (written here from its description, not copied): for each
example, its 4 rows (ctx + " " + ending) padded to the longest, one forward, cross-entropy over every
position, masked to the ending, summed / averaged per row. The batched scorer is
hellaswag_eval.evaluate_hellaswag, reference style (the same numbers). Both run in float32 on the same
examples with the same random-init model; their accuracies must agree. On CPU:

    uv run bench/bench_hellaswag.py                         # tiny preset, 300 examples, ~1 minute on 2 cores
    uv run bench/bench_hellaswag.py --model gpt2 --examples 100
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from cli import field, parse_config  # noqa: E402
from train_config import MODEL_PRESETS  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "hellaswag_val_300.jsonl"  # 300 real examples shipped with the repo


@dataclass(frozen=True)
class BenchConfig:
    model: str = field(
        "tiny", "model preset (random init: speed does not depend on the weights)", choices=tuple(MODEL_PRESETS)
    )
    examples: int = field(300, "the first N validation examples")
    batch_size: int = field(
        16, "rows per forward of the batched scorer (on CPU small batches keep the logits in cache)"
    )
    data: str = field(
        str(FIXTURE.relative_to(ROOT)), "a hellaswag_val.jsonl (e.g. hellaswag/hellaswag_val.jsonl, the full set)"
    )
    device: str = field("cpu", "cpu or cuda", choices=("cpu", "cuda"))


def parse_args(argv=None) -> BenchConfig:
    return parse_config(BenchConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import runtime  # noqa: E402
from hellaswag_eval import evaluate_hellaswag, load_examples  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import get_encoding  # noqa: E402


@torch.no_grad()
def one_at_a_time(model: GPT, examples: list[dict], device: torch.device, autocast) -> tuple[float, float]:
    """(acc, acc_norm) with one forward of 4 rows per example."""
    enc = get_encoding()
    correct = correct_norm = 0
    for example in examples:
        context = enc.encode(example["ctx"])
        endings = [enc.encode(" " + ending) for ending in example["endings"]]
        T = max(len(context) + len(e) for e in endings)
        tokens = torch.zeros(4, T, dtype=torch.long)
        mask = torch.zeros(4, T, dtype=torch.long)
        for i, ending in enumerate(endings):
            row = context + ending
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(context) : len(row)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast:
            logits, _ = model(tokens)
        # position t predicts token t + 1: shift, take every position's loss, keep the ending's
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, T - 1)
        shifted_mask = mask[:, 1:]
        sum_loss = (losses * shifted_mask).sum(dim=1)
        mean_loss = sum_loss / shifted_mask.sum(dim=1)
        correct += int(sum_loss.argmin().item() == example["label"])
        correct_norm += int(mean_loss.argmin().item() == example["label"])
    return correct / len(examples), correct_norm / len(examples)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    device = torch.device(cfg.device)
    dist_info = runtime.DistInfo(rank=0, local_rank=0, world_size=1, device=device, is_main=True)
    autocast = runtime.autocast(device)
    examples = load_examples(cfg.data, limit=cfg.examples, verify=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_PRESETS[cfg.model])).to(device).eval()
    print(
        f"{cfg.model}: {model.num_params():,} parameters | {len(examples)} examples | torch {torch.__version__} | "
        f"{runtime.device_name(device)}, {torch.get_num_threads()} threads"
    )

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, time.process_time() - cpu_start

    (loop_acc, loop_norm), loop_s, loop_cpu = timed(lambda: one_at_a_time(model, examples, device, autocast))
    result, batch_s, batch_cpu = timed(
        lambda: evaluate_hellaswag(
            model, examples, dist_info, autocast, styles=("reference",), batch_size=cfg.batch_size
        )
    )
    n = len(examples)
    print(
        f"one at a time (4 rows/forward): {n / loop_s:8.1f} examples/s  ({loop_s:.1f} s wall, {loop_cpu:.1f} s CPU)"
        f"  acc {loop_acc:.4f} acc_norm {loop_norm:.4f}"
    )
    print(
        f"batched ({cfg.batch_size} rows/forward):      {n / batch_s:8.1f} examples/s  ({batch_s:.1f} s wall, "
        f"{batch_cpu:.1f} s CPU)  acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}"
    )
    print(f"speed-up: {loop_s / batch_s:.2f}x wall, {loop_cpu / batch_cpu:.2f}x CPU time")
    if (loop_acc, loop_norm) != (result["acc"], result["acc_norm"]):
        print("warning: the two methods disagree (a near-tie in float arithmetic?)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
