"""The family-agnostic decomposition every adapter produces, and what the runtime consumes.

An MLLM here is: a processor (`processor.Processor`: chat template + image preprocessing -> token
ids with one contiguous span of visual positions, pixel values), a vision module (tower + projector ->
visual embeddings), a `TextDecoder` (embedding, layers, norm, LM head) and optionally DyVTE's
routers. Nothing after the adapters knows a family by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from exporter.dyvte.router import Routers
from engines.core.errors import DyVTEError
from engines.core.prompt import Processor
from exporter.models.decoder import TextDecoder

def seeded(build):
    """A preset builder whose random weights come from its `seed` argument, without touching the
    caller's global RNG state (torch's default generator is forked for the build)."""
    import functools

    @functools.wraps(build)
    def wrapper(self, seed: int = 0, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(self, seed, *args, **kwargs)

    return wrapper


class MultimodalModel(nn.Module):
    """The decomposition: vision, text decoder, routers, processor, plus where it came from."""

    def __init__(
        self,
        family: str,
        vision: nn.Module,
        decoder: TextDecoder,
        processor,
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
        feats = self.vision(pixel_values.to("cpu" if param.is_meta else param.device, param.dtype))
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


def preset_text_config(tokenizer, config_class, **llm):
    """A preset's text config: the tokenizer's vocabulary and special ids, untied head, the preset's
    shape (`llm`, which may override the vocabulary size for real shapes)."""
    base = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return config_class(**{**base, **llm})


def assemble(family: str, vision: nn.Module, tokenizer, image_processor, spec, decoder_parts: tuple,
             source: dict, native) -> MultimodalModel:
    """Every adapter's last step: processor + vision + decoder (`decoder_parts` = base model, LM head,
    text config) into the decomposition, keeping the family's native parts for its own save/compare."""
    model = MultimodalModel(family, vision, TextDecoder(*decoder_parts), Processor(tokenizer, image_processor, spec),
                            source=source)
    model.native = native
    return model

