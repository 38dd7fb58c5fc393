#!/usr/bin/env python3
"""Container entry point: make sure engines for *this* GPU exist in the cache volume, then serve.

TensorRT engines are specific to the GPU model and the TensorRT version that built them, and building
takes minutes, so they are cached in a named volume under a key made of (GPU model, TensorRT version,
checkpoint digest). The first start builds (ONNX export, then FP16 engines) into a temporary folder that
is renamed into place only when complete; later starts find the key and reuse it; a new GPU, a new
TensorRT or new weights give a new key and a rebuild. A file lock keeps two replicas from building the
same key at once. On a host without a GPU (``DAGAN_BACKEND=auto``, the CPU image's default) the server
makes its own choice of CPU engine (``engine.select``) and caches its exports under ``/engines/cpu``;
``DAGAN_BACKEND=onnxruntime`` caches a plain ONNX export the same way (key ``cpu-onnxruntime``).

A TensorRT build that fails falls back to the next backend, ONNX Runtime (its CUDA provider on a GPU),
with one log line, and is recorded so that a restart does not spend minutes failing the same way again:
without that, a restart policy turns one bad build into a loop. An unwritable cache folder (a root-owned
host folder bind-mounted at /engines) is one clear line and exit status 2, not a traceback.

Its variables are read like every ``DAGAN_*`` variable of the project: rows of a table
(:data:`ENTRYPOINT_OPTIONS`: the engine's own rows of :data:`dagan.options.ENGINE_OPTIONS` with the
image's defaults, and the cache's) read by :func:`dagan.options.read_options`, from the installed package
(this file is copied alone into the image, as ``dagan-entrypoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dagan.options import ENGINE_OPTIONS, Option, OptionError, read_options

READY = "READY.json"


def _is_one(text: str) -> bool:
    return text == "1"


_ENGINE = {opt.field: opt for opt in ENGINE_OPTIONS}
ENTRYPOINT_OPTIONS: tuple[Option, ...] = (
    # the weights file the image ships (the Dockerfiles set the same path)
    dataclasses.replace(_ENGINE["checkpoint"], default="/weights/dagan-default.safetensors"),
    _ENGINE["backend"],
    Option("engine_cache", "DAGAN_ENGINE_CACHE", "the engine cache volume", default="/engines"),
    Option("max_batch", "DAGAN_MAX_BATCH", "largest batch of the TensorRT engines", kind=int, default=8),
    Option(
        "retry_tensorrt",
        "DAGAN_RETRY_TENSORRT",
        "1: try again a TensorRT build that failed before for this GPU, TensorRT and weights",
        parse=_is_one,
        default=False,
    ),
)


def log(msg: str) -> None:
    print(f"[entrypoint] {msg}", file=sys.stderr, flush=True)


def probe_gpu() -> str | None:
    """Name of GPU 0 (``nvidia-smi``), or None when no NVIDIA GPU is visible."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    return name or None


def probe_tensorrt() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(tensorrt.__version__)


def file_digest(path: Path) -> str:
    """The weights' SHA-256 (the project's one :func:`dagan.helpers.file_sha256`)."""
    from dagan.helpers import file_sha256

    return file_sha256(path)


def cache_key(gpu: str | None, trt_version: str | None, digest: str) -> str:
    """Folder name for one (GPU model, TensorRT version, weights) combination: the project's one cache-key
    scheme (:func:`dagan.helpers.cache_key`, also used by the ONNX cache and the TensorRT builder),
    labelled with what the folder is for so a person listing the volume can tell."""
    from dagan.helpers import cache_key as project_cache_key

    label = "cpu-onnxruntime" if gpu is None or trt_version is None else f"{gpu}-trt{trt_version}"
    return project_cache_key(digest, gpu, trt_version, label=label)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_engines(
    cache_root: Path,
    checkpoint: Path,
    gpu: str | None,
    trt_version: str | None,
    build: Callable[[Path, Path], None],
) -> tuple[Path, bool]:
    """Return (folder with the engines for this machine, whether it was built now).

    ``build(checkpoint, out_dir)`` fills ``out_dir``; it runs only when no complete folder exists for the
    key. A build that fails or is killed leaves only a ``.building`` folder, removed on the next start.
    """
    digest = file_digest(checkpoint)
    key = cache_key(gpu, trt_version, digest)
    final = cache_root / key
    with locked(cache_root / ".lock"):
        if (final / READY).is_file():
            log(f"reusing cached engines {final}")
            return final, False
        for stale in cache_root.glob(".*.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (no READY marker): never trust it
            shutil.rmtree(final)
        tmp = cache_root / f".{key}.building-{os.getpid()}"
        tmp.mkdir(parents=True)
        what = f"{gpu or 'CPU'} (TensorRT {trt_version or 'n/a'})"
        log(f"building engines for {what} into {final}; this takes minutes")
        start = time.time()
        try:
            build(checkpoint, tmp)
            info = {
                "gpu": gpu,
                "tensorrt": trt_version,
                "checkpoint": str(checkpoint),
                "checkpoint_sha256_16": digest,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - start, 1),
            }
            (tmp / READY).write_text(json.dumps(info, indent=2))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"engines ready in {time.time() - start:.0f} s")
        return final, True


def build_with_cli(checkpoint: Path, out_dir: Path, tensorrt: bool, max_batch: int) -> None:
    """ONNX export (always) and FP16 TensorRT engines (GPU) with the project's own commands."""
    onnx_dir = out_dir / "onnx"
    subprocess.run(
        ["dagan", "export", "onnx", "--checkpoint", str(checkpoint), "--out", str(onnx_dir)], check=True
    )
    if tensorrt:
        subprocess.run(
            [
                "dagan",
                "export",
                "trt",
                "--onnx",
                str(onnx_dir),
                "--out",
                str(out_dir / "trt"),
                "--fp16",
                "--max-batch",
                str(max_batch),
            ],
            check=True,
        )


def serve_command(backend: str, engine_dir: Path, extra: list[str]) -> list[str]:
    """The ``dagan serve`` invocation for the engines in ``engine_dir``."""
    if backend == "tensorrt":
        trt_dir = str(engine_dir / "trt")
        return [
            "dagan",
            "serve",
            "--backend",
            "tensorrt",
            "--precision",
            "fp16",
            "--checkpoint",
            trt_dir,
            *extra,
        ]
    return ["dagan", "serve", "--backend", "onnxruntime", "--checkpoint", str(engine_dir / "onnx"), *extra]


def cpu_serve_command(checkpoint: Path, cache_root: Path, extra: list[str]) -> list[str]:
    """``dagan serve`` on a CPU host: the server's own engine choice (``engine.select``: int8 where it holds
    quality, else bf16 or fp32, on the graph rewritten for the CPU), its exports prepared on first start
    into the engine volume (``DAGAN_CACHE``) so that later starts and other replicas reuse them."""
    os.environ.setdefault("DAGAN_CACHE", str(cache_root / "cpu"))
    return ["dagan", "serve", "--checkpoint", str(checkpoint), *extra]


def cache_unwritable(cache_root: Path) -> str | None:
    """Why the engine cache cannot be used, as one line, or None when it can.

    A host folder bind-mounted at /engines is usually root-owned while the container runs as uid 10001;
    without this check the first ``mkdir`` ends in a raw PermissionError traceback.
    """
    probe = cache_root if cache_root.exists() else cache_root.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return None
    try:
        st = probe.stat()
        owner = f"owned by uid {st.st_uid}, mode {st.st_mode & 0o777:o}"
    except OSError as err:
        owner = err.strerror or "unreadable"
    return (
        f"cannot write the engine cache {cache_root} ({owner}; this container runs as uid {os.getuid()}): "
        f"use the named volume from docker-compose.yml, or `chown {os.getuid()}` the host folder mounted "
        "there"
    )


def failure_marker(cache_root: Path, checkpoint: Path, gpu: str, trt_version: str) -> Path:
    """Where a failed TensorRT build for this (GPU, TensorRT, weights) key is recorded."""
    return cache_root / f".{cache_key(gpu, trt_version, file_digest(checkpoint))}.trt-failed"


def main(argv: list[str]) -> int:
    try:
        options = read_options(ENTRYPOINT_OPTIONS)
    except OptionError as err:  # a mistyped variable: one line, as every other problem here
        log(str(err))
        return 2
    checkpoint, cache_root = Path(options["checkpoint"]), Path(options["engine_cache"])
    wanted, max_batch = options["backend"], options["max_batch"]
    if not checkpoint.is_file():
        log(f"no weights at {checkpoint}: mount a checkpoint there or set DAGAN_CHECKPOINT (see README)")
        return 2
    problem = cache_unwritable(cache_root)
    if problem:
        log(problem)
        return 2
    gpu, trt_version = probe_gpu(), probe_tensorrt()
    use_trt = wanted in ("auto", "tensorrt") and gpu is not None and trt_version is not None
    if wanted == "tensorrt" and not use_trt:
        log(f"DAGAN_BACKEND=tensorrt but GPU={gpu!r}, TensorRT={trt_version!r}: is the NVIDIA runtime on?")
        return 2
    if use_trt:
        assert gpu is not None and trt_version is not None
        marker = failure_marker(cache_root, checkpoint, gpu, trt_version)
        if marker.is_file() and not options["retry_tensorrt"]:
            log(
                f"TensorRT build failed before for this GPU, TensorRT and weights ({marker}): serving ONNX "
                "Runtime instead; set DAGAN_RETRY_TENSORRT=1 or delete that file to try again"
            )
        else:
            try:
                engine_dir, _ = ensure_engines(
                    cache_root,
                    checkpoint,
                    gpu,
                    trt_version,
                    lambda ckpt, out: build_with_cli(ckpt, out, True, max_batch),
                )
            except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
                # A restart would only fail the same way (for minutes each time): record it, fall back.
                marker.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {err}\n")
                log(f"TensorRT engine build failed ({err}): falling back to ONNX Runtime")
            else:
                cmd = serve_command("tensorrt", engine_dir, argv)
                log("exec " + " ".join(cmd))
                os.execvp(cmd[0], cmd)
    if gpu is None and wanted == "auto":
        cmd = cpu_serve_command(checkpoint, cache_root, argv)
        log("no GPU: exec " + " ".join(cmd) + " (it picks the fastest CPU engine that holds quality)")
        os.execvp(cmd[0], cmd)
    engine_dir, _ = ensure_engines(
        cache_root,
        checkpoint,
        None,
        None,
        lambda ckpt, out: build_with_cli(ckpt, out, False, max_batch),
    )
    cmd = serve_command("onnxruntime", engine_dir, argv)
    log("exec " + " ".join(cmd))
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
