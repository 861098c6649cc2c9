// A small Markdown renderer for untrusted model output.
//
// It builds DOM nodes with createElement and text nodes only: no HTML string is
// ever parsed, so <script>, <img onerror=...> and the like stay plain text.
// Links are made only for http: and https: URLs.
//
// Supported: paragraphs (a newline is a line break), **bold**, *italic*,
// `code`, ``` fenced blocks ``` with a language label, - and 1. lists (nested
// by indentation), # to ###### headings, > blockquotes, --- rules, \ escapes,
// [text](url) links. An unclosed fence (a reply still streaming) runs to the end.

const MAX_DEPTH = 8; // nesting of quotes/lists/emphasis; deeper is shown as text (bounds recursion)

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|(\d{1,9})[.)])(?:\s+(.*)|$)/;
const ESCAPABLE = "\\`*_{}[]()#+-.!>|~";

/** The Markdown `text` as a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text ?? "").replace(/\r\n?/g, "\n").split("\n"), fragment, 0);
  return fragment;
}

/** Replace the children of `element` with the rendered `text`. */
export function renderInto(element, text) {
  element.replaceChildren(renderMarkdown(text));
}

function el(tag, parent, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  parent.appendChild(node);
  return node;
}

function expandTabs(line) {
  return line.includes("\t") ? line.replace(/\t/g, "    ") : line;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function renderBlocks(lines, parent, depth) {
  if (depth > MAX_DEPTH) {
    // Too deep to nest further: the rest as one plain-text paragraph.
    paragraph(lines.filter((line) => line.trim()), parent, depth);
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = expandTabs(lines[i]);
    if (!line.trim()) { i++; continue; }

    let match = FENCE.exec(line);
    if (match) {
      const marker = match[1];
      const body = [];
      i++;
      // The closing fence: the same character, at least as long, nothing after it.
      const close = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
      while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
      i++; // the closing fence (or past the end)
      codeBlock(match[2], body.join("\n"), parent);
      continue;
    }
    match = HEADING.exec(line);
    if (match) {
      const heading = el(`h${Math.min(match[1].length + 1, 6)}`, parent); // h1 is the page's title
      inline(match[2], heading, depth);
      i++;
      continue;
    }
    if (RULE.test(line)) { // before lists: "- - -" is a rule
      el("hr", parent);
      i++;
      continue;
    }
    match = QUOTE.exec(line);
    if (match) {
      const inner = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) { inner.push(match[1]); i++; }
      renderBlocks(inner, el("blockquote", parent), depth + 1);
      continue;
    }
    match = ITEM.exec(line);
    if (match) {
      i = list(lines, i, parent, depth);
      continue;
    }
    // A paragraph: lines up to a blank one or the start of another block.
    const text = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(expandTabs(lines[i]))) text.push(lines[i++]);
    paragraph(text, parent, depth);
  }
}

function paragraph(lines, parent, depth) {
  if (!lines.length) return;
  const p = el("p", parent);
  lines.forEach((line, index) => {
    if (index) el("br", p);
    inline(line.trim(), p, depth);
  });
}

function codeBlock(language, code, parent) {
  const block = el("div", parent, "code-block");
  if (language) el("div", block, "code-lang").textContent = language;
  const codeNode = el("code", el("pre", block));
  codeNode.textContent = code;
  if (language) codeNode.dataset.lang = language;
}

/** One list starting at lines[start]; returns the index after it. */
function list(lines, start, parent, depth) {
  const first = ITEM.exec(expandTabs(lines[start]));
  const indent = first[1].length;
  const ordered = first[3] !== undefined;
  const listNode = el(ordered ? "ol" : "ul", parent);
  if (ordered && first[3] !== "1") listNode.start = Number(first[3]);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const line = expandTabs(lines[i]);
    const match = ITEM.exec(line);
    if (match && !RULE.test(line) && match[1].length <= indent + 1 && (match[3] !== undefined) === ordered) {
      // A new item of this list: its content is indented by the marker's width.
      items.push({ lines: [match[4] ?? ""], width: match[1].length + match[2].length + 1, loose: false });
      i++;
      continue;
    }
    const item = items[items.length - 1];
    if (!line.trim()) {
      // A blank line continues the list only if indented content or another item follows.
      let next = i + 1;
      while (next < lines.length && !lines[next].trim()) next++;
      if (next >= lines.length) break;
      const after = expandTabs(lines[next]);
      const afterItem = ITEM.exec(after);
      const indented = after.length - after.trimStart().length >= item.width;
      if (!indented && !(afterItem && afterItem[1].length <= indent + 1 && (afterItem[3] !== undefined) === ordered)) break;
      item.lines.push("");
      item.loose = true;
      i++;
      continue;
    }
    const leading = line.length - line.trimStart().length;
    if (leading > indent) {
      item.lines.push(line.slice(Math.min(leading, item.width)));
    } else if (!startsBlock(line) && item.lines[item.lines.length - 1].trim()) {
      item.lines.push(line.trim()); // a lazy continuation of the item's paragraph
    } else {
      break;
    }
    i++;
  }
  for (const item of items) {
    const li = el("li", listNode);
    const simple = !item.loose && item.lines.every((line) => line.trim() && !startsBlock(line));
    if (simple) {
      // A tight item: its text straight in the <li>, no <p>.
      item.lines.forEach((line, index) => {
        if (index) el("br", li);
        inline(line.trim(), li, depth + 1);
      });
    } else {
      renderBlocks(item.lines, li, depth + 1);
    }
  }
  return i;
}

/** Inline Markdown of one line into `parent`; `links` false inside a link's label (no <a> in an <a>). */
function inline(text, parent, depth, links = true) {
  let buffer = "";
  const flush = () => {
    if (buffer) parent.appendChild(document.createTextNode(buffer));
    buffer = "";
  };
  // The first `closer` at or after `from` that `fits`. Whether a closer fits never depends on its opener, so
  // one that is missing from some point on is missing for every later opener too: remembering that keeps
  // text full of unmatched markers ("*a *a *a ...") linear instead of quadratic.
  const missing = new Set();
  const find = (closer, from, fits) => {
    if (missing.has(closer)) return -1;
    let at = text.indexOf(closer, from);
    while (at >= 0 && !fits(at)) at = text.indexOf(closer, at + 1);
    if (at < 0) missing.add(closer);
    return at;
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && ESCAPABLE.includes(text[i + 1])) {
      buffer += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      let run = 1;
      while (text[i + run] === "`") run++;
      const fence = "`".repeat(run);
      // The closing run must be exactly as long.
      const end = find(fence, i + run, (at) => text[at - 1] !== "`" && text[at + run] !== "`");
      if (end >= 0) {
        flush();
        let code = text.slice(i + run, end);
        if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
        el("code", parent).textContent = code;
        i = end + run;
      } else {
        buffer += fence;
        i += run;
      }
      continue;
    }
    if ((c === "*" || c === "_") && depth <= MAX_DEPTH) {
      const double = text[i + 1] === c;
      const marker = double ? c + c : c;
      const open = i + marker.length;
      const wordBefore = /[\p{L}\p{N}]/u.test(text[i - 1] ?? "");
      const arithmetic = !double && /\d/.test(text[i - 1] ?? "") && /\d/.test(text[open] ?? ""); // 2*3*4 is not italic
      // Emphasis opens before a non-space; _ never inside a word (snake_case stays as it is).
      if (text[open] && !/\s/.test(text[open]) && !(c === "_" && wordBefore) && !arithmetic) {
        // It closes after a non-space, at the end of a run of markers (in "b***" the last two close a **, or
        // the last one a *); a single * never closes on one of a pair (in "*a **b** c*" the pairs are a
        // nested **, so the run before a single closer is odd); _ not inside a word.
        const end = find(marker, open + 1, (at) => {
          if (/\s/.test(text[at - 1]) || text[at + marker.length] === c) return false;
          if (c === "_" && /[\p{L}\p{N}]/u.test(text[at + marker.length] ?? "")) return false;
          if (double) return true;
          let run = at;
          while (text[run - 1] === c) run--;
          return (at - run) % 2 === 0;
        });
        if (end >= 0) {
          flush();
          inline(text.slice(open, end), el(double ? "strong" : "em", parent), depth + 1, links);
          i = end + marker.length;
          continue;
        }
      }
      buffer += marker;
      i += marker.length;
      continue;
    }
    if (c === "[" && links && depth <= MAX_DEPTH && find("](", i + 1, () => true) >= 0) {
      const link = parseLink(text, i);
      if (link) {
        flush();
        const a = el("a", parent);
        a.href = link.href;
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        inline(link.label, a, depth + 1, false);
        i = link.end;
        continue;
      }
    }
    buffer += c;
    i++;
  }
  flush();
}

/** [label](url) at text[start]: {label, href, end}, or null when it is not a link to an http(s) URL. */
function parseLink(text, start) {
  let depth = 0;
  let close = -1;
  for (let j = start; j < text.length && j < start + 2000; j++) {
    if (text[j] === "\\") { j++; continue; }
    if (text[j] === "[") depth++;
    else if (text[j] === "]" && --depth === 0) { close = j; break; }
  }
  if (close < 0 || text[close + 1] !== "(") return null;
  const match = /^\(\s*<?([^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(close + 1, close + 2050));
  if (!match) return null;
  const href = safeUrl(match[1]);
  if (!href) return null;
  return { label: text.slice(start + 1, close), href, end: close + 1 + match[0].length };
}

/** The URL if it is http: or https: (as the browser parses it) with no user name or password, else null:
 * https://bank.com@evil.com is evil.com, whatever it looks like. */
function safeUrl(raw) {
  if (!/^https?:\/\//i.test(raw)) return null;
  try {
    const url = new URL(raw);
    if (url.username || url.password) return null;
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}
