#!/usr/bin/env bash
# Whole-system benchmark: mcp-tenant-proxy against nginx doing the same job, same upstreams, same load,
# in one run, alternating. The method of /work/shared/bench/compare.sh, extended to streams and memory.
#
#     bash bench/whole.sh
#
# Environment (all optional):
#   BIN=path      the proxy binary (default target/release/mcp-tenant-proxy, built with cargo if outdated)
#   DUR=10        seconds per load run          ROUNDS=3   alternating rounds per figure (medians reported)
#   STREAMS=8000  idle SSE streams               SLOW=5000  header-trickling connections
#   EVSTREAMS=100 streams of the SSE event run   TICK_MS=10 one event per stream every TICK_MS
#   CYCLES=3      stream open/close cycles       HOLD=20    seconds after close before RSS is read again
#   REDIS=1       also run ours with the Redis rate limiter (redis-server on loopback)
#   FIGURES=cpu,events,streams,slow   the groups of figures to measure (default all)
#
# Layout: upstreams and proxies on CPU 0, every load generator on CPU 1 (taskset). Static nginx upstream
# :18180, nginx peer proxy :18181, ours :18183 (admin :18184), ours with Redis :18185 (admin :18186),
# Python SSE upstream :18190, redis-server :18179. Work files in /tmp/mtpwhole. The machine is assumed
# otherwise quiet: on a shared machine run it as `flock /tmp/bench.lock bash bench/whole.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJ=$(pwd)
DUR=${DUR:-10}
ROUNDS=${ROUNDS:-3}
STREAMS=${STREAMS:-8000}
SLOW=${SLOW:-5000}
EVSTREAMS=${EVSTREAMS:-100}
TICK_MS=${TICK_MS:-10}
CYCLES=${CYCLES:-3}
HOLD=${HOLD:-20}
REDIS=${REDIS:-0}
FIGURES=${FIGURES:-cpu,events,streams,slow}
echo "# $0 $*"
echo "# BIN=${BIN:-(default)} DUR=$DUR ROUNDS=$ROUNDS STREAMS=$STREAMS SLOW=$SLOW EVSTREAMS=$EVSTREAMS TICK_MS=$TICK_MS CYCLES=$CYCLES HOLD=$HOLD REDIS=$REDIS FIGURES=$FIGURES"
echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) CPUs, $(uname -r)"
want() { [[ ",$FIGURES," == *",$1,"* ]]; }
W=/tmp/mtpwhole
HELP="$PROJ/bench/whole.py"
KEY=bench-enterprise-key-0123456789abcdef
P_UP=18180 P_PX=18181 P_OURS=18183 P_OURS_ADMIN=18184 P_OURSR=18185 P_OURSR_ADMIN=18186 P_SSE=18190 P_REDIS=18179

die() { echo "whole.sh: $*" >&2; exit 1; }

# Run under `flock /tmp/bench.lock`, this shell inherits the lock's file descriptor and every daemon it
# starts (nginx) would too: one left running would hold the lock for good. flock itself keeps the lock
# until this script ends, so the inherited copies are closed (255 is bash's handle on this script).
for fd in $(ls /proc/$$/fd); do
  if [ "$fd" -gt 2 ] && [ "$fd" != 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

# Every process holds thousands of sockets: the soft file limit up to the hard one, inherited by all.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
[ $((2 * STREAMS + 200)) -le "$NOFILE" ] || die "STREAMS=$STREAMS needs $((2 * STREAMS + 200)) open files per proxy (client + upstream side), the limit is $NOFILE"
[ $((SLOW + 200)) -le "$NOFILE" ] || die "SLOW=$SLOW needs more open files than the limit $NOFILE"

# 1. Tools, from Debian's packages when missing.
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ "$REDIS" = 1 ] && ! command -v redis-server >/dev/null; then need+=(redis-server); fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]/nginx-light/nginx}" >/dev/null
fi
for t in wrk nginx taskset python3 curl; do command -v $t >/dev/null || die "$t is missing"; done
if [ -z "${BIN:-}" ]; then
  BIN=$PROJ/target/release/mcp-tenant-proxy
  (cd "$PROJ" && cargo build --release --locked -q) || die "cargo build --release failed"
fi
[ -x "$BIN" ] || die "no proxy binary at $BIN"
echo "# binary: $(ls -l "$BIN")"
echo "# bench/whole.sh from $PROJ at commit $(git -C "$PROJ" rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$BIN" = "$PROJ/target/release/mcp-tenant-proxy" ] || echo ' (BIN is not built from it)')"

for p in $P_UP $P_PX $P_OURS $P_OURS_ADMIN $P_OURSR $P_OURSR_ADMIN $P_SSE $P_REDIS; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is in use (another benchmark running?)"; fi
done

rm -rf "$W"
mkdir -p "$W"/up/logs "$W"/up/tmp "$W"/px/logs "$W"/px/tmp "$W"/redis
RES=$W/results.jsonl
: > "$RES"

# 2. Configs: static upstream, nginx peer, ours (and ours with Redis), the wrk script.
python3 "$HELP" gen "$W" "$KEY" "{\"up\": $P_UP, \"px\": $P_PX, \"ours\": $P_OURS, \"ours_admin\": $P_OURS_ADMIN,
  \"oursr\": $P_OURSR, \"oursr_admin\": $P_OURSR_ADMIN, \"sse\": $P_SSE, \"redis\": $P_REDIS,
  \"nofile\": $NOFILE, \"max_connections\": $NOFILE}"

# Processes. Every one is recorded and stopped at exit, whatever happens.
PIDS=()
cleanup() {
  local p
  set +e
  for f in "$W"/px/nginx.pid "$W"/up/nginx.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for f in "$W"/px/nginx.pid "$W"/up/nginx.pid; do
    for _ in $(seq 50); do [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
  local i
  for i in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  die "nothing listens on port $1 (see $W/*.log)"
}
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; } # utime+stime in ticks, every thread of the process

start_px() { # CONF: cpu (compare.sh's) or streams
  taskset -c 0 nginx -c "$W/px/$1.conf"
  wait_port $P_PX
  PX=$(pgrep -P "$(cat "$W/px/nginx.pid")")
}
stop_px() {
  local m
  m=$(cat "$W/px/nginx.pid")
  kill "$m"
  for _ in $(seq 100); do kill -0 "$m" 2>/dev/null || break; sleep 0.1; done
  rm -f "$W/px/nginx.pid"
}
# start_ours NAME PORT: runs ours with $W/NAME.toml, sets OURS_PID
start_ours() {
  taskset -c 0 "$BIN" run --config "$W/$1.toml" >> "$W/$1.log" 2>&1 &
  OURS_PID=$!
  PIDS+=("$OURS_PID")
  wait_port "$2"
}
stop_pid() {
  local p keep=()
  kill "$1"
  wait "$1" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

taskset -c 0 nginx -c "$W/up/nginx.conf"
wait_port $P_UP
UPW=$(pgrep -P "$(cat "$W/up/nginx.pid")")
taskset -c 0 python3 "$HELP" sse-upstream $P_SSE "$TICK_MS" > "$W/sse.log" 2>&1 &
PIDS+=($!)
wait_port $P_SSE
start_px cpu
start_ours ours-cpu $P_OURS
OURS=$OURS_PID
if [ "$REDIS" = 1 ]; then
  command -v redis-server >/dev/null || die "redis-server is missing"
  taskset -c 0 redis-server --port $P_REDIS --bind 127.0.0.1 --save '' --appendonly no --dir "$W/redis" \
    > "$W/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_port $P_REDIS
  start_ours ours-redis $P_OURSR
  OURSR=$OURS_PID
fi

# Sanity: every proxy answers 200 with the user's own credential injected and the API key gone (on the
# JSON upstream, and on the SSE upstream for the stream configs); a proxy that fails is not benchmarked.
H=(-H "Authorization: Bearer $KEY" -H 'x-alloy-userid: u7' -H 'content-type: application/json'
  -H 'accept: application/json, text/event-stream')
WANT="Bearer cred-u7-xxxxxxxxxxxxxxxx"
sanity() { # NAME PORT
  local code seen
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "${H[@]}" \
    -d '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}' "http://127.0.0.1:$2/")
  seen=$(curl -s -w ' %{http_code}' -X POST "${H[@]}" -d '{"jsonrpc":"2.0","id":1,"method":"ping"}' \
    "http://127.0.0.1:$2/echo")
  echo "sanity $1: tools/list $code; upstream saw: ${seen//$'\n'/}"
  [ "$code" = 200 ] || die "$1 answered $code to tools/list"
  [[ $seen == *"auth=[$WANT]"*"apikey=[]"*" 200" ]] || die "$1 did not inject u7's credential: $seen"
}
sanity_sse() { # NAME PORT
  local sse
  sanity "$1" "$2"
  sse=$(curl -s -N --max-time 5 -w ' %{http_code}' -X POST "${H[@]}" \
    -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"stream","arguments":{"events":3}}}' \
    "http://127.0.0.1:$2/sse")
  echo "sanity $1 SSE: $(grep -c 'notifications/progress' <<< "$sse" || true) progress events, first event: $(grep -o '"auth": "[^"]*"' <<< "$sse" || true)"
  [[ $sse == *"\"auth\": \"$WANT\""* && $sse == *'"progress":3,'* && $sse == *" 200" ]] ||
    die "$1's SSE answer is wrong (credential or events): $sse"
}
sanity nginx $P_PX
sanity ours $P_OURS
if [ "$REDIS" = 1 ]; then sanity ours-redis $P_OURSR; fi
[ -s "$W/ours-cpu-audit.log" ] || die "ours wrote no audit trail"

# 3a. CPU per request, alternating: R = proxy CPU per request / upstream CPU per request.
run_wrk() { # NAME PORT PID CONC ROUND [EXTRA_PID]
  local u0 p0 e0=0 u1 p1 e1=0
  u0=$(cpu "$UPW"); p0=$(cpu "$3"); if [ -n "${6:-}" ]; then e0=$(cpu "$6"); fi
  taskset -c 1 wrk -t1 -c"$4" -d"${DUR}s" --latency -s "$W/rot.lua" "http://127.0.0.1:$2/" > "$W/wrk.out" 2>&1 || true
  u1=$(cpu "$UPW"); p1=$(cpu "$3"); if [ -n "${6:-}" ]; then e1=$(cpu "$6"); fi
  python3 "$HELP" wrk "$RES" "$1" "$4" "$5" "$DUR" "$W/wrk.out" $((u1 - u0)) $((p1 - p0)) $((e1 - e0))
}
for r in $(seq "$ROUNDS"); do
  want cpu || break
  for c in 1 10 50; do
    run_wrk nginx $P_PX "$PX" "$c" "$r"
    run_wrk ours $P_OURS "$OURS" "$c" "$r"
    if [ "$REDIS" = 1 ] && [ "$c" = 10 ]; then run_wrk ours-redis $P_OURSR "$OURSR" "$c" "$r" "$REDIS_PID"; fi
  done
done
if want cpu; then echo "ours audit trail: $(wc -l < "$W/ours-cpu-audit.log") lines"; fi

# The stream and memory figures run on fresh processes with the stream configs (/sse routed to the SSE
# upstream, limits raised), restarted before each figure so what one test left in the allocator does not
# hide what the next one costs (each test warms up first). The Redis twin is not needed any more.
if [ "$REDIS" = 1 ]; then stop_pid "$OURSR"; fi
restart() {
  stop_px; start_px streams
  stop_pid "$OURS"; start_ours ours-streams $P_OURS; OURS=$OURS_PID
}
restart
sanity_sse nginx $P_PX
sanity_sse ours $P_OURS

# 3b. CPU per forwarded SSE event: EVSTREAMS streams, one event per stream every TICK_MS, for DUR seconds.
per_stream=$((DUR * 1000 / TICK_MS))
for r in $(seq "$ROUNDS"); do
  want events || break
  taskset -c 1 python3 "$HELP" events "$RES" nginx $P_PX "$PX" "$KEY" "$EVSTREAMS" "$per_stream" "$r"
  taskset -c 1 python3 "$HELP" events "$RES" ours $P_OURS "$OURS" "$KEY" "$EVSTREAMS" "$per_stream" "$r"
done

# 3c. RSS per idle SSE stream and what stays after close, CYCLES open/close cycles.
if want streams; then
  restart
  taskset -c 1 python3 "$HELP" streams "$RES" ours $P_OURS "$OURS" "$KEY" "$STREAMS" "$CYCLES" "$HOLD"
  taskset -c 1 python3 "$HELP" streams "$RES" nginx $P_PX "$PX" "$KEY" "$STREAMS" "$CYCLES" "$HOLD"
fi

# 3d. RSS per header-trickling connection: one more header byte every 3 s, 3 times.
if want slow; then
  restart
  taskset -c 1 python3 "$HELP" slow "$RES" ours $P_OURS "$OURS" "$SLOW" 3 3
  taskset -c 1 python3 "$HELP" slow "$RES" nginx $P_PX "$PX" "$SLOW" 3 3
fi

# 4. The table, last.
python3 "$HELP" report "$RES" "{\"streams\": $STREAMS, \"slow\": $SLOW, \"hold\": $HOLD, \"cycles\": $CYCLES, \"redis\": $([ "$REDIS" = 1 ] && echo true || echo false)}"
