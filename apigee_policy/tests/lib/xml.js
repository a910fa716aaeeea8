"use strict";
// A small, strict XML reader for Apigee bundle files (elements, attributes, text, CDATA,
// comments, the XML declaration, the five predefined entities and character references).
// Anything malformed throws: a bundle the player cannot read must fail the test, not be
// half-played. No namespaces, no DTDs (Apigee bundles use neither).

const ENTITIES = { lt: "<", gt: ">", amp: "&", quot: '"', apos: "'" };

function decode(text, where) {
  return text.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-z]+);|&/g, (all, ref) => {
    if (ref === undefined) throw new Error(`bare '&' in ${where}`);
    if (ref[0] === "#") {
      const code = ref[1] === "x" ? parseInt(ref.slice(2), 16) : parseInt(ref.slice(1), 10);
      return String.fromCodePoint(code);
    }
    if (!(ref in ENTITIES)) throw new Error(`unknown entity &${ref}; in ${where}`);
    return ENTITIES[ref];
  });
}

class Element {
  constructor(name, attrs, line) {
    this.name = name;
    this.attrs = attrs;
    this.line = line;
    this.children = []; // elements only
    this.parts = []; // text pieces, in order
  }

  /** The concatenated text directly inside this element (not its children's). */
  get text() {
    return this.parts.join("");
  }

  /** The child elements named `name`. */
  all(name) {
    return this.children.filter((c) => c.name === name);
  }

  /** The single child named `name` (null when absent; throws when repeated). */
  one(name) {
    const found = this.all(name);
    if (found.length > 1) throw new Error(`<${this.name}> line ${this.line}: more than one <${name}>`);
    return found[0] || null;
  }

  /** Follows a path of child names: el.at("FaultResponse", "Set", "StatusCode"). */
  at(...names) {
    let node = this;
    for (const name of names) {
      node = node && node.one(name);
    }
    return node;
  }

  /** The trimmed text of the child at `names`, or `fallback`. */
  textAt(names, fallback = null) {
    const node = this.at(...names);
    return node ? node.text.trim() : fallback;
  }
}

function parseXml(source, where = "xml") {
  let pos = 0;
  const len = source.length;
  const lineAt = (index) => source.slice(0, index).split("\n").length;
  const fail = (message) => {
    throw new Error(`${where}:${lineAt(pos)}: ${message}`);
  };
  const skip = (regex) => {
    regex.lastIndex = pos;
    const match = regex.exec(source);
    if (match && match.index === pos) {
      pos += match[0].length;
      return match;
    }
    return null;
  };
  const skipMisc = () => {
    for (;;) {
      skip(/\s+/y);
      if (source.startsWith("<!--", pos)) {
        const end = source.indexOf("-->", pos + 4);
        if (end < 0) fail("unterminated comment");
        pos = end + 3;
      } else if (source.startsWith("<?", pos)) {
        const end = source.indexOf("?>", pos + 2);
        if (end < 0) fail("unterminated processing instruction");
        pos = end + 2;
      } else {
        return;
      }
    }
  };

  const NAME = /[A-Za-z_][\w.\-:]*/y;
  const parseElement = () => {
    const start = pos;
    if (source[pos] !== "<") fail("expected an element");
    pos += 1;
    const nameMatch = skip(NAME);
    if (!nameMatch) fail("expected an element name");
    const element = new Element(nameMatch[0], {}, lineAt(start));
    for (;;) {
      const space = skip(/\s+/y);
      if (source.startsWith("/>", pos)) {
        pos += 2;
        return element;
      }
      if (source[pos] === ">") {
        pos += 1;
        break;
      }
      if (!space) fail(`expected whitespace, '>' or '/>' in <${element.name}>`);
      const attr = skip(NAME);
      if (!attr) fail(`expected an attribute name in <${element.name}>`);
      skip(/\s*=\s*/y) || fail(`expected '=' after ${attr[0]}`);
      const value = skip(/"([^"<]*)"|'([^'<]*)'/y);
      if (!value) fail(`expected a quoted value for ${attr[0]}`);
      if (attr[0] in element.attrs) fail(`duplicate attribute ${attr[0]}`);
      element.attrs[attr[0]] = decode(value[1] !== undefined ? value[1] : value[2], where);
    }
    for (;;) {
      if (pos >= len) fail(`unclosed <${element.name}>`);
      if (source.startsWith("</", pos)) {
        pos += 2;
        const close = skip(NAME);
        if (!close || close[0] !== element.name) fail(`</${close && close[0]}> closes <${element.name}>`);
        skip(/\s*/y);
        if (source[pos] !== ">") fail("expected '>'");
        pos += 1;
        return element;
      }
      if (source.startsWith("<!--", pos)) {
        const end = source.indexOf("-->", pos + 4);
        if (end < 0) fail("unterminated comment");
        pos = end + 3;
      } else if (source.startsWith("<![CDATA[", pos)) {
        const end = source.indexOf("]]>", pos + 9);
        if (end < 0) fail("unterminated CDATA");
        element.parts.push(source.slice(pos + 9, end));
        pos = end + 3;
      } else if (source[pos] === "<") {
        element.children.push(parseElement());
      } else {
        const next = source.indexOf("<", pos);
        const end = next < 0 ? len : next;
        element.parts.push(decode(source.slice(pos, end), where));
        pos = end;
      }
    }
  };

  if (source.charCodeAt(0) === 0xfeff) pos = 1;
  skipMisc();
  const root = parseElement();
  skipMisc();
  if (pos < len) fail("content after the root element");
  return root;
}

module.exports = { Element, parseXml };
