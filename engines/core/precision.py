"""Export precision as one small type: its name, the activations' torch and ONNX dtypes, the weights' bits.

`fp32` / `fp16` are the float precisions; `int8` / `int4` are weight-only quantized packages
(MatMul weights stored in `bits`, activations and KV caches in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.core.errors import DyVTEError

_TORCH = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str
    float_name: str  # dtype of activations, KV caches and unquantized weights ("float32" / "float16")
    weight_bits: int  # 32, 16, or the quantized MatMul weights' bits

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH[self.float_name]

    @property
    def element_bytes(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    @property
    def quantized(self) -> bool:
        return self.weight_bits < 16

    def __str__(self) -> str:
        return self.name


PRECISIONS = {p.name: p for p in (
    Precision("fp32", "float32", 32),
    Precision("fp16", "float16", 16),
    Precision("int8", "float32", 8),
    Precision("int4", "float32", 4),
)}


def get_precision(name: "str | Precision") -> Precision:
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise DyVTEError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
