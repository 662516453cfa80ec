"""Analytic prefill FLOPs of a decoder, with and without the visual-token exit.

Counted (2 FLOPs per multiply-add), for a layer that runs `n` query tokens:
  projections  n * 2H * (q + k + v + o widths) = n * 2H * (2 * heads * head_dim + 2 * kv_heads * head_dim)
  gated MLP    n * 3 * 2 * H * I                                    (gate, up, down)
  attention    4 * heads * head_dim * (sum over queries of their key count)   (scores QK^T and A.V)
with causal key counts: the i-th token of an n-token prefill attends to i keys, so the sum is
n (n + 1) / 2. Layers 0..e run the whole prompt (T text + V visual tokens); after an exit at layer
e, layers e+1..L-1 run the T text tokens, whose keys are text only. Plus the LM head on the last
position (prefill produces one row of logits), 2 H vocab, and optionally the routers asked
(2 (2H inner + 2 inner) each). Norms, RoPE, softmax and activations are element-wise and left out.
"""

from __future__ import annotations

from engines.core.shape import ModelShape


def layer_flops(shape: ModelShape, tokens: int) -> int:
    """One decoder layer over a `tokens`-long prefill with causal attention among those tokens."""
    if shape.intermediate_size is None:
        raise ValueError("counting FLOPs needs the MLP width (ModelShape.intermediate_size)")
    h, a, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    projections = tokens * 2 * h * (2 * a + 2 * kv)
    mlp = tokens * 3 * 2 * h * shape.intermediate_size
    attention = 4 * a * tokens * (tokens + 1) // 2
    return projections + mlp + attention


def router_flops(hidden_size: int, inner: int) -> int:
    return 2 * (2 * hidden_size * inner + inner * 2)


def prefill_flops(shape: ModelShape, num_text: int, num_visual: int, exit_layer: int | None = None,
                  router_inner: int = 0) -> int:
    """FLOPs of one prompt's prefill: `num_text` text and `num_visual` visual tokens, the visual
    tokens leaving after layer `exit_layer` (None, or the last layer: no exit).

    With `router_inner` > 0 the routers asked are counted too: layers 0..exit_layer, or 0..L-2
    when none says exit (pass it for the dynamic policy only)."""
    L = shape.num_layers
    if exit_layer is None or exit_layer >= L - 1:
        exit_layer = None
    elif exit_layer < 0:
        raise ValueError(f"exit layer {exit_layer} is negative")
    before = L if exit_layer is None else exit_layer + 1
    total = before * layer_flops(shape, num_text + num_visual)
    total += (L - before) * layer_flops(shape, num_text)
    total += 2 * shape.hidden_size * shape.vocab_size
    if router_inner:
        asked = L - 1 if exit_layer is None else exit_layer + 1
        total += asked * router_flops(shape.hidden_size, router_inner)
    return total


def flops_ratio(shape: ModelShape, num_text: int, num_visual: int, exit_layer: int | None,
                router_inner: int = 0) -> float:
    """Prefill FLOPs with the exit relative to the same prompt with no exit (and no routers)."""
    return prefill_flops(shape, num_text, num_visual, exit_layer, router_inner) / prefill_flops(
        shape, num_text, num_visual, None)
