"""Docker files checked without a Docker engine, and the entrypoint's logic run for real with fake builders:
the engine cache (build once, reuse, rebuild on a GPU / TensorRT / weights change, never trust a
half-built folder), the TensorRT fallback, the unwritable-cache error. The images themselves are built,
started and called over WebRTC by the docker CI lane (scripts/ci_docker.sh), which needs a Docker engine."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
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
    from dagan.helpers import cache_key

    k = ep.cache_key("NVIDIA GeForce RTX 4090", "10.7.0", "abc123")
    assert k == cache_key(
        "abc123", "NVIDIA GeForce RTX 4090", "10.7.0", label="NVIDIA GeForce RTX 4090-trt10.7.0"
    )
    assert k.startswith("NVIDIA_GeForce_RTX_4090-trt10.7.0-") and len(k.rsplit("-", 1)[1]) == 16
    assert ep.cache_key(None, None, "abc123").startswith("cpu-onnxruntime-")
    # any change of weights, GPU or TensorRT gives another folder
    keys = {
        ep.cache_key(g, t, d)
        for g, t, d in [("A", "1", "x"), ("B", "1", "x"), ("A", "2", "x"), ("A", "1", "y")]
    }
    assert len(keys) == 4
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


def test_unwritable_engine_cache_is_one_clear_line(tmp_path, monkeypatch, capsys, ckpt):
    """A root-owned host folder at /engines: one line naming the fix and exit 2, never a traceback.

    CI runs as root, for whom every folder is writable, so the permission answer is patched; the real
    root-owned mount is exercised against the built image by scripts/ci_docker.sh."""
    cache = tmp_path / "engines"
    cache.mkdir()
    monkeypatch.setenv("DAGAN_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("DAGAN_ENGINE_CACHE", str(cache))
    monkeypatch.setattr(ep.os, "access", lambda path, mode: Path(path) != cache)
    monkeypatch.setattr(ep, "probe_gpu", lambda: pytest.fail("must stop before probing the GPU"))
    assert ep.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write the engine cache {cache}" in err[0]
    assert "chown" in err[0] and "named volume" in err[0]
    monkeypatch.setattr(ep.os, "access", lambda path, mode: True)
    assert ep.cache_unwritable(cache) is None


class Exec(Exception):
    """Raised by the patched os.execvp: what the entrypoint would have become."""


def _run_entrypoint(monkeypatch, tmp_path, ckpt, trt_fails: bool) -> tuple[list[str], list[bool]]:
    """main() on a fake GPU host; returns (the exec'd command, the tensorrt flag of each build)."""
    builds: list[bool] = []

    def fake_build(checkpoint: Path, out_dir: Path, tensorrt: bool, max_batch: int) -> None:
        builds.append(tensorrt)
        if tensorrt and trt_fails:
            raise subprocess.CalledProcessError(1, ["dagan", "export", "trt"])
        (out_dir / ("trt" if tensorrt else "onnx")).mkdir()

    def fake_exec(file: str, cmd: list[str]) -> None:
        raise Exec(cmd)

    monkeypatch.setenv("DAGAN_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("DAGAN_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.delenv("DAGAN_BACKEND", raising=False)
    monkeypatch.setattr(ep, "probe_gpu", lambda: "NVIDIA L4")
    monkeypatch.setattr(ep, "probe_tensorrt", lambda: "10.7.0")
    monkeypatch.setattr(ep, "build_with_cli", fake_build)
    monkeypatch.setattr(ep.os, "execvp", fake_exec)
    with pytest.raises(Exec) as exc:
        ep.main([])
    return exc.value.args[0], builds


def test_failed_tensorrt_build_falls_back_to_onnxruntime_once(tmp_path, monkeypatch, capsys, ckpt):
    cmd, builds = _run_entrypoint(monkeypatch, tmp_path, ckpt, trt_fails=True)
    assert builds == [True, False]  # TensorRT tried, then the ONNX export
    assert cmd[:4] == ["dagan", "serve", "--backend", "onnxruntime"]
    assert "TensorRT engine build failed" in capsys.readouterr().err
    # the next start (a restart policy) does not spend minutes failing the same build again
    cmd, builds = _run_entrypoint(monkeypatch, tmp_path, ckpt, trt_fails=True)
    assert builds == [] and cmd[3] == "onnxruntime"  # the ONNX export is cached too
    assert "failed before" in capsys.readouterr().err
    monkeypatch.setenv("DAGAN_RETRY_TENSORRT", "1")
    _, builds = _run_entrypoint(monkeypatch, tmp_path, ckpt, trt_fails=False)
    assert builds == [True]


def test_cpu_host_serves_the_servers_own_engine_choice(tmp_path, monkeypatch, ckpt):
    """No GPU and DAGAN_BACKEND=auto: nothing is built by the entrypoint; ``dagan serve`` gets the weights
    and its export cache in the engine volume; DAGAN_BACKEND=onnxruntime keeps the plain ONNX export."""
    builds: list[bool] = []
    monkeypatch.setenv("DAGAN_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("DAGAN_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setenv("DAGAN_CACHE", "recorded, so that the test's change is undone")
    monkeypatch.delenv("DAGAN_CACHE")
    monkeypatch.setattr(ep, "probe_gpu", lambda: None)
    monkeypatch.setattr(ep, "probe_tensorrt", lambda: None)
    monkeypatch.setattr(ep, "build_with_cli", lambda c, o, trt, b: (builds.append(trt), (o / "onnx").mkdir()))

    def fake_exec(file: str, cmd: list[str]) -> None:
        raise Exec(cmd)

    monkeypatch.setattr(ep.os, "execvp", fake_exec)
    monkeypatch.setenv("DAGAN_BACKEND", "auto")
    with pytest.raises(Exec) as exc:
        ep.main(["--max-sessions", "2"])
    assert exc.value.args[0] == ["dagan", "serve", "--checkpoint", str(ckpt), "--max-sessions", "2"]
    assert builds == [] and ep.os.environ["DAGAN_CACHE"] == str(tmp_path / "engines" / "cpu")
    monkeypatch.setenv("DAGAN_BACKEND", "onnxruntime")
    with pytest.raises(Exec) as exc:
        ep.main([])
    assert builds == [False] and exc.value.args[0][:4] == ["dagan", "serve", "--backend", "onnxruntime"]


def test_working_tensorrt_build_serves_tensorrt(tmp_path, monkeypatch, ckpt):
    cmd, builds = _run_entrypoint(monkeypatch, tmp_path, ckpt, trt_fails=False)
    assert builds == [True] and cmd[3] == "tensorrt"


# ------------------------------------------------------------------------------------- compose file


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


def _arg_default(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)", text, re.M).group(1)


def test_compose_file_has_what_the_service_needs():
    doc = _compose()
    gpu = doc["services"]["dagan"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (
        devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"] and devices[0]["count"] == 1
    )
    assert gpu["restart"] == "unless-stopped"
    assert "engines:/engines" in gpu["volumes"] and any(v.endswith(":/weights:ro") for v in gpu["volumes"])
    assert "engines" in doc["volumes"]
    for key in ("DAGAN_CHECKPOINT", "DAGAN_BACKEND", "DAGAN_MAX_SESSIONS", "DAGAN_ICE_SERVERS"):
        assert key in gpu["environment"]
    cpu = doc["services"]["dagan-cpu"]
    # the CPU service lets the server choose its CPU engine (entrypoint: cpu_serve_command)
    assert "deploy" not in cpu and cpu["environment"]["DAGAN_BACKEND"] == "${DAGAN_BACKEND:-auto}"
    for svc in (gpu, cpu):
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
        # the port inside is the server's own setting; published by the default override (below)
        assert svc["environment"]["DAGAN_PORT"] == "${DAGAN_PORT:-8000}" and "ports" not in svc
        # the default weights file is the one shipped in weights/
        ckpt = svc["environment"]["DAGAN_CHECKPOINT"].replace("${DAGAN_WEIGHTS_FILE:-", "").rstrip("}")
        assert (ROOT / "weights" / Path(ckpt).name).is_file()


def test_port_is_published_by_the_default_override_only():
    """`docker compose up` reads docker-compose.override.yml by itself and publishes DAGAN_PORT on the
    same port inside; the host-networking overrides, named with -f, leave it out (Compose 1.29 refuses
    host networking together with published ports)."""
    override = yaml.safe_load((ROOT / "docker-compose.override.yml").read_text())["services"]
    assert set(override) == {"dagan", "dagan-cpu"}
    for svc in override.values():
        assert svc == {"ports": ["${DAGAN_PORT:-8000}:${DAGAN_PORT:-8000}"]}
    for name in ("docker-compose.host.yml", "docker-compose.ci.yml"):
        for svc in yaml.safe_load((ROOT / name).read_text())["services"].values():
            assert svc["network_mode"] == "host" and "ports" not in svc


def test_profiles_start_one_service_each():
    """`up` starts the GPU service, `--profile cpu up` the CPU one alone: each is under its own profile
    and .env makes gpu the default, which a --profile flag replaces (Compose v1 and v2 alike)."""
    services = _compose()["services"]
    assert services["dagan"]["profiles"] == ["gpu"] and services["dagan-cpu"]["profiles"] == ["cpu"]
    env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env == {"COMPOSE_PROFILES": "gpu"}


# Set by the image or the entrypoint, or meaningless in a container: not passed through from the host.
NOT_PASSED = {"DAGAN_HOST", "DAGAN_CLIENT_DIR", "DAGAN_DEVICE", "DAGAN_PRECISION", "DAGAN_BACKEND"}


def test_compose_passes_every_server_setting_through():
    """Every DAGAN_* variable the server reads (the rows of its option tables, read by one function)
    reaches the container, TURN and host-address settings included, without writing a value (a secret)
    into the compose file; and no module of the server reads a variable outside those tables."""
    from server.cli import SERVE_OPTIONS

    read = {name for opt in SERVE_OPTIONS for name in opt.envs}
    assert {
        "DAGAN_ICE_SERVERS",
        "DAGAN_ICE_HOST_ADDRESSES",
        "DAGAN_REPLICA_ID",
        "DAGAN_INFER_THREADS",
    } <= read
    for source in ("cli.py", "settings.py"):
        assert "os.environ" not in (ROOT / "server" / source).read_text(), source
    for name in ("gpu", "cpu"):
        env = _compose()["services"]["dagan" if name == "gpu" else "dagan-cpu"]["environment"]
        missing = sorted(read - NOT_PASSED - set(env))
        assert not missing, f"docker-compose.yml does not pass {missing} to the {name} service"
        for key, value in env.items():
            if any(word in key for word in ("SECRET", "CREDENTIAL", "TOKEN", "PASSWORD")):
                assert value is None, f"{key} must be passed through from the host, not set in the file"


def test_entrypoint_reads_the_engine_rows_of_the_server():
    """The entry point reads DAGAN_BACKEND and DAGAN_CHECKPOINT through the same rows (variable, parser)
    as `dagan serve`, with the image's own defaults, and all of its variables through the one reader."""
    from dagan.options import ENGINE_OPTIONS, read_options

    rows = {opt.field: opt for opt in ep.ENTRYPOINT_OPTIONS}
    engine = {opt.field: opt for opt in ENGINE_OPTIONS}
    assert rows["backend"] == engine["backend"]
    assert rows["checkpoint"].env == engine["checkpoint"].env == "DAGAN_CHECKPOINT"
    assert ep.read_options is read_options
    assert read_options(ep.ENTRYPOINT_OPTIONS, environ={}) == {
        "checkpoint": "/weights/dagan-default.safetensors",
        "backend": "auto",
        "engine_cache": "/engines",
        "max_batch": 8,
        "retry_tensorrt": False,
    }
    assert "os.environ.get" not in (ROOT / "docker" / "entrypoint.py").read_text()


def test_entrypoint_runs_as_a_standalone_script(tmp_path):
    """In the image the file is /usr/local/bin/dagan-entrypoint, run alone outside any source tree: it
    finds its helpers in the installed package. A mistyped variable is one line and exit status 2."""
    script = tmp_path / "dagan-entrypoint"
    shutil.copy(ROOT / "docker" / "entrypoint.py", script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGAN_")}
    env["PYTHONPATH"] = str(ROOT)  # the package these tests run, standing in for the image's install
    env["DAGAN_CHECKPOINT"] = str(tmp_path / "missing.safetensors")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "no weights at" in run.stderr, run.stderr
    env["DAGAN_MAX_BATCH"] = "eight"
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "[entrypoint] $DAGAN_MAX_BATCH must be an integer, got 'eight'"
    ]


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
    for extra in ([], ["--profile", "cpu"], ["-f", "docker-compose.yml", "-f", "docker-compose.ci.yml"]):
        cmd = [*_compose_cli(), *extra, "config", "-q"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    cmd = [*_compose_cli(), "-f", "docker-compose.yml", "-f", "docker-compose.host.yml", "config", "-q"]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode == 0


# --------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles(name):
    text = _dockerfile(name)
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M | re.I))
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for image in re.findall(r"^FROM\s+(\S+)", text, re.M):
        if image in stages:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), image  # pinned base images
    assert "${BASE_IMAGE}" in text  # CI builds on a locally bootstrapped base
    assert re.search(r"^USER\s+(?!root)\w+", text, re.M)  # non-root
    probe = r'HEALTHCHECK[^\n]*\n\s*CMD curl -fsS "http://127.0.0.1:\$\{DAGAN_PORT:-8000\}/healthz"'
    assert re.search(probe, text)  # the probe follows DAGAN_PORT
    assert re.search(r"^EXPOSE 8000", text, re.M)
    assert "ENTRYPOINT" in text and "dagan-entrypoint" in text
    for copied in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.M):
        if "$" not in copied:
            assert (ROOT / copied).exists(), f"{name} copies {copied}, which does not exist"
    for arg in ("EXTRA_CA_CERTS", "LOCAL_WHEELS"):
        assert (ROOT / _arg_default(text, arg)).is_dir()
    # runtime images carry no training extras
    assert "training" not in re.findall(r"^COPY\s+(\S+)", text, re.M)
    extras = re.search(r"requirements\.py \S+ ([a-z,]+)", text).group(1).split(",")
    assert "serve" in extras and "export" in extras and "train" not in extras and "test" not in extras
    if name == "Dockerfile":  # the GPU image takes onnxruntime-gpu, never the CPU wheel on top of it
        assert "ort" not in extras and "onnxruntime-gpu" in text
    else:
        assert "ort" in extras and "download.pytorch.org/whl/cpu" in text
    # the default checkpoint is the shipped weights file, copied into the image and the entrypoint's default
    ckpt = re.search(r"DAGAN_CHECKPOINT=(\S+)", text).group(1)
    assert ckpt == "/weights/dagan-default.safetensors" and (ROOT / "weights" / Path(ckpt).name).is_file()
    assert re.search(r"^COPY weights/dagan-default.safetensors .*/weights/$", text, re.M)
    assert ckpt in (ROOT / "docker" / "entrypoint.py").read_text()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dependencies_are_installed_before_the_sources(name):
    """A source change must rebuild only the small last layers, and leave no build folder behind."""
    text = _dockerfile(name)
    deps_at = text.index("pip install -r")
    first_source = min(text.index(f"COPY {pkg} ") for pkg in ("dagan", "engine", "server", "client_web"))
    assert deps_at < first_source
    runtime = text[text.index("AS runtime") :]
    assert "COPY --from=build /wheels" in runtime and "pip install --no-deps /tmp/wheels/" in runtime
    assert "rm -rf /tmp/wheels" in runtime
    assert not re.search(r"^COPY (dagan|engine|bench|export|commands|server|client_web) ", runtime, re.M)


def test_gpu_pins_are_the_checked_ones():
    """Each version pin of the GPU image is listed in docs/deployment.md with where it is served from.

    onnxruntime-gpu 1.20.1 never existed on PyPI (1.20.0 and 1.20.2 do): this is the test that catches a
    pin edited without checking it (`pip download --no-deps`, as docs/deployment.md shows)."""
    text = _dockerfile("Dockerfile")
    docs = (ROOT / "docs" / "deployment.md").read_text()
    pins = {name: _arg_default(text, name) for name in re.findall(r"^ARG (\w+_VERSION)=", text, re.M)}
    assert set(pins) == {"TORCH_VERSION", "TENSORRT_VERSION", "ONNXRUNTIME_VERSION"}
    assert pins["ONNXRUNTIME_VERSION"] != "1.20.1"
    for package, arg in (
        ("torch", "TORCH_VERSION"),
        ("tensorrt-cu12", "TENSORRT_VERSION"),
        ("onnxruntime-gpu", "ONNXRUNTIME_VERSION"),
    ):
        assert f"`{package}=={pins[arg]}`" in docs, f"{package}=={pins[arg]} is not in docs/deployment.md"
    assert f"`torch=={_arg_default(_dockerfile('Dockerfile.cpu'), 'TORCH_VERSION')}`" in docs


def test_dockerignore_keeps_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "training", "*.onnx", "weights/*", "build", "dist"):
        assert entry in ignored
    assert "!weights/dagan-default.safetensors" in ignored  # the image ships the default weights


def test_ci_lane_is_wired_and_guarded(tmp_path):
    """.ci/run calls the docker lane; the lane skips (exit 0, a printed reason) where Docker cannot be
    installed from Debian's packages and stops dockerd by its PID on every exit."""
    assert "scripts/ci_docker.sh" in (ROOT / ".ci" / "run").read_text()
    lane = (ROOT / "scripts" / "ci_docker.sh").read_text()
    assert "--bridge=none" in lane and "--iptables=false" in lane and "debootstrap --variant=minbase" in lane
    assert "trap cleanup EXIT" in lane and 'kill "$DOCKERD_PID"' in lane
    assert "docker-compose.ci.yml" in lane and "webrtc_smoke.py" in lane
    ci = yaml.safe_load((ROOT / "docker-compose.ci.yml").read_text())["services"]["dagan-cpu"]
    assert ci["network_mode"] == "host" and ci["restart"] == "no"
    # a machine without apt-get: only the basic tools on PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "date", "uname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "scripts" / "ci_docker.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docker lane SKIPPED: no apt-get" in result.stdout


# ------------------------------------------------------------------------- requirements and the page


def _requirements():
    spec = importlib.util.spec_from_file_location("dagan_requirements", ROOT / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_requirements_come_from_pyproject():
    import tomllib

    req = _requirements()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    out = req.requirements(pyproject, ["serve", "export", "ort"], {"torch"})
    names = [req.requirement_name(r) for r in out]
    assert "torch" not in names and len(names) == len(set(names))
    for r in project["dependencies"][1:] + project["optional-dependencies"]["serve"]:
        assert r in out
    assert "onnxruntime>=1.18" in out
    # a self-reference ("dagan-avatar[serve,cam,...]") expands to those extras, never to the project itself
    test_reqs = req.requirements(pyproject, ["test"], set())
    assert "dagan-avatar" not in {req.requirement_name(r) for r in test_reqs}
    assert set(project["optional-dependencies"]["cam"]) <= set(test_reqs)
    with pytest.raises(SystemExit, match="no extra"):
        req.requirements(pyproject, ["nonexistent"], set())


def test_constraints_pin_every_image_requirement_within_pyproject():
    """docker/constraints.txt pins each requirement of the images to a version pyproject.toml allows."""
    import tomllib

    from packaging.requirements import Requirement

    req = _requirements()
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[req.requirement_name(name)] = version
    assert "torch" not in pins  # each image installs its own torch build first
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in req.requirements(pyproject, ["serve", "export", "ort"], {"torch"}):
        r = Requirement(line)
        name = req.requirement_name(r.name)
        assert name in pins, f"{name} is not pinned in docker/constraints.txt (regenerate it)"
        assert r.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {line}"


def test_page_is_package_data_and_found_in_any_install(tmp_path):
    """The page is found through importlib.resources, and a wheel of the project carries every page file."""
    from server.settings import ServerSettings, default_client_dir

    page = default_client_dir()
    assert (page / "index.html").is_file() and ServerSettings().client_dir == page
    src = tmp_path / "src"
    src.mkdir()
    # what the images copy (docker/Dockerfile*): the library, the dispatcher's package, the service
    image = (
        "pyproject.toml",
        "README.md",
        "dagan",
        "engine",
        "bench",
        "export",
        "commands",
        "server",
        "client_web",
    )
    for item in image:
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, src / item)
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*wheel_cmd, "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("dagan_avatar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "commands/cli.py" in names  # the console script's module
    assert "bench/model.py" in names  # dagan bench works inside the images too
    for f in (ROOT / "client_web").iterdir():
        if f.is_file() and f.suffix != ".pyc":
            assert f"client_web/{f.name}" in names, f"client_web/{f.name} is not package data"


def test_client_dir_override_is_validated_after_it_is_applied(tmp_path, monkeypatch):
    """--client-dir / DAGAN_CLIENT_DIR rescue an install whose packaged page is missing, and a folder
    without the page is still an error that names the option."""
    import argparse

    import server.settings as settings_module
    from server.cli import add_commands, settings_from_args
    from server.settings import ServerSettings, SettingsError

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html>")
    monkeypatch.setattr(settings_module, "default_client_dir", lambda: tmp_path / "broken-install")
    assert settings_from_args(parser.parse_args(["serve", "--client-dir", str(page)])).client_dir == page
    monkeypatch.setenv("DAGAN_CLIENT_DIR", str(page))
    assert settings_from_args(parser.parse_args(["serve"])).client_dir == page
    monkeypatch.delenv("DAGAN_CLIENT_DIR")
    with pytest.raises(SettingsError, match=r"no index\.html.*--client-dir"):
        settings_from_args(parser.parse_args(["serve"]))
    with pytest.raises(SettingsError, match=r"no index\.html"):
        ServerSettings(client_dir=tmp_path)
