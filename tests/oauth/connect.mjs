// Plays the human in an OAuth "connect" flow with headless Chromium:
//
//   node connect.mjs '{"url":"http://127.0.0.1:P/connect/...","login":"alice","expect_text":"Connected"}'
//
// Opens url (the proxy's confirmation page: presses its Connect button), follows the redirects to the
// provider, signs in on oidc-provider's devInteractions login page (any password), approves the
// consent page, and prints one JSON line describing the page the redirect chain ends on (the proxy's
// callback), with the confirmation page's text:
//   {"final_url","status","title","text","confirm_text"}
// Options:
//   steal: true                       don't load the callback; print {"callback_url"} so a test can
//                                     replay it from another session/user.
//   fresh_context_for_callback: true  load the callback in a new browser context (none of the
//                                     cookies of the one that started the flow); adds callback_url.
//   cookies: [{name, value}]          set on url's origin before starting (e.g. a proxy session).
//   headers: {name: value}            added to the first request only (the proxy's connect URL).
// Exits 1 (message on stderr, {"error",...} on stdout) on failure or after 30 s.
import http from 'node:http';
import net from 'node:net';
import { createRequire } from 'node:module';

// Resolve playwright-core from this folder's node_modules whatever the caller's cwd.
const { chromium } = createRequire(import.meta.url)('playwright-core');

const opts = { fresh_context_for_callback: false, steal: false, ...JSON.parse(process.argv[2] || '{}') };
const intercept = opts.steal || opts.fresh_context_for_callback;
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);
const unbracket = (h) => h.replace(/^\[|\]$/g, '');

let browser;
let providerOrigin = null; // learnt from where the login page is served
let callbackUrl = null; // set by the proxy when intercepting
let headersSent = false;

function fail(msg, extra = {}) {
  console.error(`connect.mjs: ${msg}`);
  console.log(JSON.stringify({ error: msg, ...extra }));
  process.exit(1); // Playwright kills the Chromium it launched when this process exits
}
setTimeout(() => fail('timed out after 30 s'), 30_000);

// All browser traffic goes through this in-process forward proxy, because (a) tests may only
// talk to loopback, and the dev pages @import Google Fonts; (b) page.route never sees redirect
// hops, and the callback is reached through the provider's 303, so this is the only place the
// navigation to the callback can be swallowed for steal/fresh modes. Plain http only: an https
// callback would be tunnelled (CONNECT) and can't be stolen.
const proxy = http.createServer((req, res) => {
  const target = new URL(req.url); // proxies get absolute-form URLs
  if (!LOOPBACK.has(target.hostname)) {
    res.writeHead(403, { 'content-type': 'text/plain' });
    return res.end('connect.mjs: non-loopback request blocked');
  }
  if (intercept && providerOrigin && !callbackUrl && target.origin !== providerOrigin) {
    callbackUrl = target.href;
    res.writeHead(200, { 'content-type': 'text/html' });
    return res.end('<title>stolen</title>callback intercepted by connect.mjs');
  }
  const headers = { ...req.headers };
  delete headers['proxy-connection'];
  if (opts.headers && !headersSent && target.href === new URL(opts.url).href) {
    for (const [k, v] of Object.entries(opts.headers)) headers[k.toLowerCase()] = v;
    headersSent = true;
  }
  const up = http.request({
    host: unbracket(target.hostname), port: target.port || 80,
    method: req.method, path: target.pathname + target.search, headers,
  }, (ur) => {
    res.writeHead(ur.statusCode, ur.statusMessage, ur.rawHeaders); // raw: keeps every Set-Cookie
    ur.pipe(res);
  });
  up.on('error', (e) => { res.writeHead(502); res.end(`connect.mjs proxy: ${e.message}`); });
  req.pipe(up);
});
proxy.on('connect', (req, sock, head) => {
  const { hostname, port } = new URL(`http://${req.url}`);
  if (!LOOPBACK.has(hostname)) return sock.end('HTTP/1.1 403 Forbidden\r\n\r\n');
  const up = net.connect(Number(port), unbracket(hostname), () => {
    sock.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    up.write(head);
    up.pipe(sock).on('error', () => {});
    sock.pipe(up).on('error', () => {});
  });
  up.on('error', () => sock.destroy());
});

// Submit a form and wait for the redirect chain it starts to settle on a loaded page.
async function submit(page) {
  const [resp] = await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('button[type="submit"]')]);
  return resp;
}

async function describe(page, resp) {
  return {
    final_url: page.url(),
    status: resp ? resp.status() : null,
    title: await page.title(),
    text: await page.evaluate(() => (document.body ? document.body.innerText : '')),
  };
}

async function main() {
  if (!opts.url || !opts.login) fail('usage: connect.mjs \'{"url": ..., "login": ...}\'');
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    // <-loopback> stops Chromium's implicit proxy bypass for loopback: everything hits our proxy.
    args: ['--headless', '--no-sandbox', '--disable-background-networking',
      `--proxy-server=http://127.0.0.1:${proxy.address().port}`, '--proxy-bypass-list=<-loopback>'],
    timeout: 20_000,
  });

  const ctx = await browser.newContext();
  if (opts.cookies) {
    await ctx.addCookies(opts.cookies.map((c) => ({ url: new URL(opts.url).origin, ...c })));
  }
  const page = await ctx.newPage();

  let resp = await page.goto(opts.url, { waitUntil: 'load' });
  // The proxy's own page first: whom the account would be connected to, and its Connect button.
  let confirmText = null;
  if (await page.$('form input[name="confirm"]')) {
    confirmText = await page.evaluate(() => document.body.innerText);
    resp = await submit(page);
  }
  for (let step = 0; step < 6 && !callbackUrl; step++) {
    if (await page.$('form input[name="prompt"][value="login"]')) {
      providerOrigin ??= new URL(page.url()).origin;
      await page.fill('input[name="login"]', opts.login);
      await page.fill('input[name="password"]', 'any-password');
      resp = await submit(page);
    } else if (await page.$('form input[name="prompt"][value="consent"]')) {
      resp = await submit(page);
    } else {
      break; // neither login nor consent: the end of the chain
    }
  }

  let out = { ...(await describe(page, resp)), confirm_text: confirmText };
  if (/oops! something went wrong/.test(out.title)) fail('the provider rendered an error page', out);
  if (!providerOrigin) fail('never reached the provider login page', out);
  if (intercept && !callbackUrl) fail('never saw the redirect to the callback', out);
  if (opts.steal) return { callback_url: callbackUrl };

  if (opts.fresh_context_for_callback) {
    const other = await (await browser.newContext()).newPage();
    const loaded = await describe(other, await other.goto(callbackUrl, { waitUntil: 'load' }));
    out = { ...loaded, callback_url: callbackUrl, confirm_text: confirmText };
  }
  if (new URL(out.final_url).origin === providerOrigin) fail('flow ended on the provider, not the callback', out);
  if (opts.expect_text && !out.text.includes(opts.expect_text)) {
    fail(`final page lacks expected text ${JSON.stringify(opts.expect_text)}`, out);
  }
  return out;
}

main().then(async (out) => {
  console.log(JSON.stringify(out));
  await browser.close();
  process.exit(0); // the proxy's keep-alive sockets would otherwise hold the process open
}, (e) => fail(String(e.message || e).split('\n')[0]));
