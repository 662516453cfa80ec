import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.manual_seed(0)

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
