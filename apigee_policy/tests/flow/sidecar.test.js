"use strict";
// The shared flow played through the example proxy against a REAL running sidecar.
//
// Needs AFORO_FLOW_SIDECAR_URL (the sidecar's HTTP base URL) and AFORO_FLOW_SEED (JSON:
// the apps seeded there). tests/test_apigee_flow.py starts the sidecar, seeds it through
// the admin API and runs this file; run alone without them, the tests are skipped.
//
// Seeded apps (AFORO_FLOW_SEED.apps): daily (1000/day), suspended, broke (price 0.05,
// prepaid, empty wallet), metered (price 0, prepaid, 0.10 in the wallet), fresh (no limit).

const test = require("node:test");
const assert = require("node:assert/strict");
const { executed } = require("../lib/flow-player");
const { awayFromMidnight, call, keyOf, makePlayer, startBackend } = require("../lib/flow-fixtures");

const SIDECAR = process.env.AFORO_FLOW_SIDECAR_URL;
// The sidecar's decision port, when given: decisions go there, usage to SIDECAR.
const DECISION = process.env.AFORO_FLOW_DECISION_URL || "";
const SEED = process.env.AFORO_FLOW_SEED ? JSON.parse(process.env.AFORO_FLOW_SEED) : null;
// The gateway token of a sidecar that requires one (the encrypted KVM aforo-secrets).
const SECRETS = process.env.AFORO_FLOW_GATEWAY_TOKEN ? { gateway_token: process.env.AFORO_FLOW_GATEWAY_TOKEN } : null;
// A sidecar speaking (mutual) TLS: JSON {ca, cert, key} of PEM file paths. The flow is
// configured the Apigee way: a truststore and a keystore of the environment, by name.
const TLS = process.env.AFORO_FLOW_TLS ? JSON.parse(process.env.AFORO_FLOW_TLS) : null;
const skip = SIDECAR && SEED ? false : "needs a running sidecar: AFORO_FLOW_SIDECAR_URL and AFORO_FLOW_SEED (see tests/test_apigee_flow.py)";

let backend;
let player;
let apps = {};
// The TLS settings (aforo-config keys) and the environment's stores they name.
const tlsConfig = TLS ? { tls_truststore: "aforo-sidecar-ca", tls_keystore: "aforo-client", tls_key_alias: "gateway" } : {};
const read = (path) => require("node:fs").readFileSync(path, "utf8");
const tlsStores = TLS
  ? {
      truststores: { "aforo-sidecar-ca": read(TLS.ca) },
      keystores: { "aforo-client": { gateway: { cert: read(TLS.cert), key: read(TLS.key) } } },
    }
  : {};

test.before(async () => {
  if (skip) return;
  backend = await startBackend();
  for (const id of Object.values(SEED.apps)) apps[id] = { product: SEED.product };
  apps[SEED.unknown] = { product: SEED.product };
  player = makePlayer({
    // Configured the Apigee Edge way: the environment KVM aforo-config.
    config: { sidecar_url: SIDECAR, decision_url: DECISION, fail_mode: "closed", tenant: SEED.tenant, cost_header: "X-Aforo-Cost", ...tlsConfig },
    secrets: SECRETS,
    tls: tlsStores,
    apps,
    backendUrl: backend.url,
  });
});

test.after(async () => {
  if (backend) await backend.close();
});

const body = (exchange) => JSON.parse(exchange.body);
const ran = (exchange, policy) => executed(exchange.trace, policy);

test("allowed calls reach the backend, are never cached, and are reported as usage without bodies", { skip }, async () => {
  const app = SEED.apps.fresh;
  const before = backend.received.length;
  for (let i = 0; i < 2; i += 1) {
    const exchange = await player.runProxy(call(app, { verb: "POST", body: '{"card":"4111-1111"}' }));
    assert.equal(exchange.status, 200, exchange.body);
    assert.equal(body(exchange).ok, true);
    // Asked every time: an allow is never cached.
    assert.equal(ran(exchange, "LC-Aforo-Decision").length, 1);
    assert.equal(exchange.ctx.getVariable("lookupcache.LC-Aforo-Decision.cachehit"), false);
    assert.equal(ran(exchange, "SC-Aforo-Authorize").length, 1);
    assert.equal(ran(exchange, "PC-Aforo-Decision").length, 0);
    assert.equal(ran(exchange, "AM-Aforo-FlagDegraded").length, 0);
    assert.equal(exchange.ctx.getVariable("aforo.state"), "allow");
    assert.equal(exchange.ctx.getVariable("aforo.reason"), "ok");
    assert.ok(exchange.ctx.getVariable("aforo.decision_id"));
    assert.equal(exchange.headers["X-Aforo-Balance"], "0");

    // The authorize question the sidecar got (on its decision port when configured).
    assert.equal(ran(exchange, "SC-Aforo-Authorize")[0].url, `${DECISION || SIDECAR}/integrations/apigee/authorize`);
    // Over TLS: the sidecar's CA from the truststore, the client certificate from the keystore.
    const tls = TLS ? { clientCertificate: true, truststore: true } : null;
    assert.deepEqual(ran(exchange, "SC-Aforo-Authorize")[0].tls, tls);
    const question = JSON.parse(exchange.ctx.message("aforo.authorize.request").content);
    assert.deepEqual(question, {
      appId: app,
      apiProduct: SEED.product,
      operation: "POST /forecast",
      requestId: exchange.ctx.getVariable("messageid"),
      tenant: SEED.tenant,
    });

    // The usage event, sent from the PostClientFlow after the client had its answer.
    const [usage] = ran(exchange, "SC-Aforo-Usage");
    assert.ok(usage && !usage.failed, JSON.stringify(usage));
    assert.equal(usage.url, `${SIDECAR}/v1/usage`);
    assert.deepEqual(usage.tls, tls);
    assert.deepEqual(JSON.parse(exchange.ctx.message("aforo.usage.response").content), {
      accepted: 1,
      duplicates: 0,
      rejected: 0,
      errors: [],
    });
    const sent = exchange.ctx.message("aforo.usage.request").content;
    const event = JSON.parse(sent);
    assert.equal(event.consumer_id, app);
    assert.equal(event.request_id, exchange.ctx.getVariable("messageid"));
    assert.equal(event.product, SEED.product);
    assert.equal(event.status, 200);
    assert.equal(event.method, "POST");
    assert.equal(event.route, "/aforo-example/forecast");
    assert.equal(event.request_size, Buffer.byteLength('{"card":"4111-1111"}'));
    assert.equal(event.response_size, Buffer.byteLength(exchange.body));
    assert.equal(event.decision_id, exchange.ctx.getVariable("aforo.decision_id"));
    assert.deepEqual(event.headers, { "user-agent": "flow-test/1.0" });
    assert.doesNotMatch(sent, /4111|key-/);
  }
  const forwarded = backend.received.slice(before);
  assert.equal(forwarded.length, 2);
  for (const request of forwarded) {
    assert.equal(request.headers["x-api-key"], undefined, "the API key is not forwarded");
    assert.equal(request.headers["x-aforo-degraded"], undefined);
    assert.equal(request.body, '{"card":"4111-1111"}');
  }
});

test("1000/day: the 1001st call raises 429 with Retry-After; the next one within ttl_seconds comes from the cache", { skip }, async () => {
  const app = SEED.apps.daily;
  await awayFromMidnight();
  // 1000 calls through the shared flow (authorize phase), each one asked to the sidecar.
  const variables = {
    "developer.app.id": app,
    client_id: keyOf(app),
    "apiproduct.name": SEED.product,
    "apiproxy.name": "aforo-example",
    "proxy.pathsuffix": "/forecast",
    "request.verb": "GET",
    "aforo.phase": "authorize",
  };
  const states = {};
  let callouts = 0;
  let populated = 0;
  for (let i = 0; i < 1000; i += 1) {
    const played = await player.playSharedFlow("aforo-authorize", variables);
    let state = played.ctx.getVariable("aforo.state");
    // A degraded allow (the sidecar's store too slow) counts nothing: name it if it happens.
    if (played.ctx.getVariable("aforo.degraded") === "true") state = `${state}-degraded`;
    states[state] = (states[state] || 0) + 1;
    callouts += executed(played.trace, "SC-Aforo-Authorize").length;
    populated += executed(played.trace, "PC-Aforo-Decision").length;
  }
  assert.deepEqual(states, { allow: 1000 });
  assert.equal(callouts, 1000);
  assert.equal(populated, 0);

  // The 1001st, as a client sees it through the proxy.
  const before = backend.received.length;
  const denied = await player.runProxy(call(app));
  assert.equal(denied.status, 429, denied.body);
  const retryAfter = Number(denied.headers["Retry-After"]);
  assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1 && retryAfter <= 86400, `Retry-After ${retryAfter}`);
  assert.equal(denied.headers["Content-Type"], "application/json");
  assert.equal(denied.headers["X-Aforo-Reason"], "quota_exceeded");
  assert.deepEqual(body(denied), {
    message: "API quota exceeded",
    reason: "quota_exceeded",
    decision_id: denied.ctx.getVariable("aforo.decision_id"),
    retry_after: retryAfter,
  });
  assert.equal(ran(denied, "SC-Aforo-Authorize").length, 1);
  assert.equal(ran(denied, "RF-Aforo-DenyRetryAfter").length, 1);
  // Cached for the decision's ttl_seconds: until the window resets, at most 60 s.
  const [populate] = ran(denied, "PC-Aforo-Decision");
  assert.equal(populate.ttl, Math.min(retryAfter, 60));
  assert.equal(ran(denied, "SC-Aforo-Usage").length, 0, "a denied call is not usage");

  // The 1002nd, within ttl_seconds: answered from the cache, no callout.
  const cached = await player.runProxy(call(app));
  assert.equal(cached.status, 429);
  assert.equal(cached.ctx.getVariable("lookupcache.LC-Aforo-Decision.cachehit"), true);
  assert.equal(ran(cached, "SC-Aforo-Authorize").length, 0, "no callout on a cache hit");
  assert.equal(ran(cached, "PC-Aforo-Decision").length, 0);
  assert.equal(cached.ctx.getVariable("aforo.source"), "cache");
  const cachedRetry = Number(cached.headers["Retry-After"]);
  assert.ok(cachedRetry >= 1 && cachedRetry <= retryAfter, `${cachedRetry} <= ${retryAfter}`);
  assert.equal(body(cached).reason, "quota_exceeded");
  assert.equal(body(cached).decision_id, body(denied).decision_id);
  assert.equal(backend.received.length, before, "no denied call reached the backend");
});

test("a suspended app gets 403; within ttl_seconds the denial comes from the cache", { skip }, async () => {
  const app = SEED.apps.suspended;
  const first = await player.runProxy(call(app));
  assert.equal(first.status, 403, first.body);
  assert.equal(first.headers["Retry-After"], undefined);
  assert.deepEqual(body(first), { message: "Consumer suspended", reason: "suspended", decision_id: first.ctx.getVariable("aforo.decision_id") });
  assert.equal(ran(first, "SC-Aforo-Authorize").length, 1);
  assert.equal(ran(first, "RF-Aforo-Deny").length, 1);
  assert.equal(ran(first, "PC-Aforo-Decision")[0].ttl, 5);

  const second = await player.runProxy(call(app));
  assert.equal(second.status, 403);
  assert.equal(ran(second, "SC-Aforo-Authorize").length, 0);
  assert.equal(body(second).reason, "suspended");
});

test("an empty prepaid wallet gets 402", { skip }, async () => {
  const exchange = await player.runProxy(call(SEED.apps.broke));
  assert.equal(exchange.status, 402, exchange.body);
  assert.equal(exchange.headers["Retry-After"], undefined);
  assert.equal(body(exchange).reason, "insufficient_balance");
  assert.equal(body(exchange).message, "Insufficient balance");
});

test("an estimated cost from a header is charged exactly; an invalid one is refused before any callout", { skip }, async () => {
  const app = SEED.apps.metered;
  const costly = (cost) => call(app, { suffix: "/reports", headers: { "X-Aforo-Cost": cost } });
  const balances = [];
  for (let i = 0; i < 2; i += 1) {
    const exchange = await player.runProxy(costly("0.04"));
    assert.equal(exchange.status, 200, exchange.body);
    assert.match(exchange.ctx.message("aforo.authorize.request").content, /"estimatedCost":0\.04,/);
    balances.push(exchange.headers["X-Aforo-Balance"]);
  }
  assert.deepEqual(balances, ["0.06", "0.02"]);
  const broke = await player.runProxy(costly("0.04"));
  assert.equal(broke.status, 402, broke.body);

  const invalid = await player.runProxy(call(app, { suffix: "/other", headers: { "X-Aforo-Cost": "0.0000001" } }));
  assert.equal(invalid.status, 400);
  assert.equal(body(invalid).reason, "invalid_cost");
  assert.equal(ran(invalid, "SC-Aforo-Authorize").length, 0);
});

test("an app the sidecar does not know gets 403 unknown_consumer", { skip }, async () => {
  const exchange = await player.runProxy(call(SEED.unknown));
  assert.equal(exchange.status, 403, exchange.body);
  assert.equal(body(exchange).reason, "unknown_consumer");
});

test("a request without a valid API key never reaches the shared flow", { skip }, async () => {
  for (const headers of [{}, { "x-api-key": "key-nobody" }]) {
    const exchange = await player.runProxy({ verb: "GET", path: "/aforo-example/forecast", headers });
    assert.equal(exchange.status, 401);
    assert.deepEqual(body(exchange), { message: "Invalid API key", reason: "invalid_key" });
    assert.equal(ran(exchange, "FC-Aforo-Authorize").length, 0);
    assert.equal(ran(exchange, "SC-Aforo-Usage").length, 0);
  }
});

test("configured the Apigee X way (a property set), the KVM is not read", { skip }, async () => {
  const xPlayer = makePlayer({
    propertySets: { aforo: { sidecar_url: SIDECAR, decision_url: DECISION, tenant: SEED.tenant, ...tlsConfig } },
    secrets: SECRETS,
    apps,
    backendUrl: backend.url,
    tls: tlsStores,
  });
  const exchange = await xPlayer.runProxy(call(SEED.apps.fresh));
  assert.equal(exchange.status, 200, exchange.body);
  assert.equal(exchange.ctx.getVariable("aforo.reason"), "ok"); // the sidecar's answer, not the fail mode
  assert.equal(ran(exchange, "KVM-Aforo-Config").length, 0);
  assert.equal(ran(exchange, "SC-Aforo-Authorize").length, 1);
  assert.equal(ran(exchange, "SC-Aforo-Usage").length, 1);
});
