#!/usr/bin/env bash
# Re-make the bundled default weights (live-128) from ../shared/data/real-faces, as recorded in
# weights/README.md. About 1 h 20 min on a quiet 2-core CPU (DaGAN stage ~1.5 s/step); minutes on a GPU.
# The depth net is taken, frozen (as the paper's stage 2 does), from the bundled file itself: its
# depth_net tensors are those `dagan train depth` learned on synthetic renders for the previous default
# (same depth-net config); pass DEPTH=... to use another depth checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
REAL=${REAL:-../shared/data/real-faces}
OUT=${OUT:-data}
ASSETS=${DAGAN_EVAL_ASSETS:-$HOME/.cache/dagan/eval-assets}
DEPTH=${DEPTH:-weights/dagan-default.safetensors}
HELD_OUT=${HELD_OUT:-"d3 s18 d20"}
[ -f "$ASSETS/model/face_landmark_68_model.bin" ] || dagan fetch-eval-assets "$ASSETS"
# 1. real clips: held-out people in test/, the rest in train/, cropped by the project's tracker
mkdir -p "$OUT/raw/train" "$OUT/raw/test"
for clip in "$REAL"/clips/*.mp4; do
  name=$(basename "$clip" .mp4)
  split=train; for h in $HELD_OUT; do [ "$name" = "$h" ] && split=test; done
  ln -sfn "$(realpath "$clip")" "$OUT/raw/$split/$name.mp4"
done
dagan prepare "$OUT/raw" "$OUT/real128" --size 128
# 2. synthetic renders for more identities: 7 of the photos (the other 6 stay unseen for the contact
#    sheet), the two built-in portraits and face-api's demo photos
mkdir -p "$OUT/synth_portraits"
for p in s1 s2 s3 s4 s5 d8 d30; do cp "$REAL/photos/$p.jpg" "$OUT/synth_portraits/"; done
dagan synth --out "$OUT/synth128" --portraits "$OUT/synth_portraits" "$ASSETS/demo" --builtin --size 128 \
  --frames 48 --clips-per-identity 4 --test-identities 0 --seed 1
# 3. landmark tracks for the keypoint prior
dagan landmarks "$OUT/real128"
dagan landmarks "$OUT/synth128"
# 4. the mix: every real clip 15 times (about 55 % of the samples), every synthetic clip once
rm -rf "$OUT/mix128"; mkdir -p "$OUT/mix128/train"
for d in "$OUT"/real128/train/*; do
  for r in $(seq 0 14); do ln -sfn "$(realpath "$d")" "$OUT/mix128/train/real_$(basename "$d")_r$r"; done
done
for d in "$OUT"/synth128/train/*; do ln -sfn "$(realpath "$d")" "$OUT/mix128/train/synth_$(basename "$d")"; done
# 5. the DaGAN stage (resumable: rerun with --resume --run-dir runs/live128)
dagan train dagan --config training/recipes/live-128.yaml --depth "$DEPTH" --run-dir runs/live128 \
  --set data.root="$OUT/mix128" --set dagan.face_landmark_weights="$ASSETS" "$@"
