// A real OAuth 2.1 / OpenID provider (panva/oidc-provider) on 127.0.0.1:<random port>, standing in
// for an upstream like GitHub in the Rust integration tests.
//
//   node provider.mjs '{"redirect_uris":["http://127.0.0.1:PORT/callback"],"client_id":"mcp-proxy",
//                       "client_secret":"...","access_token_ttl":5,"scopes":["repo"]}'
//
// Prints exactly one JSON line on stdout once listening (issuer + endpoints), logs to stderr, and
// exits when stdin closes: the test holds the pipe, so a test that dies never leaves us behind.
import http from 'node:http';
import Provider from 'oidc-provider';

const cfg = {
  client_id: 'mcp-proxy',
  client_secret: 'proxy-secret-0123456789',
  redirect_uris: ['http://127.0.0.1:9/callback'],
  access_token_ttl: 60,
  refresh_token_ttl: 3600,
  clock_tolerance: 0,
  require_basic_auth: true,
  scopes: ['repo'],
  ...JSON.parse(process.argv[2] || '{}'),
};

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: cfg.client_id,
    client_secret: cfg.client_secret,
    redirect_uris: cfg.redirect_uris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  // Only listed scopes are advertised and grantable (openid/offline_access are the OIDC ones).
  scopes: ['openid', 'offline_access', ...cfg.scopes],
  claims: { openid: ['sub', 'preferred_username'] },
  // Put preferred_username into the id_token of the code exchange too, not only into /me.
  conformIdTokenClaims: false,
  pkce: { required: () => true }, // S256 is the only method oidc-provider 9 accepts
  ttl: { AccessToken: cfg.access_token_ttl, RefreshToken: cfg.refresh_token_ttl },
  // Default is 15 s, during which /me (and the store) still accept an expired access token while
  // introspection already says inactive; 0 makes "expired" mean the same everywhere.
  clockTolerance: cfg.clock_tolerance,
  rotateRefreshToken: true,
  // The default only issues refresh tokens when offline_access was granted; the proxy under test
  // may not ask for it (GitHub-style upstreams don't know it), so issue one whenever allowed.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  features: {
    devInteractions: { enabled: true }, // built-in "any login, any password" + consent pages
    revocation: { enabled: true },
    introspection: { enabled: true }, // lets a fake upstream check access tokens
    resourceIndicators: { enabled: false },
  },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, preferred_username: id }),
  }),
});

// oidc-provider strips offline_access from the request unless prompt=consent is present. Add it
// so a client that asks for offline_access gets it granted on the (always shown) consent page.
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/auth'
      && (ctx.query.scope || '').split(' ').includes('offline_access') && !ctx.query.prompt) {
    ctx.query = { ...ctx.query, prompt: 'consent' };
  }
  await next();
});

// oidc-provider accepts client_secret_post for a client_secret_basic client; refuse it so the
// test notices if the proxy sends the secret in the body.
const CLIENT_AUTH_PATHS = new Set(['/token', '/token/revocation', '/token/introspection']);
provider.use(async (ctx, next) => {
  if (cfg.require_basic_auth && ctx.method === 'POST' && CLIENT_AUTH_PATHS.has(ctx.path)
      && !/^basic /i.test(ctx.get('authorization'))) {
    ctx.status = 401;
    ctx.set('www-authenticate', `Basic realm="${issuer}"`);
    ctx.body = { error: 'invalid_client', error_description: 'test provider requires client_secret_basic' };
    return;
  }
  await next();
});

// Surface server-side failures (bad PKCE, reused refresh token, ...) in the test's stderr.
for (const ev of ['grant.error', 'authorization.error', 'revocation.error', 'server_error']) {
  provider.on(ev, (ctx, err) => console.error(`provider ${ev}: ${err.message} ${err.error_description || ''}`));
}

server.on('request', provider.callback());

const u = (p) => `${issuer}${p}`;
console.log(JSON.stringify({
  issuer,
  authorization_endpoint: u('/auth'),
  token_endpoint: u('/token'),
  revocation_endpoint: u('/token/revocation'),
  introspection_endpoint: u('/token/introspection'),
  userinfo_endpoint: u('/me'),
  jwks_uri: u('/jwks'),
  metadata_url: u('/.well-known/oauth-authorization-server'),
  openid_configuration_url: u('/.well-known/openid-configuration'),
  client_id: cfg.client_id,
}));

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
