"use strict";
// JS-Aforo-BuildRequest (aforo-common.js + aforo-build-request.js) with a mocked context.

const test = require("node:test");
const assert = require("node:assert/strict");
const { makeContext, runPolicy } = require("../lib/harness");

const APP = {
  "developer.app.id": "app-7f3a",
  "client_id": "key-123",
  "developer.app.name": "weather-app",
  "developer.email": "dev@example.com",
  "apiproduct.name": "weather-api",
  "apiproxy.name": "weather-proxy",
  "proxy.pathsuffix": "/forecast/today",
  "request.verb": "GET",
  messageid: "rrt-0a1b2c3d-42",
  "aforo.config.sidecar_url": "http://sidecar.internal:8080/",
};

function build(vars = {}, request = {}) {
  const ctx = makeContext({ ...APP, ...vars }, { request });
  runPolicy("JS-Aforo-BuildRequest", ctx);
  return ctx;
}

const v = (ctx, name) => ctx.getVariable(name);

test("builds the authorize body from the flow variables and points the callout at the sidecar", () => {
  const ctx = build();
  assert.equal(v(ctx, "aforo.state"), "lookup");
  assert.deepEqual(JSON.parse(v(ctx, "aforo.authorize.body")), {
    appId: "app-7f3a",
    apiProduct: "weather-api",
    operation: "GET /forecast/today",
    requestId: "rrt-0a1b2c3d-42",
    tenant: "default",
  });
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Authorize.target.url"), "http://sidecar.internal:8080/integrations/apigee/authorize");
  // The cache key fragments.
  assert.equal(v(ctx, "aforo.tenant"), "default");
  assert.equal(v(ctx, "aforo.app_id"), "app-7f3a");
  assert.equal(v(ctx, "aforo.api_product"), "weather-api");
  assert.equal(v(ctx, "aforo.operation"), "GET /forecast/today");
  assert.equal(v(ctx, "aforo.fail_mode"), "open");
  assert.equal(v(ctx, "aforo.degraded"), "false");
});

test("the decision port is used for decisions when decision_url is set", () => {
  const ctx = build({ "aforo.config.decision_url": "http://sidecar.internal:8081" });
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Authorize.target.url"), "http://sidecar.internal:8081/integrations/apigee/authorize");
});

test("the estimated cost goes out exactly as written, from the flow variable, the header or the setting", () => {
  const header = { "aforo.config.cost_header": "X-Aforo-Cost" };
  // The configured header.
  let ctx = build(header, { headers: { "x-aforo-cost": "0.05" } });
  assert.match(v(ctx, "aforo.authorize.body"), /"estimatedCost":0\.05,/);
  // A value set by the proxy wins over the header.
  ctx = build({ ...header, "aforo.estimated_cost": "123456789.123456" }, { headers: { "X-Aforo-Cost": "0.05" } });
  assert.match(v(ctx, "aforo.authorize.body"), /"estimatedCost":123456789\.123456,/);
  // The setting when neither is there.
  ctx = build({ ...header, "propertyset.aforo.estimated_cost": "2" });
  assert.match(v(ctx, "aforo.authorize.body"), /"estimatedCost":2,/);
  // No header configured: a client's header is ignored; no cost: the plan's price applies.
  ctx = build({}, { headers: { "X-Aforo-Cost": "0" } });
  assert.doesNotMatch(v(ctx, "aforo.authorize.body"), /estimatedCost/);
});

test("an invalid cost is refused with 400 invalid_cost, without asking the sidecar", () => {
  for (const bad of ["abc", "-1", "0.1234567", "1e3", "1000000000", " 1", "0x10"]) {
    const ctx = build({ "aforo.config.cost_header": "X-Aforo-Cost" }, { headers: { "X-Aforo-Cost": bad } });
    if (bad === " 1") {
      // Header values are trimmed (HTTP allows surrounding whitespace).
      assert.equal(v(ctx, "aforo.state"), "lookup");
      continue;
    }
    assert.equal(v(ctx, "aforo.state"), "deny", bad);
    assert.equal(v(ctx, "aforo.fault.status"), "400");
    assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), { message: "Invalid cost", reason: "invalid_cost" });
    assert.equal(v(ctx, "aforo.authorize.body"), null);
  }
});

test("the consumer comes from the configured source; app_id falls back to client_id", () => {
  assert.equal(v(build(), "aforo.app_id"), "app-7f3a");
  assert.equal(v(build({ "developer.app.id": null }), "aforo.app_id"), "key-123");
  assert.equal(v(build({ "aforo.config.consumer_id_source": "client_id" }), "aforo.app_id"), "key-123");
  assert.equal(v(build({ "aforo.config.consumer_id_source": "app_name" }), "aforo.app_id"), "weather-app");
  assert.equal(v(build({ "aforo.config.consumer_id_source": "developer_email" }), "aforo.app_id"), "dev@example.com");
  // An unknown source is app_id.
  assert.equal(v(build({ "aforo.config.consumer_id_source": "nonsense" }), "aforo.app_id"), "app-7f3a");
});

test("no consumer: 401 missing_consumer; an id the sidecar cannot hold: 403 unknown_consumer", () => {
  let ctx = build({ "developer.app.id": null, client_id: null });
  assert.equal(v(ctx, "aforo.state"), "deny");
  assert.equal(v(ctx, "aforo.fault.status"), "401");
  assert.equal(JSON.parse(v(ctx, "aforo.fault.body")).reason, "missing_consumer");

  ctx = build({ "aforo.config.consumer_id_source": "app_name", "developer.app.name": "My Weather App" });
  assert.equal(v(ctx, "aforo.state"), "deny");
  assert.equal(v(ctx, "aforo.fault.status"), "403");
  assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), { message: "Unknown consumer", reason: "unknown_consumer" });
});

test("the product falls back to default_product, then to the proxy's name", () => {
  assert.equal(v(build({ "apiproduct.name": null, "aforo.config.default_product": "basic" }), "aforo.api_product"), "basic");
  assert.equal(v(build({ "apiproduct.name": null }), "aforo.api_product"), "weather-proxy");
});

test("settings: aforo.config wins over the property set, which wins over the KVM, then the defaults", () => {
  const base = { "aforo.config.sidecar_url": null };
  let ctx = build({ ...base, "aforo.kvm.sidecar_url": "http://kvm:1", "aforo.kvm.tenant": "kvm-tenant" });
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Authorize.target.url"), "http://kvm:1/integrations/apigee/authorize");
  assert.equal(v(ctx, "aforo.tenant"), "kvm-tenant");
  ctx = build({ ...base, "aforo.kvm.sidecar_url": "http://kvm:1", "propertyset.aforo.sidecar_url": "http://props:2" });
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Authorize.target.url"), "http://props:2/integrations/apigee/authorize");
  ctx = build({ "propertyset.aforo.sidecar_url": "http://props:2", "propertyset.aforo.fail_mode": " closed " });
  assert.equal(v(ctx, "servicecallout.SC-Aforo-Authorize.target.url"), "http://sidecar.internal:8080/integrations/apigee/authorize");
  assert.equal(v(ctx, "aforo.fail_mode"), "closed");
  // Blank values do not count as set.
  ctx = build({ "aforo.config.tenant": "   ", "propertyset.aforo.tenant": "acme" });
  assert.equal(v(ctx, "aforo.tenant"), "acme");
});

test("no sidecar configured: the fail mode applies at once (open: degraded, closed: 503)", () => {
  let ctx = build({ "aforo.config.sidecar_url": null });
  assert.equal(v(ctx, "aforo.state"), "degraded");
  assert.equal(v(ctx, "aforo.degraded"), "true");
  assert.equal(v(ctx, "aforo.reason"), "sidecar_unavailable");
  assert.match(v(ctx, "aforo.error"), /sidecar_url is not configured/);

  ctx = build({ "aforo.config.sidecar_url": "ftp://nope", "aforo.config.fail_mode": "closed" });
  assert.equal(v(ctx, "aforo.state"), "deny_retry");
  assert.equal(v(ctx, "aforo.fault.status"), "503");
  assert.equal(v(ctx, "aforo.retry_after"), "1");
  assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), {
    message: "Quota service unavailable",
    reason: "sidecar_unavailable",
    retry_after: 1,
  });
});

test("a tenant the sidecar would refuse is a configuration error: fail mode, not a 400 from the sidecar", () => {
  const ctx = build({ "aforo.config.tenant": "bad tenant" });
  assert.equal(v(ctx, "aforo.state"), "degraded");
  assert.match(v(ctx, "aforo.error"), /invalid configuration/);
});

test("enabled=false switches the flow off", () => {
  const ctx = build({ "propertyset.aforo.enabled": "false" });
  assert.equal(v(ctx, "aforo.state"), "off");
  assert.equal(v(ctx, "aforo.authorize.body"), null);
});

test("a client cannot send X-Aforo-Degraded: the flow removes it", () => {
  const ctx = build({}, { headers: { "X-Aforo-Degraded": "true", "x-aforo-degraded-reason": "spoofed", Accept: "*/*" } });
  const request = ctx.message("request");
  assert.equal(request.header("X-Aforo-Degraded"), null);
  assert.equal(request.header("X-Aforo-Degraded-Reason"), null);
  assert.equal(request.header("Accept"), "*/*");
});

test("the operation is cut at 512 characters and an odd message id is made printable", () => {
  const ctx = build({ "proxy.pathsuffix": `/${"a".repeat(600)}`, messageid: "id with spaces\u00e9" });
  assert.equal(v(ctx, "aforo.operation").length, 512);
  assert.equal(JSON.parse(v(ctx, "aforo.authorize.body")).requestId, "id_with_spaces_");
});

test("a failure inside the script follows the fail mode instead of breaking the call", () => {
  const ctx = makeContext({ ...APP, "aforo.config.fail_mode": "closed" });
  // Break the host object the script relies on.
  const api = ctx.scriptApi;
  ctx.scriptApi = () => ({ ...api.call(ctx), removeVariable: () => { throw new Error("boom"); } });
  runPolicy("JS-Aforo-BuildRequest", ctx);
  assert.equal(v(ctx, "aforo.state"), "deny");
  assert.equal(v(ctx, "aforo.fault.status"), "500");
  assert.equal(JSON.parse(v(ctx, "aforo.fault.body")).reason, "policy_error");
  assert.match(v(ctx, "aforo.error"), /boom/);
});

test("the gateway token comes from the encrypted KVM only, and goes to a private variable", () => {
  let ctx = build({ "private.aforo.gateway_token": " aft_0123456789abcdef_secret " });
  assert.equal(v(ctx, "private.aforo.authorization"), "Bearer aft_0123456789abcdef_secret");
  // Never from the settings (a property set or aforo.config is no place for a secret).
  ctx = build({ "aforo.config.gateway_token": "aft_x", "propertyset.aforo.gateway_token": "aft_y" });
  assert.equal(v(ctx, "private.aforo.authorization"), "");
  // Set even when the flow is switched off or denies without asking (the usage callout reads it).
  ctx = build({ "private.aforo.gateway_token": "aft_z", "aforo.config.enabled": "false" });
  assert.equal(v(ctx, "private.aforo.authorization"), "Bearer aft_z");
  assert.ok(!String(v(ctx, "aforo.authorize.body") || "").includes("aft_z"));
});

test("TLS to an https sidecar: the callout's SSLInfo variables from the configured stores", () => {
  const stores = {
    "aforo.config.tls_truststore": "aforo-sidecar-ca",
    "aforo.config.tls_keystore": "aforo-client",
    "aforo.config.tls_key_alias": "gateway",
  };
  let ctx = build({ ...stores, "aforo.config.sidecar_url": "https://sidecar.internal:8443" });
  assert.equal(v(ctx, "aforo.tls.authorize.enabled"), "true");
  assert.equal(v(ctx, "aforo.tls.authorize.client_auth"), "true");
  assert.equal(v(ctx, "aforo.tls.truststore"), "aforo-sidecar-ca");
  assert.equal(v(ctx, "aforo.tls.keystore"), "aforo-client");
  assert.equal(v(ctx, "aforo.tls.key_alias"), "gateway");
  // A keystore without an alias sends no client certificate.
  ctx = build({ ...stores, "aforo.config.tls_key_alias": "", "aforo.config.sidecar_url": "https://s:8443" });
  assert.equal(v(ctx, "aforo.tls.authorize.client_auth"), "false");
  // An http sidecar: the SSLInfo block stays off, whatever the stores say.
  ctx = build(stores);
  assert.equal(v(ctx, "aforo.tls.authorize.enabled"), "false");
  // The decision port's scheme decides for decisions.
  ctx = build({ ...stores, "aforo.config.decision_url": "https://sidecar.internal:8444" });
  assert.equal(v(ctx, "aforo.tls.authorize.enabled"), "true");
});
