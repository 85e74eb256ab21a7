// Markdown for model text, safe by construction: every piece of the text is HTML-escaped before any markup
// of ours is added, links are http(s) only, and nothing the model writes becomes a tag or an attribute of its
// own. Small on purpose (no vendored library): headings, lists, paragraphs, fenced and inline code, bold,
// italics, links, and CodeAct's <solution> as an answer box. Python code is highlighted.
"use strict";

const Markdown = (() => {
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  const PY_KEYWORDS = new Set(("False None True and as assert async await break class continue def del elif else except " +
    "finally for from global if import in is lambda nonlocal not or pass raise return try while with yield print").split(" "));
  const PY_TOKEN = /(#[^\n]*)|("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|[rbfuRBFU]{0,2}"(?:\\.|[^"\\\n])*"?|[rbfuRBFU]{0,2}'(?:\\.|[^'\\\n])*'?)|(\b\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?j?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;

  function highlight(code) {
    let out = "", last = 0;
    for (const m of code.matchAll(PY_TOKEN)) {
      out += escapeHtml(code.slice(last, m.index));
      const [text, comment, string, number, word] = m;
      const cls = comment ? "c" : string ? "s" : number ? "n" : PY_KEYWORDS.has(word) ? "k" : null;
      out += cls ? `<span class="tok-${cls}">${escapeHtml(text)}</span>` : escapeHtml(text);
      last = m.index + text.length;
    }
    return out + escapeHtml(code.slice(last));
  }

  function codeBlock(code, language) {
    const body = /^(py|python|python3|)$/i.test(language || "") ? highlight(code) : escapeHtml(code);
    return `<div class="code"><button type="button" class="copy" title="Copy">Copy</button><pre><code>${body}</code></pre></div>`;
  }

  function inline(text) {
    // Inline code first, kept out of the other rules by placeholders.
    const spans = [];
    let html = escapeHtml(text).replace(/`([^`\n]+)`/g, (_, code) => { spans.push(`<code>${code}</code>`); return `\u0000${spans.length - 1}\u0000`; });
    html = html
      .replace(/&lt;solution&gt;([\s\S]*?)&lt;\/solution&gt;/g, '<span class="solution">$1</span>')
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[\s(])\*([^*\n]+)\*(?=[\s).,;:!?]|$)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)"]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return html.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
  }

  function prose(text) {
    const out = [];
    let list = null;
    const closeList = () => { if (list) { out.push(`</${list}>`); list = null; } };
    for (const block of text.split(/\n{2,}/)) {
      const lines = block.split("\n");
      let paragraph = [];
      const flush = () => { if (paragraph.length) { out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`); paragraph = []; } };
      for (const line of lines) {
        const heading = /^(#{1,6})\s+(.*)$/.exec(line);
        const item = /^\s*(?:([-*])|(\d+)[.)])\s+(.*)$/.exec(line);
        if (heading) { flush(); closeList(); const level = Math.min(heading[1].length + 2, 6); out.push(`<h${level}>${inline(heading[2])}</h${level}>`); }
        else if (item) {
          flush();
          const kind = item[1] ? "ul" : "ol";
          if (list !== kind) { closeList(); out.push(`<${kind}>`); list = kind; }
          out.push(`<li>${inline(item[3])}</li>`);
        } else if (line.trim()) { closeList(); paragraph.push(line); }
      }
      flush();
      closeList();
    }
    return out.join("");
  }

  // `hideActions`: <execute> blocks are shown as cells of their own, so the reply's text leaves them out.
  function render(text, hideActions) {
    let source = text;
    if (hideActions) source = source.replace(/<execute>[\s\S]*?(?:<\/execute>|$)/g, "").replace(/```output[\s\S]*$/, "");
    const parts = [];
    const fence = /```([\w+-]*)[^\n]*\n([\s\S]*?)(?:```|$)/g;
    let last = 0;
    for (const m of source.matchAll(fence)) {
      parts.push(prose(source.slice(last, m.index)));
      parts.push(codeBlock(m[2].replace(/\n$/, ""), m[1]));
      last = m.index + m[0].length;
    }
    parts.push(prose(source.slice(last)));
    return parts.join("");
  }

  return { render, highlight, escapeHtml, codeBlock };
})();
