#!/usr/bin/env bash
# The main job on the embedded default: installs what is missing, builds waypoint and runs
# `waypoint train` with no flags, writing under ./runs/. Extra arguments go to `waypoint train`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
bash "$here/setup.sh"
# shellcheck source=env.sh
source "$here/env.sh"
cargo build --release --bin waypoint
./target/release/waypoint train "$@"
