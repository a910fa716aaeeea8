"use strict";
// JS-Aforo-ApplyDecision and JS-Aforo-SidecarDown with a mocked context: the sidecar's
// answers (as /integrations/apigee/authorize sends them), cache hits, and answers that are
// not decisions.

const test = require("node:test");
const assert = require("node:assert/strict");
const { makeContext, runPolicy } = require("../lib/harness");

const v = (ctx, name) => ctx.getVariable(name);

function decision(overrides = {}) {
  return {
    allow: true,
    reason: "ok",
    ttl_seconds: 0,
    remainingBalance: null,
    status: 200,
    retryAfter: null,
    decisionId: "01a2074456c6d4183b21135929ab",
    degraded: false,
    ...overrides,
  };
}

/** The sidecar answered `content` with HTTP `status`. */
function answered(status, content, vars = {}) {
  const ctx = makeContext(
    { "aforo.state": "lookup", "lookupcache.LC-Aforo-Decision.cachehit": false, ...vars },
    { messages: { "aforo.authorize.response": { status, content: typeof content === "string" ? content : JSON.stringify(content) } } }
  );
  runPolicy("JS-Aforo-ApplyDecision", ctx);
  return ctx;
}

test("an allow lets the call through and is never cached", () => {
  const ctx = answered(200, '{"allow":true,"reason":"ok","ttl_seconds":0,"remainingBalance":9.95,"status":200,"retryAfter":null,"decisionId":"d-1","degraded":false}');
  assert.equal(v(ctx, "aforo.state"), "allow");
  assert.equal(v(ctx, "aforo.reason"), "ok");
  assert.equal(v(ctx, "aforo.decision_id"), "d-1");
  // The balance exactly as the sidecar wrote it.
  assert.equal(v(ctx, "aforo.remaining_balance"), "9.95");
  assert.equal(v(ctx, "aforo.source"), "sidecar");
  assert.equal(v(ctx, "aforo.cache.populate"), null);
  assert.equal(v(ctx, "aforo.degraded"), null);
});

test("an allow with a ttl (not what the sidecar sends) is still not cached", () => {
  const ctx = answered(200, decision({ ttl_seconds: 30 }));
  assert.equal(v(ctx, "aforo.state"), "allow");
  assert.equal(v(ctx, "aforo.cache.populate"), null);
});

test("the sidecar's own degraded allow (its Redis down, fail open) is flagged", () => {
  const ctx = answered(200, decision({ reason: "store_unavailable", degraded: true }));
  assert.equal(v(ctx, "aforo.state"), "allow");
  assert.equal(v(ctx, "aforo.degraded"), "true");
  assert.equal(v(ctx, "aforo.reason"), "store_unavailable");
});

test("429 quota_exceeded: a fault with Retry-After, cached for ttl_seconds", () => {
  const ctx = answered(429, decision({ allow: false, reason: "quota_exceeded", status: 429, ttl_seconds: 38, retryAfter: 38 }));
  assert.equal(v(ctx, "aforo.state"), "deny_retry");
  assert.equal(v(ctx, "aforo.fault.status"), "429");
  assert.equal(v(ctx, "aforo.retry_after"), "38");
  assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), {
    message: "API quota exceeded",
    reason: "quota_exceeded",
    decision_id: "01a2074456c6d4183b21135929ab",
    retry_after: 38,
  });
  assert.equal(v(ctx, "aforo.cache.populate"), "true");
  assert.equal(v(ctx, "aforo.cache.ttl"), "38");
  const entry = JSON.parse(v(ctx, "aforo.cache.entry"));
  assert.equal(entry.v, 1);
  assert.equal(entry.decision.allow, false);
  assert.equal(entry.decision.status, 429);
  assert.ok(Math.abs(entry.cachedAtMs - Date.now()) < 5000);
});

for (const [status, reason, message] of [
  [402, "insufficient_balance", "Insufficient balance"],
  [403, "suspended", "Consumer suspended"],
  [403, "revoked", "Consumer revoked"],
  [403, "unknown_consumer", "Unknown consumer"],
  [403, "product_not_allowed", "Product not included in the plan"],
  [401, "invalid_key", "Invalid API key"],
]) {
  test(`${status} ${reason}: a fault without Retry-After, cached for ttl_seconds`, () => {
    const ctx = answered(status, decision({ allow: false, reason, status, ttl_seconds: 5 }));
    assert.equal(v(ctx, "aforo.state"), "deny");
    assert.equal(v(ctx, "aforo.fault.status"), String(status));
    assert.equal(v(ctx, "aforo.retry_after"), null);
    assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), { message, reason, decision_id: "01a2074456c6d4183b21135929ab" });
    assert.equal(v(ctx, "aforo.cache.ttl"), "5");
  });
}

test("a denial with ttl_seconds 0 is enforced but not cached", () => {
  const ctx = answered(403, decision({ allow: false, reason: "suspended", status: 403, ttl_seconds: 0 }));
  assert.equal(v(ctx, "aforo.state"), "deny");
  assert.equal(v(ctx, "aforo.cache.populate"), null);
});

test("the sidecar's own 503 (fail mode closed, its Redis down) is enforced, never cached", () => {
  const ctx = answered(503, decision({ allow: false, reason: "store_unavailable", status: 503, retryAfter: 1, degraded: true }));
  assert.equal(v(ctx, "aforo.state"), "deny_retry");
  assert.equal(v(ctx, "aforo.fault.status"), "503");
  assert.equal(v(ctx, "aforo.retry_after"), "1");
  assert.equal(v(ctx, "aforo.cache.populate"), null);
});

test("anything that is not a decision follows the fail mode", () => {
  const cases = [
    [502, "<html>Bad Gateway</html>"],
    [500, { code: "internal", message: "boom" }],
    [400, { code: "invalid_identifier", message: "appId is not valid", field: "appId" }],
    [200, decision({ status: 429, allow: false })], // HTTP status and decision disagree
    [429, decision({ status: 429 })], // an allow with a denial status
    [200, decision({ allow: "yes" })],
    [200, decision({ ttl_seconds: -1 })],
    [200, decision({ decisionId: 7 })],
    [429, decision({ allow: false, status: 429, reason: "quota_exceeded", retryAfter: "soon" })],
    [200, "null"],
    [200, ""],
  ];
  for (const [status, content] of cases) {
    let ctx = answered(status, content);
    assert.equal(v(ctx, "aforo.state"), "degraded", JSON.stringify(content));
    assert.equal(v(ctx, "aforo.degraded"), "true");
    assert.equal(v(ctx, "aforo.reason"), "sidecar_unavailable");
    assert.match(v(ctx, "aforo.error"), new RegExp(`HTTP ${status} without a decision`));
    assert.equal(v(ctx, "aforo.cache.populate"), null);

    ctx = answered(status, content, { "propertyset.aforo.fail_mode": "closed" });
    assert.equal(v(ctx, "aforo.state"), "deny_retry");
    assert.equal(v(ctx, "aforo.fault.status"), "503");
  }
});

function fromCache(entry, vars = {}) {
  const ctx = makeContext({
    "aforo.state": "lookup",
    "lookupcache.LC-Aforo-Decision.cachehit": true,
    "aforo.cache.hit_entry": typeof entry === "string" ? entry : JSON.stringify(entry),
    ...vars,
  });
  runPolicy("JS-Aforo-ApplyDecision", ctx);
  return ctx;
}

const cachedDenial = (ageMs, overrides = {}) => ({
  v: 1,
  cachedAtMs: Date.now() - ageMs,
  decision: { allow: false, reason: "quota_exceeded", status: 429, ttl: 60, retryAfter: 60, decisionId: "d-9", degraded: false, balance: "0", ...overrides },
});

test("a cache hit is enforced without the sidecar; Retry-After counts down with the entry's age", () => {
  const ctx = fromCache(cachedDenial(12500));
  assert.equal(v(ctx, "aforo.state"), "deny_retry");
  assert.equal(v(ctx, "aforo.source"), "cache");
  assert.equal(v(ctx, "aforo.fault.status"), "429");
  assert.equal(v(ctx, "aforo.retry_after"), "48");
  assert.equal(JSON.parse(v(ctx, "aforo.fault.body")).retry_after, 48);
  assert.equal(v(ctx, "aforo.decision_id"), "d-9");
  // Not written back: the entry keeps its original expiry.
  assert.equal(v(ctx, "aforo.cache.populate"), null);
});

test("Retry-After from an entry older than its retry time is still at least 1", () => {
  const ctx = fromCache(cachedDenial(90000));
  assert.equal(v(ctx, "aforo.retry_after"), "1");
});

test("a cached 403 stays a 403 without Retry-After", () => {
  const ctx = fromCache(cachedDenial(1000, { reason: "suspended", status: 403, retryAfter: null, ttl: 5 }));
  assert.equal(v(ctx, "aforo.state"), "deny");
  assert.equal(v(ctx, "aforo.fault.status"), "403");
  assert.equal(v(ctx, "aforo.retry_after"), null);
});

test("an unreadable or unexpected cache entry follows the fail mode", () => {
  for (const entry of ["not json", { v: 2, cachedAtMs: 1, decision: {} }, cachedDenial(0, { allow: true })]) {
    const ctx = fromCache(entry, { "aforo.config.fail_mode": "closed" });
    assert.equal(v(ctx, "aforo.state"), "deny_retry");
    assert.equal(v(ctx, "aforo.fault.status"), "503");
    assert.match(v(ctx, "aforo.error"), /cache entry/);
  }
});

test("JS-Aforo-SidecarDown: fail open continues flagged, fail closed raises 503 with Retry-After 1", () => {
  const down = {
    "aforo.state": "lookup",
    "servicecallout.SC-Aforo-Authorize.failed": true,
    "error.message": "Execution of ServiceCallout SC-Aforo-Authorize failed. Reason: timeout occurred in SC-Aforo-Authorize",
  };
  let ctx = makeContext(down);
  runPolicy("JS-Aforo-SidecarDown", ctx);
  assert.equal(v(ctx, "aforo.state"), "degraded");
  assert.equal(v(ctx, "aforo.degraded"), "true");
  assert.equal(v(ctx, "aforo.reason"), "sidecar_unavailable");
  assert.match(v(ctx, "aforo.error"), /timeout occurred/);
  assert.equal(v(ctx, "aforo.source"), "fail_mode");

  ctx = makeContext({ ...down, "aforo.kvm.fail_mode": "closed" });
  runPolicy("JS-Aforo-SidecarDown", ctx);
  assert.equal(v(ctx, "aforo.state"), "deny_retry");
  assert.equal(v(ctx, "aforo.fault.status"), "503");
  assert.equal(v(ctx, "aforo.retry_after"), "1");
  assert.deepEqual(JSON.parse(v(ctx, "aforo.fault.body")), {
    message: "Quota service unavailable",
    reason: "sidecar_unavailable",
    retry_after: 1,
  });
});
