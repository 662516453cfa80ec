"""VILA adapter: the parts it assembles equal VILA's own computation, and its folder layout loads."""

import json

import pytest
import torch
from safetensors import safe_open

from engines.backends.torch_backend import TorchBackend
from engines.orchestrator import Runtime
from engines.core.errors import DyVTEError
from exporter.models.vila import SquareMerge, Vila, VilaProjector
from helpers import random_image, splice


def flat_square_as_vila_writes_it(x: torch.Tensor) -> torch.Tensor:
    """VILA's DownSampleBlock, step by step: [n, T, c] -> [n, T/4 (padded), 4c]."""
    n, t, c = x.shape
    side = int(t ** 0.5)
    x = x.reshape(n, side, side, c)
    if side % 2 == 1:
        x = torch.cat([x, torch.zeros(n, 1, side, c)], dim=1)
        x = torch.cat([x, torch.zeros(n, side + 1, 1, c)], dim=2)
    n, w, h, c = x.shape
    x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, c * 4)


@pytest.mark.parametrize("side", [27, 9, 4])
def test_downsampling_pads_odd_grid_like_vila(side):
    x = torch.randn(2, side * side, 5)
    ours = SquareMerge(2)(x)
    assert ours.shape == (2, ((side + 1) // 2) ** 2, 20)
    torch.testing.assert_close(ours, flat_square_as_vila_writes_it(x), rtol=0, atol=0)


def test_siglip_27x27_grid_gives_196_visual_tokens():
    projector = VilaProjector("mlp_downsample", 16, 32)
    assert projector(torch.randn(1, 27 * 27, 16)).shape == (1, 196, 32)


def test_none_policy_logits_equal_parts_assembled_by_hand():
    model = Vila().preset(seed=3)
    parts = model.native
    prompt = model.processor.build("what color is the big circle?", random_image(1))
    with torch.no_grad():
        feats = parts.tower(pixel_values=prompt.pixel_values, output_hidden_states=True).hidden_states[-2]
        visual = parts.projector.layers[1:](flat_square_as_vila_writes_it(feats))[0]
        embeds = splice(parts.llm.model.embed_tokens, prompt.input_ids, prompt.visual_span, visual)
        reference = parts.llm(inputs_embeds=embeds).logits[0, -1]
    ours = Runtime(TorchBackend(model), model.processor).generate([prompt], "none")[0].first_logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert prompt.num_visual == 25  # 54 px / patch 6 = 9x9 grid, padded to 10x10, merged 2x2


def test_prompt_follows_vicuna_template_with_image_spliced():
    model = Vila().preset()
    prompt = model.processor.build("how many zebras?", random_image(2))
    s, e = prompt.visual_span
    assert set(prompt.input_ids[s:e]) == {-200}
    tok = model.processor.tokenizer
    assert tok.decode(prompt.input_ids[:s]) == (
        "<s> a chat between a curious user and an artificial intelligence assistant . the assistant "
        "gives helpful , detailed , and polite answers to the user ' s questions . user :"
    )
    assert tok.decode(prompt.input_ids[e:]) == "how many <unk> ? assistant :"

def test_native_folder_layout_round_trips(tmp_path):
    model = Vila().preset(seed=5)
    folder = model.native.save(tmp_path / "vila")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "llm", "vision_tower", "mm_projector"}
    with safe_open(str(folder / "mm_projector" / "model.safetensors"), "pt") as f:
        assert {"layers.1.weight", "layers.2.weight", "layers.4.weight"} <= set(f.keys())
    assert json.loads((folder / "mm_projector" / "config.json").read_text())["mm_projector_type"] == "mlp_downsample"
    loaded = Vila().load(folder)
    prompt = model.processor.build("what shape?", random_image(3))
    a = Runtime(TorchBackend(model), model.processor).generate([prompt], "none")[0].first_logits
    b = Runtime(TorchBackend(loaded), loaded.processor).generate([prompt], "none")[0].first_logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_projector_weight_is_named(tmp_path):
    folder = Vila().preset().native.save(tmp_path / "vila")
    from safetensors.torch import load_file, save_file

    f = folder / "mm_projector" / "model.safetensors"
    tensors = load_file(f)
    del tensors["layers.4.weight"]
    save_file(tensors, f)
    with pytest.raises(DyVTEError, match="layers.4.weight"):
        Vila().load(folder)
