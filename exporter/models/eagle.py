"""Eagle (NVlabs/EAGLE, Eagle-X4/X5, 2024): a mixture of vision encoders, channel concatenation,
an `mlp2x_gelu` projector and a Vicuna/Llama decoder, on the LLaVA-1.5 code base.

What Eagle computes for one image (read from the authors' `multimodal_encoder/` code):

- The image is preprocessed once at 1024 px by a CLIP-style image processor (the ConvNeXt expert's:
  shortest edge 1024, bicubic, centre crop 1024, OpenAI-CLIP mean/std), after `pad` to a square.
- Each expert whose own input size differs from 1024 gets that tensor resized in the graph
  (bilinear, `align_corners=True`). The `clip-448` expert is given 336 px by Eagle's code (the
  native size of CLIP ViT-L/14-336), the `convnext-1024` expert the 1024 px input as it is.
- CLIP expert: patch + position embeddings, the CLS token dropped *before* `pre_layrnorm`, then all
  encoder layers on the patch tokens only; the last layer's output (no post-layernorm; the config's
  `mm_vision_select_layer` is not used by this expert).
- ConvNeXt expert (timm `convnext_xxlarge`, LayerNorm eps 1e-5): stem and the four stages; the last
  stage's output (stride 32: 32x32 at 1024 px).
- Every expert's feature map is resized to the 32x32 grid (bilinear, `align_corners=True`) when its
  side differs, flattened row-major and the experts are concatenated along channels in the order of
  `mm_vision_tower`; the projector maps them to 1024 visual tokens.

Native layout: one folder, `config.json` with `model_type` `eagle_llama` (a LlamaConfig plus `mm_*`
fields), weights `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`,
`model.mm_projector.{0,2}.*`, the experts under `model.vision_tower.vision_towers.{i}.vision_tower.*`
(CLIP: transformers' `CLIPVisionModel` names; ConvNeXt: timm's names, `stem.0`, `stages.{s}.blocks.{b}
.conv_dw`, ...), DyVTE's routers `model.visual_gates_router.*`, the tokenizer files at the root.
The ConvNeXt weights are mapped onto transformers' `ConvNextModel`, whose LayerNorms are set to
timm's eps; the two compute the same function (tests/test_eagle.py checks it against a timm-layout
reference written from the checkpoint's tensors).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

from exporter.dyvte.router import has_router_weights, load_routers, seeded_routers
from engines.core.errors import DyVTEError
from exporter.models.base import Family, MultimodalModel, assemble, preset_text_config, seeded
from exporter.models.checkpoint import (
    load_safetensors,
    load_into,
    read_json,
    require_dir,
    weight_files,
    wrap_load_errors,
)
from engines.core.prompt import PromptSpec
from engines.core.templates import get_template, stop_token_ids
from exporter.models.tokenizer import build_word_tokenizer
from exporter.models.vila import VilaProjector

EAGLE_IMAGE_TOKEN_INDEX = -200
EAGLE_INPUT_SIZE = 1024  # hard-coded in Eagle's mixture
EAGLE_GRID = 32  # hard-coded in Eagle's mixture: 32x32 = 1024 visual tokens
EAGLE_CLIP_SIZE = 336  # what Eagle's mixture resizes the input to for its `clip-448` expert
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_CONVNEXT_EPS = 1e-5  # Eagle's convnext_xxlarge passes norm_eps=1e-5 to every LayerNorm
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT (B/16, L/14, L/14-336); heads are not in the weights

SUPPORTED_EXPERTS = ("clip-448", "convnext-1024")
UNSUPPORTED_EXPERTS = ("sam-1024", "det-1024", "pix2struct-1024")
TOWER_PREFIX = "model.vision_tower.vision_towers."
# Keys of a non-native extension: tiny folders (presets, tests) state their input size and grid,
# which real Eagle checkpoints leave to the code's constants (1024 px, 32x32).
EXTENSION_KEY = "dyvte_export"


# ----------------------------------------------------------------------------- experts


class ClipExpert(nn.Module):
    """Eagle's high-resolution CLIP branch on a transformers `CLIPVisionModel`: [N,3,S,S] -> [N,C,s,s].

    The CLS token is dropped before `pre_layrnorm`, so the encoder layers attend over patch tokens
    only; the output is the last layer's, without the post-layernorm.
    """

    def __init__(self, tower: CLIPVisionModel):
        super().__init__()
        self.tower = tower
        cfg = tower.config
        self.image_size = cfg.image_size
        self.side = cfg.image_size // cfg.patch_size
        self.hidden_size = cfg.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.tower
        emb = vm.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))
        x = patches.flatten(2).transpose(1, 2) + emb.position_embedding.weight[1:]
        x = vm.pre_layrnorm(x)
        x = vm.encoder(inputs_embeds=x).last_hidden_state
        n = x.shape[0]
        return x.transpose(1, 2).reshape(n, self.hidden_size, self.side, self.side)


class ConvNextExpert(nn.Module):
    """Eagle's ConvNeXt branch on a transformers `ConvNextModel`: [N,3,S,S] -> last stage [N,C,S/32,S/32]."""

    def __init__(self, tower: ConvNextModel, image_size: int):
        super().__init__()
        self.tower = tower
        cfg = tower.config
        self.image_size = image_size
        self.side = image_size // (cfg.patch_size * 2 ** (cfg.num_stages - 1))
        self.hidden_size = cfg.hidden_sizes[-1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.embeddings(pixel_values.to(self.tower.embeddings.patch_embeddings.weight.dtype))
        return self.tower.encoder(x).last_hidden_state


def set_convnext_eps(tower: ConvNextModel, eps: float = TIMM_CONVNEXT_EPS) -> ConvNextModel:
    """transformers fixes eps=1e-6 in ConvNeXt's LayerNorms; Eagle's timm model uses 1e-5."""
    for module in tower.modules():
        if isinstance(module, ConvNextLayerNorm):
            module.eps = eps
    return tower


class EagleVision(nn.Module):
    """The mixture of encoders plus projector: pixel values [N,3,S,S] -> [N, grid^2, hidden].

    Every size below is a Python int fixed at construction, so the graph has no data-dependent
    branches: which experts get a resized input and which feature maps are resized is static.
    """

    def __init__(self, experts: list[nn.Module], names: list[str], projector: nn.Module,
                 input_size: int, grid: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.names = list(names)
        self.projector = projector
        self.input_size = input_size
        self.grid = grid

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The concatenated expert features [N, grid^2, sum(C)] (before the projector)."""
        feats = []
        for expert in self.experts:
            x = pixel_values
            if expert.image_size != self.input_size:
                x = F.interpolate(x.float(), size=(expert.image_size, expert.image_size), mode="bilinear",
                                  align_corners=True).to(pixel_values.dtype)
            f = expert(x)
            if expert.side != self.grid:
                f = F.interpolate(f.float(), size=(self.grid, self.grid), mode="bilinear",
                                  align_corners=True).to(f.dtype)
            feats.append(f.flatten(2).transpose(1, 2))
        return torch.cat(feats, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(pixel_values))


# ----------------------------------------------------------------------------- key names

# transformers ConvNextModel name -> Eagle's (timm) name inside `vision_towers.{i}.vision_tower.`
_CONVNEXT_RENAMES = (
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\.", r"stages.\1.downsample.\2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.weight"),
    (r"^layernorm\.", "head.norm."),  # the pooled-feature norm: unused by Eagle, optional
)
# Weights a module owns that Eagle's computation never reads: absent is fine, their values are kept.
_OPTIONAL = {"clip-448": ("post_layernorm.",), "convnext-1024": ("layernorm.",)}


def convnext_key(hf_key: str) -> str:
    for pattern, repl in _CONVNEXT_RENAMES:
        new, n = re.subn(pattern, repl, hf_key)
        if n:
            return new
    raise DyVTEError(f"no Eagle name for ConvNeXt weight {hf_key}")  # pragma: no cover - table is complete


def expert_key(kind: str, hf_key: str) -> str:
    """Eagle's name of an expert weight, relative to `model.vision_tower.vision_towers.{i}.vision_tower.`.

    CLIP: Eagle's tower is a transformers 4.x `CLIPVisionModel`, whose weights sit under
    `vision_model.`; transformers 5 dropped that level from the module, so it is added back here.
    """
    return convnext_key(hf_key) if kind == "convnext-1024" else "vision_model." + hf_key


def tower_prefix(index: int) -> str:
    return f"{TOWER_PREFIX}{index}.vision_tower."


def parse_experts(root: dict) -> list[str]:
    spec = root.get("mm_vision_tower") or root.get("vision_tower")
    if not spec or not isinstance(spec, str):
        raise DyVTEError("the Eagle config names no vision experts (mm_vision_tower)")
    if ";" not in spec:
        raise DyVTEError(
            f"mm_vision_tower {spec!r} is a single vision tower, not an Eagle mixture of encoders "
            "(expected names separated by ';', e.g. 'clip-448;convnext-1024')"
        )
    names = [n.strip() for n in spec.split(";")]
    for n in names:
        if n in UNSUPPORTED_EXPERTS:
            raise DyVTEError(
                f"Eagle vision expert {n!r} (in mm_vision_tower {spec!r}) is not supported yet; "
                f"supported experts: {', '.join(SUPPORTED_EXPERTS)}"
            )
        if n not in SUPPORTED_EXPERTS:
            raise DyVTEError(f"unknown Eagle vision expert {n!r} in mm_vision_tower {spec!r}; "
                             f"supported experts: {', '.join(SUPPORTED_EXPERTS)}")
    if len(set(names)) != len(names):
        raise DyVTEError(f"mm_vision_tower {spec!r} names an expert twice")
    if "convnext-1024" not in names:
        raise DyVTEError(f"an Eagle mixture needs the convnext-1024 expert (its image processor is "
                         f"Eagle's); mm_vision_tower is {spec!r}")
    return names


# ----------------------------------------------------------------------------- config inference


def _need(tensors: dict, key: str, prefix: str) -> torch.Tensor:
    if key not in tensors:
        raise DyVTEError(f"Eagle checkpoint lacks weight {prefix}{key}")
    return tensors[key]


def clip_config_from(tensors: dict[str, torch.Tensor], prefix: str) -> CLIPVisionConfig:
    """CLIP ViT shapes from its weights; activation and eps are OpenAI CLIP's (quick_gelu, 1e-5)."""
    patch = _need(tensors, "vision_model.embeddings.patch_embedding.weight", prefix)
    pos = _need(tensors, "vision_model.embeddings.position_embedding.weight", prefix)
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    side = math.isqrt(pos.shape[0] - 1)
    if side * side != pos.shape[0] - 1:
        raise DyVTEError(f"Eagle checkpoint: {prefix}vision_model.embeddings.position_embedding.weight has "
                         f"{pos.shape[0]} rows, not 1 + a square grid")
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise DyVTEError(f"Eagle checkpoint has no CLIP encoder layers under {prefix}vision_model.encoder.layers.")
    fc1 = _need(tensors, "vision_model.encoder.layers.0.mlp.fc1.weight", prefix)
    if hidden % CLIP_HEAD_DIM:
        raise DyVTEError(f"CLIP expert hidden size {hidden} is not a multiple of the head size {CLIP_HEAD_DIM}")
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=max(layers) + 1,
        num_attention_heads=hidden // CLIP_HEAD_DIM, image_size=side * patch_size, patch_size=patch_size,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def convnext_config_from(tensors: dict[str, torch.Tensor], prefix: str) -> ConvNextConfig:
    """timm ConvNeXt shapes from its weights (patch stem, 4 stages, kernel 7, MLP ratio 4)."""
    if "stem.2.weight" in tensors:
        raise DyVTEError(f"{prefix}stem is an overlapping (3-layer) ConvNeXt stem; only the patch stem is supported")
    stem = _need(tensors, "stem.0.weight", prefix)
    stages = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"stages\.(\d+)\.blocks\.", k))})
    if stages != list(range(len(stages))) or not stages:
        raise DyVTEError(f"Eagle checkpoint: ConvNeXt stages under {prefix}stages. are {stages}, expected 0..n-1")
    dims, depths = [], []
    for s in stages:
        blocks = {int(m.group(1)) for k in tensors if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))}
        dw = _need(tensors, f"stages.{s}.blocks.0.conv_dw.weight", prefix)
        if dw.shape[-1] != 7:
            raise DyVTEError(f"{prefix}stages.{s}.blocks.0.conv_dw has kernel {dw.shape[-1]}; only 7 is supported")
        fc1 = _need(tensors, f"stages.{s}.blocks.0.mlp.fc1.weight", prefix)
        if fc1.shape[0] != 4 * dw.shape[0]:
            raise DyVTEError(f"{prefix}stages.{s}.blocks.0.mlp.fc1 has MLP ratio {fc1.shape[0] / dw.shape[0]}; "
                             "only 4 is supported")
        dims.append(dw.shape[0])
        depths.append(max(blocks) + 1)
    return ConvNextConfig(
        num_channels=stem.shape[1], patch_size=stem.shape[-1], num_stages=len(stages), hidden_sizes=dims,
        depths=depths, hidden_act="gelu", layer_scale_init_value=1.0, layer_norm_eps=TIMM_CONVNEXT_EPS,
    )


def load_expert(module: nn.Module, kind: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Copy an expert's weights from the checkpoint's names, naming any missing weight in full."""
    own = module.state_dict()
    optional = _OPTIONAL.get(kind, ())
    picked, missing = {}, []
    for hf_key, value in own.items():
        key = expert_key(kind, hf_key)
        if key in tensors:
            picked[hf_key] = tensors[key]
        elif hf_key.startswith(optional):
            picked[hf_key] = value
        else:
            missing.append(prefix + key)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DyVTEError(f"Eagle checkpoint lacks {kind} expert weights {', '.join(missing[:3])}{more}")
    for hf_key, value in own.items():
        if tuple(picked[hf_key].shape) != tuple(value.shape):
            raise DyVTEError(f"Eagle checkpoint: weight {prefix + expert_key(kind, hf_key)} has shape "
                             f"{list(picked[hf_key].shape)}, expected {list(value.shape)}")
    module.load_state_dict(picked, strict=True)


# ----------------------------------------------------------------------------- parts


def eagle_image_processor(size: int) -> CLIPImageProcessorPil:
    """The image processor Eagle's mixture uses (the ConvNeXt expert's, set to the input size)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=Image.BICUBIC,
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def _llama_config(root: dict) -> LlamaConfig:
    drop = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", EXTENSION_KEY}
    fields = {k: v for k, v in root.items() if k not in drop}
    if fields.get("rope_scaling", 0) is None:  # 4.x configs write null; 5.x warns about the key
        del fields["rope_scaling"]
    return wrap_load_errors("the Eagle language-model config", LlamaConfig, **fields)


class EagleParts:
    """The native pieces, kept so a model can be written back in Eagle's folder layout."""

    def __init__(self, llm, experts: list[nn.Module], names: list[str], projector, image_processor,
                 tokenizer, root_config: dict):
        self.llm, self.experts, self.names, self.projector = llm, experts, names, projector
        self.image_processor, self.tokenizer, self.root_config = image_processor, tokenizer, root_config

    def expert(self, name: str) -> nn.Module:
        return self.experts[self.names.index(name)]

    def state_dict(self, routers=None) -> dict[str, torch.Tensor]:
        """All weights under Eagle's names (plus DyVTE's published router keys)."""
        out = {f"model.{k}": v for k, v in self.llm.model.state_dict().items()}
        out.update({f"lm_head.{k}": v for k, v in self.llm.lm_head.state_dict().items()})
        out.update({f"model.mm_projector.{k.removeprefix('layers.')}": v
                    for k, v in self.projector.state_dict().items()})
        for i, (name, expert) in enumerate(zip(self.names, self.experts)):
            for k, v in expert.tower.state_dict().items():
                out[tower_prefix(i) + expert_key(name, k)] = v
        if routers is not None:
            out.update(routers.published_state_dict())
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def save(self, folder: Path, routers=None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(routers), str(folder / "model.safetensors"), metadata={"format": "pt"})
        return self.save_files(folder)

    def save_files(self, folder: Path) -> Path:
        """Everything of the layout but the weights: config, tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.root_config, indent=2))
        self.tokenizer.save_pretrained(folder)
        return folder

    def published_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sub-folder -> {key in the published layout: tensor} (meta tensors allowed)."""
        return {"": self.state_dict()}


def _assemble(parts: EagleParts, template_name: str, source: dict) -> MultimodalModel:
    root = parts.root_config
    if root.get("mm_use_im_start_end"):
        raise DyVTEError("mm_use_im_start_end=true checkpoints are not supported yet")
    ext = root.get(EXTENSION_KEY) or {}
    input_size = int(ext.get("input_image_size", EAGLE_INPUT_SIZE))
    grid = int(ext.get("grid_size", EAGLE_GRID))
    vision = EagleVision(parts.experts, parts.names, parts.projector, input_size, grid)
    tok = parts.tokenizer
    template = get_template(template_name)
    spec = PromptSpec(
        template=f"conversation:{template.name}",
        image_token_id=EAGLE_IMAGE_TOKEN_INDEX,
        tokens_per_tile=grid * grid,
        insertion="splice",
        image_aspect_ratio=root.get("image_aspect_ratio") or "resize",
        stop_token_ids=stop_token_ids(tok, template),
    )
    return assemble("eagle", vision, tok, parts.image_processor, spec,
                    (parts.llm.model, parts.llm.lm_head, parts.llm.config), source, parts)


# ----------------------------------------------------------------------------- presets

# Tiny shapes of the Eagle mixture with the real ratios: the CLIP expert sees a resized input and
# its grid (3x3) is up-sampled to the common grid (4x4), the ConvNeXt expert runs at the input size
# with stride 32 (128 px -> 4x4), like 336 px -> 24x24 -> 32x32 and 1024 px -> 32x32 in Eagle.
PRESETS = {
    "tiny": dict(
        experts="clip-448;convnext-1024",
        input_size=128,
        grid=4,
        clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  image_size=42, patch_size=14),
        convnext=dict(patch_size=4, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1]),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
        projector="mlp2x_gelu",
    ),
    # Eagle-X5-7B-like for export-bench (built on the meta device): the supported two experts, CLIP
    # ViT-L/14 at 336 px and ConvNeXt-XXLarge at 1024 px, 32x32 = 1024 visual tokens, Vicuna-7B.
    "eagle-x5-7b": dict(
        experts="clip-448;convnext-1024",
        input_size=1024,
        grid=32,
        clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14),
        convnext=dict(patch_size=4, hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3]),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        projector="mlp2x_gelu",
    ),
    "eagle-small": dict(
        experts="clip-448;convnext-1024",
        input_size=1024,
        grid=32,
        clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  image_size=336, patch_size=14),
        convnext=dict(patch_size=4, hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 3, 1]),
        llm=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        projector="mlp2x_gelu",
    ),
}


def _randomise_convnext(tower: ConvNextModel, generator: torch.Generator) -> None:
    """Random norms and layer scales (defaults are 1/0 and 1e-6), so every weight shows in the output."""
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "layer_scale" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif "layernorm" in name or "downsampling_layer.0" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))


class Eagle(Family):
    name = "eagle"
    description = "Eagle-X4/X5 (NVlabs): mixture of vision encoders (CLIP + ConvNeXt) + mlp2x_gelu + Llama"

    @seeded
    def preset(self, seed: int = 0, name: str = "tiny") -> MultimodalModel:
        p = PRESETS[name]
        generator = torch.Generator().manual_seed(seed)
        tok = build_word_tokenizer()
        llm_cfg = preset_text_config(tok, LlamaConfig, **p["llm"])
        llm = LlamaForCausalLM(llm_cfg).eval()
        names = p["experts"].split(";")
        experts = []
        for n in names:
            if n == "clip-448":
                clip_cfg = CLIPVisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5, **p["clip"])
                experts.append(ClipExpert(CLIPVisionModel(clip_cfg).eval()))
            else:
                cn_cfg = ConvNextConfig(num_stages=len(p["convnext"]["depths"]), hidden_act="gelu",
                                        layer_norm_eps=TIMM_CONVNEXT_EPS, **p["convnext"])
                tower = set_convnext_eps(ConvNextModel(cn_cfg).eval())
                _randomise_convnext(tower, generator)
                experts.append(ConvNextExpert(tower, p["input_size"]))
        mm_hidden = sum(e.hidden_size for e in experts)
        projector = VilaProjector(p["projector"], mm_hidden, llm_cfg.hidden_size).eval()
        root = {k: v for k, v in llm_cfg.to_dict().items() if k != "transformers_version"}
        root.update({
            "model_type": "eagle_llama",
            "architectures": ["EagleLlamaForCausalLM"],
            "mm_vision_tower": p["experts"],
            "mm_hidden_size": mm_hidden,
            "mm_projector_type": p["projector"],
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad",
            EXTENSION_KEY: {"input_image_size": p["input_size"], "grid_size": p["grid"]},
        })
        parts = EagleParts(llm, experts, names, projector, eagle_image_processor(p["input_size"]), tok, root)
        model = _assemble(parts, "vicuna_v1", {"preset": name, "seed": seed})
        model.attach_routers(seeded_routers(llm_cfg.num_hidden_layers, llm_cfg.hidden_size, seed))
        return model

    def load(self, checkpoint: Path, template: str = "vicuna_v1", dtype=torch.float32, lazy: bool = False,
             **_) -> MultimodalModel:
        """`lazy`: the weights stay on disk (meta tensors tagged with their files and Eagle's keys, see
        `exporter.streaming`); experts under `EAGER_TOWER_BYTES` and the projector are read at once."""
        checkpoint = require_dir(Path(checkpoint), "Eagle checkpoint")
        root = read_json(checkpoint / "config.json")
        if root.get("model_type") != "eagle_llama" and "EagleLlamaForCausalLM" not in (root.get("architectures") or []):
            raise DyVTEError(
                f"{checkpoint} is not an Eagle checkpoint (model_type {root.get('model_type')!r}, "
                "expected 'eagle_llama')"
            )
        names = parse_experts(root)
        weight_files(checkpoint)  # a clear error when there are no .safetensors files
        ext = root.get(EXTENSION_KEY) or {}
        input_size = int(ext.get("input_image_size", EAGLE_INPUT_SIZE))
        if lazy:
            from exporter.streaming import checkpoint_index

            index = checkpoint_index(checkpoint)

        experts = []
        for i, name in enumerate(names):
            prefix = tower_prefix(i)
            if lazy:  # shapes from the headers: the configs below read nothing else
                tensors = {k[len(prefix):]: torch.empty(v.shape, device="meta")
                           for k, v in index.items() if k.startswith(prefix)}
            else:
                tensors = load_safetensors(checkpoint, prefix)
            if not tensors:
                raise DyVTEError(f"Eagle checkpoint {checkpoint} has no weights for expert {i} ({name}) "
                                 f"under {prefix}")
            if name == "clip-448":
                config = clip_config_from(tensors, prefix)
                if EXTENSION_KEY not in root and config.image_size != EAGLE_CLIP_SIZE:
                    raise DyVTEError(
                        f"the clip-448 expert's position table is for {config.image_size} px; Eagle runs "
                        f"it at {EAGLE_CLIP_SIZE} px with a resampled table, which is not supported"
                    )
                build = lambda config=config: CLIPVisionModel(config)  # noqa: E731
            else:
                config = convnext_config_from(tensors, prefix)
                build = lambda config=config: set_convnext_eps(ConvNextModel(config))  # noqa: E731
            if lazy:
                from exporter.streaming import empty_model, make_real, tag_parameters

                module = empty_model(build).to(dtype)
                tag_parameters(module, index, lambda n, name=name, prefix=prefix: prefix + expert_key(name, n),
                               f"Eagle {name} expert", checkpoint, dtype, _OPTIONAL.get(name, ()))
                module = make_real(module).eval()
            else:
                module = build()
                load_expert(module, name, tensors, prefix)
                module = module.to(dtype).eval()
            experts.append(ClipExpert(module) if name == "clip-448" else ConvNextExpert(module, input_size))
            del tensors
        mm_hidden = sum(e.hidden_size for e in experts)
        if root.get("mm_hidden_size") not in (None, mm_hidden):
            raise DyVTEError(f"mm_hidden_size is {root['mm_hidden_size']}, but the experts' channels add up "
                             f"to {mm_hidden}")

        llm_cfg = _llama_config(root)
        if lazy:
            from exporter.streaming import lazy_pretrained

            llm = lazy_pretrained(LlamaForCausalLM, checkpoint, "Eagle language model", dtype, config=llm_cfg,
                                  index=index)
        else:
            with torch.device("meta"):
                llm = LlamaForCausalLM(llm_cfg)
            llm = llm.to_empty(device="cpu")
            llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm_cfg)  # recompute its buffers
            state = {}
            for prefix in ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."):
                state.update({prefix + k: v for k, v in load_safetensors(checkpoint, prefix).items()})
            if llm_cfg.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            load_into(llm, state, f"Eagle language model in {checkpoint}")
            del state
            llm = llm.to(dtype).eval()

        projector = VilaProjector(root.get("mm_projector_type", "linear"), mm_hidden, llm_cfg.hidden_size)
        proj = load_safetensors(checkpoint, "model.mm_projector.")
        load_into(projector.layers, proj, f"Eagle checkpoint {checkpoint}: model.mm_projector")
        projector = projector.to(dtype).eval()

        # Eagle builds its image processor in code (the ConvNeXt expert's) and reads no
        # preprocessor_config.json from the checkpoint; so does this loader.
        image_processor = eagle_image_processor(input_size)
        tokenizer = wrap_load_errors(f"tokenizer from {checkpoint}", AutoTokenizer.from_pretrained,
                                     str(checkpoint), config=llm_cfg, local_files_only=True)
        parts = EagleParts(llm, experts, names, projector, image_processor, tokenizer, root)
        model = _assemble(parts, template, {"checkpoint": str(checkpoint)})
        if has_router_weights(checkpoint):
            model.attach_routers(load_routers(checkpoint, model.shape.num_layers, model.shape.hidden_size))
        return model
