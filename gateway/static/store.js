// What the page remembers in this browser (localStorage): the settings panel and the
// conversation.  Stored values are checked on the way in, so a hand-edited or older entry can
// only be ignored, never break the page.

const SETTINGS_KEY = "chatglm-gateway.settings";
const CONVERSATION_KEY = "chatglm-gateway.conversation";

/** The settings panel's fields: the stored name, the request field and how a value is read. */
export const SETTINGS = [
  { name: "system", field: null, parse: (v) => v },
  { name: "temperature", field: "temperature", parse: Number },
  { name: "top_p", field: "top_p", parse: Number },
  { name: "max_tokens", field: "max_tokens", parse: (v) => Math.round(Number(v)) },
];

function read(key) {
  try {
    return JSON.parse(localStorage.getItem(key) || "null");
  } catch (_) {
    return null; // not JSON: forget it
  }
}

/** The stored settings as {name: string}, every name present ("" when unset). */
export function loadSettings() {
  const stored = read(SETTINGS_KEY) || {};
  return Object.fromEntries(SETTINGS.map(({ name }) => [
    name, typeof stored[name] === "string" ? stored[name] : "",
  ]));
}

export function saveSettings(values) {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

/** The request fields the settings add (empty fields are left to the model's defaults). */
export function requestFields(values) {
  const fields = {};
  for (const { name, field, parse } of SETTINGS) {
    if (field && values[name].trim() !== "") fields[field] = parse(values[name]);
  }
  return fields;
}

const ROLES = new Set(["user", "assistant"]);

function validMessage(m) {
  return m && ROLES.has(m.role) && typeof m.content === "string";
}

/** The stored conversation: [{role, content, stats?, stopped?}], [] when none. */
export function loadConversation() {
  const stored = read(CONVERSATION_KEY);
  const messages = stored && Array.isArray(stored.messages) ? stored.messages : [];
  return messages.filter(validMessage).map((m) => ({
    role: m.role,
    content: m.content,
    ...(m.stats && typeof m.stats === "object" ? { stats: m.stats } : {}),
    ...(m.stopped ? { stopped: true } : {}),
  }));
}

/** A new conversation's name: 32 random hex digits (getRandomValues, which unlike randomUUID
 * also works on a page served over plain HTTP from another host). */
export function newSession() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The stored conversation's name (sent as X-Session-Id: with replicas, every turn of it goes
 * to the replica holding its cache, even after an edited or regenerated turn), or a new one. */
export function loadSession() {
  const stored = read(CONVERSATION_KEY);
  const session = stored && stored.session;
  return typeof session === "string" && /^[0-9a-f]{32}$/.test(session) ? session : newSession();
}

export function saveConversation(messages, session) {
  if (messages.length) {
    localStorage.setItem(CONVERSATION_KEY, JSON.stringify({ messages, session }));
  } else {
    localStorage.removeItem(CONVERSATION_KEY);
  }
}
