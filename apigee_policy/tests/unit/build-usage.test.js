"use strict";
// JS-Aforo-BuildUsage (PostClientFlow) with a mocked context.

const test = require("node:test");
const assert = require("node:assert/strict");
const { makeContext, runPolicy } = require("../lib/harness");

const v = (ctx, name) => ctx.getVariable(name);

const PROXIED = {
  "aforo.state": "allow",
  "aforo.app_id": "app-7f3a",
  "aforo.api_product": "weather-api",
  "aforo.tenant": "acme",
  "aforo.request_id": "rrt-0a1b2c3d-42",
  "aforo.decision_id": "d-1",
  "aforo.config.sidecar_url": "http://sidecar.internal:8080",
  "aforo.config.decision_url": "http://sidecar.internal:8081",
  "apiproxy.name": "weather-proxy",
  "proxy.basepath": "/weather",
  "proxy.pathsuffix": "/forecast",
  "request.verb": "POST",
  "client.received.start.timestamp": 1700000000000,
  "client.sent.end.timestamp": 1700000000250,
  "target.sent.start.timestamp": 1700000000020,
  "target.received.end.timestamp": 1700000000220,
};

function usage(vars = {}, { request = {}, response = {} } = {}) {
  const ctx = makeContext(
    { ...PROXIED, ...vars },
    {
      request: { verb: "POST", headers: { "Content-Length": "17", "User-Agent": "curl/8.5, extra", Authorization: "Bearer secret", "x-api-key": "k" }, content: "{\"card\":\"4111\"}", ...request },
      messages: { response: { status: 201, headers: { "Content-Length": "1234" }, content: "{\"secret\":true}", ...response } },
    }
  );
  ctx.current = "response";
  runPolicy("JS-Aforo-BuildUsage", ctx);
  return ctx;
}

test("a proxied call is reported with ids, status, sizes and latencies, never bodies", () => {
  const ctx = usage();
  assert.equal(v(ctx, "aforo.usage.ready"), "true");
  // Usage goes to the HTTP port, not the decision port.
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Usage.target.url"), "http://sidecar.internal:8080/v1/usage");
  const body = v(ctx, "aforo.usage.body");
  assert.deepEqual(JSON.parse(body), {
    tenant: "acme",
    consumer_id: "app-7f3a",
    request_id: "rrt-0a1b2c3d-42",
    product: "weather-api",
    route: "/weather/forecast",
    service: "weather-proxy",
    method: "POST",
    status: 201,
    started_at_ms: 1700000000000,
    latency_ms: 250,
    upstream_latency_ms: 200,
    gateway_latency_ms: 50,
    request_size: 17,
    response_size: 1234,
    decision_id: "d-1",
    headers: { "user-agent": "curl/8.5, extra" },
  });
  assert.doesNotMatch(body, /4111|secret|Bearer/);
});

test("secret headers are never copied, whatever the allow-list says", () => {
  const ctx = usage({ "aforo.config.usage_headers": "Authorization, x-api-key, cookie, User-Agent, x-missing" });
  assert.deepEqual(JSON.parse(v(ctx, "aforo.usage.body")).headers, { "user-agent": "curl/8.5, extra" });
});

test("a call let through in fail mode open is reported; a call this flow denied is not", () => {
  assert.equal(v(usage({ "aforo.state": "degraded" }), "aforo.usage.ready"), "true");
  for (const state of ["deny", "deny_retry", "off", null]) {
    const ctx = usage({ "aforo.state": state });
    assert.equal(v(ctx, "aforo.usage.ready"), "false", String(state));
    assert.equal(v(ctx, "aforo.usage.body"), null);
  }
});

test("usage=false, no consumer or no sidecar: nothing is sent", () => {
  assert.equal(v(usage({ "propertyset.aforo.usage": "false" }), "aforo.usage.ready"), "false");
  assert.equal(v(usage({ "aforo.app_id": null }), "aforo.usage.ready"), "false");
  assert.equal(v(usage({ "aforo.config.sidecar_url": null }), "aforo.usage.ready"), "false");
});

test("missing timings and sizes are 0, the status of an error response is taken", () => {
  const ctx = usage(
    { "client.sent.end.timestamp": -1, "target.sent.start.timestamp": null, "target.received.end.timestamp": null },
    { request: { headers: {} }, response: { status: 502, headers: {} } }
  );
  const event = JSON.parse(v(ctx, "aforo.usage.body"));
  assert.equal(event.status, 502);
  assert.equal(event.latency_ms, 0);
  assert.equal(event.upstream_latency_ms, 0);
  assert.equal(event.gateway_latency_ms, 0);
  assert.equal(event.request_size, 0);
  assert.equal(event.response_size, 0);
  assert.deepEqual(event.headers, {});
});

test("usage to an https sidecar sets the usage callout's SSLInfo variables", () => {
  const tls = { "aforo.config.sidecar_url": "https://sidecar.internal:8443", "aforo.config.tls_truststore": "ca" };
  let ctx = usage(tls);
  assert.equal(v(ctx, "aforo.tls.usage.enabled"), "true");
  assert.equal(v(ctx, "aforo.tls.usage.client_auth"), "false"); // no keystore configured
  assert.equal(v(ctx, "aforo.tls.truststore"), "ca");
  ctx = usage();
  assert.equal(v(ctx, "aforo.tls.usage.enabled"), "false");
});
