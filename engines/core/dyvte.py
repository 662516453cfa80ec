"""The DyVTE rule, once for the runtime and for router training: how a batch of prompts is laid out,
what a router reads, when it says exit, and what the exit does to the batch.

Training's labels are right only while they see exactly what the runtime does at an exit, so both
call these functions: `layout_prompts` (left-padded prompts, visual positions marked),
`router_weights` + `router_features` (the router's input), `exit_decision`, and `drop_visual`
(the exit itself: a gather that keeps the real text rows in order, original position ids kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEEP, EXIT = 0, 1  # router logit indices, as published


# --------------------------------------------------------------------------- batch layout


@dataclass
class BatchLayout:
    """Prompts left-padded to end at column `prompt_len`; tokens appended after it (training's
    answers) are right-padded. Visual positions hold token id 0 and are marked in `visual`."""

    input_ids: torch.Tensor  # [B, S] long
    key_mask: torch.Tensor  # [B, S] long, 1 = real token
    position_ids: torch.Tensor  # [B, S] long, 0.. per prompt
    visual: torch.Tensor  # [B, S] bool
    prompt_len: int


def layout_prompts(prompts, appended: list[list[int]] | None = None) -> BatchLayout:
    """The batch of `prompts` (each with `input_ids` and a `visual_span` or None), plus
    `appended[b]` after prompt b when given. Prompt columns [0, prompt_len) are the prefill batch."""
    P = max(len(p.input_ids) for p in prompts)
    extra = max((len(a) for a in appended), default=0) if appended else 0
    B, S = len(prompts), P + extra
    ids = torch.zeros(B, S, dtype=torch.long)
    key_mask = torch.zeros(B, S, dtype=torch.long)
    positions = torch.zeros(B, S, dtype=torch.long)
    visual = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        pad = P - n
        tail = list(appended[b]) if appended else []
        ids[b, pad:P] = torch.tensor(p.input_ids, dtype=torch.long).clamp(min=0)
        if tail:
            ids[b, P:P + len(tail)] = torch.tensor(tail, dtype=torch.long)
        key_mask[b, pad:P + len(tail)] = 1
        positions[b, pad:P + len(tail)] = torch.arange(n + len(tail))
        if p.visual_span is not None:
            s, e = p.visual_span
            visual[b, pad + s:pad + e] = True
            ids[b, pad + s:pad + e] = 0
    return BatchLayout(ids, key_mask, positions, visual, P)


def splice_visual(embeds: torch.Tensor, visual: torch.Tensor, rows: list[torch.Tensor | None]) -> torch.Tensor:
    """Token embeddings [B, S, H] with each row's visual embeddings [V_b, H] written over its marked
    positions (rows without an image give None)."""
    parts = [r for r in rows if r is not None]
    if not parts:
        return embeds
    values = torch.cat(parts).to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(visual.to(embeds.device)[..., None], values)


# --------------------------------------------------------------------------- the router's input and rule


def visual_end(visual: torch.Tensor) -> torch.Tensor:
    """Per row of a [B, S] visual mask, the column just past the visual span (0 when there is none)."""
    has = visual.any(dim=1)
    end = visual.shape[1] - torch.argmax(visual.flip(1).to(torch.int8), dim=1)
    return torch.where(has, end, torch.zeros_like(end))


def text_feature_weights(seq_len: int, visual_end: torch.Tensor, valid_end: torch.Tensor) -> torch.Tensor:
    """Weights [B, S] that average the text after the image, the last position excluded.

    `visual_end[b]` is the index just past sample b's visual tokens and `valid_end[b]` the index
    just past its last real token (the last position is valid_end - 1). Rows sum to 1, or are all
    zero when no text lies between the image and the last position.
    """
    index = torch.arange(seq_len, device=visual_end.device)[None, :]
    inside = (index >= visual_end[:, None]) & (index < valid_end[:, None] - 1)
    weights = inside.float()
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def router_weights(visual: torch.Tensor) -> torch.Tensor:
    """`text_feature_weights` of a left-padded prefill batch (every row ends at the last column)."""
    end = visual_end(visual)
    return text_feature_weights(visual.shape[1], end, torch.full_like(end, visual.shape[1]))


def router_features(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Router input [B, 2H] from hidden states [B, S, H] (real tokens end at the last position):
    `concat(mean(text after the image, last excluded), last)`.

    An empty text span (all-zero weights) means there is nothing to average: the last position
    stands in for the mean, so the feature stays finite and well defined.
    """
    last = hidden[:, -1, :]
    weights = weights.to(hidden.dtype)
    mean = torch.einsum("bs,bsh->bh", weights, hidden)
    empty = (weights.sum(dim=1, keepdim=True) == 0).to(hidden.dtype)
    mean = mean + empty * last
    return torch.cat([mean, last], dim=-1)


def exit_decision(logits: torch.Tensor) -> torch.Tensor:
    """True where the router says the visual tokens may leave (logit[exit] > logit[keep])."""
    return logits[..., EXIT] > logits[..., KEEP]


# --------------------------------------------------------------------------- the exit


def drop_visual(key_mask: torch.Tensor, visual: torch.Tensor, hidden: torch.Tensor, *columns: torch.Tensor):
    """The exit: keep each row's real non-visual columns, in order, re-left-padded to the longest.

    Returns (new key mask, hidden [B, S', H], *each of `columns` [B, S'] gathered the same way):
    position ids keep their original values (a gap where the image was). A gather, on device."""
    keep = key_mask.bool() & ~visual.to(key_mask.device)
    new_len = int(keep.sum(dim=1).max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - new_len:]
    hidden = torch.gather(hidden, 1, order.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
    gathered = [torch.gather(c, 1, order.to(c.device)) for c in columns]
    return (torch.gather(keep.to(key_mask.dtype), 1, order), hidden, *gathered)
