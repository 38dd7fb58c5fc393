"""A tiny ray-caster for training tests: a textured height-field scene seen by a translating pinhole camera.

The scene is a background plane at depth ``plane`` with Gaussian bumps coming towards the camera (a crude
"face"), painted with a smooth random colour texture fixed to the surface. Each frame is rendered by
casting one ray per pixel and solving ray ∩ surface by fixed-point iteration (the surface is smooth and
the bumps shallow enough for it to converge), so every frame comes with its exact depth map. Camera
motion is a pure translation, so parallax between frames is exactly what self-supervised depth needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scene:
    bumps: np.ndarray  # N×4: x0, y0, height, sigma
    freqs: np.ndarray  # 3 channels × M waves × 2 (rad per unit in X, Y)
    phases: np.ndarray  # 3×M
    plane: float = 4.0

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = np.full_like(x, self.plane)
        for x0, y0, h, s in self.bumps:
            z -= h * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * s * s))
        return z

    def texture(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        chans = []
        for c in range(3):
            v = np.zeros_like(x)
            for (fx, fy), ph in zip(self.freqs[c], self.phases[c], strict=True):
                v += np.sin(fx * x + fy * y + ph)
            chans.append(0.5 + 0.45 * np.tanh(v / np.sqrt(len(self.phases[c]))))
        return np.stack(chans, axis=-1)


def random_scene(rng: np.random.Generator, num_bumps: int = 2) -> Scene:
    bumps = np.stack(
        [
            rng.uniform(-1.0, 1.0, num_bumps),
            rng.uniform(-1.0, 1.0, num_bumps),
            rng.uniform(1.0, 1.8, num_bumps),
            rng.uniform(0.3, 0.5, num_bumps),
        ],
        axis=1,
    )
    mags = rng.uniform(3.0, 14.0, (3, 6))
    angles = rng.uniform(0, 2 * np.pi, (3, 6))
    freqs = np.stack([mags * np.cos(angles), mags * np.sin(angles)], axis=-1)
    return Scene(bumps, freqs, rng.uniform(0, 2 * np.pi, (3, 6)))


def render(
    scene: Scene, camera: np.ndarray, size: int = 64, iterations: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Image size×size×3 uint8 and depth size×size (camera z) from a camera at ``camera`` (x, y, z),
    looking down +Z with focal length = size pixels and the principal point at the image centre."""
    f = float(size)
    uv = np.arange(size) + 0.5 - size / 2
    dx, dy = np.meshgrid(uv / f, uv / f)
    s = np.full((size, size), scene.plane - camera[2])
    for _ in range(iterations):
        s = scene.height(camera[0] + s * dx, camera[1] + s * dy) - camera[2]
    x, y = camera[0] + s * dx, camera[1] + s * dy
    image = (scene.texture(x, y) * 255).round().clip(0, 255).astype(np.uint8)
    return image, s


def render_clip(
    rng: np.random.Generator, frames: int = 8, size: int = 64, step: float = 0.15
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A random scene under a random straight camera path: (images, depths)."""
    scene = random_scene(rng)
    start = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 0.0])
    direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.3])
    velocity = step * direction / np.linalg.norm(direction)
    images, depths = [], []
    for i in range(frames):
        img, depth = render(scene, start + i * velocity, size)
        images.append(img)
        depths.append(depth)
    return images, depths
