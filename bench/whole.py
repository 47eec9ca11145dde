#!/usr/bin/env python3
"""Helpers of bench/whole.sh (stdlib only). Subcommands:

    gen W KEY PORTS_JSON     write the configs: static nginx upstream, nginx peer proxy, mcp-tenant-proxy
                             (and its Redis-limiter twin), the wrk script
    sse-upstream PORT TICK   an MCP-like upstream answering POST /sse with text/event-stream: one first
                             event (naming the Authorization it received), then either idle (held open
                             until the client goes) or one progress event every TICK ms until `events`
    streams ...              idle SSE streams through a proxy: RSS per stream and what stays after close
    slow ...                 header-trickling connections: RSS per connection
    events ...               events forwarded on a few streams: proxy CPU per event, none lost
    wrk ...                  one wrk run + CPU deltas -> one result line
    report RES               the markdown table from the result lines

Every measuring subcommand appends one JSON object per line to the results file and prints a
human-readable line.
"""
import asyncio
import hashlib
import json
import os
import re
import statistics
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
USERS = 1000


# ---------------------------------------------------------------- /proc readers

def cpu_ticks(pid):
    """utime + stime of the whole process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5), counted after the comm


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def nfds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def emit(res, obj, text):
    with open(res, "a") as f:
        f.write(json.dumps(obj) + "\n")
    print(text, flush=True)


# ---------------------------------------------------------------- configs

def gen(w, key, ports):
    p = json.loads(ports)
    nofile = p["nofile"]
    users = range(USERS)
    cred = "cred-u{}-xxxxxxxxxxxxxxxx"
    temp = "".join(f"  {k}_temp_path {{d}}/tmp/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Static upstream, as /work/shared/bench/up/nginx.conf: answers every POST with a JSON-RPC result;
    # /echo (nginx peer) and /mcp/echo (ours, upstream url .../mcp) show what the proxy injected.
    open(f"{w}/up/nginx.conf", "w").write(f"""worker_processes 1;
pid {w}/up/nginx.pid;
error_log {w}/up/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp.format(d=w + '/up')}  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{p['up']} backlog=4096;
    default_type application/json;
    location / {{ return 200 '{{"jsonrpc":"2.0","id":1,"result":{{"tools":[]}}}}\\n'; }}
    location = /echo {{ return 200 'auth=[$http_authorization] user=[$http_x_alloy_userid] apikey=[$http_x_api_key]\\n'; }}
    location = /mcp/echo {{ return 200 'auth=[$http_authorization] user=[$http_x_alloy_userid] apikey=[$http_x_api_key]\\n'; }}
  }}
}}
""")
    # nginx peer. For the CPU figures exactly compare.sh's proxy (API-key `map`, per-user `limit_req` keyed
    # on the user header, per-user credential `map` injected as Authorization, `proxy_pass` with keepalive,
    # `proxy_buffering off`); for the stream and memory figures the same plus /sse to the SSE upstream
    # with the same directives, and limits raised so STREAMS streams and SLOW slow clients are admitted
    # and not timed out.
    open(f"{w}/px/users.map", "w").write("".join(f'"u{i}" "Bearer {cred.format(i)}";\n' for i in users))
    loc = """if ($api_key_ok = 0) {{ return 401; }} if ($alloy_cred = "") {{ return 403; }}
      limit_req zone=peruser burst=1000000 nodelay;
      proxy_pass http://{up}; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Authorization $alloy_cred; proxy_set_header X-Alloy-UserId "";
      proxy_buffering off;"""

    def peer(name, streams):
        limits = (f"worker_rlimit_nofile {nofile};", nofile,
                  "\n  client_header_timeout 600s; proxy_read_timeout 3600s; proxy_send_timeout 3600s; send_timeout 3600s;")
        top, wc, timeouts = limits if streams else ("", 10000, "")
        sse_up = f"\n  upstream sse {{ server 127.0.0.1:{p['sse']}; keepalive 128; keepalive_requests 1000000; }}"
        sse_loc = f"\n    location /sse {{ {loc.format(up='sse')} }}"
        open(f"{w}/px/{name}.conf", "w").write(f"""worker_processes 1; {top}
pid {w}/px/nginx.pid; error_log {w}/px/logs/error.log warn;
events {{ worker_connections {wc}; }}
http {{ access_log off; keepalive_requests 1000000; large_client_header_buffers 4 8k;{timeouts}
{temp.format(d=w + '/px')}  map $http_authorization $api_key_ok {{ default 0; "Bearer {key}" 1; }}
  map $http_x_alloy_userid $alloy_cred {{ default ""; include {w}/px/users.map; }}
  limit_req_zone $http_x_alloy_userid zone=peruser:64m rate=1000000r/s;
  upstream mcp {{ server 127.0.0.1:{p['up']}; keepalive 128; keepalive_requests 1000000; }}{sse_up if streams else ""}
  server {{ listen 127.0.0.1:{p['px']} backlog=4096;
    location / {{ {loc.format(up='mcp')} }}{sse_loc if streams else ""} }} }}
""")

    peer("cpu", False)
    peer("streams", True)
    # mcp-tenant-proxy. For the CPU figures exactly compare.sh's config (1000 users, an enterprise key,
    # per-user credentials, the audit trail to a file, a default rate limit), and the same with the Redis
    # limiter; for the stream and memory figures the same plus the `sse` upstream (and each user's
    # credential for it) and the limits for STREAMS streams and SLOW slow clients.
    sha = hashlib.sha256(key.encode()).hexdigest()

    def ours(name, listen, admin, limiter="", streams=False):
        creds = "".join(
            f'[[users]]\nid = "u{i}"\n\n'
            f'[[credentials]]\nuser = "u{i}"\nupstream = "who"\nid = "default"\nsecret = "{cred.format(i)}"\n\n'
            + (f'[[credentials]]\nuser = "u{i}"\nupstream = "sse"\nid = "default"\nsecret = "{cred.format(i)}"\n\n'
               if streams else "")
            for i in users
        )
        server = f'\nmax_connections = {p["max_connections"]}\nheader_read_timeout = "600s"' if streams else ""
        sse = f"""[upstreams.sse]
url = "http://127.0.0.1:{p['sse']}/sse"
path = "/sse"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
""" if streams else ""
        open(f"{w}/{name}.toml", "w").write(f"""[server]
listen = "127.0.0.1:{listen}"{server}
[admin]
listen = "127.0.0.1:{admin}"
[identity]
user_header = "x-alloy-userid"
[audit]
path = "{w}/{name}-audit.log"
[rate_limit]
requests = 1000000
per = "1s"
{limiter}[[keys]]
id = "bench"
kind = "enterprise"
sha256 = "{sha}"
user = "bench-service"
act_as = ["*"]
[upstreams.who]
url = "http://127.0.0.1:{p['up']}/mcp"
path = "/"
inject = {{ header = "authorization", value = "Bearer {{secret}}" }}
{sse}{creds}""")

    ours("ours-cpu", p["ours"], p["ours_admin"])
    ours("ours-streams", p["ours"], p["ours_admin"], streams=True)
    ours("ours-redis", p["oursr"], p["oursr_admin"],
         f'[rate_limiter]\nbackend = "redis"\nurl = "redis://127.0.0.1:{p["redis"]}/0"\n')
    open(f"{w}/rot.lua", "w").write(f"""local body = '{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{}}}}'
local i = 0
request = function()
  i = (i + 1) % {USERS}
  return wrk.format("POST", "/", {{["Content-Type"]="application/json", ["Accept"]="application/json, text/event-stream", ["Authorization"]="Bearer {key}", ["X-Alloy-UserId"]="u"..i}}, body)
end
""")


# ---------------------------------------------------------------- SSE upstream

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_upstream(port, tick_ms):
    loop = asyncio.new_event_loop()
    tick = tick_ms / 1000
    active = set()  # streams sending progress events
    ticker = {"on": False, "start": 0.0, "k": 0}

    def on_tick():
        # One event per active stream per tick, each its own write (so each event reaches the proxy as its
        # own segment, as a real server's progress notifications would); all of a tick's writes are issued
        # in one loop iteration, without awaiting, so the upstream stays cheap.
        for s in list(active):
            s.progress()
        if not active:
            ticker["on"] = False
            return
        ticker["k"] += 1
        loop.call_at(ticker["start"] + ticker["k"] * tick, on_tick)

    class Conn(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            self.buf = bytearray()
            self.busy = False

        def connection_lost(self, exc):
            active.discard(self)

        def data_received(self, data):
            if self.busy:
                return  # nothing else is expected while a stream is open
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            rest = self.buf[end + 4:]
            if "content-length" in headers:
                n = int(headers["content-length"])
                if len(rest) < n:
                    return
                body, rest = bytes(rest[:n]), rest[n:]
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                body, pos = b"", 0
                while True:
                    e = rest.find(b"\r\n", pos)
                    if e < 0:
                        return
                    size = int(bytes(rest[pos:e]).split(b";")[0], 16)
                    if len(rest) < e + 2 + size + 2:
                        return
                    body += bytes(rest[e + 2:e + 2 + size])
                    pos = e + 2 + size + 2
                    if size == 0:
                        rest = rest[pos:]
                        break
            else:
                body = b""
            self.buf = bytearray(rest)
            self.handle(headers, body)

        def handle(self, headers, body):
            try:
                args = json.loads(body)["params"]["arguments"]
            except Exception:
                args = {}
            self.busy = True
            self.total = int(args.get("events", 0))
            self.n = 0
            self.token = int(args.get("token", 0))
            first = {"jsonrpc": "2.0", "method": "notifications/message",
                     "params": {"level": "info", "data": {"auth": headers.get("authorization", "")}}}
            self.t.write(HEAD + chunk(b"data: " + json.dumps(first).encode() + b"\n\n"))
            if self.total > 0:
                active.add(self)
                if not ticker["on"]:
                    ticker.update(on=True, start=loop.time(), k=1)
                    loop.call_at(ticker["start"] + tick, on_tick)
            # else: idle, held until the client goes

        def progress(self):
            self.n += 1
            ev = (b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":%d,'
                  b'"progress":%d,"total":%d}}\n\n' % (self.token, self.n, self.total))
            self.t.write(chunk(ev))
            if self.n >= self.total:
                self.t.write(b"0\r\n\r\n")
                active.discard(self)
                self.busy = False

    server = loop.run_until_complete(loop.create_server(Conn, "127.0.0.1", port, backlog=8192))
    try:
        loop.run_forever()
    finally:
        server.close()


# ---------------------------------------------------------------- clients

def request(port, user, key, body, path="/sse"):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"X-Alloy-UserId: {user}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json, text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def tool_call(args):
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "stream", "arguments": args}}).encode()


class Stream(asyncio.Protocol):
    """A client of one SSE response: checks the status, counts events carrying `marker`, and notices the
    end of the (chunked) body or of the connection."""

    def __init__(self, marker, want):
        self.marker, self.want = marker, want
        self.head = bytearray()
        self.status = None
        self.count = 0
        self.tail = b""
        self.last = b""
        self.ready = asyncio.get_running_loop().create_future()  # `want` events seen
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t

    def _settle(self, fut, value):
        if not fut.done():
            fut.set_result(value)

    def data_received(self, data):
        if self.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head.split(b" ", 2)[1])
            data = bytes(self.head[end + 4:])
            if self.status != 200:
                self._settle(self.ready, False)
                self._settle(self.ended, False)
                return
        s = self.tail + data
        self.count += s.count(self.marker)
        self.tail = s[-(len(self.marker) - 1):]
        self.last = (self.last + data)[-7:]
        if self.count >= self.want:
            self._settle(self.ready, True)
        if self.last.endswith(b"\r\n0\r\n\r\n") or self.last == b"0\r\n\r\n":
            self._settle(self.ended, True)

    def connection_lost(self, exc):
        self._settle(self.ready, False)
        self._settle(self.ended, self.status == 200)


async def open_streams(port, key, n, args, marker, want, user0=0, parallel=256):
    """Opens n streams (at most `parallel` waiting for their first events at once); returns the
    (transport, protocol) pairs that became ready and the number that failed."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)
    body = tool_call(args)
    ok, failed = [], 0

    async def one(i):
        nonlocal failed
        async with sem:
            try:
                t, p = await loop.create_connection(lambda: Stream(marker, want), "127.0.0.1", port)
                t.write(request(port, f"u{(user0 + i) % USERS}", key, body))
                if await asyncio.wait_for(p.ready, 60):
                    ok.append((t, p))
                    return
                t.close()
            except (OSError, asyncio.TimeoutError):
                pass
            failed += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return ok, failed


async def settle_rss(pid, secs=1.0):
    await asyncio.sleep(secs)
    return rss_kib(pid)


async def wait_fds(pid, target, above, timeout):
    """Waits until the process's fd count is >= target (above=True) or <= target."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = nfds(pid)
        if (n >= target) if above else (n <= target):
            return n
        await asyncio.sleep(0.1)
    return nfds(pid)


async def streams(res, name, port, pid, key, n, cycles, hold):
    idle = {"events": 0}
    marker = b'"notifications/message"'
    # Warm-up: a few streams opened and closed, so the baseline is a process that has served streams.
    fd0 = nfds(pid)
    warm, _ = await open_streams(port, key, min(100, n), idle, marker, 1)
    for t, _ in warm:
        t.close()
    await wait_fds(pid, fd0 + 10, False, 10)
    base = await settle_rss(pid, 2)
    rows = []
    for c in range(1, cycles + 1):
        t0 = time.monotonic()
        ok, failed = await open_streams(port, key, n, idle, marker, 1, user0=c * 7)
        opened = time.monotonic() - t0
        fds = nfds(pid)
        with_ = await settle_rss(pid, 1)
        for t, _ in ok:
            t.close()
        closed_at = time.monotonic()
        fd_after = await wait_fds(pid, fd0 + 10, False, hold)
        await asyncio.sleep(max(0.0, hold - (time.monotonic() - closed_at)))
        after = rss_kib(pid)
        rows.append({"cycle": c, "ok": len(ok), "failed": failed, "open_s": round(opened, 2), "fds": fds,
                     "fds_after": fd_after, "with": with_, "after": after})
        print(f"  {name} cycle {c}: {len(ok)} streams ready ({failed} failed) in {opened:.1f}s, proxy fds {fds}, "
              f"RSS {base} -> {with_} KiB, {hold:.0f}s after close {after} KiB (fds {fd_after})", flush=True)
    first, last = rows[0], rows[-1]
    per_stream = (first["with"] - base) / n
    share = (last["after"] - base) / max(1, last["with"] - base)
    emit(res, {"kind": "streams", "proxy": name, "n": n, "base": base, "cycles": rows,
               "per_stream_kib": per_stream, "held_share": share,
               "failed": sum(r["failed"] for r in rows)},
         f"{name} streams: {per_stream * 1024:.0f} B per idle stream (cycle 1), "
         f"{share * 100:.1f}% held {hold:.0f}s after close (cycle {cycles}), "
         f"after-close RSS over baseline by cycle: {' / '.join(str(r['after'] - base) for r in rows)} KiB")


async def slow(res, name, port, pid, n, interval, ticks):
    loop = asyncio.get_running_loop()
    head = f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode()

    class Slow(asyncio.Protocol):
        def __init__(self):
            self.lost = asyncio.get_running_loop().create_future()
            self.got = b""

        def data_received(self, data):
            self.got += data

        def connection_lost(self, exc):
            if not self.lost.done():
                self.lost.set_result(True)

    async def connect_all(count):
        sem = asyncio.Semaphore(256)
        conns, failed = [], 0

        async def one():
            nonlocal failed
            async with sem:
                try:
                    t, p = await loop.create_connection(Slow, "127.0.0.1", port)
                    t.write(head)
                    conns.append((t, p))
                except OSError:
                    failed += 1

        await asyncio.gather(*(one() for _ in range(count)))
        return conns, failed

    # Warm-up: the same kind of connection, a few, opened and closed.
    fd0 = nfds(pid)
    warm, _ = await connect_all(min(100, n))
    await asyncio.sleep(0.5)
    for t, _ in warm:
        t.close()
    await wait_fds(pid, fd0 + 10, False, 10)
    base = await settle_rss(pid, 2)
    t0 = time.monotonic()
    conns, failed = await connect_all(n)
    fds = await wait_fds(pid, fd0 + len(conns), True, 30)  # every connection accepted by the proxy
    opened = time.monotonic() - t0
    for _ in range(ticks):  # one more header byte on every connection every `interval` seconds
        await asyncio.sleep(interval)
        for t, _ in conns:
            if not t.is_closing():
                t.write(b"a")
    rss = await settle_rss(pid, 1)
    alive = sum(1 for _, p in conns if not p.lost.done() and not p.got)
    for t, _ in conns:
        t.close()
    await wait_fds(pid, fd0 + 10, False, 20)
    per = (rss - base) / n
    emit(res, {"kind": "slow", "proxy": name, "n": n, "base": base, "rss": rss, "alive": alive,
               "failed": failed, "fds": fds, "per_conn_kib": per},
         f"{name} slow: {len(conns)} connected ({failed} failed) in {opened:.1f}s, proxy fds {fds}, "
         f"{alive} still waiting after {ticks * interval:.0f}s of trickling, RSS {base} -> {rss} KiB: "
         f"{per * 1024:.0f} B per connection")


async def events(res, name, port, pid, key, n, per_stream, rnd):
    c0, t0 = cpu_ticks(pid), time.monotonic()
    # Every event's method starts with "notifications/": the first (notifications/message) makes the
    # stream ready, the rest are the progress events counted.
    ok, failed = await open_streams(port, key, n, {"events": per_stream}, b'"notifications/', 1)
    try:
        done = await asyncio.wait_for(asyncio.gather(*(p.ended for _, p in ok)), 30 + per_stream * 0.1)
    except asyncio.TimeoutError:
        done = [p.ended.done() for _, p in ok]
    c1, secs = cpu_ticks(pid), time.monotonic() - t0
    for t, _ in ok:
        t.close()
    got = sum(p.count - 1 for _, p in ok)
    expected = n * per_stream
    cpu_s = (c1 - c0) / HZ
    us = cpu_s * 1e6 / max(1, got)
    emit(res, {"kind": "events", "proxy": name, "round": rnd, "streams": n, "expected": expected,
               "received": got, "failed": failed, "ended": sum(bool(d) for d in done), "secs": secs,
               "cpu_s": cpu_s, "us_per_event": us},
         f"{name} events round {rnd}: {got}/{expected} progress events on {len(ok)} streams "
         f"({failed} failed) in {secs:.1f}s ({got / secs:.0f}/s), proxy CPU {cpu_s:.2f}s: {us:.2f} us/event"
         + ("" if got == expected else "  LOST EVENTS"))


# ---------------------------------------------------------------- wrk

def parse_latency(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[m.group(2)]


def wrk(res, name, conc, rnd, dur, out_file, up_ticks, px_ticks, extra_ticks):
    out = open(out_file).read()
    m = re.search(r"(\d+) requests in", out)
    reqs = int(m.group(1)) if m else 0
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    errs = re.search(r"Socket errors: (.*)", out)
    p50 = next((parse_latency(l.split()[1]) for l in out.splitlines() if l.split()[:1] == ["50%"]), None)
    up, px, ex = int(up_ticks), int(px_ticks), int(extra_ticks)
    if reqs == 0 or up == 0:
        emit(res, {"kind": "wrk", "proxy": name, "c": conc, "round": rnd, "failed": True},
             f"{name} c={conc} round {rnd}: FAILED (no requests)\n{out}")
        return
    r = {"kind": "wrk", "proxy": name, "c": conc, "round": rnd, "reqs": reqs, "rps": reqs / dur,
         "non2xx": non2xx, "socket_errors": errs.group(1) if errs else "", "p50_us": p50,
         "up_us": up * 1e6 / HZ / reqs, "px_us": px * 1e6 / HZ / reqs, "R": px / up,
         "R_with_redis": (px + ex) / up, "redis_us": ex * 1e6 / HZ / reqs}
    extra = f" redis_us={r['redis_us']:.2f} R+redis={r['R_with_redis']:.3f}" if ex else ""
    emit(res, r, f"{name} c={conc} round {rnd}: rps={r['rps']:.0f} non2xx={non2xx} p50={p50:.0f}us "
                 f"up_us={r['up_us']:.2f} px_us={r['px_us']:.2f} R={r['R']:.3f}{extra}"
                 + (f" socket errors: {r['socket_errors']}" if errs else ""))


# ---------------------------------------------------------------- report

def report(res, env):
    rows = [json.loads(l) for l in open(res)]
    med = statistics.median
    cfg = json.loads(env)

    def wrk_med(proxy, c, field):
        v = [r[field] for r in rows if r["kind"] == "wrk" and r["proxy"] == proxy and r["c"] == c
             and not r.get("failed") and r.get(field) is not None]
        return med(v) if v else None

    def one(kind, proxy):
        return next((r for r in rows if r["kind"] == kind and r["proxy"] == proxy), None)

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    def ratio(a, b):
        return None if a is None or not b else a / b

    table = []

    def row(figure, ours, nginx, spec, goal, met, ratio_v="auto"):
        if ours is None and nginx is None:
            return  # not measured in this run (FIGURES)
        rv = ratio(ours, nginx) if ratio_v == "auto" else ratio_v
        verdict = "" if met is None else (" (met)" if met else " (**not met**)")
        table.append(f"| {figure} | {fmt(ours, spec)} | {fmt(nginx, spec)} | {fmt(rv, '.2f')} | {goal}{verdict} |")

    for c in (1, 10, 50):
        o, n = wrk_med("ours", c, "R"), wrk_med("nginx", c, "R")
        row(f"CPU per request / upstream CPU per request (R), c={c}", o, n, ".3f", "<= 0.7 x nginx",
            None if o is None or n is None else o <= 0.7 * n)
    o, n = wrk_med("ours", 10, "rps"), wrk_med("nginx", 10, "rps")
    row("requests/s on one core, c=10", o, n, ".0f", ">= nginx", None if o is None or n is None else o >= n)
    o, n = wrk_med("ours", 1, "p50_us"), wrk_med("nginx", 1, "p50_us")
    row("p50 latency at c=1 (us)", o, n, ".0f", "<= nginx", None if o is None or n is None else o <= n)
    so, sn = one("streams", "ours"), one("streams", "nginx")
    g = lambda r, k, f=1: None if r is None else r[k] * f
    o, n = g(so, "per_stream_kib"), g(sn, "per_stream_kib")
    row(f"RSS per idle SSE stream, {cfg['streams']} streams (KiB)", o, n, ".2f", "<= 8 KiB",
        None if o is None else o <= 8)
    o, n = g(so, "held_share", 100), g(sn, "held_share", 100)
    # a share of a share: no ratio between the two proxies
    row(f"stream memory still held {cfg['hold']}s after close, cycle {cfg['cycles']} (%)", o, n, ".1f",
        "<= 25 %", None if o is None else o <= 25, ratio_v=None)

    def growth(r):
        if r is None:
            return "n/a", None
        a = [c["after"] - r["base"] for c in r["cycles"]]
        w = [c["with"] - r["base"] for c in r["cycles"]]
        # grew: the residue after close or the peak rose by more than 5 % of one cycle's stream memory
        grew = (a[-1] - a[0] > 0.05 * w[0]) or (w[-1] - w[0] > 0.05 * w[0])
        return " / ".join(str(x) for x in a) + (" (grew)" if grew else " (flat)"), grew
    go, grew_o = growth(so)
    gn, _ = growth(sn)
    if so is not None or sn is not None:
        cycles = "/".join(str(i) for i in range(1, cfg["cycles"] + 1))
        table.append(f"| RSS above baseline {cfg['hold']}s after close, cycles {cycles} (KiB) | {go} | {gn} | | "
                     f"no growth over cycles{'' if grew_o is None else (' (met)' if not grew_o else ' (**not met**)')} |")
    lo, ln = one("slow", "ours"), one("slow", "nginx")
    o, n = g(lo, "per_conn_kib"), g(ln, "per_conn_kib")
    row(f"RSS per slow header-trickling connection, {cfg['slow']} connections (KiB)", o, n, ".2f", "<= 9 KiB",
        None if o is None else o <= 9)

    def ev_med(proxy):
        v = [r["us_per_event"] for r in rows if r["kind"] == "events" and r["proxy"] == proxy]
        return med(v) if v else None
    o, n = ev_med("ours"), ev_med("nginx")
    row("CPU per forwarded SSE event (us)", o, n, ".2f", "<= nginx", None if o is None or n is None else o <= n)
    if cfg["redis"]:
        n = wrk_med("nginx", 10, "R")
        o = wrk_med("ours-redis", 10, "R")
        row("R, c=10, Redis limiter: proxy CPU only", o, n, ".3f", "<= 0.7 x nginx",
            None if o is None or n is None else o <= 0.7 * n)
        o = wrk_med("ours-redis", 10, "R_with_redis")
        row("R, c=10, Redis limiter: proxy + redis-server CPU", o, n, ".3f", "<= 0.7 x nginx",
            None if o is None or n is None else o <= 0.7 * n)
        o, n = wrk_med("ours-redis", 10, "rps"), wrk_med("nginx", 10, "rps")
        row("requests/s on one core, c=10, Redis limiter (redis-server on the same core)", o, n, ".0f",
            ">= nginx", None if o is None or n is None else o >= n)

    problems = []
    for r in rows:
        if r["kind"] == "wrk" and (r.get("failed") or r.get("non2xx") or r.get("socket_errors")):
            problems.append(f"{r['proxy']} c={r['c']} round {r['round']}: failed={r.get('failed', False)} "
                            f"non2xx={r.get('non2xx')} socket errors={r.get('socket_errors') or 'none'}")
        if r["kind"] == "events" and (r["received"] != r["expected"] or r["failed"]):
            problems.append(f"{r['proxy']} events round {r['round']}: {r['received']}/{r['expected']} events, "
                            f"{r['failed']} streams failed")
        if r["kind"] == "streams" and r["failed"]:
            problems.append(f"{r['proxy']} streams: {r['failed']} streams failed to open")
        if r["kind"] == "slow" and (r["failed"] or r["alive"] != r["n"]):
            problems.append(f"{r['proxy']} slow: {r['failed']} failed to connect, {r['n'] - r['alive']} closed "
                            f"or answered early")
    print()
    for p in problems:
        print(f"WARNING: {p}")
    print("| figure | ours | nginx | ours/nginx | goal |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(table))


# ---------------------------------------------------------------- main

def main():
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(*a)
    elif cmd == "sse-upstream":
        sse_upstream(int(a[0]), float(a[1]))
    elif cmd == "streams":
        res, name, port, pid, key, n, cycles, hold = a
        asyncio.run(streams(res, name, int(port), int(pid), key, int(n), int(cycles), float(hold)))
    elif cmd == "slow":
        res, name, port, pid, n, interval, ticks = a
        asyncio.run(slow(res, name, int(port), int(pid), int(n), float(interval), int(ticks)))
    elif cmd == "events":
        res, name, port, pid, key, n, per_stream, rnd = a
        asyncio.run(events(res, name, int(port), int(pid), key, int(n), int(per_stream), int(rnd)))
    elif cmd == "wrk":
        res, name, conc, rnd, dur, out, up, px, ex = a
        wrk(res, name, int(conc), int(rnd), float(dur), out, up, px, ex)
    elif cmd == "report":
        report(*a)
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
