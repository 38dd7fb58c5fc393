"""The default locations of the benchmarks' inputs and outputs, computed once from the repository root.

Every harness takes these as flags (``--photos``, ``--calib``, ``--out``, ``--checkpoint``); only their
defaults come from here, so a checkout without the shared data, or an installed package, changes one
flag and not the code.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout this package lives in (the parent of ``bench/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The project's real face data, beside the checkout where it has one (``../shared/data/real-faces``:
#: ``photos/`` and ``clips/``); a clean install has none and the harnesses fall back to bundled samples.
REAL_FACES = REPO_ROOT.parent / "shared" / "data" / "real-faces"
#: Where ``python -m bench.gpu`` writes its tables unless told (scripts/gpu_check.sh passes ``$OUT``).
GPU_CHECK_OUT = REPO_ROOT / "runs" / "gpu_check"
