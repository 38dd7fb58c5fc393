"""``dagan export quantize``: an int8 copy of an ONNX export, calibrated on real face crops.

ONNX Runtime's static quantization (:func:`onnxruntime.quantization.quantize_static`) turns the
``frame`` graph's convolutions into int8 kernels (QDQ format: ``QuantizeLinear`` → ``Conv`` →
``DequantizeLinear``, which ONNX Runtime's CPU provider fuses into ``QLinearConv`` and runs with AVX-512
VNNI). Weights are int8, symmetric, one scale per output channel; activations are uint8 with a scale
and zero point per tensor, taken from the ranges the graph sees on a calibration set.

Why these choices (measured, see docs/export.md):

- **Only the per-frame graphs are quantized**: the fused ``frame`` graph, and the ``depth`` and
  ``generator`` graphs of the split path a stream with steadied keypoints runs every frame.
  ``source_encoder`` runs once per source photo and stays fp32; the ``keypoints`` graph is the keypoint
  detector, float by default as inside the frame graph.
- **Only convolutions are int8, and not the heads** (the convolutions that feed a sigmoid or softmax,
  :func:`head_convs`). Everything between them — grid_sample (the warp), softmax (keypoint heatmaps
  and attention), sigmoid heads (occlusion), the keypoint soft-argmax (ReduceSum over a heatmap × grid
  product), the motion transfer, the attention MatMuls — stays float: those are cheap, and their inputs
  are coordinates and probabilities, where an 8-bit step is a visible error. The output image's head in
  int8 was measured too (docs/export.md): 0.6 ms faster, but the avatar's landmarks jitter more.
- **Calibration data are real faces**, framed exactly as the engine sees them: frames of the real
  talking-head clips cropped with the project's face module (:mod:`dagan.face`), the first frame of
  each clip as the source. Calibrating on random noise would give activation ranges no face produces.

The output directory is a complete export (the other graphs are copied unchanged) whose manifest says
``"precision": "int8"`` and records how it was calibrated; ``OnnxRuntimeEngine(dir, precision="int8")``
runs it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dagan.checkpoint import atomic_write
from dagan.graph_contract import copy_lid_reader

from .onnx_export import MANIFEST, ExportError, read_manifest

# Sub-networks of the frame graph, by the prefix of their node names (the exporter names nodes after
# the module path). Nodes outside these prefixes belong to the generator (encoder, warp, attention,
# bottleneck, decoder).
GROUPS = ("depth_net", "kp_detector", "dense_motion_network", "generator")
DEFAULT_OPS = ("Conv",)
METHODS = ("minmax", "entropy", "percentile")


@dataclass
class FaceClip:
    """One clip's calibration material: the source crop (its first frame) and driving crops."""

    name: str
    source: np.ndarray
    drivers: list[np.ndarray]


def face_clips(
    clips: Sequence[str | Path], size: int, frames_per_clip: int = 4, stride: int = 8
) -> list[FaceClip]:
    """Real face crops as the engine gets them: ``prepare_source`` of each clip's first frame, then every
    ``stride``-th frame (after the first) through the tracking :class:`~dagan.face.DrivingCropper`.

    Clips whose first frame has no face are skipped (their source would fail in the service too).
    """
    from dagan.face import DrivingCropper, NoFaceError, prepare_source
    from dagan.media import read_video

    out = []
    for path in clips:
        frames, _ = read_video(path, max_frames=1 + frames_per_clip * stride)
        if not frames:
            continue
        try:
            source = prepare_source(frames[0], size)
        except NoFaceError:
            continue
        cropper = DrivingCropper(size)
        drivers = []
        try:
            for i, frame in enumerate(frames[1:], start=1):
                crop = cropper(frame)  # every frame, so the tracker follows the head as it does live
                if i % stride == 0:
                    drivers.append(crop)
        finally:
            cropper.close()
        out.append(FaceClip(Path(path).stem, source, drivers[:frames_per_clip]))
    if not out:
        raise ExportError("no calibration clip had a face in its first frame")
    return out


def find_clips(paths: Sequence[str | Path]) -> list[Path]:
    """Video files from a list of files and folders (a folder contributes its *.mp4, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in (".mp4", ".avi", ".mov", ".mkv"))
        elif p.is_file():
            out.append(p)
        else:
            raise ExportError(f"calibration clip not found: {p}")
    if not out:
        raise ExportError(f"no video files in {', '.join(map(str, paths))}")
    return out


#: The project's real talking-head clips, where this checkout has them (``../shared/data/real-faces``,
#: beside the repository; a clean install does not).
REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-faces" / "clips"
#: docs/export.md's split of those clips: calibrate on six people, check on three others.
CALIB_NAMES = ("d9", "d10", "d13", "d18", "s20", "d6")
CHECK_NAMES = ("d3", "s18", "d20")
CALIB_ENV = "DAGAN_CALIB_CLIPS"


@dataclass
class CalibrationSource:
    """Where calibration and held-out check frames come from: ``label`` names it (it keys the cached
    int8 export, so it is known without reading a frame), ``load(size)`` makes the crops."""

    label: str
    calib: tuple[str, ...]
    check: tuple[str, ...]

    def load(self, size: int, progress: bool = False) -> tuple[list[FaceClip], list[FaceClip]]:
        if progress:
            print(f"  reading calibration faces ({self.label}) …", flush=True)
        if self.calib == ("samples",):
            return sample_clips(size)
        return face_clips(self.calib, size), face_clips(self.check, size)


def default_calibration(env: str | None = None) -> CalibrationSource:
    """The calibration set used when an int8 export is prepared without being told one:

    1. ``$DAGAN_CALIB_CLIPS``: ``CALIB;CHECK``, each a comma-separated list of clips or folders;
    2. the project's real clips (:data:`REAL_CLIPS`) with docs/export.md's split, where they exist;
    3. else the real portraits every install has (scikit-image's astronaut to calibrate, matplotlib's
       Grace Hopper to check), moved by :func:`dagan.samples.driving_frames` (:func:`sample_clips`).
    """
    import os

    env = os.environ.get(CALIB_ENV) if env is None else env
    if env:
        calib, _, check = env.partition(";")
        if not check:
            raise ExportError(f"${CALIB_ENV} must be 'CALIB_CLIPS;CHECK_CLIPS' (comma-separated lists)")
        paths = [tuple(str(p) for p in find_clips(part.split(","))) for part in (calib, check)]
        return CalibrationSource(f"clips:{'|'.join(','.join(p) for p in paths)}", *paths)
    real = [REAL_CLIPS / f"{n}.mp4" for n in (*CALIB_NAMES, *CHECK_NAMES)]
    if all(p.is_file() for p in real):
        names = [str(p) for p in real]
        k = len(CALIB_NAMES)
        return CalibrationSource(
            f"real-faces:{','.join(CALIB_NAMES)};{','.join(CHECK_NAMES)}", tuple(names[:k]), tuple(names[k:])
        )
    return CalibrationSource("samples:astronaut;grace_hopper", ("samples",), ("samples",))


def sample_clips(size: int, frames: int = 32, every: int = 4) -> tuple[list[FaceClip], list[FaceClip]]:
    """Calibration (astronaut) and check (Grace Hopper) clips from the portraits shipped with every
    install, each moved smoothly (turn, shift, zoom) and tracked like a webcam by the face module."""
    from dagan.face import DrivingCropper, prepare_source
    from dagan.samples import astronaut, driving_frames, grace_hopper

    out = []
    for name, photo in (("astronaut", astronaut()), ("grace_hopper", grace_hopper())):
        cropper = DrivingCropper(size)
        try:
            drivers = [cropper(f) for f in driving_frames(photo, frames, size=512)]
        finally:
            cropper.close()
        out.append([FaceClip(name, prepare_source(photo, size), drivers[every::every])])
    return out[0], out[1]


def _to_input(image: np.ndarray) -> np.ndarray:
    """uint8 H×W×3 → 1×3×H×W float32 in [0, 1], the engines' preprocessing for an image at model size."""
    return (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def frame_feeds(onnx_dir: str | Path, clips: Sequence[FaceClip]) -> Iterator[dict[str, np.ndarray]]:
    """The frame graph's inputs for every (source, driver) pair: the fp32 source encoder's cached
    tensors for the clip's source, the driver, and an absolute-motion reference (the transfer inside the
    graph is element-wise float either way)."""
    import onnxruntime as ort

    manifest = read_manifest(onnx_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc_entry = manifest["graphs"]["source_encoder"]
    encoder = ort.InferenceSession(
        str(Path(onnx_dir) / enc_entry["file"]), opts, providers=["CPUExecutionProvider"]
    )
    enc_names = [o["name"] for o in enc_entry["outputs"]]
    specs = {s["name"]: s for s in manifest["graphs"]["frame"]["inputs"]}
    num_kp = int(manifest["config"]["keypoints"]["num_kp"])
    for clip in clips:
        cached = dict(zip(enc_names, encoder.run(None, {"source": _to_input(clip.source)}), strict=True))
        for driver in clip.drivers:
            feed = {"driving": _to_input(driver)}
            for name in specs:
                if name in cached:
                    feed[name] = cached[name]
            feed["kp_reference_value"] = np.zeros((1, num_kp, 2), np.float32)
            if "kp_reference_jacobian" in specs:
                feed["kp_reference_jacobian"] = np.tile(np.eye(2, dtype=np.float32), (1, num_kp, 1, 1))
            feed["motion_scale"] = np.ones((1, 1, 1), np.float32)
            feed["relative"] = np.zeros((1, 1, 1), np.float32)
            feed["mouth_gain"] = np.ones((1, 1, 1), np.float32)
            yield {n: feed[n] for n in specs}


def group_of(node_name: str) -> str:
    """The sub-network a frame-graph node belongs to (see :data:`GROUPS`)."""
    head = node_name.lstrip("/").split("/", 1)[0]
    return head if head in GROUPS else "generator"


# Ops a head's output may pass through on its way to the sigmoid / softmax (reshapes, the temperature,
# and the rearrangements of the CPU graph rewrites in export/optimize.py: sibling heads fused into one
# conv and split, a space-to-depth conv put back with DepthToSpace).
_HEAD_PASSTHROUGH = ("Reshape", "Div", "Mul", "Transpose", "Flatten", "Split", "DepthToSpace")


def head_convs(graph: Any) -> list[str]:
    """Convolutions whose output goes (through reshapes / a temperature at most) into a Sigmoid or
    Softmax: the depth head, keypoint heatmaps, motion mask, occlusion and the output image.

    In QDQ form a quantized conv's *output* is quantized too, so a head in int8 would feed its
    sigmoid / softmax 8-bit logits: a 1/255-of-range step in depth, in the occlusion map, in the mask
    that selects each pixel's motion and in the final image. These are single convolutions (the final
    one is 1 % of vox-256's per-frame FLOPs), so they stay float.
    """
    producer = {o: n for n in graph.node for o in n.output}
    heads = set()
    for node in graph.node:
        if node.op_type not in ("Sigmoid", "Softmax"):
            continue
        frontier, depth = [node], 0
        while frontier and depth < 3:
            nxt = []
            for n in frontier:
                for name in n.input:
                    p = producer.get(name)
                    if p is None:
                        continue
                    if p.op_type == "Conv":
                        heads.add(p.name)
                    elif p.op_type in _HEAD_PASSTHROUGH:
                        nxt.append(p)
            frontier, depth = nxt, depth + 1
    return sorted(heads)


def excluded_nodes(model_path: str | Path, keep_float: Sequence[str], float_heads: bool = True) -> list[str]:
    """Names of the nodes quantize_static must leave float: the sub-networks in ``keep_float`` and,
    with ``float_heads``, every :func:`head_convs` convolution."""
    import onnx

    bad = sorted(set(keep_float) - set(GROUPS))
    if bad:
        raise ExportError(f"unknown sub-network(s) {', '.join(bad)}; choose from {', '.join(GROUPS)}")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = {n.name for n in graph.node if group_of(n.name) in keep_float}
    if float_heads:
        names.update(head_convs(graph))
    return sorted(names)


def quantize_before_resize(model: Any) -> int:
    """Move each ``QuantizeLinear`` that follows a nearest-neighbour ``Resize`` in front of it, so the
    upsampling copies uint8 values instead of floats and the quantization runs on the small tensor.
    Returns how many pairs moved; ``model`` is changed in place.

    Why: static quantization puts the ``QuantizeLinear`` of a convolution's input right before the
    convolution, which in the decoder's up blocks is *after* the 2× nearest upsampling: the float map is
    upsampled (64 channels at 128², 4 MB) and then quantized at full size. Nearest neighbour only copies
    values and quantization is per element with one scale, so the two commute exactly: the graph gives
    the same bits (:func:`quantize_export` checks it) and ONNX Runtime's CPU ``Resize`` runs on uint8.
    Only a ``Resize`` whose single consumer is the ``QuantizeLinear`` moves, so no float reader of the
    upsampled map is left without it.
    """
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    moved = 0
    for resize in graph.node:
        if resize.op_type != "Resize" or resize.output[0] in outputs:
            continue
        mode = next((a.s.decode() for a in resize.attribute if a.name == "mode"), "nearest")
        users = consumers.get(resize.output[0], [])
        if mode != "nearest" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        quant = users[0]
        small, upsampled = quant.output[0] + "_before_resize", quant.output[0]
        quant.input[0], quant.output[0] = resize.input[0], small
        resize.input[0], resize.output[0] = small, upsampled
        moved += 1
    if moved:  # the moved QuantizeLinear nodes now feed their Resize: restore a topological order
        _topological_sort(graph)
    return moved


def _quantize_before_resize_checked(path: Path, feed: dict[str, np.ndarray]) -> int:
    """:func:`quantize_before_resize` on the quantized graph at ``path``, kept only if the graph then
    gives the same outputs, bit for bit, on a calibration input (else the file stays as it was: 0)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    before = model.SerializeToString()
    moved = quantize_before_resize(model)
    if not moved:
        return 0

    def run(proto: bytes) -> list[np.ndarray]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"]).run(None, feed)

    after = model.SerializeToString()
    if not all(np.array_equal(a, b) for a, b in zip(run(before), run(after), strict=True)):
        return 0
    atomic_write(path, lambda p: Path(p).write_bytes(after))
    return moved


def _topological_sort(graph: Any) -> None:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        left = []
        for node in pending:
            if all(name in ready for name in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ExportError("the quantized graph has a cycle or a missing input")
        pending = left
    copies = [type(n).FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(copies)


def quantize_export(
    onnx_dir: str | Path,
    out_dir: str | Path,
    clips: Sequence[FaceClip],
    keep_float: Sequence[str] = ("kp_detector",),
    op_types: Sequence[str] = DEFAULT_OPS,
    per_channel: bool = True,
    method: str = "minmax",
    quant_format: str = "qdq",
    float_heads: bool = True,
    before_resize: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Write an int8 export of ``onnx_dir`` into ``out_dir`` and return its manifest.

    ``keep_float``: sub-networks of the frame graph left in float (:data:`GROUPS`); ``op_types``: the
    op types quantized (default: convolutions only); ``method``: how activation ranges are taken from
    the calibration set (min/max, entropy or the 99.999th percentile); ``float_heads``: keep the
    convolutions that feed a sigmoid / softmax float (:func:`head_convs`); ``before_resize``: move
    quantization in front of the up blocks' nearest upsampling (:func:`quantize_before_resize`; off only
    to measure what it buys, ``dagan bench --passes``).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ExportError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if quant_format not in ("qdq", "qoperator"):
        raise ExportError(f"quantization format must be qdq or qoperator, got {quant_format!r}")
    src = Path(onnx_dir)
    manifest = read_manifest(src)
    if manifest.get("precision", "fp32") != "fp32":
        raise ExportError(f"{src} is already a {manifest['precision']} export; quantize the fp32 export")
    feeds = list(frame_feeds(src, clips))
    if not feeds:
        raise ExportError("the calibration clips gave no driving frames")
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ExportError("--out must be a new directory, not the fp32 export itself")
    out.mkdir(parents=True, exist_ok=True)

    class _Reader(CalibrationDataReader):
        """Feeds one calibration frame per ``set_range`` window: with ``CalibStridedMinMax`` = 1 the
        calibrator reduces each frame's activations to ranges/histograms before the next runs, so memory
        stays one frame's activations (every tensor of a vox-256 frame graph is ~0.5 GB) whatever the set."""

        def __init__(self, items: list[dict[str, np.ndarray]]) -> None:
            self.items = items
            self._it: Iterator[dict[str, np.ndarray]] = iter(items)

        def __len__(self) -> int:
            return len(self.items)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(self.items[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    t0 = time.perf_counter()
    # The fused frame graph, and the split path a stream with steadied keypoints runs per frame
    # (depth → keypoints → generator, engine/hot_path.py): its depth and generator graphs are quantized
    # the same way; the keypoints graph is the keypoint detector, float by default like in the frame.
    todo = {
        "frame": feeds,
        **split_feeds(src, clips, [g for g in ("generator", "depth") if g in manifest["graphs"]]),
    }
    if "kp_detector" not in keep_float and "keypoints" in manifest["graphs"]:
        todo.update(split_feeds(src, clips, ["keypoints"]))
    excluded, moved = {}, {}
    for graph, items in todo.items():
        file = manifest["graphs"][graph]["file"]
        with tempfile.TemporaryDirectory(prefix="dagan-quant-") as tmp:
            pre = Path(tmp) / f"{graph}.pre.onnx"
            # ONNX shape inference + graph clean-up first, as ONNX Runtime recommends before quantization
            # (its symbolic shape inference gives up on the dynamic batch of the Resize / GridSample chains)
            quant_pre_process(str(src / file), str(pre), skip_symbolic_shape=True)
            exclude = excluded[graph] = excluded_nodes(pre, keep_float, float_heads)
            if progress:
                print(
                    f"calibrating the {graph} graph: {len(items)} frames of {len(clips)} clips ({method}) …",
                    flush=True,
                )
            quantize_static(
                str(pre),
                str(out / file),
                _Reader(items),
                quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[method],
                extra_options={"CalibStridedMinMax": 1, "WeightSymmetric": True},
            )
        moved[graph] = _quantize_before_resize_checked(out / file, items[0]) if before_resize else 0
    import onnx

    for graph, entry in manifest["graphs"].items():
        if graph not in todo:
            shutil.copy2(src / entry["file"], out / entry["file"])
            continue
        proto = onnx.load(str(out / entry["file"]), load_external_data=False)
        entry.update({"nodes": len(proto.graph.node), "ops": sorted({n.op_type for n in proto.graph.node})})
    manifest["precision"] = "int8"
    manifest["quantization"] = {
        "source": str(src),
        "graphs": list(todo),
        "format": quant_format,
        "op_types": list(op_types),
        "per_channel": per_channel,
        "activations": "uint8 asymmetric, per tensor",
        "weights": "int8 symmetric" + (", per output channel" if per_channel else ", per tensor"),
        "method": method,
        "keep_float": list(keep_float),
        "float_heads": float_heads,
        "float_nodes": len(excluded["frame"]),
        "quantize_before_resize": moved,
        "calibration": {
            "clips": [c.name for c in clips],
            "frames": len(feeds),
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    copy_lid_reader(src, out, manifest)
    atomic_write(out / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
    return manifest


def split_feeds(
    onnx_dir: str | Path, clips: Sequence[FaceClip], graphs: Sequence[str]
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration inputs of the split per-frame path's graphs (``depth``, ``keypoints``, ``generator``)
    for every (source, driver) pair, from the fp32 graphs upstream of each: the driver for ``depth``,
    driver + its fp32 depth for ``keypoints``, the source's cached tensors + the driver's fp32 keypoints
    (absolute motion) for ``generator``."""
    import onnxruntime as ort

    manifest = read_manifest(onnx_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def session(graph: str) -> Any:
        file = str(Path(onnx_dir) / manifest["graphs"][graph]["file"])
        return ort.InferenceSession(file, opts, providers=["CPUExecutionProvider"])

    enc, kp, depth = session("source_encoder"), session("keypoints"), None
    kp_inputs = [i.name for i in kp.get_inputs()]
    if "depth" in manifest["graphs"]:
        depth = session("depth")
    enc_names = [o["name"] for o in manifest["graphs"]["source_encoder"]["outputs"]]
    kp_names = [o["name"] for o in manifest["graphs"]["keypoints"]["outputs"]]
    out: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in graphs}
    gen_inputs = (
        [s["name"] for s in manifest["graphs"]["generator"]["inputs"]] if "generator" in graphs else []
    )
    for clip in clips:
        cached = dict(zip(enc_names, enc.run(None, {"source": _to_input(clip.source)}), strict=True))
        for driver in clip.drivers:
            image = _to_input(driver)
            feed = {"image": image}
            if depth is not None:
                feed["depth"] = depth.run(None, {"image": image})[0]
            if "depth" in out:
                out["depth"].append({"image": image})
            if "keypoints" in out:
                out["keypoints"].append({k: feed[k] for k in kp_inputs})
            if "generator" in out:
                kps = dict(zip(kp_names, kp.run(None, {k: feed[k] for k in kp_inputs}), strict=True))
                values = {**cached, "kp_driving_value": kps["kp_value"]}
                if "kp_jacobian" in kps:
                    values["kp_driving_jacobian"] = kps["kp_jacobian"]
                out["generator"].append({n: values[n] for n in gen_inputs})
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (capped at 100 dB for identical ones)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse <= 1e-10 else min(100.0, 10.0 * np.log10(255.0**2 / mse))


def output_psnr(reference: Any, test: Any, clips: Sequence[FaceClip], relative: bool = False) -> list[float]:
    """Per-frame PSNR of ``test``'s avatar frames against ``reference``'s (two ``engine.Engine`` objects,
    passed in: this module sits below ``engine``)
    on the same clips: each clip's source animated by its driving crops, absolute or relative motion."""
    out = []
    for clip in clips:
        s_ref = reference.new_session(clip.source, relative=relative)
        s_test = test.new_session(clip.source, relative=relative)
        for driver in clip.drivers:
            a = reference.animate_batch([s_ref], [driver])[0].image
            b = test.animate_batch([s_test], [driver])[0].image
            out.append(psnr(a, b))
    return out


def split_path_psnr(fp32_dir: str | Path, int8_dir: str | Path, clips: Sequence[FaceClip]) -> dict[str, Any]:
    """Like :func:`held_out_psnr` for the split per-frame path (``depth`` → ``keypoints`` →
    ``generator``, what a stream with steadied keypoints runs): each export's own graphs end to end,
    absolute motion, against the fp32 export's."""
    import onnxruntime as ort

    def path(onnx_dir: str | Path) -> Any:
        manifest = read_manifest(onnx_dir)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        s = {
            g: ort.InferenceSession(str(Path(onnx_dir) / e["file"]), opts, providers=["CPUExecutionProvider"])
            for g, e in manifest["graphs"].items()
            if g in ("depth", "keypoints", "generator")
        }
        kp_in = [i.name for i in s["keypoints"].get_inputs()]
        kp_out = [o.name for o in s["keypoints"].get_outputs()]
        gen_in = [i.name for i in s["generator"].get_inputs()]

        def run(cached: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
            feed = {"image": image}
            if "depth" in s:
                feed["depth"] = s["depth"].run(None, {"image": image})[0]
            kps = dict(zip(kp_out, s["keypoints"].run(None, {k: feed[k] for k in kp_in}), strict=True))
            values = {
                **cached,
                "kp_driving_value": kps["kp_value"],
                "kp_driving_jacobian": kps.get("kp_jacobian"),
            }
            return s["generator"].run(["prediction"], {n: values[n] for n in gen_in})[0]

        return run

    if "generator" not in read_manifest(fp32_dir)["graphs"]:
        return {}
    ref, q = path(fp32_dir), path(int8_dir)

    manifest = read_manifest(fp32_dir)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    entry = manifest["graphs"]["source_encoder"]
    enc = ort.InferenceSession(str(Path(fp32_dir) / entry["file"]), opts, providers=["CPUExecutionProvider"])
    names = [o["name"] for o in entry["outputs"]]
    scores = []
    for clip in clips:
        cached = dict(zip(names, enc.run(None, {"source": _to_input(clip.source)}), strict=True))
        for driver in clip.drivers:
            image = _to_input(driver)
            scores.append(psnr(_to_uint8(ref(cached, image)), _to_uint8(q(cached, image))))
    if not scores:
        raise ExportError("the check clips gave no driving frames")
    return {"frames": len(scores), "psnr_db": float(np.mean(scores)), "psnr_min_db": float(np.min(scores))}


def record_quality(fp32_dir: str | Path, int8_dir: str | Path, check: Sequence[FaceClip], label: str) -> dict:
    """Measure :func:`held_out_psnr` (the fused frame graph) and :func:`split_path_psnr` (the steadied
    path) of ``int8_dir`` against ``fp32_dir`` on ``check`` and write them into the int8 manifest
    (``"quality"``: the worse of the two as ``psnr_db``), where the default-engine choice reads it."""
    frame = held_out_psnr(fp32_dir, int8_dir, check)
    split = split_path_psnr(fp32_dir, int8_dir, check)
    worst = min([frame, split] if split else [frame], key=lambda r: r["psnr_db"])
    quality = {
        **worst,
        "frame_graph": frame,
        "split_path": split,
        "clips": [c.name for c in check],
        "source": label,
    }
    manifest = read_manifest(int8_dir)
    manifest["quality"] = quality
    atomic_write(Path(int8_dir) / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
    return quality


def _frame_session(onnx_dir: str | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    entry = read_manifest(onnx_dir)["graphs"]["frame"]
    return ort.InferenceSession(str(Path(onnx_dir) / entry["file"]), opts, providers=["CPUExecutionProvider"])


def _to_uint8(prediction: np.ndarray) -> np.ndarray:
    """1×3×H×W in [0, 1] → H×W×3 uint8, rounded as the engines round their output frames."""
    return (np.clip(prediction[0], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def held_out_psnr(fp32_dir: str | Path, int8_dir: str | Path, clips: Sequence[FaceClip]) -> dict[str, Any]:
    """The int8 export's quality cost: mean / min PSNR of its frame graph's avatar frames against the
    fp32 export's, on ``clips`` (absolute motion; both graphs get the fp32 source encoder's cache).

    Runs the graphs with onnxruntime directly (``export`` sits below ``engine``); the engine-level
    comparison, relative motion included, is :func:`output_psnr` (used by the tests and docs)."""
    ref, q = _frame_session(fp32_dir), _frame_session(int8_dir)
    scores = [
        psnr(_to_uint8(ref.run(["prediction"], feed)[0]), _to_uint8(q.run(["prediction"], feed)[0]))
        for feed in frame_feeds(fp32_dir, clips)
    ]
    if not scores:
        raise ExportError("the check clips gave no driving frames")
    return {"frames": len(scores), "psnr_db": float(np.mean(scores)), "psnr_min_db": float(np.min(scores))}
