"""The decode-time KV cache: preallocated slot buffers, written in place one position a step.

Layers of one segment share their cache lengths (an exit only happens at segment boundaries), so a
segment owns one key mask and one length per row for all its layers. Every row of the batch is a
*slot* of the buffers ([slots, KV, C, D] per layer): its cached tokens sit in columns [0, n) and a
decode step writes each row's new token at its own column n (the graphs read the full buffer with
the unused columns masked; in a decode step the key mask alone decides what a query sees, so where
a row's tokens sit does not matter). No step copies the cache: the step's graph returns only the
new token's keys/values and `append` writes them in place.

The live rows are slots 0..batch-1, so the graphs get views of the buffers' first `batch` slots
(contiguous, no copy). Rows join (prefilled requests merged into the running batch) by `insert`,
which writes only the new rows into the next free slots, and leave by `remove`, which moves at
most one live row into each freed slot: the others stay where they are. The buffers grow (more
slots, more columns, in `GROW` steps) when a row needs it, and shrink when the rows left need
less than half the columns; those are the only copies of rows already cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROW = 64  # columns added when a row reaches the end of a segment's buffer (one reallocation per 64 tokens)


@dataclass
class SegmentCache:
    """The cache of one segment's layers: keys/values [slots, KV, C, D] per layer, the key mask
    [slots, C + 1] (columns 0..C-1 past, column C the token being decoded, always 1), and per
    live row the number of its cached tokens (= the column its next token is written to)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: list[int]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def slots(self) -> int:
        return self.mask.shape[0]

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def resized(self, slots: int, capacity: int) -> "SegmentCache":
        """The same rows in buffers of `slots` x `capacity` (a copy of the live rows' tokens)."""
        keys, values, mask = _alloc(slots, len(self.keys), self.keys[0], capacity)
        k, n = self.batch, max(self.lengths, default=0)
        for new, old in zip(keys + values, self.keys + self.values):
            new[:k, :, :n] = old[:k, :, :n]
        mask[:k, :n] = self.mask[:k, :n]
        return SegmentCache(keys, values, mask, list(self.lengths))


def _alloc(slots: int, layers: int, like: torch.Tensor, capacity: int):
    kv_heads, dim = like.shape[-3], like.shape[-1]
    keys = [like.new_zeros(slots, kv_heads, capacity, dim) for _ in range(layers)]
    values = [like.new_zeros(slots, kv_heads, capacity, dim) for _ in range(layers)]
    mask = torch.zeros(slots, capacity + 1, dtype=torch.long, device=like.device)
    mask[:, capacity] = 1
    return keys, values, mask


def _capacity(length: int, reserve: int, limit: int | None) -> int:
    capacity = length + max(reserve, 1)
    capacity = -(-capacity // GROW) * GROW
    return min(capacity, limit) if limit else capacity


class KVCache:
    """Per-segment caches of a decode batch (`segments[i]` holds layers `ranges[i]`)."""

    def __init__(self, segments: list[SegmentCache], ranges: list[tuple[int, int]], limit: int | None = None,
                 max_slots: int | None = None):
        self.segments = segments
        self.ranges = ranges
        self.limit = limit  # most columns a buffer may have (the model's context less one)
        self.max_slots = max_slots  # most rows the buffers are grown to at once (None: as many as inserted)
        self._index: torch.Tensor | None = None  # arange(batch) on the cache's device, for `append`

    @property
    def batch(self) -> int:
        return self.segments[0].batch

    def bytes(self) -> int:
        return sum(s.bytes() for s in self.segments)

    @classmethod
    def from_rows(cls, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], ranges: list[tuple[int, int]],
                  reserve: int, limit: int | None = None, max_slots: int | None = None) -> "KVCache":
        """A cache from per-row, per-layer (keys [KV, T, D], values, ...) of each row's real
        tokens in order; `reserve` columns are kept free for the tokens to come."""
        if not rows:
            raise ValueError("a KV cache needs at least one row")
        segments = []
        for start, end in ranges:
            like = rows[0][start][0]
            capacity = _capacity(max(r[start][0].shape[1] for r in rows), reserve, limit)
            keys, values, mask = _alloc(len(rows), end - start, like, capacity)
            segments.append(SegmentCache(keys, values, mask, []))
        cache = cls(segments, ranges, limit, max_slots)
        cache.insert(rows, reserve)
        return cache

    def rows(self, index: torch.Tensor | list[int] | None = None):
        """Per row, per layer, (keys [KV, T, D], values) of its real tokens (views)."""
        index = range(self.batch) if index is None else [int(i) for i in index]
        out = []
        for b in index:
            row = []
            for seg in self.segments:
                n = seg.lengths[b]
                for k, v in zip(seg.keys, seg.values):
                    row.append((k[b, :, :n], v[b, :, :n]))
            out.append(row)
        return out

    # ------------------------------------------------------------------ rows joining and leaving

    def insert(self, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], reserve: int = 1) -> None:
        """Append `rows` (as for `from_rows`) as rows batch..batch+len(rows)-1: each is written into
        a free slot; the rows already cached are copied only when the buffers must grow."""
        k, m = self.batch, len(rows)
        for index, ((start, _), seg) in enumerate(zip(self.ranges, self.segments)):
            lengths = [r[start][0].shape[1] for r in rows]
            need = max(lengths) + max(reserve, 1)
            if self.limit and max(lengths) + 1 > self.limit:
                raise ValueError(f"the KV cache is full ({self.limit} positions, the model's context)")
            slots, capacity = seg.slots, seg.capacity
            if k + m > slots:
                slots = max(k + m, min(2 * slots, self.max_slots or 0))
            if need > capacity:
                capacity = _capacity(max(lengths), reserve, self.limit)
            if (slots, capacity) != (seg.slots, seg.capacity):
                seg = self.segments[index] = seg.resized(slots, capacity)
            for j, (row, n) in enumerate(zip(rows, lengths)):
                b = k + j
                for i, layer in enumerate(range(start, start + len(seg.keys))):
                    seg.keys[i][b, :, :n] = row[layer][0]
                    seg.values[i][b, :, :n] = row[layer][1]
                seg.mask[b, :n] = 1
                seg.mask[b, n:seg.capacity] = 0  # (a slot a finished row left)
            seg.lengths.extend(lengths)
        self._index = None

    def remove(self, gone: list[int], reserve: int = 1) -> list[int]:
        """Drop rows `gone`: live rows from the end move into the freed slots (one row copied per
        freed slot at most). Returns the new order: new row i is old row order[i]. `reserve`: the
        columns the remaining rows still need (the buffers shrink when half of them would do)."""
        k = self.batch
        gone_set = set(gone)
        left = k - len(gone_set)
        holes = [i for i in range(left) if i in gone_set]
        movers = [i for i in range(left, k) if i not in gone_set]
        order = list(range(left))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        for index, seg in enumerate(self.segments):
            if holes:
                dst = torch.tensor(holes, device=seg.mask.device)
                src = torch.tensor(movers, device=seg.mask.device)
                for t in seg.keys + seg.values:
                    t[dst] = t[src]
                seg.mask[dst] = seg.mask[src]
            seg.lengths = [seg.lengths[i] for i in order]
            if left:
                capacity = _capacity(max(seg.lengths), reserve, self.limit)
                if 2 * capacity <= seg.capacity:  # the long rows left: give the memory back
                    self.segments[index] = seg.resized(seg.slots, capacity)
        self._index = None
        return order

    # ------------------------------------------------------------------ one decode step

    def step_inputs(self, reserve: int = 1) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per segment the key mask [B, C + 1] and per layer the (keys, values) buffers [B, KV, C, D]
        of the live rows to feed one decode step (views); grows a segment whose buffer is full first."""
        k = self.batch
        for index, seg in enumerate(self.segments):
            if max(seg.lengths) >= seg.capacity:
                capacity = _capacity(max(seg.lengths), max(reserve, GROW), self.limit)
                if capacity <= seg.capacity:
                    raise ValueError(f"the KV cache is full ({seg.capacity} positions, the model's context)")
                self.segments[index] = seg.resized(seg.slots, capacity)
        masks = [seg.mask[:k] for seg in self.segments]
        past = [(key[:k], value[:k]) for seg in self.segments for key, value in zip(seg.keys, seg.values)]
        return masks, past

    def append(self, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one step's new keys/values ([B, KV, 1, D] per layer) at each row's next column."""
        k = self.batch
        if self._index is None:
            self._index = torch.arange(k, device=self.segments[0].mask.device)
        rows = self._index
        layer = 0
        for seg in self.segments:
            lengths = seg.lengths
            if min(lengths) == max(lengths):  # every row at the same column: plain slices
                column = lengths[0]
                for key, value in zip(seg.keys, seg.values):
                    nk, nv = new[layer]
                    key[:k, :, column] = nk[:, :, -1]
                    value[:k, :, column] = nv[:, :, -1]
                    layer += 1
                seg.mask[:k, column] = 1
            else:
                columns = torch.tensor(lengths, device=rows.device)
                for key, value in zip(seg.keys, seg.values):
                    nk, nv = new[layer]
                    key[rows, :, columns] = nk[:, :, -1]
                    value[rows, :, columns] = nv[:, :, -1]
                    layer += 1
                seg.mask[rows, columns] = 1
            seg.lengths = [n + 1 for n in lengths]
