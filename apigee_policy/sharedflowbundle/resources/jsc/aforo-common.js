/*
 * aforo-common.js: helpers shared by the JavaScript policies of the aforo-authorize shared
 * flow (each policy includes it with <IncludeURL>). ES5 only: Apigee Edge runs these on
 * Rhino (no let/const, no arrow functions, no template strings, no ES2015 library calls).
 *
 * Settings come, for each name, from the first of these that is set and not blank:
 *   1. the flow variable aforo.config.NAME (set by the calling proxy, e.g. a FlowCallout
 *      <Parameter> or an AssignMessage <AssignVariable>);
 *   2. propertyset.aforo.NAME (an Apigee X/hybrid property set named "aforo");
 *   3. aforo.kvm.NAME (read by KVM-Aforo-Config from the environment KVM "aforo-config");
 *   4. the default below.
 */
var aforo = (function () {
  "use strict";

  var DEFAULTS = {
    enabled: "true",
    sidecar_url: "",
    decision_url: "",
    fail_mode: "open",
    tenant: "default",
    consumer_id_source: "app_id",
    default_product: "",
    estimated_cost: "",
    cost_header: "",
    usage: "true",
    usage_headers: "user-agent",
    // TLS to an https:// sidecar (the ServiceCallouts' <SSLInfo>): the names of an
    // environment truststore holding the CA that signed the sidecar's certificate, and of
    // a keystore and its alias for the client certificate of a sidecar requiring mutual TLS.
    tls_truststore: "",
    tls_keystore: "",
    tls_key_alias: ""
  };

  // The sidecar's own validation rules (sidecar/core/models.py): a value it would refuse
  // with 400 must be caught here, or fail mode "open" would let such a request through.
  var TENANT_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
  var CONSUMER_ID_RE = /^[A-Za-z0-9._~@:+=\/-]{1,200}$/;
  var PRODUCT_RE = /^[^\s|{}\x00-\x1f\x7f]{1,200}$/;
  var REQUEST_ID_RE = /^[\x21-\x7e]{1,200}$/;
  // Currency units with at most 6 decimals; at most 9 integer digits keeps the amount in
  // micro-units below the sidecar's ceiling (2^53 - 1).
  var COST_RE = /^[0-9]{1,9}(\.[0-9]{1,6})?$/;
  var MAX_OPERATION = 512;

  var CONSUMER_SOURCES = {
    app_id: ["developer.app.id", "client_id"],
    client_id: ["client_id"],
    app_name: ["developer.app.name"],
    developer_email: ["developer.email"]
  };

  // Same wording as the Kong plugin, so clients see one vocabulary whatever the gateway.
  var MESSAGES = {
    quota_exceeded: "API quota exceeded",
    insufficient_balance: "Insufficient balance",
    suspended: "Consumer suspended",
    revoked: "Consumer revoked",
    unknown_consumer: "Unknown consumer",
    invalid_key: "Invalid API key",
    key_expired: "API key expired",
    scope_denied: "API key not allowed for this product",
    product_not_allowed: "Product not included in the plan",
    store_unavailable: "Quota service unavailable",
    sidecar_unavailable: "Quota service unavailable",
    missing_consumer: "No consumer identified",
    invalid_cost: "Invalid cost",
    policy_error: "Quota policy error"
  };

  // Headers that carry credentials never leave the gateway in a usage event.
  var SECRET_HEADERS = {
    authorization: true,
    "proxy-authorization": true,
    cookie: true,
    "set-cookie": true,
    "x-api-key": true,
    apikey: true
  };

  function text(value) {
    if (value === null || value === undefined) {
      return "";
    }
    return String(value);
  }

  function trim(value) {
    return text(value).replace(/^\s+|\s+$/g, "");
  }

  function get(name) {
    return text(context.getVariable(name));
  }

  function set(name, value) {
    context.setVariable(name, value);
  }

  function setting(name) {
    var sources = ["aforo.config.", "propertyset.aforo.", "aforo.kvm."];
    var i, value;
    for (i = 0; i < sources.length; i++) {
      value = trim(context.getVariable(sources[i] + name));
      if (value !== "") {
        return value;
      }
    }
    return DEFAULTS.hasOwnProperty(name) ? DEFAULTS[name] : "";
  }

  function flag(value, fallback) {
    var v = trim(value).toLowerCase();
    if (v === "true" || v === "yes" || v === "on" || v === "1") {
      return true;
    }
    if (v === "false" || v === "no" || v === "off" || v === "0") {
      return false;
    }
    return fallback;
  }

  function baseUrl(value) {
    var url = trim(value).replace(/\/+$/, "");
    return /^https?:\/\/[^\s\/]+(\/\S*)?$/.test(url) ? url : "";
  }

  function settings() {
    var failMode = setting("fail_mode").toLowerCase();
    var sidecar = baseUrl(setting("sidecar_url"));
    var decision = baseUrl(setting("decision_url"));
    return {
      enabled: flag(setting("enabled"), true),
      sidecarUrl: sidecar,
      decisionUrl: decision || sidecar,
      // Anything but "closed" is open, the default (as in the Kong plugin).
      failOpen: failMode !== "closed",
      failMode: failMode === "closed" ? "closed" : "open",
      tenant: setting("tenant"),
      consumerIdSource: setting("consumer_id_source"),
      defaultProduct: setting("default_product"),
      estimatedCost: setting("estimated_cost"),
      costHeader: setting("cost_header"),
      usage: flag(setting("usage"), true),
      usageHeaders: setting("usage_headers"),
      // From the encrypted KVM aforo-secrets (KVM-Aforo-Secrets), never from settings.
      gatewayToken: trim(context.getVariable("private.aforo.gateway_token"))
    };
  }

  /* The <SSLInfo> of the ServiceCallout NAME (SC-Aforo-Authorize, SC-Aforo-Usage), from
     flow variables (Apigee resolves {variables} in SSLInfo): TLS for an https:// URL only,
     with the configured truststore, and a client certificate when a keystore and an alias
     are both configured. Apigee's own default (TLS when the URL is https) would look at
     the policy's placeholder URL, not at the one set here. */
  function setTls(name, url) {
    var truststore = setting("tls_truststore");
    var keystore = setting("tls_keystore");
    var alias = setting("tls_key_alias");
    var prefix = "aforo.tls." + name + ".";
    set(prefix + "enabled", /^https:/.test(url) ? "true" : "false");
    set(prefix + "client_auth", keystore !== "" && alias !== "" ? "true" : "false");
    set("aforo.tls.truststore", truststore);
    set("aforo.tls.keystore", keystore);
    set("aforo.tls.key_alias", alias);
  }

  function message(reason) {
    return MESSAGES.hasOwnProperty(reason) ? MESSAGES[reason] : "Request not allowed";
  }

  /* End the call: RF-Aforo-Deny (or RF-Aforo-DenyRetryAfter with a retryAfter) raises the
     fault with this status and body. */
  function deny(status, reason, decisionId, retryAfter) {
    var body = { message: message(reason), reason: reason };
    if (decisionId) {
      body.decision_id = decisionId;
    }
    if (retryAfter !== null && retryAfter !== undefined) {
      body.retry_after = retryAfter;
      set("aforo.retry_after", String(retryAfter));
    }
    set("aforo.reason", reason);
    set("aforo.fault.status", String(status));
    set("aforo.fault.body", JSON.stringify(body));
    set("aforo.state", retryAfter !== null && retryAfter !== undefined ? "deny_retry" : "deny");
  }

  /* No usable decision: follow the fail mode. open lets the call through flagged
     (AM-Aforo-FlagDegraded), closed answers 503 (500 for a failure of this flow itself). */
  function failMode(reason, detail) {
    var s = settings();
    set("aforo.error", detail);
    set("aforo.source", "fail_mode");
    if (s.failOpen) {
      set("aforo.reason", reason);
      set("aforo.degraded", "true");
      set("aforo.state", "degraded");
    } else if (reason === "policy_error") {
      deny(500, reason, null, null);
    } else {
      deny(503, reason, null, 1);
    }
  }

  return {
    COST_RE: COST_RE,
    CONSUMER_ID_RE: CONSUMER_ID_RE,
    CONSUMER_SOURCES: CONSUMER_SOURCES,
    MAX_OPERATION: MAX_OPERATION,
    PRODUCT_RE: PRODUCT_RE,
    REQUEST_ID_RE: REQUEST_ID_RE,
    SECRET_HEADERS: SECRET_HEADERS,
    TENANT_RE: TENANT_RE,
    deny: deny,
    failMode: failMode,
    flag: flag,
    get: get,
    message: message,
    set: set,
    setTls: setTls,
    setting: setting,
    settings: settings,
    text: text,
    trim: trim
  };
})();
