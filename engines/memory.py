"""Runtime memory: the batch/token budget a `Runtime` enforces, what it implies, and a reader of the
process's anonymous memory (issue 10).

The budget is what a server sizes a replica by: `max_batch` rows at once and `max_tokens` cache
positions over the whole batch (each row's prompt plus its new tokens). Its memory is the weights
(one copy, see the ONNX Runtime backend), the KV cache of `max_tokens` positions (counted twice:
a batch joining the running one is merged by one copy), and the largest single graph run's
activations (ONNX Runtime's arenas shrink after every run, so they do not add up over graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.core.errors import DyVTEError
from engines.core.shape import ModelShape

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_TOKENS = 8 * 1024


def anonymous_bytes() -> int:
    """Anonymous memory of this process (heap, arenas, private copies), from /proc/self/smaps_rollup;
    file-backed pages (a memory-mapped weights file) are not counted. 0 where /proc has no such file."""
    path = Path("/proc/self/smaps_rollup")
    if not path.exists():
        return 0
    for line in path.read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def activation_bytes(shape: ModelShape, batch: int, seq: int, element_bytes: int) -> int:
    """Estimated peak working memory of the largest single graph run: one decoder layer's prefill of
    `batch` x `seq` tokens (hidden states in and out, q/k/v, the attention scores and their softmax
    in float32, the MLP's gate/up/product), or the LM head's last-position logits, the larger."""
    h, heads = shape.hidden_size, shape.num_heads
    inter = shape.intermediate_size or 4 * h
    tokens = batch * seq
    hidden = tokens * (6 * h + 3 * inter) * element_bytes
    scores = 2 * batch * heads * seq * seq * 4
    head = batch * shape.vocab_size * max(element_bytes, 4)
    return max(hidden + scores, head)


@dataclass(frozen=True)
class RuntimeLimits:
    """What a `Runtime` admits: at most `max_batch` rows and `max_tokens` cache positions in all
    (sum over rows of prompt + new tokens), each row within the model's context."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self):
        if self.max_batch < 1 or self.max_tokens < 1:
            raise DyVTEError(f"max_batch and max_tokens must be >= 1 (got {self.max_batch}, {self.max_tokens})")

    def admits(self, batch: int, tokens: int) -> bool:
        return batch <= self.max_batch and tokens <= self.max_tokens

    def check(self, batch: int, tokens: int) -> None:
        if batch > self.max_batch:
            raise DyVTEError(f"batch of {batch} exceeds the runtime's max_batch of {self.max_batch}")
        if tokens > self.max_tokens:
            raise DyVTEError(f"batch needs {tokens} cache positions (prompts + new tokens), over the runtime's "
                             f"max_tokens of {self.max_tokens}")

    def budget(self, shape: ModelShape, element_bytes: int, weight_bytes: int) -> dict[str, int]:
        """The memory the limits imply, term by term (bytes): weights once, 2x the KV cache of
        `max_tokens` positions, the largest single graph's activations (a full batch prefill of
        max_tokens / max_batch tokens a row)."""
        kv = shape.kv_bytes_per_token(element_bytes) * shape.num_layers * self.max_tokens
        seq = min(max(1, self.max_tokens // self.max_batch), shape.max_positions)
        act = activation_bytes(shape, self.max_batch, seq, element_bytes)
        return {"weights": weight_bytes, "kv_cache_x2": 2 * kv, "activations": act,
                "total": weight_bytes + 2 * kv + act}

    def describe(self, shape: ModelShape, element_bytes: int, weight_bytes: int) -> str:
        b = self.budget(shape, element_bytes, weight_bytes)
        mb = {k: v / 2**20 for k, v in b.items()}
        return (f"limits: max_batch {self.max_batch}, max_tokens {self.max_tokens}; memory implied "
                f"{mb['total']:.0f} MiB = weights {mb['weights']:.0f} + 2x KV cache {mb['kv_cache_x2']:.0f} "
                f"+ largest graph's activations {mb['activations']:.0f} (estimate)")
