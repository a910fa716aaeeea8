/*
 * JS-Aforo-BuildRequest: the question for POST /integrations/apigee/authorize, from flow
 * variables. Sets aforo.state:
 *   lookup      the body (aforo.authorize.body) and the cache key fragments are ready;
 *   deny        nothing to ask about (401 missing_consumer, 403 unknown_consumer for an id
 *               the sidecar cannot hold, 400 invalid_cost): no callout;
 *   degraded / deny_retry   the flow is not configured (no sidecar_url): fail mode;
 *   off         switched off (enabled=false).
 * ES5 (Rhino). Needs aforo-common.js.
 */
(function () {
  "use strict";

  function consumerId(source) {
    var names = aforo.CONSUMER_SOURCES.app_id;
    if (aforo.CONSUMER_SOURCES.hasOwnProperty(source)) {
      names = aforo.CONSUMER_SOURCES[source];
    }
    var i, value;
    for (i = 0; i < names.length; i++) {
      value = aforo.trim(context.getVariable(names[i]));
      if (value !== "") {
        return value;
      }
    }
    return "";
  }

  function requestId() {
    // messageid is Apigee's unique id of this call: the sidecar counts and charges a
    // request id once, so a replayed decision is never charged twice.
    var id = aforo.get("messageid").replace(/[^\x21-\x7e]/g, "_");
    return id.substring(0, 200);
  }

  function estimatedCost(s) {
    // A cost set by the proxy itself wins, then the configured header, then the setting.
    var value = aforo.trim(context.getVariable("aforo.estimated_cost"));
    if (value === "" && s.costHeader !== "") {
      value = aforo.trim(context.getVariable("request.header." + s.costHeader));
    }
    if (value === "") {
      value = s.estimatedCost;
    }
    return value;
  }

  function main() {
    var s = aforo.settings();
    // Only this flow may flag a call degraded: drop whatever the client sent.
    context.removeVariable("request.header.X-Aforo-Degraded");
    context.removeVariable("request.header.X-Aforo-Degraded-Reason");
    aforo.set("aforo.degraded", "false");
    aforo.set("aforo.fail_mode", s.failMode);
    // Both callouts (authorize, and usage in the PostClientFlow) send it; empty when no
    // token is configured. A private. variable: masked in traces.
    aforo.set("private.aforo.authorization", s.gatewayToken === "" ? "" : "Bearer " + s.gatewayToken);
    if (!s.enabled) {
      aforo.set("aforo.state", "off");
      return;
    }

    var consumer = consumerId(s.consumerIdSource);
    if (consumer === "") {
      aforo.deny(401, "missing_consumer", null, null);
      return;
    }
    if (!aforo.CONSUMER_ID_RE.test(consumer)) {
      // No consumer of the sidecar can have this id: it is unknown, without asking.
      aforo.deny(403, "unknown_consumer", null, null);
      return;
    }

    var product = aforo.get("apiproduct.name") || s.defaultProduct || aforo.get("apiproxy.name");
    var verb = aforo.get("request.verb");
    var suffix = aforo.get("proxy.pathsuffix") || "/";
    var operation = (verb + " " + suffix).substring(0, aforo.MAX_OPERATION);
    var cost = estimatedCost(s);
    var id = requestId();

    aforo.set("aforo.app_id", consumer);
    aforo.set("aforo.api_product", product);
    aforo.set("aforo.operation", operation);
    aforo.set("aforo.tenant", s.tenant);
    aforo.set("aforo.request_id", id);

    if (cost !== "" && !aforo.COST_RE.test(cost)) {
      aforo.deny(400, "invalid_cost", null, null);
      return;
    }
    if (!aforo.TENANT_RE.test(s.tenant) || !aforo.PRODUCT_RE.test(product)) {
      aforo.failMode("sidecar_unavailable", "invalid configuration: tenant or product is not valid");
      return;
    }
    if (s.decisionUrl === "") {
      aforo.failMode("sidecar_unavailable", "sidecar_url is not configured (or not an http(s) URL)");
      return;
    }

    // Built by hand so the cost goes out exactly as written (0.05, not a binary float).
    var body =
      "{\"appId\":" + JSON.stringify(consumer) +
      ",\"apiProduct\":" + JSON.stringify(product) +
      ",\"operation\":" + JSON.stringify(operation) +
      (cost !== "" ? ",\"estimatedCost\":" + cost : "") +
      (aforo.REQUEST_ID_RE.test(id) ? ",\"requestId\":" + JSON.stringify(id) : "") +
      ",\"tenant\":" + JSON.stringify(s.tenant) +
      "}";
    aforo.set("aforo.authorize.body", body);
    aforo.setTls("authorize", s.decisionUrl);
    aforo.set("servicecallout.SC-Aforo-Authorize.target.url", s.decisionUrl + "/integrations/apigee/authorize");
    aforo.set("aforo.state", "lookup");
  }

  try {
    main();
  } catch (e) {
    aforo.failMode("policy_error", "JS-Aforo-BuildRequest: " + e);
  }
})();
