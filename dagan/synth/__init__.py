"""Synthetic talking-head clips with per-frame ground truth, rendered from still portraits (``dagan synth``).

A portrait becomes a textured 3D head mesh (:mod:`.mesh`), which is re-rendered by a z-buffered CPU
rasteriser (:mod:`.render`) under smooth random head motion, mouth opening, blinks and lighting
(:mod:`.motion`); :mod:`.dataset` writes the clips in the training layout with pose, depth and landmark
ground truth beside the frames. See docs/synth.md.
"""

from __future__ import annotations
