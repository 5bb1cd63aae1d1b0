#!/usr/bin/env bash
# Times a new user's first run, as the README's quick start does it on a fresh clone:
#   clone -> scripts/dev (install + start) -> /healthz 200 -> examples/module.py's /ready -> its /done.
# Usage: bench/first_run.sh [REPOSITORY] (default: this clone's origin, else this clone). PORT picks
# the sidecar's port (default 18080). The clone is left in a temporary folder, its log in dev.log.
set -euo pipefail
repo="${1:-$(git -C "$(dirname "$0")/.." config --get remote.origin.url || git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}"
port="${PORT:-18080}"
dir="$(mktemp -d)/x"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
start=$(now)
git clone -q "$repo" "$dir"
cd "$dir"
setsid scripts/dev --serverport="$port" >dev.log 2>&1 &
dev=$!
trap 'kill -TERM -- -"$dev" 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  kill -0 "$dev" 2>/dev/null || { echo "scripts/dev exited; see $dir/dev.log" >&2; exit 1; }
  sleep 0.2
done
echo "healthz 200: $(since "$start") s"
SHARED_SECRET=dev-secret SIDECAR_PORT="$port" SIDECAR_BASEDIR=./ion .venv/bin/python -u examples/module.py |
  while IFS= read -r line; do
    case "$line" in
      '{"ready"'*) echo "ready: $(since "$start") s" ;;
      '{"done"'*) echo "done: $(since "$start") s" ;;
    esac
  done
echo "clone: $dir"
