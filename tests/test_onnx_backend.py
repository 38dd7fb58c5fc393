"""The onnxruntime backend passes the same behavioural tests as the PyTorch backend (tiny and live-128
presets, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_model

pytest.importorskip("onnxruntime")

from dagan.graph_contract import ROLE_CACHED, cached_names, names_with_role
from dagan.keypoint_ops import relative_keypoints
from engine import EngineError, available_backends, create_engine
from engine.onnx_backend import OnnxRuntimeEngine, choose_providers, io_shapes
from engine.torch_backend import TorchEngine
from export.onnx_export import export_model

SIZE = {"tiny": 64, "live-128": 128}
_size = [64]  # the current module-scoped model's image size (set by the ``model`` fixture)


def _frames(n: int, size: int | None = None, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = size or _size[0]
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _close(a: np.ndarray, b: np.ndarray, tol: int = 1) -> bool:
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


@pytest.fixture(scope="module", params=["tiny", "live-128"])
def model(request):
    from dagan.config import load_config

    _size[0] = SIZE[request.param]
    m = make_model(load_config(request.param), seed=3)
    with torch.no_grad():
        m.generator.final.weight.mul_(10.0)  # spread the outputs so uint8 comparisons are meaningful
    return m


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "onnx"
    export_model(model, out, progress=False)
    return out


@pytest.fixture
def engines(model, onnx_dir):
    return OnnxRuntimeEngine(onnx_dir, device="cpu"), TorchEngine(model, device="cpu")


def test_animate_matches_torch_backend(engines):
    ort_e, torch_e = engines
    src, drv = _frames(2)
    ort_e.set_source(src)
    torch_e.set_source(src)
    out = ort_e.animate(drv, return_depth=True)
    ref = torch_e.animate(drv, return_depth=True)
    assert out.image.shape == (_size[0], _size[0], 3) and out.image.dtype == np.uint8
    assert _close(out.image, ref.image) and _close(out.driving_depth, ref.driving_depth)
    assert _close(ort_e.session.source_depth, torch_e.session.source_depth)
    assert out.image.std() > 3  # not a flat image: the comparison can fail
    assert ort_e.backend == "onnxruntime" and ort_e.provider == "CPUExecutionProvider"


def test_animate_batch_equals_separate_sessions(engines):
    engine, _ = engines
    src_a, src_b, src_c, drv_a, drv_b, drv_c = _frames(6, seed=1)
    a, b, c = engine.new_session(src_a), engine.new_session(src_b), engine.new_session(src_c)
    batch = engine.animate_batch([a, b, c], [drv_a, drv_b, drv_c])
    again = engine.animate_batch([a, b, c], [drv_a, drv_b, drv_c])  # cached stacking reused
    for res, sess, drv, rep in zip(batch, [a, b, c], [drv_a, drv_b, drv_c], again, strict=True):
        assert _close(res.image, engine.animate_batch([sess], [drv])[0].image)
        assert np.array_equal(res.image, rep.image)
    assert not _close(batch[0].image, batch[1].image, tol=0)
    # a different session list must not reuse the stacked tensors of the previous one
    swapped = engine.animate_batch([b, a, c], [drv_b, drv_a, drv_c])
    assert np.array_equal(swapped[0].image, batch[1].image) and np.array_equal(
        swapped[1].image, batch[0].image
    )
    with pytest.raises(EngineError, match="2 sessions but 1 frames"):
        engine.animate_batch([a, b], [drv_a])
    assert engine.animate_batch([], []) == []


def test_relative_motion_matches_torch_backend(engines, model):
    engine, torch_e = engines
    src, ref, later, other = _frames(4, seed=2)
    session = engine.set_source(src, relative=True)
    first = engine.animate(ref)
    assert session.reference is not None and session.scale is not None
    # at the reference pose the source keypoints are used unchanged (same as the torch backend's test)
    t_sess = torch_e.set_source(src, relative=True)
    with torch.no_grad():
        own = torch_e._to_images(model.render(t_sess.source, t_sess.source.kp).prediction)[0]
    assert _close(first.image, own)
    # a later frame is driven relative to that reference, as dagan.keypoint_ops does it
    torch_e.animate(ref)
    assert _close(engine.animate(later).image, torch_e.animate(later).image)
    with torch.no_grad():
        kp_later, _ = model.driving_keypoints(torch_e._to_tensor([later], "d"))
        expected_kp = relative_keypoints(t_sess.source.kp, kp_later, t_sess.reference, t_sess.scale)
        expected = torch_e._to_images(model.render(t_sess.source, expected_kp).prediction)[0]
    assert _close(engine.animate(later).image, expected)
    before = session.reference
    engine.reset_reference()
    assert session.reference is None
    engine.animate(other)
    assert not torch.equal(session.reference.value, before.value)


def test_mixed_relative_and_absolute_batch(engines):
    engine, _ = engines
    src_a, src_b, ref_a, drv_a, drv_b = _frames(5, seed=6)
    rel = engine.new_session(src_a, relative=True)
    rel_single = engine.new_session(src_a, relative=True)
    absolute = engine.new_session(src_b)
    engine.animate_batch([rel_single], [ref_a])
    out = engine.animate_batch([rel, absolute], [ref_a, drv_b])  # rel takes ref_a as its reference
    assert torch.allclose(rel.reference.value, rel_single.reference.value, atol=1e-5)
    out = engine.animate_batch([rel, absolute], [drv_a, drv_b])
    assert _close(out[0].image, engine.animate_batch([rel_single], [drv_a])[0].image)
    assert _close(out[1].image, engine.animate_batch([absolute], [drv_b])[0].image)


def test_bad_inputs_and_foreign_sessions(engines, onnx_dir):
    engine, torch_e = engines
    with pytest.raises(EngineError, match="set_source"):
        engine.animate(_frames(1)[0])
    with pytest.raises(EngineError, match="H×W×3"):
        engine.set_source(np.zeros((64, 64), np.uint8))
    with pytest.raises(EngineError, match="uint8"):
        engine.set_source(np.zeros((64, 64, 3), np.float32))
    foreign = torch_e.new_session(_frames(1)[0])
    with pytest.raises(EngineError, match="another backend"):
        engine.animate_batch([foreign], _frames(1))
    with pytest.raises(EngineError, match="fp16"):
        OnnxRuntimeEngine(onnx_dir, device="cpu", precision="fp16")
    out = engine.animate_batch([engine.new_session(_frames(1, size=100)[0])], _frames(1, size=80))
    assert out[0].image.shape == (_size[0], _size[0], 3)


def test_create_engine_exports_once_and_auto_prefers_ready_export(model, onnx_dir, tmp_path, monkeypatch):
    import json
    import shutil

    import export.onnx_export as onnx_export
    from dagan.checkpoint import save_checkpoint

    monkeypatch.setenv("DAGAN_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model.config, model)
    calls = []

    def fake_export(checkpoint, out, progress=True, opset=17):
        """The module's export of the same weights, stamped with this checkpoint's hash (the real export
        is covered by test_export.py; here only the caching around it is under test)."""
        calls.append(checkpoint)
        shutil.copytree(onnx_dir, out)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["checkpoint_sha256"] = onnx_export.file_sha256(checkpoint)
        (out / "manifest.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    if not torch.cuda.is_available():
        # nothing exported yet: auto must not start an export on its own
        assert available_backends(ckpt) == ["torch"]
        assert create_engine(ckpt, device="cpu").backend == "torch"
    eng = create_engine(ckpt, backend="onnxruntime", device="cpu")
    manifest = next((tmp_path / "cache" / "onnx").glob("*/manifest.json"))
    stamp = manifest.stat().st_mtime_ns
    assert create_engine(ckpt, backend="onnxruntime", device="cpu").backend == "onnxruntime"
    assert manifest.stat().st_mtime_ns == stamp and len(calls) == 1  # reused, not re-exported
    if not torch.cuda.is_available():
        assert create_engine(ckpt, device="cpu").backend == "onnxruntime"
    # weights on the CPU run the frame graph rewritten for the CPU provider (export/optimize.py), cached
    # beside the plain export; an export directory works directly too, and computes the same frames
    # (float rounding apart: at most one level of an 8-bit pixel)
    (cpu_dir,) = (tmp_path / "cache" / "onnx-cpu").glob("*/manifest.json")
    assert json.loads(cpu_dir.read_text())["cpu_graph"]["passes"]
    direct = create_engine(manifest.parent, backend="auto", device="cpu")
    src, drv = _frames(2, seed=9)
    eng.set_source(src)
    direct.set_source(src)
    diff = np.abs(eng.animate(drv).image.astype(int) - direct.animate(drv).image.astype(int))
    assert diff.max() <= 1
    with pytest.raises(EngineError, match="not found"):
        create_engine(tmp_path / "missing.safetensors", backend="onnxruntime")


def test_roles_come_from_the_manifest(engines, onnx_dir, model):
    """The cached source tensors are the frame inputs the manifest marks as cached (the live-128 skips
    included), not whatever happens to start with ``source_``."""
    import json

    engine, _ = engines
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert engine.cached_inputs == names_with_role(manifest["graphs"]["frame"], ROLE_CACHED)
    assert engine.cached_inputs == cached_names(model.config)
    # an engine directory built from an export without roles is refused, not guessed from names
    import types

    from engine.onnx_backend import GraphEngine

    for spec in manifest["graphs"]["frame"]["inputs"]:
        del spec["role"]
    runner = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(EngineError, match="predates input roles"):
        GraphEngine(manifest, runner)
    # a session's stacked sources are reused while the batch is the same, and rebuilt when it changes
    a, b = engine.new_session(_frames(1, seed=3)[0]), engine.new_session(_frames(1, seed=4)[0])
    engine.animate_batch([a, b], _frames(2, seed=5))
    version = engine._stack.version
    engine.animate_batch([a, b], _frames(2, seed=6))
    assert engine._stack.version == version
    engine.animate_batch([b, a], _frames(2, seed=6))
    assert engine._stack.version == version + 1


def test_relative_without_scale_adaptation_matches_torch(engines):
    """adapt_scale=False (the authors' --relative alone): scale 1, the same frames on both backends."""
    ort_e, torch_e = engines
    src, ref, later = _frames(3, seed=12)
    got, want = [], []
    for eng, out in ((ort_e, got), (torch_e, want)):
        session = eng.set_source(src, relative=True, adapt_scale=False)
        eng.animate(ref)
        assert float(session.scale.reshape(())) == 1.0
        out.append(eng.animate(later).image)
    assert _close(got[0], want[0])


def test_create_engine_passes_options_through(model, onnx_dir):
    eng = create_engine(onnx_dir, backend="auto", device="cpu", threads=1)
    assert eng.backend == "onnxruntime"
    with pytest.raises(EngineError, match="takes no option cuda_graphs"):
        create_engine(onnx_dir, backend="onnxruntime", device="cpu", cuda_graphs=True)
    with pytest.raises(EngineError, match=r"no backend could be created.*takes no option"):
        create_engine(onnx_dir, backend="auto", device="cpu", no_such_option=1)


def test_pure_helpers():
    specs = [{"name": "a", "shape": ["batch", 3, 4]}, {"name": "b", "shape": ["batch", 15, 2, 2]}]
    assert io_shapes(specs, 5) == {"a": (5, 3, 4), "b": (5, 15, 2, 2)}
    with pytest.raises(EngineError, match="expected"):
        io_shapes([{"name": "c", "shape": [1, "h"]}], 2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_providers(cpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cuda, avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cuda, avail, tensorrt=True) == avail
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        choose_providers(cuda, ["CPUExecutionProvider"])


def test_torch_gpu_options_are_refused_on_the_cpu(model):
    with pytest.raises(EngineError, match="cuda_graphs needs a CUDA device"):
        TorchEngine(model, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_graphs_and_channels_last_match_eager(model):
    """The captured per-frame graph (with in-graph relative transfer) gives the eager path's frames."""
    eager = TorchEngine(make_model(model.config, seed=3), device="cuda")
    graphed = TorchEngine(
        make_model(model.config, seed=3), device="cuda", channels_last=True, cuda_graphs=True
    )
    src_a, src_b, ref, drv_a, drv_b = _frames(5, seed=11)
    for eng in (eager, graphed):
        eng.sessions = [eng.new_session(src_a, relative=True), eng.new_session(src_b)]
        eng.animate_batch(eng.sessions, [ref, drv_b])
    for _ in range(2):  # second call replays the captured graph
        got = graphed.animate_batch(graphed.sessions, [drv_a, drv_b])
    want = eager.animate_batch(eager.sessions, [drv_a, drv_b])
    for g, w in zip(got, want, strict=True):
        assert _close(g.image, w.image, tol=2)
    # the replays reused the static cached-source buffers: they were filled for this stack only once
    assert graphed._graphs[2].cached_version == graphed._stack.version
    swapped = graphed.animate_batch(graphed.sessions[::-1], [drv_b, drv_a])  # a new stack: refilled
    want = eager.animate_batch(eager.sessions[::-1], [drv_b, drv_a])
    for g, w in zip(swapped, want, strict=True):
        assert _close(g.image, w.image, tol=2)
