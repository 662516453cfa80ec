"""Exit policies and generation settings shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engines.core.errors import DyVTEError


@dataclass(frozen=True)
class ExitPolicy:
    """`dynamic` (the routers decide), `none` (never exit) or `layer:K` (always exit after K)."""

    kind: str
    layer: int | None = None

    @classmethod
    def parse(cls, text: str) -> "ExitPolicy":
        text = (text or "").strip()
        if text in ("dynamic", "none"):
            return cls(text)
        if text.startswith("layer:"):
            try:
                return cls("static", int(text.split(":", 1)[1]))
            except ValueError:
                pass
        raise DyVTEError(f"bad exit policy {text!r}; use dynamic, none or layer:K (K a layer index)")

    def __str__(self) -> str:
        return f"layer:{self.layer}" if self.kind == "static" else self.kind


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    keep_logits: bool = False  # keep every step's logits in the result (parity checks)

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise DyVTEError("max_new_tokens must be an integer of at least 1")
        if not is_number(self.temperature) or self.temperature < 0:
            raise DyVTEError(f"temperature must be a finite number >= 0, not {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            raise DyVTEError("temperature must be > 0 when sampling")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise DyVTEError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise DyVTEError(f"top_k must be an integer >= 0, not {self.top_k!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise DyVTEError(f"seed must be an integer in 0..2**63-1, not {self.seed!r}")


class TokenSampler:
    """Greedy or sampled next tokens; each sample has its own RNG seeded with `seed`, so a
    sample draws the same tokens whether it runs alone or inside a batch."""

    def __init__(self, config: GenerationConfig, batch: int):
        self.config = config
        self.generators = []
        if config.do_sample:
            for _ in range(batch):
                g = torch.Generator()
                g.manual_seed(config.seed)
                self.generators.append(g)

    def __call__(self, logits: torch.Tensor) -> list[int]:
        logits = logits.float().cpu()
        if not self.config.do_sample:
            return logits.argmax(dim=-1).tolist()
        return [self._sample(row, g) for row, g in zip(logits, self.generators)]

    def _sample(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        c = self.config
        logits = logits / c.temperature
        if c.top_k > 0:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if c.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < c.top_p
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))
