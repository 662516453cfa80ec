"""The language-model half of every family, with the KV cache as explicit tensors.

The weights stay in the transformers modules (Llama, Qwen2, ... layers); only the attention step
is re-expressed so that past keys/values, position ids and the key mask are plain inputs and the
new tokens' keys/values plain outputs (the cache itself is the runtime's, written in place). That is what lets one layer serve before and after the visual-token
exit (only the shapes differ) and what the ONNX graphs are traced from.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engines.core.errors import DyVTEError
from engines.core.shape import ModelShape

# Decoder-only LLMs whose layers follow the Llama layout (pre-norm, RoPE, GQA, gated MLP).
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def attention_bias(key_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, K] from a key mask [B, K] (1 = real token, 0 = padding).

    The queries are the last `num_queries` entries of the key axis, so causality is by cache index:
    this holds before the exit, after it (the cache is just shorter) and with left padding.
    """
    total = key_mask.shape[-1]
    query_index = torch.arange(num_queries, device=key_mask.device) + (total - num_queries)
    key_index = torch.arange(total, device=key_mask.device)
    causal = key_index[None, :] <= query_index[:, None]  # [S, K]
    allowed = causal[None, :, :] & key_mask[:, None, :].bool()  # [B, S, K]
    zero = torch.zeros((), dtype=dtype, device=key_mask.device)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=key_mask.device)
    return torch.where(allowed, zero, blocked)[:, None, :, :]


def attend(q: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of queries [B, H, S, D] over the cache [B, KV, P, D] and the new keys [B, KV, S, D]
    without concatenating them: the scores of both parts are joined (they are small), one softmax,
    then each part's values are read once. A decode step thus reads the cache and writes nothing of
    its size; grouped-query heads share their key head by grouping the queries, not by copying keys.
    `bias` [B, 1, S, P + S] is the additive mask (padding, causality by cache index)."""
    batch, heads, seq, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = q.reshape(batch, kv_heads, groups * seq, dim)
    scores = torch.cat([q @ past_key.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1) * scale
    total = scores.shape[-1]
    bias = bias.expand(batch, groups, seq, total).reshape(batch, 1, groups * seq, total)
    probs = torch.softmax((scores + bias).float(), dim=-1).to(q.dtype)
    past_len = past_key.shape[2]
    out = probs[..., :past_len] @ past_value + probs[..., past_len:] @ value
    return out.reshape(batch, heads, seq, dim)


def layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    bias: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer: returns the new hidden states and the new tokens' keys/values (the
    caller keeps the cache: `past` + these, in its own buffers)."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    residual = hidden
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = attend(q, past_key, past_value, k, v, bias, attn.scaling)
    hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def run_layers(
    layers,
    rotary: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    key_mask: torch.Tensor,
    past: list[tuple[torch.Tensor, torch.Tensor]],
):
    """Consecutive decoder layers on one mode's tensors; `key_mask` covers past + new tokens.
    Returns the hidden states and, per layer, the new tokens' (keys, values)."""
    cos, sin = rotary(hidden, position_ids)
    bias = attention_bias(key_mask, hidden.shape[1], hidden.dtype)
    presents = []
    for layer, (past_key, past_value) in zip(layers, past):
        hidden, k, v = layer_forward(layer, hidden, cos, sin, bias, past_key, past_value)
        presents.append((k, v))
    return hidden, presents


class TextDecoder(nn.Module):
    """Token embedding, decoder layers, final norm and LM head of a transformers causal LM."""

    def __init__(self, base_model: nn.Module, lm_head: nn.Module, config):
        super().__init__()
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise DyVTEError(
                f"unsupported language model type {model_type!r}; supported: "
                + ", ".join(SUPPORTED_TEXT_MODEL_TYPES)
            )
        if getattr(config, "use_sliding_window", False):
            raise DyVTEError("sliding-window attention layers are not supported")
        self.config = config
        self.embed_tokens = base_model.embed_tokens
        self.layers = base_model.layers
        self.norm = base_model.norm
        self.rotary_emb = base_model.rotary_emb
        self.lm_head = lm_head
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = ModelShape(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            intermediate_size=getattr(config, "intermediate_size", None),
        )

    def empty_cache(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        s = self.shape
        return torch.zeros(batch, s.num_kv_heads, 0, s.head_dim, dtype=dtype, device=device)

    def run_layers(self, start: int, end: int, hidden, position_ids, key_mask, past):
        """Layers [start, end) (see `run_layers`)."""
        return run_layers(self.layers[start:end], self.rotary_emb, hidden, position_ids, key_mask, past)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))
