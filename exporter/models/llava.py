"""LLaVA-1.5 (haotian-liu/LLaVA, llava-hf): CLIP tower, two-layer GELU MLP projector, Llama decoder.

Two on-disk layouts load (chosen from `config.json`'s `model_type`, see shared/design/checkpoints.md):

- Hugging Face (`model_type` `llava`, e.g. `llava-hf/llava-1.5-7b-hf`): one
  `LlavaForConditionalGeneration` folder. transformers maps the published key layout
  (`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`) on load. Prompts
  come from the checkpoint's own chat template, with `<image>` expanded the way `LlavaProcessor` does.
- Original (`model_type` `llava_llama`, e.g. `liuhaotian/llava-v1.5-7b` and the DyVTE checkpoints):
  a Llama causal LM plus `model.mm_projector.*` (and DyVTE's routers) in one folder; the CLIP tower
  lives elsewhere and is passed as a local folder (`--vision-tower`). Prompts use the `vicuna_v1`
  conversation with the image id -200 spliced in, and images are padded to a square (`pad`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from exporter.dyvte.router import has_router_weights, load_routers, seeded_routers
from engines.core.errors import DyVTEError, wrap_load_errors
from engines.core.prompt import IMAGE_PLACEHOLDER
from exporter.models.base import Family, MultimodalModel, assemble, preset_text_config, seeded
from exporter.models.checkpoint import (
    config_int,
    hf_from_pretrained,
    load_into,
    load_safetensors,
    read_json,
    require_dir,
    weight_files,
)
from engines.core.prompt import PromptSpec
from engines.core.templates import get_template, stop_token_ids
from exporter.models.tokenizer import build_word_tokenizer

LLAVA_IMAGE_TOKEN_INDEX = -200  # the original code base splices this id where the visual tokens go
HF_MODEL_TYPES = ("llava",)
ORIGINAL_MODEL_TYPES = ("llava_llama",)
CLIP_TYPES = ("clip_vision_model", "clip")
PROJECTOR_PREFIX = "model.mm_projector."

# A Jinja template of the same shape as the llava-hf checkpoints' (role in capitals, images first, then
# the text, then `ASSISTANT:`), for the built-in preset whose tokenizer brings none.
PRESET_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Built-in presets as data: tiny shapes of the LLaVA-1.5 architecture (CLIP with a CLS token, the
# second-to-last layer's patch features, mlp2x_gelu, a Llama decoder).
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=30, patch_size=6),
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    ),
    # LLaVA-1.5-7B's real shapes (CLIP ViT-L/14 at 336 px, Vicuna-7B): for the large-model export benchmark,
    # built on the meta device and streamed (validation/export_bench.py), never allocated whole.
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    ),
    # LLaVA-1.5's proportions at 1/4 of the width (export-bench on a machine without time for 7B): 576
    # visual tokens, Vicuna's vocabulary.
    "llava-small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=256),
        llm=dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    ),
    # The benchmark shape of shared/design/ecosystem.md: a LLaVA-1.5-shaped decoder (hidden 1024, 12
    # layers) behind a cheap CLIP that still yields 576 visual tokens (336 px, patch 14).
    "bench": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=336, patch_size=14),
        llm=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-6),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    ),
}


class LlavaVision(nn.Module):
    """CLIP hidden states at fixed layers (optionally without CLS), concatenated, then the projector.

    All choices are constructor constants, so the forward has no data-dependent control flow.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layers: tuple[int, ...], drop_cls: bool):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.feature_layers = tuple(feature_layers)
        self.drop_cls = drop_cls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        feats = [states[layer] for layer in self.feature_layers]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        return self.projector(x)


def original_projector(kind: str, mm_hidden: int, hidden: int) -> nn.Module:
    """The original code base's `mm_projector`: module indices match, so `model.mm_projector.*` loads."""
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind) if isinstance(kind, str) else None
    if match:
        mods: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(int(match.group(1)) - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*mods)
    raise DyVTEError(f"unsupported mm_projector_type {kind!r}; supported: linear, mlpNx_gelu (LLaVA-1.5: mlp2x_gelu)")


def clip_tokens(vision_config, drop_cls: bool) -> int:
    """Visual tokens per image, as `LlavaProcessor` counts them: the patch grid, plus CLIP's CLS
    token, minus one when the `default` strategy drops it."""
    side = vision_config.image_size // vision_config.patch_size
    return side * side + 1 - (1 if drop_cls else 0)


def published_key(key: str) -> str:
    """A transformers LLaVA state-dict key in the layout the `-hf` repositories publish."""
    k = key[len("model."):] if key.startswith("model.") else key
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    if k.startswith("language_model."):
        rest = k[len("language_model."):]
        return "language_model." + (rest if rest.startswith(("model.", "lm_head.")) else "model." + rest)
    if k.startswith("vision_tower."):
        rest = k[len("vision_tower."):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    if k.startswith("multi_modal_projector."):
        return k
    return key


def read_chat_template(folder: Path, tokenizer) -> str:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, processor_config.json,
    then the tokenizer's own (tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            found = read_json(folder / name).get("chat_template")
            if isinstance(found, list):  # named templates
                found = next((t.get("template") for t in found if t.get("name") == "default"), None)
            if isinstance(found, str) and found.strip():
                return found
    found = getattr(tokenizer, "chat_template", None)
    if isinstance(found, str) and found.strip():
        return found
    raise DyVTEError(
        f"{folder} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)"
    )


def _file_tensor(folder: Path, keys: tuple[str, ...]) -> torch.Tensor | None:
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names = set(handle.keys())
                for key in keys:
                    if key in names:
                        return handle.get_tensor(key)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read {f} (truncated or damaged?): {exc}") from None
    return None


def _keep_file_lm_head(lm_head: nn.Module, embed: nn.Module, folder: Path, keys: tuple[str, ...],
                       index=None) -> None:
    """The published LLaVA checkpoints tie nothing, but a config may say `tie_word_embeddings: true`
    while the file holds its own `lm_head`. transformers 5.24 then keeps the file's head (with a warning);
    a version that ties anyway would silently drop it. If the head came out tied and the file's differs,
    use the file's. A lazy model (`index`: the checkpoint's headers) takes the file's head unread."""
    if index is not None:
        from exporter.streaming import tag_parameters

        key = next((k for k in keys if k in index), None)
        if lm_head.weight is embed.weight and key is not None:
            w = embed.weight
            lm_head.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
            tag_parameters(lm_head, index, lambda _: key, "LLaVA lm_head", folder, w.dtype)
        return
    if lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return
    stored = _file_tensor(folder, keys)
    if stored is None:
        return
    stored = stored.to(embed.weight.dtype)
    if tuple(stored.shape) != tuple(embed.weight.shape):
        raise DyVTEError(f"{folder}: lm_head has shape {list(stored.shape)}, expected {list(embed.weight.shape)}")
    if not torch.equal(stored, embed.weight.data):
        lm_head.weight = nn.Parameter(stored.clone(), requires_grad=False)


class LlavaParts:
    """The native pieces, kept so a model can be written back in either layout.

    `hf` is the `LlavaForConditionalGeneration` for the Hugging Face layout (the preset has one);
    `llm_base`/`lm_head` are the language model's `LlamaModel` and head in both cases.
    """

    def __init__(self, tower, projector, llm_base, lm_head, text_config, tokenizer, image_processor,
                 hf=None, chat_template: str | None = None, root_config: dict | None = None):
        self.tower, self.projector = tower, projector
        self.llm_base, self.lm_head, self.text_config = llm_base, lm_head, text_config
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.hf, self.chat_template, self.root_config = hf, chat_template, root_config or {}

    def projector_state(self) -> dict[str, torch.Tensor]:
        """Projector weights under the original code base's names (`0.*`, `2.*`)."""
        state = self.projector.state_dict()
        if any(k.startswith("linear_1.") for k in state):  # transformers' LlavaMultiModalProjector
            rename = {"linear_1.": "0.", "linear_2.": "2."}
            return {rename[k[:9]] + k[9:]: v for k, v in state.items()}
        return dict(state)

    def save(self, folder: Path) -> Path:
        """The Hugging Face layout as the `-hf` repositories publish it: weights under the published key
        names, `preprocessor_config.json`, `processor_config.json`, `chat_template.json`, tokenizer files."""
        if self.hf is None:
            raise DyVTEError("only a model built as LlavaForConditionalGeneration can be saved in the HF layout")
        folder = Path(folder)
        self.hf.save_pretrained(folder)
        index = folder / "model.safetensors.index.json"
        for f in weight_files(folder):
            tensors = load_file(str(f))
            save_file({published_key(k): v.contiguous() for k, v in tensors.items()}, str(f), metadata={"format": "pt"})
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {published_key(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data, indent=2))
        return self._save_processing(folder)

    def save_files(self, folder: Path) -> Path:
        """Everything of the HF layout but the weights: config, tokenizer, processor files, template."""
        if self.hf is None:
            raise DyVTEError("only a model built as LlavaForConditionalGeneration can be saved in the HF layout")
        self.hf.config.save_pretrained(folder)
        return self._save_processing(Path(folder))

    def published_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sub-folder -> {key in the published `-hf` layout: tensor} (meta tensors allowed)."""
        return {"": {published_key(k): v for k, v in self.hf.state_dict().items()}}

    def _save_processing(self, folder: Path) -> Path:
        cfg = self.hf.config
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        (folder / "processor_config.json").write_text(json.dumps({
            "image_token": IMAGE_PLACEHOLDER, "num_additional_image_tokens": 1,
            "patch_size": cfg.vision_config.patch_size, "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        }, indent=2))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}, indent=2))
        return folder

    def save_original(self, folder: Path, vision_tower_folder: Path, routers=None,
                      vision_tower_name: str = "openai/clip-vit-large-patch14-336") -> Path:
        """The original layout: one folder with the LM, projector and routers; the tower apart."""
        folder, vt = Path(folder), Path(vision_tower_folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.llm_base.state_dict().items()}
        tensors["lm_head.weight"] = self.lm_head.weight
        tensors.update({PROJECTOR_PREFIX + k: v for k, v in self.projector_state().items()})
        if routers is not None:
            tensors.update(routers.published_state_dict())
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        root = self.root_config
        if self.hf is not None:
            select_layer = self.hf.config.vision_feature_layer
            feature = "patch" if self.hf.config.vision_feature_select_strategy == "default" else "cls_patch"
        else:
            select_layer = root.get("mm_vision_select_layer", -2)
            feature = root.get("mm_vision_select_feature", "patch")
        if not isinstance(select_layer, int):
            raise DyVTEError("the original LLaVA layout selects one vision feature layer")
        kind = "mlp2x_gelu" if self.hf is not None else root.get("mm_projector_type", "mlp2x_gelu")
        config = self.text_config.to_dict()
        config.pop("dtype", None)
        config.update(
            model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], tie_word_embeddings=False,
            mm_vision_tower=vision_tower_name, mm_hidden_size=self.tower.config.hidden_size,
            mm_projector_type=kind, mm_vision_select_layer=select_layer, mm_vision_select_feature=feature,
            mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
            image_aspect_ratio="pad", use_mm_proj=True, torch_dtype="float32",
        )
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(folder)
        self.tower.save_pretrained(vt)
        self.image_processor.save_pretrained(vt)
        return folder


def _model(parts: LlavaParts, vision: nn.Module, spec: PromptSpec, source: dict) -> MultimodalModel:
    return assemble("llava", vision, parts.tokenizer, parts.image_processor, spec,
                    (parts.llm_base, parts.lm_head, parts.text_config), source, parts)


def _assemble_hf(hf: LlavaForConditionalGeneration, tokenizer, image_processor, chat_template: str,
                 image_token: str, source: dict) -> MultimodalModel:
    cfg = hf.config
    vcfg = cfg.vision_config
    if vcfg.model_type not in CLIP_TYPES:
        raise DyVTEError(f"unsupported LLaVA vision tower {vcfg.model_type!r}; LLaVA-1.5 uses CLIP (clip_vision_model)")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise DyVTEError(f"unsupported vision_feature_select_strategy {strategy!r} (supported: default, full)")
    layers = cfg.vision_feature_layer
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    drop_cls = strategy == "default"
    vision = LlavaVision(hf.model.vision_tower, hf.model.multi_modal_projector, layers, drop_cls)
    image_token_id = cfg.image_token_index
    if tokenizer(image_token, add_special_tokens=False)["input_ids"] != [image_token_id]:
        raise DyVTEError(
            f"the tokenizer does not map the image token {image_token!r} to image_token_index {image_token_id}"
        )
    spec = PromptSpec(
        template="chat_template",
        image_token_id=image_token_id,
        tokens_per_tile=clip_tokens(vcfg, drop_cls),
        chat_template=chat_template,
        image_marker=image_token,
        insertion="expand",
        expand_token=image_token,
        add_special_tokens=True,
        image_aspect_ratio="resize",
        stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
    )
    parts = LlavaParts(hf.model.vision_tower, hf.model.multi_modal_projector, hf.model.language_model,
                       hf.lm_head, cfg.text_config, tokenizer, image_processor, hf=hf, chat_template=chat_template)
    return _model(parts, vision, spec, source)


class Llava(Family):
    name = "llava"
    description = "LLaVA-1.5: CLIP ViT-L/336 + mlp2x_gelu projector + Vicuna (HF or original layout)"

    # ------------------------------------------------------------------ preset

    @seeded
    def preset(self, seed: int = 0, name: str = "tiny") -> MultimodalModel:
        p = PRESETS[name]
        tok = build_word_tokenizer()
        # a preset may give a larger vocabulary than the word tokenizer's (real shapes)
        text = preset_text_config(tok, LlamaConfig, **p["llm"])
        vision = CLIPVisionConfig(**p["vision"])
        side = vision.image_size // vision.patch_size
        cfg = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
            vision_feature_layer=p["vision_feature_layer"],
            vision_feature_select_strategy=p["vision_feature_select_strategy"],
            projector_hidden_act=p["projector_hidden_act"], image_seq_length=side * side,
            tie_word_embeddings=False,
        )
        hf = LlavaForConditionalGeneration(cfg).eval()
        size = vision.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        model = _assemble_hf(hf, tok, image_processor, PRESET_CHAT_TEMPLATE, IMAGE_PLACEHOLDER,
                             {"preset": name, "seed": seed})
        model.attach_routers(seeded_routers(text.num_hidden_layers, text.hidden_size, seed))
        return model

    # ------------------------------------------------------------------ load

    def load(self, checkpoint: Path, vision_tower: str | Path | None = None, template: str | None = None,
             dtype=torch.float32, lazy: bool = False, **_) -> MultimodalModel:
        """`lazy`: the weights stay on disk (meta tensors tagged with their files and keys, see
        `exporter.streaming`); vision parts under `EAGER_TOWER_BYTES` are read at once."""
        checkpoint = require_dir(Path(checkpoint), "LLaVA checkpoint")
        root = read_json(checkpoint / "config.json")
        if (checkpoint / "llm").is_dir() or "llm_cfg" in root:
            raise DyVTEError(f"{checkpoint} is a VILA checkpoint (it has an llm/ sub-folder); use --model vila")
        model_type = root.get("model_type")
        if model_type in HF_MODEL_TYPES:
            if vision_tower is not None or template is not None:
                raise DyVTEError(
                    "--vision-tower and --template apply to the original LLaVA layout; this Hugging Face "
                    "checkpoint holds its vision tower and brings its own chat template"
                )
            model = self._load_hf(checkpoint, dtype, lazy)
        elif model_type in ORIGINAL_MODEL_TYPES:
            model = self._load_original(checkpoint, root, vision_tower, template, dtype, lazy)
        else:
            raise DyVTEError(
                f"{checkpoint} is not a LLaVA-1.5 checkpoint (model_type {model_type!r}; expected 'llava' for "
                "the Hugging Face layout or 'llava_llama' for the original one)"
            )
        if has_router_weights(checkpoint):
            s = model.shape
            model.attach_routers(load_routers(checkpoint, s.num_layers, s.hidden_size))
        return model

    def _load_hf(self, checkpoint: Path, dtype, lazy: bool = False) -> MultimodalModel:
        index = None
        if lazy:
            from exporter.streaming import checkpoint_index, lazy_pretrained, make_real

            index = checkpoint_index(checkpoint)
            hf = lazy_pretrained(LlavaForConditionalGeneration, checkpoint, "LLaVA model", dtype, index=index)
            make_real(hf.model.vision_tower)
            make_real(hf.model.multi_modal_projector)
        else:
            hf = hf_from_pretrained(LlavaForConditionalGeneration, checkpoint, "LLaVA model", dtype)
        _keep_file_lm_head(hf.lm_head, hf.model.language_model.embed_tokens, checkpoint,
                           ("language_model.lm_head.weight", "lm_head.weight"), index)
        tokenizer = wrap_load_errors(f"tokenizer from {checkpoint}", AutoTokenizer.from_pretrained,
                                     str(checkpoint), local_files_only=True)
        image_processor = wrap_load_errors(f"image processor from {checkpoint}", AutoImageProcessor.from_pretrained,
                                           str(checkpoint), local_files_only=True)
        chat_template = read_chat_template(checkpoint, tokenizer)
        # LlavaProcessor's choice: the tokenizer's own image token, else processor_config.json's, else <image>
        proc_cfg = checkpoint / "processor_config.json"
        image_token = getattr(tokenizer, "image_token", None) or (
            read_json(proc_cfg).get("image_token") if proc_cfg.is_file() else None
        ) or IMAGE_PLACEHOLDER
        return _assemble_hf(hf, tokenizer, image_processor, chat_template, image_token,
                            {"checkpoint": str(checkpoint), "layout": "hf"})

    def _load_original(self, checkpoint: Path, root: dict, vision_tower, template: str | None,
                       dtype, lazy: bool = False) -> MultimodalModel:
        wanted = root.get("mm_vision_tower") or root.get("vision_tower") or "?"
        if vision_tower is None:
            raise DyVTEError(
                f"{checkpoint} is an original-layout LLaVA checkpoint without its vision tower "
                f"(config asks for {wanted!r}); pass --vision-tower DIR, a local CLIP vision model folder"
            )
        vt_dir = require_dir(Path(vision_tower), "LLaVA vision tower")
        if root.get("mm_use_im_start_end"):
            raise DyVTEError("mm_use_im_start_end=true checkpoints are not supported yet")
        if root.get("mm_patch_merge_type", "flat") != "flat" or root.get("image_aspect_ratio") == "anyres":
            raise DyVTEError("only LLaVA-1.5 (flat patch merge, no anyres tiling) is supported by --model llava")
        select_feature = root.get("mm_vision_select_feature", "patch")
        if select_feature not in ("patch", "cls_patch"):
            raise DyVTEError(f"unsupported mm_vision_select_feature {select_feature!r} (supported: patch, cls_patch)")
        vt_type = read_json(vt_dir / "config.json").get("model_type")
        if vt_type not in CLIP_TYPES:
            raise DyVTEError(f"{vt_dir} holds a {vt_type!r} model; the LLaVA-1.5 vision tower is a CLIP model")

        text_config = wrap_load_errors(
            f"language model config from {checkpoint}", LlamaConfig.from_dict,
            {k: v for k, v in root.items() if k not in ("model_type", "architectures")},
        )
        index = None
        if lazy:
            from exporter.streaming import checkpoint_index, lazy_pretrained, make_real

            index = checkpoint_index(checkpoint)
            llm = lazy_pretrained(LlamaForCausalLM, checkpoint, "LLaVA language model", dtype, config=text_config,
                                  index=index)
            tower = make_real(lazy_pretrained(CLIPVisionModel, vt_dir, "LLaVA vision tower", dtype))
        else:
            llm = hf_from_pretrained(LlamaForCausalLM, checkpoint, "LLaVA language model", dtype, config=text_config)
            tower = hf_from_pretrained(CLIPVisionModel, vt_dir, "LLaVA vision tower", dtype)
        _keep_file_lm_head(llm.lm_head, llm.model.embed_tokens, checkpoint, ("lm_head.weight",), index)
        mm_hidden = config_int(root, "mm_hidden_size", tower.config.hidden_size, f"{checkpoint}/config.json", 1)
        if mm_hidden != tower.config.hidden_size:
            raise DyVTEError(
                f"the vision tower at {vt_dir} has hidden size {tower.config.hidden_size}; the checkpoint's "
                f"projector expects mm_hidden_size {mm_hidden} ({wanted!r})"
            )
        projector = original_projector(root.get("mm_projector_type", "linear"), mm_hidden, text_config.hidden_size)
        load_into(projector, load_safetensors(checkpoint, PROJECTOR_PREFIX), f"LLaVA projector in {checkpoint}")
        projector = projector.to(dtype).eval()

        image_processor = wrap_load_errors(f"image processor from {vt_dir}", AutoImageProcessor.from_pretrained,
                                           str(vt_dir), local_files_only=True)
        tokenizer = wrap_load_errors(f"tokenizer from {checkpoint}", AutoTokenizer.from_pretrained,
                                     str(checkpoint), local_files_only=True)
        conv = get_template(template or "vicuna_v1")
        drop_cls = select_feature == "patch"
        depth = tower.config.num_hidden_layers
        select_layer = config_int(root, "mm_vision_select_layer", -2, f"{checkpoint}/config.json", -depth - 1, depth)
        vision = LlavaVision(tower, projector, (select_layer,), drop_cls)
        spec = PromptSpec(
            template=f"conversation:{conv.name}",
            image_token_id=LLAVA_IMAGE_TOKEN_INDEX,
            tokens_per_tile=clip_tokens(tower.config, drop_cls),
            insertion="splice",
            image_aspect_ratio=root.get("image_aspect_ratio") or "resize",
            stop_token_ids=stop_token_ids(tokenizer, conv),
        )
        parts = LlavaParts(tower, projector, llm.model, llm.lm_head, llm.config, tokenizer, image_processor,
                           root_config=root)
        parts.llm = llm
        return _model(parts, vision, spec, {"checkpoint": str(checkpoint), "layout": "original",
                                            "vision_tower": str(vt_dir)})
