#!/usr/bin/env python3
"""A small single-user MCP server, built with the official Python SDK (v2 API), for examples/e2e_policy.sh.

    python3 examples/py_server.py --transport streamable-http --port 3001   # served at http://127.0.0.1:3001/mcp
    python3 examples/py_server.py --transport sse --port 3002               # GET /sse, POST /messages/?session_id=...

Tools:
  whoami        answers, as JSON, the `authorization` and `x-mcp-user` headers of the HTTP request that
                carried the call, and the names (never the values) of all its headers
  search_repos  a trivial search
  delete_repo   a trivial "delete" (mcp-tenant-proxy is expected to block it)

The server itself never prints a header value: its log level is WARNING (no access log lines) and the
whoami answer only goes back to the caller.
"""

import argparse
import json

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("py-policy-upstream", version="1.0.0", log_level="WARNING")


@server.tool()
def whoami(ctx: Context) -> str:
    """The credential and user headers this server received with the call."""
    # Populated by the HTTP transports (streamable: the POST that carried the call; legacy SSE: the
    # message POST). Header names are lower-case.
    headers = ctx.headers or {}
    return json.dumps(
        {
            "authorization": headers.get("authorization"),
            "x-mcp-user": headers.get("x-mcp-user"),
            "header_names": sorted({name.lower() for name in headers.keys()}),
        }
    )


@server.tool()
def search_repos(query: str = "") -> str:
    """Search repositories (trivial)."""
    return json.dumps({"query": query, "repos": ["example/one", "example/two"]})


@server.tool()
def delete_repo(name: str = "") -> str:
    """Delete a repository (trivial; it deletes nothing)."""
    return json.dumps({"deleted": name})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["streamable-http", "sse"], required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.transport == "sse":
        server.run(transport="sse", host="127.0.0.1", port=args.port)
    else:
        server.run(transport="streamable-http", host="127.0.0.1", port=args.port, streamable_http_path="/mcp")


if __name__ == "__main__":
    main()
