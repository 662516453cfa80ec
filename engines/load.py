"""Opening an exported package as a `Runtime` (ONNX Runtime or TensorRT backend)."""

from __future__ import annotations

from pathlib import Path

from engines.core.errors import DyVTEError
from engines.core.manifest import Manifest
from engines.orchestrator import Runtime

PACKAGE_BACKENDS = ("onnxruntime", "tensorrt")


def open_package(package: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 verify: bool = True, threads: int | None = None) -> Runtime:
    """Load a package: manifest, checksums and format are verified first, then the backend's graphs."""
    from engines.core.prompt import Processor, PromptSpec

    if backend not in PACKAGE_BACKENDS:
        raise DyVTEError(f"backend {backend!r} cannot run packages; choose from {', '.join(PACKAGE_BACKENDS)}")
    package = Path(package)
    manifest = Manifest.load(package, verify=verify)
    processor = Processor.load(manifest.resolve(package, "processor"), PromptSpec.from_dict(manifest.prompt))
    if backend == "onnxruntime":
        from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        return Runtime(OnnxRuntimeBackend(package, manifest, device=device, threads=threads), processor)
    # TensorRT: always on the current CUDA device; `device` and `threads` are ONNX Runtime's
    from engines.backends.tensorrt_backend import TensorRTBackend

    return Runtime(TensorRTBackend(package, manifest), processor)
