"use strict";
// Renders the sidecar's OpenAPI document (/openapi.json) as a list of operations by tag,
// each with its roles, parameters, request body and responses, schemas resolved.
// Written for this page: it loads nothing but /openapi.json from the same sidecar.

(function () {
  const METHODS = ["get", "put", "post", "delete", "patch"];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A schema with its $refs replaced by the components they name (cycles cut short).
  function resolve(schema, components, seen) {
    if (Array.isArray(schema)) return schema.map((s) => resolve(s, components, seen));
    if (!schema || typeof schema !== "object") return schema;
    if (typeof schema.$ref === "string") {
      const name = schema.$ref.split("/").pop();
      if (seen.includes(name)) return { $ref: name };
      return resolve(components[name] || {}, components, seen.concat([name]));
    }
    const out = {};
    for (const [k, v] of Object.entries(schema)) out[k] = resolve(v, components, seen);
    return out;
  }

  function schemaBlock(schema, components) {
    return el("pre", {}, JSON.stringify(resolve(schema, components, []), null, 2));
  }

  function operation(path, method, op, components) {
    const body = el("div", { class: "body" });
    if (op.description) body.append(el("p", { class: "roles" }, op.description));
    if (!op.security || op.security.length === 0) body.append(el("p", { class: "roles" }, "No credentials."));
    const params = op.parameters || [];
    if (params.length) {
      const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "schema"), el("th", {}, "meaning")));
      for (const p of params) {
        table.append(el("tr", {}, el("td", {}, p.name + (p.required ? " *" : "")), el("td", {}, p.in), el("td", {}, JSON.stringify(p.schema)), el("td", {}, p.description || "")));
      }
      body.append(el("h4", {}, "Parameters"), table);
    }
    const request = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
    if (request) body.append(el("h4", {}, "Request body" + (op.requestBody.required ? "" : " (optional)")), schemaBlock(request.schema, components));
    body.append(el("h4", {}, "Responses"));
    for (const [status, answer] of Object.entries(op.responses || {})) {
      body.append(el("p", {}, el("strong", {}, status), " " + (answer.description || "")));
      for (const [media, content] of Object.entries(answer.content || {})) {
        if (status.startsWith("2")) body.append(el("div", {}, media), schemaBlock(content.schema, components));
      }
    }
    const head = el("summary", {}, el("span", { class: "method " + method }, method.toUpperCase()), path, el("span", { class: "text" }, op.summary || ""));
    const item = el("details", {}, head, body);
    item.dataset.search = [path, method, op.summary || "", (op.tags || []).join(" ")].join(" ").toLowerCase();
    return item;
  }

  // The gRPC API (x-grpc: the services, their methods, the messages' fields).
  function grpc(api) {
    const out = [el("h2", {}, "gRPC")];
    const message = (name) => {
      const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "#"), el("th", {}, "type")));
      for (const f of api.messages[name] || []) {
        table.append(el("tr", {}, el("td", {}, f.name), el("td", {}, f.number), el("td", {}, (f.repeated ? "repeated " : "") + f.type)));
      }
      return el("div", {}, el("h4", {}, name), table);
    };
    for (const service of api.services) {
      for (const m of service.methods) {
        const input = (m.client_streaming ? "stream " : "") + m.input;
        const output = (m.server_streaming ? "stream " : "") + m.output;
        const head = el("summary", {}, el("span", { class: "method post" }, "RPC"), service.name + "/" + m.name, el("span", { class: "text" }, input + " -> " + output));
        const item = el("details", {}, head, el("div", { class: "body" }, el("p", {}, "Defined in " + service.file + "."), message(m.input), message(m.output)));
        item.dataset.search = [service.name, m.name, m.input, m.output, "grpc"].join(" ").toLowerCase();
        out.push(item);
      }
    }
    const all = el("details", {}, el("summary", {}, "Every message"), el("div", { class: "body" }, ...Object.keys(api.messages).sort().map(message)));
    all.dataset.search = "grpc messages " + Object.keys(api.messages).join(" ").toLowerCase();
    out.push(all);
    return out;
  }

  function render(doc) {
    const root = document.getElementById("api");
    root.textContent = "";
    const components = (doc.components && doc.components.schemas) || {};
    const byTag = new Map();
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        const op = item[method];
        if (!op) continue;
        const tag = (op.tags && op.tags[0]) || "other";
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push(operation(path, method, op, components));
      }
    }
    root.append(el("p", {}, (doc.info && doc.info.description) || ""));
    for (const [tag, items] of byTag) root.append(el("h2", {}, tag), ...items);
    if (doc["x-grpc"]) root.append(...grpc(doc["x-grpc"]));
    document.getElementById("filter").addEventListener("input", (event) => {
      const words = event.target.value.toLowerCase().split(/\s+/).filter(Boolean);
      for (const item of root.querySelectorAll("details")) {
        item.hidden = !words.every((w) => item.dataset.search.includes(w));
      }
    });
  }

  fetch("/openapi.json")
    .then((response) => {
      if (!response.ok) throw new Error("GET /openapi.json answered " + response.status);
      return response.json();
    })
    .then(render)
    .catch((error) => {
      document.getElementById("status").textContent = "Could not load the contract: " + error.message;
    });
})();
