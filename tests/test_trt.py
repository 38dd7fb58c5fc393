"""TensorRT: profiles, engine files and cache keys, the GPU/version check, and the builder/runtime layer
driven by a fake ``tensorrt`` module whose "engines" execute the ONNX graphs with onnxruntime through the
raw device pointers the backend binds — so buffer shapes, batch slicing and address binding are checked
for real on the CPU. Real TensorRT runs only in the last test, which needs TensorRT and a GPU."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import types

import numpy as np
import pytest
import torch
from helpers import make_model

pytest.importorskip("onnxruntime")

from engine import EngineError
from engine.onnx_backend import OnnxRuntimeEngine
from engine.trt_backend import TensorRTEngine
from export.onnx_export import export_model
from export.trt_build import (
    MAGIC,
    EngineMeta,
    EngineMismatchError,
    TRTBuildError,
    build_engines,
    cache_key,
    check_batch_profile,
    check_compatible,
    profile_shapes,
    read_engine_file,
    read_engine_header,
    write_engine_file,
)

# -- pure logic ------------------------------------------------------------------------------------------


def _meta(**changes) -> EngineMeta:
    base = dict(
        graph="frame",
        tensorrt="10.3.0",
        gpu="NVIDIA GeForce RTX 4090",
        compute_capability="8.9",
        fp16=True,
        max_batch=32,
        opt_batch=8,
        onnx_sha256="ab" * 32,
        inputs=[{"name": "driving", "shape": ["batch", 3, 256, 256], "dtype": "float32"}],
        outputs=[{"name": "prediction", "shape": ["batch", 3, 256, 256], "dtype": "float32"}],
        profiles={"driving": [[1, 3, 256, 256], [8, 3, 256, 256], [32, 3, 256, 256]]},
    )
    base.update(changes)
    return EngineMeta(**base)


def test_batch_limits_and_profiles():
    assert check_batch_profile(32) == (32, 8)
    assert check_batch_profile(6) == (6, 4)
    assert check_batch_profile(1) == (1, 1)
    assert check_batch_profile(16, 16) == (16, 16)
    for bad in (0, 1000):
        with pytest.raises(TRTBuildError, match="--max-batch"):
            check_batch_profile(bad)
    with pytest.raises(TRTBuildError, match="opt batch"):
        check_batch_profile(4, 8)
    specs = [
        {"name": "driving", "shape": ["batch", 3, 64, 64]},
        {"name": "source_kp_jacobian", "shape": ["batch", 15, 2, 2]},
    ]
    shapes = profile_shapes(specs, 32, 8)
    assert shapes["driving"] == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert shapes["source_kp_jacobian"] == ((1, 15, 2, 2), (8, 15, 2, 2), (32, 15, 2, 2))
    with pytest.raises(TRTBuildError, match="only the batch axis"):
        profile_shapes([{"name": "x", "shape": ["batch", "h", 3]}], 4, 2)


def test_cache_key_changes_with_everything_that_invalidates_a_plan():
    base = ("ab" * 32, "NVIDIA H100", "10.3.0", True, 32, 8)
    key = cache_key(*base)
    assert key == cache_key(*base) and len(key) == 16
    variants = [
        ("cd" * 32, *base[1:]),
        (base[0], "NVIDIA L4", *base[2:]),
        (*base[:2], "10.4.0", *base[3:]),
        (*base[:3], False, *base[4:]),
        (*base[:4], 16, base[5]),
        (*base[:5], 4),
    ]
    assert len({cache_key(*v) for v in variants} | {key}) == len(variants) + 1


def test_engine_file_roundtrip_and_damaged_files(tmp_path):
    meta = _meta()
    path = tmp_path / "frame.engine"
    write_engine_file(path, meta, b"\x00plan-bytes\xff")
    got, plan = read_engine_file(path)
    assert got == meta and plan == b"\x00plan-bytes\xff"
    assert path.read_bytes().startswith(MAGIC)
    assert read_engine_header(path)[1] == path.stat().st_size - len(plan)
    (tmp_path / "raw.engine").write_bytes(b"a TensorRT plan without our header")
    with pytest.raises(EngineMismatchError, match="not a dagan TensorRT engine"):
        read_engine_file(tmp_path / "raw.engine")
    (tmp_path / "bad.engine").write_bytes(MAGIC + (5).to_bytes(4, "little") + b"{oops")
    with pytest.raises(EngineMismatchError, match="damaged header"):
        read_engine_file(tmp_path / "bad.engine")


def test_compatibility_check_names_what_differs():
    meta = _meta()
    check_compatible(meta, "NVIDIA GeForce RTX 4090", "10.3.0")
    with pytest.raises(EngineMismatchError, match=r"GPU 'NVIDIA GeForce RTX 4090' \(this is 'NVIDIA H100'\)"):
        check_compatible(meta, "NVIDIA H100", "10.3.0", "e/frame.engine")
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.3.0 \(this is 10.5.0\).*rebuild"):
        check_compatible(meta, "NVIDIA GeForce RTX 4090", "10.5.0")
    with pytest.raises(EngineMismatchError, match=r"GPU .* and TensorRT"):
        check_compatible(meta, "NVIDIA A10", "9.0")


# -- a fake tensorrt module ------------------------------------------------------------------------------


def _array_at(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)


def make_fake_trt(version: str = "10.0.fake"):
    """Records what the builder is asked for; the runtime runs the ONNX file named in the 'plan'."""
    import onnxruntime as ort

    trt = types.SimpleNamespace(__version__=version, builds=[], executions=[])

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            self.network.onnx = path
            return True

    class Cache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pool = set(), [], {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            self.initial_cache = data
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0  # TensorRT 10: explicit batch is the only mode
            return types.SimpleNamespace()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            name = network.onnx.rsplit("/", 1)[-1]
            config.cache = Cache(config.initial_cache + name.encode() + b";")  # "timing" accumulates
            trt.builds.append({"onnx": name, "config": config})
            return json.dumps({"onnx": network.onnx, "max": config.profiles[0].shapes}).encode()

    class Engine:
        def __init__(self, plan):
            info = json.loads(plan)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.sess = ort.InferenceSession(info["onnx"], opts, providers=["CPUExecutionProvider"])
            self.max = {k: v[2] for k, v in info["max"].items()}
            self.names = [i.name for i in self.sess.get_inputs()] + [o.name for o in self.sess.get_outputs()]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            inputs = {i.name for i in self.sess.get_inputs()}
            return trt.TensorIOMode.INPUT if name in inputs else trt.TensorIOMode.OUTPUT

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            assert all(s <= m for s, m in zip(shape, self.engine.max[name], strict=True)), "outside profile"
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            feed = {n: _array_at(self.addresses[n], s).copy() for n, s in self.shapes.items()}
            outs = self.engine.sess.run(None, feed)
            for meta, value in zip(self.engine.sess.get_outputs(), outs, strict=True):
                _array_at(self.addresses[meta.name], value.shape)[...] = value
            trt.executions.append({n: s[0] for n, s in self.shapes.items()})
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(plan)

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, Parser, Builder, Runtime
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    return trt


GPU = ("Fake GPU 9000", "9.0")


@pytest.fixture(scope="module")
def model():
    from dagan.config import load_config

    m = make_model(load_config("tiny"), seed=5)
    with torch.no_grad():
        m.generator.final.weight.mul_(10.0)
    return m


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "onnx"
    export_model(model, out, progress=False)
    return out


def test_build_engines_profiles_fp16_and_timing_cache(onnx_dir, tmp_path):
    trt = make_fake_trt()
    out = tmp_path / "engines"
    result = build_engines(onnx_dir, out, fp16=True, max_batch=4, progress=False, trt=trt, gpu=GPU)
    built = [b["onnx"] for b in trt.builds]
    assert built == ["depth.onnx", "keypoints.onnx", "source_encoder.onnx", "frame.onnx"]  # not generator
    frame_cfg = trt.builds[-1]["config"]
    assert "fp16" in frame_cfg.flags and frame_cfg.pool["workspace"] > 0
    assert frame_cfg.profiles[0].shapes["driving"] == ((1, 3, 64, 64), (4, 3, 64, 64), (4, 3, 64, 64))
    assert frame_cfg.profiles[0].shapes["source_query"][2] == (4, 256, 8)
    # each build starts from the timing cache the previous one left, and the file keeps all of it
    assert frame_cfg.initial_cache == b"depth.onnx;keypoints.onnx;source_encoder.onnx;"
    assert (out / "timing.cache").read_bytes() == b"depth.onnx;keypoints.onnx;source_encoder.onnx;frame.onnx;"
    meta, _ = read_engine_file(out / "frame.engine")
    assert (meta.gpu, meta.compute_capability, meta.tensorrt) == (GPU[0], GPU[1], "10.0.fake")
    assert meta.fp16 and meta.max_batch == 4 and meta.opt_batch == 4
    assert result["engines"].keys() == {"depth", "keypoints", "source_encoder", "frame"}
    # a second build into the same directory reuses the saved timing cache
    trt2 = make_fake_trt()
    build_engines(onnx_dir, out, fp16=False, max_batch=2, progress=False, trt=trt2, gpu=GPU)
    assert trt2.builds[0]["config"].initial_cache.endswith(b"frame.onnx;")
    assert "fp16" not in trt2.builds[0]["config"].flags


def test_tensorrt_engine_matches_onnxruntime_through_bound_buffers(model, onnx_dir, tmp_path):
    trt = make_fake_trt()
    out = tmp_path / "engines"
    build_engines(onnx_dir, out, fp16=True, max_batch=2, progress=False, trt=trt, gpu=GPU)
    eng = TensorRTEngine(out, device="cpu", trt=trt, gpu=GPU)
    ref = OnnxRuntimeEngine(onnx_dir, device="cpu")
    assert eng.backend == "tensorrt" and eng.precision == "fp16"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    sessions = [eng.new_session(frames[i], relative=i == 1) for i in range(3)]
    ref_sessions = [ref.new_session(frames[i], relative=i == 1) for i in range(3)]
    # 3 streams on an engine built for batch ≤ 2: the batch is split, results stay in order
    got = eng.animate_batch(sessions, frames[3:], return_depth=True)
    want = ref.animate_batch(ref_sessions, frames[3:], return_depth=True)
    for g, w in zip(got, want, strict=True):
        # onnxruntime may pick another kernel for a batch of 2 than of 3: a float rounding can flip one
        # uint8 level of a pixel (seen: 1 pixel in 12,288), never more
        diff = np.abs(g.image.astype(np.int16) - w.image.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        assert np.allclose(g.driving_depth, w.driving_depth, rtol=1e-5, atol=1e-6)
    assert [e["driving"] for e in trt.executions if "driving" in e] == [2, 1]
    # the cached source tensors are copies, not views of buffers the next call overwrites
    before = sessions[0].source["source_features"].clone()
    eng.new_session(frames[5])
    assert torch.equal(before, sessions[0].source["source_features"])
    with pytest.raises(EngineError, match="expected"):
        eng.runner.run("depth", {"image": torch.zeros(1, 3, 32, 32)})


def test_mismatched_engines_fail_clearly_and_are_rebuilt(model, onnx_dir, tmp_path):
    trt = make_fake_trt("10.0.fake")
    out = tmp_path / "engines"
    build_engines(onnx_dir, out, fp16=True, max_batch=2, progress=False, trt=trt, gpu=GPU)
    newer = make_fake_trt("10.9.fake")
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.0.fake \(this is 10.9.fake\)"):
        TensorRTEngine(out, device="cpu", trt=newer, gpu=GPU)
    with pytest.raises(EngineMismatchError, match="Fake GPU 9000"):
        TensorRTEngine(out, device="cpu", trt=trt, gpu=("Other GPU", "8.0"))
    # the service path: from_path rebuilds from the recorded ONNX export into the cache
    eng = TensorRTEngine.from_path(
        out, device="cpu", max_batch=2, cache_dir=tmp_path / "c", trt=newer, gpu=GPU
    )
    assert newer.builds and eng.engine_dir.parent == tmp_path / "c" / "tensorrt"
    assert read_engine_file(eng.engine_dir / "frame.engine")[0].tensorrt == "10.9.fake"
    # cached now: a second call builds nothing
    n = len(newer.builds)
    TensorRTEngine.from_path(
        onnx_dir, device="cpu", max_batch=2, cache_dir=tmp_path / "c", trt=newer, gpu=GPU
    )
    assert len(newer.builds) == n


def test_tensorrt_backend_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="CUDA GPU"):
        TensorRTEngine(tmp_path, device="cpu")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="needs TensorRT and a CUDA GPU (NVIDIA's TensorRT container)",
)
def test_real_tensorrt_fp16_close_to_torch(model, onnx_dir, tmp_path):
    from engine.torch_backend import TorchEngine

    eng = TensorRTEngine.from_path(onnx_dir, device="cuda", precision="fp16", max_batch=4, cache_dir=tmp_path)
    ref = TorchEngine(model, device="cuda")
    rng = np.random.default_rng(1)
    src, drv = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    eng.set_source(src)
    ref.set_source(src)
    diff = np.abs(eng.animate(drv).image.astype(int) - ref.animate(drv).image.astype(int))
    assert diff.mean() < 2.0


def test_live128_builds_and_runs_through_the_tensorrt_builder(tmp_path):
    """The bundled preset (warped skip tensors among the cached inputs) through the builder and the
    TensorRT runtime, against onnxruntime on the same export."""
    from dagan.config import load_config

    m = make_model(load_config("live-128"), seed=3)
    onnx_dir = tmp_path / "onnx"
    export_model(m, onnx_dir, progress=False)
    trt = make_fake_trt()
    out = tmp_path / "engines"
    build_engines(onnx_dir, out, fp16=True, max_batch=2, progress=False, trt=trt, gpu=GPU)
    frame_cfg = trt.builds[-1]["config"]
    assert frame_cfg.profiles[0].shapes["driving"][2] == (2, 3, 128, 128)
    assert frame_cfg.profiles[0].shapes["source_skip0"][2] == (2, 16, 128, 128)
    assert frame_cfg.profiles[0].shapes["source_skip1"][2] == (2, 32, 64, 64)
    eng = TensorRTEngine(out, device="cpu", trt=trt, gpu=GPU)
    ref = OnnxRuntimeEngine(onnx_dir, device="cpu")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(4)]
    got = eng.animate_batch(
        [eng.new_session(frames[0]), eng.new_session(frames[1], relative=True)], frames[2:]
    )
    want = ref.animate_batch(
        [ref.new_session(frames[0]), ref.new_session(frames[1], relative=True)], frames[2:]
    )
    for g, w in zip(got, want, strict=True):
        assert g.image.shape == (128, 128, 3) and np.array_equal(g.image, w.image)
