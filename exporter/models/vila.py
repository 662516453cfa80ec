"""VILA (NVlabs/VILA, VILA1.5): SigLIP tower, down-sampling MLP projector, Llama/Qwen2 decoder.

Native layout: a root `config.json` (`model_type` `llava_llama`) and three Hugging Face sub-folders,
`llm/`, `vision_tower/`, `mm_projector/` (see shared/design/checkpoints.md). transformers has no
VILA class, so the parts are assembled here from transformers' Siglip/Llama classes plus the
projector, whose weight names (`layers.{i}.*`) follow VILA's `nn.Sequential`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from exporter.dyvte.router import has_router_weights, load_routers, seeded_routers
from engines.core.errors import DyVTEError
from exporter.models.base import Family, MultimodalModel, assemble, preset_text_config, seeded
from engines.core.prompt import PromptSpec
from exporter.models.checkpoint import (
    hf_from_pretrained,
    load_into,
    load_safetensors,
    read_json,
    require_dir,
    wrap_load_errors,
)
from engines.core.templates import get_template, guess_template, stop_token_ids
from exporter.models.tokenizer import build_word_tokenizer

VILA_IMAGE_TOKEN_INDEX = -200  # VILA/LLaVA splice this id where the visual tokens go
VISION_CLASSES = {"siglip_vision_model": SiglipVisionModel, "clip_vision_model": CLIPVisionModel}


class SquareMerge(nn.Module):
    """VILA's parameter-free down-sampling: k x k neighbourhoods of the patch grid -> one token.

    The grid is zero-padded at its far edges to a multiple of k (27 -> 28 for k=2); each output
    token concatenates its neighbourhood row-major: (r, c), (r, c+1), (r+1, c), (r+1, c+1) for k=2,
    which is the channel order VILA's `flat_square` produces.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, c = x.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise DyVTEError(f"the projector needs a square patch grid; got {tokens} tokens")
        k = self.k
        padded = -(-side // k) * k
        grid = x.reshape(n, side, side, c)
        if padded != side:
            grid = nn.functional.pad(grid, (0, 0, 0, padded - side, 0, padded - side))
        out = padded // k
        grid = grid.reshape(n, out, k, out, k, c).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, out * out, k * k * c)


class VilaProjector(nn.Module):
    """`mm_projector`; module indices match VILA's so `layers.{i}.*` weights load as they are."""

    def __init__(self, kind: str, mm_hidden: int, hidden: int):
        super().__init__()
        self.kind = kind
        if not isinstance(kind, str):
            kind = repr(kind)  # null or a number: refused below by name
        if kind == "linear":
            self.layers = nn.Linear(mm_hidden, hidden)
        elif kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                SquareMerge(2), nn.LayerNorm(4 * mm_hidden), nn.Linear(4 * mm_hidden, hidden),
                nn.GELU(), nn.Linear(hidden, hidden),
            )
        elif kind == "mlp_downsample_3x3_fix":
            self.layers = nn.Sequential(
                SquareMerge(3), nn.LayerNorm(9 * mm_hidden), nn.Linear(9 * mm_hidden, 3 * mm_hidden),
                nn.GELU(), nn.LayerNorm(3 * mm_hidden), nn.Linear(3 * mm_hidden, hidden),
                nn.GELU(), nn.Linear(hidden, hidden),
            )
        elif match := re.fullmatch(r"mlp(\d+)x_gelu", kind):
            mods: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
            for _ in range(int(match.group(1)) - 1):
                mods += [nn.GELU(), nn.Linear(hidden, hidden)]
            self.layers = nn.Sequential(*mods)
        else:
            raise DyVTEError(
                f"unsupported mm_projector_type {kind!r}; supported: linear, mlpNx_gelu, "
                "mlp_downsample, mlp_downsample_2x2_fix, mlp_downsample_3x3_fix"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TowerWithProjector(nn.Module):
    """Vision tower features at `select_layer` (optionally without the first token) -> projector."""

    def __init__(self, tower: nn.Module, projector: nn.Module, select_layer: int, drop_first: bool):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.select_layer = select_layer
        self.drop_first = drop_first

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.drop_first:
            feats = feats[:, 1:]
        return self.projector(feats)


def grid_tokens(image_size: int, patch: int, merge: int) -> int:
    side = image_size // patch
    return (-(-side // merge)) ** 2


# Built-in presets as data: tiny shapes of the VILA1.5 architecture (SigLIP's grid is odd, like
# 27x27 at 384 px, so the down-sampling pads).
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=54, patch_size=6),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
        projector="mlp_downsample",
        select_layer=-2,
    ),
    # Wider, so that weights outweigh graph structure as in real models (package-size checks).
    "small": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=54, patch_size=6),
        llm=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
        projector="mlp_downsample",
        select_layer=-2,
    ),
    # VILA1.5-7B's shapes (SigLIP-so400m at 384 px, 2x2 down-sampling, Llama-2-7B) for export-bench, built
    # on the meta device; "vila-small" keeps the 729 -> 196 token grid at 1/4 of the width.
    "vila1.5-7b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        projector="mlp_downsample",
        select_layer=-2,
    ),
    "vila-small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=384, patch_size=14),
        llm=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        projector="mlp_downsample",
        select_layer=-2,
    ),
    # The built-in default (`Vila.default()`), trained by `python -m exporter.builtin.train_vila` on the
    # synthetic VQA task: a 13x13 patch grid (odd, like SigLIP's 27x27), 2x2-merged to 7x7 = 49 visual
    # tokens, and 8 decoder layers so that the exit layer has room to vary.
    # ChatML (`hermes_2`, VILA1.5-40b's template) keeps the text short: 49 of ~68 prompt tokens are visual.
    "builtin": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=104, patch_size=8, vision_use_head=False),
        llm=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6),
        projector="mlp_downsample",
        select_layer=-1,
        template="hermes_2",
    ),
}


class VilaParts:
    """The native pieces, kept so a model can be written back in VILA's folder layout."""

    def __init__(self, llm, tower, projector, image_processor, tokenizer, root_config: dict):
        self.llm, self.tower, self.projector = llm, tower, projector
        self.image_processor, self.tokenizer, self.root_config = image_processor, tokenizer, root_config

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        self.llm.save_pretrained(folder / "llm")
        self.tower.save_pretrained(folder / "vision_tower")
        from safetensors.torch import save_file

        (folder / "mm_projector").mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(folder / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
        return self.save_files(folder)

    def save_files(self, folder: Path) -> Path:
        """Everything of the layout but the weights: configs, tokenizer, image processor."""
        folder = Path(folder)
        self.llm.config.save_pretrained(folder / "llm")
        self.tokenizer.save_pretrained(folder / "llm")
        self.tower.config.save_pretrained(folder / "vision_tower")
        self.image_processor.save_pretrained(folder / "vision_tower")
        proj_dir = folder / "mm_projector"
        proj_dir.mkdir(parents=True, exist_ok=True)
        (proj_dir / "config.json").write_text(
            json.dumps({"model_type": "v2l_projector", "mm_projector_type": self.projector.kind}, indent=2)
        )
        (folder / "config.json").write_text(json.dumps(self.root_config, indent=2))
        return folder

    def published_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sub-folder -> {key in the published layout: tensor} (meta tensors allowed)."""
        from exporter.streaming import published_names

        out = {}
        for sub, module in (("llm", self.llm), ("vision_tower", self.tower)):
            state = module.state_dict()
            out[sub] = {published_names(module, state)[k]: v for k, v in state.items()}
        out["mm_projector"] = dict(self.projector.state_dict())
        return out


def _assemble(parts: VilaParts, template_name: str | None, source: dict) -> MultimodalModel:
    root = parts.root_config
    select_feature = root.get("mm_vision_select_feature", "cls_patch")
    if select_feature not in ("cls_patch", "patch"):
        raise DyVTEError(f"unsupported mm_vision_select_feature {select_feature!r}")
    if root.get("mm_use_im_start_end"):
        raise DyVTEError("mm_use_im_start_end=true checkpoints are not supported yet")
    select_layer = root.get("mm_vision_select_layer", -2)
    depth = parts.tower.config.num_hidden_layers
    if isinstance(select_layer, bool) or not isinstance(select_layer, int) or not -depth - 1 <= select_layer <= depth:
        raise DyVTEError(f"config.json: mm_vision_select_layer must be an integer in {-depth - 1}..{depth} "
                         f"(a layer of the {depth}-layer vision tower), not {select_layer!r}")
    vision = TowerWithProjector(parts.tower, parts.projector, select_layer, select_feature == "patch")
    tok = parts.tokenizer
    template = get_template(template_name) if template_name else guess_template(tok)
    vcfg = parts.tower.config
    merge = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}.get(
        parts.projector.kind, 1
    )
    per_image = grid_tokens(vcfg.image_size, vcfg.patch_size, merge) - (
        1 if select_feature == "patch" and merge == 1 else 0
    )
    spec = PromptSpec(
        template=f"conversation:{template.name}",
        image_token_id=VILA_IMAGE_TOKEN_INDEX,
        tokens_per_tile=per_image,
        image_aspect_ratio=root.get("image_aspect_ratio", "resize"),
        stop_token_ids=stop_token_ids(tok, template),
    )
    return assemble("vila", vision, tok, parts.image_processor, spec,
                    (parts.llm.model, parts.llm.lm_head, parts.llm.config), source, parts)


class Vila(Family):
    name = "vila"
    description = "VILA1.5 (NVlabs): SigLIP + 2x2 down-sampling projector + Llama/Qwen2"

    @seeded
    def preset(self, seed: int = 0, name: str = "tiny") -> MultimodalModel:
        p = PRESETS[name]
        template = p.get("template", "vicuna_v1")
        tok = build_word_tokenizer(extra_special=["<|im_start|>", "<|im_end|>"] if template == "hermes_2" else None)
        llm_cfg = preset_text_config(tok, LlamaConfig, **p["llm"])
        llm = LlamaForCausalLM(llm_cfg).eval()
        tower = SiglipVisionModel(SiglipVisionConfig(**p["vision"])).eval()
        projector = VilaProjector(p["projector"], p["vision"]["hidden_size"], p["llm"]["hidden_size"])
        size = p["vision"]["image_size"]
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
        root = {
            "model_type": "llava_llama",
            "architectures": ["LlavaLlamaModel"],
            "hidden_size": p["llm"]["hidden_size"],
            "mm_hidden_size": p["vision"]["hidden_size"],
            "mm_vision_select_layer": p["select_layer"],
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": "resize",
            "mm_use_im_start_end": False,
            "model_dtype": "torch.float32",
            "llm_cfg": {"architectures": ["LlamaForCausalLM"]},
            "vision_tower_cfg": {"architectures": ["SiglipVisionModel"]},
            "mm_projector_cfg": {"mm_projector_type": p["projector"]},
        }
        parts = VilaParts(llm, tower, projector.eval(), image_processor, tok, root)
        model = _assemble(parts, template, {"preset": name, "seed": seed})
        model.attach_routers(seeded_routers(llm_cfg.num_hidden_layers, llm_cfg.hidden_size, seed))
        return model

    def default(self) -> MultimodalModel:
        """The built-in VILA trained on the synthetic VQA task (exporter/builtin/vila), with its
        routers; the random `tiny` preset when that folder is absent."""
        from exporter.builtin import builtin_checkpoint

        folder = builtin_checkpoint(self.name)
        if folder is None:
            return self.preset()
        model = self.load(folder)
        model.source = {"checkpoint": str(folder), "builtin": True}
        return model

    def load(self, checkpoint: Path, template: str | None = None, dtype=torch.float32, lazy: bool = False,
             **_) -> MultimodalModel:
        """`lazy`: the language model stays on disk (meta tensors tagged with their files) until
        `exporter.streaming.stream_weights` loads a graph's share; the vision tower too unless it is
        under `EAGER_TOWER_BYTES`."""
        checkpoint = require_dir(Path(checkpoint), "VILA checkpoint")
        root = read_json(checkpoint / "config.json")
        if root.get("model_type") not in ("llava_llama", "vila", "llava_qwen2") and "LlavaLlamaModel" not in (
            root.get("architectures") or []
        ):
            raise DyVTEError(
                f"{checkpoint} is not a VILA checkpoint (model_type {root.get('model_type')!r}, "
                "expected 'llava_llama' with llm/, vision_tower/, mm_projector/ sub-folders)"
            )
        llm_dir = require_dir(checkpoint / "llm", "VILA llm")
        vt_dir = require_dir(checkpoint / "vision_tower", "VILA vision_tower")
        proj_dir = require_dir(checkpoint / "mm_projector", "VILA mm_projector")
        vt_type = read_json(vt_dir / "config.json").get("model_type")
        if vt_type not in VISION_CLASSES:
            raise DyVTEError(f"unsupported VILA vision tower {vt_type!r}; supported: {', '.join(VISION_CLASSES)}")
        if lazy:
            from exporter.streaming import lazy_pretrained, make_real

            llm = lazy_pretrained(AutoModelForCausalLM, llm_dir, "VILA language model", dtype)
            tower = make_real(lazy_pretrained(VISION_CLASSES[vt_type], vt_dir, "VILA vision tower", dtype))
        else:
            llm = hf_from_pretrained(AutoModelForCausalLM, llm_dir, "VILA language model", dtype)
            tower = hf_from_pretrained(VISION_CLASSES[vt_type], vt_dir, "VILA vision tower", dtype)
        kind = read_json(proj_dir / "config.json").get("mm_projector_type")
        projector = VilaProjector(kind, tower.config.hidden_size, llm.config.hidden_size)
        load_into(projector, load_safetensors(proj_dir), f"VILA projector {proj_dir}")
        projector = projector.to(dtype).eval()
        image_processor = wrap_load_errors(
            f"image processor from {vt_dir}", AutoImageProcessor.from_pretrained, str(vt_dir), local_files_only=True
        )
        tokenizer = wrap_load_errors(
            f"tokenizer from {llm_dir}", AutoTokenizer.from_pretrained, str(llm_dir), local_files_only=True
        )
        parts = VilaParts(llm, tower, projector, image_processor, tokenizer, root)
        model = _assemble(parts, template, {"checkpoint": str(checkpoint)})
        for folder in (checkpoint, llm_dir):
            if has_router_weights(folder):
                model.attach_routers(load_routers(folder, model.shape.num_layers, model.shape.hidden_size))
                break
        return model

