# Sourced: start_s3_server starts s3s-fs on a free 127.0.0.1 port over a fresh folder and exports the
# AWS_* settings that point waypoint at it; stop_s3_server stops it and removes the folder.
# shellcheck shell=bash

start_s3_server() {
  S3_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/waypoint-s3.XXXXXX")"
  mkdir -p "$S3_ROOT/waypoint-test"
  local port
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export AWS_ACCESS_KEY_ID="waypoint-test" AWS_SECRET_ACCESS_KEY="waypoint-test-secret"
  export AWS_REGION="us-east-1" AWS_ALLOW_HTTP="true" AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  export WAYPOINT_TEST_S3_URI="s3://waypoint-test"
  "$WAYPOINT_S3S_BIN" --host 127.0.0.1 --port "$port" \
    --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_ROOT" \
    > "$S3_ROOT.log" 2>&1 &
  S3_PID=$!
  for _ in $(seq 1 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then
      echo "[s3] s3s-fs listening on $AWS_ENDPOINT_URL (pid $S3_PID, data in $S3_ROOT)" >&2
      return 0
    fi
    kill -0 "$S3_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "[s3] s3s-fs did not start; its log:" >&2
  cat "$S3_ROOT.log" >&2
  return 1
}

stop_s3_server() {
  if [ -n "${S3_PID:-}" ]; then
    kill "$S3_PID" 2>/dev/null || true
    wait "$S3_PID" 2>/dev/null || true
    S3_PID=""
  fi
  if [ -n "${S3_ROOT:-}" ]; then
    rm -rf "$S3_ROOT" "$S3_ROOT.log"
    S3_ROOT=""
  fi
}
