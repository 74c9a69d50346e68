#!/usr/bin/env bash
# Runs the benchmarks (criterion) with the S3 test server up; each prints waypoint's figure beside its
# anchor as a ratio. Extra arguments go to `cargo bench` (e.g. `scripts/bench.sh --bench storage_throughput`).
# Benches: storage_throughput, checkpoint_io, train_throughput, dist_save, data_cache (token cache:
# time to first step and peak RSS at 200 MB / 2 GB, tokenization MB/s against HF tokenizers),
# memory_tier (step overhead, write speed against tmpfs, recovery time from each tier).
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
cargo bench "$@"
