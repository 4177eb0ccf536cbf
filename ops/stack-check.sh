#!/usr/bin/env bash
# make stack-check: build every image on the stand-in bases and run the whole stack, for
# real, on a host without a Docker daemon (podman, buildah, podman-compose), then take it
# down. ops/README.md ("Stand-in bases and `make stack-check`") says what it proves.
#
#  1. stand-in bases (ops/stand-in/build-bases.sh: debootstrap + podman import; kept once built)
#  2. the worker, light and flower-proxy images from ops/*.Dockerfile with BASE_IMAGE set to
#     the stand-ins (buildah bud, cached layers), torch from this machine's CPU wheel
#  3. docker-compose.yml + ops/compose.cpu.yml up with podman-compose; every health check
#     healthy (podman here has no systemd to run them: this script runs them)
#  4. the README's curl example through the gateway from the host; `producer submit` against
#     the stack's Redis (from the light image on the compose network); Flower through its
#     proxy with basic auth (and refused without, and a worker control refused)
#  5. a task in progress, `podman-compose restart worker-0`: the task finishes, once
#  6. down -v: no container, volume or network of the project is left
#
# Needs root (rootful podman), Debian's apt mirror and PyPI (image builds), loopback only at
# run time. Published ports: two free loopback ports. Bounded by VQ_STACK_CHECK_TIMEOUT_S
# (default 3600 s, a first build included); cleans up on any exit. Writes its logs and the
# result (var/stack-check/last-result.txt) under var/stack-check.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${_VQ_STACK_CHECK_BOUNDED:-}" ]; then
  export _VQ_STACK_CHECK_BOUNDED=1
  exec timeout -s TERM -k 120 "${VQ_STACK_CHECK_TIMEOUT_S:-3600}" bash "$0" "$@"
fi

ROOT=$PWD
STATE=var/stack-check
PROJECT=${VQ_STACK_CHECK_PROJECT:-vqcheck$$}
# This run's images carry a tag of their own (a concurrent run on the same host cannot swap
# them); on success they are also tagged :stand-in, for use by hand (ops/README.md).
TAG=stand-in-run$$
KEEP_TAG=stand-in
PREFIX=localhost/vq-standin
HEALTHY_WITHIN_S=${VQ_STACK_CHECK_HEALTHY_S:-600}
PODMAN_COMPOSE_VERSION=1.6.0
TORCH_VERSION=2.13.0
WORKER_IMAGE=localhost/vision-queue-worker:$TAG
LIGHT_IMAGE=localhost/vision-queue-light:$TAG
PROXY_IMAGE=localhost/vision-queue-flower-proxy:$TAG
REDIS_IMAGE=$PREFIX/redis:bookworm

mkdir -p "$STATE/logs"
rm -f "$STATE"/logs/*
exec 3>&1
RESULTS=()
say() { printf 'stack-check: %s\n' "$*" >&3; }
die() { say "FAILED: $*"; exit 1; }
now_ms() { date +%s%3N; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
record() { RESULTS+=("$1: $2"); say "$1: $2"; }
T_START=$(now_ms)

[ "$(id -u)" = 0 ] || die "run as root (rootful podman, debootstrap)"

PC_VENV=var/podman-compose
ENV_FILE=$STATE/env
# Only the env file decides (an operator's .env in the repository is not read).
COMPOSE=("$PC_VENV/bin/podman-compose" --env-file "$ENV_FILE" -p "$PROJECT" --profile gateway
         -f docker-compose.yml -f ops/compose.cpu.yml)
compose() { "${COMPOSE[@]}" "$@" >>"$STATE/logs/compose.log" 2>&1; }
project_containers() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'; }

TICKER=
# The health-check loop, and the `podman healthcheck run` it may be waiting for.
stop_ticker() {
  local children
  children=$(pgrep -P "$TICKER" || true)
  kill "$TICKER" $children 2>/dev/null || true
  wait "$TICKER" 2>/dev/null || true
  TICKER=
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ -z "$TICKER" ] || stop_ticker
  if ! command -v podman >/dev/null 2>&1; then
    [ "$rc" = 0 ] || say "FAILED (exit $rc); logs in $STATE/logs"
    exit "$rc"
  fi
  if [ -n "$(project_containers)" ]; then
    for c in $(project_containers); do podman logs "$c" >"$STATE/logs/$c.log" 2>&1 || true; done
    say "taking the stack down"
    compose down -v -t 30 || true
  fi
  # Whatever down left (a failed start included).
  for c in $(project_containers); do podman rm -f "$c" >/dev/null 2>&1 || true; done
  for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT"); do
    podman volume rm -f "$v" >/dev/null 2>&1 || true
  done
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  rm -f "$ENV_FILE"
  for image in "$WORKER_IMAGE" "$LIGHT_IMAGE" "$PROXY_IMAGE"; do
    podman untag "$image" "$image" >/dev/null 2>&1 || true
  done
  [ "$rc" = 0 ] || say "FAILED (exit $rc); logs in $STATE/logs"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 124' INT TERM

# --- tools and host settings ---------------------------------------------------------------
command -v curl >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
}
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s python3-venv >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
# Bases first: that script installs podman, buildah, runc and debootstrap when missing.
t0=$(now_ms)
ops/stand-in/build-bases.sh >"$STATE/logs/bases.log" 2>&1 \
  || { tail -20 "$STATE/logs/bases.log" >&3; die "stand-in bases"; }
record "stand-in bases" "$(secs $(( $(now_ms) - t0 ))) s"

# podman-compose in its own virtualenv (never the project's .venv).
if ! "$PC_VENV/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version $PODMAN_COMPOSE_VERSION"; then
  say "installing podman-compose $PODMAN_COMPOSE_VERSION into $PC_VENV"
  python3 -m venv "$PC_VENV"
  "$PC_VENV/bin/pip" install -q --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION" \
    2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PC_VENV/bin/podman-compose" --version >/dev/null
fi

# runc (crun is refused here); the open-files and process limits the host allows
# (podman's defaults are above them, and raising a limit needs CAP_SYS_RESOURCE).
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
{
  cat ops/stand-in/containers.conf
  printf '\n[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
    "$nofile" "$nofile" "$nproc" "$nproc"
} > "$STATE/containers.conf"
export CONTAINERS_CONF=$ROOT/$STATE/containers.conf

# torch: the CPU wheel pip finds for this host (on this machine kind, a local file; a bare
# PyPI torch would be GBs of CUDA wheels), with its dependencies, as a file:// index that
# the worker build reads through TORCH_INDEX_URL.
INDEX=$STATE/torch-index
if ! ls "$INDEX"/files/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  rm -rf "$INDEX"
  "$PC_VENV/bin/pip" download -q --disable-pip-version-check --dest "$INDEX/files" \
    "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
  ls "$INDEX"/files/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1 \
    || die "pip did not find a CPU build of torch $TORCH_VERSION (got: $(ls "$INDEX/files" | grep '^torch-' || echo nothing))"
fi
python3 - "$INDEX" <<'PY'
import html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
groups: dict = {}
for wheel in sorted((root / "files").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    groups.setdefault(name, []).append(wheel.name)
for name, files in groups.items():
    folder = root / "simple" / name
    folder.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../files/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
    (folder / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
PY

# Build steps reach PyPI and Debian through this host's network, which may inspect TLS with
# a local CA: RUN steps get the host's trust store and a pip.conf naming it, as volumes
# (never in a layer).
printf '[global]\ncert = /run/vq-host-ca/ca-certificates.crt\n' > "$STATE/pip.conf"
BUILD=(buildah bud --isolation chroot --network host --format docker --layers
       -v /etc/ssl/certs:/run/vq-host-ca:ro -v "$ROOT/$STATE/pip.conf:/etc/pip.conf:ro")

build() {
  local name=$1 image=$2
  shift 2
  local t0
  t0=$(now_ms)
  "${BUILD[@]}" -t "$image" "$@" >"$STATE/logs/build-$name.log" 2>&1 \
    || { tail -30 "$STATE/logs/build-$name.log" >&3; die "building the $name image"; }
  local size
  size=$(podman image inspect --format '{{.Size}}' "$image")
  record "build $name" "$(secs $(( $(now_ms) - t0 ))) s, $(( size / 1000000 )) MB"
}

# WITH_FLASH_ATTN is passed explicitly: buildah 1.28 resolves `FROM flash-attn-${...}` to
# the stage only for a build argument given on the command line (as compose does).
build worker "$WORKER_IMAGE" -f ops/worker.Dockerfile \
  -v "$ROOT/$INDEX:/run/vq-torch-index:ro" \
  --build-arg WITH_FLASH_ATTN=0 \
  --build-arg "BASE_IMAGE=$PREFIX/cuda:bookworm" \
  --build-arg "DEVEL_IMAGE=$PREFIX/cuda:bookworm" \
  --build-arg TORCH_INDEX_URL=file:///run/vq-torch-index/simple .
build light "$LIGHT_IMAGE" -f ops/light.Dockerfile \
  --build-arg "BASE_IMAGE=$PREFIX/python:bookworm" .
build flower-proxy "$PROXY_IMAGE" -f ops/flower-proxy/Dockerfile \
  --build-arg "BASE_IMAGE=$PREFIX/nginx-unprivileged:bookworm" ops/flower-proxy

# --- the stack -------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GATEWAY_PORT=$(free_port)
FLOWER_PORT=$(free_port)
token() { python3 -c 'import secrets, sys; print(secrets.token_hex(int(sys.argv[1])))' "$1"; }
REDIS_PASSWORD=$(token 24)
FLOWER_USER=stackcheck
FLOWER_PASSWORD=$(token 16)
VQ_API_KEY=$(token 20)
( umask 077; cat > "$ENV_FILE" <<EOF
REDIS_PASSWORD=$REDIS_PASSWORD
FLOWER_USER=$FLOWER_USER
FLOWER_PASSWORD=$FLOWER_PASSWORD
VQ_API_KEYS=$VQ_API_KEY
VQ_WORKER_IMAGE=$WORKER_IMAGE
VQ_LIGHT_IMAGE=$LIGHT_IMAGE
VQ_FLOWER_PROXY_IMAGE=$PROXY_IMAGE
VQ_REDIS_IMAGE=$REDIS_IMAGE
VQ_TORCH_INDEX_URL=file:///run/vq-torch-index/simple
GATEWAY_HOST_IP=127.0.0.1
GATEWAY_PORT=$GATEWAY_PORT
FLOWER_PORT=$FLOWER_PORT
VQ_HOST_LABEL=stack-check
EOF
)

t0=$(now_ms)
compose up -d --no-build || die "podman-compose up (see $STATE/logs/compose.log)"
SERVICES=(redis worker-0 flower flower-proxy gateway queue-exporter)
container() { echo "${PROJECT}_$1_1"; }

# podman runs health checks from systemd timers; without systemd nothing runs them, so this
# loop does, every 5 s (podman-compose 1.6 with podman 4.3 also starts services without
# waiting for `condition: service_healthy`; the services retry until Redis answers).
( trap - EXIT INT TERM
  while :; do
    for s in "${SERVICES[@]}"; do podman healthcheck run "$(container "$s")" >/dev/null 2>&1 || true; done
    sleep 5
  done ) &
TICKER=$!

health() { podman inspect --format '{{.State.Health.Status}}' "$(container "$1")" 2>/dev/null || echo gone; }
wait_healthy() {
  local deadline=$(( $(date +%s) + $1 )) s pending
  shift
  while :; do
    pending=()
    for s in "$@"; do [ "$(health "$s")" = healthy ] || pending+=("$s:$(health "$s")"); done
    [ ${#pending[@]} = 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || die "not healthy in time: ${pending[*]}"
    sleep 2
  done
}
wait_healthy "$HEALTHY_WITHIN_S" "${SERVICES[@]}"
record "up until every health check is healthy" "$(secs $(( $(now_ms) - t0 ))) s"

# --- through the gateway, from the host: the README's curl example ---------------------------
export GATEWAY=http://127.0.0.1:$GATEWAY_PORT VQ_API_KEY
t0=$(now_ms)
example=$(awk '/^IMAGE=\$\(base64/ { on = 1 } on && /^$/ { exit } on { print }' README.md)
[ -n "$example" ] || die "the chat completion curl example is no longer in README.md"
reply=$(bash -e -c "$example")
python3 - "$reply" <<'PY' || die "gateway: unexpected reply: ${reply:0:300}"
import json, sys
reply = json.loads(sys.argv[1])
assert reply["object"] == "chat.completion", reply
assert reply["choices"][0]["message"]["content"], reply
assert reply["usage"]["completion_tokens"] > 0, reply
PY
record "gateway: README curl example (chat completion with an image)" "$(secs $(( $(now_ms) - t0 ))) s"
curl -s -o /dev/null -w '%{http_code}' "$GATEWAY/v1/models" | grep -qx 401 \
  || die "gateway: /v1/models answered without an API key"

# --- producer submit against the stack's Redis ----------------------------------------------
# From the light image on the compose network (Redis is not published), as ops/README.md
# tells operators to submit; the image comes in on stdin.
t0=$(now_ms)
submitted=$("${COMPOSE[@]}" run --rm --no-deps -T flower \
  producer submit --task describe --image - --wait --timeout 120 --json \
  < examples/images/street_1280x720.jpg 2>>"$STATE/logs/compose.log") \
  || die "producer submit failed: ${submitted:0:300}"
python3 - "$submitted" <<'PY' || die "producer submit: unexpected output: ${submitted:0:300}"
import json, sys
result = json.loads(sys.argv[1].strip().splitlines()[-1])
assert result["task"] == "describe" and result["text"] and not result.get("error"), result
PY
record "producer submit --wait (describe)" "$(secs $(( $(now_ms) - t0 ))) s"

# --- Flower behind its proxy, with basic auth ------------------------------------------------
FLOWER=http://127.0.0.1:$FLOWER_PORT
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code "$FLOWER/api/workers")" = 401 ] || die "flower-proxy: Flower answered without auth"
[ "$(code -u "$FLOWER_USER:wrong" "$FLOWER/api/workers")" = 401 ] || die "flower-proxy: a wrong password passed"
workers=$(curl -s -u "$FLOWER_USER:$FLOWER_PASSWORD" "$FLOWER/api/workers?refresh=1")
grep -q '"cpu0@stack-check"' <<<"$workers" || die "Flower does not list the worker: ${workers:0:300}"
[ "$(code -u "$FLOWER_USER:$FLOWER_PASSWORD" -X POST "$FLOWER/api/worker/shutdown/cpu0@stack-check")" = 403 ] \
  || die "flower-proxy: a worker shutdown was not refused"
[ "$(code -u "$FLOWER_USER:$FLOWER_PASSWORD" "$FLOWER/metrics")" = 404 ] \
  || die "flower-proxy: /metrics served on the dashboard port"
record "flower behind its proxy" "auth required, worker listed, controls refused"

# --- a worker restart in the middle of a task ------------------------------------------------
auth=(-H "Authorization: Bearer $VQ_API_KEY")
task_field() {
  curl -s "${auth[@]}" "$GATEWAY/v1/tasks/$1" | python3 -c \
    'import json, sys; print(json.load(sys.stdin).get(sys.argv[1]) or "")' "$2"
}
worker_log() { podman logs "$(container worker-0)" 2>&1; }
# One try: a task in progress, then the restart. "Mid-task" is checked in the worker's log:
# Celery's "Warm shutdown" line comes after the restart began and before the task's outcome
# line. Returns 3 when the task ended before the SIGTERM reached it (then try again).
restart_mid_task() {
  local task_id state deadline started_before lines_before outcome_at warm_at runs outcome
  # Read before the task goes in (the idle worker logs nothing meanwhile), so that the
  # restart follows the task's start as closely as it can.
  started_before=$(podman inspect --format '{{.State.StartedAt}}' "$(container worker-0)")
  lines_before=$(worker_log | wc -l)
  # The README's native-task example: ocr runs up to 1024 tokens, a few seconds on this CPU.
  task_id=$(curl -s "$GATEWAY/v1/tasks" "${auth[@]}" -F task=ocr -F images=@examples/images/doc_900x600.png \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') || die "gateway: no task id"
  deadline=$(( $(date +%s) + 60 ))
  # STARTED: a worker slot took it; PROGRESS: tokens are coming.
  until state=$(task_field "$task_id" state); [ "$state" = STARTED ] || [ "$state" = PROGRESS ]; do
    [ "$state" != SUCCESS ] || return 3
    [ "$(date +%s)" -lt "$deadline" ] || die "task $task_id never started (state $state)"
    sleep 0.05
  done
  # What `podman-compose restart worker-0` runs, without its second of start-up (the task
  # lasts only a few): podman restart with the service's stop_grace_period (11m, 660 s; a
  # bare `podman restart` gives 10 s). SIGTERM starts Celery's warm shutdown, which lets the
  # task finish; then the container starts again.
  podman restart -t 660 "$(container worker-0)" >/dev/null 2>>"$STATE/logs/compose.log" \
    || die "podman restart worker-0"
  [ "$(podman inspect --format '{{.State.StartedAt}}' "$(container worker-0)")" != "$started_before" ] \
    || die "worker-0 was not restarted"
  deadline=$(( $(date +%s) + 180 ))
  while state=$(task_field "$task_id" state); [ "$state" != SUCCESS ]; do
    [ "$state" != FAILURE ] || die "task $task_id failed after the restart"
    [ "$(date +%s)" -lt "$deadline" ] || die "task $task_id did not finish after the restart (state $state)"
    sleep 1
  done
  wait_healthy 300 worker-0
  runs=$(worker_log | grep -c "task id=$task_id task=ocr outcome=" || true)
  [ "$runs" = 1 ] || die "task $task_id ran $runs times (worker log lines: task id=... outcome=)"
  outcome=$(worker_log | grep -o "task id=$task_id task=ocr outcome=[a-z_]*" | sed 's/.*outcome=//')
  [ "$outcome" = success ] || die "task $task_id outcome $outcome"
  outcome_at=$(worker_log | grep -n "task id=$task_id task=ocr outcome=" | cut -d: -f1)
  warm_at=$(worker_log | tail -n +"$(( lines_before + 1 ))" | grep -n "Warm shutdown" | head -1 | cut -d: -f1)
  [ -n "$warm_at" ] || die "no warm shutdown in the worker's log after the restart"
  [ "$outcome_at" -gt $(( lines_before + warm_at )) ] || return 3
}
t0=$(now_ms)
for try in 1 2 3 4 5; do
  rc=0
  restart_mid_task || rc=$?
  [ "$rc" = 0 ] && break
  say "the task ended before the restart reached it (try $try); again"
done
[ "$rc" = 0 ] || die "no restart landed mid-task in 5 tries"
record "worker restart mid-task" "task finished once (outcome=success) during the warm shutdown, worker healthy again; $(secs $(( $(now_ms) - t0 ))) s, try $try"

# --- down, and nothing left ------------------------------------------------------------------
stop_ticker
for c in $(project_containers); do podman logs "$c" >"$STATE/logs/$c.log" 2>&1 || true; done
t0=$(now_ms)
# Stop first (each service's stop_grace_period), to see how each one ended: 137 is SIGKILL
# at the end of the grace period (a shutdown bug); uvicorn (the gateway) exits 143 after
# its graceful shutdown, re-raising the SIGTERM. The worker alone first, then the other
# dependents, Redis last (podman-compose would stop all at once): a worker whose Redis is
# gone spends half a minute on its last connection attempts, and while other containers of
# the network stop, podman 4.3's aardvark-dns can let a name lookup wait 5 s, which the
# worker's shutdown (it opens Redis connections to withdraw) turned into ~30 s stops.
compose stop worker-0 || die "podman-compose stop worker-0"
compose stop gateway queue-exporter flower-proxy flower || die "podman-compose stop"
compose stop redis || die "podman-compose stop redis"
for c in $(project_containers); do podman logs "$c" >"$STATE/logs/$c.log" 2>&1 || true; done
stops=()
for s in "${SERVICES[@]}"; do
  read -r code finished < <(podman inspect --format '{{.State.ExitCode}} {{.State.FinishedAt}}' "$(container "$s")")
  finished_ms=$(date -d "${finished% UTC}" +%s%3N)
  stops+=("$s=exit $code after $(secs $(( finished_ms - t0 ))) s")
done
record "stop" "$(secs $(( $(now_ms) - t0 ))) s ($(printf '%s; ' "${stops[@]}" | sed 's/; $//'))"
case " ${stops[*]} " in *"exit 137 "*) die "a service needed SIGKILL to stop" ;; esac
t0=$(now_ms)
compose down -v || die "podman-compose down"
left="$(project_containers) $(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT") $(podman network ls -q --filter "name=^${PROJECT}_")"
[ -z "${left// /}" ] || die "left behind after down: $left"
record "down -v, nothing left" "$(secs $(( $(now_ms) - t0 ))) s"
record "total" "$(secs $(( $(now_ms) - T_START ))) s"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "host: $(nproc) CPUs, podman $(podman version --format '{{.Client.Version}}'), buildah $(buildah version --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])'), podman-compose $PODMAN_COMPOSE_VERSION"
  printf '%s\n' "${RESULTS[@]}"
} > "$STATE/last-result.txt"
for image in "$WORKER_IMAGE" "$LIGHT_IMAGE" "$PROXY_IMAGE"; do
  podman tag "$image" "${image%:*}:$KEEP_TAG"
done
say "PASSED; result in $STATE/last-result.txt"
