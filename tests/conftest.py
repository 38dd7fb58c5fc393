"""Shared fixtures. Everything here is made by the tests themselves; nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import make_model

os.environ.setdefault("GLOG_minloglevel", "2")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_config():
    from dagan.config import load_config

    return load_config("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    return make_model(tiny_config)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def grace_hopper() -> np.ndarray:
    import matplotlib.cbook as cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module", name="engine")
def tiny_engine():
    """A PyTorch engine over a random tiny model, one per test module (the server, WebRTC and virtual
    camera tests share it; tests/test_engine.py defines its own per-test ``engine``)."""
    from dagan.config import load_config
    from engine.torch_backend import TorchEngine

    return TorchEngine(make_model(load_config("tiny")), device="cpu")


@pytest.fixture(scope="session")
def astronaut_jpeg(astronaut) -> bytes:
    """The astronaut portrait as JPEG bytes, the way a browser uploads a photo."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()
