#!/usr/bin/env bash
# The MiniMind-V page answering about an uploaded picture, photographed: starts `minimind vlm-demo --model MODEL`
# (which starts `minimind serve`), uploads a held-out picture of `minimind data vlm-demo` from headless Chromium,
# asks about it and saves docs/img/vlm.png. Not part of the test suite.
#
#   bash tests/ui/vlm_screenshot.sh [MODEL] [DATA] ["question"]
#
# MODEL defaults to runs/vlm-demo/final and DATA to data/vlm-demo (configs/vlm-demo.yaml's paths).
# Needs Debian's chromium (installed here with apt-get when missing, as root) and Node.js with npm.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${1:-runs/vlm-demo/final}"
DATA="${2:-data/vlm-demo}"
QUESTION="${3:-What colour is the shape?}"
UI_PORT="${UI_PORT:-17860}"
LOGS="$(mktemp -d /tmp/minimind-vlm-ui.XXXXXX)"

if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
[[ -d tests/ui/node_modules/playwright-core ]] || (cd tests/ui && npm ci --no-audit --no-fund)
PICTURE="$DATA/$(head -1 "$DATA/test.jsonl" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["image"])')"

GRADIO_ANALYTICS_ENABLED=False .venv/bin/minimind vlm-demo --model "$MODEL" --port "$UI_PORT" >"$LOGS/page.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$UI_PORT/" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$UI_PORT/" >/dev/null || { tail -30 "$LOGS/page.log"; exit 1; }

node tests/ui/vlm_screenshot.mjs "http://127.0.0.1:$UI_PORT" "$PICTURE" docs/img/vlm.png "$QUESTION"
echo "logs: $LOGS"
