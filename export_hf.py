"""Export a checkpoint of ours as a Hugging Face GPT-2 folder (config.json, model.safetensors,
tokenizer files) that `transformers.GPT2LMHeadModel.from_pretrained` loads with the same logits.

    uv run export_hf.py --checkpoint log/model_final.pt --out-dir gpt2-fineweb-hf

The folder then works with lm-evaluation-harness (`--model hf --model_args pretrained=DIR`), the
Hub (`huggingface-cli upload`), and `uv run hellaswag.py --hf DIR`. Weights are safetensors, never
pickles; the vocab padding (50304 -> 50257) is trimmed.

--out-dir must be new, empty, or a previous export (a folder holding only the files an export
writes): that one is replaced atomically. Anything else there is refused, never deleted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cli
from cli import DEFAULT_CHECKPOINT, UserError, field, parse_config

HF_TOKENIZER_FILES = Path(__file__).resolve().parent / "assets" / "gpt2_hf_tokenizer"  # OpenAI's vocab + merges
# What save_pretrained writes for a GPT-2 model and its tokenizer (the last four in older transformers):
# a folder holding only these names is a previous export and may be replaced.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
    }
)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = field(
        DEFAULT_CHECKPOINT, "checkpoint to export: a model_*.pt file, or a model_* folder of a --parallel fsdp run"
    )
    out_dir: str = field("gpt2-fineweb-hf", "folder to write: new, empty, or a previous export (replaced atomically)")


def parse_args(argv=None) -> ExportConfig:
    return parse_config(ExportConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import checkpoint
import fileio
from model import GPT, hf_state_dict


def check_out_dir(out_dir: Path, checkpoint_path: Path) -> None:
    """Refuse, in one line, any --out-dir whose replacement could lose a file that is not ours."""
    if out_dir.resolve() in (checkpoint_path.resolve().parent, *checkpoint_path.resolve().parents):
        raise UserError(f"--out-dir {out_dir} holds the checkpoint being exported: choose an empty or new folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file: choose an empty or new folder")
    entries = list(out_dir.iterdir())
    names = {p.name for p in entries}
    previous_export = {"config.json", "model.safetensors"} <= names
    if entries and not (previous_export and names <= EXPORT_FILES and all(p.is_file() for p in entries)):
        raise UserError(f"--out-dir {out_dir} holds other files: choose an empty or new folder")


def export(model: GPT, out_dir: str | Path) -> Path:
    """Write `model` as a GPT2LMHeadModel folder, built beside `out_dir` and renamed into place, so
    an interrupted export never leaves a half-written model (check_out_dir first)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",  # the tanh GELU we train with
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # we train without dropout
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or any(not k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing):
        raise ValueError(f"name map mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    from safetensors import SafetensorError

    out_dir = Path(out_dir)
    missing_parents = [p for p in out_dir.parents if not p.exists()]  # deepest first; atomic_dir makes them
    try:
        with fileio.atomic_dir(out_dir) as staging:
            try:
                hf_model.save_pretrained(staging, safe_serialization=True)
            except SafetensorError as e:  # its I/O errors (a full disk: "File too large (os error 27)")
                raise OSError(f"cannot write {out_dir} ({e}): free space or choose another --out-dir") from None
            GPT2TokenizerFast.from_pretrained(HF_TOKENIZER_FILES).save_pretrained(staging)
    except BaseException:
        for folder in missing_parents:  # a failed export leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something else is in it now
        raise
    return out_dir


def main(argv=None) -> int:
    cfg = parse_args(argv)
    check_out_dir(Path(cfg.out_dir), Path(cfg.checkpoint))
    model = checkpoint.load_model(cfg.checkpoint)
    out = export(model, cfg.out_dir)
    print(f"exported {cfg.checkpoint} ({model.num_params():,} parameters) to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
