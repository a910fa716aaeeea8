"use strict";
// Runs a bundle's JavaScript policy the way Apigee does: the <IncludeURL> files, then the
// <ResourceURL> file, evaluated in order in one fresh global scope per execution, with
// `context` (getVariable/setVariable/removeVariable), `print`, `properties` (the policy's
// <Properties>) and the standard built-ins. The scripts are the real files under
// resources/jsc; nothing is stubbed but the Apigee host objects.

const fs = require("node:fs");
const path = require("node:path");
const vm = require("node:vm");
const { parseXml } = require("./xml");

const scripts = new Map();

function compiled(file) {
  let script = scripts.get(file);
  if (!script) {
    script = new vm.Script(fs.readFileSync(file, "utf8"), { filename: file });
    scripts.set(file, script);
  }
  return script;
}

function resourceFile(bundleDir, url) {
  const match = /^jsc:\/\/(.+)$/.exec(url.trim());
  if (!match) throw new Error(`unsupported resource URL ${url} (only jsc:// is)`);
  return path.join(bundleDir, "resources", "jsc", match[1]);
}

/** The files and settings of a <Javascript> policy element. */
function describe(bundleDir, policy) {
  if (policy.name !== "Javascript") throw new Error(`<${policy.name}> is not a Javascript policy`);
  const includes = policy.all("IncludeURL").map((el) => resourceFile(bundleDir, el.text));
  const resource = policy.one("ResourceURL");
  if (!resource) throw new Error(`${policy.attrs.name}: no <ResourceURL> (inline <Source> is not used here)`);
  const properties = {};
  const props = policy.one("Properties");
  for (const prop of props ? props.all("Property") : []) properties[prop.attrs.name] = prop.text;
  const timeLimit = policy.attrs.timeLimit ? Number(policy.attrs.timeLimit) : null;
  return { name: policy.attrs.name, files: [...includes, resourceFile(bundleDir, resource.text)], properties, timeLimit };
}

/**
 * Executes the policy against `flowContext` (a FlowContext). Returns the printed lines;
 * throws what the script throws (the caller decides what a failed policy means).
 */
function runJavascript(bundleDir, policy, flowContext) {
  const spec = describe(bundleDir, policy);
  const printed = [];
  const sandbox = vm.createContext({
    context: flowContext.scriptApi(),
    properties: { ...spec.properties },
    print: (...args) => printed.push(args.join(" ")),
  });
  // Apigee Edge's Rhino honours timeLimit; a generous floor keeps a loaded test machine
  // from turning a slow start into a failure.
  const timeout = spec.timeLimit ? Math.max(spec.timeLimit, 2000) : undefined;
  for (const file of spec.files) compiled(file).runInContext(sandbox, { timeout });
  return printed;
}

/** Loads a policy file of a bundle: parseXml of policies/NAME.xml. */
function loadPolicy(bundleDir, name) {
  const file = path.join(bundleDir, "policies", `${name}.xml`);
  return parseXml(fs.readFileSync(file, "utf8"), file);
}

module.exports = { describe, loadPolicy, runJavascript };
