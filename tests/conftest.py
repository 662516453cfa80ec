import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.manual_seed(0)
# Tiny models: one thread is fastest, and two xdist workers with two OpenMP threads each on a
# 2-core CI machine would spin against each other.
torch.set_num_threads(1)

from helpers import random_image  # noqa: E402


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "image.png"
    random_image(7).save(path)
    return path


@pytest.fixture(scope="session")
def vila_checkpoint(tmp_path_factory):
    """A tiny VILA checkpoint folder in VILA's native layout (llm/, vision_tower/, mm_projector/)."""
    from exporter.models.vila import Vila

    return Vila().preset(seed=2).native.save(tmp_path_factory.mktemp("ckpt") / "vila-tiny")


@pytest.fixture
def vila_copy(vila_checkpoint, tmp_path):
    """A private copy of the tiny VILA checkpoint that a test may damage."""
    import shutil

    return Path(shutil.copytree(vila_checkpoint, tmp_path / "vila"))


QUESTIONS = ["what color is the circle?", "how many stars are there?", "is there a red square?",
             "where is the triangle?", "what shape is at the top left?", "is the star big?"]
TARGET_EXITS = [0, 1, None, 2, 1, 0]


def sample_pairs(indices=range(6)) -> list[tuple[str, object]]:
    """(question, image) of the samples `sample_prompts` prepares, sample i exiting at TARGET_EXITS[i]."""
    return [(QUESTIONS[i % len(QUESTIONS)], random_image(100 + i)) for i in indices]


def sample_prompts(runtime, n=6):
    return [runtime.prepare(question, image) for question, image in sample_pairs(range(n))]


def model_with_exits(model):
    """`model` with routers fitted so that `sample_prompts` exit at TARGET_EXITS."""
    from engines.backends.torch_backend import TorchBackend
    from engines.orchestrator import Runtime
    from helpers import routers_with_exits

    runtime = Runtime(TorchBackend(model), model.processor)
    model.attach_routers(routers_with_exits(runtime, sample_prompts(runtime), TARGET_EXITS))
    return model


@pytest.fixture(scope="session")
def vila_exit_model():
    from exporter.models.vila import Vila

    return model_with_exits(Vila().preset(seed=11))


@pytest.fixture(scope="session")
def vila_package(vila_exit_model, tmp_path_factory):
    """fp32 package of the tiny VILA, every layer a possible exit."""
    from exporter.package import export_onnx

    return export_onnx(vila_exit_model, tmp_path_factory.mktemp("pkg") / "vila", "fp32", progress=False)


@pytest.fixture(scope="session")
def vila_package_fp16(vila_exit_model, tmp_path_factory):
    from exporter.package import export_onnx

    return export_onnx(vila_exit_model, tmp_path_factory.mktemp("pkg16") / "vila", "fp16", progress=False)


@pytest.fixture(scope="session")
def vila_exit_checkpoint(vila_exit_model, tmp_path_factory):
    """`vila_exit_model` on disk as `--checkpoint` (VILA's native layout) and `--routers` (its fitted
    routers) take it: (checkpoint folder, routers file)."""
    from exporter.dyvte.router import save_routers

    folder = vila_exit_model.native.save(tmp_path_factory.mktemp("ckpt-exit") / "vila")
    return folder, save_routers(vila_exit_model.routers, folder.parent / "fitted-routers.safetensors")


@pytest.fixture(scope="session")
def vila_package_no_routers(tmp_path_factory):
    """A package of a tiny VILA without routers, exits possible after layer 1 only (policy `layer:1`)."""
    from exporter.models.vila import Vila
    from exporter.package import export_onnx
    from exporter.plan import SplitPlan

    model = Vila().preset(seed=4)
    model.routers = None
    package = export_onnx(model, tmp_path_factory.mktemp("pkg-norouters") / "win", plan=SplitPlan.parse("1:1", 4),
                          progress=False)
    return package, model
