#!/usr/bin/env bash
# Runs every test of the workspace: installs what is missing (scripts/setup.sh), starts the
# S3-compatible server on 127.0.0.1, runs cargo test, and stops the server however the tests end.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p waypoint-storage`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
bash "$here/setup.sh"
# shellcheck source=env.sh
source "$here/env.sh"
# shellcheck source=s3-server.sh
source "$here/s3-server.sh"
trap stop_s3_server EXIT
start_s3_server
# Tests that need the S3 server fail, rather than skip, when it is missing.
export WAYPOINT_REQUIRE_S3=1
cargo test --workspace "$@"
