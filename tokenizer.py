"""The GPT-2 BPE tokenizer (tiktoken), loaded from the ranks file this repo ships.

Every script gets its tokenizer here, so no script ever downloads one: compute nodes are often
offline, and a download that hangs there would stall a job for hours.

    uv run python -c "from tokenizer import get_encoding; print(get_encoding().encode('Hello world'))"

How: tiktoken looks for a download in the folder named by $TIKTOKEN_CACHE_DIR, under the sha1 of
its URL, and uses it without any request when its sha256 matches the hash tiktoken pins. We ship
`assets/tiktoken/0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4` (= r50k_base.tiktoken, 0.8 MB, the
same ranks as tiktoken's "gpt2") and point tiktoken there while it builds the encoding.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import tiktoken

TIKTOKEN_CACHE = Path(__file__).resolve().parent / "assets" / "tiktoken"
# r50k_base and gpt2 are the same 50,256 merges + <|endoftext|>; r50k_base is the one-file format.
ENCODING_NAME = "r50k_base"
EOT_TOKEN = 50256  # <|endoftext|>: separates documents in the token shards
VOCAB_SIZE = 50257  # ids are 0..50256; the model pads its embedding to 50304


@contextlib.contextmanager
def _cache_dir(path: Path):
    """Point tiktoken's download cache at `path` for the duration of the block."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding, built offline from the shipped ranks file."""
    if not TIKTOKEN_CACHE.is_dir():
        raise FileNotFoundError(
            f"tokenizer ranks folder {TIKTOKEN_CACHE} is missing: restore it with `git checkout -- assets/`"
        )
    with _cache_dir(TIKTOKEN_CACHE):
        enc = tiktoken.get_encoding(ENCODING_NAME)
    assert enc.eot_token == EOT_TOKEN and enc.n_vocab == VOCAB_SIZE
    return enc


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """(VOCAB_SIZE,) int64: how many UTF-8 bytes of text each token id stands for; <|endoftext|> is 0
    (a document boundary, not text). Summed over a token stream: the bytes of the text it encodes,
    the denominator of bits per byte (a token may hold part of a multi-byte character: the sum is
    still exact over whole documents)."""
    enc = get_encoding()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(VOCAB_SIZE)], dtype=np.int64)
    lengths[EOT_TOKEN] = 0
    return lengths


def usable_cores(local_processes: int = 1) -> int:
    """The CPU cores this process may use, shared with `local_processes - 1` others of its node (a
    torchrun's ranks): its CPU affinity (SLURM's and taskset's binding; os.cpu_count() counts the
    whole node), capped by a cgroup v2 CPU quota (a container's --cpus), divided among them; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores // max(1, local_processes))
