"""The "Your GPU" tables of the README and docs/your_gpu.md are what bench/your_gpu.py computes with the
trainer's own rules (runtime's precision rule, memory.py's formula): a change of either shows here."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("your_gpu", ROOT / "bench" / "your_gpu.py")
your_gpu = sys.modules["your_gpu"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(your_gpu)


def test_the_tables_are_computed_not_guessed():
    table = your_gpu.table()
    for doc in ("README.md", "docs/your_gpu.md"):
        assert table in (ROOT / doc).read_text(), f"{doc}'s table differs from `uv run bench/your_gpu.py`"


def test_an_80_gb_card_keeps_the_reference_micro_batch_and_older_cards_get_fp16():
    cards = {card.name: card for card in your_gpu.CARDS}
    assert your_gpu.micro_batch("gpt2", cards["A100 / H100 80 GB"]).startswith("64 ")
    assert cards["Tesla V100 16 GB"].precision == cards["Tesla T4 (Colab, Kaggle)"].precision == "fp16"
    assert cards["RTX 3090 / 4090, A10G, L4 24 GB"].precision == "bf16"
