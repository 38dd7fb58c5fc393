#!/usr/bin/env bash
# Train the bundled model's recipe (training/recipes/live-128.yaml) on one lent H100/H200 in ~8 minutes,
# from the packed copy of the data that travels with the working tree (`dagan pack-data ... gpu_data`).
#   bash scripts/gpu_train.sh                  # on the device: depth stage, then DaGAN with it frozen
#   bash scripts/gpu_train.sh --smoke [ROOT]   # 2 CPU steps of each stage on a tiny pack (CI runs this):
#                                              # ROOT = a prepared dataset, else drawn faces made here
# The device has torch, numpy, opencv, pyyaml, safetensors, tqdm, tensorboard (no mediapipe, no network,
# the project not installed), so everything runs as `python3 -m commands.cli` from the repository root.
# What comes back ($OUT, top level, <= 8 files): dagan.safetensors (final weights, depth net included),
# depth.safetensors, gpu_train.log, summary.json, run-logs.tar.gz (config.yaml, run.json, TensorBoard of
# the run folders), nvidia-smi.txt, and dagan-b.safetensors when VARIANT_ARGS asks for a second run.
# Each stage runs under --time-limit, so a stage cut short still ends with a checkpoint and its weights;
# summary.json says at which step.
# Settings (environment): DATA (gpu_data), OUT (runs/gpu_train/out), RECIPE, INIT (the bundled weights),
# DEPTH_INIT (INIT: the depth stage continues that depth net; empty = from scratch), BUDGET_S (480: both
# stages together), DEPTH_MIN (2.5: the depth stage's share), DEPTH_BATCH (32), DAGAN_BATCH (32),
# WORKERS (12), PRECISION (fp32), DEPTH_STEPS / DAGAN_STEPS (the recipe's), DEPTH_ARGS / DAGAN_ARGS (more
# `dagan train` flags, e.g. "--set depth.smoothness=0.01"), VARIANT_ARGS (flags of a second DaGAN run,
# "b", trained beside the first on the same GPU from the same depth net; a small model leaves most of an
# H100 idle, so two recipes cost little more than one; WORKERS is split between them), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY=${PYTHON:-python3}
smoke=0
src=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "gpu_train.sh: unknown option $1" >&2; exit 2 ;;
    *) src=$1 ;;
  esac
  shift
done

OUT=${OUT:-runs/gpu_train/out}
RECIPE=${RECIPE:-training/recipes/live-128.yaml}
INIT=${INIT:-weights/dagan-default.safetensors}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log="$OUT/gpu_train.log"
: > "$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
WORK=""
finish() {
  # Let tee write the last lines before the device collects $OUT; remove the smoke run's scratch.
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null || true
  if [ "$smoke" = 1 ] && [ -n "$WORK" ]; then rm -rf "$WORK"; fi
}
trap finish EXIT
start=$SECONDS
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt" 2>&1

if [ "$smoke" = 1 ]; then
  # A few CPU steps of the very same path: pack, both stages, --init, the landmark prior, --time-limit.
  WORK=$(mktemp -d)
  if [ -z "$src" ]; then
    src="$WORK/src"
    "$PY" -c "import sys; from training.pack import write_smoke_dataset; write_smoke_dataset(sys.argv[1])" "$src"
  fi
  DATA="$WORK/gpu_data"
  "$PY" -m commands.cli pack-data "$src" "$DATA" --frame-stride 2 --max-mb 2 --quiet
  common=(--device cpu --quiet --set data.workers=0 --set data.repeats=1 --set checkpoint_every=1)
  depth_args=(--steps "${DEPTH_STEPS:-2}" --batch-size 2 --time-limit 5)
  dagan_args=(--steps "${DAGAN_STEPS:-2}" --batch-size 2 --time-limit 5)
else
  DATA=${DATA:-gpu_data}
  WORK=runs/gpu_train
  rm -rf "$WORK/depth" "$WORK/dagan" "$WORK/dagan-b"
  [ -f "$DATA/pack.json" ] || {
    echo "gpu_train.sh: no packed data at $DATA (make it with: dagan pack-data data/real128v2 gpu_data)" >&2
    exit 2
  }
  # A checkpoint every 500 steps (the recipe's 100 is for slow CPU runs); --time-limit writes one at the end.
  common=(--set "data.workers=${WORKERS:-12}" --precision "${PRECISION:-fp32}" --set checkpoint_every=500)
  depth_args=(--batch-size "${DEPTH_BATCH:-32}" --time-limit "${DEPTH_MIN:-2.5}")
  dagan_args=(--batch-size "${DAGAN_BATCH:-32}")
  [ -n "${DEPTH_STEPS:-}" ] && depth_args+=(--steps "$DEPTH_STEPS")
  [ -n "${DAGAN_STEPS:-}" ] && dagan_args+=(--steps "$DAGAN_STEPS")
fi
DEPTH_INIT=${DEPTH_INIT-$INIT}
[ -n "$DEPTH_INIT" ] && depth_args+=(--init "$DEPTH_INIT")
# Extra flags, split on spaces (values here never hold one).
read -r -a extra_depth <<< "${DEPTH_ARGS:-}"
read -r -a extra_dagan <<< "${DAGAN_ARGS:-}"
read -r -a variant <<< "${VARIANT_ARGS:-}"
depth_args+=("${extra_depth[@]}")
dagan_args+=("${extra_dagan[@]}")

# The recipe's depth.source_offsets count frames of the full-rate clips; the pack keeps every N-th frame,
# so an offset o becomes round(o / N) frames of the pack (at least 1): [-6, 6] at N = 2 is [-3, 3].
offsets=$("$PY" - "$RECIPE" "$DATA/pack.json" <<'EOF'
import json, sys
from training.config import load_train_config
stride = json.load(open(sys.argv[2]))["stride"]
offs = load_train_config(sys.argv[1]).depth.source_offsets
print(json.dumps(sorted({(1 if o > 0 else -1) * max(1, round(abs(o) / stride)) for o in offs})))
EOF
)
face=()
if [ -f "$DATA/face_landmark_68_model-weights_manifest.json" ]; then
  face=(--set "dagan.face_landmark_weights=$DATA")
elif [ "$smoke" = 1 ]; then
  echo "note: the pack has no face-api landmark weights: the smoke run uses the pixel substitute loss"
else
  echo "gpu_train.sh: $DATA has no face_landmark_68_model* (the recipe's perceptual net): pack again" \
    "after \`dagan fetch-eval-assets\`, or pass --assets DIR to dagan pack-data" >&2
  exit 2
fi
echo "== gpu_train: data $DATA (pack.json: stride $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["stride"])' "$DATA/pack.json")), depth offsets $offsets, recipe $RECIPE, init $INIT"

# Final weights of a stage; a stage killed from outside leaves its latest checkpoint instead.
weights_of() {
  local run=$1 stage=$2
  if [ -f "$run/$stage.safetensors" ]; then echo "$run/$stage.safetensors"; return; fi
  local step
  step=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$run/latest.json" 2>/dev/null) || return 1
  printf '%s/checkpoints/step-%08d.safetensors\n' "$run" "$step"
}

t0=$SECONDS
rc_depth=0
"$PY" -m commands.cli train depth --config "$RECIPE" --data "$DATA" --run-dir "$WORK/depth" \
  --set "depth.source_offsets=$offsets" "${common[@]}" "${depth_args[@]}" || rc_depth=$?
depth_s=$((SECONDS - t0))
depth_ckpt=$(weights_of "$WORK/depth" depth) || { echo "gpu_train.sh: the depth stage left no weights" >&2; exit 1; }

if [ "$smoke" = 0 ]; then
  # The DaGAN stage gets what is left of the budget, less ~40 s for its start-up and the copies below.
  left=$(( ${BUDGET_S:-480} - (SECONDS - start) - 40 ))
  [ "$left" -lt 60 ] && left=60
  dagan_args+=(--time-limit "$("$PY" -c "print(round($left / 60, 2))")")
fi
t0=$SECONDS
rc_dagan=0
rc_b=0
runs=(dagan)
if [ "${#variant[@]}" -gt 0 ]; then
  # Run b beside run a: each gets half the data workers; b's lines in the log start with "[b] ".
  runs+=(dagan-b)
  if [ "$smoke" = 0 ]; then
    half=$(( ${WORKERS:-12} / 2 ))
    [ "$half" -lt 1 ] && half=1
    common+=(--set "data.workers=$half")
  fi
  "$PY" -m commands.cli train dagan --config "$RECIPE" --data "$DATA" --run-dir "$WORK/dagan-b" \
    --depth "$depth_ckpt" --init "$INIT" "${face[@]}" "${common[@]}" "${dagan_args[@]}" "${variant[@]}" \
    > >(sed -u 's/^/[b] /') 2>&1 &
  pid_b=$!
fi
"$PY" -m commands.cli train dagan --config "$RECIPE" --data "$DATA" --run-dir "$WORK/dagan" \
  --depth "$depth_ckpt" --init "$INIT" "${face[@]}" "${common[@]}" "${dagan_args[@]}" || rc_dagan=$?
if [ -n "${pid_b:-}" ]; then wait "$pid_b" || rc_b=$?; fi
dagan_s=$((SECONDS - t0))
dagan_ckpt=$(weights_of "$WORK/dagan" dagan) || { echo "gpu_train.sh: the DaGAN stage left no weights" >&2; exit 1; }
if [ -n "${pid_b:-}" ]; then
  if b_ckpt=$(weights_of "$WORK/dagan-b" dagan); then
    cp "$b_ckpt" "$OUT/dagan-b.safetensors"
  else
    echo "gpu_train.sh: run b left no weights (exit $rc_b)" >&2
    [ "$rc_b" = 0 ] && rc_b=1
  fi
fi

cp "$depth_ckpt" "$OUT/depth.safetensors"
cp "$dagan_ckpt" "$OUT/dagan.safetensors"
tar -czf "$OUT/run-logs.tar.gz" -C "$WORK" --exclude checkpoints --exclude '*.safetensors' depth "${runs[@]}"
"$PY" - "$OUT" "$WORK" "$smoke" "$depth_s" "$dagan_s" "$rc_depth" "$rc_dagan" "$DATA/pack.json" "$rc_b" <<'EOF'
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

out, work = Path(sys.argv[1]), Path(sys.argv[2])
smoke, secs, rcs = sys.argv[3] == "1", sys.argv[4:6], sys.argv[6:8]
from training.config import load_train_config

summary = {"smoke": smoke, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "pack": {k: v for k, v in json.loads(Path(sys.argv[8]).read_text()).items() if k != "request"}}
runs = [("depth", "depth", secs[0], rcs[0]), ("dagan", "dagan", secs[1], rcs[1])]
if (out / "dagan-b.safetensors").is_file():
    runs.append(("dagan-b", "dagan", secs[1], sys.argv[9]))
for (name, stage, sec, rc) in runs:
    with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    cfg = load_train_config(work / name / "config.yaml")
    sc = getattr(cfg, stage)
    step, total = int(meta.get("step", 0)), sc.steps
    entry = {"step": step, "steps_planned": total, "time_limited": step < total, "seconds": int(sec),
             "exit_status": int(rc), "batch_size": sc.batch_size, "precision": cfg.precision,
             "workers": cfg.data.workers}
    if stage == "depth":
        entry["source_offsets"] = list(sc.source_offsets)
    else:
        entry["perceptual_loss"] = meta.get("perceptual_loss", "")
    try:  # the last logged losses, from the run's TensorBoard scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(work / name / "tb"), size_guidance={"scalars": 0}).Reload()
        entry["last_logged"] = {t.split("/", 1)[1]: round(acc.Scalars(t)[-1].value, 5)
                                for t in acc.Tags()["scalars"] if "grad_norm" not in t}
    except Exception as exc:  # no tensorboard on this machine: the log has the losses anyway
        entry["last_logged"] = f"unavailable ({type(exc).__name__})"
    if name == "dagan-b":
        entry["weights"] = dataclasses.asdict(sc.weights)
        entry["expressive_pairs"] = sc.expressive_pairs
    summary[name] = entry
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
echo "== gpu_train: done in $((SECONDS - start)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ "$rc_depth" != 0 ] || [ "$rc_dagan" != 0 ] || [ "$rc_b" != 0 ]; then
  echo "gpu_train.sh: a stage failed (depth: exit $rc_depth, DaGAN: exit $rc_dagan, run b: exit $rc_b); its last checkpoint was kept" >&2
  exit 1
fi
