"""face-api identity/expression networks: the tfjs weight reader on synthetic manifests, the PyTorch
networks' shapes, and — when the real weights are present — same-person < different-person distances on
face-api's own demo photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dagan.face_api import ExpressionNet, FaceRecognitionNet, TfjsWeightsError, read_tfjs_weights
from evaluation.assets import EvalAssetsError, extract_face_api_tarball, find_eval_assets
from evaluation.face_id import align_box, crop_aligned


def _write_manifest(folder: Path, entries: list[dict], blobs: list[bytes], shards: int = 1) -> Path:
    data = b"".join(blobs)
    cut = len(data) // shards
    paths = []
    for i in range(shards):
        chunk = data[i * cut : (i + 1) * cut if i < shards - 1 else len(data)]
        (folder / f"w.bin.{i}").write_bytes(chunk)
        paths.append(f"w.bin.{i}")
    manifest = folder / "m-weights_manifest.json"
    manifest.write_text(json.dumps([{"paths": paths, "weights": entries}]))
    return manifest


def test_tfjs_reader_dequantizes_mixed_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    q8 = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    q16 = rng.integers(0, 65536, size=(4,), dtype=np.uint16)
    f32 = rng.standard_normal((3, 1, 2)).astype(np.float32)
    f16 = rng.standard_normal(5).astype(np.float16)
    entries = [
        {
            "name": "a/q8",
            "shape": [2, 3],
            "dtype": "float32",
            "quantization": {"dtype": "uint8", "scale": 0.5, "min": -3.0},
        },
        {"name": "b/f32", "shape": [3, 1, 2], "dtype": "float32"},
        {
            "name": "c/q16",
            "shape": [4],
            "dtype": "float32",
            "quantization": {"dtype": "uint16", "scale": 0.001, "min": 1.0},
        },
        {"name": "d/f16", "shape": [5], "dtype": "float32", "quantization": {"dtype": "float16"}},
    ]
    manifest = _write_manifest(
        tmp_path, entries, [q8.tobytes(), f32.tobytes(), q16.tobytes(), f16.tobytes()], shards=3
    )
    w = read_tfjs_weights(manifest)
    assert list(w) == ["a/q8", "b/f32", "c/q16", "d/f16"]
    np.testing.assert_allclose(w["a/q8"], q8.astype(np.float32) * 0.5 - 3.0)
    assert w["a/q8"].min() >= -3.0 and w["a/q8"].max() <= -3.0 + 255 * 0.5
    np.testing.assert_array_equal(w["b/f32"], f32)
    np.testing.assert_allclose(w["c/q16"], q16 * np.float32(0.001) + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w["d/f16"], f16.astype(np.float32))
    assert all(v.dtype == np.float32 for v in w.values())


def test_tfjs_reader_rejects_truncated_and_leftover_data(tmp_path):
    entries = [
        {
            "name": "x",
            "shape": [10],
            "dtype": "float32",
            "quantization": {"dtype": "uint8", "scale": 1.0, "min": 0.0},
        }
    ]
    manifest = _write_manifest(tmp_path, entries, [bytes(9)])
    with pytest.raises(TfjsWeightsError, match="truncated"):
        read_tfjs_weights(manifest)
    manifest = _write_manifest(tmp_path, entries, [bytes(12)])
    with pytest.raises(TfjsWeightsError, match="left over"):
        read_tfjs_weights(manifest)
    with pytest.raises(TfjsWeightsError, match="does not exist"):
        read_tfjs_weights(tmp_path / "missing.json")


def _synthetic_weights(names_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in names_shapes.items()}


def _recognition_layout() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix, k, cin, cout):
        shapes[f"{prefix}/conv/filters"] = (k, k, cin, cout)
        shapes[f"{prefix}/conv/bias"] = (cout,)
        shapes[f"{prefix}/scale/weights"] = (cout,)
        shapes[f"{prefix}/scale/biases"] = (cout,)

    conv("conv32_down", 7, 3, 32)
    from dagan.face_api import _RESNET_LAYOUT

    for name, cin, cout, _ in _RESNET_LAYOUT:
        conv(f"{name}/conv1", 3, cin, cout)
        conv(f"{name}/conv2", 3, cout, cout)
    shapes["fc"] = (256, 128)
    return shapes


def test_recognition_net_loads_tfjs_layout_and_transposes_filters():
    shapes = _recognition_layout()
    weights = _synthetic_weights(shapes)
    net = FaceRecognitionNet().load_tfjs(weights).eval()
    # tfjs [kh, kw, in, out] -> torch [out, in, kh, kw]: one element checked by index.
    tf_filter = weights["conv32_down/conv/filters"]
    assert net.conv32_down.conv.weight[5, 2, 1, 6].item() == pytest.approx(float(tf_filter[1, 6, 2, 5]))
    assert torch.equal(net.fc.weight, torch.from_numpy(weights["fc"].T.copy()))
    out = net(torch.rand(2, 3, 150, 150))
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    bad = dict(weights, fc=np.zeros((128, 256), np.float32))
    with pytest.raises(TfjsWeightsError, match="fc"):
        FaceRecognitionNet().load_tfjs(bad)
    with pytest.raises(TfjsWeightsError, match="unexpected"):
        FaceRecognitionNet().load_tfjs(dict(weights, extra=np.zeros(1, np.float32)))


def test_expression_net_shapes_and_probabilities():
    net = ExpressionNet().eval()
    with torch.no_grad():
        p = net(torch.rand(3, 3, 112, 112))
    assert p.shape == (3, 7)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(3))


def test_aligned_crop_covers_the_face(astronaut):
    from dagan.face import crop_source, face_landmarks

    crop, _ = crop_source(astronaut, 256)
    lm = face_landmarks(crop)
    x, y, w, h = align_box(lm)
    # The padded box contains every eye/mouth/nose landmark and is about face-sized (not the whole crop).
    core = lm[[33, 263, 1, 61, 291, 152], :2]
    assert (core[:, 0] > x).all() and (core[:, 0] < x + w).all() and (core[:, 1] > y).all()
    assert (core[:, 1] < y + h).all() and 0.25 * 256 < w < 0.9 * 256
    face = crop_aligned(crop, lm, 150)
    assert face.shape == (150, 150, 3) and face.dtype == np.uint8


def test_missing_assets_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGAN_EVAL_ASSETS", str(tmp_path / "nothing"))
    with pytest.raises(EvalAssetsError, match="dagan fetch-eval-assets"):
        find_eval_assets()
    assert find_eval_assets(required=False) is None


def test_tarball_extraction_keeps_only_assets(tmp_path):
    import io
    import tarfile

    tgz = tmp_path / "p.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (
            ("package/model/face_recognition_model.bin", b"\x01\x02"),
            ("package/model/face_recognition_model-weights_manifest.json", b"[]"),
            ("package/demo/sample1.jpg", b"jpg"),
            ("package/demo/index.js", b"js"),
            ("package/dist/face-api.js", b"js"),
            ("package/LICENSE", b"MIT"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "assets"
    written = {p.relative_to(out).as_posix() for p in extract_face_api_tarball(tgz, out)}
    assert written == {
        "model/face_recognition_model.bin",
        "model/face_recognition_model-weights_manifest.json",
        "demo/sample1.jpg",
        "LICENSE",
    }
    assert find_eval_assets(out) == out


# ------------------------------------------------------------------------------- real weights (optional)


def _real_assets() -> Path | None:
    folder = find_eval_assets(required=False)
    if folder is None or not sorted((folder / "demo").glob("sample*.jpg")):
        return None
    return folder


@pytest.mark.skipif(
    _real_assets() is None,
    reason="face-api assets absent: run `dagan fetch-eval-assets` (or set DAGAN_EVAL_ASSETS) to run it",
)
def test_identity_same_person_closer_than_different_people():
    """On face-api's demo group photos: each face against (a) a second, different image of the same face
    (the photo mirrored, at half resolution, 20% darker, JPEG quality 50, landmarks re-detected) and (b)
    every other person. The six photos show 22 people and, on inspection, no person clearly appears in two
    photos, so (a) is the honest same-person pair available offline."""
    from dagan.face import FaceDetector, face_landmarks, square_box
    from dagan.media import load_image
    from evaluation.face_id import FaceAnalyzer

    folder = _real_assets()
    analyzer = FaceAnalyzer(folder, expressions=False)
    views_a, views_b = [], []
    with FaceDetector() as detector:
        for path in sorted((folder / "demo").glob("sample*.jpg")):
            image = load_image(path)
            for det in detector.detect(image):
                region = square_box(det, image.shape, margin=0.5, lift=0.0).crop(image, 512)
                lm = face_landmarks(region)
                if lm is None:
                    continue
                other = cv2.resize(cv2.flip(region, 1), (256, 256), interpolation=cv2.INTER_AREA)
                other = np.clip(cv2.resize(other, (512, 512)).astype(np.float32) * 0.8, 0, 255).astype(
                    np.uint8
                )
                other = cv2.imdecode(
                    cv2.imencode(".jpg", other, [cv2.IMWRITE_JPEG_QUALITY, 50])[1], cv2.IMREAD_COLOR
                )
                lm_other = face_landmarks(other)
                if lm_other is None:
                    continue
                views_a.append(crop_aligned(region, lm))
                views_b.append(crop_aligned(other, lm_other))
    assert len(views_a) >= 15, f"only {len(views_a)} faces found in the demo photos"
    ea, eb = analyzer.embed_crops(views_a), analyzer.embed_crops(views_b)
    n = len(ea)
    same = np.linalg.norm(ea - eb, axis=1)
    cross = np.linalg.norm(ea[:, None] - ea[None], axis=-1)[~np.eye(n, dtype=bool)]
    print(f"same person: mean {same.mean():.3f} max {same.max():.3f}; ", end="")
    print(f"different: mean {cross.mean():.3f} min {cross.min():.3f} ({n} faces)")
    assert same.mean() < 0.45 < 0.6 < cross.mean()
    assert same.mean() + 0.2 < cross.mean()
    # Rank-1 identification: the other view of each face is nearer than every other person.
    dist_b_to_a = np.linalg.norm(eb[:, None] - ea[None], axis=-1)
    assert (dist_b_to_a.argmin(axis=1) == np.arange(n)).mean() >= 0.9


if os.environ.get("DAGAN_EVAL_ASSETS_REQUIRED"):  # CI sets this after fetching, so a silent skip is caught

    def test_assets_are_present_when_required():
        assert _real_assets() is not None, "DAGAN_EVAL_ASSETS_REQUIRED is set but the assets are missing"
