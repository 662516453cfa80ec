"""Router files in the published layout: round trip, and refusal of weights that do not fit."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exporter.dyvte.router import Routers, load_routers, save_routers
from engines.core.errors import DyVTEError


def test_save_writes_published_keys_and_load_round_trips(tmp_path):
    torch.manual_seed(0)
    routers = Routers(3, 8, inner=2048)
    path = save_routers(routers, tmp_path / "routers.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("model.visual_gates_router.2.w1.weight").shape) == (2048, 16)
        assert tuple(f.get_tensor("model.visual_gates_router.2.w2.weight").shape) == (2, 2048)
    assert keys == {f"model.visual_gates_router.{i}.{w}.weight" for i in range(3) for w in ("w1", "w2")}
    loaded = load_routers(path, 3, 8)
    x = torch.randn(4, 16)
    for layer in range(3):
        torch.testing.assert_close(loaded(layer, x), routers(layer, x), rtol=0, atol=0)


def test_router_is_linear_gelu_linear_without_bias():
    routers = Routers(1, 4, inner=6)
    x = torch.randn(2, 8)
    r = routers.layers[0]
    expected = torch.nn.functional.gelu(x @ r.w1.weight.T) @ r.w2.weight.T
    torch.testing.assert_close(routers(0, x), expected)
    assert r.w1.bias is None and r.w2.bias is None


def test_routers_load_from_a_checkpoint_folder_among_other_weights(tmp_path):
    routers = Routers(2, 4, inner=16)
    tensors = dict(routers.published_state_dict())
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"))
    loaded = load_routers(tmp_path, 2, 4)
    torch.testing.assert_close(loaded.layers[1].w2.weight, routers.layers[1].w2.weight)


def test_wrong_hidden_size_names_expected_and_found_shapes(tmp_path):
    path = save_routers(Routers(2, 8, inner=32), tmp_path / "r.safetensors")
    with pytest.raises(DyVTEError, match=r"w1.weight .* has shape \[32, 16\], expected \[32, 12\] for hidden size 6"):
        load_routers(path, 2, 6)


def test_wrong_layer_count_is_refused(tmp_path):
    path = save_routers(Routers(3, 8, inner=32), tmp_path / "r.safetensors")
    with pytest.raises(DyVTEError, match=r"3 routers\); the model has 4 decoder layers"):
        load_routers(path, 4, 8)


def test_file_without_router_keys_and_damaged_file_are_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DyVTEError, match="holds no router weights"):
        load_routers(tmp_path / "other.safetensors", 2, 4)
    damaged = tmp_path / "damaged.safetensors"
    good = save_routers(Routers(2, 4, inner=8), tmp_path / "good.safetensors").read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    with pytest.raises(DyVTEError, match="cannot read router weights"):
        load_routers(damaged, 2, 4)
