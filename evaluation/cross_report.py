"""Reports of ``dagan eval-cross``: the markdown tables, the per-pair CSV and JSON, the contact sheets.

Kept apart from :mod:`evaluation.cross` (which measures) so the report format can change without touching
the protocol. All writes are atomic (a crashed run never leaves half a file behind).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import motion
from .cross import PAIR_KEYS, PHOTO_METHOD, DriverClip, PairRun, PhotoView, every_nth

__all__ = ["contact_sheet", "markdown_report", "pairs_csv", "write_outputs"]

# Single-value columns after the five "r / gain" ones: key -> (header, format).
_SINGLE = {
    "prmse": ("PRMSE ° ↓", "{:.2f}"),
    "expression_change_error": ("expr. Δ err ↓", "{:.3f}"),
    "expression_agreement": ("expr. agree ↑", "{:.2f}"),
    "identity_distance": ("ID dist ↓", "{:.3f}"),
    "csim": ("CSIM ↑", "{:.3f}"),
    "face_rate": ("face ↑", "{:.2f}"),
}


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _row(method: str, stat: str, values: dict[str, float | None]) -> str:
    cells = [method, stat]
    for s in motion.SIGNALS:
        cells.append(f"{_f(values[f'{s}_corr'], '{:.2f}')} / {_f(values[f'{s}_gain'], '{:.2f}')}")
    cells += [_f(values[k], fmt) for k, (_, fmt) in _SINGLE.items()]
    cells.append(f"{_f(values['jitter_avatar'], '{:.4f}')} / {_f(values['jitter_driver'], '{:.4f}')}")
    cells.append(_f(values["jitter_ratio"], "{:.2f}"))
    return "| " + " | ".join(cells) + " |"


def markdown_report(result: dict[str, Any], sheets: Sequence[str] = ()) -> str:
    """The averaged table (median and mean over pairs, per method), the drivers' own motion, notes and
    links to the contact sheets (file names relative to the report)."""
    n_photos, n_clips = len(result["photos"]), len(result["clips"])
    frames = sum(c["frames"] for c in result["clips"])
    head = (
        "| method | over pairs | "
        + " | ".join(f"{s} r / gain" for s in motion.SIGNALS)
        + " | "
        + " | ".join(h for h, _ in _SINGLE.values())
        + " | jitter avatar / driver | jitter ratio ↓ |"
    )
    ncols = 2 + len(motion.SIGNALS) + len(_SINGLE) + 2
    if result.get("self_reenact"):
        clips_text = f"{n_clips} driving clip" + ("s" if n_clips != 1 else "")
        what = f"Self-reenactment: {clips_text}, each driving its own first frame, {frames} "
        what += "driving frames in all (frame stride "
    else:
        pairs = n_photos * n_clips
        what = f"Cross-identity reenactment: {n_photos} photos × {n_clips} driving clips = {pairs} pairs, "
        what += f"{frames} driving frames per photo (frame stride "
    lines = [
        what
        + f"{result['frame_stride']}), relative motion as the server runs it ("
        + ("keypoints and crop box One-Euro filtered" if result.get("smoothing") else "no motion filtering")
        + f", face detection on {every_nth(result.get('detect_every', 1))}), engine "
        f"{result['backend']} {result['precision']}, {result['image_size']} px.",
        "",
        head,
        "|---|---|" + "---:|" * (ncols - 2),
    ]
    for method, summary in result["summary"].items():
        for stat in ("median", "mean"):
            lines.append(_row(method, stat, summary[stat]))
    lines += [
        "",
        "r / gain: correlation / least-squares slope (with intercept) of the avatar's change since the "
        "reference frame against the driver's; ideal 1 / 1. Jitter: mean second difference of the 478 mesh "
        "points per face size (inter-ocular distance) where the driver is still; ratio = avatar / driver.",
        "",
        "Methods: " + "; ".join(f"`{m}` = {what}" for m, what in result["methods"].items()) + ".",
        "",
        "Driving clips (what the driver does: std of each signal's change since the reference frame; "
        "measure r: how far the measure follows each signal on the driver's own frames read again through "
        "half their size, yaw / pitch / roll / mouth / eyes, the most a pair's r can be expected to reach):",
        "",
        "| clip | frames | face | yaw std ° | pitch std ° | roll std ° | mouth std | eyes std | measure r | "
        "still triples | driver jitter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["clips"]:
        cells = [
            c["clip"],
            str(c["frames"]),
            _f(c.get("mesh_face_rate"), "{:.2f}"),
            *(
                _f(c.get(f"{s}_std"), "{:.2f}" if s in motion.ANGLE_SIGNALS else "{:.3f}")
                for s in motion.SIGNALS
            ),
            " / ".join(_f(c.get(f"{s}_reread_corr"), "{:.2f}") for s in motion.SIGNALS),
            str(c["still_triples"]),
            _f(c.get("jitter"), "{:.4f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for kind, key in (("photos", "skipped_photos"), ("clips", "skipped_clips")):
        skipped = result.get(key) or []
        if skipped:
            names = ", ".join(f"{s.get('photo') or s.get('clip')} ({s['reason']})" for s in skipped)
            lines.append(f"Skipped {len(skipped)} {kind}: {names}.")
            lines.append("")
    lines += [f"- {note}" for note in result.get("notes", [])]
    if sheets:
        lines += [
            "",
            "Contact sheets (first row: the driving frames at a few moments of each clip — reference, widest "
            "mouth, largest head turn, most closed eyes; then one row per photo: the photo, then its avatar "
            "at those moments):",
            "",
            *(f"![{Path(s).stem}]({s})" for s in sheets),
        ]
    return "\n".join(lines) + "\n"


def pairs_csv(pairs: Sequence[dict[str, Any]]) -> str:
    """One line per (method, photo, clip) with every per-pair value; empty cells where undefined."""
    keys = ["method", "photo", "clip", "frames", "motion_frames", "reference_frame", "still_triples"]
    keys += list(PAIR_KEYS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in pairs:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    return buf.getvalue()


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    out = tile.copy()
    scale = max(0.3, tile.shape[1] / 360)
    cv2.putText(out, text, (3, tile.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(
        out, text, (3, tile.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
    )
    return out


def contact_sheet(
    photos: Sequence[PhotoView],
    clips: Sequence[DriverClip],
    tiles: dict[tuple[str, str], list[tuple[int, str, np.ndarray]]],
    gap: int = 4,
) -> np.ndarray:
    """RGB image: first row the driving frames at each clip's moments (labelled clip and moment), then one
    row per photo (the photo crop, then its avatar at the same moments); a gap between clips."""
    size = photos[0].crop.shape[0]
    blank = np.full((size, size, 3), 255, np.uint8)
    white = np.full((size, gap, 3), 255, np.uint8)

    def row(first: np.ndarray, cells: list[list[np.ndarray]]) -> np.ndarray:
        parts = [first]
        for group in cells:
            parts.append(white)
            parts.extend(group)
        return np.concatenate(parts, axis=1)

    driver_cells = [[_label(c.crops[t], f"{c.name} {lab}") for t, lab in c.moments()] for c in clips]
    rows = [row(_label(blank, "driver"), driver_cells)]
    for photo in photos:  # a pair that was not animated (``--self``: another clip's photo) stays blank
        cells = [
            [img for _, _, img in tiles.get((photo.name, c.name), [])] or [blank] * len(driver)
            for c, driver in zip(clips, driver_cells, strict=True)
        ]
        rows.append(row(_label(photo.crop, photo.name), cells))
    gap_row = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([rows[0], gap_row, *rows[1:]], axis=0)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.floating | np.integer):
        return _json_safe(obj.item())
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(result: dict[str, Any], run: PairRun, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``cross.md``, ``cross.json``, ``pairs.csv`` and one ``sheet-<method>.png`` per animated method
    into ``out_dir``; returns their paths by kind."""
    from dagan.checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = int(result["image_size"])
    written: dict[str, Path] = {}
    sheets: list[str] = []
    for method, tiles in run.sheet.items():
        if method == PHOTO_METHOD or not tiles:
            continue
        first = next(iter(tiles.values()))
        tile_size = first[0][2].shape[0] if first else size
        image = contact_sheet(run.photos[tile_size], run.clips[tile_size], tiles)
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        path = out / f"sheet-{method}.png"
        data = png.tobytes()
        atomic_write(path, lambda p, data=data: Path(p).write_bytes(data))
        written[f"sheet-{method}"] = path
        sheets.append(path.name)
    text = markdown_report(result, sheets)
    atomic_write(out / "cross.md", lambda p: Path(p).write_text(text))
    doc = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"
    atomic_write(out / "cross.json", lambda p: Path(p).write_text(doc))
    table = pairs_csv(result["pairs"])
    atomic_write(out / "pairs.csv", lambda p: Path(p).write_text(table))
    written.update(markdown=out / "cross.md", json=out / "cross.json", csv=out / "pairs.csv")
    return written
