"""Docker files checked without a Docker engine (none runs on CI machines), and the entrypoint's engine
cache logic run for real with a fake builder: build once, reuse, rebuild on a GPU / TensorRT / weights
change, and never trust a half-built folder."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load_entrypoint():
    spec = importlib.util.spec_from_file_location("dagan_entrypoint", ROOT / "docker" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ep = _load_entrypoint()


class CountingBuild:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, checkpoint: Path, out: Path) -> None:
        self.calls += 1
        (out / "trt").mkdir()
        (out / "trt" / "generator.engine").write_bytes(b"engine-bytes")
        if self.fail:
            raise RuntimeError("builder crashed")


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights v1")
    return path


def test_build_once_then_reuse(tmp_path, ckpt):
    cache = tmp_path / "engines"
    build = CountingBuild()
    first, built = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", build)
    assert built and build.calls == 1
    assert (first / "READY.json").is_file() and (first / "trt" / "generator.engine").is_file()
    again, built = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", build)
    assert again == first and not built and build.calls == 1  # a second start must not rebuild
    assert not list(cache.glob(".*.building-*"))


def test_rebuild_on_gpu_tensorrt_or_weights_change(tmp_path, ckpt):
    cache = tmp_path / "engines"
    build = CountingBuild()
    a, _ = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", build)
    b, built_b = ep.ensure_engines(cache, ckpt, "NVIDIA H100 80GB HBM3", "10.7.0", build)
    c, built_c = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.8.0", build)
    ckpt.write_bytes(b"weights v2")
    d, built_d = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", build)
    assert built_b and built_c and built_d and build.calls == 4
    assert len({a, b, c, d}) == 4
    # switching back to a GPU seen before reuses its engines
    _, built = ep.ensure_engines(cache, ckpt, "NVIDIA H100 80GB HBM3", "10.7.0", build)
    assert built and build.calls == 5  # new weights: v2 on the H100 was never built
    _, built = ep.ensure_engines(cache, ckpt, "NVIDIA H100 80GB HBM3", "10.7.0", build)
    assert not built and build.calls == 5


def test_failed_or_incomplete_build_is_never_used(tmp_path, ckpt):
    cache = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="builder crashed"):
        ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", CountingBuild(fail=True))
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".lock")] == []
    # a folder without READY.json (e.g. copied by hand, or an old layout) is rebuilt, not trusted
    key = ep.cache_key("NVIDIA L4", "10.7.0", ep.file_digest(ckpt))
    (cache / key).mkdir()
    (cache / ".stale.building-123").mkdir()
    build = CountingBuild()
    final, built = ep.ensure_engines(cache, ckpt, "NVIDIA L4", "10.7.0", build)
    assert built and final.name == key and (final / "READY.json").is_file()
    assert not (cache / ".stale.building-123").exists()


def test_cache_key():
    k = ep.cache_key("NVIDIA GeForce RTX 4090", "10.7.0", "abc123")
    assert k == "NVIDIA_GeForce_RTX_4090-trt10.7.0-abc123"
    assert ep.cache_key(None, None, "abc123") == "cpu-onnxruntime-abc123"
    assert "/" not in ep.cache_key("weird/gpu name", "10", "d")


def test_serve_command_points_at_the_built_engines(tmp_path):
    cmd = ep.serve_command("tensorrt", tmp_path, ["--max-sessions", "4"])
    assert cmd[:4] == ["dagan", "serve", "--backend", "tensorrt"]
    assert cmd[cmd.index("--checkpoint") + 1] == str(tmp_path / "trt") and "fp16" in cmd
    assert cmd[-2:] == ["--max-sessions", "4"]
    assert str(tmp_path / "onnx") in ep.serve_command("onnxruntime", tmp_path, [])


def test_entrypoint_without_weights_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGAN_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    assert ep.main([]) == 2
    assert "no weights at" in capsys.readouterr().err


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_has_what_the_service_needs():
    doc = _compose()
    gpu = doc["services"]["dagan"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (
        devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"] and devices[0]["count"] == 1
    )
    assert any(str(p).endswith(":8000") for p in gpu["ports"])
    assert gpu["restart"] == "unless-stopped"
    assert "engines:/engines" in gpu["volumes"] and any(v.endswith(":/weights:ro") for v in gpu["volumes"])
    assert "engines" in doc["volumes"]
    for key in ("DAGAN_CHECKPOINT", "DAGAN_BACKEND", "DAGAN_MAX_SESSIONS", "DAGAN_ICE_SERVERS"):
        assert key in gpu["environment"]
    cpu = doc["services"]["dagan-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["DAGAN_BACKEND"] == "onnxruntime"
    for svc in (gpu, cpu):
        assert (ROOT / svc["build"]["dockerfile"]).is_file()


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1, Debian's package), whichever exists."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose CLI installed here")
def test_docker_compose_config_validates():
    for profile in ([], ["--profile", "cpu"]):
        cmd = [*_compose_cli(), *profile, "config", "-q"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles(name):
    text = (ROOT / "docker" / name).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), image  # pinned base images
    assert re.search(r"^USER\s+(?!root)\w+", text, re.M)  # non-root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r"^EXPOSE 8000", text, re.M)
    assert "ENTRYPOINT" in text and "dagan-entrypoint" in text
    for copied in re.findall(r"^COPY\s+(\S+)\s", text, re.M):
        assert (ROOT / copied).exists(), f"{name} copies {copied}, which does not exist"
    # runtime images carry no training extras
    assert "training" not in re.findall(r"^COPY\s+(\S+)", text, re.M)
    extras = re.search(r'pip install "\.\[([a-z,]+)\]"', text).group(1).split(",")
    assert "serve" in extras and "export" in extras and "train" not in extras and "test" not in extras
    if name == "Dockerfile":  # the GPU image takes onnxruntime-gpu, never the CPU wheel on top of it
        assert "ort" not in extras and "onnxruntime-gpu" in text


def test_dockerignore_keeps_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "training", "*.onnx"):
        assert entry in ignored
