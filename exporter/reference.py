"""The PyTorch reference runtime: the adapters' modules run by the orchestrator (TorchBackend),
either for a model or for the model an exported package came from."""

from __future__ import annotations

from pathlib import Path

from engines.backends.torch_backend import TorchBackend
from engines.core.errors import DyVTEError
from engines.core.manifest import Manifest
from engines.orchestrator import Runtime


def open_model(family: str, checkpoint=None, routers=None, segments=None, **options) -> Runtime:
    """The PyTorch reference runtime for a model (built-in when `checkpoint` is None)."""
    from exporter.models import load_model

    model = load_model(family, checkpoint, routers, **options)
    return Runtime(TorchBackend(model, segments), model.processor)


def package_reference(package: str | Path, manifest: Manifest | None = None, model=None,
                      lazy: bool | None = None) -> Runtime:
    """The PyTorch reference of a package's source model, with the package's segments (so it may
    exit exactly where the package can). `model` skips loading it again. A lazy model (`lazy`, or a
    `model` loaded with `lazy=True`) runs on memory-mapped weights, one module's at a time; by default
    a checkpoint is loaded lazily when `exporter.streaming.choose_streaming` says so."""
    from exporter.models import get_family, load_model
    from exporter.streaming import checkpoint_folders, choose_streaming, is_streamed, stream_while_running

    manifest = manifest or Manifest.load(package)
    if model is None:
        src = manifest.source_model()
        if src.preset is not None:
            model = get_family(src.family).preset(seed=src.seed, name=src.preset)
        else:
            if lazy is None:
                lazy, _ = choose_streaming(checkpoint_folders(src.checkpoint, src.options), None)
            model = load_model(src.family, src.checkpoint, src.routers, lazy=lazy, **src.options)
        _check_routers(package, src.routers_sha256, model)
    if is_streamed(model):  # weights left on disk: each module reads its own while it runs
        stream_while_running(model, whole=[model.vision])
    return Runtime(TorchBackend(model, list(manifest.split.segments)), model.processor)


def _check_routers(package, recorded: str | None, model) -> None:
    """Refuse a rebuilt reference whose routers are not the exported ones (e.g. routers attached in
    Python before the export, or a routers file changed since): it would exit elsewhere silently."""
    if recorded is None:
        return
    if model.routers is None or model.routers.digest() != recorded:
        raise DyVTEError(
            f"the model rebuilt from {package}'s recorded source does not have the routers the package was "
            "exported with (were they attached in Python, or has the routers file changed?): pass that "
            "model itself (package_reference(..., model=...) / validate_package(..., model=...))")
