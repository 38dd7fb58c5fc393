"""face-api's networks in PyTorch, with the weights of the npm package ``@vladmandic/face-api`` 1.7.15
(MIT licence): the tfjs weights reader, the 128-D face-recognition net and the feature extractor that its
expression and 68-point landmark nets share.

Why these networks: the paper's identity metrics (AED, CSIM) need a face-recognition embedding, and none
can be downloaded at run time here. face-api ships a small, well-known one: a ResNet-34-like network
(ported from dlib's ``dlib_face_recognition_resnet_model_v1``) that maps a 150×150 RGB face crop to a
128-D descriptor in which two photos of the same person are usually closer than 0.6 (Euclidean). Its
7-class expression classifier (neutral, happy, sad, angry, fearful, disgusted, surprised; 112×112 input)
serves the expression-agreement score. ``dagan fetch-eval-assets`` (see :mod:`evaluation.assets`) puts
the weight files in a local folder at data-preparation time; nothing is fetched while evaluating.

They live in the library because two applications use them: the evaluation measures with the
recognition and expression nets (:mod:`evaluation.face_id` crops faces and runs them), and training's
face perceptual loss reads features of the landmark net (:mod:`training.perceptual`).

The layer order below follows face-api's MIT-licensed TypeScript sources (``src/faceRecognitionNet``,
``src/faceFeatureExtractor``, ``src/faceExpressionNet``; Copyright (c) 2018 Vincent Mühler,
Copyright (c) 2020 Vladimir Mandic), re-expressed as PyTorch modules. The weights are in tfjs layout:
a JSON manifest lists every tensor (name, shape, dtype, optional quantization) and the ``.bin`` shard(s)
hold them back to back in that order; most tensors are uint8-quantized (value = q · scale + min).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = [
    "EXPRESSION_LABELS",
    "EXPRESSION_SIZE",
    "LANDMARK_SIZE",
    "RECOGNITION_SIZE",
    "ExpressionNet",
    "FaceFeatureExtractor",
    "FaceRecognitionNet",
    "LandmarkNet",
    "TfjsWeightsError",
    "read_tfjs_weights",
]

# face-api's order of the expression classifier's outputs (src/faceExpressionNet/FaceExpressions.ts).
EXPRESSION_LABELS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
# Mean RGB that face-api subtracts before dividing by 255 (both networks).
_MEAN_RGB = (122.782, 117.001, 104.298)
RECOGNITION_SIZE = 150
EXPRESSION_SIZE = 112
LANDMARK_SIZE = 112


class TfjsWeightsError(UserError, ValueError):
    """A tfjs weights manifest or shard is missing, truncated or does not fit the network."""


# ---------------------------------------------------------------------------------------- tfjs loader

# Bytes per stored element and numpy type, for the stored dtypes tfjs writes.
_STORED = {
    "float32": np.float32,
    "int32": np.int32,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "float16": np.float16,
}


def read_tfjs_weights(manifest_path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a tfjs ``*-weights_manifest.json`` as float32 numpy arrays of the manifest's shapes.

    The manifest is a list of groups ``{"paths": [shard, ...], "weights": [{name, shape, dtype,
    quantization?}, ...]}``; a group's shards are concatenated and its tensors read back to back in
    manifest order. A quantized tensor is stored as ``quantization.dtype`` (uint8/uint16, value =
    q · scale + min, or float16) and widened to float32 here; an unquantized one is stored as its own
    dtype. Raises :class:`TfjsWeightsError` for a missing shard, a size mismatch or an unknown dtype,
    because a silently misaligned read would give a network that runs but outputs garbage.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise TfjsWeightsError(f"tfjs weights manifest {manifest_path} does not exist")
    try:
        groups = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TfjsWeightsError(f"{manifest_path} is not a readable tfjs manifest ({exc})") from exc
    if not isinstance(groups, list):
        raise TfjsWeightsError(f"{manifest_path} is not a tfjs manifest (expected a list of weight groups)")
    out: dict[str, np.ndarray] = {}
    for group in groups:
        chunks = []
        for rel in group.get("paths", []):
            shard = manifest_path.parent / rel
            if not shard.is_file():
                raise TfjsWeightsError(f"weights shard {shard} named by {manifest_path.name} is missing")
            chunks.append(shard.read_bytes())
        data = b"".join(chunks)
        offset = 0
        for entry in group.get("weights", []):
            name, shape = entry["name"], [int(s) for s in entry["shape"]]
            count = math.prod(shape)
            quant = entry.get("quantization")
            stored = quant["dtype"] if quant else entry.get("dtype", "float32")
            if stored not in _STORED:
                raise TfjsWeightsError(
                    f"{manifest_path.name}: {name} has unsupported stored dtype {stored!r}"
                )
            np_type = np.dtype(_STORED[stored])
            nbytes = count * np_type.itemsize
            if offset + nbytes > len(data):
                raise TfjsWeightsError(
                    f"{manifest_path.name}: shard data ends at byte {len(data)} but {name} needs bytes "
                    f"{offset}..{offset + nbytes} (truncated or wrong .bin file)"
                )
            raw = np.frombuffer(data, dtype=np_type, count=count, offset=offset).astype(np.float32)
            offset += nbytes
            if quant and stored in ("uint8", "uint16"):
                raw = raw * np.float32(quant["scale"]) + np.float32(quant["min"])
            out[name] = raw.reshape(shape)
        if offset != len(data):
            raise TfjsWeightsError(
                f"{manifest_path.name}: {len(data) - offset} bytes of shard data are left over after the "
                "last tensor (manifest and .bin do not belong together)"
            )
    return out


def _conv_weight(w: np.ndarray) -> torch.Tensor:
    """tfjs conv filters [kh, kw, in, out] -> torch [out, in, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))


def _depthwise_weight(w: np.ndarray) -> torch.Tensor:
    """tfjs depthwise filters [kh, kw, in, 1] -> torch grouped-conv weight [in, 1, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1)))


def _copy(param: torch.Tensor, value: torch.Tensor | np.ndarray, name: str) -> None:
    value = torch.as_tensor(value, dtype=torch.float32)
    if tuple(param.shape) != tuple(value.shape):
        raise TfjsWeightsError(
            f"{name}: network expects shape {tuple(param.shape)}, weights have {tuple(value.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


def _take(weights: dict[str, np.ndarray], name: str, used: set[str]) -> np.ndarray:
    if name not in weights:
        raise TfjsWeightsError(f"tfjs weights have no tensor {name!r} (is this the right model file?)")
    used.add(name)
    return weights[name]


def _check_all_used(weights: dict[str, np.ndarray], used: set[str], what: str) -> None:
    extra = sorted(set(weights) - used)
    if extra:
        raise TfjsWeightsError(f"{what}: unexpected tensors in the weights file: {', '.join(extra[:5])}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """B×3×H×W RGB in [0, 1] -> face-api's input: (255·x − mean RGB) / 255."""
    mean = torch.tensor(_MEAN_RGB, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * 255.0 - mean) / 255.0


def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'same' padding (extra pixel at the bottom/right when the total is odd)."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


# --------------------------------------------------------------------------------- recognition network


class _ConvScale(nn.Module):
    """conv (+bias) then the per-channel affine 'scale' layer (dlib's frozen batch-norm), optional ReLU.

    tfjs padding is 'same' for stride 1 (= 1 pixel for 3×3) and 'valid' for the strided layers.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, relu: bool) -> None:
        super().__init__()
        padding = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.scale_weight = nn.Parameter(torch.ones(cout))
        self.scale_bias = nn.Parameter(torch.zeros(cout))
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x) * self.scale_weight.view(1, -1, 1, 1) + self.scale_bias.view(1, -1, 1, 1)
        return F.relu(out) if self.relu else out

    def load(self, weights: dict[str, np.ndarray], prefix: str, used: set[str]) -> None:
        _copy(self.conv.weight, _conv_weight(_take(weights, f"{prefix}/conv/filters", used)), prefix)
        _copy(self.conv.bias, _take(weights, f"{prefix}/conv/bias", used), prefix)
        _copy(self.scale_weight, _take(weights, f"{prefix}/scale/weights", used), prefix)
        _copy(self.scale_bias, _take(weights, f"{prefix}/scale/biases", used), prefix)


class _Residual(nn.Module):
    """Basic residual block; ``down`` halves the size (3×3 stride-2 'valid' conv, 2×2 average-pool
    shortcut zero-padded in channels, and the conv branch zero-padded at the bottom/right when the two
    sizes differ — exactly what face-api's ``residualDown`` does)."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = _ConvScale(cin, cout, 3, 2 if down else 1, relu=True)
        self.conv2 = _ConvScale(cout, cout, 3, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if not self.down:
            return F.relu(out + x)
        shortcut = F.avg_pool2d(x, 2, 2)
        if shortcut.shape[-2:] != out.shape[-2:]:
            out = F.pad(out, (0, shortcut.shape[-1] - out.shape[-1], 0, shortcut.shape[-2] - out.shape[-2]))
        if shortcut.shape[1] != out.shape[1]:
            shortcut = torch.cat([shortcut, torch.zeros_like(shortcut)], dim=1)
        return F.relu(out + shortcut)

    def load(self, weights: dict[str, np.ndarray], prefix: str, used: set[str]) -> None:
        self.conv1.load(weights, f"{prefix}/conv1", used)
        self.conv2.load(weights, f"{prefix}/conv2", used)


# (tfjs name, in channels, out channels, downsampling) in forward order (FaceRecognitionNet.ts).
_RESNET_LAYOUT = (
    ("conv32_1", 32, 32, False),
    ("conv32_2", 32, 32, False),
    ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True),
    ("conv64_1", 64, 64, False),
    ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True),
    ("conv128_1", 128, 128, False),
    ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True),
    ("conv256_1", 256, 256, False),
    ("conv256_2", 256, 256, False),
    ("conv256_down_out", 256, 256, True),
)


class FaceRecognitionNet(nn.Module):
    """B×3×150×150 RGB in [0, 1] -> B×128 face descriptor (not normalised; same person: distance < ~0.6).

    Shapes for a 150 input: 7×7/2 conv -> 72, 3×3/2 max-pool -> 35, [32]×3 -> 35, [64]×4 -> 17,
    [128]×3 -> 8, [256]×3 -> 4, down_out -> 2 (1×1 conv output padded to the pooled 2×2), global mean,
    256×128 linear map without bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv32_down = _ConvScale(3, 32, 7, 2, relu=True)
        self.blocks = nn.ModuleDict(
            {name: _Residual(cin, cout, down) for name, cin, cout, down in _RESNET_LAYOUT}
        )
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv32_down(_normalize(x))
        out = F.max_pool2d(out, 3, 2)
        for block in self.blocks.values():
            out = block(out)
        return self.fc(out.mean(dim=(2, 3)))

    def load_tfjs(self, weights: dict[str, np.ndarray]) -> FaceRecognitionNet:
        used: set[str] = set()
        self.conv32_down.load(weights, "conv32_down", used)
        for name, block in self.blocks.items():
            block.load(weights, name, used)
        _copy(self.fc.weight, _take(weights, "fc", used).T.copy(), "fc")
        _check_all_used(weights, used, "face recognition model")
        return self


# ---------------------------------------------------------------------------------- expression network


class _SeparableConv(nn.Module):
    """tf.separableConv2d ('same' padding): depthwise 3×3 (stride s, no bias), pointwise 1×1, + bias."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 0, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(_pad_same(x, 3, self.stride)))

    def load(self, weights: dict[str, np.ndarray], prefix: str, used: set[str]) -> None:
        _copy(
            self.depthwise.weight,
            _depthwise_weight(_take(weights, f"{prefix}/depthwise_filter", used)),
            prefix,
        )
        _copy(self.pointwise.weight, _conv_weight(_take(weights, f"{prefix}/pointwise_filter", used)), prefix)
        _copy(self.pointwise.bias, _take(weights, f"{prefix}/bias", used), prefix)


class _PlainConv(nn.Module):
    """Regular 3×3 stride-2 'same' conv + bias: the first layer of the first dense block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad_same(x, 3, 2))

    def load(self, weights: dict[str, np.ndarray], prefix: str, used: set[str]) -> None:
        _copy(self.conv.weight, _conv_weight(_take(weights, f"{prefix}/filters", used)), prefix)
        _copy(self.conv.bias, _take(weights, f"{prefix}/bias", used), prefix)


class _DenseBlock4(nn.Module):
    """face-api's denseBlock4: four convs, each fed the ReLU of the sum of all earlier outputs; halves
    the size (first conv has stride 2)."""

    def __init__(self, cin: int, cout: int, first: bool) -> None:
        super().__init__()
        self.conv0: nn.Module = _PlainConv(cin, cout) if first else _SeparableConv(cin, cout, 2)
        self.conv1 = _SeparableConv(cout, cout, 1)
        self.conv2 = _SeparableConv(cout, cout, 1)
        self.conv3 = _SeparableConv(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)

    def load(self, weights: dict[str, np.ndarray], prefix: str, used: set[str]) -> None:
        for i in range(4):
            getattr(self, f"conv{i}").load(weights, f"{prefix}/conv{i}", used)


class FaceFeatureExtractor(nn.Module):
    """face-api's FaceFeatureExtractor, shared by its expression and 68-point landmark nets: four dense
    blocks, B×3×H×W RGB in [0, 1] → maps of 32, 64, 128, 256 channels at H/2, H/4, H/8, H/16."""

    BLOCKS = ("dense0", "dense1", "dense2", "dense3")

    def __init__(self) -> None:
        super().__init__()
        self.dense0 = _DenseBlock4(3, 32, first=True)
        self.dense1 = _DenseBlock4(32, 64, first=False)
        self.dense2 = _DenseBlock4(64, 128, first=False)
        self.dense3 = _DenseBlock4(128, 256, first=False)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every dense block, first to last."""
        out = []
        x = _normalize(x)
        for name in self.BLOCKS:
            x = getattr(self, name)(x)
            out.append(x)
        return out

    def load_blocks(self, weights: dict[str, np.ndarray], used: set[str]) -> None:
        for name in self.BLOCKS:
            getattr(self, name).load(weights, name, used)


class _PooledHeadNet(FaceFeatureExtractor):
    """face-api's nets that end in a 7×7 average pool and one linear layer over the four dense blocks
    (the expression and the 68-point landmark nets): B×3×112×112 → B×outputs before any activation."""

    WHAT = ""  # the model's name in load errors

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(256, outputs)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.avg_pool2d(self.feature_maps(x)[-1], 7, 2).flatten(1))

    def load_tfjs(self, weights: dict[str, np.ndarray]) -> _PooledHeadNet:
        used: set[str] = set()
        self.load_blocks(weights, used)
        _copy(self.fc.weight, _take(weights, "fc/weights", used).T.copy(), "fc")
        _copy(self.fc.bias, _take(weights, "fc/bias", used), "fc")
        _check_all_used(weights, used, self.WHAT)
        return self


class LandmarkNet(_PooledHeadNet):
    """face-api's 68-point landmark net: B×3×112×112 RGB in [0, 1], a face box crop → B×68×2 landmarks,
    (x, y) as fractions of the crop (iBUG 68 order: jaw 0–16, brows 17–26, nose 27–35, eyes 36–47,
    mouth 48–67).

    The same four dense blocks as :class:`ExpressionNet`, 7×7 average pool, 256×136 linear layer. It
    wants a face box, not a loose crop: on the 128-px training crops boxed by the face mesh's cheeks
    (234, 454), forehead (10) and chin (152) it lands 1.2 px from mediapipe's matching points and its
    mouth opening follows mediapipe's with r 0.96 (docs/training.md), where the whole crop gives 10–20 px.
    """

    WHAT = "face landmark-68 model"

    def __init__(self) -> None:
        super().__init__(136)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).view(-1, 68, 2)


class ExpressionNet(_PooledHeadNet):
    """B×3×112×112 RGB in [0, 1] -> B×7 expression probabilities (order: :data:`EXPRESSION_LABELS`).

    Four dense blocks (32, 64, 128, 256 channels; 112 -> 56 -> 28 -> 14 -> 7), 7×7 average pool,
    256×7 linear layer, softmax.
    """

    WHAT = "face expression model"

    def __init__(self) -> None:
        super().__init__(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(x), dim=1)
