# Sourced by the other scripts: where the set-up puts things, and the build environment for libtorch.
# shellcheck shell=bash
WAYPOINT_CACHE="${WAYPOINT_CACHE:-$HOME/.cache/waypoint}"
WAYPOINT_VENV="$WAYPOINT_CACHE/venv"
WAYPOINT_S3S_BIN="$WAYPOINT_CACHE/s3s/bin/s3s-fs"
# tch's build script asks the venv's python where torch (and so libtorch) is.
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV="$WAYPOINT_VENV"
export PATH="$WAYPOINT_VENV/bin:$PATH"
export WAYPOINT_CACHE WAYPOINT_VENV WAYPOINT_S3S_BIN
