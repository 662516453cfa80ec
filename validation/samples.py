"""Inputs for calibration and validation: the user's images and prompts, or built-in samples."""

from __future__ import annotations

from pathlib import Path

from engines.core.errors import DyVTEError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
DEFAULT_QUESTION = "Describe the image."


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DyVTEError(f"prompts file not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DyVTEError(f"prompts file {path} is empty")
    return lines


def user_pairs(images: str | Path, prompts: str | Path | None) -> list[tuple[Path, str]]:
    folder = Path(images)
    if not folder.is_dir():
        raise DyVTEError(f"images folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DyVTEError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    questions = read_prompts(prompts) if prompts else [DEFAULT_QUESTION]
    return [(f, questions[i % len(questions)]) for i, f in enumerate(files)]


def sample_prompts(runtime, images=None, prompts=None, count: int = 8):
    """Prepared prompts: the user's (image folder + prompt file) or `count` built-in synthetic
    evaluation samples (coloured shapes with questions)."""
    from engines.core.prompt import load_image

    if images:
        return [runtime.prepare(text, load_image(path)) for path, text in user_pairs(images, prompts)]
    if prompts:
        raise DyVTEError("--prompts needs --images (a folder of images to ask about)")
    from exporter.data.synthetic import synthetic_split

    return [runtime.prepare(s.question, s.image) for s in synthetic_split("eval", count)]
