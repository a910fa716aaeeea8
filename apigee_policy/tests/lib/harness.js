"use strict";
// Runs one JavaScript policy of the shared flow against a fresh Apigee-like context, for
// the unit tests of the resources.

const path = require("node:path");
const { FlowContext, Message } = require("./context");
const { loadPolicy, runJavascript } = require("./javascript");

const ROOT = path.resolve(__dirname, "..", "..");
const SHARED_FLOW = path.join(ROOT, "sharedflowbundle");
const PROXY = path.join(ROOT, "apiproxy");

/**
 * A context holding `vars`, with a request message ({verb, headers, content}) and, when
 * given, other messages ({name: {status, headers, content}}).
 */
function makeContext(vars = {}, { request = {}, messages = {} } = {}) {
  const ctx = new FlowContext();
  ctx.setMessage("request", new Message({ verb: "GET", ...request }));
  for (const [name, init] of Object.entries(messages)) ctx.setMessage(name, new Message(init));
  for (const [name, v] of Object.entries(vars)) ctx.setVariable(name, v);
  return ctx;
}

/** Runs policies/NAME.xml of the shared flow (its IncludeURLs and ResourceURL) on ctx. */
function runPolicy(name, ctx) {
  return runJavascript(SHARED_FLOW, loadPolicy(SHARED_FLOW, name), ctx);
}

module.exports = { PROXY, ROOT, SHARED_FLOW, makeContext, runPolicy };
