// Markdown for model replies, rendered as DOM nodes built one by one: text only ever enters the
// page through text nodes (textContent), never innerHTML, so a reply with <script>, <img onerror>
// or a javascript: link stays text. Links become <a> only for http:, https: and mailto: URLs.
// What it knows: fenced code blocks (```lang), headings (#..######), lists (-, *, +, 1.),
// block quotes (>), horizontal rules, paragraphs; inline `code`, **bold**, *italic*, [text](url).
"use strict";

const SAFE_URL = /^(https?:|mailto:)/i;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Inline spans of one line of text, appended to `parent`.
function renderInline(parent, text) {
  const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let last = 0;
  let m;
  while ((m = pattern.exec(text)) !== null) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) {
      parent.append(el("code", null, m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      renderInline(strong, m[3] !== undefined ? m[3] : m[4]);
      parent.append(strong);
    } else if (m[5] !== undefined) {
      const em = el("em");
      renderInline(em, m[5]);
      parent.append(em);
    } else if (SAFE_URL.test(m[7])) {
      const a = el("a", null, m[6]);
      a.href = m[7];
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      parent.append(a);
    } else {  // any other scheme (javascript:, data:, ...) stays the text it was
      parent.append(document.createTextNode(m[0]));
    }
    last = pattern.lastIndex;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// Blocks of a whole text; returns a DocumentFragment. An unclosed code fence (a reply still
// streaming) runs to the end of the text.
function renderMarkdown(text, onCopy) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (!para.length) return;
    const p = el("p");
    para.forEach((line, k) => {
      if (k) p.append(el("br"));
      renderInline(p, line);
    });
    out.append(p);
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;  // the closing fence
      const pre = el("pre");
      const code = el("code", fence[2] ? "lang-" + fence[2] : null, body.join("\n"));
      const bar = el("div", "code-bar", fence[2] || "code");
      if (onCopy) {
        const copy = el("button", "copy-code", "Copy");
        copy.type = "button";
        copy.addEventListener("click", () => onCopy(code.textContent, copy));
        bar.append(copy);
      }
      pre.append(bar, code);
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = el("h" + Math.min(6, heading[1].length + 2));  // h3..h6: a reply's headings stay small
      renderInline(h, heading[2]);
      out.append(h);
      i += 1;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      out.append(el("hr"));
      i += 1;
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(item[1], 10) !== 1) list.start = parseInt(item[1], 10);
      while (i < lines.length) {
        const next = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!next || /\d/.test(next[1]) !== ordered) break;
        const li = el("li");
        renderInline(li, next[2]);
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const quote = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quote.push(lines[i++].replace(/^\s*>\s?/, ""));
      const block = el("blockquote");
      block.append(renderMarkdown(quote.join("\n"), onCopy));
      out.append(block);
      continue;
    }
    if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i += 1;
  }
  flush();
  return out;
}
