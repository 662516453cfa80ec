"""The PyTorch reference runtime: the adapters' modules run by the orchestrator (TorchBackend),
either for a model or for the model an exported package came from."""

from __future__ import annotations

from pathlib import Path

from engines.backends.torch_backend import TorchBackend
from engines.core.manifest import Manifest
from engines.orchestrator import Runtime


def open_model(family: str, checkpoint=None, routers=None, segments=None, **options) -> Runtime:
    """The PyTorch reference runtime for a model (built-in when `checkpoint` is None)."""
    from exporter.models import load_model

    model = load_model(family, checkpoint, routers, **options)
    return Runtime(TorchBackend(model, segments), model.processor)


def package_reference(package: str | Path, manifest: Manifest | None = None, model=None) -> Runtime:
    """The PyTorch reference of a package's source model, with the package's segments (so it may
    exit exactly where the package can). `model` skips loading it again."""
    from exporter.models import get_family, load_model

    manifest = manifest or Manifest.load(package)
    if model is None:
        src = dict(manifest.source or {})
        family = src.get("family", manifest.family)
        if "preset" in src:
            model = get_family(family).preset(seed=src.get("seed", 0))
        else:
            options = {k: v for k, v in src.items() if k in ("vision_tower", "template") and v}
            model = load_model(family, src.get("checkpoint"), src.get("routers"), **options)
    return Runtime(TorchBackend(model, list(manifest.split.segments)), model.processor)
