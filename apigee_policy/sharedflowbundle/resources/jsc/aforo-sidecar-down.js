/*
 * JS-Aforo-SidecarDown: runs only when SC-Aforo-Authorize failed, i.e. the sidecar did not
 * answer at all (connection refused or reset, DNS failure, <Timeout> passed). The callout
 * has continueOnError="true", so the flow reaches this step instead of the error flow, and
 * the fail mode decides: open lets the call through flagged (X-Aforo-Degraded), closed
 * raises 503 sidecar_unavailable with Retry-After: 1.
 * ES5 (Rhino). Needs aforo-common.js.
 */
(function () {
  "use strict";

  try {
    var why = aforo.get("error.message") || aforo.get("fault.name") || "no answer";
    aforo.failMode("sidecar_unavailable", "SC-Aforo-Authorize failed: " + why);
  } catch (e) {
    aforo.failMode("policy_error", "JS-Aforo-SidecarDown: " + e);
  }
})();
