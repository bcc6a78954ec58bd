#!/usr/bin/env bash
# End-to-end check of `docker compose up`: builds the image, starts the API and the chat page, asks the
# API a chat completion, fetches the page, tears everything down, and prints PASS/FAIL per step.
#
#   sudo bash tests/compose/smoke.sh          (root: it may install Docker and start dockerd)
#
# Works on a machine without an image registry: when the Dockerfile's base image (python:3.11-slim-bookworm)
# is not present it is made from Debian packages with debootstrap and `docker import`. Run
# `docker pull python:3.11-slim-bookworm` first to test against the official image instead.
# The host's CA bundle is put into that base image, for networks where TLS to PyPI goes through a proxy CA.
#
# Environment: MINIMIND_SMOKE_LOG (default tests/compose/last-run.txt), MINIMIND_SMOKE_KEEP=1 leaves the
# services running, MINIMIND_SMOKE_API_PORT / MINIMIND_SMOKE_WEBUI_PORT (default 18998 / 18501).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
LOG="${MINIMIND_SMOKE_LOG:-$ROOT/tests/compose/last-run.txt}"
exec > >(tee "$LOG") 2>&1

BASE_IMAGE="python:3.11-slim-bookworm"
DEBIAN_MIRROR="${MINIMIND_SMOKE_MIRROR:-http://deb.debian.org/debian}"
HOST_CA="/etc/ssl/certs/ca-certificates.crt"
PROJECT="minimind-smoke"
export MINIMIND_API_PORT="${MINIMIND_SMOKE_API_PORT:-18998}"
export MINIMIND_WEBUI_PORT="${MINIMIND_SMOKE_WEBUI_PORT:-18501}"
API="http://127.0.0.1:$MINIMIND_API_PORT"
UI="http://127.0.0.1:$MINIMIND_WEBUI_PORT"

RESULTS=()
START_TS=$(date +%s)
say() { printf '\n[%s] == %s\n' "$(date -u +%H:%M:%S)" "$*"; }
pass() { RESULTS+=("PASS  $1"); echo "PASS: $1"; }
fail() {
    RESULTS+=("FAIL  $1")
    echo "FAIL: $1"
    summary
    exit 1
}
summary() {
    echo
    echo "==================== compose smoke summary ===================="
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm)  cores: $(nproc)"
    echo "docker: $(docker version --format '{{.Server.Version}}' 2>/dev/null)  compose: $($COMPOSE version --short 2>/dev/null || true)"
    printf '  %s\n' "${RESULTS[@]}"
    echo "total time: $(($(date +%s) - START_TS)) s"
    if [[ "${RESULTS[*]}" == *FAIL* ]]; then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
}

compose() { $COMPOSE -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

teardown() {
    if [[ "${MINIMIND_SMOKE_KEEP:-0}" == "1" ]]; then
        echo "MINIMIND_SMOKE_KEEP=1: services left running (stop with: $COMPOSE -p $PROJECT down -v)"
        return
    fi
    say "tear down"
    compose logs --no-color --tail=40 api webui 2>/dev/null | tail -80
    compose down -v --remove-orphans >/dev/null 2>&1 && echo "services and volumes removed"
}

# --- 1. Docker engine and compose -------------------------------------------------------------------
say "docker engine"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || \
   { ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; }; then
    [[ $EUID -eq 0 ]] || fail "docker.io / docker-compose / debootstrap missing and not root to install them"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap \
        || fail "apt-get install docker.io docker-compose debootstrap"
fi
if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE="docker-compose"; fi
if ! docker info >/dev/null 2>&1; then
    echo "dockerd is not running: starting it (log: /tmp/minimind-smoke-dockerd.log)"
    nohup dockerd >/tmp/minimind-smoke-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null 2>&1 || fail "docker engine not reachable (see /tmp/minimind-smoke-dockerd.log)"
pass "docker engine $(docker version --format '{{.Server.Version}}') with $COMPOSE"

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
say "build"
for wheel in /opt/wheels/torch-2.13.0+cpu-*.whl; do
    [[ -f "$wheel" ]] && cp -u "$wheel" "$ROOT/docker/wheels/" && echo "using local CPU torch wheel $(basename "$wheel")"
done
build_start=$(date +%s)
compose build api || fail "docker compose build"
pass "image built in $(($(date +%s) - build_start)) s ($(docker image inspect my-minimind:cpu --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"

# --- 4. Up and healthy ------------------------------------------------------------------------------
say "up"
trap teardown EXIT
up_start=$(date +%s)
compose up -d || fail "docker compose up -d"
healthy=""
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
reply=$(curl -sf "$API/v1/chat/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"$model\", \"max_tokens\": 40, \"temperature\": 0,
    \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France? Answer in one sentence.\"}]}") \
    || fail "POST /v1/chat/completions"
content=$(printf '%s' "$reply" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print("usage:", r["usage"])') \
    || fail "chat completion JSON: $reply"
echo "$content"
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

summary
