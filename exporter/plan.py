"""Where the decoder is cut: the exit window and the segments it implies.

An exit can only be taken at a segment boundary. Inside the exit window every layer ends a
segment (exact exits); before and after it, layers fuse into one segment each (fewer launches).
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.core.errors import DyVTEError


@dataclass(frozen=True)
class SplitPlan:
    num_layers: int
    window: tuple[int, int] | None  # inclusive range of layers after which an exit may happen

    @property
    def boundaries(self) -> list[int]:
        """Layers after which the exit can be taken (never the last layer: nothing would change)."""
        if self.window is None:
            return []
        start, end = self.window
        return list(range(start, min(end, self.num_layers - 2) + 1))

    @property
    def segments(self) -> list[tuple[int, int]]:
        ends = sorted(set(self.boundaries) | {self.num_layers - 1})
        out, start = [], 0
        for end in ends:
            out.append((start, end + 1))
            start = end + 1
        return out

    @classmethod
    def full(cls, num_layers: int) -> "SplitPlan":
        return cls(num_layers, (0, max(num_layers - 2, 0)) if num_layers > 1 else None)

    @classmethod
    def parse(cls, text: str | None, num_layers: int) -> "SplitPlan":
        """`START:END` (inclusive, 0-based), `none` (no exit possible), or None for every layer."""
        if text is None:
            return cls.full(num_layers)
        if text == "none":
            return cls(num_layers, None)
        try:
            start, end = (int(x) for x in text.split(":"))
        except ValueError:
            raise DyVTEError(f"bad --exit-window {text!r}; use START:END (layers, 0-based, inclusive)") from None
        last = num_layers - 2
        if not 0 <= start <= end <= last:
            raise DyVTEError(
                f"--exit-window {text} is outside the model: exits can follow layers 0..{last} "
                f"of its {num_layers} layers"
            )
        return cls(num_layers, (start, end))

    @classmethod
    def from_exit_layers(cls, exits: list[int | None], num_layers: int, coverage: float = 0.98) -> "SplitPlan":
        """Calibration: the narrowest window holding `coverage` of the observed exit layers."""
        seen = sorted(e for e in exits if e is not None)
        if not seen:
            return cls.full(num_layers)
        drop = int(len(seen) * (1 - coverage) / 2)
        lo, hi = seen[drop], seen[len(seen) - 1 - drop]
        return cls(num_layers, (lo, min(hi, num_layers - 2)))
