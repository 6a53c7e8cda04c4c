"""Evaluate a checkpoint (or a Hugging Face GPT-2) on HellaSwag's 10,042 validation examples.

    uv run hellaswag.py --checkpoint log/model_final.pt
    uv run hellaswag.py --hf gpt2                       # OpenAI's 124M through transformers
    uv run hellaswag.py --download-only                 # fetch the data once, e.g. on a login node
    uv run hellaswag.py --checkpoint CKPT --data tests/data/hellaswag_val_300.jsonl --no-verify \\
        --device cpu                                    # 300 shipped examples
    torchrun --standalone --nproc_per_node=8 hellaswag.py --checkpoint log/model_final.pt

Shows progress (examples done, examples/s) while it runs, then prints one line with both scoring
styles (reference = build-nanogpt's, harness = lm-evaluation-harness's; defined in hellaswag_eval.py
and docs/evaluation.md) and appends one JSON object to hellaswag_results.jsonl in the checkpoint's folder (its
run's log dir, where plot.py looks; --log-dir chooses another; log/ for --hf). Under torchrun the
examples are split across ranks; the numbers are identical to one process. Autocast as --precision
auto picks it (bf16, or fp16 on a GPU without bf16 units), float32 on CPU and on Apple's MPS (one
process: torchrun needs CUDA or the CPU).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import DEFAULT_CHECKPOINT, DEFAULT_LOG_DIR, DEVICE_CHOICES, DEVICE_HELP, UserError, field, parse_config
from cli import DEFAULT_HELLASWAG_DATA as DEFAULT_DATA_PATH

RESULTS_FILE = "hellaswag_results.jsonl"


@dataclass(frozen=True)
class HellaSwagConfig:
    checkpoint: str = field(
        "",
        f"our checkpoint to evaluate, a model_*.pt file or model_* folder (default {DEFAULT_CHECKPOINT} "
        "unless --hf is given)",
    )
    hf: str = field("", "a Hugging Face GPT-2 name or folder instead (gpt2, gpt2-medium, an export_hf.py output)")
    data: str = field("", f"a local hellaswag_val.jsonl (default: {DEFAULT_DATA_PATH}, downloaded there once)")
    verify: bool = field(True, "check the data file's sha256 (--no-verify for a deliberate subset)")
    download_only: bool = field(False, f"download the data to --data (or {DEFAULT_DATA_PATH}) and exit")
    limit: int = field(0, "evaluate the first N examples only (0: all 10,042)")
    batch_size: int = field(0, "sequences (one example's ending each) per forward (0: 128 on a GPU, 16 on CPU)")
    log_dir: str = field(
        "",
        "append the result to <log-dir>/hellaswag_results.jsonl (default: the checkpoint's "
        "folder, e.g. log_fast for log_fast/model_final.pt, where plot.py --log-dir log_fast reads it; "
        f"{DEFAULT_LOG_DIR} for --hf)",
    )
    device: str = field("auto", DEVICE_HELP, choices=DEVICE_CHOICES)
    compile: bool = field(False, "torch.compile the model (CUDA only; pays off for the full set on a big model)")

    def __post_init__(self):
        if self.checkpoint and self.hf:
            raise UserError("give --checkpoint or --hf, not both")
        if self.limit < 0 or self.batch_size < 0:
            raise UserError("--limit and --batch-size must be >= 0")


def parse_args(argv=None) -> HellaSwagConfig:
    return parse_config(HellaSwagConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import fileio
import runtime
from hellaswag_eval import NUM_ENDINGS, STYLES, download, evaluate_hellaswag, load_examples


def data_path(cfg: HellaSwagConfig, dist_info: runtime.DistInfo) -> Path:
    """--data as given (it must exist), or the default cache, downloaded once by rank 0."""
    if cfg.data:
        return Path(cfg.data)
    path, error = Path(DEFAULT_DATA_PATH), None
    if dist_info.is_main:
        try:
            download(path)
        except (ValueError, OSError) as e:
            error = e
    if dist_info.distributed:  # every rank learns whether rank 0 got the file
        ok = torch.tensor([0 if error else 1], device=dist_info.device)
        dist.broadcast(ok, src=0)
        if not ok.item() and error is None:
            error = UserError(f"rank 0 could not download {path}: see its message")
    if error:
        raise error
    return path


def evaluate(cfg: HellaSwagConfig, dist_info: runtime.DistInfo) -> dict:
    device = dist_info.device
    path = data_path(cfg, dist_info)
    examples = load_examples(path, limit=cfg.limit or None, verify=cfg.verify)
    evaluated = checkpoint.load_evaluated(cfg.checkpoint, cfg.hf, cfg.log_dir, device)
    runtime.configure_device(device)
    model = runtime.compile_model(evaluated.model, cfg.compile, warn=dist_info.is_main)

    start = time.perf_counter()
    with tqdm(
        total=len(examples),
        unit="ex",
        desc="hellaswag",
        disable=not dist_info.is_main,
        mininterval=1 if sys.stderr.isatty() else 30,
        dynamic_ncols=True,
    ) as bar:
        rows_done = 0

        def progress(rows: int) -> None:  # this rank's rows, scaled to examples of all ranks
            nonlocal rows_done
            rows_done += rows
            bar.update(min(len(examples), rows_done * dist_info.world_size // (NUM_ENDINGS * len(STYLES))) - bar.n)

        result = evaluate_hellaswag(
            model,
            examples,
            dist_info,
            autocast=runtime.autocast(device),
            batch_size=cfg.batch_size or None,
            progress=progress,
            fixed_shapes=model is not evaluated.model,  # compiled: a few shapes, not hundreds
        )
        bar.update(len(examples) - bar.n)
    seconds = time.perf_counter() - start
    record = {
        "checkpoint": evaluated.checkpoint,
        "model": cfg.hf or None,
        "step": evaluated.step,
        "acc": result["acc"],
        "acc_norm": result["acc_norm"],
        "harness_acc": result["harness_acc"],
        "harness_acc_norm": result["harness_acc_norm"],
        "count": result["count"],
        "seconds": round(seconds, 3),
        "time": time.time(),
    }
    if dist_info.is_main:
        filed = fileio.append_result(evaluated.results_dir, RESULTS_FILE, record)
        name = cfg.hf or f"{evaluated.checkpoint} (step {evaluated.step})"
        print(
            f"hellaswag | {name} | {result['count']:,} examples | reference acc {result['acc']:.4f} "
            f"acc_norm {result['acc_norm']:.4f} | harness acc {result['harness_acc']:.4f} "
            f"acc_norm {result['harness_acc_norm']:.4f} | {seconds:.1f} s "
            f"({result['count'] / seconds:,.1f} examples/s) | {filed}"
        )
    return record


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.download_only:  # no model, no process group: a login node only needs the network
            path = Path(cfg.data or DEFAULT_DATA_PATH)
            download(path)
            load_examples(path, verify=cfg.verify)
            print(f"HellaSwag validation data ready: {path}")
            return 0
        evaluate(cfg, runtime.setup_distributed(cfg.device))
        return 0
    finally:
        runtime.teardown_distributed()


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
