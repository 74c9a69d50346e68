#!/usr/bin/env bash
# Installs everything waypoint needs from the package registries alone, idempotently:
#   - a venv under $WAYPOINT_CACHE (default ~/.cache/waypoint) with torch==2.13.0 from PyPI, whose
#     lib/ is the libtorch tch 0.26 links against (LIBTORCH_USE_PYTORCH=1, found again through an rpath);
#   - s3s-fs 0.14.1, the S3-compatible server the tests run on 127.0.0.1.
# A second run checks and returns in seconds.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
mkdir -p "$WAYPOINT_CACHE"

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Python venv with torch ------------------------------------------------------------------------
stamp="$WAYPOINT_VENV/.waypoint-requirements"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$WAYPOINT_VENV/bin/python" -c 'import torch' 2>/dev/null; then
  log "venv up to date: $WAYPOINT_VENV"
else
  if [ ! -x "$WAYPOINT_VENV/bin/python" ]; then
    python3 -m venv "$WAYPOINT_VENV" || {
      log "python3 -m venv failed; installing Debian's python3-venv"
      apt-get update -qq && apt-get install -y -qq python3-venv
      python3 -m venv "$WAYPOINT_VENV"
    }
  fi
  log "installing $(grep -v '^#' "$here/requirements.txt" | tr '\n' ' ')into $WAYPOINT_VENV (torch's wheels are ~4.7 GB)"
  "$WAYPOINT_VENV/bin/python" -m pip install -q --upgrade pip
  "$WAYPOINT_VENV/bin/python" -m pip install -q -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi
"$WAYPOINT_VENV/bin/python" -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "2.13.0" else f"torch {v} in the venv, tch 0.26 needs 2.13.0")'

# --- S3-compatible test server ---------------------------------------------------------------------
if [ -x "$WAYPOINT_S3S_BIN" ] && "$WAYPOINT_S3S_BIN" --version 2>/dev/null | grep -q '0\.14\.1'; then
  log "s3s-fs 0.14.1 present: $WAYPOINT_S3S_BIN"
else
  log "building s3s-fs 0.14.1 from crates.io (a few minutes, once)"
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$WAYPOINT_CACHE/s3s" --quiet
fi
