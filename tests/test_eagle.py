"""Eagle adapter: the mixture it assembles equals Eagle's computation written out by hand, and a
folder in Eagle's native layout (written here from scratch, with the authors' key names) loads."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from engines.backends.torch_backend import TorchBackend
from engines.orchestrator import Runtime
from exporter.dyvte.router import seeded_routers
from engines.core.errors import DyVTEError
from exporter.models import get_family, load_model
from exporter.models.eagle import Eagle
from exporter.models.tokenizer import build_word_tokenizer
from helpers import random_image, recompute_logits, splice

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
QUESTION = "what color is the big circle?"


def first_logits(model, prompt, policy="none"):
    return Runtime(TorchBackend(model), model.processor).generate([prompt], policy)[0].first_logits


def eagle_resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Eagle resizes images and feature maps with bilinear interpolation, align_corners=True."""
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=True)


def eagle_clip(tower: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """Eagle's HR-CLIP forward: embeddings, CLS dropped, pre-layernorm, every encoder layer -> [N, C, s, s]."""
    x = tower.embeddings(pixels)[:, 1:]
    x = tower.encoder(inputs_embeds=tower.pre_layrnorm(x)).last_hidden_state
    side = int(x.shape[1] ** 0.5)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def timm_convnext(t: dict, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """timm's ConvNeXt as Eagle's convnext_xxlarge runs it (patch stem, LayerNorm2d, channels-last
    blocks with layer scale `weight`, LayerNorm2d + 2x2 conv down-sampling), written straight from
    the checkpoint's tensors under their Eagle names -> the last stage's map [N, C, h, w]."""

    def ln2d(x, name):
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), t[f"{name}.weight"], t[f"{name}.bias"], eps)
        return y.permute(0, 3, 1, 2)

    patch = t["stem.0.weight"].shape[-1]
    x = ln2d(F.conv2d(x, t["stem.0.weight"], t["stem.0.bias"], stride=patch), "stem.1")
    s = 0
    while f"stages.{s}.blocks.0.conv_dw.weight" in t:
        if f"stages.{s}.downsample.1.weight" in t:
            x = ln2d(x, f"stages.{s}.downsample.0")
            x = F.conv2d(x, t[f"stages.{s}.downsample.1.weight"], t[f"stages.{s}.downsample.1.bias"], stride=2)
        b = 0
        while f"stages.{s}.blocks.{b}.conv_dw.weight" in t:
            p = f"stages.{s}.blocks.{b}"
            y = F.conv2d(x, t[f"{p}.conv_dw.weight"], t[f"{p}.conv_dw.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), t[f"{p}.norm.weight"], t[f"{p}.norm.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, t[f"{p}.mlp.fc1.weight"], t[f"{p}.mlp.fc1.bias"])),
                         t[f"{p}.mlp.fc2.weight"], t[f"{p}.mlp.fc2.bias"])
            x = x + y.permute(0, 3, 1, 2) * t[f"{p}.weight"].reshape(1, -1, 1, 1)
            b += 1
        s += 1
    return x


def projector_by_hand(feats, w0, b0, w2, b2):
    return F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)


def flat(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- the preset


@pytest.fixture(scope="module")
def preset():
    return Eagle().preset(seed=3)


def test_none_policy_logits_equal_parts_assembled_by_hand(preset):
    parts = preset.native
    prompt = preset.processor.build(QUESTION, random_image(1))
    clip, convnext = parts.expert("clip-448").tower, parts.expert("convnext-1024").tower
    proj = parts.projector.layers
    with torch.no_grad():
        pixels = prompt.pixel_values  # [1, 3, 128, 128]: the mixture's input size
        clip_map = eagle_resize(eagle_clip(clip, eagle_resize(pixels, 42)), 4)  # 42 px -> 3x3 -> 4x4
        conv_map = convnext(pixel_values=pixels).last_hidden_state  # 128 px / 32 -> 4x4, no resize
        feats = torch.cat([flat(clip_map), flat(conv_map)], dim=-1)
        visual = projector_by_hand(feats, proj[0].weight, proj[0].bias, proj[2].weight, proj[2].bias)[0]
        embeds = splice(parts.llm.model.embed_tokens, prompt.input_ids, prompt.visual_span, visual)
        reference = parts.llm(inputs_embeds=embeds).logits[0, -1]
    assert clip_map.shape == (1, 128, 4, 4) and conv_map.shape == (1, 48, 4, 4)
    ours = first_logits(preset, prompt)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert prompt.num_visual == 16  # the 4x4 common grid


@pytest.mark.parametrize("exit_layer", [0, 2])
def test_static_exit_equals_recompute_without_visual_tokens(preset, exit_layer):
    prompt = preset.processor.build(QUESTION, random_image(2))
    visual = preset.encode_images(prompt.pixel_values)
    llm = preset.native.llm
    embeds = splice(llm.model.embed_tokens, prompt.input_ids, prompt.visual_span, visual)
    reference = recompute_logits(llm.model, llm.lm_head, embeds, prompt.visual_span, exit_layer)[0, -1]
    ours = first_logits(preset, prompt, f"layer:{exit_layer}")
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - first_logits(preset, prompt)).abs().max() > 1e-3  # the exit changed something


def test_prompt_is_vicuna_with_image_spliced(preset):
    prompt = preset.processor.build("how many circle?", random_image(2))
    s, e = prompt.visual_span
    assert e - s == 16 and set(prompt.input_ids[s:e]) == {-200}
    tok = preset.processor.tokenizer
    assert tok.decode(prompt.input_ids[:s]) == (
        "<s> a chat between a curious user and an artificial intelligence assistant . the assistant "
        "gives helpful , detailed , and polite answers to the user ' s questions . user :"
    )
    assert tok.decode(prompt.input_ids[e:]) == "how many circle ? assistant :"
    assert preset.processor.spec.image_aspect_ratio == "pad"


def eagle_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Eagle's `pad` preprocessing: centre on a square of the mean colour (int(255 * mean), as its
    expand2square), bicubic resize of the shortest edge, centre crop, OpenAI-CLIP mean/std."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    resized = np.asarray(canvas.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    return torch.tensor(((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1), dtype=torch.float32)


@pytest.mark.parametrize("size", [(60, 60), (60, 40), (30, 50)])
def test_image_processor_is_eagles_clip_preprocessing(preset, size):
    image = random_image(5, size=size)
    got = preset.processor.transform(image)
    assert got.shape == (1, 3, 128, 128)
    torch.testing.assert_close(got[0], eagle_pixels(image, 128), rtol=0, atol=1e-5)


def test_vision_module_exports_without_data_dependent_branches(preset):
    pixels = torch.randn(2, 3, 128, 128)
    program = torch.export.export(preset.vision, (pixels,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(pixels), preset.vision(pixels), rtol=0, atol=1e-6)
        assert preset.vision(pixels).shape == (2, 16, 64)


def test_registry_has_eagle_with_seeded_routers():
    assert get_family("eagle").name == "eagle"
    model = load_model("eagle")
    assert model.family == "eagle" and model.routers is not None and len(model.routers) == 4
    reference = seeded_routers(4, 64, 0)
    torch.testing.assert_close(model.routers.layers[1].w1.weight, reference.layers[1].w1.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the native layout

TOWER0 = "model.vision_tower.vision_towers.0.vision_tower."
TOWER1 = "model.vision_tower.vision_towers.1.vision_tower."


def timm_convnext_tensors(gen, dims, depths, patch=4, head_classes=10):
    """Random weights of a timm ConvNeXt under timm's names (what Eagle's checkpoints hold)."""

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen)

    t = {"stem.0.weight": rnd(dims[0], 3, patch, patch, scale=0.3), "stem.0.bias": rnd(dims[0], scale=0.2),
         "stem.1.weight": 1 + rnd(dims[0], scale=0.2), "stem.1.bias": rnd(dims[0], scale=0.2)}
    for s, (d, depth) in enumerate(zip(dims, depths)):
        if s:
            t[f"stages.{s}.downsample.0.weight"] = 1 + rnd(dims[s - 1], scale=0.2)
            t[f"stages.{s}.downsample.0.bias"] = rnd(dims[s - 1], scale=0.2)
            t[f"stages.{s}.downsample.1.weight"] = rnd(d, dims[s - 1], 2, 2, scale=(4 * dims[s - 1]) ** -0.5)
            t[f"stages.{s}.downsample.1.bias"] = rnd(d, scale=0.1)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}"
            t.update({
                f"{p}.conv_dw.weight": rnd(d, 1, 7, 7, scale=1 / 7), f"{p}.conv_dw.bias": rnd(d, scale=0.1),
                f"{p}.norm.weight": 1 + rnd(d, scale=0.2), f"{p}.norm.bias": rnd(d, scale=0.2),
                f"{p}.mlp.fc1.weight": rnd(4 * d, d, scale=d ** -0.5), f"{p}.mlp.fc1.bias": rnd(4 * d, scale=0.1),
                f"{p}.mlp.fc2.weight": rnd(d, 4 * d, scale=(4 * d) ** -0.5), f"{p}.mlp.fc2.bias": rnd(d, scale=0.1),
                f"{p}.weight": rnd(d, scale=0.5),
            })
    # the classifier head Eagle never uses, but its checkpoints carry
    t.update({"head.norm.weight": 1 + rnd(dims[-1], scale=0.2), "head.norm.bias": rnd(dims[-1], scale=0.2),
              "head.fc.weight": rnd(head_classes, dims[-1], scale=0.1), "head.fc.bias": torch.zeros(head_classes)})
    return t


def write_native_folder(folder, seed, clip_size, dims, depths, extension):
    """A tiny Eagle folder written here from scratch (not by the adapter), with Eagle's key names:
    a CLIP expert (patch 14, `clip_size` px), a timm ConvNeXt expert, mlp2x_gelu, Llama, routers.
    `extension`: the dyvte_export input size / grid of tiny folders, or None for Eagle's constants."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = build_word_tokenizer()
    llm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm = LlamaForCausalLM(llm_cfg).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=1, image_size=clip_size, patch_size=14,
                                            hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    convnext = timm_convnext_tensors(gen, dims=dims, depths=depths)
    mm_hidden = 64 + dims[-1]
    proj = {"0.weight": 0.1 * torch.randn(64, mm_hidden, generator=gen), "0.bias": 0.1 * torch.randn(64, generator=gen),
            "2.weight": 0.1 * torch.randn(64, 64, generator=gen), "2.bias": 0.1 * torch.randn(64, generator=gen)}
    routers = seeded_routers(3, 64, seed=4, inner=32)

    tensors = {f"model.{k}": v for k, v in llm.model.state_dict().items()}
    tensors["lm_head.weight"] = llm.lm_head.weight
    # transformers 4.x (Eagle's) CLIPVisionModel keeps its weights under `vision_model.`
    tensors.update({f"{TOWER0}vision_model.{k}": v for k, v in clip.state_dict().items()})
    positions = (clip_size // 14) ** 2 + 1
    tensors[f"{TOWER0}vision_model.embeddings.position_ids"] = torch.arange(positions)[None]  # a 4.x buffer
    tensors.update({f"{TOWER1}{k}": v for k, v in convnext.items()})
    tensors.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    tensors.update(routers.published_state_dict())
    half = sorted(tensors)[: len(tensors) // 2]  # two shards with an index, as published checkpoints come
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in half},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in half}}
    for name, part in shards.items():
        save_file({k: v.detach().contiguous() for k, v in part.items()}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    config = {k: v for k, v in llm_cfg.to_dict().items() if k != "model_type"}
    config.update({
        "model_type": "eagle_llama", "architectures": ["EagleLlamaForCausalLM"],
        "mm_vision_tower": "clip-448;convnext-1024", "mm_hidden_size": mm_hidden,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        # fields Eagle's (transformers 4.37) configs carry besides the Llama ones
        "mm_patch_merge_type": "flat", "mm_projector_lr": None, "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "rope_scaling": None, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.37.2", "_name_or_path": "Eagle-tiny",
    })
    if extension is not None:
        config["dyvte_export"] = extension
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)
    return dict(folder=folder, llm=llm, clip=clip, convnext=convnext, proj=proj, routers=routers)


def eagle_by_hand(native, pixels, clip_size, grid):
    """Eagle's mixture + projector on the folder's own tensors: visual embeddings [V, hidden]."""
    p = native["proj"]
    with torch.no_grad():
        clip_map = eagle_resize(eagle_clip(native["clip"], eagle_resize(pixels, clip_size)), grid)
        conv_map = timm_convnext(native["convnext"], pixels)  # the input size / 32 = the grid
        assert conv_map.shape[-1] == grid
        feats = torch.cat([flat(clip_map), flat(conv_map)], dim=-1)
        return projector_by_hand(feats, p["0.weight"], p["0.bias"], p["2.weight"], p["2.bias"])[0]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """96 px input, CLIP at 28 px (2x2 grid, up-sampled to 3x3) + ConvNeXt at 96 px (3x3)."""
    return write_native_folder(tmp_path_factory.mktemp("eagle") / "eagle-tiny", seed=17, clip_size=28,
                               dims=[8, 16, 24, 32], depths=[2, 1, 1, 1],
                               extension={"input_image_size": 96, "grid_size": 3})


@pytest.fixture(scope="module")
def native_model(native):
    return Eagle().load(native["folder"])


def native_copy(native, tmp_path):
    import shutil

    return shutil.copytree(native["folder"], tmp_path / "eagle")


def test_native_folder_has_eagles_key_names(native):
    keys = set()
    for f in native["folder"].glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            keys |= set(handle.keys())
    assert {
        "model.vision_tower.vision_towers.0.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.vision_towers.0.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "model.vision_tower.vision_towers.1.vision_tower.stem.0.weight",
        "model.vision_tower.vision_towers.1.vision_tower.stages.1.downsample.1.weight",
        "model.vision_tower.vision_towers.1.vision_tower.stages.0.blocks.1.mlp.fc1.weight",
        "model.vision_tower.vision_towers.1.vision_tower.stages.0.blocks.0.weight",
        "model.mm_projector.0.weight", "model.mm_projector.2.bias",
        "model.visual_gates_router.2.w1.weight", "model.embed_tokens.weight", "lm_head.weight",
    } <= keys


def test_native_folder_loads_and_equals_eagle_by_hand(native, native_model):
    model = native_model
    prompt = model.processor.build(QUESTION, random_image(3))
    assert prompt.pixel_values.shape == (1, 3, 96, 96) and prompt.num_visual == 9
    visual = eagle_by_hand(native, prompt.pixel_values, clip_size=28, grid=3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(prompt.pixel_values), visual, rtol=0, atol=1e-5)
        embeds = splice(native["llm"].model.embed_tokens, prompt.input_ids, prompt.visual_span, visual)
        reference = native["llm"](inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(first_logits(model, prompt), reference, rtol=0, atol=1e-5)
    # the routers inside the folder are attached as they are
    assert model.routers is not None and model.routers.inner == 32
    for mine, theirs in zip(model.routers.layers, native["routers"].layers):
        torch.testing.assert_close(mine.w1.weight, theirs.w1.weight, rtol=0, atol=0)
        torch.testing.assert_close(mine.w2.weight, theirs.w2.weight, rtol=0, atol=0)


def test_folder_without_extension_runs_at_eagles_sizes(tmp_path):
    """Without the dyvte_export sizes a folder is read with Eagle's constants: 1024 px input, the CLIP
    expert at 336 px (24x24, up-sampled), ConvNeXt at 1024 px (32x32): 1024 visual tokens."""
    native = write_native_folder(tmp_path / "eagle-1024", seed=5, clip_size=336, dims=[8, 8, 8, 16],
                                 depths=[1, 1, 1, 1], extension=None)
    model = Eagle().load(native["folder"])
    prompt = model.processor.build("describe the picture", random_image(6, size=(300, 200)))
    assert prompt.pixel_values.shape == (1, 3, 1024, 1024) and prompt.num_visual == 1024
    visual = eagle_by_hand(native, prompt.pixel_values, clip_size=336, grid=32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(prompt.pixel_values), visual, rtol=0, atol=1e-5)
        embeds = splice(native["llm"].model.embed_tokens, prompt.input_ids, prompt.visual_span, visual)
        reference = native["llm"](inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(first_logits(model, prompt), reference, rtol=0, atol=1e-5)


def test_clip_table_other_than_336_px_is_refused_without_extension(native, tmp_path):
    folder = native_copy(native, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["dyvte_export"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DyVTEError, match="position table is for 28 px"):
        Eagle().load(folder)


def test_convnext_expert_uses_timms_layernorm_eps(native, native_model):
    """At small activations LayerNorm's eps shows: the expert must follow timm's 1e-5, not
    transformers' built-in 1e-6 (the check below fails for the latter)."""
    expert = native_model.native.expert("convnext-1024")
    pixels = 1e-3 * torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = expert(pixels)
        timm = timm_convnext(native["convnext"], pixels, eps=1e-5)
        wrong = timm_convnext(native["convnext"], pixels, eps=1e-6)
    error = (ours - timm).abs().max().item()
    assert error < 1e-5
    assert (wrong - timm).abs().max().item() > 100 * max(error, 1e-7)


def test_preset_round_trips_through_the_native_layout(preset, tmp_path):
    folder = preset.native.save(tmp_path / "eagle", routers=preset.routers)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{TOWER1}stem.1.bias" in keys and f"{TOWER1}stages.2.blocks.1.conv_dw.weight" in keys
    assert f"{TOWER0}vision_model.post_layernorm.weight" in keys
    loaded = Eagle().load(folder)
    prompt = preset.processor.build("what shape?", random_image(4))
    torch.testing.assert_close(first_logits(loaded, prompt), first_logits(preset, prompt), rtol=0, atol=0)
    torch.testing.assert_close(loaded.routers.layers[3].w2.weight, preset.routers.layers[3].w2.weight,
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("expert", ["sam-1024", "det-1024", "pix2struct-1024"])
def test_unsupported_expert_is_named(native, tmp_path, expert):
    folder = native_copy(native, tmp_path)
    edit_config(folder, mm_vision_tower=f"clip-448;convnext-1024;{expert}")
    with pytest.raises(DyVTEError, match=f"expert '{expert}'.*not supported"):
        Eagle().load(folder)


@pytest.mark.parametrize("spec,message", [
    ("openai/clip-vit-large-patch14-336", "not an Eagle mixture"),
    ("clip-448;convnext-512", "unknown Eagle vision expert 'convnext-512'"),
    ("clip-448;clip-448", "needs the convnext-1024 expert|names an expert twice"),
])
def test_bad_mixture_spec_is_refused(native, tmp_path, spec, message):
    folder = native_copy(native, tmp_path)
    edit_config(folder, mm_vision_tower=spec)
    with pytest.raises(DyVTEError, match=message):
        Eagle().load(folder)


def test_truncated_weights_are_reported(native, tmp_path):
    folder = native_copy(native, tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DyVTEError, match="truncated or damaged"):
        Eagle().load(folder)


@pytest.mark.parametrize("key", [
    f"{TOWER1}stages.2.blocks.0.mlp.fc2.weight",
    f"{TOWER1}stages.0.blocks.1.weight",
    f"{TOWER1}stem.0.weight",
    f"{TOWER0}vision_model.encoder.layers.1.self_attn.q_proj.weight",
    f"{TOWER0}vision_model.pre_layrnorm.bias",
])
def test_missing_encoder_weight_is_named(native, tmp_path, key):
    folder = native_copy(native, tmp_path)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if key in tensors:
            del tensors[key]
            save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(key)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DyVTEError, match=key.replace(".", r"\.")):
        Eagle().load(folder)


def test_missing_language_model_weight_is_named(native, tmp_path):
    folder = native_copy(native, tmp_path)
    shard = next(f for f in sorted(folder.glob("*.safetensors"))
                 if "model.layers.1.mlp.up_proj.weight" in load_file(f))
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard)
    with pytest.raises(DyVTEError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Eagle().load(folder)


def test_not_an_eagle_folder(native, tmp_path):
    folder = native_copy(native, tmp_path)
    edit_config(folder, model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"])
    with pytest.raises(DyVTEError, match="not an Eagle checkpoint"):
        Eagle().load(folder)
