#!/usr/bin/env bash
# End-to-end test: the official MCP SDKs (Python `mcp`, TypeScript `@modelcontextprotocol/sdk`)
# talk to a real MCP server (rmcp) through mcp-tenant-proxy, started with `mcp-tenant-proxy demo`.
#
# Usage:  bash examples/e2e.sh path/to/mcp-tenant-proxy
#
# This script installs nothing. Install the client dependencies first, from the repository root:
#   python3 -m pip install -r examples/requirements.txt
#   npm ci --prefix examples
#
# It checks, with each client, that:
#   - the enterprise key acting as alice reaches the upstream with alice's credential only,
#   - the enterprise key acting as bob reaches the upstream with bob's credential only,
#   - alice's standard key (no user header) acts as alice,
#   - the upstream never sees the client's API key nor the x-alloy-userid header,
#   - alice's standard key naming bob is refused (403, user_override_forbidden),
#   - an unknown key is refused (401, invalid_api_key).
# The last line is "N passed, M failed"; the exit status is non-zero if any check failed.

set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash examples/e2e.sh path/to/mcp-tenant-proxy" >&2
    exit 2
fi
BIN=$1
if [[ ! -x $BIN ]]; then
    echo "e2e: $BIN is not an executable (build it with: cargo build)" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
NODE=${NODE:-node}
CLIENT_TIMEOUT=60 # seconds, for one client run
READY_TIMEOUT=30  # seconds, for the demo to answer /readyz

# --- prerequisites (installed beforehand, see the top of this file) -------------------------
if ! "$PYTHON" -c 'import mcp, httpx2' 2>/dev/null; then
    echo "e2e: the Python MCP SDK is missing; run: $PYTHON -m pip install -r examples/requirements.txt" >&2
    exit 2
fi
if [[ ! -d $HERE/node_modules/@modelcontextprotocol/sdk ]]; then
    echo "e2e: the TypeScript MCP SDK is missing; run: npm ci --prefix examples" >&2
    exit 2
fi

# --- start the demo on free ports ------------------------------------------------------------
WORK=$(mktemp -d)
DEMO_LOG=$WORK/demo.log
DEMO_PID=

cleanup() {
    if [[ -n $DEMO_PID ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        kill "$DEMO_PID" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$DEMO_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$DEMO_PID" 2>/dev/null
        wait "$DEMO_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Two distinct free ports: both sockets stay bound until both numbers are known.
read -r PORT ADMIN_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
if [[ -z ${PORT:-} || -z ${ADMIN_PORT:-} ]]; then
    echo "e2e: could not pick free ports" >&2
    exit 1
fi

URL=http://127.0.0.1:$PORT/mcp/demo
READY_URL=http://127.0.0.1:$ADMIN_PORT/readyz

AUDIT=$WORK/audit.jsonl
"$BIN" demo --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --audit-file "$AUDIT" >"$DEMO_LOG" 2>&1 &
DEMO_PID=$!
echo "e2e: started demo (pid $DEMO_PID), proxy at $URL"

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null
    fi
}

demo_log_tail() {
    echo "---- last lines of the demo's output ----" >&2
    tail -n 40 "$DEMO_LOG" >&2
    echo "-----------------------------------------" >&2
}

started=$SECONDS
deadline=$((started + READY_TIMEOUT))
until http_ok "$READY_URL"; do
    if ! kill -0 "$DEMO_PID" 2>/dev/null; then
        echo "e2e: the demo exited before it became ready" >&2
        demo_log_tail
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "e2e: the demo was not ready after ${READY_TIMEOUT}s ($READY_URL)" >&2
        demo_log_tail
        exit 1
    fi
    sleep 0.2
done
echo "e2e: demo ready (waited $((SECONDS - started))s)"

# --- checks ------------------------------------------------------------------------------------
PASSED=0
FAILED=0
OUT= # output (stdout and stderr) of the last client run
RC=0 # its exit status

pass() {
    PASSED=$((PASSED + 1))
    echo "ok   - $1"
}

fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL - $1"
    local line
    while IFS= read -r line; do echo "       | $line"; done <<<"$OUT"
}

check() { # check DESCRIPTION CONDITION...
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}

has() { grep -qF -- "$1" <<<"$OUT"; }
lacks() { ! grep -qiF -- "$1" <<<"$OUT"; }
succeeded() { [[ $RC -eq 0 ]]; }
refused() { [[ $RC -ne 0 ]] && ! has "upstream saw authorization"; }
reports() { # reports STRING... : the output contains at least one of them
    local s
    for s in "$@"; do has "$s" && return 0; done
    return 1
}
no_leak() { lacks "$1" && lacks "x-alloy-userid"; } # no_leak CLIENT_KEY

run_client() { # run_client CLIENT KEY [USER]
    local client=$1
    shift
    case $client in
    python) OUT=$(timeout "$CLIENT_TIMEOUT" "$PYTHON" "$HERE/python_client.py" "$URL" "$@" 2>&1) ;;
    python-legacy) OUT=$(timeout "$CLIENT_TIMEOUT" "$PYTHON" "$HERE/python_client.py" --mode legacy "$URL" "$@" 2>&1) ;;
    node) OUT=$(timeout "$CLIENT_TIMEOUT" "$NODE" "$HERE/ts_client.mjs" "$URL" "$@" 2>&1) ;;
    esac
    RC=$?
}

declare -A CRED=([alice]=ghp_demo_alice_0001 [bob]=ghp_demo_bob_0002)
declare -A OTHER=([alice]=bob [bob]=alice)

expect_user() { # expect_user LABEL USER KEY
    local label=$1 user=$2 key=$3 other=${OTHER[$2]}
    check "$label: exits 0" succeeded
    check "$label: upstream got $user's credential" has "upstream saw authorization: Bearer ${CRED[$user]}"
    check "$label: upstream got x-mcp-user: $user" has "upstream saw x-mcp-user: $user"
    check "$label: $other's credential never appears" lacks "${CRED[$other]}"
    check "$label: upstream never saw the client key nor x-alloy-userid" no_leak "$key"
}

for client in python python-legacy node; do
    echo "== $client"

    run_client "$client" demo-enterprise-key alice
    expect_user "$client, enterprise key as alice" alice demo-enterprise-key

    run_client "$client" demo-enterprise-key bob
    expect_user "$client, enterprise key as bob" bob demo-enterprise-key

    run_client "$client" demo-alice-key
    expect_user "$client, alice's standard key" alice demo-alice-key

    run_client "$client" demo-alice-key bob
    check "$client, alice's standard key naming bob: refused (non-zero exit, no tool result)" refused
    check "$client, alice's standard key naming bob: reports user_override_forbidden / 403" \
        reports user_override_forbidden 403
    check "$client, alice's standard key naming bob: bob's credential never appears" lacks "${CRED[bob]}"

    run_client "$client" not-a-valid-key
    check "$client, unknown key: refused (non-zero exit, no tool result)" refused
    check "$client, unknown key: reports invalid_api_key / 401" reports invalid_api_key 401
done

# The MCP Inspector's CLI (npm @modelcontextprotocol/inspector), as a person would use it.
INSPECTOR=$HERE/node_modules/.bin/mcp-inspector
for user in alice bob; do
    OUT=$(timeout "$CLIENT_TIMEOUT" "$INSPECTOR" --cli "$URL" --transport http --method tools/call --tool-name whoami \
        --header "Authorization: Bearer demo-enterprise-key" --header "x-alloy-userid: $user" 2>&1)
    RC=$?
    check "MCP Inspector CLI as $user: exits 0" succeeded
    check "MCP Inspector CLI as $user: upstream got $user's credential" has "Bearer ${CRED[$user]}"
    check "MCP Inspector CLI as $user: ${OTHER[$user]}'s credential never appears" lacks "${CRED[${OTHER[$user]}]}"
done
OUT=$(timeout "$CLIENT_TIMEOUT" "$INSPECTOR" --cli "$URL" --transport http --method tools/list \
    --header "Authorization: Bearer not-a-valid-key" 2>&1)
RC=$?
check "MCP Inspector CLI with an unknown key: refused" test "$RC" -ne 0

if ! kill -0 "$DEMO_PID" 2>/dev/null; then
    OUT=$(tail -n 40 "$DEMO_LOG")
    fail "the demo is still running after all client runs"
fi

# Ctrl-C ends the demo, which then checks its audit trail: one line per request, the chain intact.
kill -INT "$DEMO_PID"
for _ in $(seq 100); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.1; done
wait "$DEMO_PID" 2>/dev/null
RC=$?
DEMO_PID=
OUT=$(tail -n 5 "$DEMO_LOG")
check "the demo stops on Ctrl-C" succeeded
check "the demo verifies its audit trail at the end" has "hash chain intact"
OUT=$("$BIN" audit verify "$AUDIT" 2>&1)
check "audit verify agrees on the demo's trail" has "intact"
OUT=$(grep -c '"acting_user":"alice"' "$AUDIT" || true)
check "the trail holds the calls made as alice" test "$OUT" -gt 0

if ((FAILED > 0)); then
    demo_log_tail
fi
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
