"""Model families behind one registry; each adapter yields the same `MultimodalModel` decomposition."""

from __future__ import annotations

from pathlib import Path

from exporter.dyvte.router import load_routers
from engines.core.errors import DyVTEError
from exporter.models.base import Family, MultimodalModel
from exporter.models.eagle import Eagle
from exporter.models.internvl import InternVL
from exporter.models.llava import Llava
from exporter.models.vila import Vila

FAMILIES: dict[str, Family] = {f.name: f for f in (Vila(), Llava(), InternVL(), Eagle())}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise DyVTEError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def load_model(
    family: str,
    checkpoint: str | Path | None = None,
    routers: str | Path | None = None,
    **options,
) -> MultimodalModel:
    """The built-in model of `family`, or a checkpoint folder in its native layout; routers
    from `routers` (file or folder) replace any the checkpoint carries."""
    fam = get_family(family)
    model = fam.default() if checkpoint is None else fam.load(Path(checkpoint), **options)
    if routers is not None:
        s = model.shape
        model.attach_routers(load_routers(routers, s.num_layers, s.hidden_size))
    return model.eval()
