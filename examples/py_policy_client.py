#!/usr/bin/env python3
"""Policy checks through mcp-tenant-proxy with the official Python SDK (v2 API), for examples/e2e_policy.sh.

    python3 examples/py_policy_client.py --proxy http://127.0.0.1:8080 --key ENTERPRISE_KEY \\
        --cred alice=ALICE_TOKEN --cred bob=BOB_TOKEN

Expects two upstreams behind the proxy, both running examples/py_server.py and both with
`restrictions.tools = { block = ["delete_*"] }` and `forward_user_header = "x-mcp-user"`:
  modern  (Streamable HTTP) at PROXY/mcp/modern
  legacy  (HTTP+SSE, 2024-11-05) at PROXY/mcp/legacy/sse

For every user given with --cred, and every connection below, it connects with the enterprise key acting as
that user (`x-alloy-userid`) and checks that:
  - tools/list shows search_repos and whoami but not delete_repo;
  - whoami reports that the upstream got this user's own credential (never another user's, never the
    client's key), x-mcp-user = this user, and no x-alloy-userid header;
  - calling delete_repo fails with a JSON-RPC error whose data.code is "tool_not_allowed".

Connections (the SDK's `mode`):
  streamable/auto    Streamable HTTP, the SDK default (negotiates 2026-07-28, stateless)
  streamable/legacy  Streamable HTTP with the initialize handshake (2025-11-25, Mcp-Session-Id sessions)
  sse/legacy         the legacy HTTP+SSE transport with the initialize handshake
  sse/auto           the legacy HTTP+SSE transport, SDK default negotiation

Prints one "ok - ..." or "not ok - ..." line per check (indented "# ..." lines give details), and exits 1 if
any check failed.
"""

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

import anyio
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

CALL_TIMEOUT = 10.0  # seconds for one request's answer
CONNECTION_TIMEOUT = 45.0  # seconds for one connection and all its checks

CONNECTIONS = [
    ("streamable", "auto"),
    ("streamable", "legacy"),
    ("sse", "legacy"),
    ("sse", "auto"),
]


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, label: str, passed: bool, detail: str = "") -> None:
        print(f"{'ok' if passed else 'not ok'} - {label}", flush=True)
        if not passed:
            self.failed += 1
            for line in (detail or "(no detail)").splitlines():
                print(f"    # {line}", flush=True)


def root_cause(exc: BaseException) -> BaseException:
    """The SDK runs on task groups, so errors can arrive wrapped in an ExceptionGroup."""
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    err = root_cause(exc)
    if isinstance(err, MCPError):
        return f"MCPError {err.code}: {err.message} (data: {json.dumps(err.data)})"
    if isinstance(err, TimeoutError | asyncio.TimeoutError):
        return f"{type(err).__name__}: no answer in time"
    return f"{type(err).__name__}: {err}"


def transport_for(kind: str, proxy: str, headers: dict[str, str], http: httpx2.AsyncClient):
    if kind == "streamable":
        return streamable_http_client(f"{proxy}/mcp/modern", http_client=http)
    return sse_client(f"{proxy}/mcp/legacy/sse", headers=headers, timeout=CALL_TIMEOUT)


async def run_connection(
    report: Report, proxy: str, key: str, user: str, creds: dict[str, str], kind: str, mode: str
) -> None:
    label = f"{user}, {kind}/{mode}"
    others = {name: cred for name, cred in creds.items() if name != user}
    headers = {"Authorization": f"Bearer {key}", "x-alloy-userid": user}

    async def list_tools(client: Client) -> None:
        name = f"{label}: tools/list shows search_repos and whoami, hides delete_repo"
        tools = await client.list_tools()
        names = [t.name for t in tools.tools]
        passed = "delete_repo" not in names and "search_repos" in names and "whoami" in names
        report.check(name, passed, f"tools listed: {names}")

    async def whoami(client: Client) -> None:
        name = f"{label}: whoami"
        result = await client.call_tool("whoami", {})
        text = next((c.text for c in result.content if c.type == "text"), "")
        if result.is_error:
            report.check(f"{name} succeeds", False, f"tool error: {text}")
            return
        seen = json.loads(text)
        auth = seen.get("authorization") or ""
        names = seen.get("header_names") or []
        report.check(
            f"{name}: upstream got {user}'s own credential",
            auth == f"Bearer {creds[user]}",
            f"upstream saw authorization of length {len(auth)}; expected {user}'s credential",
        )
        leaked = [other for other, cred in others.items() if cred in text]
        report.check(
            f"{name}: no other user's credential and not the client key reach the upstream",
            not leaked and key not in text,
            f"leaked: {leaked or ''} {'client key' if key in text else ''}",
        )
        report.check(
            f"{name}: upstream got x-mcp-user: {user} and no x-alloy-userid",
            seen.get("x-mcp-user") == user and "x-alloy-userid" not in names,
            f"x-mcp-user: {seen.get('x-mcp-user')!r}; header names: {names}",
        )

    async def delete_repo(client: Client) -> None:
        name = f"{label}: delete_repo is refused with tool_not_allowed"
        try:
            result = await client.call_tool("delete_repo", {"name": "example/one"})
        except Exception as exc:  # noqa: BLE001 - the refusal is expected to arrive as an exception
            err = root_cause(exc)
            data = err.data if isinstance(err, MCPError) else None
            code = data.get("code") if isinstance(data, dict) else None
            report.check(name, code == "tool_not_allowed", describe(exc))
            return
        text = " ".join(getattr(c, "text", "") for c in result.content)
        report.check(name, False, f"the call was not refused: is_error={result.is_error}, content: {text}")

    checks: list[tuple[str, Callable]] = [
        ("tools/list", list_tools),
        ("whoami", whoami),
        ("delete_repo", delete_repo),
    ]

    connected = False
    done: set[str] = set()
    try:
        # One deadline for the whole connection, as a safety net: each request also has its own
        # (read_timeout_seconds), and the SDK's cancel scopes must be entered and left in one task.
        with anyio.fail_after(CONNECTION_TIMEOUT):
            async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(CALL_TIMEOUT)) as http:
                transport = transport_for(kind, proxy, headers, http)
                async with Client(transport, mode=mode, read_timeout_seconds=CALL_TIMEOUT) as client:
                    connected = True
                    report.check(f"{label}: connects through the proxy (protocol {client.protocol_version})", True)
                    for what, step in checks:
                        try:
                            await step(client)
                        except Exception as exc:  # noqa: BLE001
                            report.check(f"{label}: {what}", False, describe(exc))
                        done.add(what)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a failed check
        if not connected:
            report.check(f"{label}: connects through the proxy", False, describe(exc))
        pending = [what for what, _ in checks if what not in done]
        for what in pending:
            report.check(f"{label}: {what}", False, f"not run: {describe(exc)}")
        if not pending:
            # All checks ran; only closing the connection failed. Not a check, but worth seeing.
            print(f"    # {label}: closing the connection: {describe(exc)}", flush=True)


async def run(proxy: str, key: str, creds: dict[str, str], users: list[str], connections) -> int:
    report = Report()
    for user in users:
        for kind, mode in connections:
            await run_connection(report, proxy, key, user, creds, kind, mode)
    return 1 if report.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", required=True, help="proxy base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--key", required=True, help="an enterprise API key that may act as the users")
    parser.add_argument("--cred", action="append", required=True, metavar="USER=TOKEN",
                        help="a user and the upstream credential the proxy holds for it (repeat)")
    parser.add_argument("--only", action="append", metavar="KIND/MODE",
                        help="run only these connections, e.g. sse/legacy (repeatable)")
    args = parser.parse_args()
    creds = dict(item.split("=", 1) for item in args.cred)
    connections = CONNECTIONS
    if args.only:
        connections = [tuple(c.split("/", 1)) for c in args.only]
    return asyncio.run(run(args.proxy.rstrip("/"), args.key, creds, list(creds), connections))


if __name__ == "__main__":
    sys.exit(main())
