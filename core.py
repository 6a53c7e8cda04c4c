"""CORE of a checkpoint (or a Hugging Face GPT-2): DCLM's 22-task in-context-learning score, the
field's GPT-2 yardstick (definition and data in core_eval.py; OpenAI's GPT-2 124M scores 0.1139).

    uv run core.py --download-only                        # fetch the 21 task files once (into core_data/)
    uv run core.py --checkpoint log/model_final.pt        # all 22 tasks (91,037 examples)
    uv run core.py --hf gpt2 --max-per-task 500           # a quick estimate, as nanochat's --max-per-task
    torchrun --standalone --nproc_per_node=8 core.py --checkpoint log/model_final.pt

Prints each task's accuracy and centered accuracy, then CORE, and appends one JSON object to
core_results.jsonl in the checkpoint's folder (its run's log dir; --log-dir chooses another; log/
for --hf). Under torchrun the forwards are split across ranks; the numbers are identical to one
process. Autocast as --precision auto picks it (bf16, or fp16 on a GPU without bf16 units), float32 on
CPU and on Apple's MPS. Files missing from --data-dir are downloaded (pinned llm-foundry commit, each
file checked); --allow-missing evaluates what is there instead and reports CORE-PARTIAL over those
tasks, which is not CORE.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import cli
import core_eval
from cli import DEFAULT_CHECKPOINT, DEFAULT_LOG_DIR, DEVICE_CHOICES, DEVICE_HELP, UserError, field, parse_config

RESULTS_FILE = "core_results.jsonl"


@dataclass(frozen=True)
class CoreConfig:
    checkpoint: str = field(
        "",
        f"our checkpoint to evaluate, a model_*.pt file or model_* folder (default {DEFAULT_CHECKPOINT} "
        "unless --hf is given)",
    )
    hf: str = field("", "a Hugging Face GPT-2 name or folder instead (gpt2, gpt2-medium, an export_hf.py output)")
    data_dir: str = field(core_eval.DEFAULT_DATA_DIR, "where the task files are cached (downloaded there once)")
    data_url: str = field(
        core_eval.DATA_URL,
        "where to download them from: llm-foundry's scripts/eval/local_data at the pinned commit, or a mirror of it",
    )
    verify: bool = field(True, "check each task file's size and hash (--no-verify for hand-made files)")
    download_only: bool = field(False, "download the task files to --data-dir, check them, and exit")
    allow_missing: bool = field(
        False, "evaluate the tasks whose files are there and report CORE-PARTIAL (not CORE) instead of failing"
    )
    tasks: str = field("", "comma-separated task labels to evaluate (default: all 22; a subset reports CORE-PARTIAL)")
    max_per_task: int = field(
        0,
        "evaluate the first N of each task's shuffled examples (0: all; else at least "
        f"{core_eval.MAX_SHOTS + 1}, for the 10 shots)",
    )
    batch_size: int = field(0, "sequences per forward, at most (0: 128 on a GPU, 16 on CPU; long prompts get fewer)")
    log_dir: str = field(
        "",
        f"append the result to <log-dir>/{RESULTS_FILE} (default: the checkpoint's folder; {DEFAULT_LOG_DIR} for --hf)",
    )
    device: str = field("auto", DEVICE_HELP, choices=DEVICE_CHOICES)
    compile: bool = field(False, "torch.compile the model (CUDA only: ignored elsewhere)")

    def __post_init__(self):
        if self.checkpoint and self.hf:
            raise UserError("give --checkpoint or --hf, not both")
        if self.batch_size < 0:
            raise UserError("--batch-size must be >= 0")
        if self.max_per_task < 0 or 0 < self.max_per_task <= core_eval.MAX_SHOTS:
            raise UserError(
                f"--max-per-task {self.max_per_task}: use 0 (all) or at least {core_eval.MAX_SHOTS + 1} "
                f"(a 10-shot task draws 10 other examples for each)"
            )
        try:
            core_eval.select_tasks(self.task_labels)
        except UserError as e:
            raise UserError(f"--tasks: {e}") from None

    @property
    def task_labels(self) -> tuple[str, ...]:
        return tuple(label.strip() for label in self.tasks.split(",") if label.strip())


def parse_args(argv=None) -> CoreConfig:
    return parse_config(CoreConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import fileio
import runtime
import scoring


def fetch_data(cfg: CoreConfig, dist_info: runtime.DistInfo | None) -> dict[str, str]:
    """Rank 0 downloads the chosen tasks' missing files; every rank learns whether it could.
    Returns {file: why} for files it could not get (an error unless --allow-missing)."""
    files = sorted({task.file for task in core_eval.select_tasks(cfg.task_labels)})
    failed, error = {}, None
    if dist_info is None or dist_info.is_main:
        try:
            failed = core_eval.download(cfg.data_dir, files, cfg.data_url, verify=cfg.verify)
        except (ValueError, OSError) as e:
            error = e
    if dist_info is not None and dist_info.distributed:
        ok = torch.tensor([0 if error or (failed and not cfg.allow_missing) else 1], device=dist_info.device)
        dist.broadcast(ok, src=0)
        if not ok.item() and error is None and not failed:
            error = UserError("rank 0 could not get the CORE task files: see its message")
    if error:
        raise error
    if failed and not cfg.allow_missing:
        name, why = next(iter(failed.items()))
        if cfg.download_only:  # this IS the download: the fix is another machine or a mirror
            raise UserError(
                f"{why} ({len(failed)} file(s) not downloaded): no network here? Run this command on a machine "
                f"with network and copy {cfg.data_dir} here, or pass --data-url to a mirror"
            )
        raise UserError(
            f"{why}: no network here? Run `uv run core.py --download-only --data-dir {cfg.data_dir}` on a machine "
            f"with network and copy {cfg.data_dir} here, pass --data-url to a mirror, or --allow-missing for "
            f"CORE-PARTIAL without the {len(failed)} missing file(s)"
        )
    return failed


def evaluate(cfg: CoreConfig, dist_info: runtime.DistInfo) -> dict:
    device = dist_info.device
    fetch_data(cfg, dist_info)
    suite = core_eval.load_suite(cfg.data_dir, cfg.task_labels, cfg.max_per_task, cfg.verify, cfg.allow_missing)
    evaluated = checkpoint.load_evaluated(cfg.checkpoint, cfg.hf, cfg.log_dir, device)
    runtime.configure_device(device)
    model = runtime.compile_model(evaluated.model, cfg.compile, warn=dist_info.is_main)
    compiled = model is not evaluated.model

    start = time.perf_counter()
    rows = len(core_eval.build(suite, scoring.unwrap(model).config.block_size).sequences)  # tokenized once, here
    prepared = time.perf_counter()
    with tqdm(
        total=rows,
        unit="seq",
        desc="core",
        disable=not dist_info.is_main,
        mininterval=1 if sys.stderr.isatty() else 30,
        dynamic_ncols=True,
    ) as bar:

        def progress(n: int) -> None:  # this rank's rows, scaled to all ranks' (each runs every world_size-th batch)
            bar.update(min(rows - bar.n, n * dist_info.world_size))

        result = core_eval.evaluate_core(
            model,
            suite,
            dist_info,
            autocast=runtime.autocast(device),
            batch_size=cfg.batch_size or None,
            progress=progress,
            fixed_shapes=compiled,
        )
        bar.update(rows - bar.n)
    seconds = time.perf_counter() - start
    record = {
        "checkpoint": evaluated.checkpoint,
        "model": cfg.hf or None,
        "step": evaluated.step,
        "core": result["core"],
        "core_partial": result["core_partial"],
        "missing": sorted(result["missing"]),
        "max_per_task": cfg.max_per_task,
        "count": result["count"],
        "tasks": result["tasks"],
        "seconds": round(seconds, 3),
        "tokenize_seconds": round(prepared - start, 3),
        "device": runtime.device_name(device),
        "world_size": dist_info.world_size,
        "time": time.time(),
    }
    if dist_info.is_main:
        filed = fileio.append_result(evaluated.results_dir, RESULTS_FILE, record)
        print("\n".join(core_eval.summary_lines(result)))
        name = cfg.hf or f"{evaluated.checkpoint} (step {evaluated.step})"
        print(
            f"core | {name} | {result['count']:,} examples, {result['rows']:,} sequences | {seconds:.1f} s "
            f"({prepared - start:.1f} s tokenizing; {result['count'] / seconds:,.1f} examples/s) | {filed}"
        )
    return record


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        if cfg.download_only:  # no model, no process group: a login node only needs the network
            failed = fetch_data(cfg, None)
            core_eval.load_suite(cfg.data_dir, cfg.task_labels, verify=cfg.verify, allow_missing=True)
            print(f"CORE task files ready in {cfg.data_dir}" + (f" except {', '.join(failed)}" if failed else ""))
            return 0
        evaluate(cfg, runtime.setup_distributed(cfg.device))
        return 0
    finally:
        runtime.teardown_distributed()


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
