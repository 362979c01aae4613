// gptkit chat page: talks to this server's own OpenAI-compatible API with streaming (SSE).
// Conversations live in this browser (localStorage); the API key only in this tab (sessionStorage).
// Model output only ever enters the page as text nodes (markdown.js builds the DOM node by node),
// so a reply with <script>, <img onerror> or a javascript: link is shown, never run.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "gptkit.conversations";   // [{id, title, model, settings, messages, updated}]
const DEFAULTS = "gptkit.defaults";     // the settings a new conversation starts with
const THEME = "gptkit.theme";           // "auto" (the system's), "light" or "dark"
const KEY_KEY = "gptkit.apiKey";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens"];
const FIRST_SETTINGS = { system: "", temperature: "0.8", top_p: "1", max_tokens: "" };

const state = {
  conversations: [],
  current: null,       // the conversation shown
  modes: {},           // model -> "chat" | "completion" (no chat template: /v1/completions)
  controller: null,    // AbortController of the request in flight
  keyWaiters: [],      // resolvers waiting for the API key form
};

// ------------------------------------------------------------------ storage
function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch (e) { return fallback; }
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations));
  } catch (e) {  // the browser's quota: say so, keep going in memory
    showError("this browser's storage is full: older conversations cannot be kept (delete some)");
  }
}

function newConversation(model) {
  const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
                 model: model || $("model").value, settings: { ...FIRST_SETTINGS, ...load(DEFAULTS, {}) },
                 messages: [], updated: Date.now() };
  state.conversations.unshift(conv);
  return conv;
}

function touch(conv) {
  conv.updated = Date.now();
  state.conversations.sort((a, b) => b.updated - a.updated);
  save();
  renderList();
}

// ------------------------------------------------------------------ API calls (key in sessionStorage)
function askKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  $("key").focus();
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_KEY, key);
  $("key-form").hidden = true;
  $("key").value = "";
  state.keyWaiters.splice(0).forEach((resolve) => resolve());
});

async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_KEY);
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    const res = await fetch(path, { ...options, headers });
    if (res.status === 401) {  // ask for the key (again), then retry
      const body = await res.json().catch(() => null);
      sessionStorage.removeItem(KEY_KEY);
      await askKey(key ? (body && body.error && body.error.message) || "incorrect API key" : "");
      continue;
    }
    if (!res.ok) {
      const body = await res.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || `HTTP ${res.status}`);
    }
    return res;
  }
}

// Server-sent events of a streamed response: yields each `data:` JSON until [DONE].
async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        yield chunk;
      }
    }
  }
}

// ------------------------------------------------------------------ models and mode
async function loadModels() {
  const res = await api("/v1/models");
  const { data } = await res.json();
  $("model").replaceChildren(...data.map((m) => new Option(m.id, m.id)));
  const models = data.map((m) => m.id);
  for (const conv of state.conversations) if (!models.includes(conv.model)) conv.model = models[0];
  const conv = state.conversations[0] || newConversation(models[0]);
  await openConversation(conv);
}

async function modeOf(model) {
  if (!state.modes[model]) {
    const res = await api("/tokenizer_info?model=" + encodeURIComponent(model));
    const info = await res.json();
    state.modes[model] = info.has_chat_template === false ? "completion" : "chat";
  }
  return state.modes[model];
}

function showMode(mode) {
  $("mode").textContent = mode === "chat" ? "chat" : "completion mode";
  const notice = $("notice");
  if (mode === "completion") {
    notice.textContent = "This model has no chat template (it was not fine-tuned for chat), so the page is in " +
      "completion mode: write the start of a text and the model continues it (/v1/completions).";
    notice.hidden = false;
    $("input").placeholder = "Text for the model to continue (Enter sends)";
  } else {
    notice.hidden = true;
    $("input").placeholder = "Message (Enter sends, Shift+Enter for a new line)";
  }
}

function showError(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = false;
}

// ------------------------------------------------------------------ the conversation list
function renderList() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((conv) => {
    const item = el("li", conv === state.current ? "current" : null);
    item.dataset.id = conv.id;
    const open = button(conv.title, "open", () => { if (!state.controller) openConversation(conv); });
    open.title = conv.title;
    const rename = button("✎", "rename", () => renameConversation(conv, item));
    rename.title = rename.ariaLabel = "rename";
    const remove = button("✕", "delete", () => deleteConversation(conv));
    remove.title = remove.ariaLabel = "delete";
    item.append(open, rename, remove);
    return item;
  }));
}

function renameConversation(conv, item) {
  const input = el("input", "rename-input");
  input.value = conv.title;
  item.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) conv.title = input.value.trim().slice(0, 80);
    save();
    renderList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229) finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function deleteConversation(conv) {
  if (conv === state.current) stop();
  state.conversations = state.conversations.filter((c) => c !== conv);
  save();
  if (conv === state.current) openConversation(state.conversations[0] || newConversation());
  else renderList();
}

async function openConversation(conv) {
  state.current = conv;
  if ([...$("model").options].some((o) => o.value === conv.model)) $("model").value = conv.model;
  for (const name of SETTINGS) $(name).value = conv.settings[name] ?? FIRST_SETTINGS[name];
  renderList();
  renderMessages();
  document.body.classList.remove("list-open");
  try {
    showMode(await modeOf(conv.model));
  } catch (e) {
    showError(e.message);
  }
}

// ------------------------------------------------------------------ messages
// (el(tag, cls, text) comes from markdown.js, loaded first)
function button(label, cls, onclick) {
  const b = el("button", cls, label);
  b.type = "button";
  b.addEventListener("click", onclick);
  return b;
}

function renderMessages() {
  const conv = state.current;
  $("messages").replaceChildren(...conv.messages.map((m, i) => messageBox(conv, m, i)));
  const last = $("messages").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

function setText(body, text, markdown) {
  if (markdown) body.replaceChildren(renderMarkdown(text, copyText));
  else body.textContent = text;  // text, never HTML
}

function messageBox(conv, m, index) {
  const box = el("div", "msg " + m.role);
  const body = el("div", "text");
  setText(body, m.content, m.role === "assistant" && m.mode !== "completion");
  box.append(body);
  if (m.meta) box.append(el("div", "meta", m.meta));
  if (m.finish) box.dataset.finish = m.finish;
  if (m.error) box.append(el("div", "error", "error: " + m.error));
  const actions = el("div", "actions");
  if (m.role === "user") {
    actions.append(button("Edit", "edit", () => editMessage(conv, index, box)));
  } else if (m.content) {
    const copy = button("Copy", "copy", () => copyText(m.content, copy));
    const show = button("Show attention", "show-attention", () => toggleAttention(conv, index, box, show));
    actions.append(copy, show);
    if (index === conv.messages.length - 1) actions.append(button("Regenerate", "regenerate", () => regenerate(conv)));
  }
  box.append(actions);
  return box;
}

function editMessage(conv, index, box) {
  if (state.controller) return;
  const area = el("textarea", "edit-input");
  area.value = conv.messages[index].content;
  area.rows = Math.min(8, area.value.split("\n").length + 1);
  const send = button("Send", "resend", () => {
    if (!area.value.trim()) return;
    conv.messages = conv.messages.slice(0, index);  // what came after the edited message is replaced
    run(conv, area.value);
  });
  const cancel = button("Cancel", "cancel", renderMessages);
  const actions = el("div", "actions");
  actions.append(send, cancel);
  box.replaceChildren(area, actions);
  area.focus();
}

function regenerate(conv) {
  if (state.controller) return;
  const last = conv.messages.length - 1;
  if (last < 1 || conv.messages[last].role !== "assistant") return;
  const prompt = conv.messages[last - 1].content;
  conv.messages = conv.messages.slice(0, last - 1);
  run(conv, prompt);
}

async function copyText(text, btn) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (e.g. not a secure context): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = btn.textContent;
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = label; }, 1500);
}

function statsLine(s) {
  const seconds = (s.end - s.start) / 1000;
  const rate = seconds > 0 ? (s.completion / seconds).toFixed(1) : "–";
  const parts = [];
  if (s.prompt !== null) parts.push(`${s.prompt} prompt tokens`);
  const approx = s.counted ? "≈" : "";  // no usage chunk (a stopped stream): streamed pieces were counted
  parts.push(`${approx}${s.completion} tokens in ${seconds.toFixed(2)} s (${approx}${rate} tokens/s)`);
  if (s.first !== null) parts.push(`first token after ${((s.first - s.start) / 1000).toFixed(2)} s`);
  if (s.finish) parts.push(s.finish === "stopped" ? "stopped by you" : `finish: ${s.finish}`);
  return parts.join(" · ");
}

// ------------------------------------------------------------------ sending
function number(value) {
  const v = parseFloat(value);
  return Number.isFinite(v) ? v : undefined;
}

async function requestBody(conv, mode, text) {
  const s = conv.settings;
  const body = {
    model: conv.model, stream: true, stream_options: { include_usage: true },
    temperature: number(s.temperature), top_p: number(s.top_p), max_tokens: number(s.max_tokens),
  };
  if (mode === "completion") {
    body.prompt = text;
    if (body.max_tokens === undefined) {  // the rest of the context, as the chat endpoint does by itself
      const res = await api("/tokenize", { method: "POST", body: JSON.stringify({ model: body.model, prompt: text }) });
      const { count, max_model_len } = await res.json();
      body.max_tokens = Math.max(max_model_len - count, 1);
    }
    return ["/v1/completions", body];
  }
  body.messages = chatMessages(conv, conv.messages.length);
  return ["/v1/chat/completions", body];
}

// The messages the model sees for the first `end` turns: the system prompt, then the turns.
function chatMessages(conv, end) {
  const system = (conv.settings.system || "").trim();
  return [...(system ? [{ role: "system", content: system }] : []),
          ...conv.messages.slice(0, end).map((m) => ({ role: m.role, content: m.content }))];
}

function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  input.value = "";
  run(state.current, text);
}

// One turn: the user's text, then the reply streamed into the page and kept in the conversation.
async function run(conv, text) {
  const mode = await modeOf(conv.model).catch(() => "chat");
  $("notice").hidden = mode === "chat";
  if (!conv.messages.length && conv.title === "New chat") conv.title = text.trim().split("\n")[0].slice(0, 40);
  conv.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", mode };
  touch(conv);
  renderMessages();
  const box = messageBox(conv, reply, conv.messages.length);
  box.classList.add("streaming");
  box.querySelector(".actions").replaceChildren();
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  const out = box.querySelector(".text");

  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const stats = { start: performance.now(), first: null, end: null, prompt: null, completion: 0, finish: null };
  let chunks = 0;
  let pending = false;
  const paint = () => { pending = false; setText(out, reply.content, mode === "chat"); };
  try {
    const [path, body] = await requestBody(conv, mode, text);
    const res = await api(path, { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const chunk of events(res)) {
      if (chunk.usage) {
        stats.prompt = chunk.usage.prompt_tokens;
        stats.completion = chunk.usage.completion_tokens;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (delta) {
        if (stats.first === null) stats.first = performance.now();
        reply.content += delta;
        chunks += 1;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
      if (choice.finish_reason) stats.finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") stats.finish = "stopped";
    else reply.error = e.message;
  } finally {
    stats.end = performance.now();
    if (stats.prompt === null) Object.assign(stats, { completion: chunks, counted: true });
    reply.meta = statsLine(stats);
    reply.finish = stats.finish || "error";
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  // a failed request leaves its error in place of a reply; a stopped one keeps what arrived, as shown
  if (reply.content) conv.messages.push(reply);
  else if (reply.error) conv.messages.pop();
  touch(conv);
  if (conv !== state.current) return;
  renderMessages();
  if (!reply.content) {  // nothing to keep: show what happened where the reply would have been
    const failed = messageBox(conv, reply, conv.messages.length);
    $("messages").append(failed);
    failed.scrollIntoView({ block: "end" });
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // the server cancels the request when the client leaves
}

// ------------------------------------------------------------------ attention view (/v1/attention)
// The whole conversation up to this reply runs through the model; the reply's rows are marked.
async function toggleAttention(conv, index, box, btn) {
  let panel = box.querySelector(".attention");
  if (panel) {
    panel.hidden = !panel.hidden;
    btn.textContent = panel.hidden ? "Show attention" : "Hide attention";
    return;
  }
  panel = el("div", "attention");
  const layer = el("select");
  const head = el("select");
  const controls = el("div", "controls");
  controls.append(labelled("layer ", layer), labelled("head ", head));
  const canvas = el("canvas");
  const caption = el("div", "caption");
  panel.append(controls, canvas, caption);
  box.append(panel);
  btn.textContent = "Hide attention";

  const m = conv.messages[index];
  const request = m.mode === "completion"
    ? { model: conv.model, text: conv.messages[index - 1].content, reply: m.content }
    : { model: conv.model, messages: chatMessages(conv, index + 1) };
  let maps = null;
  async function loadLayer(l) {
    caption.textContent = "running the model…";
    try {
      const res = await api("/v1/attention", { method: "POST", body: JSON.stringify({ ...request, layer: l }) });
      maps = await res.json();
    } catch (e) {
      caption.textContent = "error: " + e.message;
      return;
    }
    if (!layer.options.length) {
      for (let i = 0; i < maps.n_layer; i++) layer.append(new Option(String(i), String(i)));
      head.append(new Option("average", "avg"));
      for (let i = 0; i < maps.n_head; i++) head.append(new Option(String(i), String(i)));
      head.value = "0";
    }
    layer.value = String(maps.layer);
    draw();
  }
  function draw() {
    const w = head.value === "avg" ? average(maps.weights) : maps.weights[+head.value];
    const marked = maps.marked || [0, 0];
    drawHeatmap(canvas, caption, maps.tokens, w, marked);
    panel.dataset.tokens = String(maps.tokens.length);
    panel.dataset.marked = marked.join(",");
    caption.textContent = `layer ${maps.layer} · head ${head.value} · ${maps.tokens.length} tokens` +
      (maps.truncated ? " (the conversation's last tokens only: it is longer than the map allows)" : "") +
      ` · rows ${marked[0]}–${marked[1] - 1} (marked) are the reply; each row: which earlier tokens that token` +
      " attends to";
  }
  layer.addEventListener("change", () => loadLayer(+layer.value));
  head.addEventListener("change", draw);
  await loadLayer(null);
}

function labelled(text, control) {
  const label = document.createElement("label");
  label.append(text, control);
  return label;
}

function average(weights) {
  const T = weights[0].length;
  return Array.from({ length: T }, (_, i) => Array.from({ length: T },
    (_, j) => weights.reduce((sum, h) => sum + h[i][j], 0) / weights.length));
}

// A heatmap on a canvas: row i = query token i, column j = key token j; the masked triangle (keys
// after the query) left blank; the reply's rows marked by a bar at the left and coloured labels.
function drawHeatmap(canvas, caption, tokens, w, marked) {
  const T = tokens.length;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const ctx = canvas.getContext("2d");
  const font = '12px system-ui, "Noto Sans CJK SC", sans-serif';
  ctx.font = font;
  const margin = Math.min(120, 18 + Math.max(...tokens.map((t) => ctx.measureText(t).width)));
  const cell = Math.max(4, Math.min(28, Math.floor(560 / T)));
  const size = margin + T * cell + 4;
  const scale = window.devicePixelRatio || 1;
  canvas.width = size * scale;
  canvas.height = size * scale;
  canvas.style.width = `${size}px`;
  ctx.scale(scale, scale);
  ctx.font = font;
  ctx.fillStyle = color("--panel");
  ctx.fillRect(0, 0, size, size);
  const [low, high] = [color("--heat-low"), color("--heat-high")].map((c) => c.match(/\d+/g).map(Number));
  for (let i = 0; i < T; i++) {
    for (let j = 0; j <= i; j++) {  // j > i: masked, never attended: blank
      const v = w[i][j];
      ctx.fillStyle = `rgb(${low.map((a, k) => Math.round(a + (high[k] - a) * v)).join(",")})`;
      ctx.fillRect(margin + j * cell, margin + i * cell, cell, cell);
    }
  }
  ctx.fillStyle = color("--accent");
  if (marked[1] > marked[0]) ctx.fillRect(margin - 5, margin + marked[0] * cell, 4, (marked[1] - marked[0]) * cell);
  ctx.textBaseline = "middle";
  const step = Math.ceil(12 / cell);  // skip labels when the cells are smaller than the text
  for (let i = 0; i < T; i += step) {
    ctx.fillStyle = i >= marked[0] && i < marked[1] ? color("--accent") : color("--text");
    ctx.textAlign = "right";
    ctx.fillText(tokens[i], margin - 8, margin + (i + 0.5) * cell, margin - 10);
    ctx.save();
    ctx.translate(margin + (i + 0.5) * cell, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillStyle = color("--text");
    ctx.fillText(tokens[i], 0, 0, margin - 6);
    ctx.restore();
  }
  canvas.onmousemove = (e) => {
    const r = canvas.getBoundingClientRect();
    const k = size / r.width;
    const j = Math.floor(((e.clientX - r.left) * k - margin) / cell);
    const i = Math.floor(((e.clientY - r.top) * k - margin) / cell);
    if (i >= 0 && j >= 0 && i < T && j <= i) {
      caption.textContent = `“${tokens[i]}” (${i}) → “${tokens[j]}” (${j}): ${w[i][j].toFixed(3)}`;
    }
  };
}

// ------------------------------------------------------------------ theme
function applyTheme(theme) {
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  $("theme").value = theme;
  localStorage.setItem(THEME, theme);
}

// ------------------------------------------------------------------ wiring
$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  // Enter sends, but not while an input method is composing (Chinese, Japanese, ...): there
  // Enter picks the candidate. keyCode 229 is what some browsers report during composition.
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", () => {
  stop();
  const empty = state.conversations.find((c) => !c.messages.length);  // reuse an empty one
  openConversation(empty || newConversation(state.current && state.current.model));
  $("input").focus();
});
$("list-toggle").addEventListener("click", () => document.body.classList.toggle("list-open"));
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
for (const name of SETTINGS) {
  $(name).addEventListener("change", () => {  // this conversation's, and the next new one's
    state.current.settings[name] = $(name).value;
    localStorage.setItem(DEFAULTS, JSON.stringify({ ...load(DEFAULTS, {}), [name]: $(name).value }));
    save();
  });
}
$("model").addEventListener("change", () => {
  stop();
  const conv = state.current.messages.length ? newConversation($("model").value) : state.current;
  conv.model = $("model").value;
  save();
  openConversation(conv);
});
$("theme").addEventListener("change", () => applyTheme($("theme").value));

applyTheme(localStorage.getItem(THEME) || "auto");
state.conversations = load(STORE, []).filter((c) => c && Array.isArray(c.messages));
loadModels().catch((e) => showError("could not load the models: " + e.message));
