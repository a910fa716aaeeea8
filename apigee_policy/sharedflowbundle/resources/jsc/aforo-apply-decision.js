/*
 * JS-Aforo-ApplyDecision: reads the decision and sets aforo.state.
 *
 * The decision comes from LC-Aforo-Decision (a hit: a denial cached earlier) or from
 * SC-Aforo-Authorize (aforo.authorize.response). The sidecar answers
 *   {allow, reason, ttl_seconds, remainingBalance, status, retryAfter, decisionId, degraded}
 * with the HTTP status equal to "status" (200, 401, 402, 403, 429; 503 when its own fail
 * mode is closed). Anything else (an error body, a proxy's 502 page, a status that does
 * not match) is not a decision: the fail mode applies, as when the sidecar is down.
 *
 * A fresh denial with ttl_seconds > 0 is handed to PC-Aforo-Decision (aforo.cache.*).
 * Allows always carry ttl_seconds 0: they are never cached, since every allowed call
 * must be counted and charged by the sidecar.
 * ES5 (Rhino). Needs aforo-common.js.
 */
(function () {
  "use strict";

  var CACHE_VERSION = 1;

  function isInt(value) {
    return typeof value === "number" && isFinite(value) && Math.floor(value) === value;
  }

  /* The exact text of remainingBalance (9.95 stays 9.95, never 9.950000000000001). */
  function rawBalance(content) {
    var match = /"remainingBalance"\s*:\s*(-?[0-9][0-9.eE+\-]*|null)/.exec(content);
    return match && match[1] !== "null" ? match[1] : "";
  }

  /* The decision in content, or null when content is not one answered with httpStatus. */
  function parseDecision(content, httpStatus) {
    var d;
    try {
      d = JSON.parse(content);
    } catch (e) {
      return null;
    }
    if (d === null || typeof d !== "object") {
      return null;
    }
    if (typeof d.allow !== "boolean" || typeof d.reason !== "string" || !isInt(d.status)) {
      return null;
    }
    if (!isInt(d.ttl_seconds) || d.ttl_seconds < 0 || typeof d.decisionId !== "string") {
      return null;
    }
    if (d.retryAfter !== null && d.retryAfter !== undefined && (!isInt(d.retryAfter) || d.retryAfter < 0)) {
      return null;
    }
    if (d.status !== httpStatus || (d.allow ? d.status !== 200 : d.status < 400 || d.status > 599)) {
      return null;
    }
    return {
      allow: d.allow,
      reason: d.reason,
      status: d.status,
      ttl: d.ttl_seconds,
      retryAfter: isInt(d.retryAfter) ? d.retryAfter : null,
      decisionId: d.decisionId,
      degraded: d.degraded === true,
      balance: rawBalance(content)
    };
  }

  function enforce(d, ageSeconds) {
    aforo.set("aforo.reason", d.reason);
    aforo.set("aforo.decision_id", d.decisionId);
    aforo.set("aforo.remaining_balance", d.balance);
    if (d.allow) {
      if (d.degraded) {
        // The sidecar allowed without its store (its own fail mode open): flag it too.
        aforo.set("aforo.degraded", "true");
      }
      aforo.set("aforo.state", "allow");
      return;
    }
    var retryAfter = null;
    if (d.retryAfter !== null) {
      // A cached denial has aged: the client may retry that much sooner.
      retryAfter = Math.max(1, d.retryAfter - ageSeconds);
    }
    aforo.deny(d.status, d.reason, d.decisionId, retryAfter);
  }

  function fromCache() {
    var entry;
    try {
      entry = JSON.parse(aforo.get("aforo.cache.hit_entry"));
    } catch (e) {
      entry = null;
    }
    if (!entry || entry.v !== CACHE_VERSION || !entry.decision || !isInt(entry.cachedAtMs)) {
      aforo.failMode("sidecar_unavailable", "unreadable cache entry");
      return;
    }
    var d = entry.decision;
    if (d.allow !== false || !isInt(d.status)) {
      // Only denials are ever written; anything else is not trusted.
      aforo.failMode("sidecar_unavailable", "unexpected cache entry");
      return;
    }
    aforo.set("aforo.source", "cache");
    var age = Math.max(0, Math.floor((new Date().getTime() - entry.cachedAtMs) / 1000));
    enforce(d, age);
  }

  function fromSidecar() {
    var status = parseInt(aforo.get("aforo.authorize.response.status.code"), 10);
    var content = aforo.get("aforo.authorize.response.content");
    var d = parseDecision(content, status);
    if (d === null) {
      aforo.failMode("sidecar_unavailable", "the sidecar answered HTTP " + status + " without a decision");
      return;
    }
    aforo.set("aforo.source", "sidecar");
    enforce(d, 0);
    if (!d.allow && !d.degraded && d.ttl > 0) {
      aforo.set(
        "aforo.cache.entry",
        JSON.stringify({ v: CACHE_VERSION, cachedAtMs: new Date().getTime(), decision: d })
      );
      aforo.set("aforo.cache.ttl", String(d.ttl));
      aforo.set("aforo.cache.populate", "true");
    }
  }

  try {
    if (aforo.get("lookupcache.LC-Aforo-Decision.cachehit") === "true") {
      fromCache();
    } else {
      fromSidecar();
    }
  } catch (e) {
    aforo.failMode("policy_error", "JS-Aforo-ApplyDecision: " + e);
  }
})();
