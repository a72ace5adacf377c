#!/usr/bin/env bash
# Screenshot every page of the built site (make docs) in headless Chromium, for a look at formulas,
# wide code blocks, tables and plots as a reader sees them. Served from localhost; no other network.
# usage: scripts/screenshot-docs.sh [site-dir] [out-dir] [width]
set -euo pipefail
site=${1:-site}
out=${2:-bpfree-results/docs-screenshots}
width=${3:-1280}
chromium_bin=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $chromium_bin ]]; then
  echo "no chromium: install Debian's package (apt-get install chromium)" >&2
  exit 1
fi
mkdir -p "$out"
port=8765
python3 -m http.server "$port" --directory "$site" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
find "$site" -name index.html | sort | while read -r page; do
  rel=${page#"$site"/}
  rel=${rel%index.html}
  name=${rel%/}
  name=${name//\//-}
  "$chromium_bin" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$(mktemp -d)" --window-size="$width,4000" \
    --screenshot="$out/${name:-index}.png" "http://localhost:$port/$rel" >/dev/null 2>&1
  echo "$out/${name:-index}.png"
done
