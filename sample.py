"""Generate text from a checkpoint of ours (KV-cached sampling, the same sampler training uses).

uv run sample.py --checkpoint log/model_final.pt --prompt "The meaning of life is" --num-samples 2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import cli
from cli import DEFAULT_CHECKPOINT, DEVICE_CHOICES, DEVICE_HELP, UserError, field, parse_config


@dataclass(frozen=True)
class SampleConfig:
    checkpoint: str = field(
        DEFAULT_CHECKPOINT,
        "checkpoint to sample from: a model_*.pt file of train_gpt2.py, or a model_* folder (--parallel fsdp)",
    )
    prompt: str = field("Hello, I'm a language model,", "text to continue")
    num_samples: int = field(4, "how many continuations")
    max_new_tokens: int = field(64, "tokens to generate per sample (stops early at <|endoftext|>)")
    temperature: float = field(1.0, "softmax temperature; 0 = greedy")
    top_k: int = field(50, "sample among the k most likely tokens (0 = all)")
    seed: int = field(42, "seed of the sampling generator")
    device: str = field("auto", DEVICE_HELP, choices=DEVICE_CHOICES)

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0:
            raise UserError("--num-samples and --max-new-tokens must be >= 1, --temperature and --top-k >= 0")


def parse_args(argv=None) -> SampleConfig:
    return parse_config(SampleConfig, argv, description=__doc__)


if __name__ == "__main__":
    cli.parse_first(parse_args)  # --help and a bad flag are answered before torch loads

import torch

import checkpoint
import runtime
from model import generate
from tokenizer import EOT_TOKEN, get_encoding


def check_length(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Say which flag to change when prompt + new tokens do not fit the model's context."""
    if prompt_tokens >= context:  # not even one new token fits
        raise UserError(
            f"--prompt is too long: {prompt_tokens} tokens for a context of {context} (the model's "
            f"block_size, which must also hold the new tokens): shorten it to at most {context - 1} "
            "tokens"
        )
    if prompt_tokens + max_new_tokens > context:
        raise UserError(
            f"--max-new-tokens {max_new_tokens} does not fit: the prompt's {prompt_tokens} tokens leave "
            f"{context - prompt_tokens} of the model's context of {context} (block_size): ask for "
            f"--max-new-tokens {context - prompt_tokens} or fewer"
        )


def main(argv=None) -> int:
    cfg = parse_args(argv)
    device = runtime.resolve_device(cfg.device)
    model = checkpoint.load_model(cfg.checkpoint, device)
    enc = get_encoding()
    prompt = enc.encode(cfg.prompt) if cfg.prompt else [EOT_TOKEN]
    check_length(len(prompt), cfg.max_new_tokens, model.config.block_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = generate(
        model,
        prompt,
        cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        generator=generator,
        stop_token=EOT_TOKEN,
        autocast=runtime.autocast(device),
    )
    for i, row in enumerate(rows):
        print(f"--- sample {i} ---")
        print(cfg.prompt + enc.decode(row))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
