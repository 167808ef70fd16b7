#!/usr/bin/env bash
# The fleet view (GET /api/restrict-code-execution/devices) in a real browser: Debian's Chromium,
# driven by playwright-core from npm, opens the page the handler serves against its embedded
# simulator and checks it (scripts/browser/devices.test.mjs). Screenshots: target/browser/*.png.
# Installs what it needs: the chromium Debian package, and playwright-core (pinned in
# scripts/browser/package-lock.json; it downloads no browser of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  echo "== installing Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
  echo "== installing Debian's nodejs and npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
(cd scripts/browser && npm ci --no-audit --no-fund --silent)

cargo build --locked --quiet --bin handler
OUT=target/browser
mkdir -p "$OUT"
rm -f "$OUT"/*.png
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$OUT/handler.log
# The test moves the simulated clock itself; the budget is lifted so nothing waits on it.
DEFENDER_RATE_LIMIT_PER_MINUTE=1000000 DEFENDER_RATE_LIMIT_PER_HOUR=1000000 RUST_LOG=warn \
  target/debug/handler --simulate --port "$PORT" --sim-no-rate-limits >"$LOG" 2>&1 &
HANDLER=$!
trap 'kill $HANDLER 2>/dev/null || true' EXIT
SIM_URL=
for _ in $(seq 1 200); do
  SIM_URL=$(grep -o -m1 'Simulated Defender tenant at http://[0-9.:]*' "$LOG" | awk '{print $NF}' || true)
  if [ -n "$SIM_URL" ] && curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
    break
  fi
  sleep 0.05
done
if [ -z "$SIM_URL" ]; then
  echo "the handler did not start:" >&2
  cat "$LOG" >&2
  exit 1
fi

HANDLER_URL="http://127.0.0.1:$PORT" SIM_URL="$SIM_URL" SCREENSHOTS="$OUT" CHROMIUM="$CHROMIUM" \
  node --test --test-reporter=spec scripts/browser/devices.test.mjs
ls "$OUT"/devices-desktop.png "$OUT"/devices-phone.png
