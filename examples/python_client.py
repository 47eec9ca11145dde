#!/usr/bin/env python3
"""Connect to an MCP server through mcp-tenant-proxy with the official Python SDK.

The example connects, lists the tools, calls `whoami` and prints which upstream
credential the MCP server behind the proxy received.

    python3 -m pip install -r examples/requirements.txt
    python3 examples/python_client.py URL KEY [USER]

URL   the proxy route, e.g. http://127.0.0.1:8080/mcp/demo
KEY   your proxy API key, sent as "Authorization: Bearer KEY"
USER  (optional) the user to act as, sent as "x-alloy-userid: USER"; only
      enterprise keys may name a user, a standard key always acts as its own user.

--mode legacy forces the classic `initialize` handshake; the default, auto, lets
the SDK negotiate the newest protocol version the server supports.

Exits 0 on success, 1 if the proxy or the server refuses, 2 on bad usage.
"""

import argparse
import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def run(url: str, key: str, user: str | None, mode: str) -> None:
    # The proxy authenticates the API key and picks the acting user; the upstream MCP
    # server never sees these two headers, it gets that user's own credential instead.
    headers = {"Authorization": f"Bearer {key}"}
    if user:
        headers["x-alloy-userid"] = user

    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode) as client:  # connects and initializes
            server = client.server_info
            name = f"{server.name} {server.version}" if server else "(anonymous server)"
            print(f"connected to {name} via {url} (protocol {client.protocol_version})")

            tools = await client.list_tools()
            print("tools:", ", ".join(tool.name for tool in tools.tools))

            result = await client.call_tool("whoami", {})
            if result.is_error:
                raise RuntimeError(f"whoami failed: {result.content}")

            # whoami answers with the HTTP headers the upstream server received, as JSON.
            text = next(c.text for c in result.content if c.type == "text")
            seen = json.loads(text)
            print(f"upstream saw x-mcp-user: {seen.get('x-mcp-user', '(none)')}")
            print(f"upstream saw authorization: {seen.get('authorization', '(none)')}")
            print(f"all headers the upstream saw: {json.dumps(seen, sort_keys=True)}")


def root_cause(exc: BaseException) -> BaseException:
    """The SDK runs on task groups, so errors can arrive wrapped in an ExceptionGroup."""
    while getattr(exc, "exceptions", None):  # an ExceptionGroup (Python 3.11+ or the backport)
        exc = exc.exceptions[0]
    return exc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="proxy route, e.g. http://127.0.0.1:8080/mcp/demo")
    parser.add_argument("key", help="proxy API key")
    parser.add_argument("user", nargs="?", help="user to act as (enterprise keys only)")
    parser.add_argument("--mode", choices=["auto", "legacy"], default="auto", help="protocol negotiation")
    args = parser.parse_args()

    try:
        asyncio.run(run(args.url, args.key, args.user, args.mode))
    except Exception as exc:  # noqa: BLE001 - an example reports every failure the same way
        err = root_cause(exc)
        if isinstance(err, MCPError):
            # The proxy's refusals are JSON-RPC errors; error.data says why, e.g.
            # {"code": "user_override_forbidden", "status": 403}.
            print(f"error {err.code}: {err.message} (data: {json.dumps(err.data)})", file=sys.stderr)
        else:
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
