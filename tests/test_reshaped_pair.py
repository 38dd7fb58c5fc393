"""The reshaped-pair training term (``dagan.weights.reshaped_pair``): a face of another shape driven by
this face's motion, scored against the same warp of the driving frame."""

from __future__ import annotations

import pytest
import torch

from dagan.config import ConfigError
from training.config import load_train_config
from training.distributed import DistInfo
from training.stage_dagan import DaganStage, GeneratorObjective


def _objective(**overrides: object) -> tuple[GeneratorObjective, int]:
    cfg = load_train_config(
        None,
        {
            "model": "tiny",
            "data.workers": 0,
            "dagan.weights.gan": 0.0,
            "dagan.weights.feature_matching": 0.0,
            "dagan.weights.reshaped_pair": 2.0,
            **overrides,
        },
    )
    stage = DaganStage(cfg, torch.device("cpu"), DistInfo(), None)
    objective = GeneratorObjective(stage.model, stage.discriminator, stage.perceptual, cfg)
    return objective.eval(), cfg.model.image_size


def _frames(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # smooth images, so a warp of a few pixels changes them by a little, not by everything
    low = torch.rand(2, 2, 3, 8, 8)
    source, driving = (torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear") for x in low)
    return source, driving


def test_without_a_warp_the_reshaped_pair_is_the_frame_itself():
    """T = identity: T(source) is the source, its keypoints are the source's, the movement scale is 1
    and the relative transfer hands the generator the driving keypoints, so the term is the perceptual
    loss of the plain prediction, times its own weight."""
    objective, size = _objective(**{"dagan.reshape.sigma_affine": 0.0, "dagan.reshape.sigma_tps": 0.0})
    source, driving = _frames(size)
    with torch.no_grad():
        _, logs, _ = objective(source, driving, 3)
    per_weight = logs["perceptual"] / objective.cfg.weights.perceptual
    assert logs["reshaped_pair"] == pytest.approx(2.0 * per_weight, rel=1e-4)


def test_a_warp_changes_the_pair_and_the_seed_picks_the_warp():
    objective, size = _objective()
    source, driving = _frames(size)
    with torch.no_grad():
        _, a, _ = objective(source, driving, 3)
        _, b, _ = objective(source, driving, 3)
        _, c, _ = objective(source, driving, 4)
    plain = 2.0 * a["perceptual"] / objective.cfg.weights.perceptual
    assert a["reshaped_pair"] == b["reshaped_pair"]  # reproducible on resume
    assert a["reshaped_pair"] != pytest.approx(plain, rel=1e-3)  # another face shape, another avatar
    assert c["reshaped_pair"] != a["reshaped_pair"]


def test_the_term_trains_the_generator():
    objective, size = _objective(**{"dagan.weights.perceptual": 0.0})
    source, driving = _frames(size)
    loss, logs, _ = objective(source, driving, 3)
    assert set(logs) >= {"reshaped_pair"} and logs["perceptual"] == 0.0
    loss.backward()
    grads = [p.grad for p in objective.model.generator.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_the_warp_is_checked():
    with pytest.raises(ConfigError, match=r"dagan\.reshape"):
        load_train_config(None, {"model": "tiny", "dagan.reshape.sigma_affine": -0.1})
    with pytest.raises(ConfigError, match=r"dagan\.reshape\.points_tps"):
        load_train_config(None, {"model": "tiny", "dagan.reshape.points_tps": 1})


def test_the_frame_edge_a_warp_mirrors_is_not_charged():
    """RandomTransform.inside: a shift by half the frame's width shows the mirror on a quarter of it;
    there the reshaped pair replaces the avatar by the target, so no loss comes from it."""
    from training.losses import RandomTransform

    shift = RandomTransform(1, 0.0, 0.0)
    shift.affine[0, 0, 2] = 0.5  # I_T(x, y) = I(x + 0.5, y): x > 0.5 reads past the right edge
    inside = shift.inside(8, 9)
    assert inside.shape == (1, 1, 8, 9)
    assert inside[0, 0, :, :7].eq(1).all() and inside[0, 0, :, 7:].eq(0).all()  # x = 0.75 and 1.0 leave
    assert RandomTransform(2, 0.0, 0.0).inside(5, 5).eq(1).all()  # no warp: the frame itself, corners too
