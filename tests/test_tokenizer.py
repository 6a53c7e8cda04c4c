"""The tokenizer helper: GPT-2 ids, offline, from the shipped ranks file."""

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
