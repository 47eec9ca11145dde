#!/usr/bin/env bash
# End-to-end policy test with the official Python MCP SDK (`mcp`, v2 API) on both sides of mcp-tenant-proxy:
# two examples/py_server.py upstreams (one Streamable HTTP, one legacy HTTP+SSE), both with the tool rule
# `block = ["delete_*"]`, and examples/py_policy_client.py acting as alice and as bob through an enterprise key.
#
# Usage:  bash examples/e2e_policy.sh path/to/mcp-tenant-proxy
#         (E2E_KEEP=1 keeps the temporary config, logs and audit trail and prints where they are)
#
# This script installs nothing. Install the Python dependencies first, from the repository root:
#   python3 -m pip install -r examples/requirements.txt
#
# It checks that:
#   - the config passes `check-config`;
#   - for alice and bob, over Streamable HTTP (SDK default negotiation, and the initialize handshake with
#     sessions) and over the legacy HTTP+SSE transport (both negotiations):
#       tools/list hides delete_repo; whoami reaches the upstream with the user's own credential only and
#       x-mcp-user = the user; delete_repo is refused with tool_not_allowed (see py_policy_client.py);
#   - the proxy stops on SIGTERM, and `audit verify` accepts its audit trail;
#   - the audit trail holds a tool_not_allowed denial of delete_repo per user per connection, and no
#     delete_repo call that was let through.
# The last line is "N passed, M failed"; the exit status is non-zero if any check failed.

set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash examples/e2e_policy.sh path/to/mcp-tenant-proxy" >&2
    exit 2
fi
BIN=$1
if [[ ! -x $BIN ]]; then
    echo "e2e_policy: $BIN is not an executable (build it with: cargo build)" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
CLIENT_TIMEOUT=600 # seconds, for the whole client run (each connection has its own 45 s deadline)
READY_TIMEOUT=30   # seconds, for each server to answer
STOP_TIMEOUT=40    # seconds, for the proxy to exit after SIGTERM (its shutdown_grace is 5 s)

# The connections py_policy_client.py makes per user (its CONNECTIONS list).
CONNECTIONS=4
USERS=(alice bob)

if ! "$PYTHON" -c 'import mcp, httpx2' 2>/dev/null; then
    echo "e2e_policy: the Python MCP SDK is missing; run: $PYTHON -m pip install -r examples/requirements.txt" >&2
    exit 2
fi

# --- process bookkeeping --------------------------------------------------------------------------
WORK=$(mktemp -d)
PIDS=() # every background process this script started

stop_pid() { # stop_pid PID: SIGTERM, up to 5 s, then SIGKILL
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [[ -n ${E2E_KEEP:-} ]]; then
        echo "e2e_policy: kept the config, logs and audit trail in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Four distinct free ports: all sockets stay bound until all numbers are known.
read -r P_MODERN P_LEGACY PORT ADMIN_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
if [[ -z ${ADMIN_PORT:-} ]]; then
    echo "e2e_policy: could not pick free ports" >&2
    exit 1
fi

# --- checks ----------------------------------------------------------------------------------------
PASSED=0
FAILED=0

pass() {
    PASSED=$((PASSED + 1))
    echo "ok - $1"
}

fail() { # fail DESCRIPTION [DETAIL...]
    FAILED=$((FAILED + 1))
    echo "not ok - $1"
    shift
    local detail line
    for detail in "$@"; do
        while IFS= read -r line; do echo "    # $line"; done <<<"$detail"
    done
}

log_tail() { # log_tail NAME FILE
    echo "---- last lines of $1 ----"
    tail -n "${3:-40}" "$2"
    echo "----"
}

http_ok() { # http_ok URL: any HTTP answer below 500 within 1 s
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1).close()
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code < 500 else 1)
EOF
}

port_open() { # port_open PORT
    "$PYTHON" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()' \
        "$1" 2>/dev/null
}

wait_until() { # wait_until WHAT PID LOG COMMAND...: poll COMMAND every 0.2 s, for READY_TIMEOUT s at most
    local what=$1 pid=$2 log=$3
    shift 3
    local started=$SECONDS
    until "$@"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "e2e_policy: $what exited before it became ready"
            log_tail "$what's output" "$log"
            return 1
        fi
        if ((SECONDS - started >= READY_TIMEOUT)); then
            echo "e2e_policy: $what was not ready after ${READY_TIMEOUT}s"
            log_tail "$what's output" "$log"
            return 1
        fi
        sleep 0.2
    done
    echo "e2e_policy: $what ready (waited $((SECONDS - started))s)"
}

# --- the upstreams: the Python SDK's own server, one per transport -----------------------------------
"$PYTHON" "$HERE/py_server.py" --transport streamable-http --port "$P_MODERN" >"$WORK/modern.log" 2>&1 &
MODERN_PID=$!
PIDS+=("$MODERN_PID")
"$PYTHON" "$HERE/py_server.py" --transport sse --port "$P_LEGACY" >"$WORK/legacy.log" 2>&1 &
LEGACY_PID=$!
PIDS+=("$LEGACY_PID")
wait_until "py_server (streamable-http, port $P_MODERN)" "$MODERN_PID" "$WORK/modern.log" port_open "$P_MODERN" || exit 1
wait_until "py_server (sse, port $P_LEGACY)" "$LEGACY_PID" "$WORK/legacy.log" port_open "$P_LEGACY" || exit 1

# --- the proxy's config ----------------------------------------------------------------------------
# Test-only secrets, inline (a real deployment stores a key's sha256 and references credentials).
KEY=e2e-policy-enterprise-key-7f3a
declare -A CRED=([alice]=ghp_policy_alice_0001 [bob]=ghp_policy_bob_0002)
CONFIG=$WORK/proxy.toml
AUDIT=$WORK/audit.jsonl
PROXY_LOG=$WORK/proxy.log

{
    cat <<EOF
[server]
listen = "127.0.0.1:$PORT"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[audit]
path = "$AUDIT"

[sessions]
secret = "e2e-policy-session-secret-0123456789abcdef"

[[keys]]
id = "e2e-enterprise"
kind = "enterprise"
secret = "$KEY"
user = "svc"
act_as = ["alice", "bob"]

[[users]]
id = "alice"

[[users]]
id = "bob"

[upstreams.modern]
url = "http://127.0.0.1:$P_MODERN/mcp"
inject = { header = "authorization", value = "Bearer {secret}" }
forward_user_header = "x-mcp-user"

[upstreams.modern.restrictions]
tools = { block = ["delete_*"] }

[upstreams.legacy]
url = "http://127.0.0.1:$P_LEGACY"
inject = { header = "authorization", value = "Bearer {secret}" }
forward_user_header = "x-mcp-user"

[upstreams.legacy.restrictions]
tools = { block = ["delete_*"] }
EOF
    for user in "${USERS[@]}"; do
        for upstream in modern legacy; do
            printf '\n[[credentials]]\nuser = "%s"\nupstream = "%s"\nsecret = "%s"\n' "$user" "$upstream" "${CRED[$user]}"
        done
    done
} >"$CONFIG"

if OUT=$("$BIN" check-config --config "$CONFIG" 2>&1); then
    pass "check-config accepts the test config"
else
    fail "check-config accepts the test config" "$OUT"
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi

# --- the proxy ---------------------------------------------------------------------------------------
# NO_COLOR: the proxy's log goes to a file, keep it free of ANSI colour codes.
NO_COLOR=1 "$BIN" run --config "$CONFIG" >"$PROXY_LOG" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
PROXY=http://127.0.0.1:$PORT
echo "e2e_policy: started the proxy (pid $PROXY_PID) at $PROXY"
wait_until "the proxy (/readyz)" "$PROXY_PID" "$PROXY_LOG" http_ok "http://127.0.0.1:$ADMIN_PORT/readyz" || exit 1

# --- the client: one ok / not ok line per check -------------------------------------------------------
CLIENT_ARGS=(--proxy "$PROXY" --key "$KEY")
for user in "${USERS[@]}"; do CLIENT_ARGS+=(--cred "$user=${CRED[$user]}"); done
CLIENT_OUT=$WORK/client.out
# In the background, so that a signal to this script is handled at once (bash runs traps only between
# foreground commands, but interrupts `wait`) and the client is stopped with the rest.
timeout "$CLIENT_TIMEOUT" "$PYTHON" "$HERE/py_policy_client.py" "${CLIENT_ARGS[@]}" >"$CLIENT_OUT" 2>"$WORK/client.err" &
CLIENT_PID=$!
PIDS+=("$CLIENT_PID")
wait "$CLIENT_PID"
CLIENT_RC=$?
cat "$CLIENT_OUT"
CLIENT_OK=$(grep -c '^ok - ' "$CLIENT_OUT")
CLIENT_NOT_OK=$(grep -c '^not ok - ' "$CLIENT_OUT")
PASSED=$((PASSED + CLIENT_OK))
FAILED=$((FAILED + CLIENT_NOT_OK))
if ((CLIENT_RC != 0 && CLIENT_NOT_OK == 0)); then
    fail "py_policy_client.py exits 0 (exit $CLIENT_RC)" "$(tail -n 20 "$WORK/client.err")"
fi
if ((CLIENT_OK + CLIENT_NOT_OK == 0)); then
    fail "py_policy_client.py reports its checks" "$(tail -n 20 "$WORK/client.err")"
fi

# --- stop the proxy, then its audit trail -----------------------------------------------------------------
if kill -0 "$PROXY_PID" 2>/dev/null; then
    kill -TERM "$PROXY_PID"
    for _ in $(seq $((STOP_TIMEOUT * 10))); do
        kill -0 "$PROXY_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$PROXY_PID" 2>/dev/null; then
        fail "the proxy exits within ${STOP_TIMEOUT}s of SIGTERM"
        kill -9 "$PROXY_PID" 2>/dev/null
        wait "$PROXY_PID" 2>/dev/null
    else
        wait "$PROXY_PID"
        rc=$?
        if ((rc == 0)); then
            pass "the proxy exits 0 on SIGTERM"
        else
            fail "the proxy exits 0 on SIGTERM (exit $rc)" "$(tail -n 20 "$PROXY_LOG")"
        fi
    fi
else
    fail "the proxy is still running after the client run" "$(tail -n 40 "$PROXY_LOG")"
fi

if OUT=$("$BIN" audit verify "$AUDIT" 2>&1); then
    pass "audit verify accepts the audit trail ($(wc -l <"$AUDIT") lines)"
else
    fail "audit verify accepts the audit trail (exit $?)" "$OUT"
fi

for user in "${USERS[@]}"; do
    for upstream in modern legacy; do
        count=$(grep -F '"tool":"delete_repo"' "$AUDIT" 2>/dev/null | grep -F '"reason":"tool_not_allowed"' |
            grep -F "\"acting_user\":\"$user\"" | grep -cF "\"upstream\":\"$upstream\"")
        want=$((CONNECTIONS / 2)) # each transport is tried with two negotiation modes
        if ((count == want)); then
            pass "audit: $want tool_not_allowed denials of delete_repo for $user on $upstream"
        else
            fail "audit: $want tool_not_allowed denials of delete_repo for $user on $upstream (found $count)" \
                "$(grep -F '"tool":"delete_repo"' "$AUDIT" 2>/dev/null | grep -F "\"acting_user\":\"$user\"")"
        fi
    done
done

allowed=$(grep -F '"tool":"delete_repo"' "$AUDIT" 2>/dev/null | grep -cvF '"decision":"deny"')
if ((allowed == 0)); then
    pass "audit: no delete_repo call was let through to an upstream"
else
    fail "audit: no delete_repo call was let through to an upstream (found $allowed)" \
        "$(grep -F '"tool":"delete_repo"' "$AUDIT" | grep -vF '"decision":"deny"')"
fi

if ((FAILED > 0)); then
    log_tail "the proxy's log" "$PROXY_LOG" 60
    log_tail "the streamable-http py_server's output" "$WORK/modern.log" 20
    log_tail "the sse py_server's output" "$WORK/legacy.log" 20
    if [[ -s $WORK/client.err ]]; then log_tail "py_policy_client.py's stderr" "$WORK/client.err" 60; fi
fi
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
