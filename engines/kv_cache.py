"""The decode-time KV cache: preallocated per-segment buffers, written in place one position a step.

Layers of one segment share their cache length (an exit only happens at segment boundaries), so a
segment owns one key mask and one write pointer for all its layers. Rows are left-padded so that
every row's newest token sits at the same slot: a decode step writes one slot for the whole batch.
The buffers have spare capacity (grown in `GROW` steps), and the graphs read the full buffer with
the unused slots masked, so no step copies the cache: the step's graph returns only the new
token's keys/values and `append` writes them into slot `length`.

Rows join (prefilled requests merged into the running batch) and leave (finished requests) through
`repack`, the one place where the cache is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROW = 64  # slots added when a segment's buffer is full (one reallocation per 64 tokens)


@dataclass
class SegmentCache:
    """The cache of one segment's layers for B rows: keys/values [B, KV, C, D] per layer, the key
    mask [B, C + 1] (slots 0..C-1 past, column C the token being decoded, always 1)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    length: int  # next slot to write; slots [length, C) are free (masked)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _alloc(batch: int, layers: int, like: torch.Tensor, capacity: int):
    kv_heads, dim = like.shape[1], like.shape[3]
    keys = [like.new_zeros(batch, kv_heads, capacity, dim) for _ in range(layers)]
    values = [like.new_zeros(batch, kv_heads, capacity, dim) for _ in range(layers)]
    mask = torch.zeros(batch, capacity + 1, dtype=torch.long, device=like.device)
    mask[:, capacity] = 1
    return keys, values, mask


def _capacity(length: int, reserve: int, limit: int | None) -> int:
    capacity = length + max(reserve, 1)
    capacity = -(-capacity // GROW) * GROW
    return min(capacity, limit) if limit else capacity


class KVCache:
    """Per-segment caches of a decode batch (`segments[i]` holds layers `ranges[i]`)."""

    def __init__(self, segments: list[SegmentCache], ranges: list[tuple[int, int]], limit: int | None = None):
        self.segments = segments
        self.ranges = ranges
        self.limit = limit  # most slots a buffer may have (the model's context less one)

    @property
    def batch(self) -> int:
        return self.segments[0].batch

    def bytes(self) -> int:
        return sum(s.bytes() for s in self.segments)

    @classmethod
    def from_rows(cls, rows: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
                  ranges: list[tuple[int, int]], reserve: int, limit: int | None = None) -> "KVCache":
        """A cache from per-row, per-layer (keys [KV, T, D], values, ...) of each row's real
        tokens in order; `reserve` slots are kept free for the tokens to come."""
        segments = []
        for start, end in ranges:
            lengths = [r[start][0].shape[1] for r in rows]
            length = max(lengths)
            keys, values, mask = _alloc(len(rows), end - start, rows[0][start][0][None],
                                        _capacity(length, reserve, limit))
            for b, (row, n) in enumerate(zip(rows, lengths)):
                for i, layer in enumerate(range(start, end)):
                    keys[i][b, :, length - n:length] = row[layer][0]
                    values[i][b, :, length - n:length] = row[layer][1]
                mask[b, length - n:length] = 1
            segments.append(SegmentCache(keys, values, mask, length))
        return cls(segments, ranges, limit)

    def rows(self, index: torch.Tensor | list[int] | None = None):
        """Per row, per layer, (keys [KV, T, D], values) of its real tokens (views)."""
        index = range(self.batch) if index is None else [int(i) for i in index]
        out = []
        for b in index:
            row = []
            for seg in self.segments:
                n = int(seg.mask[b, : seg.length].sum())
                for k, v in zip(seg.keys, seg.values):
                    row.append((k[b, :, seg.length - n:seg.length], v[b, :, seg.length - n:seg.length]))
            out.append(row)
        return out

    def repack(self, keep: list[int] | None = None, add: "KVCache | None" = None, add_keep: list[int] | None = None,
               reserve: int = 1) -> "KVCache":
        """The cache of rows `keep` of this one (all when None) followed by rows `add_keep` of
        `add` (all when None), each segment left-padded to its longest row again: the one place
        cached keys/values are copied."""
        rows = self.rows(keep) + (add.rows(add_keep) if add is not None else [])
        if not rows:
            raise ValueError("a KV cache needs at least one row")
        return KVCache.from_rows(rows, self.ranges, reserve, self.limit)

    # ------------------------------------------------------------------ one decode step

    def step_inputs(self, reserve: int = 1) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per segment the key mask [B, C + 1] and per layer the (keys, values) buffers to feed one
        decode step; grows a segment whose buffer is full first."""
        for index, seg in enumerate(self.segments):
            if seg.length >= seg.capacity:
                self.segments[index] = self._grown(seg, reserve)
        masks = [seg.mask for seg in self.segments]
        past = [(k, v) for seg in self.segments for k, v in zip(seg.keys, seg.values)]
        return masks, past

    def append(self, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one step's new keys/values ([B, KV, 1, D] per layer) into slot `length`."""
        layer = 0
        for seg in self.segments:
            slot = seg.length
            for k, v in zip(seg.keys, seg.values):
                nk, nv = new[layer]
                k[:, :, slot] = nk[:, :, -1]
                v[:, :, slot] = nv[:, :, -1]
                layer += 1
            seg.mask[:, slot] = 1
            seg.length = slot + 1

    def _grown(self, seg: SegmentCache, reserve: int) -> SegmentCache:
        capacity = _capacity(seg.length, max(reserve, GROW), self.limit)
        if capacity <= seg.capacity:
            raise ValueError(f"the KV cache is full ({seg.capacity} positions, the model's context)")
        keys, values, mask = _alloc(seg.batch, len(seg.keys), seg.keys[0], capacity)
        for new, old in zip(keys + values, seg.keys + seg.values):
            new[:, :, : seg.length] = old[:, :, : seg.length]
        mask[:, : seg.length] = seg.mask[:, : seg.length]
        return SegmentCache(keys, values, mask, seg.length)
