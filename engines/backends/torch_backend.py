"""The PyTorch reference backend: runs the family adapter's modules directly, one layer a segment."""

from __future__ import annotations

import torch

from engines.backends.base import SegmentDecoding
from engines.core.dyvte import router_features


def _device(param: torch.Tensor) -> torch.device:
    """Where a model computes: a parameter's device, the CPU for one left on disk (meta, read while
    its module runs)."""
    return torch.device("cpu") if param.is_meta else param.device


class TorchBackend(SegmentDecoding):
    """`model`: any object with the adapters' decomposition (`vision`, `decoder`, `routers`,
    `shape`), e.g. an `exporter.models.base.MultimodalModel`."""

    def __init__(self, model, segments: list[tuple[int, int]] | None = None):
        self.model = model
        self.shape = model.shape
        num_layers = self.shape.num_layers
        self.segments = segments or [(layer, layer + 1) for layer in range(num_layers)]
        ends = {end - 1 for _, end in self.segments if end < num_layers}
        self.router_layers = frozenset(ends) if model.routers is not None else frozenset()
        param = next(model.decoder.parameters())
        self.dtype, self.device = param.dtype, _device(param)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.model.vision.parameters())
        return self.model.vision(pixel_values.to(_device(param), param.dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def run_segment(self, index, hidden, position_ids, key_mask, past, phase=None):
        start, end = self.segments[index]
        return self.model.decoder.run_layers(start, end, hidden, position_ids, key_mask, past)

    def router_logits(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.model.routers(layer, router_features(hidden, weights))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.logits(hidden)
