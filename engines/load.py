"""Opening an exported package as a `Runtime` (ONNX Runtime or TensorRT backend)."""

from __future__ import annotations

from pathlib import Path

from engines.core.errors import DyVTEError
from engines.core.manifest import Manifest
from engines.memory import RuntimeLimits
from engines.orchestrator import Runtime

PACKAGE_BACKENDS = ("onnxruntime", "tensorrt")


def open_package(package: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 verify: bool = True, threads: int | None = None, limits: RuntimeLimits | None = None,
                 **backend_options) -> Runtime:
    """Load a package: manifest, checksums and format are verified first, then the backend's graphs.
    The runtime enforces `limits` (default: `RuntimeLimits()`, max_batch 8, max_tokens 8192);
    `backend_options` go to the ONNX Runtime backend (share_weights, prepack, shrink_arena)."""
    from engines.core.prompt import Processor, PromptSpec

    if backend not in PACKAGE_BACKENDS:
        raise DyVTEError(f"backend {backend!r} cannot run packages; choose from {', '.join(PACKAGE_BACKENDS)}")
    package = Path(package)
    manifest = Manifest.load(package, verify=verify)
    processor = Processor.load(manifest.resolve(package, "processor"), PromptSpec.from_dict(manifest.prompt))
    limits = limits or RuntimeLimits()
    if backend == "onnxruntime":
        from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        return Runtime(OnnxRuntimeBackend(package, manifest, device=device, threads=threads, **backend_options),
                       processor, limits)
    # TensorRT: always on the current CUDA device; `device` and `threads` are ONNX Runtime's
    from engines.backends.tensorrt_backend import TensorRTBackend

    return Runtime(TensorRTBackend(package, manifest), processor, limits)
