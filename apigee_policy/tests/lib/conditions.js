"use strict";
// Apigee condition expressions (the <Condition> of a Step, Flow or FaultRule), evaluated
// against a flow context. Covers the operators Apigee documents for conditions; anything
// else is a syntax error, so a condition the player does not understand fails the test
// instead of being guessed.
//
// Semantics followed (Apigee "Conditions reference"):
// - a variable that is not set is null: `x = null` is true, `x = "a"` false, `x != "a"` true;
// - string comparisons are case-sensitive; ":=" compares case-insensitively;
// - when both sides are numbers, comparisons are numeric;
// - true/false literals match boolean variables and the strings "true"/"false".

const OPERATORS = [
  // symbols, longest first
  ["!=", "ne"], ["==", "eq"], [":=", "eqi"], [">=", "ge"], ["<=", "le"], ["=|", "startswith"],
  ["~~", "regex"], ["~/", "matchespath"], ["=", "eq"], [">", "gt"], ["<", "lt"], ["~", "matches"],
];
const WORD_OPERATORS = {
  equals: "eq", is: "eq", notequals: "ne", isnot: "ne", equalsignorecase: "eqi",
  greaterthan: "gt", greaterthanorequals: "ge", lesserthan: "lt", lesserthanorequals: "le",
  matches: "matches", like: "matches", matchespath: "matchespath", likepath: "matchespath",
  javaregex: "regex", startswith: "startswith",
};

function tokenize(text) {
  const tokens = [];
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (/\s/.test(ch)) {
      i += 1;
    } else if (ch === "(" || ch === ")") {
      tokens.push({ kind: ch });
      i += 1;
    } else if (ch === '"' || ch === "'") {
      const end = text.indexOf(ch, i + 1);
      if (end < 0) throw new SyntaxError(`unterminated string in condition: ${text}`);
      tokens.push({ kind: "literal", value: text.slice(i + 1, end) });
      i = end + 1;
    } else if (text.startsWith("&&", i) || text.startsWith("||", i)) {
      tokens.push({ kind: text[i] === "&" ? "and" : "or" });
      i += 2;
    } else {
      const symbol = OPERATORS.find(([s]) => text.startsWith(s, i));
      if (symbol) {
        tokens.push({ kind: "op", op: symbol[1] });
        i += symbol[0].length;
      } else if (ch === "!") {
        tokens.push({ kind: "not" });
        i += 1;
      } else {
        const match = /^[A-Za-z0-9_.\-$]+/.exec(text.slice(i));
        if (!match) throw new SyntaxError(`unexpected '${ch}' in condition: ${text}`);
        const word = match[0];
        const lower = word.toLowerCase();
        if (lower === "and" || lower === "or" || lower === "not") tokens.push({ kind: lower });
        else if (WORD_OPERATORS[lower]) tokens.push({ kind: "op", op: WORD_OPERATORS[lower] });
        else if (lower === "null") tokens.push({ kind: "literal", value: null });
        else if (lower === "true" || lower === "false") tokens.push({ kind: "literal", value: lower === "true" });
        else if (/^-?[0-9]+(\.[0-9]+)?$/.test(word)) tokens.push({ kind: "literal", value: Number(word) });
        else tokens.push({ kind: "variable", name: word });
        i += word.length;
      }
    }
  }
  return tokens;
}

function parse(text) {
  const tokens = tokenize(text);
  let i = 0;
  const peek = () => tokens[i];
  const take = (kind) => {
    const token = tokens[i];
    if (!token || token.kind !== kind) {
      throw new SyntaxError(`expected ${kind} at token ${i} in condition: ${text}`);
    }
    i += 1;
    return token;
  };
  const operand = () => {
    const token = tokens[i];
    if (!token || (token.kind !== "variable" && token.kind !== "literal")) {
      throw new SyntaxError(`expected a variable or a literal at token ${i} in condition: ${text}`);
    }
    i += 1;
    return token;
  };
  const primary = () => {
    if (peek() && peek().kind === "(") {
      take("(");
      const inner = or();
      take(")");
      return inner;
    }
    const left = operand();
    if (peek() && peek().kind === "op") {
      const { op } = take("op");
      return { kind: "cmp", op, left, right: operand() };
    }
    return { kind: "truthy", operand: left };
  };
  const not = () => {
    if (peek() && peek().kind === "not") {
      take("not");
      return { kind: "not", inner: not() };
    }
    return primary();
  };
  const and = () => {
    let node = not();
    while (peek() && peek().kind === "and") {
      take("and");
      node = { kind: "and", left: node, right: not() };
    }
    return node;
  };
  const or = () => {
    let node = and();
    while (peek() && peek().kind === "or") {
      take("or");
      node = { kind: "or", left: node, right: and() };
    }
    return node;
  };
  const tree = or();
  if (i !== tokens.length) throw new SyntaxError(`unexpected tokens after the expression: ${text}`);
  return tree;
}

function globToRegex(pattern, path) {
  let out = "";
  for (let i = 0; i < pattern.length; i += 1) {
    const ch = pattern[i];
    if (path && pattern.startsWith("**", i)) {
      out += ".*";
      i += 1;
    } else if (ch === "*") {
      out += path ? "[^/]*" : ".*";
    } else if (ch === "?" && !path) {
      out += ".";
    } else {
      out += ch.replace(/[.+^${}()|[\]\\]/g, "\\$&");
    }
  }
  return new RegExp(`^${out}$`);
}

function value(token, lookup) {
  if (token.kind === "literal") return token.value;
  const v = lookup(token.name);
  return v === undefined ? null : v;
}

function compare(op, left, right) {
  if (op === "eq" || op === "ne" || op === "eqi") {
    let equal;
    if (left === null || right === null) {
      equal = left === null && right === null;
    } else if (typeof right === "boolean" || typeof left === "boolean") {
      equal = String(left).toLowerCase() === String(right).toLowerCase();
    } else if (typeof right === "number" && !Number.isNaN(Number(left)) && String(left).trim() !== "") {
      equal = Number(left) === right;
    } else if (op === "eqi") {
      equal = String(left).toLowerCase() === String(right).toLowerCase();
    } else {
      equal = String(left) === String(right);
    }
    return op === "ne" ? !equal : equal;
  }
  if (left === null || right === null) return false;
  switch (op) {
    case "gt":
    case "ge":
    case "lt":
    case "le": {
      const a = Number(left);
      const b = Number(right);
      if (Number.isNaN(a) || Number.isNaN(b)) return false;
      return op === "gt" ? a > b : op === "ge" ? a >= b : op === "lt" ? a < b : a <= b;
    }
    case "matches":
      return globToRegex(String(right), false).test(String(left));
    case "matchespath":
      return globToRegex(String(right), true).test(String(left));
    case "regex":
      return new RegExp(`^(?:${right})$`).test(String(left));
    case "startswith":
      return String(left).startsWith(String(right));
    default:
      throw new Error(`unknown operator ${op}`);
  }
}

function evaluate(tree, lookup) {
  switch (tree.kind) {
    case "or":
      return evaluate(tree.left, lookup) || evaluate(tree.right, lookup);
    case "and":
      return evaluate(tree.left, lookup) && evaluate(tree.right, lookup);
    case "not":
      return !evaluate(tree.inner, lookup);
    case "truthy": {
      const v = value(tree.operand, lookup);
      return v === true || (typeof v === "string" && v.toLowerCase() === "true");
    }
    case "cmp":
      return compare(tree.op, value(tree.left, lookup), value(tree.right, lookup));
    default:
      throw new Error(`bad condition node ${tree.kind}`);
  }
}

const cache = new Map();

/** True when `text` holds for the variables `lookup(name)` returns (null when unset). */
function holds(text, lookup) {
  if (text === null || text === undefined || text.trim() === "") return true;
  let tree = cache.get(text);
  if (!tree) {
    tree = parse(text);
    cache.set(text, tree);
  }
  return evaluate(tree, lookup);
}

module.exports = { holds, parse, tokenize };
