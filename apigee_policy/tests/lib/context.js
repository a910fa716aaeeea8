"use strict";
// The flow variables of one Apigee transaction, as the JavaScript object model's `context`
// shows them (getVariable / setVariable / removeVariable), including message variables:
// request, response, error, message and the messages ServiceCallout policies create
// (<Response>name</Response>): NAME.status.code, NAME.content, NAME.header.H (first value),
// NAME.header.H.values.string (all values), NAME.headers.names, NAME.verb, ...
// Header names are case-insensitive, as in Apigee. An unset variable reads as null.

class Message {
  constructor({ verb = null, path = null, status = null, headers = {}, content = "" } = {}) {
    this.verb = verb;
    this.path = path;
    this.status = status;
    this.headers = new Map();
    for (const [name, v] of Object.entries(headers)) this.setHeader(name, v);
    this.content = content;
  }

  setHeader(name, v) {
    this.headers.set(name.toLowerCase(), { name, values: Array.isArray(v) ? v.map(String) : [String(v)] });
  }

  addHeader(name, v) {
    const entry = this.headers.get(name.toLowerCase());
    if (entry) entry.values.push(String(v));
    else this.setHeader(name, v);
  }

  removeHeader(name) {
    this.headers.delete(name.toLowerCase());
  }

  header(name) {
    const entry = this.headers.get(name.toLowerCase());
    return entry ? entry.values.join(", ") : null;
  }

  /** Headers as a plain object (original spelling of each name, values joined). */
  headerObject() {
    const out = {};
    for (const { name, values } of this.headers.values()) out[name] = values.join(", ");
    return out;
  }

  get(property) {
    if (property.startsWith("header.")) {
      const rest = property.slice(7);
      for (const suffix of [".values.string", ".values.count", ".values"]) {
        if (rest.endsWith(suffix)) {
          const entry = this.headers.get(rest.slice(0, -suffix.length).toLowerCase());
          if (!entry) return null;
          if (suffix === ".values.count") return entry.values.length;
          return suffix === ".values" ? entry.values.slice() : entry.values.join(", ");
        }
      }
      const entry = this.headers.get(rest.toLowerCase());
      // Apigee splits a header on commas and answers the first part.
      return entry ? entry.values[0].split(",")[0].trim() : null;
    }
    switch (property) {
      case "content":
        return this.content;
      case "status.code":
        return this.status;
      case "verb":
        return this.verb;
      case "path":
        return this.path;
      case "headers.count":
        return this.headers.size;
      case "headers.names":
        return [...this.headers.values()].map((e) => e.name);
      case "headers.names.string":
        return [...this.headers.values()].map((e) => e.name).join(",");
      default:
        return undefined;
    }
  }

  set(property, v) {
    if (property.startsWith("header.")) {
      this.setHeader(property.slice(7), v);
      return true;
    }
    switch (property) {
      case "content":
        this.content = v === null ? "" : String(v);
        return true;
      case "status.code":
        this.status = Number(v);
        return true;
      case "verb":
        this.verb = String(v);
        return true;
      default:
        return false;
    }
  }

  remove(property) {
    if (property.startsWith("header.")) {
      this.removeHeader(property.slice(7));
      return true;
    }
    return false;
  }
}

class FlowContext {
  constructor(variables = {}) {
    this.vars = new Map();
    this.messages = new Map();
    // Which message "message" means: request, response or error, by flow phase.
    this.current = "request";
    for (const [name, v] of Object.entries(variables)) this.setVariable(name, v);
  }

  setMessage(name, message) {
    this.messages.set(name, message);
    return message;
  }

  message(name) {
    return this.messages.get(name === "message" ? this.current : name) || null;
  }

  /** [message, property] for a name under a message variable, or null. */
  _split(name) {
    const dotted = name.split(".");
    for (let cut = dotted.length - 1; cut >= 1; cut -= 1) {
      const head = dotted.slice(0, cut).join(".");
      const msg = this.message(head);
      if (msg) return [msg, dotted.slice(cut).join(".")];
    }
    return null;
  }

  getVariable(name) {
    if (this.vars.has(name)) return this.vars.get(name);
    const split = this._split(name);
    if (split) {
      const v = split[0].get(split[1]);
      return v === undefined ? null : v;
    }
    return null;
  }

  setVariable(name, v) {
    const split = this._split(name);
    if (split && split[0].set(split[1], v)) return;
    this.vars.set(name, v);
  }

  removeVariable(name) {
    const split = this._split(name);
    if (split && split[0].remove(split[1])) return;
    this.vars.delete(name);
  }

  /** The object handed to JavaScript policies as `context`. */
  scriptApi() {
    return {
      getVariable: (name) => this.getVariable(String(name)),
      setVariable: (name, v) => {
        if (v !== null && typeof v === "object") {
          // Apigee stores primitives (and Java objects); a JS object would become "[object Object]".
          throw new TypeError(`setVariable(${name}): objects are not flow variable values`);
        }
        this.setVariable(String(name), v);
      },
      removeVariable: (name) => this.removeVariable(String(name)),
    };
  }
}

module.exports = { FlowContext, Message };
