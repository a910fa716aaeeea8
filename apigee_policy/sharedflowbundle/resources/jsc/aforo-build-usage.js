/*
 * JS-Aforo-BuildUsage (PostClientFlow): one usage event for POST /v1/usage, for a call
 * this flow let through (aforo.state "allow" or "degraded"). Calls it denied are not
 * usage (the client got our fault, nothing was proxied), as in the Kong plugin.
 *
 * Carries ids, product, method, path, status, sizes (Content-Length headers) and
 * latencies, and the allow-listed request headers; never a body, never credentials.
 * Sets aforo.usage.body and aforo.usage.ready = "true" for SC-Aforo-Usage.
 * ES5 (Rhino). Needs aforo-common.js.
 */
(function () {
  "use strict";

  var MAX_TEXT = 512;
  var MAX_HEADERS = 32;
  var MAX_HEADER_VALUE = 2048;

  function number(name) {
    var value = parseInt(aforo.get(name), 10);
    return isFinite(value) && value > 0 ? value : 0;
  }

  function firstNumber(names) {
    var i, value;
    for (i = 0; i < names.length; i++) {
      value = number(names[i]);
      if (value > 0) {
        return value;
      }
    }
    return 0;
  }

  function headers(allowList) {
    var out = {};
    var count = 0;
    var names = allowList.split(",");
    var i, name, value;
    for (i = 0; i < names.length && count < MAX_HEADERS; i++) {
      name = aforo.trim(names[i]).toLowerCase();
      if (name === "" || aforo.SECRET_HEADERS.hasOwnProperty(name) || out.hasOwnProperty(name)) {
        continue;
      }
      value = aforo.get("request.header." + name + ".values.string") || aforo.get("request.header." + name);
      if (value !== "") {
        out[name] = value.substring(0, MAX_HEADER_VALUE);
        count++;
      }
    }
    return out;
  }

  function main() {
    var s = aforo.settings();
    var state = aforo.get("aforo.state");
    var consumer = aforo.get("aforo.app_id");
    aforo.set("aforo.usage.ready", "false");
    if (!s.usage || (state !== "allow" && state !== "degraded") || consumer === "" || s.sidecarUrl === "") {
      return;
    }
    var started = number("client.received.start.timestamp");
    var ended = number("client.sent.end.timestamp");
    var targetSent = number("target.sent.start.timestamp");
    var targetReceived = number("target.received.end.timestamp");
    var latency = started > 0 && ended >= started ? ended - started : 0;
    var upstream = targetSent > 0 && targetReceived >= targetSent ? targetReceived - targetSent : 0;
    var requestId = aforo.get("aforo.request_id") || aforo.get("messageid").replace(/[^\x21-\x7e]/g, "_").substring(0, 200);
    var event = {
      tenant: aforo.get("aforo.tenant") || s.tenant,
      consumer_id: consumer,
      request_id: requestId,
      product: aforo.get("aforo.api_product").substring(0, MAX_TEXT),
      route: (aforo.get("proxy.basepath") + aforo.get("proxy.pathsuffix")).substring(0, MAX_TEXT),
      service: aforo.get("apiproxy.name").substring(0, MAX_TEXT),
      method: aforo.get("request.verb").substring(0, MAX_TEXT),
      status: firstNumber(["message.status.code", "response.status.code", "error.status.code"]),
      started_at_ms: started,
      latency_ms: latency,
      upstream_latency_ms: upstream,
      gateway_latency_ms: latency > upstream ? latency - upstream : 0,
      request_size: number("request.header.Content-Length"),
      response_size: firstNumber(["response.header.Content-Length", "message.header.Content-Length"]),
      decision_id: aforo.get("aforo.decision_id").substring(0, MAX_TEXT),
      headers: headers(s.usageHeaders)
    };
    aforo.set("aforo.usage.body", JSON.stringify(event));
    aforo.setTls("usage", s.sidecarUrl);
    aforo.set("servicecallout.SC-Aforo-Usage.target.url", s.sidecarUrl + "/v1/usage");
    aforo.set("aforo.usage.ready", "true");
  }

  try {
    main();
  } catch (e) {
    // Never a fault for usage: report nothing, leave the reason for the debug session.
    aforo.set("aforo.usage.ready", "false");
    aforo.set("aforo.usage.error", String(e));
  }
})();
