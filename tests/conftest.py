"""Shared test fixtures. Every test runs from a clone of the repo alone: its data ships in the repo.

- `assets/demo/fineweb_demo.parquet`: 348 real FineWeb documents (ODC-By; see assets/demo/README.md),
  the corpus of the demo, the data tests and the training tests.
- `tests/data/hellaswag_val_300.jsonl`: 300 real HellaSwag validation examples (MIT; see
  tests/data/README.md).
"""

import resource
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_PARQUET = ROOT / "assets" / "demo" / "fineweb_demo.parquet"
HELLASWAG_FIXTURE = Path(__file__).resolve().parent / "data" / "hellaswag_val_300.jsonl"
VAL_TOKENS = 20_000  # shard 0 of the training-test data: the first 20,000 tokens of the stream

# Tests import the top-level scripts and modules (flat layout, no package).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def demo_texts() -> list[str]:
    return pq.read_table(DEMO_PARQUET, columns=["text"]).column("text").to_pylist()


def demo_token_stream() -> np.ndarray:
    """The demo corpus as fineweb.py tokenizes it: every document as [<|endoftext|>] + its GPT-2 ids."""
    from tokenizer import EOT_TOKEN, get_encoding

    enc = get_encoding()
    return np.concatenate([np.array([EOT_TOKEN, *enc.encode_ordinary(t)], dtype=np.uint16) for t in demo_texts() if t])


@pytest.fixture(scope="session")
def demo_parquet() -> Path:
    return DEMO_PARQUET


@pytest.fixture(scope="session")
def hellaswag_val_path() -> Path:
    """300 real validation examples (not the full file: load them with verify=False / --no-verify)."""
    return HELLASWAG_FIXTURE


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The demo corpus as reference-format token shards (np.save'd uint16, 571,177 tokens): the first
    20,000 tokens as val shard 0, the rest as 3 train shards (np.array_split)."""
    tokens = demo_token_stream()
    out = tmp_path_factory.mktemp("shards")
    np.save(out / "edufineweb_val_000000.npy", tokens[:VAL_TOKENS])
    for i, part in enumerate(np.array_split(tokens[VAL_TOKENS:], 3), start=1):
        np.save(out / f"edufineweb_train_{i:06d}.npy", part)
    return out


@pytest.fixture
def one_thread():
    """In-process compute on one thread: two threads on a busy 2-core machine spin and run ~5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def limit_file_size(max_bytes: int):
    """preexec_fn: files may grow to `max_bytes`; a write past that fails with EFBIG (SIGXFSZ, which
    would kill the process instead, is ignored; an ignored signal stays ignored across exec)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


# The longest serial stretches first. pytest-xdist runs a group (the SLURM tests share one cluster)
# on one worker in collection order; collected last, as test_train_sh.py is alphabetically, it ran
# alone at the end while the other worker idled. The sort is stable: the rest keep their order.
LONG_FIRST = (
    "tests/test_train_sh.py",
    "tests/test_demo.py",
    "tests/test_fsdp.py",
    "tests/test_recipe.py",
    "tests/test_spike_guard.py",
    "tests/test_restarts.py",
    "tests/test_disk_full.py",
    "tests/test_core.py",
    "tests/test_gpu_check.py",
    "tests/test_precision.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--heavy",
        action="store_true",
        help="also run the tests marked heavy (the GPU check's dry run, FSDP twins of DDP scenarios)",
    )


def pytest_collection_modifyitems(session, config, items):
    # CI's 2 cores run the suite in ~16 minutes; the heavy tests add ~5 more (docs/tests.md).
    if not config.getoption("--heavy"):
        skip = pytest.mark.skip(reason="heavy: run with `uv run pytest --heavy` (before a GPU session, before landing)")
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(skip)
    items.sort(
        key=lambda item: next((i for i, p in enumerate(LONG_FIRST) if item.nodeid.startswith(p)), len(LONG_FIRST))
    )
