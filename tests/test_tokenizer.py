"""The tokenizer helper: GPT-2 ids, offline, from the shipped ranks file; the cores a process may use."""

import os
import subprocess
import sys
from pathlib import Path

from tokenizer import EOT_TOKEN, get_encoding

ROOT = Path(__file__).resolve().parent.parent


def test_known_gpt2_ids():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    assert enc.n_vocab == 50257


def test_round_trip_unicode():
    enc = get_encoding()
    text = "Naïve café — 東京 🚀\n\ttabs and  spaces"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_loads_with_no_network_and_a_foreign_cache_dir(tmp_path):
    # A fresh process whose proxy points at a closed port and whose own tiktoken cache is empty:
    # any download attempt would fail, so passing proves the shipped file is what gets used.
    code = "from tokenizer import get_encoding; print(get_encoding().encode('Hello world'))"
    env = {
        "PATH": "/usr/bin:/bin",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
    }
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 995]"
    assert list(tmp_path.iterdir()) == []  # nothing written to the user's cache


def test_usable_cores_follow_the_cpu_binding_and_are_shared_by_the_nodes_ranks():
    code = (
        "import os, tokenizer; bound = sorted(os.sched_getaffinity(0)); "
        "print(tokenizer.usable_cores(), tokenizer.usable_cores(len(bound)), tokenizer.usable_cores(64)); "
        "os.sched_setaffinity(0, bound[:1]); print(tokenizer.usable_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    first, bound_to_one = out.splitlines()
    alone, one_each, more_ranks_than_cores = map(int, first.split())
    assert alone == min(len(os.sched_getaffinity(0)), os.cpu_count()) and one_each == 1 and more_ranks_than_cores == 1
    assert bound_to_one == "1"  # taskset / SLURM binding, not the node's cpu_count()


def test_core_tokenizes_with_this_ranks_share_of_the_cores(monkeypatch):
    import tiktoken

    import core_eval

    seen = []
    original = tiktoken.Encoding.encode_ordinary_batch

    def spy(self, text, *, num_threads=8):
        seen.append(num_threads)
        return original(self, text, num_threads=num_threads)

    monkeypatch.setattr(tiktoken.Encoding, "encode_ordinary_batch", spy)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more ranks on this node than it has cores
    task = core_eval.TASKS_BY_LABEL["copa"]
    examples = [{"query": f"Question {i}?", "choices": ["yes", "no"], "gold": 0} for i in range(3)]
    assert len(list(core_eval.tokenize(task, examples))) == 3
    assert seen == [1]
