"""Building a `Runtime` from an exported package (ONNX Runtime / TensorRT) or from a model (torch)."""

from __future__ import annotations

from pathlib import Path

from engines.orchestrator import Runtime
from exporter.errors import DyVTEError

PACKAGE_BACKENDS = ("onnxruntime", "tensorrt")


def open_package(package: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 verify: bool = True, threads: int | None = None) -> Runtime:
    """Load a package: checksums and format are verified first, then the backend's graphs."""
    from exporter.models.processor import Processor, PromptSpec
    from exporter.package import load_manifest

    package = Path(package)
    manifest = load_manifest(package, verify=verify)
    processor = Processor.load(package / "processor", PromptSpec.from_dict(manifest["prompt"]))
    if backend == "onnxruntime":
        from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        return Runtime(OnnxRuntimeBackend(package, manifest, device=device, threads=threads), processor)
    if backend == "tensorrt":  # always on the current CUDA device: `device` and `threads` are ONNX Runtime's
        from engines.backends.tensorrt_backend import TensorRTBackend

        return Runtime(TensorRTBackend(package, manifest), processor)
    raise DyVTEError(f"backend {backend!r} cannot run packages; choose from {', '.join(PACKAGE_BACKENDS)}")


def open_model(family: str, checkpoint=None, routers=None, segments=None, **options) -> Runtime:
    """The PyTorch reference runtime for a model (built-in when `checkpoint` is None)."""
    from engines.backends.torch_backend import TorchBackend
    from exporter.models import load_model

    model = load_model(family, checkpoint, routers, **options)
    return Runtime(TorchBackend(model, segments), model.processor)
