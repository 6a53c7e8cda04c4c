"""Token-shard loaders for training and validation: memory-mapped, rank-strided, exactly resumable.

Reads the shards `fineweb.py` writes (and the reference's): `<data dir>/edufineweb_{val|train}_NNNNNN.npy`,
each an `np.save`d 1-D uint16 array of GPT-2 token ids. Shards are opened with `mmap_mode="r"`, so
a 100M-token shard costs a page-cache mapping, never 200 MB of RAM per process.

    uv run dataloader.py --data-dir edu_fineweb10B     # summary of a data dir + loader speed (CPU)

Windows. Window w of a shard is `tokens[w*T : w*T + T + 1]`: inputs x = its first T tokens, targets
y = its last T (next-token prediction), so a shard of L tokens holds (L - 1) // T windows.

TrainLoader: one global stream of rows (windows), the same whatever the world size or micro-batch.
  * Epoch e is every window of every train shard, N = total windows per epoch. With shuffling (the
    default) the shard order is a permutation drawn from a numpy Generator seeded by (seed, e), and
    the windows inside each shard are permuted by a Generator seeded by (seed, e, shard): a new
    order every epoch, the same one in every run with the same seed. Without shuffling, shards come
    in sorted order and windows in order: the reference's sequential reading (except that we do not
    drop a shard's tail that is shorter than a whole batch).
  * Global row g is position g % N of epoch g // N, so epochs simply wrap around.
  * Rank r's k-th `next_batch()` returns rows base + (k*world_size + r)*B + i, i = 0..B-1, where
    base is the rows consumed at construction / `load_state_dict`. An optimizer step of
    `grad_accum` micro-steps on `world_size` ranks therefore reads the consecutive rows
    [base, base + grad_accum*world_size*B), split among ranks without overlap: 1 process x 8
    micro-steps sees exactly what 8 processes x 1 micro-step see, and B=64 x 1 equals B=32 x 2.
  * The state is one number, `rows_consumed`, valid at step boundaries (all ranks made the same
    number of calls), so a checkpoint written by 8 ranks resumes on 4 or on 1, with any B.
  * A batch is gathered with one numpy fancy index per shard it touches (no per-token Python loop)
    into fresh tensors each call (optionally pinned), so an in-flight non_blocking copy of the
    previous batch is never overwritten.

ValLoader: a FIXED evaluation set: the first `val_tokens` tokens of the (first) val shard, cut into
  n = val_tokens // T windows. Rank r owns windows r, r + world, r + 2*world, ...; every rank yields
  the same number of (x, y, num_valid) batches of exactly B rows, the last padded with copies of a
  real row. Fixed shapes keep torch.compile from recompiling, equal batch counts keep collectives in
  step, and the union of the valid rows over ranks is exactly the n windows for any world size / B.

Token ids are checked as they are read (every batch's ids < 50257, on the host: ~20 us for a
64 x 1025 batch, far under 1% of a step), so a corrupt shard stops the run with its name instead of
an IndexError (or, on a GPU, a device-side assert that takes the process group down).

Nothing here uses a global RNG; everything is a pure function of (files, seed, position).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import DEFAULT_DATA_DIR, UserError, field, parse_config


# `uv run dataloader.py`: a data dir's summary and the loader's speed (main, at the end).
@dataclass(frozen=True)
class InspectConfig:
    data_dir: str = field(DEFAULT_DATA_DIR, "folder of token shards written by fineweb.py")
    micro_batch_size: int = field(64, "rows per micro-batch")
    seq_len: int = field(1024, "tokens per row")
    # the reference's validation: 20 micro-batches of 64 x 1024 on each of 8 ranks
    val_tokens: int = field(10_485_760, "size of the fixed validation set, in tokens")
    seed: int = field(1337, "shuffling seed")
    shuffle: bool = field(True, "shuffle shards and windows each epoch")
    batches: int = field(20, "micro-batches to time")

    def __post_init__(self):
        if self.batches < 1:
            raise UserError(f"--batches must be >= 1, got {self.batches}")


def parse_args(argv=None) -> InspectConfig:
    return parse_config(InspectConfig, argv, description="Summarise a token-shard folder and time the train loader.")


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import numpy as np
import torch

from tokenizer import VOCAB_SIZE


class DataError(UserError):
    """A problem with the token shards on disk (missing, empty, truncated, wrong type, too small)."""


# --------------------------------------------------------------------------------------- shards


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """Sorted shard files of `split` in `data_dir`: names containing `_{split}_` and ending `.npy`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist: run `uv run fineweb.py` first or pass --data-dir")
    shards = sorted(p for p in data_dir.iterdir() if f"_{split}_" in p.name and p.name.endswith(".npy"))
    if not shards:
        what = "no val shard" if split == "val" else f"no {split} shards"
        raise DataError(
            f"{what} (*_{split}_*.npy) in {data_dir}: run `uv run fineweb.py` to write them "
            f"or pass the --data-dir that holds them"
        )
    return shards


def load_shard(path: str | Path) -> np.ndarray:
    """Memory-map one shard (read-only, never read whole into RAM) and check it is 1-D uint16."""
    path = Path(path)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as e:
        # np.load raises ValueError on a short header or a body shorter than the header says
        # ("mmap length is greater than file size") and EOFError on an empty file.
        raise DataError(
            f"shard {path} is truncated or not a .npy file ({e}): re-run `uv run fineweb.py` "
            f"(`uv run fineweb.py --verify` checks every shard)"
        ) from None
    if tokens.dtype != np.uint16:
        raise DataError(
            f"shard {path} has dtype {tokens.dtype}, expected uint16 token ids: "
            f"re-run `uv run fineweb.py` to rewrite it"
        )
    if tokens.ndim != 1:
        raise DataError(
            f"shard {path} has shape {tokens.shape}, expected a 1-D token array: "
            f"re-run `uv run fineweb.py` to rewrite it"
        )
    return tokens


def _check_sizes(micro_batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")


def check_token_ids(tokens: np.ndarray, path: Path) -> None:
    """Every id must be a GPT-2 token: a larger one (a corrupt or foreign shard) would index past
    the embedding table."""
    top = int(tokens.max()) if tokens.size else 0
    if top >= VOCAB_SIZE:
        raise DataError(
            f"shard {path} holds token id {top}, not a GPT-2 id (< {VOCAB_SIZE}): the shard is corrupt; "
            "`uv run fineweb.py --out-dir <its folder> --verify` names every bad shard, then rewrite them"
        )


def _gather(
    shards: list[np.ndarray], paths: list[Path], shard_ids: np.ndarray, windows: np.ndarray, seq_len: int
) -> np.ndarray:
    """Rows = windows `windows[i]` of shards `shard_ids[i]`, as a (len, T+1) uint16 array."""
    out = np.empty((len(windows), seq_len + 1), dtype=np.uint16)
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    for s in np.unique(shard_ids):
        rows = np.flatnonzero(shard_ids == s)
        # (rows, T+1) token positions: one fancy index reads exactly these pages of the mmap
        block = shards[s][windows[rows, None] * seq_len + offsets]
        check_token_ids(block, paths[s])
        out[rows] = block
    return out


def _to_xy(rows: np.ndarray, pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) uint16 rows -> fresh int64 (x, y) tensors of shape (B, T), pinned if asked."""
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))  # astype copies into a new contiguous array
    y = torch.from_numpy(rows[:, 1:].astype(np.int64))
    if pin_memory:
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


# --------------------------------------------------------------------------------------- train


class _EpochPlan:
    """Where each position of one epoch lives: shard order plus (lazily) each shard's window order."""

    def __init__(self, epoch: int, counts: np.ndarray, seed: int, shuffle: bool):
        self.epoch, self.seed, self.shuffle, self.counts = epoch, seed, shuffle, counts
        if shuffle:
            # The trailing tag (0 here, 1 below) keeps the two streams apart: SeedSequence treats
            # [seed, e] and [seed, e, 0] as the same entropy.
            self.order = np.random.default_rng([seed, epoch, 0]).permutation(len(counts))
        else:
            self.order = np.arange(len(counts))
        ordered = counts[self.order]
        self.ends = np.cumsum(ordered)  # position p belongs to the first shard in order whose end > p
        self.starts = self.ends - ordered
        self._perms: dict[int, np.ndarray] = {}  # shard -> window permutation, built on first use

    def _perm(self, shard: int) -> np.ndarray:
        if shard not in self._perms:
            rng = np.random.default_rng([self.seed, self.epoch, 1, shard])
            self._perms[shard] = rng.permutation(int(self.counts[shard]))
        return self._perms[shard]

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch positions -> (shard index, window index inside that shard)."""
        k = np.searchsorted(self.ends, pos, side="right")
        shard_ids = self.order[k]
        windows = pos - self.starts[k]
        if self.shuffle:
            for s in np.unique(shard_ids):
                sel = shard_ids == s
                windows[sel] = self._perm(int(s))[windows[sel]]
        return shard_ids, windows


class TrainLoader:
    """Rank-strided, shuffled-per-epoch stream of (x, y) micro-batches; see the module docstring."""

    def __init__(
        self,
        data_dir: str | Path,
        micro_batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = True,
        pin_memory: bool = False,
        split: str = "train",
    ):
        _check_sizes(micro_batch_size, seq_len, rank, world_size)
        if seed < 0:
            raise UserError(f"--seed must be >= 0 (it seeds numpy's Generator), got {seed}")
        self.B, self.T = micro_batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.split = seed, shuffle, split
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory ignored: no CUDA device to copy batches to", stacklevel=2)
            pin_memory = False
        self.pin_memory = pin_memory

        self.data_dir = data_dir
        self.paths = list_shards(data_dir, split)
        self.shards = [load_shard(p) for p in self.paths]  # mmaps: validates every shard up front
        self.counts = np.array([max(len(s) - 1, 0) // seq_len for s in self.shards], dtype=np.int64)
        self.num_windows = int(self.counts.sum())  # N: rows per epoch
        if self.num_windows < micro_batch_size:
            raise DataError(
                f"the {split} split in {data_dir} holds {self.num_windows} windows of seq_len={seq_len}+1 "
                f"tokens, fewer than one micro-batch of {micro_batch_size}: use a smaller --seq-len or "
                f"--micro-batch-size, or more data"
            )
        self._base = 0  # rows consumed before this loader's first call
        self._calls = 0  # next_batch() calls made by this rank since _base was set
        self._plan: _EpochPlan | None = None  # only the current epoch's permutations are cached

    def _epoch_plan(self, epoch: int) -> _EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = _EpochPlan(epoch, self.counts, self.seed, self.shuffle)
        return self._plan

    def rows(self, global_rows: np.ndarray) -> np.ndarray:
        """Tokens of global rows (any int array), as a (len, T+1) uint16 array."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        epochs, pos = np.divmod(global_rows, self.num_windows)
        out = np.empty((len(global_rows), self.T + 1), dtype=np.uint16)
        # Rows of one batch are consecutive, so they span at most two epochs: the plan cache of one
        # epoch is rebuilt at most once per epoch boundary.
        for e in np.unique(epochs):
            sel = np.flatnonzero(epochs == e)
            shard_ids, windows = self._epoch_plan(int(e)).locate(pos[sel])
            out[sel] = _gather(self.shards, self.paths, shard_ids, windows, self.T)
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: int64 (x, y), each (B, T), fresh (and pinned if asked)."""
        first = self._base + (self._calls * self.world_size + self.rank) * self.B
        self._calls += 1
        return _to_xy(self.rows(np.arange(first, first + self.B)), self.pin_memory)

    @property
    def rows_consumed(self) -> int:
        """Global rows read by all ranks so far (exact when every rank made the same number of calls)."""
        return self._base + self._calls * self.world_size * self.B

    def state_dict(self) -> dict:
        rows = self.rows_consumed
        return {
            "rows_consumed": rows,
            "epoch": rows // self.num_windows,  # informational; rows_consumed alone is the state
            "seed": self.seed,
            "seq_len": self.T,
            "shuffle": self.shuffle,
            "num_windows": self.num_windows,
        }

    def resume_problem(self, state: dict) -> str | None:
        """Why `state` (a checkpoint's) read other data than this loader reads, or None: a change
        checkpoint.resume refuses unless --allow-config-change."""
        if state["num_windows"] == self.num_windows:
            return None
        return (
            f"data changed: the checkpoint's {self.split} split had {state['num_windows']} windows, the "
            f"{len(self.paths)} shards in {self.data_dir} now hold {self.num_windows}"
        )

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["rows_consumed"]` rows; any world size and micro-batch size work.
        Whether a state may continue this run (same seed, order, data) is checkpoint.resume's
        decision; given another seed, shuffle, seq_len or data (its --allow-config-change), the
        stream continues at the same token position in this loader's order."""
        self._base = int(state["rows_consumed"]) * int(state["seq_len"]) // self.T  # same tokens read
        self._calls = 0


class RandomTokens:
    """A loader of uniform random token ids, from a fixed seed: a training step's shapes and work with
    no data (bench/throughput.py, train_gpt2.py --plan). Hands over what TrainLoader does (`_to_xy`):
    contiguous x and y, each pinned when asked, so a timed host-to-device copy is the asynchronous one
    training pays, not a strided one."""

    def __init__(self, micro_batch_size: int, seq_len: int, vocab_size: int, pin_memory: bool, seed: int = 0):
        self.shape = (micro_batch_size, seq_len + 1)
        self.vocab_size, self.pin_memory = vocab_size, pin_memory
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, self.vocab_size, self.shape, generator=self.generator)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


# --------------------------------------------------------------------------------------- val


class ValLoader:
    """Fixed validation set (first `val_tokens` tokens of the val shard), rank-strided, padded batches."""

    def __init__(
        self,
        data_dir: str | Path,
        micro_batch_size: int,
        seq_len: int,
        val_tokens: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_sizes(micro_batch_size, seq_len, rank, world_size)
        self.B, self.T = micro_batch_size, seq_len
        path = list_shards(data_dir, "val")[0]
        self.tokens = load_shard(path)
        self.num_windows = val_tokens // seq_len  # n
        max_val = (len(self.tokens) - 1) // seq_len * seq_len  # the T+1 convention needs one extra token
        if self.num_windows <= 0:
            raise DataError(
                f"--val-tokens {val_tokens} is less than one window of --seq-len {seq_len}: "
                f"use --val-tokens between {seq_len} and {max_val}"
            )
        if self.num_windows * seq_len + 1 > len(self.tokens):
            raise DataError(
                f"val shard {path} has {len(self.tokens)} tokens, too few for --val-tokens {val_tokens} "
                f"at --seq-len {seq_len}: use --val-tokens {max_val} or less"
            )
        check_token_ids(self.tokens[: self.num_windows * seq_len + 1], path)  # the fixed set, once
        self.windows = np.arange(rank, self.num_windows, world_size)  # this rank's windows
        # Every rank runs the same number of batches (a rank with fewer windows gets all-padding
        # ones), so collectives and compiled graphs stay in step across ranks.
        per_rank_max = -(-self.num_windows // world_size)
        self.num_batches = -(-per_rank_max // micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def targets(self) -> np.ndarray:
        """Every token the validation loss predicts, each once: (num_windows * T,) over all ranks."""
        return self.tokens[1 : self.num_windows * self.T + 1]

    def __iter__(self):
        """Yields (x, y, num_valid): int64 (B, T) tensors; rows num_valid.. are padding to mask out."""
        offsets = np.arange(self.T + 1, dtype=np.int64)
        for b in range(self.num_batches):
            mine = self.windows[b * self.B : (b + 1) * self.B]
            num_valid = len(mine)
            # pad with copies of a real window (window 0 when this rank has none left)
            pad_with = mine[0] if num_valid else 0
            rows = np.concatenate([mine, np.full(self.B - num_valid, pad_with, dtype=np.int64)])
            x, y = _to_xy(self.tokens[rows[:, None] * self.T + offsets], pin_memory=False)
            yield x, y, num_valid


def describe_source(data_dir: str | Path) -> str | None:
    """What the shards were made from, as fineweb.py's manifest.json records it ("HuggingFaceFW/
    fineweb-edu (sample-10BT)", "fineweb_demo.parquet"), or None without a manifest."""
    try:
        source = json.loads((Path(data_dir) / "manifest.json").read_text())["settings"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "dataset" in source:
        return f"{source['dataset']} ({source.get('name')})" if source.get("name") else source["dataset"]
    names = [Path(f["path"]).name for f in source.get("files", [])]
    if not names:
        return None
    return ", ".join(names) if len(names) <= 2 else f"{names[0]} and {len(names) - 1} more files"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    train = TrainLoader(cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed, shuffle=cfg.shuffle)
    val = ValLoader(cfg.data_dir, cfg.micro_batch_size, cfg.seq_len, cfg.val_tokens)
    tokens = sum(len(s) for s in train.shards)
    print(f"train: {len(train.paths)} shards, {tokens:,} tokens, {train.num_windows:,} windows of {cfg.seq_len}")
    print(f"val:   {val.num_windows:,} windows ({val.num_windows * cfg.seq_len:,} tokens) in {val.num_batches} batches")
    start = time.perf_counter()
    for _ in range(cfg.batches):
        x, _y = train.next_batch()
    dt = time.perf_counter() - start
    rate = cfg.batches * x.numel() / dt
    print(f"loader: {cfg.batches} micro-batches of {tuple(x.shape)} in {dt * 1e3:.0f} ms ({rate:,.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
