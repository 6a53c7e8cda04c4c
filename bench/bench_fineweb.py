"""Benchmark: fineweb.py's pipeline against the reference strategy, same machine, one run each.

Wall-clock tok/s is the figure that counts; CPU-seconds (process + workers) are printed too,
because on a machine shared with other jobs they show the cost per token that wall time hides.

The reference strategy (written here from its description, not copied): a pool of cpu_count()//2
workers fed one document at a time by `pool.imap(tokenize, dataset, chunksize=16)` from a
map-style `datasets.Dataset`; each document becomes [EOT] + encode_ordinary(text) as a Python
list, then a numpy array checked and cast to uint16; the main process appends the arrays to a
shard buffer and `np.save`s each full shard itself. Both read the `--input` parquet files (default:
the shipped demo corpus) repeated (symlinks) to >= 20M tokens from the same warm `datasets` cache
and write shards of the same size, which must come out byte-identical. On CPU:

    uv run bench/bench_fineweb.py                                 # ~1 minute on 2 cores
    uv run bench/bench_fineweb.py --input 'fineweb_sample/*.parquet'   # the recorded run: 2,800 FineWeb documents
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import fineweb  # noqa: E402
from cli import UserError  # noqa: E402
from tokenizer import EOT_TOKEN, get_encoding  # noqa: E402

DEMO = ROOT / "assets" / "demo" / "fineweb_demo.parquet"


def reference_tokenize(doc: dict) -> np.ndarray:
    enc = get_encoding()
    tokens = [EOT_TOKEN]
    tokens.extend(enc.encode_ordinary(doc["text"]))
    arr = np.array(tokens)
    assert (0 <= arr).all() and (arr < 2**16).all(), "token dictionary too large for uint16"
    return arr.astype(np.uint16)


def reference_run(ds, out_dir: Path, shard_size: int) -> int:
    """The reference loop: half the cores, one document per task, shards saved by the main process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shard, fill, total = 0, 0, 0
    buf = np.empty(shard_size, dtype=np.uint16)
    with mp.Pool(max(1, os.cpu_count() // 2)) as pool:
        for tokens in pool.imap(reference_tokenize, ds, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(shard_size - fill, len(tokens))
                buf[fill : fill + take] = tokens[:take]
                fill, tokens = fill + take, tokens[take:]
                if fill == shard_size:
                    np.save(out_dir / fineweb.shard_name(shard), buf)
                    shard, fill = shard + 1, 0
        if fill:
            np.save(out_dir / fineweb.shard_name(shard), buf[:fill])
    return total


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def shard_hashes(out_dir: Path) -> list[str]:
    files = sorted(out_dir.glob("edufineweb_*.npy"), key=lambda p: p.name.rsplit("_", 1)[1])
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        nargs="+",
        default=[str(DEMO.relative_to(ROOT))],
        help="parquet files with a `text` column (default: the shipped demo corpus)",
    )
    parser.add_argument("--min-tokens", type=float, default=20e6, help="repeat the sample to at least this")
    parser.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard, both pipelines")
    parser.add_argument("--workers", type=int, default=0, help="fineweb.py workers (0 = all cores)")
    args = parser.parse_args(argv)
    import datasets
    import pyarrow.parquet as pq
    import torch

    sample = sorted(Path(f).resolve() for f in args.input)
    missing = [str(f) for f in sample if not f.is_file()]
    if missing:
        raise UserError(f"no such input file: {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="bench_fineweb_"))
    try:
        # ~1,560 tokens per document in this sample: enough copies for min_tokens (checked below).
        rows = sum(pq.read_metadata(f).num_rows for f in sample)
        copies = max(1, int(np.ceil(args.min_tokens / (rows * 1_500))))
        data = work / "data"
        data.mkdir()
        for c in range(copies):
            for f in sample:
                (data / f"copy{c:02d}_{f.name}").symlink_to(f)
        files = sorted(str(p) for p in data.iterdir())
        cache = str(work / "hf_cache")
        # Warm the Arrow cache for both column sets, so neither timing includes the one-off conversion.
        ref_ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        datasets.load_dataset("parquet", data_files=files, split="train", columns=["text"], cache_dir=cache)
        print(f"data: {len(files)} parquet files ({copies} copies of the sample), {len(ref_ds):,} documents")
        print(
            f"machine: {os.cpu_count()} cores; torch {torch.__version__}, datasets {datasets.__version__}, "
            f"numpy {np.__version__}, python {sys.version.split()[0]}"
        )

        # The reference iterates whole rows; this sample carries wide annotation columns that real
        # FineWeb-Edu rows do not, so it is also timed on the `text` column alone (the fairer baseline).
        ref = {}
        for label, columns in (("all columns", None), ("text only", ["text"])):
            shutil.rmtree(work / "ref", ignore_errors=True)
            t, cpu = time.perf_counter(), cpu_seconds()
            ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache, columns=columns)
            n = reference_run(ds, work / "ref", args.shard_size)
            ref[label] = (n, time.perf_counter() - t)
            print(
                f"reference ({label:11s}): {n:,} tokens in {ref[label][1]:6.2f} s = {n / ref[label][1]:,.0f} tok/s, "
                f"{cpu_seconds() - cpu:5.2f} CPU-s ({max(1, os.cpu_count() // 2)} workers, imap chunksize 16)"
            )
        ref_tokens, ref_s = ref["text only"]
        ref_rate = ref_tokens / ref_s

        cfg = fineweb.FinewebConfig(
            input=tuple(files), out_dir=str(work / "ours"), shard_size=args.shard_size, workers=args.workers
        )
        t, cpu = time.perf_counter(), cpu_seconds()
        manifest = fineweb.prepare(cfg, cache_dir=cache, progress=False)
        ours_s, ours_cpu = time.perf_counter() - t, cpu_seconds() - cpu
        ours_tokens = manifest["total_tokens"]
        ours_rate = ours_tokens / ours_s
        print(
            f"fineweb.py             : {ours_tokens:,} tokens in {ours_s:6.2f} s = {ours_rate:,.0f} tok/s, "
            f"{ours_cpu:5.2f} CPU-s ({args.workers or fineweb.default_workers()} workers)"
        )
        all_rate = ref["all columns"][0] / ref["all columns"][1]
        print(
            f"speedup                : {ours_rate / ref_rate:.2f}x vs reference on text only, "
            f"{ours_rate / all_rate:.2f}x vs reference on all columns"
        )
        assert ours_tokens >= args.min_tokens, f"only {ours_tokens:,} tokens: raise the copies"
        same = shard_hashes(work / "ref") == [s["sha256"] for s in manifest["shards"]]
        print(f"shards byte-identical to the reference's: {same}")
        if not same:  # the benchmark's verdict, exit 1 (2 is for a user error)
            cli.print_error("the two pipelines wrote different shards")
            return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
