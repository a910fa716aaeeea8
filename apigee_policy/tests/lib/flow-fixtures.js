"use strict";
// What the flow tests share: a player over the real bundles, a backend that records what
// it receives, a VerifyAPIKey stand-in, and servers that misbehave like a broken sidecar.

const http = require("node:http");
const net = require("node:net");
const { FlowPlayer, PolicyFailure } = require("./flow-player");
const { PROXY, SHARED_FLOW } = require("./harness");

/** The API key of a test app: key-<appId>. */
const keyOf = (appId) => `key-${appId}`;

/**
 * VerifyAPIKey as Apigee runs it: the key in request.header.x-api-key identifies a
 * developer app of `apps` ({appId: {product, email}}) and sets the flow variables the
 * policy documents; an unknown key fails with InvalidApiKey, a missing one with
 * FailedToResolveAPIKey (both 401).
 */
function verifyApiKeyStub(apps) {
  return async (policy, ctx) => {
    const ref = policy.one("APIKey").attrs.ref;
    const key = ctx.getVariable(ref);
    if (!key) throw new PolicyFailure("FailedToResolveAPIKey", "Failed to resolve API Key variable request.header.x-api-key", 401);
    const appId = Object.keys(apps).find((id) => keyOf(id) === key);
    if (!appId) throw new PolicyFailure("InvalidApiKey", "Invalid ApiKey", 401);
    const app = apps[appId];
    ctx.setVariable("client_id", key);
    ctx.setVariable("developer.app.id", appId);
    ctx.setVariable("developer.app.name", `name-${appId}`);
    ctx.setVariable("developer.email", app.email || `${appId}@example.com`);
    ctx.setVariable("apiproduct.name", app.product);
    ctx.setVariable(`verifyapikey.${policy.attrs.name}.client_id`, key);
  };
}

/** A backend on 127.0.0.1 that answers 200 {"ok":true} and records each request. */
async function startBackend() {
  const received = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      received.push({ method: req.method, url: req.url, headers: req.headers, body: Buffer.concat(chunks).toString() });
      const body = JSON.stringify({ ok: true, n: received.length });
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    received,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** A TCP server that accepts connections and never answers: a sidecar that hangs. */
async function startBlackHole() {
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(resolve);
      }),
  };
}

/** An HTTP server that answers every request with `status` and `body` (a proxy's error page). */
async function startFixedAnswer(status, body, contentType = "text/html") {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(status, { "Content-Type": contentType, "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((resolve) => server.close(resolve)) };
}

/** A URL on which nothing listens (the port was just released). */
async function closedPortUrl() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return `http://127.0.0.1:${port}`;
}

/**
 * A player over the real shared flow and example proxy. `config` goes into the
 * environment KVM aforo-config (the Apigee Edge way) unless `propertySets` is given (the
 * Apigee X way). `secrets` goes into the encrypted KVM aforo-secrets (gateway_token).
 * `tls` ({truststores, keystores}) are the environment's, as the ServiceCallouts' <SSLInfo>
 * names them.
 */
function makePlayer({ config = null, propertySets = null, secrets = null, apps = {}, backendUrl = "http://127.0.0.1:9", tls = {} } = {}) {
  return new FlowPlayer({
    sharedFlows: { "aforo-authorize": SHARED_FLOW },
    proxy: PROXY,
    environment: {
      kvms: { ...(config ? { "aforo-config": config } : {}), ...(secrets ? { "aforo-secrets": secrets } : {}) },
      propertySets: propertySets || {},
      targetServers: { "aforo-example-backend": backendUrl },
      truststores: tls.truststores || {},
      keystores: tls.keystores || {},
    },
    stubs: { VerifyAPIKey: verifyApiKeyStub(apps) },
  });
}

/** A client request to the example proxy, authenticated as `appId`. */
function call(appId, { verb = "GET", suffix = "/forecast", headers = {}, body = "" } = {}) {
  return {
    verb,
    path: `/aforo-example${suffix}`,
    headers: { "User-Agent": "flow-test/1.0", ...(appId ? { "x-api-key": keyOf(appId) } : {}), ...headers },
    body,
  };
}

/** If a UTC day ends within `margin` seconds, wait for the next one (day-window tests). */
async function awayFromMidnight(margin = 60) {
  const now = Date.now();
  const left = 86400000 - (now % 86400000);
  if (left < margin * 1000) await new Promise((resolve) => setTimeout(resolve, left + 1000));
}

module.exports = {
  awayFromMidnight,
  call,
  closedPortUrl,
  keyOf,
  makePlayer,
  startBackend,
  startBlackHole,
  startFixedAnswer,
  verifyApiKeyStub,
};
