"""Benchmark: the exact loss over the real vocab (ours) against the previous vocab cut and against the
reference's plain full-logits loss, in the real training step; and validation with --loss-chunk-rows
with and without the weight gradient it used to compute under torch.no_grad. Same weights, same
tokens, one process, rounds alternating the variants so the machine's load hits all alike.

  ours   model.GPT.output: the padding columns get -inf from a fixed bias of the lm_head matmul, CE
         over 50304; with targets the forward returns the loss only (no logits output to keep)
  cut    the previous output: logits[..., :50257] then CE (copies the logits and their gradient)
  plain  the reference's: CE over all 50304 columns, logits returned too (scores the padding: not exact)

    uv run bench/bench_loss.py                        # the demo's step (tiny, 2 x 4 x 256), eager
    uv run bench/bench_loss.py --compile-on-cpu       # the same, torch.compile'd (inductor, C++)
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from cli import field, parse_config  # noqa: E402


@dataclass(frozen=True)
class LossBenchConfig:
    steps: int = field(5, "timed steps per variant per round")
    rounds: int = field(3, "rounds; each times every variant once, in turn")
    compile_on_cpu: bool = field(False, "torch.compile every variant (inductor) instead of eager")
    threads: int = field(1, "torch threads (1: the numbers do not depend on the other core's load)")


def parse_args(argv=None) -> LossBenchConfig:
    return parse_config(LossBenchConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import runtime  # noqa: E402
from dataloader import RandomTokens  # noqa: E402
from model import GPT, ChunkedLinearCrossEntropy  # noqa: E402
from train_gpt2 import TrainConfig, build_run, train_step  # noqa: E402


class CutLogits(GPT):
    def output(self, x, targets):
        V = self.config.vocab_size
        logits = self.lm_head(x)[..., :V]  # a strided view: reshape copies it, its backward zero-fills
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=-1)


class PlainLogits(GPT):
    def output(self, x, targets):
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


class ChunkedWithGrads(GPT):
    """The previous chunked loss: weight and input gradients computed even under torch.no_grad."""

    def output(self, x, targets):
        loss = ChunkedLinearCrossEntropy.apply(
            x.reshape(-1, x.size(-1)),
            self.lm_head.weight,
            targets.reshape(-1),
            self.config.vocab_size,
            self.loss_chunk_rows,
            True,
        )
        return None, loss


def time_steps(run, steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        train_step(run, step)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    bench = parse_args(argv)
    torch.set_num_threads(bench.threads)
    cfg = TrainConfig(
        model="tiny",
        seq_len=256,
        micro_batch_size=4,
        tokens_per_step=2048,
        device="cpu",
        val_every=0,
        compile_on_cpu=bench.compile_on_cpu,
    )
    cpu = runtime.DistInfo(0, 0, 1, torch.device("cpu"), True)
    runs = {}
    for name, cls in (("ours", GPT), ("cut", CutLogits), ("plain", PlainLogits)):
        run = build_run(cfg, cpu, train_loader=RandomTokens(4, 256, 50257, False, seed=0))
        run.model.__class__ = cls  # same weights and optimizer; only the output layer's loss differs
        run.train_model, run.evals.model = run.parallel.prepare(run.model, True, compile_on_cpu=bench.compile_on_cpu)
        train_step(run, 0)  # warm-up (and compilation)
        runs[name] = run
    times = {name: [] for name in runs}
    for _ in range(bench.rounds):
        for name, run in runs.items():
            times[name].append(time_steps(run, bench.steps))
    mode = "compiled (inductor)" if bench.compile_on_cpu else "eager"
    print(
        f"training step, tiny model, 2 x 4 x 256 tokens, CPU {mode}, {bench.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    ours = statistics.median(times["ours"])
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"  {name:6s} median {1000 * med:7.1f} ms/step  (rounds: {', '.join(f'{1000 * v:.1f}' for v in values)})"
            f"  {med / ours:.3f}x ours"
        )

    # Validation with --loss-chunk-rows 256: the loss alone vs the loss plus the gradients it did not need.
    val = {}
    for name, cls in (("ours", GPT), ("with grads", ChunkedWithGrads)):
        model = GPT(cfg.model_config)
        model.__class__ = cls
        model.loss_chunk_rows = 256
        model = runtime.compile_model(model, bench.compile_on_cpu, on_cpu=True)
        x = torch.randint(0, 50257, (4, 256), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(x, x)  # warm-up
            val[name] = []
            for _ in range(bench.rounds):
                start = time.perf_counter()
                for _ in range(bench.steps):
                    model(x, x)
                val[name].append((time.perf_counter() - start) / bench.steps)
    print(f"validation forward, --loss-chunk-rows 256, 4 x 256 tokens, under torch.no_grad, CPU {mode}")
    for name, values in val.items():
        med = statistics.median(values)
        print(f"  {name:10s} median {1000 * med:7.1f} ms  {med / statistics.median(val['ours']):.3f}x ours")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
