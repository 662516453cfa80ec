"""DyVTE's hyper-network: one router MLP per decoder layer that decides when visual tokens exit.

Router l reads layer l's output hidden states (before the final norm) at the text positions:
`concat(mean(text after the image, last position excluded), last position)` -> 2 logits,
index 0 = keep the visual tokens, index 1 = exit. Weights load from and save to the published
layout `model.visual_gates_router.{l}.w1.weight` / `.w2.weight`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engines.core.errors import DyVTEError, warn

ROUTER_PREFIX = "model.visual_gates_router."
ROUTER_INNER = 2048  # the published routers' hidden width


class Router(nn.Module):
    def __init__(self, hidden_size: int, inner: int = ROUTER_INNER):
        super().__init__()
        self.w1 = nn.Linear(2 * hidden_size, inner, bias=False)
        self.act = nn.GELU()
        self.w2 = nn.Linear(inner, 2, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(features)))


class Routers(nn.Module):
    """All routers of one model; `routers(l, features)` gives router l's logits [B, 2]."""

    def __init__(self, num_layers: int, hidden_size: int, inner: int = ROUTER_INNER):
        super().__init__()
        self.hidden_size = hidden_size
        self.inner = inner
        self.layers = nn.ModuleList(Router(hidden_size, inner) for _ in range(num_layers))

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](features)

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, r in enumerate(self.layers):
            out[f"{ROUTER_PREFIX}{i}.w1.weight"] = r.w1.weight.detach().contiguous()
            out[f"{ROUTER_PREFIX}{i}.w2.weight"] = r.w2.weight.detach().contiguous()
        return out

    def digest(self) -> str | None:
        """sha256 of the routers' weights (as float32, in published order): recorded in a package so
        that a reference rebuilt from the package's source can be checked to hold the same routers.
        None while the weights are not materialized (meta tensors of a streamed or random-weight export)."""
        weights = self.published_state_dict()
        if any(t.is_meta for t in weights.values()):
            return None
        h = hashlib.sha256()
        for name, t in weights.items():
            h.update(f"{name}:{tuple(t.shape)};".encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def seeded_routers(num_layers: int, hidden_size: int, seed: int, inner: int = ROUTER_INNER) -> Routers:
    """Untrained routers for the random presets (they exercise the mechanism, nothing is learnt).

    Seeded random weights, plus a drift that makes `logit[exit] - logit[keep]` grow with depth, so
    exits land mid-network rather than all at layer 0 or never.
    """
    generator = torch.Generator().manual_seed(seed)
    routers = Routers(num_layers, hidden_size, inner)
    for layer, r in enumerate(routers.layers):
        r.w1.weight.data = torch.randn(r.w1.weight.shape, generator=generator) / (2 * hidden_size) ** 0.5
        diff = 4.0 * torch.randn(inner, generator=generator) / inner ** 0.5
        diff += 8.0 * (layer - (num_layers - 2) / 2) / inner
        r.w2.weight.data = torch.stack([-diff / 2, diff / 2])
    return routers


# --------------------------------------------------------------------------- files


def _router_tensors_in(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if path.is_dir() and not files:
        raise DyVTEError(f"no .safetensors file in {path} to read routers from")
    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(ROUTER_PREFIX):
                        found[key[len(ROUTER_PREFIX):]] = handle.get_tensor(key)
        except DyVTEError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read router weights from {f}: {exc}") from None
    return found


def has_router_weights(folder: Path) -> bool:
    """Whether any .safetensors file directly in `folder` holds published router keys."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                if any(k.startswith(ROUTER_PREFIX) for k in handle.keys()):
                    return True
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read {f} (truncated or damaged?): {exc}") from None
    return False


def load_routers(path: str | Path, num_layers: int, hidden_size: int) -> Routers:
    """Routers from a .safetensors file or a checkpoint folder holding the published keys."""
    path = Path(path)
    if not path.exists():
        raise DyVTEError(f"router weights not found: {path}")
    tensors = _router_tensors_in(path)
    if not tensors:
        raise DyVTEError(f"{path} holds no router weights (keys {ROUTER_PREFIX}{{l}}.w1/w2.weight)")
    for key, tensor in tensors.items():
        if not re.fullmatch(r"\d+\.w[12]\.weight", key):
            raise DyVTEError(f"router weights in {path}: unexpected key {ROUTER_PREFIX}{key} "
                             f"(expected {ROUTER_PREFIX}{{layer}}.w1.weight / .w2.weight)")
        if tensor.ndim != 2:
            raise DyVTEError(f"router {ROUTER_PREFIX}{key} in {path} has shape {list(tensor.shape)}, expected a matrix")
        if not tensor.is_floating_point():
            raise DyVTEError(f"router {ROUTER_PREFIX}{key} in {path} has dtype {str(tensor.dtype).replace('torch.', '')}, "
                             "expected floating point weights")
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    if layers != list(range(num_layers)):
        raise DyVTEError(
            f"router weights in {path} cover layers {layers[0]}..{layers[-1]} ({len(layers)} routers); "
            f"the model has {num_layers} decoder layers (expected routers 0..{num_layers - 1})"
        )
    if "0.w1.weight" not in tensors:
        raise DyVTEError(f"router weights in {path} lack {ROUTER_PREFIX}0.w1.weight")
    inner = tensors["0.w1.weight"].shape[0]
    routers = Routers(num_layers, hidden_size, inner)
    for i, router in enumerate(routers.layers):
        for name, expected in (("w1", (inner, 2 * hidden_size)), ("w2", (2, inner))):
            key = f"{i}.{name}.weight"
            if key not in tensors:
                raise DyVTEError(f"router weights in {path} lack {ROUTER_PREFIX}{key}")
            got = tuple(tensors[key].shape)
            if got != expected:
                raise DyVTEError(
                    f"router {ROUTER_PREFIX}{key} in {path} has shape {list(got)}, expected "
                    f"{list(expected)} for hidden size {hidden_size}"
                )
            getattr(router, name).weight.data.copy_(tensors[key].float())
    bad = [k for k, t in sorted(tensors.items()) if not bool(torch.isfinite(t).all())]
    if bad:
        warn(f"router weights in {path} hold NaN or Inf ({ROUTER_PREFIX}{bad[0]}"
             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): those routers never exit, and a parity "
             "report fails on them")
    return routers


def save_routers(routers: Routers, path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "dyvte-routers", "num_layers": str(len(routers))}
    if metadata:
        meta["summary"] = json.dumps(metadata)
    save_file(routers.published_state_dict(), str(path), metadata=meta)
    return path
