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
