"""The built-in models: small models trained here on the synthetic VQA task, shipped as weights.

`exporter/builtin/vila/` is a VILA checkpoint in VILA's native folder layout with its DyVTE
routers at the root (`routers.safetensors`); `python -m exporter.builtin.train_vila` reproduces it.
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent


def builtin_checkpoint(family: str) -> Path | None:
    """The folder of the trained built-in model of `family`, or None when there is none."""
    folder = BUILTIN_DIR / family
    return folder if (folder / "config.json").is_file() else None
