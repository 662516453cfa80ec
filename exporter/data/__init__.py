"""Data for router training and evaluation: image-question(-answer) samples from two sources.

`synthetic` generates a built-in VQA task (coloured shapes; one-word answers that need the image),
`jsonl` reads LLaVA-style conversation records with an image folder. Both yield `VQASample`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engines.core.errors import DyVTEError


@dataclass
class VQASample:
    """One question about one image; `answer` is None when the data brings no reference answer."""

    id: str
    question: str
    answer: str | None = None
    image: Image.Image | None = None  # held in memory (synthetic), or
    image_path: Path | None = None  # read on use (JSONL records)
    kind: str = ""  # question type, for per-type breakdowns

    def load_image(self) -> Image.Image:
        if self.image is not None:
            return self.image
        if self.image_path is None:
            raise DyVTEError(f"sample {self.id} has no image")
        from engines.core.prompt import load_image

        try:
            return load_image(self.image_path)
        except DyVTEError as exc:
            raise DyVTEError(f"sample {self.id}: {exc}") from None


def load_samples(data: str, images: str | Path | None = None, split: str = "train", size: int | None = None,
                 seed: int = 0) -> list[VQASample]:
    """`synthetic` (the built-in task's `split`) or a JSONL file of LLaVA-style records."""
    if data == "synthetic":
        from exporter.data.synthetic import DEFAULT_SIZES, synthetic_split

        return synthetic_split(split, size or DEFAULT_SIZES[split], seed=seed)
    from exporter.data.jsonl import read_jsonl

    samples = read_jsonl(data, images)
    return samples[:size] if size else samples


__all__ = ["VQASample", "load_samples"]
