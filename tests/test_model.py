"""model.py: GPT-2 numerics against Hugging Face, sizes and FLOPs, the KV-cache sampler, the loader."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import (
    GPT,
    GPTConfig,
    generate,
    gpt_config_from_hf,
    hf_state_dict,
    load_hf_state_dict,
)
from train_config import MODEL_PRESETS


def tiny_hf_model(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    # A freshly initialised HF GPT-2 has zero biases and unit LayerNorms: randomise them so a
    # swapped or untransposed tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_hf_parity_both_ways():
    hf = tiny_hf_model()
    ours = load_hf_state_dict(GPT(gpt_config_from_hf(hf.config)), hf.state_dict()).eval()
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(idx).logits
        our_logits, _ = ours(idx)
    assert our_logits.shape == hf_logits.shape == (3, 40, 50257)
    assert (our_logits - hf_logits).abs().max().item() < 1e-4

    # ... and back: our weights exported into a fresh HF model give the same logits.
    hf2 = GPT2LMHeadModel(hf.config).eval()
    missing, unexpected = hf2.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and all(".attn.bias" in k or ".attn.masked_bias" in k for k in missing)
    with torch.no_grad():
        assert (hf2(idx).logits - hf_logits).abs().max().item() < 1e-5


def test_hf_loss_matches_our_loss():
    hf = tiny_hf_model(seed=3)
    ours = load_hf_state_dict(GPT(gpt_config_from_hf(hf.config)), hf.state_dict()).eval()
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss  # HF shifts labels inside
        _, our_loss = ours(idx[:, :-1], targets=idx[:, 1:])
    assert abs(hf_loss.item() - our_loss.item()) < 1e-5


def test_gpt2_124m_size_and_flops():
    with torch.device("meta"):
        model = GPT(GPTConfig(**MODEL_PRESETS["gpt2"]))
    # 124M with the 50304-row embedding (OpenAI's 50257 rows give 124,439,808).
    assert model.num_params() == 124_475_904
    assert model.num_params() - model.num_params(include_position_embedding=False) == 1024 * 768
    flops = model.flops_per_token(1024)
    assert flops == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert 0.85e9 < flops < 0.87e9  # the ~860 MFLOP/token quoted for GPT-2 124M


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64))
    c_proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    c_fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert c_fc_std == pytest.approx(0.02, rel=0.05)
    assert c_proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_logits_and_loss_cover_the_real_vocab_only():
    """The 47 padding rows of the 50304-wide output are never scored: logits are the real 50257, and the
    loss equals a cross-entropy over those alone, with no gradient reaching the padding rows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    with torch.no_grad():
        model.lm_head.weight[50257:] = torch.randn(47, 32) * 5  # padding rows that would matter if scored
    idx = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, none = model(idx[:, :-1])
    assert none is None and logits.shape == (2, 8, 50257) and model.lm_head.weight.shape[0] == 50304
    none, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert none is None and math.isfinite(loss.item())
    exact = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), idx[:, 1:].reshape(-1))
    assert abs(loss.item() - exact.item()) < 1e-6
    loss.backward()
    assert model.lm_head.weight.grad[50257:].abs().max().item() == 0.0
    assert "vocab_bias" not in model.state_dict()  # not a weight: checkpoints and exports are unchanged


def test_kv_cache_sampling_equals_full_recompute():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)).eval()
    prompt = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    greedy_cached = generate(model, prompt, 20, num_samples=2, temperature=0, use_kv_cache=True)
    greedy_full = generate(model, prompt, 20, num_samples=2, temperature=0, use_kv_cache=False)
    assert greedy_cached == greedy_full and len(greedy_cached[0]) == 20
    sampled = [
        generate(
            model, prompt, 20, num_samples=3, top_k=50, use_kv_cache=cache, generator=torch.Generator().manual_seed(7)
        )
        for cache in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_generate_stops_at_stop_token_and_checks_length():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    first = generate(model, [1, 2, 3], 5, temperature=0)[0]
    cut = generate(model, [1, 2, 3], 5, temperature=0, stop_token=first[2])[0]
    assert cut == first[: first.index(first[2])]
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [1, 2, 3], 40)


@pytest.mark.parametrize("chunk_rows", [7, 64, 4096])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk_rows):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    chunked = GPT(plain.config)
    chunked.load_state_dict(plain.state_dict())
    chunked.loss_chunk_rows = chunk_rows
    idx = torch.randint(0, 50257, (3, 20))
    targets = torch.randint(0, 50257, (3, 20))
    targets[1, 5:9] = -1  # ignored positions (padding) must be ignored the same way
    _, plain_loss = plain(idx, targets)
    logits, chunked_loss = chunked(idx, targets)
    assert logits is None
    assert abs(plain_loss.item() - chunked_loss.item()) < 1e-5
    plain_loss.backward()
    chunked_loss.backward()
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_chunked_loss_under_no_grad_and_all_ignored():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (2, 8))
    targets = torch.randint(0, 50257, (2, 8))
    _, plain_loss = model(idx, targets)
    model.loss_chunk_rows = 5
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - plain_loss.item()) < 1e-5


def _gradients(model: GPT, idx: torch.Tensor, backend: str = "auto") -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.attention_backend = backend
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_speed_levers_that_run_on_cpu_give_the_plain_gradients():
    """--activation-checkpointing and each --attn-backend that has a CPU kernel (math, flash) give the
    gradients of the plain path within 1e-5; efficient and cudnn have none on CPU and say so."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(1))
    plain = _gradients(model, idx, "math")
    model.activation_checkpointing = True
    checkpointed = _gradients(model, idx)
    model.activation_checkpointing = False
    for name, grads in (
        ("activation checkpointing", checkpointed),
        ("flash", _gradients(model, idx, "flash")),
        ("auto", _gradients(model, idx, "auto")),
    ):
        worst = max((grads[n] - plain[n]).abs().max().item() for n in plain)
        assert worst < 1e-5, f"{name}: gradients differ by {worst:.3g}"
    for backend in ("efficient", "cudnn"):  # GPU-only kernels: a clear error, never a silent fallback
        with pytest.raises(RuntimeError, match="No viable backend"):
            _gradients(model, idx, backend)
