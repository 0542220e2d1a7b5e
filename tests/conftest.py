import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def config_path():
    return lambda name: str(CONFIGS / f"{name}.py")
