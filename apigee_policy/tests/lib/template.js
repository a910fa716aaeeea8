"use strict";
// Apigee message templates: "{variable.name}" is replaced by the variable's value. Braces
// around anything that is not a variable name (a JSON object, say) stay as written, so a
// literal JSON payload with a "{var}" inside works as it does in Apigee.

class UnresolvedVariable extends Error {
  constructor(name) {
    super(`unresolved variable ${name}`);
    this.variable = name;
  }
}

function render(template, lookup, ignoreUnresolved) {
  return String(template).replace(/\{([A-Za-z_][\w.\-]*)\}/g, (all, name) => {
    const v = lookup(name);
    if (v === null || v === undefined) {
      if (ignoreUnresolved) return "";
      throw new UnresolvedVariable(name);
    }
    return Array.isArray(v) ? v.join(",") : String(v);
  });
}

module.exports = { UnresolvedVariable, render };
