#!/usr/bin/env bash
# CI lane "docker": build the CPU image, `docker compose --profile cpu up` it, and make a real WebRTC call
# into the container from the host. Called by .ci/run; docs/deployment.md says what it proves.
#
# Required wherever Docker can be installed from Debian's packages (docker.io): any failure fails CI.
# Elsewhere (no apt-get, no docker.io candidate, not root) it prints why and exits 0.
#
# No image registry is reachable on CI machines, so the base image is made locally (debootstrap
# --variant=minbase bookworm, then docker import) and passed as BASE_IMAGE. dockerd runs with host
# networking only (--bridge=none --iptables=false: it changes no firewall rule), its own socket, and its
# own data root under the cache folder, so the base image, the build layers and the engine volume are
# reused by the next run. dockerd is stopped by its PID on exit, whatever happens.
#
# Environment: DAGAN_DOCKER_CACHE (default ~/.cache/dagan/docker), DAGAN_DOCKER_PORT (default: a free
# port), DAGAN_DOCKER_FRAMES (avatar frames the call must receive, default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
lane_start=$(date +%s)

skip() {
  echo "== docker lane SKIPPED: $*"
  exit 0
}

step_start=0
step() { # step NAME: print a header and start the clock for the next timing line
  step_name=$1
  step_start=$(date +%s)
  echo "== docker: $step_name"
}
took() { echo "== docker: $step_name took $(($(date +%s) - step_start)) s"; }

# ------------------------------------------------------------------ can this machine run the lane?
[ "$(uname -s)" = Linux ] || skip "not Linux ($(uname -s))"
command -v apt-get >/dev/null || skip "no apt-get: docker.io cannot be installed from Debian's packages here"
if ! command -v dockerd >/dev/null; then
  candidate=$(apt-cache policy docker.io 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    skip "apt has no docker.io candidate (run apt-get update, or not a Debian system)"
  fi
fi
[ "$(id -u)" = 0 ] || skip "not root: installing docker.io and running dockerd need root"

CACHE=${DAGAN_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dagan/docker}
FRAMES=${DAGAN_DOCKER_FRAMES:-30}
BASE_IMAGE=dagan-base:bookworm-minbase
IMAGE=dagan-avatar:cpu
PROJECT=dagan-ci
RUN_DIR=/run/dagan-ci-docker
SOCK=$RUN_DIR/docker.sock
# Debian's own client (20.10) talks to Debian's dockerd and builds with the classic builder.
DOCKER=/usr/bin/docker
mkdir -p "$CACHE" "$RUN_DIR"

step "install docker.io, docker-compose and debootstrap (Debian packages)"
want=""
command -v dockerd >/dev/null || want="$want docker.io"
[ -x "$DOCKER" ] || want="$want docker.io"
command -v docker-compose >/dev/null || want="$want docker-compose"
command -v debootstrap >/dev/null || want="$want debootstrap"
if [ -n "$want" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want >/dev/null
fi
# Compose v2 (`docker compose`) is not packaged for bookworm; Debian's docker-compose 1.29 is what exists.
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.ci.yml --profile cpu)
took

DOCKERD_PID=""
cleanup() {
  status=$?
  set +e
  if [ -n "$DOCKERD_PID" ]; then
    echo "== docker: cleaning up (compose down, stop dockerd $DOCKERD_PID)"
    if [ "${COMPOSE_UP:-0}" = 1 ]; then
      DAGAN_PORT=${PORT:-8000} timeout 60 "${COMPOSE[@]}" down --remove-orphans >/dev/null 2>&1
    fi
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
  fi
  rm -rf "$ROOT/docker/.cache/certs"
  echo "== docker lane took $(($(date +%s) - lane_start)) s (exit $status)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

step "start dockerd (host networking, no iptables, data root $CACHE/data-root)"
export DOCKER_HOST=unix://$SOCK
# niced: the build shares the CI machine's cores with everything else (its children inherit it).
nice -n 10 dockerd \
  --data-root "$CACHE/data-root" \
  --exec-root "$RUN_DIR/exec" \
  --pidfile "$RUN_DIR/dockerd.pid" \
  --host "unix://$SOCK" \
  --bridge=none --iptables=false --ip-masq=false \
  --storage-driver=overlay2 \
  >"$CACHE/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$CACHE/dockerd.log"; echo "dockerd exited"; exit 1; }
  sleep 0.5
done
"$DOCKER" info --format 'dockerd {{.ServerVersion}}, storage driver {{.Driver}}, data root {{.DockerRootDir}}' || {
  tail -20 "$CACHE/dockerd.log"
  exit 1
}
took

step "local base image $BASE_IMAGE (debootstrap --variant=minbase bookworm, cached)"
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  rootfs=$CACHE/rootfs-bookworm
  if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
    rm -rf "$rootfs"
    nice -n 10 debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log"
  fi
  printf '%s\n' \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
took

step "build $IMAGE (docker/Dockerfile.cpu, BASE_IMAGE=$BASE_IMAGE)"
# The project venv: its pip fetches the torch wheel below, its aiortc makes the WebRTC call at the end.
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh
# This machine reaches PyPI through a TLS proxy with its own CA: the host's bundle goes into the build.
mkdir -p docker/.cache/certs docker/.cache/wheels
cp /etc/ssl/certs/ca-certificates.crt docker/.cache/certs/host-ca-bundle.crt
# The CPU torch wheel, found the way pip finds it on this host (pip's find-links / local index), or from
# PyTorch's CPU index on a normal host; kept in the git-ignored docker/.cache/wheels between runs.
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile.cpu)
# The wheel must fit the image's Python (bookworm: CPython 3.11), not necessarily this host's.
wheel_tags=(--python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if ! ls docker/.cache/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  fetch=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: "${wheel_tags[@]}" -d docker/.cache/wheels)
  "${fetch[@]}" "torch==$TORCH_VERSION+cpu" ||
    "${fetch[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu"
fi
# Only the wheel this build needs stays in the context.
find docker/.cache/wheels -name '*.whl' ! -name "torch-$TORCH_VERSION+cpu-*" -delete
DOCKER_BUILDKIT=0 "$DOCKER" build --network host -f docker/Dockerfile.cpu -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_VERSION="$TORCH_VERSION+cpu" \
  --build-arg TORCH_INDEX= \
  --build-arg LOCAL_WHEELS=docker/.cache/wheels \
  --build-arg EXTRA_CA_CERTS=docker/.cache/certs \
  . >"$CACHE/build.log" 2>&1 || {
  tail -40 "$CACHE/build.log"
  exit 1
}
# When each layer was made and how big it is: the record of what a cold build costs.
"$DOCKER" history --format '{{.CreatedAt}}  {{.Size}}  {{.CreatedBy}}' "$IMAGE" | cut -c1-160 >"$CACHE/history.txt"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1000000)) MB"
[ "$size" -le 2000000000 ] || { echo "the CPU image is over 2 GB"; exit 1; }
took

step "image checks: default weights, no sources or build folders, no CUDA, clear /engines error"
"$DOCKER" run --rm --network host --entrypoint sh "$IMAGE" -c '
  set -e
  test -f "$DAGAN_CHECKPOINT" || { echo "no weights at DAGAN_CHECKPOINT=$DAGAN_CHECKPOINT"; exit 1; }
  for d in /src /app /tmp/wheels /build; do test ! -e "$d" || { echo "$d left in the image"; exit 1; }; done
  python -c "import torch, client_web, importlib.resources as r; assert torch.version.cuda is None; \
assert (r.files(\"client_web\") / \"index.html\").is_file()"
  ! ls /opt/venv/lib/python3*/site-packages | grep -q "^nvidia" || { echo "CUDA wheels in the image"; exit 1; }
'
rootowned=$(mktemp -d)
chmod 755 "$rootowned"
set +e
out=$("$DOCKER" run --rm --network host -v "$rootowned:/engines" "$IMAGE" 2>&1)
rc=$?
set -e
rmdir "$rootowned"
echo "root-owned /engines: exit $rc: $out"
[ "$rc" = 2 ] && [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && printf '%s' "$out" | grep -q "cannot write the engine cache" || {
  echo "a root-owned /engines must give one clear line and exit 2"
  exit 1
}
took

step "docker compose --profile cpu up (host networking, free port)"
PORT=${DAGAN_DOCKER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export DAGAN_PORT=$PORT
# An access token, when the server supports one: the lane then proves the token reaches the container.
if grep -q DAGAN_ACCESS_TOKEN server/cli.py; then
  DAGAN_ACCESS_TOKEN=ci-$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  export DAGAN_ACCESS_TOKEN
fi
COMPOSE_UP=1
"${COMPOSE[@]}" up -d --no-build
running=$("$DOCKER" ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Label "com.docker.compose.service"}}' | sort | tr '\n' ' ')
echo "services running: $running"
[ "$running" = "dagan-cpu " ] || { echo "--profile cpu must start dagan-cpu alone"; exit 1; }
container=$("$DOCKER" ps -q --filter "label=com.docker.compose.project=$PROJECT")
took

step "wait for /healthz on port $PORT and a healthy container (the image's HEALTHCHECK)"
healthy=""
for _ in $(seq 300); do
  state=$("$DOCKER" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container" 2>/dev/null || echo gone)
  case $state in
  running\ healthy) healthy=1; break ;;
  exited* | dead* | gone) break ;;
  esac
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/healthz" && echo
[ -n "$healthy" ] || {
  echo "container state: $state"
  "$DOCKER" logs --tail 40 "$container"
  exit 1
}
took

step "WebRTC call from the host: session, photo, offer, >= $FRAMES avatar frames"
# shellcheck disable=SC1091
. .venv/bin/activate
python docker/webrtc_smoke.py --url "http://127.0.0.1:$PORT" --frames "$FRAMES" --timeout 120 \
  ${DAGAN_ACCESS_TOKEN:+--token "$DAGAN_ACCESS_TOKEN"} || {
  "$DOCKER" logs --tail 40 "$container"
  exit 1
}
"$DOCKER" logs "$container" 2>&1 | grep -E "^\[entrypoint\]" || true
took

step "docker compose down"
"${COMPOSE[@]}" down --remove-orphans
COMPOSE_UP=0
took
