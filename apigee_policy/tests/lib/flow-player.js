"use strict";
// A flow player: plays Apigee bundles (a shared flow, or a proxy that calls shared flows
// with FlowCallout) step by step, in the order and under the conditions their XML files
// declare, executing the real policies:
//
//   Javascript            the bundle's resources/jsc files, in a fresh scope (javascript.js)
//   ServiceCallout        a real HTTP request, with the policy's <Timeout>, success.codes,
//                         Request/Set (headers, verb, templated payload), the
//                         servicecallout.NAME.target.url override and <SSLInfo> (the
//                         environment's truststores and keystores, by name)
//   LookupCache/PopulateCache   an in-memory environment cache with TTLs
//   KeyValueMapOperations Get, from the environment's KVMs given to the player
//   AssignMessage         Set/Add/Remove headers, Set payload and status, AssignVariable
//   RaiseFault            renders FaultResponse into the error response
//   FlowCallout           <Parameters>, then the named shared flow
// and, for a proxy: PreFlow, conditional Flows, PostFlow, the RouteRule's TargetEndpoint
// (a real HTTP call to a TargetServer the player is given), FaultRules, DefaultFaultRule
// and the PostClientFlow after the client has its response.
//
// A policy failure follows continueOnError: true sets {type}.{name}.failed and goes on,
// false raises a fault. A policy type, element or condition the player does not know
// throws: the test fails rather than silently skipping behaviour. Other policy types
// (VerifyAPIKey, ...) must be given as stubs by the test.

const fs = require("node:fs");
const http = require("node:http");
const https = require("node:https");
const path = require("node:path");
const crypto = require("node:crypto");
const { performance } = require("node:perf_hooks");
const { parseXml } = require("./xml");
const { holds } = require("./conditions");
const { FlowContext, Message } = require("./context");
const { runJavascript } = require("./javascript");
const { render, UnresolvedVariable } = require("./template");

/** A policy did not do its job (a callout failed, a script threw, ...). */
class PolicyFailure extends Error {
  constructor(faultName, message, status = 500) {
    super(message);
    this.faultName = faultName;
    this.status = status;
  }
}

/** The flow entered the error flow with this pending error response. */
class RaisedFault extends Error {
  constructor({ faultName, status, headers = {}, content = "", policy = null }) {
    super(`fault ${faultName} (${status}) raised by ${policy || "the runtime"}`);
    this.faultName = faultName;
    this.status = status;
    this.headers = headers;
    this.content = content;
    this.policy = policy;
  }
}

const FAILED_PREFIX = {
  AssignMessage: "assignmessage",
  FlowCallout: "flowcallout",
  Javascript: "javascript",
  KeyValueMapOperations: "keyvaluemap",
  LookupCache: "lookupcache",
  PopulateCache: "populatecache",
  ServiceCallout: "servicecallout",
  VerifyAPIKey: "verifyapikey",
};

/** The environment's shared cache (LookupCache/PopulateCache), entries with a TTL. */
class Cache {
  constructor(clock = Date.now) {
    this.clock = clock;
    this.entries = new Map();
  }

  get(key) {
    const entry = this.entries.get(key);
    if (!entry) return null;
    if (entry.expiresAt <= this.clock()) {
      this.entries.delete(key);
      return null;
    }
    return entry.value;
  }

  put(key, value, ttlSeconds) {
    this.entries.set(key, { value, expiresAt: this.clock() + ttlSeconds * 1000 });
  }

  clear() {
    this.entries.clear();
  }
}

class Bundle {
  constructor(dir) {
    this.dir = dir;
    this.policies = new Map();
    this.files = new Map();
  }

  xml(relative) {
    let element = this.files.get(relative);
    if (!element) {
      const file = path.join(this.dir, relative);
      element = parseXml(fs.readFileSync(file, "utf8"), file);
      this.files.set(relative, element);
    }
    return element;
  }

  policy(name) {
    let element = this.policies.get(name);
    if (!element) {
      element = this.xml(path.join("policies", `${name}.xml`));
      if (element.attrs.name !== name) {
        throw new Error(`policies/${name}.xml names itself ${element.attrs.name}`);
      }
      this.policies.set(name, element);
    }
    return element;
  }
}

function only(element, allowed) {
  for (const child of element.children) {
    if (!allowed.includes(child.name)) {
      throw new Error(`flow player: <${element.name} name="${element.attrs.name || ""}"> has <${child.name}>, which it does not implement`);
    }
  }
}

function successCodes(text) {
  const parts = (text || "1xx,2xx,3xx").split(",").map((p) => p.trim().toLowerCase()).filter(Boolean);
  return (status) =>
    parts.some((p) => (/^[1-5]xx$/.test(p) ? Math.floor(status / 100) === Number(p[0]) : Number(p) === status));
}

const keepAlive = { "http:": new http.Agent({ keepAlive: true, maxSockets: 8 }), "https:": new https.Agent({ keepAlive: true, maxSockets: 8 }) };
const tlsAgents = new Map();

/** A keep-alive agent for TLS options ({ca, cert, key, rejectUnauthorized}), one per set. */
function tlsAgent(options) {
  const id = JSON.stringify(options);
  if (!tlsAgents.has(id)) tlsAgents.set(id, new https.Agent({ keepAlive: true, maxSockets: 8, ...options }));
  return tlsAgents.get(id);
}

/** One HTTP exchange with a total time budget. Resolves {status, headers, content}.
 *  `tls`: the agent options an <SSLInfo> gave for an https URL (null: the defaults). */
function httpExchange(url, { method, headers, content, timeoutMs, tls = null }) {
  return new Promise((resolve, reject) => {
    let target;
    try {
      target = new URL(url);
    } catch (e) {
      reject(new Error(`invalid URL ${url}`));
      return;
    }
    const transport = target.protocol === "https:" ? https : http;
    const body = content ? Buffer.from(content, "utf8") : null;
    const outHeaders = { ...headers };
    if (body) outHeaders["Content-Length"] = String(body.length);
    let settled = false;
    const finish = (fn, v) => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        fn(v);
      }
    };
    const agent = tls && target.protocol === "https:" ? tlsAgent(tls) : keepAlive[target.protocol];
    const req = transport.request(target, { method, headers: outHeaders, agent });
    const timer = timeoutMs
      ? setTimeout(() => {
          const err = new Error("timeout");
          err.code = "TIMEOUT";
          req.destroy(err);
          finish(reject, err);
        }, timeoutMs)
      : null;
    req.on("error", (err) => finish(reject, err));
    req.on("response", (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("error", (err) => finish(reject, err));
      res.on("end", () =>
        finish(resolve, { status: res.statusCode, headers: res.headers, content: Buffer.concat(chunks).toString("utf8") })
      );
    });
    if (body) req.write(body);
    req.end();
  });
}

let messageCounter = 0;

class FlowPlayer {
  /**
   * sharedFlows: {bundleName: dir of its sharedflowbundle/}
   * proxy: dir of an apiproxy/ (for runProxy)
   * environment: {kvms: {map: {key: value}}, propertySets: {set: {key: value}},
   *               targetServers: {name: "http://host:port"},
   *               truststores: {name: PEM}, keystores: {name: {alias: {cert, key}}}}
   * stubs: {PolicyTypeOrName: async (policy, ctx, player) => ...} for policy types the
   *        player does not implement (throw PolicyFailure to fail them).
   */
  constructor({ sharedFlows = {}, proxy = null, environment = {}, stubs = {}, clock = Date.now } = {}) {
    this.sharedFlows = {};
    for (const [name, dir] of Object.entries(sharedFlows)) this.sharedFlows[name] = new Bundle(dir);
    this.proxy = proxy ? new Bundle(proxy) : null;
    this.environment = { kvms: {}, propertySets: {}, targetServers: {}, ...environment };
    this.stubs = stubs;
    this.clock = clock;
    this.cache = new Cache(clock);
    this.handlers = {
      AssignMessage: this.assignMessage.bind(this),
      FlowCallout: this.flowCallout.bind(this),
      Javascript: this.javascript.bind(this),
      KeyValueMapOperations: this.keyValueMap.bind(this),
      LookupCache: this.lookupCache.bind(this),
      PopulateCache: this.populateCache.bind(this),
      RaiseFault: this.raiseFault.bind(this),
      ServiceCallout: this.serviceCallout.bind(this),
    };
  }

  /** A transaction's variables, with the environment's property sets visible. */
  newContext(variables = {}) {
    messageCounter += 1;
    const ctx = new FlowContext({
      messageid: `player-${process.pid}-${messageCounter}-${crypto.randomBytes(4).toString("hex")}`,
      "environment.name": "test",
      "organization.name": "flow-player",
      "system.timestamp": this.clock(),
    });
    for (const [set, values] of Object.entries(this.environment.propertySets || {})) {
      for (const [key, v] of Object.entries(values)) ctx.setVariable(`propertyset.${set}.${key}`, v);
    }
    return ctx;
  }

  // --- flows -------------------------------------------------------------------------

  async runSteps(bundle, steps, ctx, trace) {
    for (const step of steps) {
      only(step, ["Name", "Condition"]);
      await this.executeStep(bundle, step.textAt(["Name"]), step.textAt(["Condition"]), ctx, trace);
    }
  }

  /** Plays sharedflows/default.xml of the shared flow bundle `name`. Throws RaisedFault. */
  async runSharedFlow(name, ctx, trace = []) {
    const bundle = this.sharedFlows[name];
    if (!bundle) throw new Error(`flow player: no shared flow bundle named ${name}`);
    const flow = bundle.xml(path.join("sharedflows", "default.xml"));
    only(flow, ["Step", "Description"]);
    await this.runSteps(bundle, flow.all("Step"), ctx, trace);
    return trace;
  }

  async executeStep(bundle, name, condition, ctx, trace) {
    const policy = bundle.policy(name);
    const type = policy.name;
    const entry = { policy: name, type, condition, executed: false };
    trace.push(entry);
    if (!holds(condition, (n) => ctx.getVariable(n))) return;
    if (policy.attrs.enabled === "false") return;
    entry.executed = true;
    const continueOnError = policy.attrs.continueOnError === "true";
    const started = performance.now();
    try {
      const handler = this.stubs[name] || this.stubs[type] || this.handlers[type];
      if (!handler) throw new Error(`flow player: policy type ${type} (${name}) is not implemented and no stub was given`);
      await handler(policy, ctx, { bundle, entry, trace, player: this });
    } catch (e) {
      if (e instanceof RaisedFault) {
        entry.raised = e.status;
        if (type === "FlowCallout" && continueOnError) return;
        throw e;
      }
      if (!(e instanceof PolicyFailure)) throw e;
      entry.failed = true;
      entry.error = e.message;
      const prefix = FAILED_PREFIX[type] || type.toLowerCase();
      ctx.setVariable(`${prefix}.${name}.failed`, true);
      ctx.setVariable("fault.name", e.faultName);
      ctx.setVariable("error.message", e.message);
      if (continueOnError) return;
      throw new RaisedFault({
        faultName: e.faultName,
        status: e.status,
        headers: { "Content-Type": "application/json" },
        content: JSON.stringify({ fault: { faultstring: e.message, detail: { errorcode: `steps.${prefix}.${e.faultName}` } } }),
        policy: name,
      });
    } finally {
      entry.elapsedMs = performance.now() - started;
    }
  }

  // --- policies ----------------------------------------------------------------------

  async javascript(policy, ctx, { bundle, entry }) {
    only(policy, ["DisplayName", "Properties", "IncludeURL", "ResourceURL"]);
    try {
      entry.printed = runJavascript(bundle.dir, policy, ctx);
    } catch (e) {
      throw new PolicyFailure("ScriptExecutionFailed", `Execution of ${policy.attrs.name} failed with error: Javascript runtime error: ${e.message}`);
    }
  }

  async keyValueMap(policy, ctx) {
    only(policy, ["DisplayName", "Scope", "ExpiryTimeInSecs", "Get", "MapName", "Properties"]);
    const mapName = policy.attrs.mapIdentifier || policy.textAt(["MapName"]);
    const map = (this.environment.kvms || {})[mapName];
    if (!map) throw new PolicyFailure("EntityNotFound", `KeyValueMapOperations ${policy.attrs.name}: no map ${mapName}`);
    for (const get of policy.all("Get")) {
      const key = get.at("Key", "Parameter");
      const keyName = key.attrs.ref ? ctx.getVariable(key.attrs.ref) : key.text.trim();
      if (Object.prototype.hasOwnProperty.call(map, keyName)) ctx.setVariable(get.attrs.assignTo, String(map[keyName]));
    }
  }

  cacheKey(policy, ctx) {
    const key = policy.one("CacheKey");
    only(key, ["Prefix", "KeyFragment"]);
    const parts = [];
    const prefix = key.textAt(["Prefix"]);
    parts.push(prefix || `${policy.textAt(["Scope"], "Exclusive")}`);
    for (const fragment of key.all("KeyFragment")) {
      const v = fragment.attrs.ref ? ctx.getVariable(fragment.attrs.ref) : fragment.text.trim();
      parts.push(v === null ? "" : String(v));
    }
    return parts.join("__");
  }

  async lookupCache(policy, ctx, { entry }) {
    only(policy, ["DisplayName", "Properties", "CacheKey", "CacheResource", "Scope", "AssignTo", "CacheLookupTimeoutInSeconds"]);
    const name = policy.attrs.name;
    const key = this.cacheKey(policy, ctx);
    const v = this.cache.get(key);
    entry.cacheKey = key;
    ctx.setVariable(`lookupcache.${name}.cachehit`, v !== null);
    if (v !== null) ctx.setVariable(policy.textAt(["AssignTo"]), v);
  }

  async populateCache(policy, ctx, { entry }) {
    only(policy, ["DisplayName", "Properties", "CacheKey", "CacheResource", "Scope", "ExpirySettings", "Source"]);
    const source = policy.textAt(["Source"]);
    const v = ctx.getVariable(source);
    if (v === null) throw new PolicyFailure("EntryCannotBeCached", `PopulateCache ${policy.attrs.name}: ${source} is not set`);
    const expiry = policy.one("ExpirySettings");
    only(expiry, ["TimeoutInSeconds"]);
    const timeout = expiry.one("TimeoutInSeconds");
    const fromRef = timeout.attrs.ref ? ctx.getVariable(timeout.attrs.ref) : null;
    const ttl = Number(fromRef !== null ? fromRef : timeout.text.trim());
    if (!Number.isFinite(ttl) || ttl <= 0) throw new PolicyFailure("InvalidTimeout", `PopulateCache ${policy.attrs.name}: bad TTL ${ttl}`);
    const key = this.cacheKey(policy, ctx);
    this.cache.put(key, String(v), ttl);
    entry.cacheKey = key;
    entry.ttl = ttl;
  }

  applyHeaders(element, message, ctx, ignore, how) {
    if (!element) return;
    only(element, ["Header"]);
    for (const header of element.all("Header")) {
      if (how === "remove") message.removeHeader(header.attrs.name);
      else {
        const v = render(header.text, (n) => ctx.getVariable(n), ignore);
        if (how === "add") message.addHeader(header.attrs.name, v);
        else message.setHeader(header.attrs.name, v);
      }
    }
  }

  async assignMessage(policy, ctx) {
    only(policy, ["DisplayName", "Properties", "Set", "Add", "Remove", "AssignVariable", "IgnoreUnresolvedVariables", "AssignTo"]);
    const ignore = policy.textAt(["IgnoreUnresolvedVariables"], "false") === "true";
    const lookup = (n) => ctx.getVariable(n);
    const assignTo = policy.one("AssignTo");
    let message = ctx.message("message");
    if (assignTo) {
      const target = assignTo.text.trim();
      if (assignTo.attrs.createNew === "true") {
        message = ctx.setMessage(target || assignTo.attrs.type || "request", new Message({}));
      } else if (target) {
        message = ctx.message(target);
      }
    }
    if (!message) throw new PolicyFailure("UnresolvedVariable", `AssignMessage ${policy.attrs.name}: no message to assign to`);
    try {
      const set = policy.one("Set");
      if (set) {
        only(set, ["Headers", "Payload", "StatusCode", "ReasonPhrase", "Verb"]);
        this.applyHeaders(set.one("Headers"), message, ctx, ignore, "set");
        const payload = set.one("Payload");
        if (payload) {
          message.content = render(payload.text, lookup, ignore);
          if (payload.attrs.contentType) message.setHeader("Content-Type", payload.attrs.contentType);
        }
        const status = set.one("StatusCode");
        if (status) message.status = Number(render(status.text.trim(), lookup, ignore));
        const verb = set.one("Verb");
        if (verb) message.verb = verb.text.trim();
      }
      const add = policy.one("Add");
      if (add) {
        only(add, ["Headers"]);
        this.applyHeaders(add.one("Headers"), message, ctx, ignore, "add");
      }
      const remove = policy.one("Remove");
      if (remove) {
        only(remove, ["Headers"]);
        this.applyHeaders(remove.one("Headers"), message, ctx, ignore, "remove");
      }
      for (const assign of policy.all("AssignVariable")) {
        only(assign, ["Name", "Value", "Ref", "Template"]);
        let v = assign.textAt(["Value"]);
        const ref = assign.textAt(["Ref"]);
        if (ref && ctx.getVariable(ref) !== null) v = ctx.getVariable(ref);
        const template = assign.textAt(["Template"]);
        if (template) v = render(template, lookup, ignore);
        if (v !== null) ctx.setVariable(assign.textAt(["Name"]), v);
      }
    } catch (e) {
      if (e instanceof UnresolvedVariable) throw new PolicyFailure("UnresolvedVariable", `AssignMessage ${policy.attrs.name}: ${e.message}`);
      throw e;
    }
  }

  async raiseFault(policy, ctx) {
    only(policy, ["DisplayName", "Properties", "IgnoreUnresolvedVariables", "FaultResponse", "ShortFaultReason"]);
    const ignore = policy.textAt(["IgnoreUnresolvedVariables"], "false") === "true";
    const lookup = (n) => ctx.getVariable(n);
    const response = policy.one("FaultResponse");
    only(response, ["Set", "Add"]);
    const message = new Message({ status: 500 });
    const set = response.one("Set");
    if (set) {
      only(set, ["Headers", "Payload", "StatusCode", "ReasonPhrase"]);
      this.applyHeaders(set.one("Headers"), message, ctx, ignore, "set");
      const payload = set.one("Payload");
      if (payload) {
        message.content = render(payload.text, lookup, ignore);
        if (payload.attrs.contentType) message.setHeader("Content-Type", payload.attrs.contentType);
      }
      const status = set.one("StatusCode");
      if (status) message.status = Number(render(status.text.trim(), lookup, ignore));
    }
    const add = response.one("Add");
    if (add) {
      only(add, ["Headers"]);
      this.applyHeaders(add.one("Headers"), message, ctx, ignore, "add");
    }
    if (!Number.isInteger(message.status) || message.status < 100 || message.status > 599) {
      throw new Error(`RaiseFault ${policy.attrs.name} rendered an invalid status ${message.status}`);
    }
    throw new RaisedFault({
      faultName: "RaiseFault",
      status: message.status,
      headers: message.headerObject(),
      content: message.content,
      policy: policy.attrs.name,
    });
  }

  async flowCallout(policy, ctx, { trace }) {
    only(policy, ["DisplayName", "Properties", "Parameters", "SharedFlowBundle"]);
    const parameters = policy.one("Parameters");
    for (const p of parameters ? parameters.all("Parameter") : []) {
      ctx.setVariable(p.attrs.name, p.attrs.ref ? ctx.getVariable(p.attrs.ref) : p.text.trim());
    }
    await this.runSharedFlow(policy.textAt(["SharedFlowBundle"]), ctx, trace);
  }

  async serviceCallout(policy, ctx, { entry }) {
    only(policy, ["DisplayName", "Properties", "Request", "Response", "Timeout", "HTTPTargetConnection"]);
    const name = policy.attrs.name;
    const lookup = (n) => ctx.getVariable(n);
    const requestEl = policy.one("Request");
    only(requestEl, ["IgnoreUnresolvedVariables", "Set"]);
    const ignore = requestEl.textAt(["IgnoreUnresolvedVariables"], "false") === "true";
    const outgoing = new Message({ verb: "GET", headers: {} });
    const set = requestEl.one("Set");
    try {
      if (set) {
        only(set, ["Headers", "Payload", "Verb"]);
        this.applyHeaders(set.one("Headers"), outgoing, ctx, ignore, "set");
        const payload = set.one("Payload");
        if (payload) {
          outgoing.content = render(payload.text, lookup, ignore);
          if (payload.attrs.contentType) outgoing.setHeader("Content-Type", payload.attrs.contentType);
        }
        if (set.one("Verb")) outgoing.verb = set.textAt(["Verb"]);
      }
    } catch (e) {
      if (e instanceof UnresolvedVariable) throw new PolicyFailure("ExecutionFailed", `ServiceCallout ${name}: ${e.message}`);
      throw e;
    }
    if (requestEl.attrs.variable) ctx.setMessage(requestEl.attrs.variable, outgoing);

    const connection = policy.one("HTTPTargetConnection");
    only(connection, ["Properties", "URL", "SSLInfo"]);
    const props = {};
    const propsEl = connection.one("Properties");
    for (const p of propsEl ? propsEl.all("Property") : []) props[p.attrs.name] = p.text.trim();
    const override = ctx.getVariable(`servicecallout.${name}.target.url`);
    const url = override !== null ? String(override) : render(connection.textAt(["URL"]), lookup, true);
    const timeoutMs = Number(policy.textAt(["Timeout"], "55000"));
    const isSuccess = successCodes(props["success.codes"]);
    entry.url = url;
    entry.timeoutMs = timeoutMs;

    const tls = this.sslInfo(connection.one("SSLInfo"), lookup);
    entry.tls = tls ? { clientCertificate: Boolean(tls.cert), truststore: Boolean(tls.ca) } : null;

    let answer;
    try {
      answer = await httpExchange(url, {
        method: outgoing.verb,
        headers: outgoing.headerObject(),
        content: outgoing.content,
        timeoutMs,
        tls,
      });
    } catch (e) {
      entry.transportError = e.code || e.message;
      const reason = e.code === "TIMEOUT" ? `timeout occurred in ${name}` : e.code || e.message;
      throw new PolicyFailure("ExecutionFailed", `Execution of ServiceCallout ${name} failed. Reason: ${reason}`);
    }
    entry.status = answer.status;
    const response = new Message({ status: answer.status, headers: {}, content: answer.content });
    for (const [h, v] of Object.entries(answer.headers)) response.setHeader(h, v);
    const responseName = policy.textAt(["Response"]);
    if (responseName) ctx.setMessage(responseName, response);
    if (!isSuccess(answer.status)) {
      throw new PolicyFailure("ExecutionFailed", `Execution of ServiceCallout ${name} failed. Reason: ResponseCode ${answer.status} is treated as error`);
    }
  }

  /**
   * <SSLInfo> as Apigee reads it (Options for configuring TLS, cloud.google.com/apigee/docs/
   * api-platform/system-administration/options-configuring-tls): each element may be a
   * {flow variable}; Enabled false ignores the block; TrustStore names an environment
   * truststore (the CAs trusted), KeyStore and KeyAlias the client certificate sent when
   * ClientAuthEnabled; Enforce true refuses a certificate that does not verify. The
   * environment's truststores are {name: PEM}, its keystores {name: {alias: {cert, key}}}.
   * Returns agent options for an https URL, or null when the block is absent or disabled.
   */
  sslInfo(element, lookup) {
    if (!element) return null;
    only(element, ["Enabled", "Enforce", "ClientAuthEnabled", "KeyStore", "KeyAlias", "TrustStore", "IgnoreValidationErrors"]);
    const value = (name) => render(element.textAt([name], ""), lookup, true).trim();
    if (value("Enabled") !== "true") return null;
    const options = { rejectUnauthorized: value("Enforce") === "true" || value("IgnoreValidationErrors") !== "true" };
    const truststore = value("TrustStore");
    if (truststore) {
      const ca = (this.environment.truststores || {})[truststore];
      if (!ca) throw new PolicyFailure("ExecutionFailed", `no truststore ${truststore} in the environment`);
      options.ca = ca;
    }
    if (value("ClientAuthEnabled") === "true") {
      const store = (this.environment.keystores || {})[value("KeyStore")] || {};
      const pair = store[value("KeyAlias")];
      if (!pair) throw new PolicyFailure("ExecutionFailed", `no key ${value("KeyAlias")} in keystore ${value("KeyStore")}`);
      options.cert = pair.cert;
      options.key = pair.key;
    }
    return options;
  }

  // --- proxy -------------------------------------------------------------------------

  async runPhase(bundle, endpoint, phase, ctx, trace) {
    const pre = endpoint.one("PreFlow");
    if (pre && pre.one(phase)) await this.runSteps(bundle, pre.one(phase).all("Step"), ctx, trace);
    const flows = endpoint.one("Flows");
    const matched = flows ? flows.all("Flow").find((f) => holds(f.textAt(["Condition"]), (n) => ctx.getVariable(n))) : null;
    if (matched && matched.one(phase)) await this.runSteps(bundle, matched.one(phase).all("Step"), ctx, trace);
    const post = endpoint.one("PostFlow");
    if (post && post.one(phase)) await this.runSteps(bundle, post.one(phase).all("Step"), ctx, trace);
  }

  async callTarget(bundle, target, ctx, exchange) {
    const connection = target.one("HTTPTargetConnection");
    only(connection, ["Properties", "URL", "LoadBalancer", "Path", "SSLInfo"]);
    let base = connection.textAt(["URL"]);
    if (!base) {
      const server = connection.at("LoadBalancer", "Server").attrs.name;
      base = this.environment.targetServers[server];
      if (!base) throw new Error(`flow player: no URL for TargetServer ${server}`);
      base = base.replace(/\/+$/, "") + (connection.textAt(["Path"], "") || "").replace(/\/+$/, "");
    }
    const request = ctx.message("request");
    const suffix = ctx.getVariable("proxy.pathsuffix") || "";
    const query = ctx.getVariable("request.querystring");
    const url = base + suffix + (query ? `?${query}` : "");
    const headers = request.headerObject();
    delete headers.Host;
    delete headers.host;
    delete headers["Content-Length"];
    delete headers["content-length"];
    ctx.setVariable("target.sent.start.timestamp", this.clock());
    exchange.targetRequests.push({ url, verb: request.verb, headers: request.headerObject(), content: request.content });
    let answer;
    try {
      answer = await httpExchange(url, { method: request.verb, headers, content: request.content, timeoutMs: 55000 });
    } catch (e) {
      throw new RaisedFault({
        faultName: "ServiceUnavailable",
        status: 503,
        headers: { "Content-Type": "application/json" },
        content: JSON.stringify({ fault: { faultstring: "The Service is temporarily unavailable", detail: { errorcode: "messaging.adaptors.http.flow.ServiceUnavailable" } } }),
      });
    }
    ctx.setVariable("target.received.end.timestamp", this.clock());
    const response = new Message({ status: answer.status, content: answer.content });
    for (const [h, v] of Object.entries(answer.headers)) response.setHeader(h, v);
    ctx.setMessage("response", response);
    if (answer.status >= 400) {
      throw new RaisedFault({ faultName: "ErrorResponseCode", status: answer.status, headers: response.headerObject(), content: answer.content });
    }
  }

  async runFaultRules(bundle, endpoint, ctx, trace) {
    let handled = false;
    const rules = endpoint.one("FaultRules");
    for (const rule of rules ? rules.all("FaultRule") : []) {
      only(rule, ["Step", "Condition"]);
      if (holds(rule.textAt(["Condition"]), (n) => ctx.getVariable(n))) {
        trace.push({ faultRule: rule.attrs.name, executed: true });
        await this.runSteps(bundle, rule.all("Step"), ctx, trace);
        handled = true;
        break;
      }
    }
    const fallback = endpoint.one("DefaultFaultRule");
    if (fallback && (!handled || fallback.textAt(["AlwaysEnforce"], "false") === "true")) {
      only(fallback, ["Step", "Condition", "AlwaysEnforce"]);
      trace.push({ faultRule: fallback.attrs.name || "DefaultFaultRule", executed: true });
      await this.runSteps(bundle, fallback.all("Step"), ctx, trace);
    }
  }

  /**
   * Plays one request through the proxy. Returns the client's view {status, headers,
   * body} plus {ctx, trace, targetRequests}. request: {verb, path (with the base path),
   * query, headers, body}.
   */
  async runProxy({ verb = "GET", path: requestPath = "/", query = "", headers = {}, body = "" } = {}) {
    if (!this.proxy) throw new Error("flow player: no proxy bundle");
    const bundle = this.proxy;
    const descriptor = fs.readdirSync(bundle.dir).find((f) => f.endsWith(".xml"));
    const proxyName = bundle.xml(descriptor).attrs.name;
    const endpoint = bundle.xml(path.join("proxies", "default.xml"));
    const basePath = endpoint.textAt(["HTTPProxyConnection", "BasePath"]);
    if (!requestPath.startsWith(basePath)) throw new Error(`${requestPath} is not under ${basePath}`);

    const ctx = this.newContext();
    const requestHeaders = { ...headers };
    if (body) requestHeaders["Content-Length"] = String(Buffer.byteLength(body));
    ctx.setMessage("request", new Message({ verb, path: requestPath, headers: requestHeaders, content: body }));
    ctx.current = "request";
    ctx.setVariable("apiproxy.name", proxyName);
    ctx.setVariable("proxy.name", endpoint.attrs.name);
    ctx.setVariable("proxy.basepath", basePath);
    ctx.setVariable("proxy.pathsuffix", requestPath.slice(basePath.length));
    ctx.setVariable("request.querystring", query);
    ctx.setVariable("request.verb", verb);
    ctx.setVariable("client.received.start.timestamp", this.clock());

    const exchange = { ctx, trace: [], targetRequests: [] };
    try {
      await this.runPhase(bundle, endpoint, "Request", ctx, exchange.trace);
      const route = endpoint.all("RouteRule").find((r) => holds(r.textAt(["Condition"]), (n) => ctx.getVariable(n)));
      const targetName = route && route.textAt(["TargetEndpoint"]);
      if (targetName) {
        const target = bundle.xml(path.join("targets", `${targetName}.xml`));
        await this.runPhase(bundle, target, "Request", ctx, exchange.trace);
        await this.callTarget(bundle, target, ctx, exchange);
        ctx.current = "response";
        await this.runPhase(bundle, target, "Response", ctx, exchange.trace);
      } else {
        ctx.setMessage("response", new Message({ status: 200 }));
        ctx.current = "response";
      }
      await this.runPhase(bundle, endpoint, "Response", ctx, exchange.trace);
    } catch (e) {
      if (!(e instanceof RaisedFault)) throw e;
      exchange.fault = e;
      ctx.setMessage("error", new Message({ status: e.status, headers: e.headers, content: e.content }));
      ctx.current = "error";
      ctx.setVariable("fault.name", e.faultName);
      ctx.setVariable("is.error", true);
      try {
        await this.runFaultRules(bundle, endpoint, ctx, exchange.trace);
      } catch (inner) {
        if (!(inner instanceof RaisedFault)) throw inner;
        ctx.setMessage("error", new Message({ status: inner.status, headers: inner.headers, content: inner.content }));
      }
    }

    // The client gets its answer here; Apigee adds Content-Length as it sends it.
    const out = ctx.message(ctx.current);
    out.setHeader("Content-Length", String(Buffer.byteLength(out.content || "")));
    exchange.status = out.status;
    exchange.headers = out.headerObject();
    exchange.body = out.content;
    ctx.setVariable("client.sent.start.timestamp", this.clock());
    ctx.setVariable("client.sent.end.timestamp", this.clock());

    const postClient = endpoint.one("PostClientFlow");
    if (postClient && postClient.one("Response")) {
      try {
        await this.runSteps(bundle, postClient.one("Response").all("Step"), ctx, exchange.trace);
      } catch (e) {
        // Nothing can change the client's answer any more; Apigee logs and drops it.
        if (!(e instanceof RaisedFault)) throw e;
        exchange.postClientFault = e;
      }
    }
    return exchange;
  }

  /** Plays the shared flow alone on a fresh transaction with `variables` set. */
  async playSharedFlow(name, variables = {}, requestInit = {}) {
    const ctx = this.newContext();
    ctx.setMessage("request", new Message({ verb: requestInit.verb || "GET", headers: requestInit.headers || {}, content: requestInit.body || "" }));
    for (const [k, v] of Object.entries(variables)) ctx.setVariable(k, v);
    const result = { ctx, trace: [] };
    try {
      await this.runSharedFlow(name, ctx, result.trace);
    } catch (e) {
      if (!(e instanceof RaisedFault)) throw e;
      result.fault = e;
    }
    return result;
  }
}

/** The trace entries of `policy` that executed. */
function executed(trace, policy) {
  return trace.filter((t) => t.policy === policy && t.executed);
}

module.exports = { Cache, FlowPlayer, PolicyFailure, RaisedFault, executed, httpExchange };
