// llamaherd's chat page: plain JavaScript over Ollama's public API, no build step.
//
//   GET  /api/tags     the installed models        POST /api/chat     a reply, streamed as NDJSON
//   GET  /api/ps       the models loaded now       POST /api/pull     pull by name, NDJSON progress
//   GET  /api/version  shown in the side bar       DELETE /api/delete remove an installed model
//
// Conversations live in this browser's localStorage ("llamaherd.chats"), newest first:
//   {id, title, model, system, options: {temperature: 0.7, ...}, created, updated,
//    messages: [{role: "user" | "assistant", content, model?, stats?, stopped?, error?,
//                versions?: [{content, tail: [messages after it]}], version?}]}
// Editing a user message keeps the old one and what followed it as a branch (versions, shown as
// ‹ 1/2 ›): the messages after the shown version are the conversation's; the others' wait in `tail`.
// A reply that failed keeps its error (shown in the conversation) and is left out of the history
// sent with the next message. Stop aborts the fetch: the server notices the disconnect and frees
// the generation's slot at once.
"use strict";

const STORAGE = {
  chats: "llamaherd.chats",
  current: "llamaherd.current",
  model: "llamaherd.model",
  theme: "llamaherd.theme",
};
const OPTION_KEYS = ["temperature", "top_p", "top_k", "num_ctx", "seed", "num_predict"];
const INTEGER_OPTIONS = new Set(["top_k", "num_ctx", "seed", "num_predict"]);
const STATS_KEYS = ["done_reason", "total_duration", "load_duration", "prompt_eval_count",
  "prompt_eval_duration", "eval_count", "eval_duration"];

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), backdrop: $("backdrop"), openSidebar: $("open-sidebar"), closeSidebar: $("close-sidebar"),
  newChat: $("new-chat"), chatList: $("chat-list"), installed: $("installed"), closeSettings: $("close-settings"),
  pullForm: $("pull-form"), pullName: $("pull-name"), pullButton: $("pull-button"), pullBox: $("pull-box"),
  pullProgress: $("pull-progress"), pullStatus: $("pull-status"),
  themeToggle: $("theme-toggle"), version: $("version"),
  title: $("chat-title"), model: $("model"), settingsToggle: $("settings-toggle"), settings: $("settings"),
  system: $("system"), exportJson: $("export-json"), exportMd: $("export-md"), deleteChat: $("delete-chat"),
  messages: $("messages"), composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
};

const state = {
  chats: [],          // every conversation, newest first
  current: null,      // the one shown
  models: [],         // names from /api/tags
  sizes: {},          // name -> bytes, from /api/tags
  loaded: new Set(),  // names from /api/ps
  modelsError: null,  // why /api/tags failed, if it did
  streaming: null,    // {chat, reply, controller} while a reply streams (one at a time)
  editing: -1,        // index of the user message being edited in the current chat
};

// -- small helpers ---------------------------------------------------------------------------

/** h("div", {class: "x", onclick: f}, child, ...): an element; strings become text nodes (never HTML). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function formatBytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

let toastTimer = 0;
function toast(text) {
  let node = document.querySelector(".toast");
  if (!node) {
    node = h("div", { class: "toast", role: "status" });
    document.body.append(node);
  }
  node.textContent = text;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.hidden = true; }, 2500);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no Clipboard API outside secure contexts (a LAN address over http): the old way
    const area = h("textarea", { class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function flash(button, text) {
  const before = [...button.childNodes];
  button.textContent = text;
  setTimeout(() => { button.replaceChildren(...before); }, 1500);
}

// Line icons (24x24, stroked with the text colour): drawn here, so no font needs the glyph.
const ICONS = {
  edit: ["M4 20h4L19 9l-4-4L4 16z", "M14 6l4 4"],
  copy: ["M9 9h11v11H9z", "M5 15H4V4h11v1"],
  regenerate: ["M20 11a8 8 0 1 0-2.3 5.7", "M20 4v7h-7"],
};

function icon(name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [k, v] of Object.entries({ viewBox: "0 0 24 24", width: "16", height: "16", fill: "none",
    stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round", "stroke-linejoin": "round",
    "aria-hidden": "true", class: `icon-${name}` })) svg.setAttribute(k, v);
  for (const d of ICONS[name]) {
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

// -- the server ------------------------------------------------------------------------------

/** An error the server sent ({"error": "..."}), with its HTTP status when there was one. */
class ServerError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function httpError(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  try {
    const body = await res.json();
    if (body && body.error) message = typeof body.error === "string" ? body.error : body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  return new ServerError(message, res.status);
}

function errorText(e) {
  if (e instanceof ServerError) return e.status ? `${e.message} (HTTP ${e.status})` : e.message;
  if (e instanceof TypeError) {  // fetch's way of saying the network failed
    return `Lost the connection to the server — was it stopped or restarted? (${e.message})`;
  }
  return e.message || String(e);
}

async function getJson(path) {
  const res = await fetch(path, { headers: { Accept: "application/json" } });
  if (!res.ok) throw await httpError(res);
  return res.json();
}

function postJson(path, body, signal) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
    body: JSON.stringify(body),
    signal,
  });
}

/** The objects of an NDJSON response body, as they arrive. */
async function* readNdjson(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

// -- conversations in localStorage -----------------------------------------------------------

function loadChats() {
  try {
    const chats = JSON.parse(localStorage.getItem(STORAGE.chats) || "[]");
    return Array.isArray(chats) ? chats.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
  } catch (e) {
    return [];
  }
}

let saveTimer = 0;
function save() {
  clearTimeout(saveTimer);
  saveTimer = 0;
  try {
    localStorage.setItem(STORAGE.chats, JSON.stringify(state.chats));
    if (state.current) localStorage.setItem(STORAGE.current, state.current.id);
  } catch (e) {
    toast(`Could not save the conversations in this browser: ${e.message}`);
  }
}

/** Save within half a second (while typing or streaming). */
function saveSoon() {
  if (!saveTimer) saveTimer = setTimeout(save, 500);
}

function touch(chat) {
  chat.updated = Date.now();
  state.chats.sort((a, b) => b.updated - a.updated);
}

function titleOf(chat) {
  if (chat.title) return chat.title;
  const first = chat.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 48 ? line.slice(0, 47) + "…" : line;
}

function makeChat() {
  const model = localStorage.getItem(STORAGE.model);
  const chat = {
    id: newId(), title: "", model: state.models.includes(model) ? model : (state.models[0] || model || ""),
    system: "", options: {}, messages: [], created: Date.now(), updated: Date.now(),
  };
  state.chats.unshift(chat);
  return chat;
}

function newChat() {
  if (!state.current || state.current.messages.length) selectChat(makeChat());
  closeSidebar();
  ui.input.focus();
}

function selectChat(chat) {
  state.current = chat;
  state.editing = -1;
  save();
  render();
  closeSidebar();
}

function deleteChat(chat) {
  if (!confirm(`Delete the conversation “${titleOf(chat)}”?`)) return;
  if (state.streaming && state.streaming.chat === chat) state.streaming.controller.abort();
  state.chats = state.chats.filter((c) => c !== chat);
  if (state.current === chat) state.current = state.chats[0] || makeChat();
  save();
  render();
}

// -- export ----------------------------------------------------------------------------------

function fileStem(chat) {
  return titleOf(chat).replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-+|-+$/g, "").slice(0, 60) || "conversation";
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function chatMarkdown(chat) {
  const lines = [`# ${titleOf(chat)}`, "", `Model: \`${chat.model}\``];
  const options = chatOptions(chat);
  if (Object.keys(options).length) lines.push(`Options: \`${JSON.stringify(options)}\``);
  if (chat.system.trim()) lines.push("", "## System", "", chat.system.trim());
  for (const m of chat.messages) {
    lines.push("", m.role === "user" ? "## You" : `## Assistant (${m.model || chat.model})`, "", m.content);
    if (m.stopped) lines.push("", "*(stopped)*");
    if (m.error) lines.push("", `> **Error:** ${m.error}`);
    if (m.stats) lines.push("", `*${formatStats(m.stats)}*`);
  }
  return lines.join("\n") + "\n";
}

// -- Markdown --------------------------------------------------------------------------------

marked.setOptions({ gfm: true });

function highlight(code) {
  const lang = (code.className.match(/language-([\w+#.-]+)/) || [])[1];
  const text = code.textContent;
  let result;
  if (lang && hljs.getLanguage(lang)) result = hljs.highlight(text, { language: lang, ignoreIllegals: true });
  else if (text.length < 20000) result = hljs.highlightAuto(text);
  else return;
  code.innerHTML = result.value;  // highlight.js escapes the text it is given
  code.classList.add("hljs");
  if (result.language) code.dataset.language = result.language;
}

/** Markdown text -> a sanitized DocumentFragment: highlighted code, each block's direction its own. */
function renderMarkdown(text) {
  let parsed;
  try {
    parsed = marked.parse(text);
  } catch (e) {  // never lose a reply to a Markdown bug: show it as plain text
    return document.createTextNode(text);
  }
  const html = DOMPurify.sanitize(parsed, {
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
  const template = document.createElement("template");
  template.innerHTML = html;
  const root = template.content;
  for (const code of root.querySelectorAll("pre > code")) {
    highlight(code);
    code.parentElement.setAttribute("dir", "ltr");
    code.parentElement.append(h("button", { class: "copy-code", type: "button" }, "Copy"));
  }
  // Korean, Arabic, English... mixed in one reply: each paragraph takes its own direction.
  for (const block of root.querySelectorAll("p, li, h1, h2, h3, h4, h5, h6, blockquote, td, th, dt, dd")) {
    block.setAttribute("dir", "auto");
  }
  for (const link of root.querySelectorAll("a[href]")) {
    link.setAttribute("target", "_blank");
    link.setAttribute("rel", "noopener noreferrer");
  }
  return root;
}

// -- rendering -------------------------------------------------------------------------------

function formatStats(s) {
  const rate = (n, ns) => (n && ns ? (n / (ns / 1e9)).toFixed(1) : null);
  const parts = [`${s.eval_count ?? 0} tokens`];
  const speed = rate(s.eval_count, s.eval_duration);
  if (speed) parts.push(`${speed} tokens/s`);
  if (s.prompt_eval_count != null) parts.push(`prompt ${s.prompt_eval_count} tokens`);
  if (s.total_duration) parts.push(`${(s.total_duration / 1e9).toFixed(2)} s`);
  if (s.done_reason === "length") parts.push("cut at the length limit");
  if (s.done_reason === "stopped") parts.push("counted by this page");
  return parts.join(" · ");
}

function statsTitle(s) {
  const ms = (ns) => `${Math.round((ns || 0) / 1e6)} ms`;
  const rate = (n, ns) => (n && ns ? `${(n / (ns / 1e9)).toFixed(1)} tokens/s` : "–");
  return [`generated: ${s.eval_count ?? 0} tokens in ${ms(s.eval_duration)} (${rate(s.eval_count, s.eval_duration)})`,
    `prompt: ${s.prompt_eval_count ?? 0} tokens in ${ms(s.prompt_eval_duration)}` +
      ` (${rate(s.prompt_eval_count, s.prompt_eval_duration)})`,
    `load: ${ms(s.load_duration)}, total: ${ms(s.total_duration)}, done: ${s.done_reason || "?"}`].join("\n");
}

function render() {
  renderChatList();
  renderInstalled();
  renderHeader();
  renderSettings();
  renderMessages();
  renderComposer();
}

function renderChatList() {
  ui.chatList.replaceChildren(...state.chats.map((chat) => {
    const title = titleOf(chat);
    return h("div", { class: chat === state.current ? "chat-item current" : "chat-item", "data-id": chat.id },
      h("button", { class: "open", type: "button", dir: "auto", title, onclick: () => selectChat(chat) }, title),
      h("button", { class: "delete", type: "button", title: "Delete", "aria-label": `Delete ${title}`,
        onclick: () => deleteChat(chat) }, "✕"));
  }));
}

function renderHeader() {
  const chat = state.current;
  if (document.activeElement !== ui.title) ui.title.value = chat.title;
  ui.title.placeholder = titleOf({ ...chat, title: "" });
  const names = [...state.models];
  const options = names.map((name) => h("option", { value: name }, name));
  if (chat.model && !names.includes(chat.model)) {
    options.unshift(h("option", { value: chat.model }, `${chat.model} (not installed)`));
  }
  if (!options.length) {
    options.push(h("option", { value: "", disabled: true },
      state.modelsError ? "server unreachable" : "no models: pull one"));
  }
  ui.model.replaceChildren(...options);
  ui.model.value = chat.model;
}

function renderSettings() {
  const chat = state.current;
  if (document.activeElement !== ui.system) ui.system.value = chat.system;
  for (const input of ui.settings.querySelectorAll("[data-option]")) {
    if (document.activeElement !== input) input.value = chat.options[input.dataset.option] ?? "";
  }
}

function renderComposer() {
  const busy = state.streaming != null;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
}

function emptyState() {
  const chat = state.current;
  let hint = chat.model ? `Chatting with ${chat.model}.` : "Choose a model above, or pull one from the side bar.";
  if (state.modelsError) hint = `Cannot reach the llamaherd server: ${state.modelsError}`;
  else if (!state.models.length) hint = "No models yet: pull one from the side bar (for example smollm2:135m).";
  return h("div", { class: "empty" }, h("h1", {}, "llamaherd"), h("p", {}, hint));
}

function renderMessages() {
  const chat = state.current;
  if (!chat.messages.length) {
    ui.messages.replaceChildren(emptyState());
    return;
  }
  ui.messages.replaceChildren(...chat.messages.map((m, i) => renderMessage(chat, m, i)));
}

function renderMessage(chat, m, i) {
  const streaming = state.streaming && state.streaming.reply === m;
  if (m.role === "user") {
    if (i === state.editing) return renderEditor(chat, m, i);
    const versions = m.versions || [];
    const at = m.version ?? 0;
    return h("div", { class: "message user", "data-index": i },
      h("div", { class: "role" }, "You"),
      h("div", { class: "body", dir: "auto" }, m.content),
      h("div", { class: "meta" },
        versions.length > 1 ? h("span", { class: "branches" },
          h("button", { class: "prev-branch", type: "button", "aria-label": "Previous version", title: "Previous version",
            disabled: at === 0 || state.streaming != null, onclick: () => showVersion(chat, i, at - 1) }, "‹"),
          h("span", { class: "branch-index" }, `${at + 1}/${versions.length}`),
          h("button", { class: "next-branch", type: "button", "aria-label": "Next version", title: "Next version",
            disabled: at === versions.length - 1 || state.streaming != null,
            onclick: () => showVersion(chat, i, at + 1) }, "›")) : null,
        h("div", { class: "actions" },
          h("button", { class: "edit-message", type: "button", title: "Edit", "aria-label": "Edit",
            disabled: state.streaming != null, onclick: () => { state.editing = i; renderMessages(); } }, icon("edit")),
          h("button", { class: "copy", type: "button", title: "Copy", "aria-label": "Copy", onclick: async (e) => {
            const button = e.currentTarget;
            await copyText(m.content);
            flash(button, "Copied");
          } }, icon("copy")))));
  }
  const isLast = i === chat.messages.length - 1;
  const body = h("div", { class: "body" });
  body.append(renderMarkdown(m.content));
  const meta = h("div", { class: "meta" });
  if (!streaming) {
    meta.append(h("div", { class: "actions" },
      m.content ? h("button", { class: "copy", type: "button", title: "Copy", "aria-label": "Copy",
        onclick: async (e) => {
          const button = e.currentTarget;
          await copyText(m.content);
          flash(button, "Copied");
        } }, icon("copy")) : null,
      isLast && !state.streaming ? h("button", { class: "regenerate", type: "button", title: "Regenerate",
        "aria-label": "Regenerate", onclick: () => regenerate(chat) }, icon("regenerate")) : null));
  }
  if (m.stopped) meta.append(h("span", { class: "stopped" }, "stopped"));
  if (m.stats) meta.append(h("span", { class: "stats", title: statsTitle(m.stats) }, formatStats(m.stats)));
  const classes = ["message", "assistant", streaming ? "streaming" : "", isLast ? "last" : ""].join(" ").trim();
  return h("div", { class: classes, "data-index": i },
    h("div", { class: "role" }, m.model || chat.model),
    body,
    m.error ? h("div", { class: "error", role: "alert", dir: "auto" }, `⚠ ${m.error}`) : null,
    meta);
}

function renderEditor(chat, m, i) {
  const area = h("textarea", { dir: "auto", "aria-label": "Edit the message" });
  area.value = m.content;
  const submit = () => {
    const text = area.value.trim();
    if (!text || state.streaming) return;
    state.editing = -1;
    // The old message and what followed it stay as a version of this message (‹ 1/2 ›).
    const versions = m.versions || [{ content: m.content, tail: [] }];
    versions[m.version ?? 0] = { content: m.content, tail: chat.messages.slice(i + 1) };
    versions.push({ content: text, tail: [] });
    chat.messages.splice(i);
    chat.messages.push({ role: "user", content: text, versions, version: versions.length - 1 });
    generate(chat);
  };
  const cancel = () => { state.editing = -1; renderMessages(); };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); submit(); }
    if (e.key === "Escape") { e.stopPropagation(); cancel(); }
  });
  setTimeout(() => area.focus());
  return h("div", { class: "message user edit", "data-index": i },
    h("div", { class: "role" }, "You"), area,
    h("div", { class: "edit-actions" },
      h("button", { type: "button", class: "cancel-edit", onclick: cancel }, "Cancel"),
      h("button", { type: "button", class: "primary save-edit", onclick: submit }, "Save & send")));
}

/** Show version `k` of the user message at `i`: the conversation after it becomes that version's. */
function showVersion(chat, i, k) {
  const m = chat.messages[i];
  if (state.streaming || !m.versions || !m.versions[k]) return;
  m.versions[m.version ?? 0] = { content: m.content, tail: chat.messages.slice(i + 1) };
  m.version = k;
  m.content = m.versions[k].content;
  chat.messages.splice(i + 1, Infinity, ...m.versions[k].tail);
  m.versions[k].tail = [];  // the shown version's messages live in the conversation
  save();
  renderMessages();
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

/** Show the streaming reply's new text, at most once a frame. */
let frame = 0;
function showStreamedText() {
  saveSoon();
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const s = state.streaming;
    if (!s || s.chat !== state.current) return;
    const node = ui.messages.querySelector(".message.streaming .body");
    if (!node) return;
    const follow = nearBottom();
    node.replaceChildren(renderMarkdown(s.reply.content));
    if (follow) scrollToBottom();
  });
}

// -- chatting --------------------------------------------------------------------------------

function chatOptions(chat) {
  const options = {};
  for (const key of OPTION_KEYS) {
    if (Number.isFinite(chat.options[key])) options[key] = chat.options[key];
  }
  return options;
}

/** The /api/chat request for the conversation as it stands (its last message is the user's). */
function chatRequest(chat) {
  const messages = [];
  if (chat.system.trim()) messages.push({ role: "system", content: chat.system });
  for (const m of chat.messages) {
    if (m.role === "assistant" && (m.error || !m.content)) continue;  // failed replies are not history
    messages.push({ role: m.role, content: m.content });
  }
  return { model: chat.model, messages, options: chatOptions(chat), stream: true };
}

async function generate(chat) {
  const request = chatRequest(chat);
  const reply = { role: "assistant", content: "", model: chat.model };
  chat.messages.push(reply);
  const controller = new AbortController();
  const started = performance.now();
  let first = 0, pieces = 0;  // when the first text came, and how many pieces (tokens) came
  state.streaming = { chat, reply, controller };
  touch(chat);
  save();
  render();
  scrollToBottom();
  try {
    const res = await postJson("/api/chat", request, controller.signal);
    if (!res.ok) throw await httpError(res);
    for await (const part of readNdjson(res)) {
      if (part.error) throw new ServerError(part.error);
      if (part.message && part.message.content) {
        reply.content += part.message.content;
        pieces += 1;
        first = first || performance.now();
        showStreamedText();
      }
      if (part.done) {
        reply.stats = Object.fromEntries(STATS_KEYS.filter((k) => part[k] != null).map((k) => [k, part[k]]));
      }
    }
    if (!reply.stats) throw new Error("The reply ended before it was done: the server closed the connection.");
  } catch (e) {
    if (controller.signal.aborted) {
      reply.stopped = true;
      // The server sends no statistics for a reply cut short: what this page saw (one piece per token).
      const now = performance.now();
      reply.stats = { done_reason: "stopped", eval_count: pieces, total_duration: Math.round((now - started) * 1e6),
        eval_duration: first ? Math.round((now - first) * 1e6) : 0 };
    } else reply.error = errorText(e);
  } finally {
    state.streaming = null;
    touch(chat);
    save();
    const follow = nearBottom();
    render();
    if (follow) scrollToBottom();
    refreshLoaded();
  }
}

function sendMessage() {
  const text = ui.input.value.trim();
  if (!text || state.streaming) return;
  const chat = state.current;
  chat.messages.push({ role: "user", content: text });
  ui.input.value = "";
  autosize();
  generate(chat);
}

function regenerate(chat) {
  if (state.streaming) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (chat.messages.length) generate(chat);
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

// -- models: list, loaded, pull --------------------------------------------------------------

async function refreshModels() {
  try {
    const { models } = await getJson("/api/tags");
    state.models = models.map((m) => m.name).sort();
    state.sizes = Object.fromEntries(models.map((m) => [m.name, m.size]));
    state.modelsError = null;
  } catch (e) {
    state.modelsError = errorText(e);
  }
  const chat = state.current;
  if (!chat.model && state.models.length) {
    const preferred = localStorage.getItem(STORAGE.model);
    chat.model = state.models.includes(preferred) ? preferred : state.models[0];
  }
  renderHeader();
  renderInstalled();
  if (!chat.messages.length) renderMessages();
}

async function refreshLoaded() {
  try {
    const { models } = await getJson("/api/ps");
    state.loaded = new Set(models.map((m) => m.name));
  } catch (e) {
    state.loaded = new Set();
  }
  renderInstalled();
}

function useModel(name) {
  state.current.model = name;
  localStorage.setItem(STORAGE.model, name);
  save();
  renderHeader();
  renderInstalled();
  renderMessages();
  closeSidebar();
}

/** The side bar's list: every installed model, its size, whether it is loaded, and delete. */
function renderInstalled() {
  let items = state.models.map((name) => {
    const loaded = state.loaded.has(name);
    return h("li", { class: [loaded ? "is-loaded" : "", name === state.current.model ? "current" : ""].join(" ").trim(),
      "data-name": name },
      h("button", { class: "use", type: "button", title: `Chat with ${name}`, onclick: () => useModel(name) }, name),
      loaded ? h("span", { class: "badge", title: "loaded in memory" }, "● loaded") : null,
      h("span", { class: "size" }, formatBytes(state.sizes[name])),
      h("button", { class: "delete-model", type: "button", title: `Delete ${name}`, "aria-label": `Delete ${name}`,
        onclick: () => deleteModel(name) }, "✕"));
  });
  if (!items.length) items = [h("li", { class: "none" }, state.modelsError ? "server unreachable" : "none yet: pull one")];
  ui.installed.replaceChildren(...items);
}

async function deleteModel(name) {
  if (!confirm(`Delete the model “${name}” from this server? Its files are removed unless another model uses them.`)) {
    return;
  }
  try {
    const res = await fetch("/api/delete", { method: "DELETE", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: name }) });
    if (!res.ok) throw await httpError(res);
    toast(`Deleted ${name}`);
  } catch (e) {
    toast(`Could not delete ${name}: ${pageWorded(errorText(e))}`);
  }
  await refreshModels();
  refreshLoaded();
}

/** A server message in this page's words: no `herd` commands to type, the models one can pull named. */
function pageWorded(message, name) {
  if (/not in the catalog/.test(message)) {
    return `“${name}” is not a model this server can pull. Try smollm2:135m, llama3.2:1b, llama3.1:8b, ` +
      "or a Hugging Face GGUF as hf.co/{user}/{repo}:{quant}.";
  }
  return message.replace(/[,;:]?\s*(try|run|or make one with)\s+herd\s[^.;]*/gi, "").replace(/`?herd [a-z]+`?/g, "the side bar");
}

async function pull(name) {
  ui.pullBox.hidden = false;
  ui.pullProgress.hidden = false;
  ui.pullButton.disabled = true;
  ui.pullStatus.classList.remove("error");
  ui.pullStatus.textContent = `pulling ${name}…`;
  ui.pullProgress.removeAttribute("value");  // indeterminate until the first byte counts
  try {
    const res = await postJson("/api/pull", { model: name, stream: true });
    if (!res.ok) throw await httpError(res);
    let last = null;
    for await (const event of readNdjson(res)) {
      if (event.error) throw new ServerError(event.error);
      last = event;
      if (event.total) {
        const done = event.completed || 0;
        ui.pullProgress.value = done / event.total;
        ui.pullStatus.textContent = `${event.status} — ${formatBytes(done)} of ${formatBytes(event.total)}` +
          ` (${Math.floor((100 * done) / event.total)}%)`;
      } else {
        ui.pullStatus.textContent = event.status;
      }
    }
    if (!last || last.status !== "success") throw new Error("The pull ended before it was done.");
    ui.pullProgress.value = 1;
    await refreshModels();
    const pulled = [name, `${name}:latest`].find((n) => state.models.includes(n));
    if (pulled && !state.current.messages.length) {  // an empty conversation starts with the new model
      state.current.model = pulled;
      save();
      renderHeader();
      renderInstalled();
      renderMessages();
    }
    ui.pullStatus.textContent = `${name}: success`;
  } catch (e) {
    ui.pullProgress.hidden = true;  // a failed pull leaves no bar behind, only why it failed
    ui.pullStatus.classList.add("error");
    ui.pullStatus.textContent = `Could not pull ${name}: ${pageWorded(e.message || errorText(e), name)}`;
  } finally {
    ui.pullButton.disabled = false;
  }
}

// -- theme and side bar ----------------------------------------------------------------------

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  ui.themeToggle.textContent = theme === "dark" ? "Light theme" : "Dark theme";
}

function openSidebar() {
  ui.sidebar.classList.add("open");
  ui.backdrop.hidden = false;
}

function closeSidebar() {
  ui.sidebar.classList.remove("open");
  ui.backdrop.hidden = true;
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight + 2, 200)}px`;
}

// -- wiring ----------------------------------------------------------------------------------

function bind() {
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
  ui.input.addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; an IME composing Korean or Japanese keeps its Enter.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sendMessage();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.streaming) stop();
    else if (!ui.settings.hidden) ui.closeSettings.click();
    else closeSidebar();
  });

  ui.newChat.addEventListener("click", newChat);
  ui.openSidebar.addEventListener("click", openSidebar);
  ui.closeSidebar.addEventListener("click", closeSidebar);
  ui.backdrop.addEventListener("click", closeSidebar);

  ui.title.addEventListener("input", () => {
    state.current.title = ui.title.value.trim();
    saveSoon();
    renderChatList();
  });
  ui.model.addEventListener("change", () => {
    state.current.model = ui.model.value;
    localStorage.setItem(STORAGE.model, ui.model.value);
    save();
    renderMessages();
  });
  const showSettings = (open) => {
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  };
  ui.settingsToggle.addEventListener("click", () => showSettings(ui.settings.hidden));
  ui.closeSettings.addEventListener("click", () => showSettings(false));
  ui.system.addEventListener("input", () => { state.current.system = ui.system.value; saveSoon(); });
  for (const input of ui.settings.querySelectorAll("[data-option]")) {
    input.addEventListener("input", () => {
      const key = input.dataset.option;
      const value = input.valueAsNumber;  // NaN while empty or not a number: the model's default
      if (Number.isFinite(value)) state.current.options[key] = INTEGER_OPTIONS.has(key) ? Math.trunc(value) : value;
      else delete state.current.options[key];
      saveSoon();
    });
  }
  ui.exportJson.addEventListener("click", () => {
    download(`${fileStem(state.current)}.json`, JSON.stringify(state.current, null, 2), "application/json");
  });
  ui.exportMd.addEventListener("click", () => {
    download(`${fileStem(state.current)}.md`, chatMarkdown(state.current), "text/markdown");
  });
  ui.deleteChat.addEventListener("click", () => deleteChat(state.current));

  ui.messages.addEventListener("click", async (e) => {  // the copy button of a code block
    if (!e.target.matches(".copy-code")) return;
    await copyText(e.target.parentElement.querySelector("code").textContent);
    flash(e.target, "Copied");
  });

  ui.pullForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const name = ui.pullName.value.trim();
    if (name) pull(name);
  });
  ui.themeToggle.addEventListener("click", () => {
    const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem(STORAGE.theme, theme);
    applyTheme(theme);
  });
  window.addEventListener("pagehide", save);
  window.addEventListener("storage", (e) => {  // another tab changed the conversations
    if (e.key !== STORAGE.chats || state.streaming) return;
    const id = state.current.id;
    state.chats = loadChats();
    state.current = state.chats.find((c) => c.id === id) || state.chats[0] || makeChat();
    render();
  });
}

async function main() {
  state.chats = loadChats();
  state.chats.sort((a, b) => b.updated - a.updated);
  const currentId = localStorage.getItem(STORAGE.current);
  state.current = state.chats.find((c) => c.id === currentId) || state.chats[0] || makeChat();
  applyTheme(document.documentElement.dataset.theme);
  bind();
  render();
  scrollToBottom();
  ui.input.focus();
  await refreshModels();
  refreshLoaded();
  setInterval(() => { if (!document.hidden) refreshLoaded(); }, 5000);
  getJson("/api/version").then((v) => { ui.version.textContent = `llamaherd ${v.version}`; }, () => {});
  document.body.dataset.ready = "true";  // for tests: the models are listed
}

main();
