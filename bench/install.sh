#!/usr/bin/env bash
# The install step of a first run, side by side with empty caches (as on a machine that never
# installed these packages): scripts/setup (uv from uv.lock) against the plain pip install it
# replaced (`pip install -e .`, which resolves pyproject.toml's ranges). Prints both times and the ratio.
# Usage: bench/install.sh [REPOSITORY] (default: this clone); ROUNDS=N alternates N times (default 1).
set -euo pipefail
repo="${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}"
rounds="${ROUNDS:-1}"
work="$(mktemp -d)"
now() { date +%s.%N; }
timed() { local t; t=$(now); "$@" >/dev/null 2>&1; awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
lock_install() { (cd "$1" && UV_CACHE_DIR="$1.uv-cache" scripts/setup); }
pip_install() { (cd "$1" && python3 -m venv .venv && PIP_NO_CACHE_DIR=1 .venv/bin/python -m pip install -q -e . -e ./client); }
total_lock=0 total_pip=0
for round in $(seq "$rounds"); do
  git clone -q "$repo" "$work/lock$round" && git clone -q "$repo" "$work/pip$round"
  a=$(timed lock_install "$work/lock$round"); b=$(timed pip_install "$work/pip$round")
  echo "round $round: scripts/setup (uv, uv.lock) $a s, pip install -e . $b s"
  total_lock=$(awk -v x="$total_lock" -v y="$a" 'BEGIN { print x + y }')
  total_pip=$(awk -v x="$total_pip" -v y="$b" 'BEGIN { print x + y }')
done
awk -v a="$total_lock" -v b="$total_pip" -v n="$rounds" \
  'BEGIN { printf "mean: scripts/setup %.1f s, pip %.1f s; pip takes %.1fx as long\n", a / n, b / n, b / a }'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); folders in $work"
