"""What the benchmark harnesses (bench/) share: the engine factory with its in-memory model entry, one
cache key for kept exports, one report writer, and every setting as a flag — no benchmark-only
variable, no ``sys.path`` edit, no data path written into the code outside bench/paths.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import engines, gil, report
from dagan.checkpoint import save_checkpoint
from dagan.helpers import cache_key, file_sha256
from engine import EngineError, create_engine

ROOT = Path(__file__).resolve().parent.parent


def test_create_engine_takes_an_in_memory_model(tmp_path):
    bm = engines.preset_model("tiny")
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, bm.model.config, bm.model)
    from_memory = create_engine(bm.model, device="cpu")  # auto: the torch backend
    from_file = create_engine(path, backend="torch", device="cpu")
    assert from_memory.backend == "torch" and from_memory.model is bm.model  # used as is, not copied
    rng = np.random.default_rng(0)
    size = from_memory.image_size
    source, driving = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))
    from_memory.set_source(source)
    from_file.set_source(source)
    np.testing.assert_array_equal(from_memory.animate(driving).image, from_file.animate(driving).image)
    with pytest.raises(EngineError, match="in-memory model runs on the torch backend"):
        create_engine(bm.model, backend="onnxruntime", device="cpu")
    with pytest.raises(EngineError, match="takes no option"):
        create_engine(bm.model, device="cpu", threads=2)
    # another precision runs on a copy: the shared fp32 weights stay as they are for the other rows
    engines.torch_engine(bm.model, "cpu", precision="fp64")
    assert next(bm.model.parameters()).dtype == torch.float32


def test_exports_are_kept_under_the_key_of_the_weights(tmp_path):
    a, b = engines.preset_model("tiny"), engines.preset_model("tiny")
    assert a.key == b.key and a.key.startswith("tiny-")  # same seed, same weights, same folder
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, a.model.config, a.model)
    ckpt = engines.checkpoint_model(path)
    assert ckpt.key == cache_key(file_sha256(path)) and ckpt.key != a.key
    with engines.workdir(ckpt, tmp_path / "kept") as work:
        assert work == tmp_path / "kept" / ckpt.key and work.is_dir()
    with engines.workdir(ckpt, None) as temporary:
        assert temporary.is_dir()
    assert not temporary.exists()  # not kept without --workdir


def test_report_statistics_and_writer(tmp_path, capsys):
    s = report.stats([0.004, 0.001, 0.002, 0.003])
    assert s["median_ms"] == pytest.approx(2.5) and s["p99_ms"] == pytest.approx(4.0)
    assert s["fps"] == pytest.approx(400.0) and s["frames"] == 4
    assert report.percentile([], 0.5) != report.percentile([], 0.5)  # NaN
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", report.timestamp())
    assert len(report.load_average()) == 3
    machine = report.machine_description(torch.device("cpu"))
    assert machine["device"] == "cpu" and machine["cpu_count"] > 0
    report.write_report({"x": 1}, "| a |", tmp_path / "d" / "r.json", tmp_path / "d" / "r.md")
    assert json.loads((tmp_path / "d" / "r.json").read_text()) == {"x": 1}
    assert (tmp_path / "d" / "r.md").read_text() == "| a |" and "| a |" in capsys.readouterr().out


def test_gil_ratio_and_table():
    assert gil.thread_ratio(lambda: lambda: sum(range(2000)), 0.05) > 0
    text = gil.markdown(
        {
            "machine": {"cpu": "CPU X", "cpu_count": 2},
            "date": "2026-12-04 13:00 UTC",
            "seconds": 1.0,
            "load_before": [0.1, 0.2, 0.3],
            "load_after": [0.4, 0.2, 0.3],
            "ratios": {"opencv": 1.97},
        }
    )
    assert "CPU X, 2 CPUs" in text and "| opencv | 1.97 |" in text and "[0.4, 0.2, 0.3]" in text


def _help(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_every_setting_is_a_flag(capsys):
    from bench import gpu
    from bench import server as bench_server
    from commands.cli import main as dagan_main

    flags = {
        (dagan_main, "bench"): ["--interleaved", "--threads", "--workdir", "--calib", "--profile", "--passes",
                                "--backends", "--batches", "--markdown", "--baseline"],
        (bench_server.main, None): ["--start-timeout-s", "--photos", "--detect-every", "--markdown"],
        (gpu.main, None): ["--checkpoint", "--out", "--budget-s", "--smoke"],
        (gil.main, None): ["--seconds", "--json", "--markdown"],
    }  # fmt: skip
    for (main, command), wanted in flags.items():
        text = _help(main, [command, "--help"] if command else ["--help"], capsys)
        missing = [f for f in wanted if f not in text]
        assert not missing, f"{command or main.__module__} --help lacks {missing}"


def test_no_benchmark_variables_path_edits_or_scattered_data_paths():
    skip = {".git", ".venv", "runs"}
    sources = [
        p
        for p in ROOT.rglob("*")
        if p.suffix in (".py", ".sh", ".md") and not skip & set(p.relative_to(ROOT).parts)
    ]
    variable = "DAGAN_" + "BENCH_"
    offenders = [str(p.relative_to(ROOT)) for p in sources if variable in p.read_text(errors="replace")]
    assert not offenders, f"{variable}* is gone (flags instead): {offenders}"
    for path in [*(ROOT / "bench").glob("*.py"), ROOT / "scripts" / "gpu_check.sh"]:
        text = path.read_text()
        assert "sys.path" not in text, path
        if path.name != "paths.py":
            assert '"shared"' not in text and "../shared" not in text, path
