"""train_gpt2.py as torchrun starts it, except that rank 1 finds its GPU with 0.1 GiB free (what a
stale process still holding that GPU leaves): the entry point of tests/test_restarts.py's memory case.

    torchrun --nproc-per-node 2 tests/low_memory_rank.py <train_gpt2.py flags>
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402

if os.environ.get("RANK") == "1":
    memory.available_bytes = lambda device, local_ranks=1: (0.1 * 2**30, "its GPU has 0.1 GiB free")
sys.argv[0] = str(ROOT / "train_gpt2.py")
runpy.run_path(sys.argv[0], run_name="__main__")
