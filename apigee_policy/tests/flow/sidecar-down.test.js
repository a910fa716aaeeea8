"use strict";
// The shared flow when the sidecar cannot answer: stopped (connection refused), hanging
// (the callout's <Timeout> passes), or answering something that is not a decision. Both
// fail modes, played through the example proxy.
//
// AFORO_FLOW_STOPPED_URL is the URL of a sidecar that was started and then stopped
// (tests/test_apigee_flow.py sets it); without it, a port nothing listens on stands in.

const test = require("node:test");
const assert = require("node:assert/strict");
const { executed } = require("../lib/flow-player");
const { call, closedPortUrl, makePlayer, startBackend, startBlackHole, startFixedAnswer } = require("../lib/flow-fixtures");

const APP = "app-down-test";
const apps = { [APP]: { product: "weather-api" } };

let backend;
let stoppedUrl;

test.before(async () => {
  backend = await startBackend();
  stoppedUrl = process.env.AFORO_FLOW_STOPPED_URL || (await closedPortUrl());
});

test.after(async () => {
  await backend.close();
});

const player = (sidecarUrl, failMode) =>
  makePlayer({ config: { sidecar_url: sidecarUrl, fail_mode: failMode }, apps, backendUrl: backend.url });
const ran = (exchange, policy) => executed(exchange.trace, policy);

async function expectFailOpen(sidecarUrl) {
  const before = backend.received.length;
  const exchange = await player(sidecarUrl, "open").runProxy(call(APP, { verb: "POST", body: "{}" }));
  assert.equal(exchange.status, 200, exchange.body);
  const [callout] = ran(exchange, "SC-Aforo-Authorize");
  assert.equal(exchange.ctx.getVariable("aforo.state"), "degraded");
  assert.equal(exchange.ctx.getVariable("aforo.reason"), "sidecar_unavailable");
  assert.equal(exchange.ctx.getVariable("aforo.source"), "fail_mode");
  // Flagged: to the backend, and to the client by the example proxy.
  const forwarded = backend.received.slice(before);
  assert.equal(forwarded.length, 1);
  assert.equal(forwarded[0].headers["x-aforo-degraded"], "true");
  assert.equal(forwarded[0].headers["x-aforo-degraded-reason"], "sidecar_unavailable");
  assert.equal(exchange.headers["X-Aforo-Degraded"], "true");
  assert.equal(ran(exchange, "PC-Aforo-Decision").length, 0, "nothing cached in fail mode");
  return { exchange, callout };
}

async function expectFailClosed(sidecarUrl) {
  const before = backend.received.length;
  const exchange = await player(sidecarUrl, "closed").runProxy(call(APP));
  assert.equal(exchange.status, 503, exchange.body);
  assert.equal(exchange.headers["Retry-After"], "1");
  assert.equal(exchange.headers["X-Aforo-Reason"], "sidecar_unavailable");
  assert.deepEqual(JSON.parse(exchange.body), { message: "Quota service unavailable", reason: "sidecar_unavailable", retry_after: 1 });
  assert.equal(backend.received.length, before, "the backend is not called");
  assert.equal(ran(exchange, "SC-Aforo-Usage").length, 0);
  return { exchange, callout: ran(exchange, "SC-Aforo-Authorize")[0] };
}

test("sidecar stopped, fail open: the call goes through, flagged X-Aforo-Degraded", async () => {
  const { exchange, callout } = await expectFailOpen(stoppedUrl);
  assert.equal(callout.failed, true);
  assert.equal(callout.transportError, "ECONNREFUSED");
  assert.equal(exchange.ctx.getVariable("servicecallout.SC-Aforo-Authorize.failed"), true);
  assert.equal(ran(exchange, "JS-Aforo-SidecarDown").length, 1);
  assert.equal(ran(exchange, "JS-Aforo-ApplyDecision").length, 0);
  assert.match(exchange.ctx.getVariable("aforo.error"), /ECONNREFUSED/);
  // Usage reporting fails too (same sidecar) without touching the client's answer.
  const [usage] = ran(exchange, "SC-Aforo-Usage");
  assert.equal(usage.failed, true);
  assert.equal(exchange.postClientFault, undefined);
});

test("sidecar stopped, fail closed: 503 sidecar_unavailable with Retry-After", async () => {
  const { exchange, callout } = await expectFailClosed(stoppedUrl);
  assert.equal(callout.failed, true);
  assert.equal(ran(exchange, "JS-Aforo-SidecarDown").length, 1);
  assert.equal(ran(exchange, "RF-Aforo-DenyRetryAfter").length, 1);
});

test("sidecar hanging: the callout gives up at its <Timeout>, then the fail mode applies", async () => {
  const hole = await startBlackHole();
  try {
    for (const expect of [expectFailOpen, expectFailClosed]) {
      const { callout } = await expect(hole.url);
      assert.equal(callout.transportError, "TIMEOUT");
      assert.equal(callout.timeoutMs, 500);
      // Gave up at the timeout: not before it, and not much after.
      assert.ok(callout.elapsedMs >= 450 && callout.elapsedMs < 5000, `${callout.elapsedMs} ms`);
    }
  } finally {
    await hole.close();
  }
});

test("an answer that is not a decision (a proxy's 502 page) follows the fail mode", async () => {
  const bad = await startFixedAnswer(502, "<html><body>Bad Gateway</body></html>");
  try {
    const open = await expectFailOpen(bad.url);
    // An HTTP answer is not a callout failure: the decision step judged it.
    assert.equal(open.callout.failed, undefined);
    assert.equal(open.callout.status, 502);
    assert.equal(ran(open.exchange, "JS-Aforo-ApplyDecision").length, 1);
    assert.match(open.exchange.ctx.getVariable("aforo.error"), /HTTP 502 without a decision/);
    await expectFailClosed(bad.url);
  } finally {
    await bad.close();
  }
});

test("no sidecar configured at all: the fail mode applies without a callout", async () => {
  const unconfigured = makePlayer({ config: null, apps, backendUrl: backend.url });
  const exchange = await unconfigured.runProxy(call(APP));
  assert.equal(exchange.status, 200);
  assert.equal(exchange.headers["X-Aforo-Degraded"], "true");
  assert.equal(ran(exchange, "KVM-Aforo-Config")[0].failed, true, "no KVM: continueOnError");
  assert.equal(ran(exchange, "SC-Aforo-Authorize").length, 0);
  assert.match(exchange.ctx.getVariable("aforo.error"), /sidecar_url is not configured/);
});
