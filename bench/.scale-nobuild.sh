#!/usr/bin/env bash
# Scale benchmark: a store with N users (default 1,000,000), each with a key and a credential.
#
#     bash bench/scale.sh [users] [postgres-url]
#
# Reports, for the embedded store (and for PostgreSQL when a URL is given; its password, if any, from
# MCP_BENCH_PG_PASSWORD):
#   - the bulk import time (`users import`),
#   - the start-up time (process start to /readyz 200, the snapshot load included),
#   - the directory memory per user (RSS with N users minus RSS with none, over N),
#   - admin-API user creations per second with 16 concurrent clients (wrk), at N users and at 10 users.
# Installs wrk from Debian's packages if missing. Work files go to /tmp/mtpscale.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-1000000}
PG_URL=${2:-}
WORK=/tmp/mtpscale
BIN=target/release/mcp-tenant-proxy
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
true
rm -rf "$WORK" && mkdir -p "$WORK"

python3 - "$USERS" > "$WORK/users.jsonl" <<'EOF'
import sys
for i in range(int(sys.argv[1])):
    print('{"id":"user-%07d","keys":[{"kind":"standard"}],"credentials":[{"upstream":"demo","id":"default","secret":"tok-%07d"}]}' % (i, i))
EOF
"$BIN" store init-master-key 2>/dev/null > "$WORK/master.key"
head -c 32 /dev/urandom | base64 > "$WORK/admin.token"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# config BACKEND_LINES -> writes $WORK/proxy.toml
config() {
  local proxy_port=$1 admin_port=$2 store_lines=$3
  cat > "$WORK/proxy.toml" <<EOF
audit = { path = "$WORK/audit.log" }
[server]
listen = "127.0.0.1:$proxy_port"
[admin]
listen = "127.0.0.1:$admin_port"
token_file = "$WORK/admin.token"
[store]
$store_lines
master_key_file = "$WORK/master.key"
[upstreams.demo]
url = "http://127.0.0.1:9/mcp"
inject = { header = "authorization", value = "Bearer {secret}" }
EOF
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# start ADMIN_PORT: runs the proxy and waits for /readyz; sets PID and STARTUP (seconds).
start() {
  local admin_port=$1 t0
  t0=$(date +%s.%N)
  "$BIN" run --config "$WORK/proxy.toml" > "$WORK/proxy.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 6000); do
    if curl -sf "http://127.0.0.1:$admin_port/readyz" > /dev/null 2>&1; then
      STARTUP=$(echo "$(date +%s.%N) - $t0" | bc); return 0
    fi
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/proxy.log" >&2; return 1; }
    sleep 0.01
  done
  echo "the proxy did not become ready" >&2; return 1
}

cat > "$WORK/create.lua" <<'EOF'
-- Each request creates a new user; ids are unique per thread and run.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", tostring(os.time()) .. "-" .. threads)
end
local counter = 0
local prefix
function init() prefix = "new-" .. tid .. "-" end
function request()
  counter = counter + 1
  return wrk.format("POST", "/admin/v1/users", nil, '{"id":"' .. prefix .. counter .. '"}')
end
local non201 = 0
function response(status) if status ~= 201 then non201 = non201 + 1 end end
EOF

creations() {
  local admin_port=$1
  wrk -t2 -c16 -d10s -s "$WORK/create.lua" -H "authorization: Bearer $(cat "$WORK/admin.token")" \
    -H "content-type: application/json" "http://127.0.0.1:$admin_port" > "$WORK/wrk.txt"
  grep -E 'Non-2xx' "$WORK/wrk.txt" && { echo "some creations failed" >&2; cat "$WORK/wrk.txt" >&2; return 1; }
  awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt"
}

run_backend() {
  local name=$1 store_lines=$2 import_args=$3
  local pp ap
  pp=$(free_port); ap=$(free_port)
  config "$pp" "$ap" "$store_lines"
  # Empty store: the baseline RSS and creations at 10 users.
  "$BIN" store import $import_args "$WORK/ten.jsonl" --keys-out "$WORK/$name-ten.keys" --master-key-file "$WORK/master.key" >/dev/null
  start "$ap"
  local t_empty=$STARTUP rss_empty; rss_empty=$(rss_kib "$PID")
  local rate_small; rate_small=$(creations "$ap")
  kill -TERM "$PID"; wait "$PID" || true
  # N users.
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" store import $import_args "$WORK/users.jsonl" --keys-out "$WORK/$name-users.keys" --master-key-file "$WORK/master.key" >/dev/null
  t1=$(date +%s.%N)
  start "$ap"
  local t_full=$STARTUP rss_full; rss_full=$(rss_kib "$PID")
  local rate_big; rate_big=$(creations "$ap")
  kill -TERM "$PID"; wait "$PID" || true
  printf '%s: import of %d users (key + credential each): %.1f s\n' "$name" "$USERS" "$(echo "$t1 - $t0" | bc)"
  printf '%s: start-up to ready: %.2f s with %d users (%.2f s with 10)\n' "$name" "$t_full" "$USERS" "$t_empty"
  printf '%s: directory memory: %d bytes per user (RSS %d KiB -> %d KiB)\n' "$name" \
    "$(( (rss_full - rss_empty) * 1024 / USERS ))" "$rss_empty" "$rss_full"
  printf '%s: admin user creations, 16 clients: %.0f/s at %d users, %.0f/s at 10 users (ratio %.2f)\n' "$name" \
    "$rate_big" "$USERS" "$rate_small" "$(echo "$rate_big / $rate_small" | bc -l)"
}

python3 -c 'import json
for i in range(10): print(json.dumps({"id": "ten-%d" % i, "keys": [{"kind": "standard"}]}))' > "$WORK/ten.jsonl"

# SCALE_BACKENDS=postgres skips the SQLite run.
if [[ ${SCALE_BACKENDS:-sqlite,postgres} == *sqlite* ]]; then
  run_backend sqlite "path = \"$WORK/store.db\"" "--store $WORK/store.db"
fi
if [ -n "$PG_URL" ]; then
  run_backend postgres "url = \"$PG_URL\"
password_env = \"MCP_BENCH_PG_PASSWORD\"" "--url $PG_URL --password-env MCP_BENCH_PG_PASSWORD"
fi
