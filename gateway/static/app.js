// The chat page: an ordinary OpenAI client of this gateway, written for the browser.
//
// Answers are Markdown, rendered by markdown.js with HTML escaped (model text never becomes live
// HTML); the user's own text is shown as typed.  Everything the page needs is served by the
// gateway itself.

import { ApiError, errorOf, sseData } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const KEY_STORAGE = "chatglm-gateway.api-key";
const MODEL_STORAGE = "chatglm-gateway.model";
// /v1/models describes a demo model this way (adapters/demo.py DEMO_DESCRIPTION).
const DEMO_PATTERN = /\bdemo\b/i;
// Follow the answer only while the reader is at the bottom (scrolled up = reading, left alone).
const STICKY_PX = 80;

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), key: $("api-key"), newChat: $("new-chat"), log: $("log"), empty: $("empty"),
  error: $("error"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  info: $("model-info"), demo: $("demo-notice"), announce: $("announce"),
  settings: $("settings"), settingsToggle: $("settings-toggle"),
};
// the settings panel's inputs by stored name (store.SETTINGS)
const settingInputs = {
  system: $("system-prompt"), temperature: $("temperature"), top_p: $("top-p"),
  max_tokens: $("max-tokens"),
};

const state = {
  // The conversation: {role, content} plus, on answers, stats (token counts and speed) and
  // stopped (cut short by Stop, or still streaming).
  messages: store.loadConversation(),
  session: store.loadSession(), // this conversation's X-Session-Id
  settings: store.loadSettings(),
  models: new Map(),
  controller: null, // the running answer's AbortController
  epoch: 0, // bumped by New chat, so an answer ending later cannot write into the new one
};

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// ------------------------------------------------------------------ models, key, errors

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

// ------------------------------------------------------------------ settings panel

function showSettings(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
}

function readSettings() {
  state.settings = Object.fromEntries(
    Object.entries(settingInputs).map(([name, input]) => [name, input.value]));
  store.saveSettings(state.settings);
  markSettings();
}

// The toggle shows when a setting is in force, so a remembered system prompt is never a surprise.
function markSettings() {
  const active = Object.values(state.settings).some((v) => v.trim() !== "");
  ui.settingsToggle.classList.toggle("active", active);
  ui.settingsToggle.title = active ? "Some settings differ from the model's defaults" : "";
}

// ------------------------------------------------------------------ messages on the page

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < STICKY_PX;
}

function addMessage(message, streaming = false) {
  ui.empty.hidden = true;
  const box = el("div", undefined, "msg msg-" + message.role);
  box.dataset.role = message.role;
  if (streaming) {
    box.dataset.state = "streaming";
    box.setAttribute("aria-busy", "true"); // screen readers read the answer once, when complete
  }
  box.append(el("span", message.role === "user" ? "You" : "Assistant", "who"),
    el("div", undefined, "content"));
  if (message.role === "assistant") box.append(el("div", undefined, "foot"));
  ui.log.append(box);
  showContent(box, message);
  if (message.role === "assistant") showFoot(box, message);
  ui.log.scrollTop = ui.log.scrollHeight;
  return box;
}

function showContent(box, message) {
  const content = box.querySelector(".content");
  if (message.role === "user") content.textContent = message.content; // shown as typed
  else content.replaceChildren(renderMarkdown(message.content));
}

const finite = (x) => typeof x === "number" && Number.isFinite(x);

/** The line under an answer: "(stopped)", or its token counts and speed. */
function showFoot(box, message) {
  const foot = box.querySelector(".foot");
  foot.replaceChildren();
  if (message.stopped && box.dataset.state !== "streaming") {
    foot.append(el("span", "(stopped)", "status"));
  }
  const stats = message.stats || {};
  if (finite(stats.completion_tokens)) {
    const parts = [`${stats.completion_tokens} tokens`];
    if (finite(stats.tokens_per_second)) parts.push(`${stats.tokens_per_second.toFixed(1)} tok/s`);
    if (finite(stats.prompt_tokens)) parts.push(`prompt ${stats.prompt_tokens} tokens`);
    if (finite(stats.first_token_seconds)) {
      parts.push(`first token after ${stats.first_token_seconds.toFixed(2)} s`);
    }
    const line = el("span", parts.join(" · "), "stats");
    line.title = "tok/s: the answer's tokens after the first over the time since the first "
      + "arrived (the wait for the first token is the prompt's processing)";
    foot.append(line);
  }
}

/** Token counts (the stream's usage chunk) and speed, from the client's clock. */
function statsOf(usage, started, first, ended) {
  const stats = { seconds: (ended - started) / 1000 };
  if (first !== null) stats.first_token_seconds = (first - started) / 1000;
  if (usage) {
    const n = usage.completion_tokens;
    stats.prompt_tokens = usage.prompt_tokens;
    stats.completion_tokens = n;
    const decoding = first !== null ? (ended - first) / 1000 : 0;
    stats.tokens_per_second = n > 1 && decoding > 0 ? (n - 1) / decoding : n / stats.seconds;
  }
  return stats;
}

/** Only the last answer offers Regenerate, and only while nothing is streaming. */
function showRegenerate() {
  for (const button of ui.log.querySelectorAll("button.regenerate")) button.remove();
  const last = state.messages[state.messages.length - 1];
  const boxes = ui.log.querySelectorAll(".msg-assistant");
  if (state.controller || !last || last.role !== "assistant" || !boxes.length) return;
  const button = el("button", "Regenerate", "regenerate link");
  button.type = "button";
  button.title = "Ask for this answer again";
  boxes[boxes.length - 1].querySelector(".foot").append(button);
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
  ui.form.dataset.busy = busy ? "true" : "false";
  showRegenerate();
}

// ------------------------------------------------------------------ one answer

function requestBody(model, messages) {
  const system = state.settings.system;
  const history = messages.map(({ role, content }) => ({ role, content }));
  return {
    model,
    messages: system.trim() ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    stream_options: { include_usage: true },
    ...store.requestFields(state.settings),
  };
}

/** Whether a request can go out now (a model chosen, the settings valid); says why not. */
function ready() {
  if (!ui.model.value) {
    showError(new Error("No model selected."));
    return false;
  }
  const invalid = ui.settings.querySelector(":invalid");
  if (invalid) {
    showSettings(true);
    ui.settings.reportValidity();
    const label = ui.settings.querySelector(`label[for="${invalid.id}"]`).textContent;
    showError(new Error(`${label}: ${invalid.validationMessage} Fix it in Settings.`));
    return false;
  }
  return true;
}

/** Stream the answer to ``messages`` (which end with the user's turn, shown in ``userBox``). */
async function answer(messages, userBox) {
  showError(null);
  const reply = { role: "assistant", content: "", stopped: true }; // until it finishes
  state.messages = [...messages, reply];
  const box = addMessage(reply, true);
  const controller = new AbortController();
  const epoch = state.epoch;
  state.controller = controller;
  setBusy(true);
  store.saveConversation(state.messages, state.session);
  const started = performance.now();
  let first = null;
  let usage = null;
  let frame = 0;
  const paint = () => {
    frame = 0;
    const follow = nearBottom();
    showContent(box, reply);
    if (follow) ui.log.scrollTop = ui.log.scrollHeight;
  };
  try {
    const response = await fetch(api("v1/chat/completions"), {
      method: "POST",
      headers: { ...headers(), "X-Session-Id": state.session },
      body: JSON.stringify(requestBody(ui.model.value, messages)),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        reply.content += delta.content;
        if (!frame) frame = requestAnimationFrame(paint); // one render per frame, not per token
      }
    }
    delete reply.stopped;
    reply.stats = statsOf(usage, started, first, performance.now());
  } catch (err) {
    if (epoch !== state.epoch) {
      // New chat while streaming: the turn is gone with the rest of the conversation.
    } else if (controller.signal.aborted) {
      // Stopped (or the page is going away): keep what arrived; the next turn continues from
      // the visible conversation.  (Not err.name === "AbortError": when the page unloads, the
      // body's stream may fail with a network error first.)
    } else {
      // The turn failed: drop it from the page and the history, give the text back to retry.
      state.messages = messages.slice(0, -1);
      userBox.remove();
      box.remove();
      if (!ui.prompt.value) ui.prompt.value = messages[messages.length - 1].content;
      ui.empty.hidden = state.messages.length > 0;
      showError(err);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    delete box.dataset.state;
    box.removeAttribute("aria-busy");
    const follow = nearBottom();
    if (box.isConnected) {
      showContent(box, reply);
      showFoot(box, reply);
    }
    if (state.controller === controller) state.controller = null;
    if (epoch === state.epoch) store.saveConversation(state.messages, state.session);
    setBusy(false);
    if (follow) ui.log.scrollTop = ui.log.scrollHeight; // the counts and Regenerate in view too
    ui.prompt.focus();
  }
}

function submit() {
  const text = ui.prompt.value;
  if (!text.trim() || state.controller || !ready()) return;
  ui.prompt.value = "";
  const message = { role: "user", content: text };
  answer([...state.messages, message], addMessage(message));
}

function regenerate() {
  const last = state.messages[state.messages.length - 1];
  if (state.controller || !last || last.role !== "assistant" || !ready()) return;
  const answers = ui.log.querySelectorAll(".msg-assistant");
  const asks = ui.log.querySelectorAll(".msg-user");
  answers[answers.length - 1].remove();
  answer(state.messages.slice(0, -1), asks[asks.length - 1]);
}

function newChat() {
  state.epoch += 1;
  if (state.controller) state.controller.abort();
  state.messages = [];
  state.session = store.newSession();
  store.saveConversation(state.messages, state.session);
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  showError(null);
  ui.prompt.focus();
}

// ------------------------------------------------------------------ copy buttons

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (err) {
      // Denied (no permission, page not focused): the selection-based way below may still work.
      console.warn("clipboard.writeText failed:", err);
    }
  }
  // Plain http from another host has no Clipboard API: copy a selection the old way.
  const area = el("textarea", undefined, "offscreen");
  area.value = text;
  area.readOnly = true;
  document.body.append(area);
  area.select();
  try {
    return document.execCommand("copy");
  } finally {
    area.remove();
  }
}

async function copyCode(button) {
  const code = button.closest(".code-block").querySelector("code");
  // Without the fence's final newline: pasted into a terminal, a command must not run by itself.
  const copied = await copyText(code.textContent.replace(/\n$/, ""));
  button.textContent = copied ? "Copied" : "Copy failed";
  ui.announce.textContent = copied ? "Code copied to the clipboard."
    : "Could not copy; select the code and copy it by hand.";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// ------------------------------------------------------------------ wiring

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
ui.newChat.addEventListener("click", newChat);
ui.log.addEventListener("click", (event) => {
  const copy = event.target.closest("button.copy");
  if (copy) copyCode(copy);
  else if (event.target.closest("button.regenerate")) regenerate();
});
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

for (const [name, input] of Object.entries(settingInputs)) input.value = state.settings[name];
markSettings();
ui.settings.addEventListener("input", readSettings);
ui.settings.addEventListener("reset", () => setTimeout(readSettings)); // after the fields reset
ui.settings.addEventListener("submit", (event) => event.preventDefault()); // Enter in a field
ui.settings.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    showSettings(false);
    ui.settingsToggle.focus();
  }
});
ui.settingsToggle.addEventListener("click", () => {
  const open = ui.settings.hidden;
  showSettings(open);
  if (open) settingInputs.system.focus();
});

// A reload (or closing the tab) while an answer streams keeps the part that arrived, as a Stop
// would.
window.addEventListener("pagehide", () => {
  if (!state.controller) return;
  state.controller.abort();
  store.saveConversation(state.messages, state.session);
});

// The log shrinks when a notice, an error or the settings panel appears: a reader at the bottom
// stays at the bottom (the end of the last answer stays in view).
let atBottom = true;
ui.log.addEventListener("scroll", () => { atBottom = nearBottom(); });
new ResizeObserver(() => {
  if (atBottom) ui.log.scrollTop = ui.log.scrollHeight;
}).observe(ui.log);

for (const message of state.messages) addMessage(message);
showRegenerate();
window.chatPage = {
  renderMarkdown,
  history: () => state.messages.map(({ role, content }) => ({ role, content })),
  messages: () => structuredClone(state.messages),
};
loadModels().then(() => ui.prompt.focus());
