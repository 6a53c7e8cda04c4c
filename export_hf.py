"""Export a checkpoint of ours as a Hugging Face GPT-2 folder (config.json, model.safetensors,
tokenizer files) that `transformers.GPT2LMHeadModel.from_pretrained` loads with the same logits.

    uv run export_hf.py --checkpoint log/model_final.pt --out-dir gpt2-fineweb-hf

The folder then works with lm-evaluation-harness (`--model hf --model_args pretrained=DIR`), the
Hub (`huggingface-cli upload`), and `uv run hellaswag.py --hf DIR`. Weights are safetensors, never
pickles; the vocab padding (50304 -> 50257) is trimmed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cli import field, parse_config
from model import GPT, hf_state_dict

HF_TOKENIZER_FILES = Path(__file__).resolve().parent / "assets" / "gpt2_hf_tokenizer"  # OpenAI's vocab + merges


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = field("log/model_final.pt", "checkpoint to export")
    out_dir: str = field("gpt2-fineweb-hf", "folder to write (replaced atomically if it exists)")


def export(model: GPT, out_dir: str | Path) -> Path:
    """Write `model` as a GPT2LMHeadModel folder. Built in a temp folder beside `out_dir` and
    renamed into place, so an interrupted export never leaves a half-written model."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new",  # the tanh GELU we train with
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # we train without dropout
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
        raise ValueError(f"name map mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        GPT2TokenizerFast.from_pretrained(HF_TOKENIZER_FILES).save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> int:
    cfg = parse_config(ExportConfig, argv, description=__doc__)
    try:
        model = GPT.from_checkpoint(cfg.checkpoint)
        out = export(model, cfg.out_dir)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {cfg.checkpoint} ({model.num_params():,} parameters) to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
