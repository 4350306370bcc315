// Markdown for assistant answers, by the vendored markdown-it (markdown-it.min.js, MIT; see its
// header for the version).
//
// Model text never becomes live HTML: `html: false` makes markdown-it escape every tag in the
// text (a "<script>" or "<img onerror>" shows as text), its validateLink refuses javascript:,
// vbscript:, file: and data: links, and images are switched off so an answer cannot make the
// browser fetch anything.  The HTML is parsed into an inert <template>, never into the page.

const md = window.markdownit({
  html: false,
  linkify: true, // bare URLs become links (validated like any other)
  breaks: true, // chat models break lines inside paragraphs on purpose (ChatGLM's answers do)
  typographer: false,
});
md.disable("image"); // "![alt](url)" stays a link to the picture, nothing is loaded

const escape = md.utils.escapeHtml;
const rules = md.renderer.rules;
const renderToken = (tokens, idx, options, env, self) => self.renderToken(tokens, idx, options);

// Links open in a new tab without handing it this page.
const linkOpen = rules.link_open || renderToken;
rules.link_open = (tokens, idx, options, env, self) => {
  tokens[idx].attrSet("target", "_blank");
  tokens[idx].attrSet("rel", "noopener noreferrer");
  return linkOpen(tokens, idx, options, env, self);
};

// Code blocks get a header with their language and a copy button (app.js handles the click).
function withCopyButton(rule) {
  return (tokens, idx, options, env, self) => {
    const lang = (tokens[idx].info || "").trim().split(/\s+/)[0];
    return '<div class="code-block"><div class="code-head">'
      + `<span class="code-lang">${escape(lang)}</span>`
      + '<button type="button" class="copy" aria-label="Copy code">Copy</button></div>'
      + rule(tokens, idx, options, env, self) + "</div>\n";
  };
}
rules.fence = withCopyButton(rules.fence);
rules.code_block = withCopyButton(rules.code_block);

// Wide tables scroll sideways inside the answer instead of widening the page.
rules.table_open = () => '<div class="table-wrap"><table>\n';
rules.table_close = () => "</table></div>\n";

const template = document.createElement("template");

/** Render Markdown text into a DocumentFragment.  Text still streaming renders as far as it
 *  goes (an unclosed code fence runs to the end). */
export function renderMarkdown(text) {
  template.innerHTML = md.render(String(text));
  return document.importNode(template.content, true);
}
