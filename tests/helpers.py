"""Test helpers importable from any test module (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import torch


def make_model(config, seed: int = 0, gamma: float = 0.7):
    """A randomly initialised model in eval mode, with the attention gate opened (it starts at 0, which
    would hide the attention branch from every comparison) and non-trivial BatchNorm statistics."""
    from dagan.model import DaGAN

    torch.manual_seed(seed)
    model = DaGAN(config)
    with torch.no_grad():
        if model.generator.attention is not None:
            model.generator.attention.gamma.fill_(gamma)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model.eval()
