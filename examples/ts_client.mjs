#!/usr/bin/env node
// Connect to an MCP server through mcp-tenant-proxy with the official TypeScript SDK
// (@modelcontextprotocol/sdk 1.x), call the `whoami` tool and print which upstream
// credential the server received.
//
// Plain ESM JavaScript: no build step, run it with node directly.
//
//   npm ci --prefix examples
//   node examples/ts_client.mjs URL KEY [USER]
//
// URL   the proxy route, e.g. http://127.0.0.1:8080/mcp/demo
// KEY   your proxy API key, sent as "Authorization: Bearer KEY"
// USER  (optional) the user to act as, sent as "x-alloy-userid: USER";
//       only enterprise keys may name a user, a standard key always acts as its own user.
//
// Exits 0 on success, 1 if the proxy or the server refuses, 2 on bad usage.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

function usage() {
    console.error('usage: node examples/ts_client.mjs URL KEY [USER]');
    process.exit(2);
}

async function main() {
    const [url, key, user] = process.argv.slice(2);
    if (!url || !key || process.argv.length > 5) usage();

    // The proxy authenticates the API key and picks the acting user; the upstream MCP server
    // never sees these two headers, it gets that user's own credential instead.
    const headers = { Authorization: `Bearer ${key}` };
    if (user) headers['x-alloy-userid'] = user;

    const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
    const client = new Client({ name: 'mcp-tenant-proxy-example-ts', version: '1.0.0' });

    try {
        await client.connect(transport); // initialize + notifications/initialized
        const server = client.getServerVersion();
        console.log(`connected to ${server?.name} ${server?.version} via ${url}`);

        const { tools } = await client.listTools();
        console.log(`tools: ${tools.map(t => t.name).join(', ')}`);

        const result = await client.callTool({ name: 'whoami', arguments: {} });
        if (result.isError) throw new Error(`whoami failed: ${JSON.stringify(result.content)}`);

        // whoami answers with the HTTP headers the upstream server received, as a JSON object.
        const text = result.content.find(c => c.type === 'text')?.text ?? '{}';
        const seen = JSON.parse(text);
        console.log(`upstream saw x-mcp-user: ${seen['x-mcp-user'] ?? '(none)'}`);
        console.log(`upstream saw authorization: ${seen['authorization'] ?? '(none)'}`);
        console.log(`all headers the upstream saw: ${JSON.stringify(seen)}`);
    } finally {
        await client.close();
    }
}

main().catch(err => {
    // A proxy refusal arrives as a StreamableHTTPError whose code is the HTTP status and whose
    // message carries the proxy's JSON-RPC error body (error.data.code says why).
    const status = typeof err?.code === 'number' && err.code >= 400 ? ` (HTTP ${err.code})` : '';
    console.error(`error${status}: ${err?.message ?? err}`);
    process.exit(1);
});
