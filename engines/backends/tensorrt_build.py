"""Building TensorRT engines from a package's ONNX graphs (needs an NVIDIA GPU)."""

from __future__ import annotations

from exporter.errors import DyVTEError


def build_engines(package) -> None:
    from validation.parity import tensorrt_unavailable

    reason = tensorrt_unavailable()
    raise DyVTEError(f"cannot build TensorRT engines for {package}: {reason}")
