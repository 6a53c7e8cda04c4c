"""FineWeb-Edu -> GPT-2 token shards: fast, resumable, checkable.

`uv run fineweb.py` with no flags does what the reference script did: it downloads FineWeb-Edu
`sample-10BT` from the Hugging Face Hub and writes `edu_fineweb10B/edufineweb_{val|train}_NNNNNN.npy`,
100M-token shards of uint16 GPT-2 ids (shard 0 is val, the rest train), every document prefixed with
<|endoftext|> (50256). The files are plain `np.save` arrays, so shards made by the reference keep
working and vice versa. Local parquet / jsonl(.gz) / txt files go through the same Hugging Face
`datasets` code path (`--input`), which is how the tests and the demo run offline. On CPU:

    uv run fineweb.py --input assets/demo/fineweb_demo.parquet --out-dir /tmp/fw --shard-size 100000
    uv run fineweb.py --out-dir /tmp/fw --verify

How it is fast: every core tokenizes batches of documents (tiktoken straight to a numpy array, no
Python lists of ints); for a downloaded (Arrow) dataset the workers read their own rows, so only
token arrays cross process boundaries; a writer thread saves and hashes full shards while the
workers keep going. How it resumes: each shard is written to a temp file and renamed, then recorded
in `manifest.json` with its sha256 and the position (document, token offset) where the next shard
starts; a rerun of the same command skips what is recorded and continues, byte-identical to an
uninterrupted run. `--verify` re-checks every shard against the manifest.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shlex
import signal
import sys
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cli
import fileio
from cli import DEFAULT_DATA_DIR, UserError, field, parse_config
from tokenizer import ENCODING_NAME, EOT_TOKEN, VOCAB_SIZE, get_encoding, usable_cores

MANIFEST = "manifest.json"
# --demo: the FineWeb sample shipped with the repo (~0.6M tokens) in 100K-token shards, shard 0 the val
# split: what `train_gpt2.py --demo` trains on, into its --data-dir (demo_fineweb unless given).
DEMO_CORPUS = Path(__file__).resolve().parent / "assets" / "demo" / "fineweb_demo.parquet"
DEMO_SHARD_SIZE = 100_000
MANIFEST_FORMAT = 1
PREFIX = "edufineweb"  # the reference's file names, so existing dataloaders find the shards
SHARD_RE = re.compile(rf"^{PREFIX}_(val|train)_(\d{{6}})\.npy$")
# A shard is written to `.shard-NNNNNN.<random>.tmp`, then renamed: hidden and without "val"/"train"
# in the name, so loaders that pick files by split substring (as the reference's does) can never see
# a half-written shard. A killed run may leave such temp files; the next run deletes them.
TMP_PREFIX = ".shard-"
# Documents per worker task. FineWeb-Edu averages ~1k tokens a document and tiktoken does ~5M
# tokens/s per core, so a task is ~25 ms of work: large against the ~0.1 ms cost of a task,
# small enough that results stream steadily into the shard buffer.
BATCH_DOCS = 128
TASKS_PER_WORKER = 3  # tasks in flight per worker: keeps every core busy, bounds memory
INPUT_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
# The smallest --shard-size the command line takes. The trainer cuts each shard into windows of
# seq_len + 1 tokens that never cross shards, so a shard of S tokens holds (S - 1) // 1024 windows at
# the default context: 4 * 1024 + 1 tokens is the smallest shard holding 4 whole windows. Below that
# most of a shard is an unusable tail, and a slip such as `--shard-size 10` writes tens of thousands
# of files that train on nothing. (prepare() itself takes any positive size: the tests cut the stream
# into tiny shards to put many boundaries inside a few documents.)
DEFAULT_CONTEXT = 1024
MIN_SHARD_SIZE = 4 * DEFAULT_CONTEXT + 1  # 4,097


class PrepError(UserError):
    """A problem the user can fix (bad input, full disk, ...): cli.run_main prints it as one line."""


@dataclass(frozen=True)
class FinewebConfig:
    dataset: str = field("HuggingFaceFW/fineweb-edu", "Hugging Face Hub dataset")
    name: str = field("sample-10BT", "dataset config, e.g. sample-100BT")
    revision: str = field("", "Hub commit/branch/tag to read (default: latest; a resume reuses its own)")
    input: tuple[str, ...] = field(
        (),
        "local parquet / jsonl(.gz) / txt files, globs or folders to tokenize instead of the Hub",
        metavar="FILE_OR_GLOB",
    )
    out_dir: str = field(DEFAULT_DATA_DIR, "folder for the shards and manifest.json")
    shard_size: int = field(100_000_000, "tokens per shard (the last may be shorter)")
    workers: int = field(0, "tokenizer processes (0 = every core this process may use)")
    streaming: bool = field(False, "stream the dataset instead of first keeping a full local Arrow copy")
    max_tokens: int = field(0, "stop after this many tokens (0 = no limit), e.g. 1e9 trial")
    verify: bool = field(False, "only re-check the shards in --out-dir against the manifest")
    demo: bool = field(False, f"the demo's data: the corpus in assets/demo, in {DEMO_SHARD_SIZE:,}-token shards")

    def __post_init__(self):
        """Check the flags once, up front; raise UserError naming the flag and the fix."""
        if self.shard_size <= 0:
            raise UserError(f"--shard-size must be a positive number of tokens, got {self.shard_size}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0 (0 = all cores), got {self.workers}")
        if self.max_tokens < 0:
            raise UserError(f"--max-tokens must be >= 0 (0 = no limit), got {self.max_tokens}")
        if not self.out_dir:
            raise UserError("--out-dir must not be empty")
        if not self.input and not self.dataset:
            raise UserError("give --dataset (a Hub dataset) or --input (local files)")


def default_workers() -> int:
    return usable_cores()  # CPU binding and quotas honoured: cpu_count() would oversubscribe a shared node


def shard_name(index: int) -> str:
    return f"{PREFIX}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


# ---------------------------------------------------------------------------------------------
# Input: local files or the Hub, both through `datasets.load_dataset`


def _input_kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return INPUT_KINDS.get(os.path.splitext(name)[1])


def resolve_inputs(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Expand --input globs/folders into an ordered, de-duplicated file list (sorted within each)."""
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = []
        for m in matches:
            if os.path.isdir(m):
                found += sorted(os.path.join(m, f) for f in os.listdir(m) if _input_kind(f))
            elif os.path.isfile(m):
                found.append(m)
        if not found:
            raise PrepError(f"no input files: --input {pattern!r} matches no file (check the path; quote globs)")
        files += [Path(os.path.abspath(f)) for f in found]  # abspath, not resolve: symlinks stay distinct
    files = list(dict.fromkeys(files))  # a file named twice (overlapping globs) is read once
    kinds = {}
    for f in files:
        kind = _input_kind(f.name)
        if kind is None:
            raise PrepError(f"unsupported input file {f}: use .parquet, .jsonl, .json, .txt (optionally .gz)")
        kinds.setdefault(kind, f)
    if len(kinds) > 1:
        raise PrepError(
            f"--input mixes file types ({', '.join(f'{k}: {v.name}' for k, v in kinds.items())}): "
            "convert them to one type first"
        )
    return files


def _check_text_column(files: list[Path]) -> None:
    """Fail early, naming the file, when an input has no rows or no `text` column (cheap: the
    parquet footer / the first line). `datasets` would say only "An error occurred while generating
    the dataset" for a 0-row parquet, or StopIteration for an empty jsonl."""
    kind = _input_kind(files[0].name)
    for f in files:
        columns, rows = None, None
        try:
            if kind == "parquet":
                import pyarrow.parquet as pq

                metadata = pq.read_metadata(f)
                columns, rows = metadata.schema.to_arrow_schema().names, metadata.num_rows
            elif kind == "json":
                opener = gzip.open if f.name.lower().endswith(".gz") else open
                with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
                    line = next((line for line in fh if line.strip()), "")
                rows = 1 if line else 0  # at least one, or none
                try:
                    first = json.loads(line)
                    columns = list(first) if isinstance(first, dict) else None
                except ValueError:
                    pass  # not one object a line (e.g. a JSON array): datasets decides, checked after loading
        except (OSError, ValueError) as e:
            raise PrepError(f"cannot read input file {f}: {_one_line(e)}") from None
        if rows == 0:
            raise PrepError(f"input file {f} has no rows (no documents to tokenize): remove it from --input")
        _require_text_column(columns, f"input file {f}")


# Where the UTF-8 check of .txt inputs lives, and how a skipped file is counted. A .txt input is one
# document, and `datasets`' text builder decodes each file strictly: one Latin-1 file fails the whole
# load with "An error occurred while generating the dataset", naming neither the file nor the problem.
# So _prepare_in checks every .txt first (one incremental pass: UTF-8 validation costs about what
# reading the file does; an "already complete" rerun skips it) and loads only the UTF-8 files, through
# `datasets` as before (not with encoding_errors="replace": that would tokenize damaged text, not skip
# it). _with_skipped_rows then puts each file it left out back into the row stream, at its place in
# --input, as an undecodable row of no tokens, so nothing downstream knows the difference: the builder
# counts it in the shard where it falls like any undecodable row (the manifest's per-shard and total
# counts, the summary line), rows stay numbered as the input files (a shard's next_document), and a
# resumed run sees the very rows an uninterrupted one does, hence the same shards and manifest. The
# settings keep listing every input: converting a file to UTF-8 changes its size (every byte it failed
# on becomes two or more), so a rerun with the fixed file is refused as other input, not mixed in.


def _utf8_problem(path: Path) -> str | None:
    """Why the file's (decompressed) bytes are not UTF-8 text, with the fix, or None if they are."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # strict, as `datasets` reads them
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    done, head = 0, b""
    try:
        with opener(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                head = head or chunk[:2]
                held = len(decoder.getstate()[0])  # bytes of a character split across reads, re-read below
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    at = done - held + e.start
                    # a guess for the fix: a UTF-16 byte-order mark says so, else the commonest 8-bit code
                    source = "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "latin1"
                    return (
                        f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {at:,}); "
                        f"convert it with `iconv -f {source} -t utf-8`"
                    )
                if not chunk:
                    return None
                done += len(chunk)
    except (OSError, EOFError) as e:  # unreadable, or a corrupt .gz
        raise PrepError(f"cannot read input file {path}: {_one_line(e)}") from None


def _undecodable_inputs(files: list[Path]) -> dict[int, str]:
    """{index in files: problem} for the .txt inputs that are not UTF-8 (see the comment above)."""
    if not files or _input_kind(files[0].name) != "text":
        return {}  # a parquet / JSON row that is not UTF-8 is found (and counted) when it is tokenized
    problems = {i: _utf8_problem(f) for i, f in enumerate(files)}
    return {i: p for i, p in problems.items() if p is not None}


def _with_skipped_rows(results, skipped: list[int], first_row: int):
    """The worker results, with the rows of the files left out of the dataset (`skipped`: their
    indices in --input, sorted) put back where they were: undecodable, no tokens. `first_row` is the
    input row the results start at; rows left out after the last loaded one come as a batch of their own."""
    skip = set(skipped)
    row = first_row
    for n_rows, (tokens, lengths, undecodable) in results:
        where, taken = [], 0  # for each row of the new batch: its row in the worker's batch, or -1 (left out)
        while taken < n_rows:
            if row in skip:
                where.append(-1)
            else:
                where.append(taken)
                taken += 1
            row += 1
        where = np.array(where)
        loaded = where >= 0
        new_lengths = np.zeros(len(where), dtype=lengths.dtype)
        new_lengths[loaded] = lengths
        new_undecodable = np.ones(len(where), dtype=bool)
        new_undecodable[loaded] = undecodable
        yield len(where), (tokens, new_lengths, new_undecodable)
    rest = sum(1 for i in skipped if i >= row)
    if rest:
        yield rest, (np.zeros(0, dtype=np.uint16), np.zeros(rest, dtype=np.int64), np.ones(rest, dtype=bool))


def _require_text_column(columns: list[str] | None, what: str) -> None:
    """The one check that a source (a file, the loaded dataset) has the column fineweb.py tokenizes;
    None: its columns are not known (e.g. a file holding one JSON array), then the dataset is checked."""
    if columns is not None and "text" not in columns:
        raise PrepError(
            f"{what} has no `text` column (it has: {', '.join(columns) or 'none'}): "
            "fineweb.py tokenizes the `text` column"
        )


def _column_names(ds) -> list[str] | None:
    """The dataset's columns; a stream that does not know them before reading (JSON) shows its first
    row's. None for a stream with no rows: nothing to tokenize, which the run reports itself."""
    if ds.column_names is not None:
        return ds.column_names
    first = next(iter(ds.take(1)), None)
    return None if first is None else list(first)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hub_revision(cfg: FinewebConfig) -> str:
    """The commit sha of the Hub dataset, so a resume reads exactly the same data ('' if offline)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return cfg.revision
    try:
        return HfApi().dataset_info(cfg.dataset, revision=cfg.revision or None).sha or cfg.revision
    except Exception as e:  # noqa: BLE001 - every failure here means "cannot reach that dataset"
        raise PrepError(_hub_hint(cfg, e)) from None


def _hub_hint(cfg: FinewebConfig, e: BaseException) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # already offline: the cache is what is missing, not the setting
        fix = (
            f"HF_HUB_OFFLINE is set and the cache under HF_HOME ({constants.HF_HOME}) does not hold it: run "
            "the same command once on a networked machine with that HF_HOME, or download the parquet files "
            "and pass --input"
        )
    else:
        fix = (
            "check the name and network, or on an offline node set HF_HUB_OFFLINE=1 with HF_HOME pointing to "
            "a cache filled on a networked machine, or download the parquet files and pass --input"
        )
    return f"cannot load {cfg.dataset} ({cfg.name}) from the Hugging Face Hub ({_one_line(e)}); {fix}"


def load_source(cfg: FinewebConfig, files: list[Path], revision: str, cache_dir: str | None, workers: int):
    """Open the documents: a map-style `Dataset` (default) or an `IterableDataset` (--streaming).

    The Hub and local files share this one call, so the offline tests run the code a real download
    runs. Only the `text` column is kept (read from parquet, the widest part of every row).
    """
    import datasets

    kwargs: dict = {"split": "train", "streaming": cfg.streaming, "cache_dir": cache_dir}
    if files:
        kind = _input_kind(files[0].name)
        kwargs["data_files"] = [str(f) for f in files]
        if kind == "parquet":
            kwargs["columns"] = ["text"]  # files may differ in their other columns; never read them
        elif kind == "text":
            kwargs["sample_by"] = "document"  # one .txt file = one document
        path, what = kind, f"--input files ({len(files)})"
    else:
        path, what = cfg.dataset, f"{cfg.dataset} ({cfg.name})"
        kwargs.update(name=cfg.name or None, revision=revision or None)
    big = not files or sum(f.stat().st_size for f in files) > 1 << 30
    if not cfg.streaming and workers > 1 and big and len(files) != 1:
        # download and Arrow conversion in parallel (~27 GB for sample-10BT); not worth the
        # process start-up for small local inputs
        kwargs["num_proc"] = min(workers, len(files)) if files else workers
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into one line naming the source; re-raise with -X dev
        if sys.flags.dev_mode:
            raise
        if fileio.is_disk_full(e):  # e.g. the datasets cache: not the input's fault
            raise _disk_full(e) from None
        if files:
            raise PrepError(f"cannot read {what}: {_load_problem(files, e)}") from None
        raise PrepError(_hub_hint(cfg, e)) from None
    _require_text_column(_column_names(ds), what)
    if ds.column_names is not None and ds.column_names != ["text"]:
        ds = ds.select_columns(["text"])
    return ds


def _load_problem(files: list[Path], e: BaseException) -> str:
    """What made `datasets` fail on local files, for the one-line error. A JSON file with bytes that
    are not UTF-8 where Arrow checks them (a key) fails with a bare UnicodeDecodeError, which names no
    file: then name the first input that is not UTF-8 and the fix. (Such bytes in a value load, and
    the row is counted as undecodable: see _column_texts.)"""
    chain = e
    while chain is not None and not isinstance(chain, UnicodeDecodeError):
        chain = chain.__cause__ or chain.__context__
    if chain is not None and _input_kind(files[0].name) == "json":
        for f in files:
            problem = _utf8_problem(f)
            if problem:
                return f"{f} is {problem}"
    return _one_line(e)


def _expected_rows(ds, files: list[Path]) -> int | None:
    """Rows in the source if cheaply known (for the progress bar's ETA only)."""
    if hasattr(ds, "__len__"):
        return len(ds)
    splits = getattr(ds.info, "splits", None)
    if splits and "train" in splits and splits["train"].num_examples:
        return splits["train"].num_examples
    if files and _input_kind(files[0].name) == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(f).num_rows for f in files)
    return None


# ---------------------------------------------------------------------------------------------
# Workers: top-level functions, so they pickle under spawn (Windows, macOS) as well as fork

_WORKER_DATASET = None  # the map-style dataset a worker reads its own rows from (None when streaming)


def _init_worker(dataset) -> None:
    global _WORKER_DATASET
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    # Pool.terminate() stops workers with SIGTERM: a handler inherited from the parent (a trainer's
    # stop flag in the same process) would keep one alive, and the pool's exit would wait forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_DATASET = dataset
    get_encoding()


def encode_documents(texts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a batch: (uint16 tokens of all kept documents, tokens per row, undecodable mask).

    Each kept document is [EOT] + encode_ordinary(text). Rows that are empty (None / "") or
    undecodable (bytes that are not UTF-8, or not text at all) get length 0 and no tokens.
    """
    enc = get_encoding()
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    lengths = np.zeros(len(texts), dtype=np.int64)
    undecodable = np.zeros(len(texts), dtype=bool)
    pieces = []
    for i, text in enumerate(texts):
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                undecodable[i] = True
                continue
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            undecodable[i] = True
            continue
        try:
            # == encode_ordinary (no special token is "allowed", so none is matched), but returns
            # a numpy array straight from tiktoken's buffer: no Python int per token.
            ids = enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary repairs them, as the reference
            ids = np.asarray(enc.encode_ordinary(text), dtype=np.uint32)
        pieces += (eot, ids)
        lengths[i] = len(ids) + 1
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    assert tokens.size == 0 or int(tokens.max()) < VOCAB_SIZE <= 2**16, "token id does not fit uint16"
    return tokens.astype(np.uint16), lengths, undecodable


def _column_texts(column) -> list:
    """A batch's `text` column (Arrow) as Python values for encode_documents.

    Both paths read Arrow (the dataset's "arrow" format) and convert here, because a string column
    may hold bytes that are not UTF-8: Arrow's JSON reader does not check them (a Latin-1 line in a
    .jsonl loads), and turning such a value into str raises inside `datasets`, a traceback that names
    no file. Such a batch goes as bytes instead: encode_documents counts its bad rows as undecodable,
    as docs/data.md says, and tokenizes the rest."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        return column.cast(pa.large_binary()).to_pylist()


def encode_rows(rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker task for a map-style dataset: read rows [start, stop) here, not in the main process."""
    start, stop = rows
    return encode_documents(_column_texts(_WORKER_DATASET[start:stop]["text"]))


def _work_items(ds, start_row: int):
    """(task function, argument, number of rows) per batch, in document order, from `start_row`
    (a row of `ds`)."""
    if hasattr(ds, "__len__"):  # map-style: send row ranges, workers read the memory-mapped Arrow
        for start in range(start_row, len(ds), BATCH_DOCS):
            stop = min(start + BATCH_DOCS, len(ds))
            yield encode_rows, (start, stop), stop - start
    else:  # streaming: only the main process can iterate, so it sends the texts
        it = ds.skip(start_row) if start_row else ds  # whole Arrow batches are skipped, not decoded
        for batch in it.with_format("arrow").iter(batch_size=BATCH_DOCS):
            yield encode_documents, _column_texts(batch["text"]), batch.num_rows


def _ordered_results(pool, items, window: int):
    """Like pool.imap (results in submission order) but with at most `window` tasks in flight,
    so memory stays bounded however fast the input is read; yields (rows, result)."""
    pending: deque = deque()
    for fn, arg, n_rows in items:
        pending.append((n_rows, pool.apply_async(fn, (arg,))))
        if len(pending) >= window:
            n, res = pending.popleft()
            yield n, res.get()
    while pending:
        n, res = pending.popleft()
        yield n, res.get()


# ---------------------------------------------------------------------------------------------
# Output: atomic shard files, the manifest, and the writer thread


def npy_header(n_tokens: int) -> bytes:
    """The exact header np.save writes for a 1-D uint16 array of n_tokens (format 1.0)."""
    buf = io.BytesIO()
    header = {"descr": np.dtype(np.uint16).str, "fortran_order": False, "shape": (n_tokens,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def write_shard(path: Path, index: int, tokens: np.ndarray) -> str:
    """Write `tokens` as a .npy file atomically; return its sha256. Same bytes as np.save."""
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    header = npy_header(len(tokens))
    digest = hashlib.sha256(header)
    digest.update(tokens)  # hash from memory: no second read of the file
    # Plain file writes (not np.save) so a full disk raises OSError(ENOSPC) with its errno. The temp
    # name never holds "train"/"val" (see TMP_PREFIX); fileio removes it if the write fails.
    with fileio.atomic_path(path, tmp_prefix=f"{TMP_PREFIX}{index:06d}.") as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(memoryview(tokens))
    return digest.hexdigest()


class ShardWriter:
    """Writes shards on a background thread while the main thread keeps feeding the workers.

    At most one write is in flight: `submit` first waits for the previous one (and re-raises its
    error), so the caller may reuse that buffer and memory stays at two shard buffers. After each
    shard is renamed into place the manifest is rewritten (atomically) with its record; a kill at
    any moment leaves either the old or the new manifest and only complete shards.
    """

    def __init__(self, out_dir: Path, manifest: dict):
        self.out_dir, self.manifest = out_dir, manifest
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending = None

    def _write(self, record: dict, tokens: np.ndarray) -> None:
        record["sha256"] = write_shard(self.out_dir / record["file"], record["index"], tokens)
        self.manifest["shards"].append(record)
        fileio.atomic_write_json(self.out_dir / MANIFEST, self.manifest)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def submit(self, record: dict, tokens: np.ndarray) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, record, tokens)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The token stream -> shards


class ShardBuilder:
    """Cuts the ordered token stream into shards of exactly `shard_size` tokens.

    Positions are global token offsets. Row r (a source document, kept or not) starts at
    starts[r]; it belongs to shard starts[r] // shard_size (a document split by a boundary
    belongs where its <|endoftext|> is; an empty row at a boundary belongs to the next shard).
    When shard k is full, its record stores where shard k+1 starts: (next_document, offset),
    i.e. the first row not fully written, and how many of its tokens are already in shard k.
    A resume restarts the stream there, so every rule above gives the same answer either way.
    """

    def __init__(self, shard_size: int, writer: ShardWriter, first_shard: int, next_row: int, offset: int):
        self.shard_size, self.writer = shard_size, writer
        self.shard = first_shard  # index of the shard being filled
        self.pos = first_shard * shard_size  # global position of the next token
        self.row = next_row  # source row index of the next batch's first row
        self.offset = offset  # tokens of row `next_row` already in earlier shards (resume only)
        self.buffers = [np.empty(0, np.uint16), np.empty(0, np.uint16)]  # allocated on first use
        self.fill = 0
        self.boundary = None  # (next_document, offset) once the current shard is full
        self.counts = defaultdict(lambda: np.zeros(3, dtype=np.int64))  # shard -> docs, empty, undecodable
        self.documents = self.empty = self.undecodable = 0  # totals of this run, for the progress bar

    @property
    def buf(self) -> np.ndarray:
        if len(self.buffers[0]) < self.shard_size:
            self.buffers[0] = np.empty(self.shard_size, dtype=np.uint16)
        return self.buffers[0]

    def _emit(self, end_row: int, end_offset: int) -> None:
        docs, empty, undecodable = (int(c) for c in self.counts.pop(self.shard, np.zeros(3)))
        record = {
            "index": self.shard,
            "file": shard_name(self.shard),
            "split": "val" if self.shard == 0 else "train",
            "tokens": self.fill,
            "documents": docs,
            "skipped_empty": empty,
            "skipped_undecodable": undecodable,
            "next_document": end_row,
            "next_document_offset": end_offset,
        }
        self.writer.submit(record, self.buf[: self.fill])
        self.buffers.reverse()  # fill the other buffer while this one is written
        self.shard, self.fill, self.boundary = self.shard + 1, 0, None

    def _resume_point(self, starts: np.ndarray, ends: np.ndarray, row0: int, position: int) -> tuple[int, int]:
        started = int(np.searchsorted(starts, position, side="left"))  # rows starting before `position`
        if (
            started > 0 and ends[started - 1] > position
        ):  # the last of them straddles it: it continues in the next shard
            return row0 + started - 1, position - int(starts[started - 1])
        return row0 + started, 0

    def add(self, n_rows: int, result, limit: int | None) -> bool:
        """Append one batch (n_rows source rows, in order). Returns True when `limit` is reached."""
        tokens, lengths, undecodable = result
        assert len(lengths) == n_rows
        row0, written = self.row, self.offset
        if written:  # first batch after a resume inside a document: its first tokens are already in a shard
            tokens, self.offset = tokens[written:], 0
        starts = (self.pos - written) + np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (n_rows,) global
        ends = starts + lengths
        stop = limit is not None and self.pos + len(tokens) >= limit
        rows = n_rows  # rows that started before the cut
        if stop:
            tokens = tokens[: limit - self.pos]
            rows = int(np.searchsorted(starts, limit, side="left"))
        # Per-shard document counts, vectorised over the batch (rows from earlier shards: ignored).
        shard_of = starts[:rows] // self.shard_size
        kept = lengths[:rows] > 0
        for col, mask in enumerate((kept, ~kept & ~undecodable[:rows], undecodable[:rows])):
            ahead = shard_of[mask]
            ahead = ahead[ahead >= self.shard] - self.shard  # shards after the one being filled
            for shard_ahead, count in enumerate(np.bincount(ahead)):
                if count:
                    self.counts[self.shard + shard_ahead][col] += count
        self.documents += int(kept.sum()) - (1 if written else 0)
        self.empty += int((~kept & ~undecodable[:rows]).sum())
        self.undecodable += int(undecodable[:rows].sum())
        # Copy into the shard buffer; a full shard is handed to the writer when the next token
        # arrives (or at the end), so empty rows that follow it can still be counted where they belong.
        copied = 0
        while copied < len(tokens):
            if self.fill == self.shard_size:
                self._emit(*self.boundary)
            take = min(self.shard_size - self.fill, len(tokens) - copied)
            self.buf[self.fill : self.fill + take] = tokens[copied : copied + take]
            self.fill, copied, self.pos = self.fill + take, copied + take, self.pos + take
            if self.fill == self.shard_size:
                self.boundary = self._resume_point(starts[:rows], ends[:rows], row0, self.pos)
        if stop:
            self.boundary = self._resume_point(starts[:rows], ends[:rows], row0, self.pos)
        self.row = row0 + n_rows
        return stop

    def finish(self, end_of_data: bool) -> None:
        """Write the last (possibly partial) shard."""
        if self.fill == 0:
            return
        if end_of_data:
            # empty rows after the last token would count towards a shard that does not exist
            for k in [k for k in self.counts if k > self.shard]:
                self.counts[self.shard] += self.counts.pop(k)
            self._emit(self.row, 0)
        else:
            self._emit(*self.boundary)


# ---------------------------------------------------------------------------------------------
# Manifest: settings, resume


def _settings(cfg: FinewebConfig, files: list[Path], revision: str) -> dict:
    """What determines the bytes of the shards; a resume must match it (see _comparable). Each input's
    path is kept for information only."""
    if files:
        source = {"files": [{"name": f.name, "bytes": f.stat().st_size, "path": str(f)} for f in files]}
    else:
        source = {"dataset": cfg.dataset, "name": cfg.name, "split": "train", "revision": revision}
    return {
        "format": MANIFEST_FORMAT,
        "source": source,
        "tokenizer": {"encoding": ENCODING_NAME, "eot": EOT_TOKEN, "vocab_size": VOCAB_SIZE},
        "document": "[eot] + encode_ordinary(text); empty/undecodable skipped",
        "dtype": "uint16",
        "shard_size": cfg.shard_size,
    }


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["settings"], manifest["shards"]  # noqa: B018 - both keys must exist
    except (ValueError, KeyError, TypeError) as e:
        raise PrepError(f"{path} is unreadable ({_one_line(e)}): delete {out_dir} or use another --out-dir") from None
    return manifest


def _comparable(settings: dict) -> dict:
    """The settings a rerun must match. An input file counts by its name and size (in order), not
    by its absolute path, so a renamed checkout or a moved data folder still resumes (the demo's
    input lives in the checkout). Manifests that recorded only "path" compare by its file name."""
    source = settings.get("source") if isinstance(settings, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get("files"), list):
        return settings
    files = [
        {"name": f.get("name") or Path(str(f.get("path", ""))).name, "bytes": f.get("bytes")}
        if isinstance(f, dict)
        else f
        for f in source["files"]
    ]
    return {**settings, "source": {**source, "files": files}}


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {json.dumps(old)[:80]} -> {json.dumps(new)[:80]}"]


def _valid_prefix(out_dir: Path, shards: list[dict]) -> list[dict]:
    """Recorded shards up to the first one that is missing or has the wrong size (cheap checks;
    --verify does the hashes). A rerun continues from there."""
    kept = []
    for i, rec in enumerate(shards):
        path = out_dir / rec.get("file", "")
        expected = len(npy_header(rec.get("tokens", 0))) + 2 * rec.get("tokens", 0)
        if rec.get("index") != i or rec.get("file") != shard_name(i) or not path.is_file():
            break
        if path.stat().st_size != expected:
            break
        kept.append(rec)
    return kept


def _shards_to_keep(cfg: FinewebConfig, out_dir: Path, old: dict, settings: dict) -> list[dict] | None:
    """The recorded shards a rerun keeps (it continues after the last), or None if all is done."""
    diff = _diff(_comparable(old["settings"]), _comparable(settings))
    if diff:
        raise PrepError(
            f"{out_dir} was made with other settings ({'; '.join(diff)}): rerun with the same flags, "
            "use another --out-dir, or delete it"
        )
    shards = _valid_prefix(out_dir, old["shards"])
    total = sum(s["tokens"] for s in shards)
    if cfg.max_tokens and cfg.max_tokens < total:
        raise PrepError(
            f"{out_dir} already holds {total:,} tokens, more than --max-tokens {cfg.max_tokens:,}: "
            "use another --out-dir"
        )
    intact = len(shards) == len(old["shards"]) and old.get("complete")
    if intact and (old.get("stop_reason") == "end_of_data" or cfg.max_tokens == total):
        print(f"{out_dir}: already complete ({len(shards)} shards, {total:,} tokens); --verify checks them")
        return None
    # A partial last shard (the end of a --max-tokens run) is redone when the run goes further.
    if shards and shards[-1]["tokens"] < cfg.shard_size:
        shards = shards[:-1]
    return shards


def _prepare_out_dir(out_dir: Path) -> list[Path]:
    """Create --out-dir, check it is writable, and delete the temp files a killed run left there.
    Returns the folders it created, deepest first ([] when --out-dir existed)."""
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
        fileio.remove_temps(out_dir, TMP_PREFIX)  # a shard's temp file
        fileio.remove_temps(out_dir, f".{MANIFEST}.")  # the manifest's (fileio's default prefix)
    except OSError as e:
        _remove_unused_out_dir(out_dir, created)
        if fileio.is_disk_full(e):
            raise _disk_full(e) from None
        raise PrepError(f"cannot write to --out-dir {out_dir} ({_one_line(e)}): choose a writable folder") from None
    return created


def _remove_unused_out_dir(out_dir: Path, created: list[Path]) -> None:
    """After a failure: remove the folders this run created if it wrote no shard into them (its
    manifest and temp files go; a file of anyone else's keeps its folder, as rmdir then fails)."""
    if not created or not out_dir.is_dir() or any(SHARD_RE.match(p.name) for p in out_dir.iterdir()):
        return
    try:
        (out_dir / MANIFEST).unlink(missing_ok=True)
        fileio.remove_temps(out_dir, TMP_PREFIX)
        fileio.remove_temps(out_dir, f".{MANIFEST}.")
        for folder in created:
            folder.rmdir()
    except OSError:
        pass  # not empty, or no longer ours to remove: leave it


def _disk_full(e: OSError, out_dir: Path | None = None, done: int = 0) -> PrepError:
    """The one-line error for a write that found no room (fileio.is_disk_full(e)): a full disk, a
    quota or a file-size limit. With `out_dir`, the shards there are kept: a rerun continues from `done`."""
    if out_dir is None:  # somewhere else (e.g. the datasets cache): the OSError names the file
        return PrepError(f"disk full ({e}): free space, then rerun the same command")
    return PrepError(
        f"disk full writing to {out_dir} ({os.strerror(e.errno)}): free space (a shard needs 2 bytes a token) "
        f"or use another --out-dir, then rerun the same command to continue from shard {done}"
    )


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write the manifest a run starts with (complete=False, the kept shards), before any worker starts."""
    try:
        fileio.atomic_write_json(out_dir / MANIFEST, manifest)
    except OSError as e:
        if fileio.is_disk_full(e):
            raise _disk_full(e, out_dir, len(manifest["shards"])) from None
        raise PrepError(f"cannot write to --out-dir {out_dir} ({_one_line(e)}): choose a writable folder") from None


# ---------------------------------------------------------------------------------------------
# The run


def prepare(
    cfg: FinewebConfig,
    *,
    cache_dir: str | None = None,
    mp_context: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Tokenize the source into shards in cfg.out_dir, resuming what is there. Returns the manifest
    (which may hold the val shard only: main() refuses that, a caller wanting one array may not).

    A run that fails before writing any shard removes the --out-dir folders it created (never a
    folder that was there before), so a failed first try leaves nothing to clean up.
    cache_dir: the `datasets` cache (default: its own, under $HF_HOME); mp_context: the
    multiprocessing start method (default: the platform's), both for tests.
    """
    out_dir = Path(cfg.out_dir)
    files = _local_inputs(cfg)
    created = _prepare_out_dir(out_dir)
    try:
        return _prepare_in(
            cfg, out_dir, files, cache_dir=cache_dir, mp_context=mp_context, progress=progress, command=command
        )
    except BaseException:
        _remove_unused_out_dir(out_dir, created)
        raise


def _prepare_in(
    cfg: FinewebConfig,
    out_dir: Path,
    files: list[Path],
    *,
    cache_dir: str | None,
    mp_context: str | None,
    progress: bool,
    command: str | None,
) -> dict:
    """prepare() once --out-dir exists and is writable."""
    workers = cfg.workers or default_workers()
    old = _previous_manifest(out_dir)
    revision = _source_revision(cfg, files, old)
    settings = _settings(cfg, files, revision)
    shards = _shards_to_keep(cfg, out_dir, old, settings) if old is not None else []
    if shards is None:
        return old  # already complete
    _remove_unrecorded_shards(out_dir, keep=len(shards))
    done_tokens = sum(s["tokens"] for s in shards)
    if shards:
        start_row = shards[-1]["next_document"]
        print(f"resuming {out_dir}: {len(shards)} shards ({done_tokens:,} tokens) done, from document {start_row:,}")

    skipped = _undecodable_inputs(files)  # .txt inputs that are not UTF-8: see the comment above _utf8_problem
    if files and len(skipped) == len(files):
        raise _no_tokens(cfg, files, 0, len(skipped), skipped)
    for i, problem in skipped.items():
        print(f"{cli.script_name()}: skipping {files[i]}: {problem}", file=sys.stderr)
    readable = [f for i, f in enumerate(files) if i not in skipped]
    ds = load_source(cfg, readable, revision, cache_dir, workers)
    manifest = {
        "settings": settings,
        "command": command or (old or {}).get("command"),
        "complete": False,
        "stop_reason": None,
        "shards": shards,  # the writer appends each new shard's record
    }
    _write_manifest(out_dir, manifest)

    t0 = time.time()
    builder, stopped = _tokenize(cfg, ds, files, sorted(skipped), manifest, workers, mp_context, progress)
    _finish_manifest(cfg, files, manifest, builder, stopped)
    _print_summary(out_dir, manifest, done_tokens, time.time() - t0, workers)
    return manifest


def _local_inputs(cfg: FinewebConfig) -> list[Path]:
    """--input as a checked file list (each has a `text` column); [] when the source is the Hub."""
    if not cfg.input:
        return []
    files = resolve_inputs(cfg.input)
    _check_text_column(files)
    defaults = FinewebConfig()
    if (cfg.dataset, cfg.name, cfg.revision) != (defaults.dataset, defaults.name, defaults.revision):
        print("warning: --dataset, --name and --revision are ignored with --input", file=sys.stderr)
    return files


def _source_label(cfg: FinewebConfig, files: list[Path]) -> str:
    return "--input files" if files else f"{cfg.dataset} ({cfg.name})"


def _previous_manifest(out_dir: Path) -> dict | None:
    """The manifest of an earlier run to continue, or None to start afresh."""
    old = read_manifest(out_dir)
    if old is not None and not old["shards"]:
        old = None  # nothing was written yet (e.g. the source failed to load): start afresh
    if old is None and any(SHARD_RE.match(p.name) for p in out_dir.iterdir()):
        raise PrepError(
            f"{out_dir} holds shard files but no {MANIFEST} (made by another tool?): "
            "use another --out-dir or delete them"
        )
    return old


def _source_revision(cfg: FinewebConfig, files: list[Path], old: dict | None) -> str:
    """The Hub commit to read: --revision, else the one a resumed run recorded ("" if it ran
    offline: never a newer one), else the latest."""
    if files:
        return cfg.revision
    return cfg.revision or (old["settings"]["source"].get("revision", "") if old else _hub_revision(cfg))


def _remove_unrecorded_shards(out_dir: Path, keep: int) -> None:
    """Shard files past the kept ones are unrecorded leftovers of a killed run: they are regenerated."""
    for p in out_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if m and int(m.group(2)) >= keep:
            p.unlink()


def _tokenize(
    cfg: FinewebConfig,
    ds,
    files: list[Path],
    skipped: list[int],
    manifest: dict,
    workers: int,
    mp_context: str | None,
    progress: bool,
) -> tuple[ShardBuilder, bool]:
    """Run the worker pool over the source, from where the kept shards end, into new shards.
    `skipped`: the indices of the input files left out of `ds` (not UTF-8), counted as undecodable rows.
    Returns the builder (its counts) and whether --max-tokens stopped it before the end of the data."""
    out_dir, shards = Path(cfg.out_dir), manifest["shards"]
    start_row = shards[-1]["next_document"] if shards else 0  # a row of the input: left-out files count
    offset = shards[-1]["next_document_offset"] if shards else 0
    done_tokens = sum(s["tokens"] for s in shards)
    limit = cfg.max_tokens or None
    expected_rows = _expected_rows(ds, files) if limit is None else None  # only for the ETA
    if expected_rows is not None:
        expected_rows += len(skipped)
    map_style = hasattr(ds, "__len__")
    writer = ShardWriter(out_dir, manifest)
    builder = ShardBuilder(cfg.shard_size, writer, len(shards), start_row, offset)
    ctx, stop = mp.get_context(mp_context), False
    items = _work_items(ds, start_row - sum(1 for i in skipped if i < start_row))  # from that row of `ds`
    # Workers read Arrow, not Python rows: see _column_texts.
    worker_ds = ds.with_format("arrow") if map_style else None
    # The pool starts before any thread of ours (writer, tqdm monitor): forking a threaded process is unsafe.
    with ctx.Pool(workers, initializer=_init_worker, initargs=(worker_ds,)) as pool:
        bar = _progress_bar(_source_label(cfg, files), done_tokens, limit, progress)
        results = _ordered_results(pool, items, TASKS_PER_WORKER * workers)
        if skipped:
            results = _with_skipped_rows(results, skipped, start_row)
        try:
            for n_rows, result in results:
                before = builder.pos
                stop = builder.add(n_rows, result, limit)
                if expected_rows and builder.row > start_row:
                    # ETA: tokens per row so far x rows left (exact only at the end; good enough).
                    per_row = (builder.pos - done_tokens) / (builder.row - start_row)
                    bar.total = max(builder.pos, int(builder.pos + per_row * (expected_rows - builder.row)))
                bar.set_postfix_str(
                    f"docs={builder.documents:,} shard={builder.shard} skipped={builder.empty + builder.undecodable}",
                    refresh=False,
                )
                bar.update(builder.pos - before)
                if stop:
                    break
            builder.finish(end_of_data=not stop)
            writer.close()
        except OSError as e:
            if fileio.is_disk_full(e):
                raise _disk_full(e, out_dir, len(manifest["shards"])) from None
            raise
        finally:
            bar.close()
            writer.close()
    return builder, stop


def _progress_bar(src: str, done_tokens: int, limit: int | None, enabled: bool) -> tqdm:
    return tqdm(
        desc=f"tokenizing {src}",
        unit="tok",
        unit_scale=True,
        initial=done_tokens,
        total=limit,
        disable=not enabled,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a batch log (SLURM) gets a line every 30 s
        smoothing=0.05,
        dynamic_ncols=True,
    )


def _finish_manifest(
    cfg: FinewebConfig, files: list[Path], manifest: dict, builder: ShardBuilder, stopped: bool
) -> None:
    """Record the run as complete, with its totals, in manifest.json."""
    shards = manifest["shards"]
    if not shards:
        raise _no_tokens(cfg, files, builder.empty, builder.undecodable)
    manifest.update(
        complete=True,
        stop_reason="max_tokens" if stopped else "end_of_data",
        total_tokens=sum(s["tokens"] for s in shards),
        total_documents=sum(s["documents"] for s in shards),
        skipped_empty=sum(s["skipped_empty"] for s in shards),
        skipped_undecodable=sum(s["skipped_undecodable"] for s in shards),
    )
    fileio.atomic_write_json(Path(cfg.out_dir) / MANIFEST, manifest)


def _no_tokens(
    cfg: FinewebConfig, files: list[Path], empty: int, undecodable: int, skipped: dict[int, str] | None = None
) -> PrepError:
    """The error for a source without a token. `skipped`: when the cause is that no .txt input is
    UTF-8, its problems, so the one line names a file and the fix (nothing else is printed then)."""
    message = (
        f"no tokens: every document of {_source_label(cfg, files)} was empty or undecodable "
        f"({empty} empty, {undecodable} undecodable)"
    )
    if skipped:
        first = min(skipped)
        others = f"; {len(skipped) - 1} more .txt input(s) are not UTF-8 either" if len(skipped) > 1 else ""
        message += f": {files[first]} is {skipped[first]}{others}"
    return PrepError(message)


def _print_summary(out_dir: Path, manifest: dict, done_tokens: int, seconds: float, workers: int) -> None:
    shards = manifest["shards"]
    new_tokens = manifest["total_tokens"] - done_tokens
    print(
        f"wrote {len(shards)} shards to {out_dir} (1 val + {len(shards) - 1} train): "
        f"{manifest['total_tokens']:,} tokens, {manifest['total_documents']:,} documents, "
        f"skipped {manifest['skipped_empty']:,} empty + {manifest['skipped_undecodable']:,} undecodable; "
        f"{new_tokens:,} tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):,.0f} tok/s, {workers} workers)"
    )


# ---------------------------------------------------------------------------------------------
# --verify


def check_shard(path: Path, record: dict) -> str | None:
    """Problem with one shard file vs its manifest record, or None if it is intact.

    One pass over the file: the sha256 and the largest id come from the same reads.
    """
    if not path.is_file():
        return "missing"
    tokens = record.get("tokens", -1)
    header_len = len(npy_header(tokens))
    size = path.stat().st_size
    if size != header_len + 2 * tokens:
        return f"{size:,} bytes, expected {header_len + 2 * tokens:,} for {tokens:,} tokens (truncated or overwritten)"
    digest = hashlib.sha256()
    worst, worst_at, seen = 0, -1, 0
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            return f"not a valid .npy file ({_one_line(e)})"
        if dtype != np.uint16 or shape != (tokens,) or fortran or f.tell() != header_len:
            return f"header says {dtype} {shape}, expected uint16 ({tokens:,},)"
        f.seek(0)
        digest.update(f.read(header_len))
        while chunk := f.read(1 << 24):  # 16 MiB, even, so uint16 values never straddle chunks
            digest.update(chunk)
            ids = np.frombuffer(chunk, dtype=np.uint16)
            top = int(ids.max()) if ids.size else 0
            if top > worst:
                worst, worst_at = top, seen + int(ids.argmax())
            seen += ids.size
    if digest.hexdigest() != record.get("sha256"):
        return "sha256 differs from manifest.json (corrupted)"
    if worst >= VOCAB_SIZE:
        return f"token id {worst} at position {worst_at:,} is not a GPT-2 id (>= {VOCAB_SIZE})"
    return None


def verify(out_dir: str | Path, workers: int = 0) -> list[tuple[str, str]]:
    """Re-check every shard in out_dir against manifest.json. Returns [(file, problem)]."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir) if out_dir.is_dir() else None
    if manifest is None:
        raise PrepError(f"no {MANIFEST} in {out_dir}: --verify checks a folder written by fineweb.py")
    shards = manifest["shards"]
    problems: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max(1, min(workers or default_workers(), 8))) as threads:  # hashing frees the GIL
        results = threads.map(lambda r: check_shard(out_dir / r.get("file", "?"), r), shards)
        results = tqdm(results, total=len(shards), desc="verifying", unit="shard")
        for record, problem in zip(shards, results, strict=True):
            if problem:
                problems.append((record.get("file", "?"), problem))
    recorded = {r.get("file") for r in shards}
    for p in sorted(out_dir.iterdir()):
        if SHARD_RE.match(p.name) and p.name not in recorded:
            problems.append((p.name, f"not in {MANIFEST} (left by an interrupted run?)"))
    if not manifest.get("complete"):
        problems.append((MANIFEST, f"run incomplete ({len(shards)} shards so far): rerun the same command to finish"))
    return problems


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    # fineweb.py never uses torch; without this, `datasets` imports it (seconds) for every
    # streaming dataset. Set before `datasets` is first imported; the user's value wins.
    os.environ.setdefault("USE_TORCH", "0")
    cfg = parse_config(FinewebConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.demo:
        cfg = demo_config(cfg)
    if cfg.shard_size < MIN_SHARD_SIZE and not cfg.verify:
        raise UserError(
            f"--shard-size {cfg.shard_size:,} is too small: a shard must hold a few training windows of the "
            f"default context ({DEFAULT_CONTEXT}+1 tokens); use {MIN_SHARD_SIZE:,} or more (default 100,000,000)"
        )
    if cfg.verify:
        return _verify_out_dir(cfg)
    command = shlex.join([Path(sys.executable).name, "fineweb.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        _require_train_shard(cfg, prepare(cfg, command=command))
    except OSError as e:
        if fileio.is_disk_full(e):  # the one-line error that says how much room a shard needs
            raise _disk_full(e) from None
        raise
    except KeyboardInterrupt:
        raise KeyboardInterrupt("rerun the same command to continue from the last complete shard") from None
    return 0


def demo_config(cfg: FinewebConfig) -> FinewebConfig:
    """--demo: the shipped corpus at the demo's shard size, one worker (a small input: starting more
    processes costs more than it saves), into demo_fineweb/ unless --out-dir says otherwise."""
    if cfg.input:
        raise UserError("--demo tokenizes the corpus shipped in assets/demo: give --demo or --input, not both")
    out_dir = cli.DEMO_DATA_DIR if cfg.out_dir == DEFAULT_DATA_DIR else cfg.out_dir
    return replace(
        cfg, input=(str(DEMO_CORPUS),), shard_size=DEMO_SHARD_SIZE, workers=cfg.workers or 1, out_dir=out_dir
    )


def _require_train_shard(cfg: FinewebConfig, manifest: dict) -> None:
    """Refuse a result that training cannot use: every token in val shard 0, no train shard. The
    val shard and its manifest stay (complete and valid); the fix is a new --out-dir anyway."""
    if len(manifest["shards"]) > 1:
        return
    total = sum(s["tokens"] for s in manifest["shards"])
    if manifest.get("stop_reason") == "max_tokens":
        fix = "a --max-tokens well above the --shard-size (or none)"
    elif total // 2 >= MIN_SHARD_SIZE:
        fix = f"a --shard-size of at most {total // 2:,} (then val and train hold half each), or more input"
    else:
        fix = (
            f"more input (a val and a train shard of the smallest --shard-size, {MIN_SHARD_SIZE:,}, need over "
            f"{2 * MIN_SHARD_SIZE:,} tokens)"
        )
    raise PrepError(
        f"no train shard: all {total:,} tokens went to val shard 0 (--shard-size {cfg.shard_size:,}) and training "
        f"reads shards 1 and up; rerun with {fix}, into another --out-dir or after deleting {cfg.out_dir}"
    )


def _verify_out_dir(cfg: FinewebConfig) -> int:
    """--verify: print `BAD <file>: <problem>` for each problem and return 1 naming them, or one OK
    line and 0. Exit 1, not 2: like cmp, 1 is the check's verdict; 2 means it could not check."""
    problems = verify(cfg.out_dir, cfg.workers)
    for name, problem in problems:
        print(f"BAD {name}: {problem}")
    if problems:
        bad = sorted({n for n, _ in problems if n != MANIFEST})
        cli.print_error(
            f"--verify found {len(problems)} problem(s) in {cfg.out_dir}"
            + (f" ({', '.join(bad)}): delete the bad shards and rerun the command in {MANIFEST}" if bad else "")
        )
        return 1
    manifest = read_manifest(Path(cfg.out_dir))
    n_tokens = sum(s["tokens"] for s in manifest["shards"])
    n_shards = len(manifest["shards"])
    print(f"verified {n_shards} shards in {cfg.out_dir}, {n_tokens:,} tokens: all match {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
