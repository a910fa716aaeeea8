"use strict";
// The bundles hang together (every step names a policy file, the descriptors list exactly
// the policies and resources present, every condition parses), the JavaScript resources
// stay ES5 for Rhino, and the player's own building blocks (XML reader, conditions, cache)
// behave as Apigee does.

const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { parseXml } = require("../lib/xml");
const { holds, parse } = require("../lib/conditions");
const { Cache } = require("../lib/flow-player");
const { PROXY, SHARED_FLOW } = require("../lib/harness");

const read = (file) => parseXml(fs.readFileSync(file, "utf8"), file);
const list = (dir, ext) => fs.readdirSync(dir).filter((f) => f.endsWith(ext)).sort();

function descendants(element, name, out = []) {
  for (const child of element.children) {
    if (child.name === name) out.push(child);
    descendants(child, name, out);
  }
  return out;
}

function checkBundle(dir, rootName, flowFiles) {
  const descriptors = list(dir, ".xml");
  assert.equal(descriptors.length, 1, `one descriptor in ${dir}`);
  const descriptor = read(path.join(dir, descriptors[0]));
  assert.equal(descriptor.name, rootName);
  assert.equal(`${descriptor.attrs.name}.xml`, descriptors[0]);

  const policyFiles = list(path.join(dir, "policies"), ".xml").map((f) => f.slice(0, -4));
  const listed = descendants(descriptor, "Policy").map((p) => p.text.trim()).sort();
  assert.deepEqual(listed, policyFiles, "the descriptor lists exactly the policy files");
  for (const name of policyFiles) {
    assert.equal(read(path.join(dir, "policies", `${name}.xml`)).attrs.name, name, `policies/${name}.xml`);
  }

  const jsc = path.join(dir, "resources", "jsc");
  const resources = fs.existsSync(jsc) ? list(jsc, ".js").map((f) => `jsc://${f}`) : [];
  assert.deepEqual(descendants(descriptor, "Resource").map((r) => r.text.trim()).sort(), resources);
  for (const name of policyFiles) {
    const policy = read(path.join(dir, "policies", `${name}.xml`));
    for (const url of [...policy.all("IncludeURL"), ...policy.all("ResourceURL")]) {
      assert.ok(resources.includes(url.text.trim()), `${name}: ${url.text} exists`);
    }
  }

  const used = new Set();
  for (const file of flowFiles) {
    const flow = read(path.join(dir, file));
    for (const step of descendants(flow, "Step")) {
      const name = step.textAt(["Name"]);
      assert.ok(policyFiles.includes(name), `${file}: step ${name} has a policy file`);
      used.add(name);
    }
    for (const condition of descendants(flow, "Condition")) {
      assert.doesNotThrow(() => parse(condition.text), `${file}: ${condition.text}`);
    }
  }
  for (const name of policyFiles) assert.ok(used.has(name), `${name} is attached somewhere`);
}

test("the shared flow bundle hangs together", () => {
  checkBundle(SHARED_FLOW, "SharedFlowBundle", ["sharedflows/default.xml"]);
  const flow = read(path.join(SHARED_FLOW, "sharedflows", "default.xml"));
  assert.equal(flow.attrs.name, "default");
});

test("the example proxy hangs together and calls the shared flow in both phases", () => {
  checkBundle(PROXY, "APIProxy", ["proxies/default.xml", "targets/default.xml"]);
  const sharedFlowName = read(path.join(SHARED_FLOW, "aforo-authorize.xml")).attrs.name;
  for (const [policy, phase] of [["FC-Aforo-Authorize", "authorize"], ["FC-Aforo-Usage", "usage"]]) {
    const fc = read(path.join(PROXY, "policies", `${policy}.xml`));
    assert.equal(fc.textAt(["SharedFlowBundle"]), sharedFlowName);
    assert.equal(fc.at("Parameters").all("Parameter").find((p) => p.attrs.name === "aforo.phase").text, phase);
  }
  const endpoint = read(path.join(PROXY, "proxies", "default.xml"));
  const postClient = endpoint.at("PostClientFlow", "Response").all("Step").map((s) => s.textAt(["Name"]));
  assert.deepEqual(postClient, ["FC-Aforo-Usage"]);
});

test("every step of the shared flow is guarded by its phase", () => {
  // The usage phase runs in the same transaction after the authorize phase: an unguarded
  // authorize step would enforce (or cache) a second time from the PostClientFlow.
  const flow = read(path.join(SHARED_FLOW, "sharedflows", "default.xml"));
  for (const step of flow.all("Step")) {
    assert.match(step.textAt(["Condition"], ""), /aforo\.phase (!=|=) "usage"/, step.textAt(["Name"]));
  }
});

test("the callout's failure, not luck, drives the fail mode", () => {
  const sc = read(path.join(SHARED_FLOW, "policies", "SC-Aforo-Authorize.xml"));
  assert.equal(sc.attrs.continueOnError, "true");
  assert.ok(Number(sc.textAt(["Timeout"])) <= 1000, "a short timeout");
  const codes = sc.at("HTTPTargetConnection", "Properties").all("Property").find((p) => p.attrs.name === "success.codes");
  assert.match(codes.text, /4xx/);
  const flow = read(path.join(SHARED_FLOW, "sharedflows", "default.xml"));
  const down = flow.all("Step").find((s) => s.textAt(["Name"]) === "JS-Aforo-SidecarDown");
  assert.match(down.textAt(["Condition"]), /servicecallout\.SC-Aforo-Authorize\.failed = true/);
});

test("the JavaScript resources stay within ES5 (Apigee Edge runs them on Rhino)", () => {
  const jsc = path.join(SHARED_FLOW, "resources", "jsc");
  for (const file of list(jsc, ".js")) {
    const code = fs
      .readFileSync(path.join(jsc, file), "utf8")
      .replace(/\/\*[\s\S]*?\*\//g, "")
      .replace(/\/\/.*$/gm, "")
      .replace(/"(?:[^"\\]|\\.)*"/g, '""');
    for (const [pattern, what] of [
      [/\blet\s/, "let"],
      [/\bconst\s/, "const"],
      [/=>/, "arrow function"],
      [/`/, "template string"],
      [/\bclass\s/, "class"],
      [/\.\.\.[A-Za-z_]/, "spread"],
      [/\b(async|await)\b/, "async/await"],
      [/\.(startsWith|endsWith|includes|padStart|padEnd|repeat|find|findIndex)\(/, "ES2015+ library call"],
      [/\b(Map|Set|Promise|Symbol|Object\.assign)\b/, "ES2015+ built-in"],
    ]) {
      assert.doesNotMatch(code, pattern, `${file} uses ${what}`);
    }
  }
});

test("the XML reader reads attributes, text, entities and CDATA, and refuses malformed input", () => {
  const root = parseXml('<?xml version="1.0"?>\n<!-- c --><A x="1" y=\'a&amp;b\'><B>t &lt; u</B><C><![CDATA[<raw>]]></C><D/></A>');
  assert.equal(root.name, "A");
  assert.deepEqual(root.attrs, { x: "1", y: "a&b" });
  assert.equal(root.textAt(["B"]), "t < u");
  assert.equal(root.textAt(["C"]), "<raw>");
  assert.equal(root.at("D").children.length, 0);
  for (const bad of ["<A>", "<A></B>", "<A x=1/>", "<A>&bogus;</A>", "<A/><B/>", "<A x='1' x='2'/>"]) {
    assert.throws(() => parseXml(bad), undefined, bad);
  }
});

test("conditions follow Apigee's rules for null, booleans, strings and operators", () => {
  const vars = { a: "usage", t: true, s: "true", n: "42", empty: "", path: "/v1/items/7", fault: "InvalidApiKey" };
  const lookup = (name) => (name in vars ? vars[name] : null);
  const cases = [
    ['a = "usage"', true],
    ['a != "usage"', false],
    ['missing != "usage"', true],
    ['missing = "usage"', false],
    ["missing = null", true],
    ["a = null", false],
    ["t = true", true],
    ['t = "true"', true],
    ["s = true", true],
    ["missing != true", true],
    ["t != true", false],
    ['empty != ""', false],
    ['a != ""', true],
    ["n > 41", true],
    ["n <= 41", false],
    ['(a = "usage") and (t = true) and not (n = 0)', true],
    ['a = "x" or a = "usage"', true],
    ['a = "x" OR (a = "y" || a == "usage")', true],
    ['!(a = "usage")', false],
    ['path MatchesPath "/v1/*/7"', true],
    ['path MatchesPath "/v1/**"', true],
    ['path MatchesPath "/v1/*"', false],
    ['fault Matches "*ApiKey"', true],
    ['fault JavaRegex "Invalid.*"', true],
    ['fault =| "Invalid"', true],
    ['a := "USAGE"', true],
    ["lookupcache.LC-Aforo-Decision.cachehit != true", true],
  ];
  for (const [text, expected] of cases) assert.equal(holds(text, lookup), expected, text);
  assert.equal(holds("", lookup), true);
  assert.equal(holds(null, lookup), true);
  for (const bad of ['a = "open', "a = = b", "(a = b", "a = b c", "a # b"]) {
    assert.throws(() => holds(bad, lookup), SyntaxError, bad);
  }
});

test("the player's cache expires entries after their TTL", () => {
  let now = 1000;
  const cache = new Cache(() => now);
  cache.put("k", "v", 5);
  assert.equal(cache.get("k"), "v");
  now += 4999;
  assert.equal(cache.get("k"), "v");
  now += 1;
  assert.equal(cache.get("k"), null);
});
