// The chat page: an ordinary OpenAI client of this gateway, written for the browser.
//
// Model text is never parsed as HTML: the Markdown subset below builds DOM nodes and puts every
// piece of model text in with textContent / createTextNode, so a reply containing "<script>"
// shows as text.  Everything the page needs is served by the gateway itself.
"use strict";

(() => {
  const KEY_STORAGE = "chatglm-gateway.api-key";
  const MODEL_STORAGE = "chatglm-gateway.model";
  // /v1/models describes a demo model this way (adapters/demo.py DEMO_DESCRIPTION).
  const DEMO_PATTERN = /\bdemo\b/i;
  const SAFE_URL = /^(https?:|mailto:)/i;

  // ------------------------------------------------------------------ Markdown subset

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

  /** Render Markdown text into a DocumentFragment (code blocks, inline code, bold, italic,
   *  headings, lists, block quotes, links, paragraphs).  An unclosed fence (a reply still
   *  streaming) renders as a code block up to the end. */
  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        const body = [];
        i += 1;
        while (i < lines.length && !closesFence(lines[i], fence[1])) {
          body.push(lines[i]);
          i += 1;
        }
        // A fence still open (the reply is streaming) ends at the text's end; its last line,
        // if empty, is where the next token will go, not part of the code.
        if (i >= lines.length && body.length && !body[body.length - 1]) body.pop();
        i += 1; // the closing fence (or past the end)
        const pre = el("pre");
        const code = el("code", body.join("\n"));
        if (fence[2]) {
          pre.dataset.lang = fence[2];
          code.className = "language-" + fence[2];
        }
        pre.append(code);
        out.append(pre);
        continue;
      }
      if (!line.trim()) {
        i += 1;
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        out.append(inline(el("h" + heading[1].length), heading[2]));
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        out.append(el("hr"));
        i += 1;
        continue;
      }
      if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && QUOTE.test(lines[i])) {
          body.push(QUOTE.exec(lines[i])[1]);
          i += 1;
        }
        const quote = el("blockquote");
        quote.append(renderMarkdown(body.join("\n")));
        out.append(quote);
        continue;
      }
      if (BULLET.test(line) || ORDERED.test(line)) {
        const ordered = !BULLET.test(line);
        const pattern = ordered ? ORDERED : BULLET;
        const list = el(ordered ? "ol" : "ul");
        if (ordered) {
          const start = Number(ORDERED.exec(line)[1]);
          if (start !== 1) list.start = start;
        }
        while (i < lines.length && pattern.test(lines[i])) {
          const match = pattern.exec(lines[i]);
          const item = [match[ordered ? 2 : 1]];
          i += 1;
          // Indented continuation lines belong to the item.
          while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !pattern.test(lines[i])
                 && !FENCE.test(lines[i])) {
            item.push(lines[i].trim());
            i += 1;
          }
          list.append(withBreaks(el("li"), item));
        }
        out.append(list);
        continue;
      }
      const para = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
        para.push(lines[i]);
        i += 1;
      }
      if (!para.length) { // a line that looks like a block start but matched nothing above
        para.push(lines[i]);
        i += 1;
      }
      out.append(withBreaks(el("p"), para));
    }
    return out;
  }

  function closesFence(line, opener) {
    const trimmed = line.trim();
    return trimmed.length >= opener.length && trimmed[0] === opener[0]
      && new RegExp("^\\" + opener[0] + "{" + opener.length + ",}$").test(trimmed);
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || ORDERED.test(line)
      || QUOTE.test(line) || RULE.test(line);
  }

  // Chat models break lines inside paragraphs on purpose (ChatGLM's answers do), so a single
  // newline is kept as <br> instead of being folded away as CommonMark would.
  function withBreaks(node, lines) {
    lines.forEach((line, k) => {
      if (k) node.append(el("br"));
      inline(node, line);
    });
    return node;
  }

  // Inline spans, earliest match first: `code`, [text](url), **bold**/__bold__, *italic*/_italic_.
  const INLINE = /`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)|\*\*(.+?)\*\*|__(.+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|(?<![\w])_([^_\s](?:[^_]*[^_\s])?)_(?![\w])/;

  function inline(node, text) {
    let rest = text;
    while (rest) {
      const m = INLINE.exec(rest);
      if (!m) {
        node.append(document.createTextNode(rest));
        break;
      }
      if (m.index) node.append(document.createTextNode(rest.slice(0, m.index)));
      if (m[1] !== undefined) {
        node.append(el("code", m[1]));
      } else if (m[2] !== undefined) {
        if (SAFE_URL.test(m[3])) {
          const a = inline(el("a"), m[2]);
          a.href = m[3];
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          node.append(a);
        } else { // javascript:, data: and friends stay visible text
          node.append(document.createTextNode(m[0]));
        }
      } else if (m[4] !== undefined || m[5] !== undefined) {
        node.append(inline(el("strong"), m[4] ?? m[5]));
      } else {
        node.append(inline(el("em"), m[6] ?? m[7]));
      }
      rest = rest.slice(m.index + m[0].length);
    }
    return node;
  }

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------ SSE over fetch

  /** Yield the data of each server-sent event of a fetch Response (comments skipped). */
  async function* sseData(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder(); // stream mode: a UTF-8 character split across reads waits
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        buffer = buffer.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n")
            .filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, ""));
          if (data.length) yield data.join("\n");
        }
        if (done) break;
      }
    } finally {
      reader.releaseLock();
    }
  }

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || error.type || null;
    }
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = { error: { message: `${response.status} ${response.statusText}` } };
    }
    const err = new ApiError(response.status, body);
    const retry = response.headers.get("Retry-After");
    if (retry) err.message += ` (retry after ${retry} s)`;
    return err;
  }

  // ------------------------------------------------------------------ the page

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), key: $("api-key"), clear: $("clear"), log: $("log"), empty: $("empty"),
    error: $("error"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    info: $("model-info"), demo: $("demo-notice"),
  };
  // epoch: bumped by Clear, so a reply that ends after a Clear cannot write into the new history.
  const state = { history: [], models: new Map(), controller: null, epoch: 0 };

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function api(path) { return new URL(path, document.baseURI).toString(); }

  function showError(err) {
    ui.error.replaceChildren();
    if (!err) {
      ui.error.hidden = true;
      return;
    }
    const label = err.status ? `Error ${err.status}` : "Error";
    ui.error.append(el("strong", label + (err.code ? ` (${err.code})` : "") + ": "),
      document.createTextNode(err.message));
    if (err.status === 401) {
      ui.error.append(document.createTextNode(" Enter a valid API key above."));
    }
    ui.error.hidden = false;
  }

  async function loadModels() {
    let response;
    try {
      response = await fetch(api("v1/models"), { headers: headers() });
    } catch (err) {
      showError(err);
      return;
    }
    if (!response.ok) {
      showError(await errorOf(response));
      ui.model.replaceChildren(new Option("(no models)", ""));
      describeModel();
      return;
    }
    const list = (await response.json()).data || [];
    state.models = new Map(list.map((m) => [m.id, m]));
    const wanted = ui.model.value || localStorage.getItem(MODEL_STORAGE);
    ui.model.replaceChildren(...list.map((m) => new Option(m.id, m.id)));
    if (!list.length) ui.model.append(new Option("(no models)", ""));
    if (wanted && state.models.has(wanted)) ui.model.value = wanted;
    showError(null);
    describeModel();
  }

  function describeModel() {
    const card = state.models.get(ui.model.value);
    const description = (card && card.description) || "";
    ui.info.textContent = description;
    ui.info.hidden = !description;
    const demo = DEMO_PATTERN.test(description);
    ui.demo.textContent = demo
      ? `⚠ “${card.id}” is a demo model: its weights are random and its answers are meaningless. `
        + "Serve a real checkpoint to chat for real."
      : "";
    ui.demo.hidden = !demo;
  }

  function addMessage(role, text) {
    ui.empty.hidden = true;
    const box = el("div");
    box.className = "msg msg-" + role;
    box.dataset.role = role;
    box.append(el("span", role === "user" ? "You" : "Assistant"));
    box.firstChild.className = "who";
    const content = el("div");
    content.className = "content";
    if (role === "user") content.textContent = text; // user text is shown as typed
    else content.append(renderMarkdown(text));
    box.append(content);
    ui.log.append(box);
    scrollDown();
    return box;
  }

  function scrollDown() { ui.log.scrollTop = ui.log.scrollHeight; }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    ui.form.dataset.busy = busy ? "true" : "false";
  }

  async function send(text) {
    const model = ui.model.value;
    if (!model) {
      showError(new Error("No model selected."));
      return;
    }
    showError(null);
    const messages = [...state.history, { role: "user", content: text }];
    const userBox = addMessage("user", text);
    const box = addMessage("assistant", "");
    box.dataset.state = "streaming";
    const content = box.querySelector(".content");
    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    setBusy(true);
    let answer = "";
    let frame = 0;
    const paint = () => {
      frame = 0;
      content.replaceChildren(renderMarkdown(answer));
      scrollDown();
    };
    try {
      const response = await fetch(api("v1/chat/completions"), {
        method: "POST",
        headers: headers(),
        body: JSON.stringify({ model, messages, stream: true }),
        signal: controller.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          answer += delta.content;
          if (!frame) frame = requestAnimationFrame(paint);
        }
      }
      if (epoch === state.epoch) state.history = [...messages, { role: "assistant", content: answer }];
    } catch (err) {
      if (epoch !== state.epoch) {
        // Cleared while streaming: the turn is gone with the rest of the conversation.
      } else if (err.name === "AbortError") {
        // Keep what arrived: the next turn continues from the visible conversation.
        state.history = [...messages, { role: "assistant", content: answer }];
        const note = el("p", "(stopped)");
        note.className = "status";
        box.append(note);
      } else {
        // The turn failed: drop it from the page and the history, give the text back to retry.
        userBox.remove();
        box.remove();
        if (!ui.prompt.value) ui.prompt.value = text;
        ui.empty.hidden = state.history.length > 0;
        showError(err);
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      if (box.isConnected) paint();
      delete box.dataset.state;
      if (state.controller === controller) state.controller = null;
      setBusy(false);
      ui.log.dataset.turns = String(state.history.length / 2);
      ui.prompt.focus();
    }
  }

  function clearConversation() {
    state.epoch += 1;
    if (state.controller) state.controller.abort();
    state.history = [];
    ui.log.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    ui.log.dataset.turns = "0";
    showError(null);
    ui.prompt.focus();
  }

  function submit() {
    const text = ui.prompt.value;
    if (!text.trim() || state.controller) return;
    ui.prompt.value = "";
    send(text);
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    // isComposing: Enter that confirms a Chinese IME candidate must not send the message.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      submit();
    }
  });
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.clear.addEventListener("click", clearConversation);
  ui.model.addEventListener("change", () => {
    localStorage.setItem(MODEL_STORAGE, ui.model.value);
    describeModel();
  });
  ui.key.value = localStorage.getItem(KEY_STORAGE) || "";
  ui.key.addEventListener("change", () => {
    const key = ui.key.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadModels();
  });

  ui.log.dataset.turns = "0";
  window.chatPage = { renderMarkdown, history: () => state.history.slice() };
  loadModels().then(() => ui.prompt.focus());
})();
