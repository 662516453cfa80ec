"""The backend protocol: everything the orchestrator calls, and what every package backend shares.

A backend runs graphs on torch tensors and knows nothing of DyVTE's rule; the orchestrator tells
it which phase a decoder call belongs to (`pre_exit`: the multimodal prefill, `post_exit`: the
text-only prefill after an exit or of a prompt without an image, `decode`: one token on a cache),
so a backend with per-phase kernels (TensorRT's optimisation profiles) never guesses from shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import torch

from engines.core.manifest import Manifest
from engines.core.shape import ModelShape

Phase = Literal["pre_exit", "post_exit", "decode"]
PHASES: tuple[Phase, ...] = ("pre_exit", "post_exit", "decode")
KV = tuple[torch.Tensor, torch.Tensor]


class Backend(Protocol):
    """What the orchestrator needs from a backend; all tensors are torch tensors."""

    shape: ModelShape
    segments: list[tuple[int, int]]  # contiguous layer ranges [start, end) covering all layers
    router_layers: frozenset[int]  # layers after which a router can be asked (empty: no routers)
    dtype: torch.dtype
    device: torch.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...  # [N, V, H]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [B, S, H]

    def run_segment(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    past: list[KV], phase: Phase) -> tuple[torch.Tensor, list[KV]]: ...

    def router_logits(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...  # [B, 2]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [B, S, vocab]

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, masks: list[torch.Tensor],
                    past: list[KV]) -> tuple[torch.Tensor, list[KV]]: ...  # logits [B, 1, vocab], caches


class SegmentDecoding:
    """`decode_step` as embedding, each segment in the decode phase, then the head: the default for
    backends without a fused decode graph. `masks[i]` is segment i's key mask (past + the new
    token), `past[l]` layer l's cache; returns the logits and every layer's new cache."""

    def decode_step(self, input_ids, position_ids, masks, past):
        hidden = self.embed(input_ids)
        presents: list[KV] = []
        for index, (mask, (start, end)) in enumerate(zip(masks, self.segments)):
            hidden, new = self.run_segment(index, hidden, position_ids, mask, past[start:end], "decode")
            presents.extend(new)
        return self.logits(hidden), presents


class PackageBackend(SegmentDecoding):
    """What every backend of an exported package reads from its manifest."""

    def __init__(self, package: Path, manifest: Manifest):
        self.package = Path(package)
        self.manifest = manifest
        self.names = manifest.names
        self.shape = manifest.shape
        self.segments = [tuple(s) for s in manifest.split.segments]
        self.router_layers = manifest.split.router_layers
        self.dtype = manifest.precision.dtype
        self.visual_per_tile = manifest.architecture.visual_tokens_per_tile
        self.segment_graphs = [g.name for g in manifest.segment_graphs]

    def graph_path(self, entry) -> Path:
        """A graph file of the package (inside it, by the manifest's rules)."""
        return self.manifest.resolve(self.package, entry.file)
