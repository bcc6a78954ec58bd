#!/usr/bin/env bash
# A real conversation on the chat page, photographed: starts `minimind serve` on the embedded default model
# (SmolLM2-135M-Instruct) and the Streamlit page on it, sends a message from headless Chromium, and saves
# docs/img/chat.png. Not part of the fast test suite (it loads a 135M model; about a minute on a laptop CPU).
#
#   bash tests/ui/chat_screenshot.sh ["message"]
#
# The page's temperature is set to 0 (greedy) so that the picture shows the model's most likely answer;
# TEMPERATURE=keep leaves the page's default.
# Needs Debian's chromium (installed here with apt-get when missing, as root) and Node.js with npm.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
API_PORT="${API_PORT:-18998}"
UI_PORT="${UI_PORT:-18501}"
MESSAGE="${1:-What is the capital of France? Answer in one sentence.}"
LOGS="$(mktemp -d /tmp/minimind-ui.XXXXXX)"

if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
[[ -d tests/ui/node_modules/playwright-core ]] || (cd tests/ui && npm ci --no-audit --no-fund)

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

.venv/bin/minimind serve --host 127.0.0.1 --port "$API_PORT" >"$LOGS/serve.log" 2>&1 &
pids+=($!)
MINIMIND_API_BASE="http://127.0.0.1:$API_PORT/v1" .venv/bin/streamlit run webui/app.py \
    --server.address=127.0.0.1 --server.port="$UI_PORT" --server.headless=true \
    --browser.gatherUsageStats=false --client.toolbarMode=minimal >"$LOGS/webui.log" 2>&1 &
pids+=($!)

for _ in $(seq 300); do curl -sf "http://127.0.0.1:$API_PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$API_PORT/health" >/dev/null || { tail -30 "$LOGS/serve.log"; exit 1; }
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$UI_PORT/_stcore/health" >/dev/null && break; sleep 1; done

TEMPERATURE="${TEMPERATURE:-0}" node tests/ui/chat_screenshot.mjs "http://127.0.0.1:$UI_PORT" docs/img/chat.png "$MESSAGE"
echo "logs: $LOGS"
