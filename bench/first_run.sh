#!/usr/bin/env bash
# Times a new user's first run, as the README's quick start does it on a fresh clone:
#   clone -> scripts/dev (installs, then starts) -> /healthz 200 -> examples/module.py's /ready -> /done.
# scripts/dev runs scripts/setup first; here that step runs on its own first, so its share is shown
# (scripts/dev then finds it done and only starts the sidecar). Caches are the machine's own: pass
# COLD=1 to give pip and uv empty caches, as on a machine that never installed these packages.
# Usage: bench/first_run.sh [REPOSITORY] (default: this clone). PORT picks the sidecar's port
# (default 18080). The clone stays in a temporary folder, with setup.log and dev.log.
set -euo pipefail
repo="${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}"
port="${PORT:-18080}"
dir="$(mktemp -d)/x"
if [ -n "${COLD:-}" ]; then
  export UV_CACHE_DIR="$dir.uv-cache" PIP_NO_CACHE_DIR=1
fi
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
start=$(now)
git clone -q "$repo" "$dir"
cd "$dir"
scripts/setup >setup.log 2>&1
echo "installed (scripts/setup): $(since "$start") s"
started=$(now)
setsid scripts/dev --serverport="$port" >dev.log 2>&1 &
dev=$!
trap 'kill -TERM -- -"$dev" 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  kill -0 "$dev" 2>/dev/null || { echo "scripts/dev exited; see $dir/dev.log" >&2; exit 1; }
  sleep 0.2
done
echo "healthz 200: $(since "$start") s (start-up: $(since "$started") s)"
SHARED_SECRET=dev-secret SIDECAR_PORT="$port" SIDECAR_BASEDIR=./ion .venv/bin/python -u examples/module.py |
  while IFS= read -r line; do
    case "$line" in
      '{"ready"'*) echo "ready: $(since "$start") s" ;;
      '{"done"'*) echo "done: $(since "$start") s" ;;
    esac
  done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); clone: $dir"
