"""GPT-2: the model, its Hugging Face name map and the sampler (the size presets: train_config.py).

Architecture only: no optimizer, no ranks, no prints, no file I/O (checkpoints are checkpoint.py's).

    uv run python -c "from model import GPT, GPTConfig; \\
        m = GPT(GPTConfig(**{'n_layer': 2, 'n_head': 2, 'n_embd': 64})); print(m.num_params())"

Numerics match Hugging Face's `GPT2LMHeadModel` (tanh GELU, LayerNorm eps 1e-5, pre-LN, learned
positions, tied embedding / lm_head), so weights move both ways through `hf_state_dict` /
`load_hf_state_dict`, which share one name map.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from tokenizer import VOCAB_SIZE as GPT2_VOCAB_SIZE  # 50,000 BPE merges + 256 bytes + <|endoftext|>

# The blocks' four Linear weight matrices, (out, in): Hugging Face stores them transposed (Conv1D),
# and Muon (--optimizer muon) trains exactly these.
BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position table)
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens: the softmax runs over these only
    # 50257 padded to 50304 (a multiple of 128) for faster matmuls. The extra rows are never
    # scored (GPT.output: -inf in the loss, a view of the real vocab for logits), as in llm.c, so an
    # imported OpenAI GPT-2 (whose padded rows are zero) gives exactly Hugging Face's probabilities.
    padded_vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")


# --attn-backend: the scaled-dot-product attention kernel a forward must use ("auto": PyTorch picks per
# call). Chosen inside the model's forward, not around the call: torch.compile traces the choice into
# its graph then, so a recompile under another kernel is another graph (chosen outside, dynamo's guards
# and the on-disk AOTAutograd cache both ignore it, and a compile under MATH replayed FLASH's kernel).
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`, never holding more than `chunk_rows`
    rows of logits. The plain path keeps (N, 50304) logits and their gradient: 13 GB in fp32 for
    the reference's 64 x 1024 micro-batch. Here each chunk's logits are made, turned into the loss
    and into the gradients w.r.t. h and weight (softmax - one-hot), and dropped; backward only
    scales the saved gradients. Same math as the plain path up to float summation order.

    The logits keep the padded width (50304, a multiple of 128) with -inf in the padding columns
    (`vocab_bias`, as the plain path): softmax gives those exactly 0, and the gradient matmuls run
    over rows of 50304 x 2 bytes, 16-byte aligned (a 50257-wide slice is not: a slower GEMM path)."""

    @staticmethod
    def forward(ctx, h, weight, vocab_bias, targets, chunk_rows: int, compute_grads: bool = True):
        # h (N, C), weight (padded_vocab, C), vocab_bias (padded_vocab,) float32 0 / -inf, targets (N,)
        # with -1 = ignore. compute_grads: the caller's grad mode (inside forward autograd has switched
        # it off, and needs_input_grad says only that the inputs require grad, which the weight does
        # even under torch.no_grad).
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        need_grad_h, need_grad_w = (
            (compute_grads and ctx.needs_input_grad[0]),
            (compute_grads and ctx.needs_input_grad[1]),
        )
        w = weight.to(dtype)
        valid = targets != -1
        safe_targets = targets.clamp(min=0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad_w else None
        for start in range(0, h.size(0), chunk_rows):
            end = min(start + chunk_rows, h.size(0))
            h_chunk = h[start:end].to(dtype)
            logits = (h_chunk @ w.t()).float() + vocab_bias  # (rows, padded_vocab), -inf in the padding
            log_z = torch.logsumexp(logits, dim=-1)  # (rows,)
            rows = torch.arange(end - start, device=h.device)
            chunk_valid = valid[start:end]
            target_logit = logits[rows, safe_targets[start:end]]
            loss_sum += torch.where(chunk_valid, log_z - target_logit, 0.0).sum()
            if need_grad_h or need_grad_w:
                grad_logits = torch.exp(logits.sub_(log_z[:, None]))  # softmax, in place: (rows, padded_vocab)
                grad_logits[rows, safe_targets[start:end]] -= 1.0
                grad_logits *= chunk_valid[:, None]
                grad_logits = grad_logits.to(dtype)
                if need_grad_h:
                    grad_h[start:end] = (grad_logits @ w).to(h.dtype)
                if need_grad_w:
                    grad_w += (grad_logits.t() @ h_chunk).float()  # the padding rows get exactly 0
        num_valid = valid.sum().clamp(min=1)
        if need_grad_h:
            grad_h = grad_h / num_valid.to(grad_h.dtype)
        if need_grad_w:
            grad_w = (grad_w / num_valid).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss_sum / num_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


class KVCache:
    """Preallocated keys and values for incremental decoding: one `LayerKV` per block. `length`:
    positions filled so far, the same for every layer after a full forward (GPT.forward advances it)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.layers = [
            LayerKV(
                self, torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
            )
            for _ in range(config.n_layer)
        ]
        self.length = 0


class LayerKV:
    """One block's keys and values, (B, n_head, max_len, head_dim) each. A block gets its own object,
    not a layer number: a block compiled on its own (FSDP2) would be recompiled for every distinct
    number it indexes a list with, and reach dynamo's recompile limit after 8 layers."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    @property
    def length(self) -> int:
        return self.cache.length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_head, t, head_dim) at the current length; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that computes in its input's dtype. Under FSDP2's bf16 policy a block's weights
    arrive in bf16 while the residual stream stays float32 (parallel.FSDPParallel.mixed_precision):
    CUDA's autocast runs layer_norm in float32 anyway, CPU's autocast refuses the mix ("mixed dtype").
    Everywhere else the weights already have the input's dtype and the cast is a no-op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True
        self.backend = "auto"  # a key of ATTENTION_BACKENDS (set through GPT.attention_backend)

    def forward(self, x: torch.Tensor, kv_cache: LayerKV | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is None or kv_cache.length == 0:
            if kv_cache is not None:
                kv_cache.update(k, v)
            y = self.causal_attention(q, k, v)
        else:
            # Decoding: T new queries after the cached prefix. One query sees every cached key; for
            # several, mask so query i sees the prefix and the new keys up to i. PyTorch picks the
            # kernel here whatever --attn-backend says: a forced one may not take these shapes.
            k, v = kv_cache.update(k, v)
            mask = None
            if T > 1:
                prefix = k.size(2) - T
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kernel = ATTENTION_BACKENDS[self.backend]
        if kernel is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel([kernel]):  # raises when that kernel cannot run these inputs: no silent fallback
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU; the exact one differs by ~5e-4
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: LayerKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input / output embedding
        # (padded_vocab,): 0 for the real tokens, -inf for the padding (see `output`); not a weight,
        # not in state_dict.
        vocab_bias = torch.zeros(config.padded_vocab_size)
        vocab_bias[config.vocab_size :] = float("-inf")
        self.register_buffer("vocab_bias", vocab_bias, persistent=False)
        # Rows of logits per chunk when a loss is asked for: 0 = the plain path (full logits).
        # A speed/memory setting of the trainer, not part of the architecture or the checkpoint.
        self.loss_chunk_rows = 0
        # Recompute each block's activations in backward instead of storing them: ~1/3 more compute
        # for a fraction of the memory (gpt2-large/xl on one GPU). Also a trainer setting.
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    @property
    def attention_backend(self) -> str:
        """The attention kernel every forward uses but KV-cached decoding (a key of ATTENTION_BACKENDS;
        --attn-backend, a trainer setting like loss_chunk_rows)."""
        return self.transformer.h[0].attn.backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {name!r}: choose from {', '.join(ATTENTION_BACKENDS)}")
        for block in self.transformer.h:
            block.attn.backend = name

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scaled_init", False):
                # Residual projections add into the stream 2 * n_layer times: scale so its variance
                # does not grow with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None); with `targets` (B, T) ->
        (None, the mean cross-entropy over them; positions with target -1 are ignored); with
        `positions` (N,) flat indices into the B*T positions -> (float32 logits (N, vocab_size), None),
        the output layer run only there and in float32 whatever autocast is on (evaluations that
        score a few tokens of long prompts: on a small model the 50,304-wide output is most of a
        forward's work, and a few rows in float32 cost next to nothing; bf16 logits would round
        each log-probability by up to ~0.03)."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache.layers[layer] if kv_cache is not None else None)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)
        if positions is not None:
            x = x.reshape(B * T, -1)[positions]  # (N, C)
            with torch.autocast(x.device.type, enabled=False):
                return self.output(x.float(), targets)
        return self.output(x, targets)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final hidden states x (B, T, C) -> (logits (B, T, vocab_size), None) without targets, or
        (None, the mean cross-entropy over the real vocab) with them: a compiled training step then
        need not keep the (B, T, 50304) logits as an output (measured: 1.28x faster on CPU)."""
        V = self.config.vocab_size
        if targets is not None and self.loss_chunk_rows:
            # Loss without logits: (B*T, C) hidden states straight into the chunked lm_head + CE;
            # the gradients only when autograd will use them (not under torch.no_grad).
            compute_grads = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
            loss = ChunkedLinearCrossEntropy.apply(
                x.reshape(-1, x.size(-1)),
                self.lm_head.weight,
                self.vocab_bias,
                targets.reshape(-1),
                self.loss_chunk_rows,
                compute_grads,
            )
            return None, loss
        # The padding columns get -inf from a fixed bias the matmul adds in its epilogue: softmax gives
        # them exactly 0 (no probability, no gradient) without a pass over, or a copy of, the logits.
        logits = F.linear(x, self.lm_head.weight, self.vocab_bias)  # (B, T, padded_vocab)
        if targets is None:
            return logits[..., :V], None  # a view: the padding columns are never seen
        return None, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    # ---- sizes -------------------------------------------------------------------------------
    def num_params(self, include_position_embedding: bool = True) -> int:
        """Parameter count, the tied embedding counted once."""
        n = sum(p.numel() for p in self.parameters())
        if not include_position_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), the PaLM-paper estimate used for MFU:
        6 per weight that multiplies (all but the position table; the tied embedding counts once, as
        the lm_head matmul) plus 12 * n_layer * n_embd * seq_len for the attention scores and sums.
        GPT-2 124M at seq_len 1024: ~0.86 GFLOP/token."""
        weights = self.num_params(include_position_embedding=False)
        return 6 * weights + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def model_config_dict(self) -> dict:
        return asdict(self.config)


# ---- Hugging Face interop: one name map, used for import and export ---------------------------
# Our parameter names are GPT-2's own, so the map is the identity, plus a transpose for the four
# matrices Hugging Face stores as Conv1D (in_features, out_features) instead of Linear (out, in).
def _hf_to_ours_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if name.endswith(BLOCK_MATRICES) else tensor


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face GPT2LMHeadModel names and layouts, vocab cut to 50257."""
    vocab = model.config.vocab_size
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = _hf_to_ours_tensor(name, tensor)  # a transpose is its own inverse
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        out[name] = tensor.detach().clone().contiguous()
    return out


def load_hf_state_dict(model: GPT, hf_sd: dict[str, torch.Tensor]) -> GPT:
    """Copy a Hugging Face GPT2LMHeadModel state dict into `model` (same sizes, padded vocab)."""
    ours = model.state_dict()
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    hf_sd.setdefault("lm_head.weight", hf_sd["transformer.wte.weight"])  # tied in HF too
    missing = sorted(set(ours) - set(hf_sd))
    if missing:
        raise ValueError(f"Hugging Face state dict lacks {missing[:3]}: is it a GPT-2 of this size?")
    with torch.no_grad():
        for name, target in ours.items():
            src = _hf_to_ours_tensor(name, hf_sd[name])
            if name in ("transformer.wte.weight", "lm_head.weight"):
                target.zero_()  # padding rows: never scored
                target[: src.size(0)].copy_(src)
            elif src.shape != target.shape:
                raise ValueError(f"{name}: Hugging Face shape {tuple(src.shape)} != ours {tuple(target.shape)}")
            else:
                target.copy_(src)
    return model


def gpt_config_from_hf(hf_config) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config."""
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=max(hf_config.vocab_size, math.ceil(hf_config.vocab_size / 128) * 128),
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
    )


# ---- sampling --------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    use_kv_cache: bool = True,
    autocast=None,
) -> list[list[int]]:
    """Sample `num_samples` continuations of `prompt` (token ids). Returns the new tokens of each,
    cut before `stop_token`. temperature 0 = greedy. With the KV cache each new token costs one
    position; without it the whole sequence is recomputed (kept to test the cache against).
    The generator lives on the model's device and fixes the draws. `autocast`: the caller's
    precision context (runtime.autocast: bf16 on CUDA); the KV cache is kept in its dtype."""
    device = next(model.parameters()).device
    total = len(prompt) + max_new_tokens
    if not prompt:
        raise ValueError("prompt is empty: give at least one token (e.g. <|endoftext|>)")
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"block_size {model.config.block_size}: ask for fewer tokens"
        )
    was_training = model.training
    model.eval()
    # On the model's device, as everything the loop makes from them (a CPU tensor fed to a CUDA model
    # is an error there, and only there: the CPU tests could not see it).
    tokens = torch.tensor(prompt, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    next_input = tokens
    with autocast if autocast is not None else nullcontext():
        cache = None
        if use_kv_cache:  # keys and values in the dtype the attention computes in
            autocasting = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocasting else next(model.parameters()).dtype
            cache = KVCache(model.config, num_samples, total, device, dtype)
        for _ in range(max_new_tokens):
            logits, _ = model(next_input if use_kv_cache else tokens, kv_cache=cache)
            logits = logits[:, -1, :].float()  # (num_samples, vocab)
            if temperature == 0:
                new = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    top_values, top_ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
                    choice = torch.multinomial(F.softmax(top_values, dim=-1), 1, generator=generator)
                    new = torch.gather(top_ids, -1, choice)
                else:
                    new = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            tokens = torch.cat([tokens, new], dim=1)
            next_input = new
            if stop_token is not None:
                done |= new.squeeze(1) == stop_token
                if bool(done.all()):
                    break
    model.train(was_training)
    out = []
    for row in tokens[:, len(prompt) :].tolist():
        if stop_token is not None and stop_token in row:
            row = row[: row.index(stop_token)]
        out.append(row)
    return out
