"""Export from a checkpoint without holding it in memory: weights stay on disk until a graph needs them.

`lazy_causal_lm` builds a Hugging Face causal LM from its config on the meta device (no memory) and
records, for every parameter, the `.safetensors` file and key it comes from. `stream_weights` is the
`materialize` hook of `exporter.package.export_onnx`: while one graph exports, its parameters are
read from the files (memory-mapped, one tensor at a time) and dropped back to meta afterwards, so
peak memory stays near the largest graph plus the (eagerly loaded) vision tower.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from engines.core.errors import DyVTEError
from engines.core.errors import wrap_load_errors
from exporter.models.checkpoint import read_json, require_dir, weight_files

SOURCE = "_dyvte_source"  # attribute on a meta parameter: (file, key, dtype)


def swap_parameter(module: nn.Module, qualified: str, tensor: torch.Tensor, like: nn.Parameter) -> None:
    """Replace parameter `qualified` of `module` by `tensor`, keeping `like`'s requires_grad (the
    ONNX exporter folds a transposed weight only for trainable-looking parameters, and streamed
    graphs must equal eager ones) and its `_dyvte_*` tags (where the values come from)."""
    owner_name, _, leaf = qualified.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = nn.Parameter(tensor, requires_grad=like.requires_grad)
    for attr, value in vars(like).items():
        if attr.startswith("_dyvte_"):
            setattr(param, attr, value)
    setattr(owner, leaf, param)


def materializer(values: Callable[[str, nn.Parameter], torch.Tensor | None]):
    """A `materialize` hook for `export_onnx`: inside it, every meta parameter of the module for
    which `values(name, parameter)` gives a tensor holds that tensor; on exit they are meta again."""

    @contextmanager
    def materialize(module: nn.Module):
        made = []
        for name, p in list(module.named_parameters()):
            tensor = values(name, p) if p.is_meta else None
            if tensor is not None:
                swap_parameter(module, name, tensor, p)
                made.append((name, p))
        try:
            yield module
        finally:
            for name, p in made:
                swap_parameter(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"), p)

    return materialize


def _key_index(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """checkpoint key -> (file, shape) over the folder's weight files, reading headers only."""
    index = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    index[key] = (str(f), list(handle.get_slice(key).get_shape()))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read {f} (truncated or damaged?): {exc}") from None
    return index


def lazy_causal_lm(folder: Path, what: str, dtype: torch.dtype = torch.float32):
    """The causal LM of a Hugging Face folder on the meta device, each parameter tagged with its
    source; the same refusals as an eager load (missing keys, shapes that do not match)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = require_dir(Path(folder), what)
    read_json(folder / "config.json")
    config = wrap_load_errors(f"{what} config from {folder}", AutoConfig.from_pretrained, str(folder),
                              local_files_only=True)
    with torch.device("meta"):
        model = wrap_load_errors(f"{what} from {folder}", AutoModelForCausalLM.from_config, config, dtype=dtype)
    index = _key_index(folder)
    missing, mismatched = [], []
    for name, p in model.named_parameters():
        found = index.get(name)
        if found is None:
            missing.append(name)
        elif found[1] != list(p.shape):
            mismatched.append(f"{name} {found[1]} (expected {list(p.shape)})")
        else:
            setattr(p, SOURCE, (found[0], name, dtype))
    for label, bad in (("lacks weights", missing), ("has weights of the wrong shape:", mismatched)):
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise DyVTEError(f"{what} at {folder} {label} {', '.join(bad[:3])}{more}")
    # buffers computed at construction (rotary tables) are made real from the config
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            owner_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner_name) if owner_name else model, leaf, type(module)(config))
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(f"{what}: buffer {name} cannot be streamed (a bug: it should be made real above)")
    return model.eval()


def _from_file(name: str, p: nn.Parameter) -> torch.Tensor | None:
    source = getattr(p, SOURCE, None)
    if source is None:
        return None
    file, key, dtype = source
    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(key).to(dtype)


stream_weights = materializer(_from_file)
stream_weights.__doc__ = "Real tensors for a module's streamed parameters while the block runs, meta again after."


def is_streamed(model: nn.Module) -> bool:
    return any(p.is_meta and hasattr(p, SOURCE) for p in model.parameters())
