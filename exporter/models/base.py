"""The family-agnostic decomposition every adapter produces, and what the runtime consumes.

An MLLM here is: a processor (chat template + image preprocessing -> token ids with one
contiguous span of visual positions, pixel values), a vision module (tower + projector ->
visual embeddings), a `TextDecoder` (embedding, layers, norm, LM head) and optionally DyVTE's
routers. Nothing after the adapters knows a family by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from exporter.dyvte.router import Routers
from exporter.errors import DyVTEError
from exporter.models.decoder import TextDecoder

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Prompt:
    """One prepared sample: token ids with the visual span filled by placeholder ids."""

    input_ids: list[int]
    visual_span: tuple[int, int] | None
    pixel_values: torch.Tensor | None  # [tiles, 3, H, W]

    @property
    def num_visual(self) -> int:
        return 0 if self.visual_span is None else self.visual_span[1] - self.visual_span[0]


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DyVTEError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for bad files
        raise DyVTEError(f"cannot read image {path}: {exc.__class__.__name__}") from None


@dataclass
class Processor:
    """Builds a family's prompt around one image.

    `render(question, has_image)` gives the templated text with `IMAGE_PLACEHOLDER` where the image
    goes. With `expand` set (Hugging Face processors), the placeholder is replaced by the text
    `expand(n)` and the whole string is tokenized, as the checkpoint's own processor does;
    otherwise the text is tokenized around the placeholder and `n` visual ids are spliced in (the
    LLaVA/VILA `tokenizer_image_token` way).
    """

    tokenizer: object
    image_transform: Callable[[Image.Image], torch.Tensor]
    render: Callable[[str, bool], str]
    image_token_id: int
    visual_tokens: Callable[[torch.Tensor], int]
    expand: Callable[[int], str] | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # preprocessing facts for the manifest

    def build(self, question: str, image: Image.Image | None) -> Prompt:
        text = self.render(question, image is not None)
        if image is None:
            return Prompt(self._encode(text, first=True), None, None)
        pixel_values = self.image_transform(image)
        n = self.visual_tokens(pixel_values)
        if self.expand is not None:
            ids = self._encode(text.replace(IMAGE_PLACEHOLDER, self.expand(n), 1), first=True)
            positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if len(positions) != n or positions[-1] - positions[0] + 1 != n:
                raise DyVTEError(f"the prompt must hold exactly one image; found {len(positions)} image tokens")
            start = positions[0]
        else:
            before, sep, after = text.partition(IMAGE_PLACEHOLDER)
            if not sep:
                raise DyVTEError("the chat template dropped the image placeholder")
            head = self._encode(before, first=True)
            ids = head + [self.image_token_id] * n + self._encode(after, first=False)
            start = len(head)
        return Prompt(ids, (start, start + n), pixel_values)

    def _encode(self, text: str, first: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=first)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class VisionEncoder(nn.Module):
    """Base for the vision half: pixel values [N, 3, H, W] -> visual embeddings [N, V, hidden]."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MultimodalModel(nn.Module):
    """The decomposition: vision, text decoder, routers, processor, plus where it came from."""

    def __init__(
        self,
        family: str,
        vision: nn.Module,
        decoder: TextDecoder,
        processor: Processor,
        routers: Routers | None = None,
        source: dict | None = None,
    ):
        super().__init__()
        self.family = family
        self.vision = vision
        self.decoder = decoder
        self.processor = processor
        self.routers = routers
        self.source = source or {}

    @property
    def shape(self):
        return self.decoder.shape

    def attach_routers(self, routers: Routers) -> None:
        s = self.shape
        if len(routers) != s.num_layers or routers.hidden_size != s.hidden_size:
            raise DyVTEError(
                f"routers are for {len(routers)} layers of hidden size {routers.hidden_size}; "
                f"the model has {s.num_layers} layers of hidden size {s.hidden_size}"
            )
        self.routers = routers.to(next(self.decoder.parameters()).dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual embeddings of one image's tiles, flattened to [V, hidden]."""
        param = next(self.vision.parameters())
        feats = self.vision(pixel_values.to(param.device, param.dtype))
        return feats.reshape(-1, feats.shape[-1])


class Family(ABC):
    """One model family: a built-in preset and a loader for its native checkpoint layout."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def preset(self, seed: int = 0) -> MultimodalModel:
        """A tiny model of this architecture with seeded random weights (no download)."""

    @abstractmethod
    def load(self, checkpoint: Path, **options) -> MultimodalModel:
        """A model from a local folder in this family's native layout."""

    def default(self) -> MultimodalModel:
        """What `--model NAME` without `--checkpoint` runs."""
        return self.preset()


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `pad` aspect mode: centre the image on a square canvas of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def hf_image_transform(image_processor, aspect: str = "resize") -> Callable[[Image.Image], torch.Tensor]:
    """An image -> pixel values [1, 3, H, W] callable around a transformers image processor."""
    if aspect not in ("resize", "pad", "square"):
        raise DyVTEError(f"unsupported image_aspect_ratio {aspect!r} (supported: resize, pad)")
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    fill = tuple(int(round(255 * m)) for m in mean)

    def transform(image: Image.Image) -> torch.Tensor:
        if aspect == "pad":
            image = expand_to_square(image, fill)
        return image_processor(images=image, return_tensors="pt")["pixel_values"]

    return transform
