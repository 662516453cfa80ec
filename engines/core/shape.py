"""The decoder's architecture numbers: what the runtime sizes caches with and the FLOPs count reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers outside the graphs; `intermediate_size` (the MLP width) only counts FLOPs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    intermediate_size: int | None = None

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes one token's key and value take in one layer's cache."""
        return 2 * self.num_kv_heads * self.head_dim * element_bytes

    def to_dict(self) -> dict:
        return asdict(self)
