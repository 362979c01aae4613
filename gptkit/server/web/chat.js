// gptkit chat page: talks to this server's own OpenAI-compatible API with streaming (SSE).
// Model output only ever goes into the page through textContent (never innerHTML), so a
// reply with <script> or <img onerror> is shown as text.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "gptkit.settings";
const KEY_KEY = "gptkit.apiKey";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens"];

const state = {
  mode: "chat",        // "chat": /v1/chat/completions; "completion": /v1/completions (no chat template)
  history: [],         // chat messages so far: {role, content}
  controller: null,    // AbortController of the request in flight
  keyWaiters: [],      // resolvers waiting for the API key form
};

// ------------------------------------------------------------------ settings (localStorage)
function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch (e) { saved = {}; }
  for (const name of SETTINGS) if (saved[name] !== undefined) $(name).value = saved[name];
  return saved;
}

function saveSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  for (const name of SETTINGS) saved[name] = $(name).value;
  saved.model = $("model").value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(saved));
}

function number(name) {
  const v = parseFloat($(name).value);
  return Number.isFinite(v) ? v : undefined;
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
  const select = $("model");
  select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
  const saved = loadSettings().model;
  if (data.some((m) => m.id === saved)) select.value = saved;
  await loadMode();
}

async function loadMode() {
  const res = await api("/tokenizer_info?model=" + encodeURIComponent($("model").value));
  const info = await res.json();
  // Older servers do not say; their chat endpoint is the best guess.
  setMode(info.has_chat_template === false ? "completion" : "chat");
}

function setMode(mode) {
  state.mode = mode;
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

// ------------------------------------------------------------------ messages
function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;  // text, never HTML
  box.append(body);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function addReplyTools(box, text) {
  const actions = document.createElement("div");
  actions.className = "actions";
  const copy = button("Copy", "copy", () => copyText(text, copy));
  const show = button("Show attention", "show-attention", () => toggleAttention(box, text, show));
  actions.append(copy, show);
  box.append(actions);
}

function button(label, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.addEventListener("click", onclick);
  return b;
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
  btn.textContent = "Copied";
  setTimeout(() => { btn.textContent = "Copy"; }, 1500);
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
async function requestBody(text) {
  const body = {
    model: $("model").value, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature"), top_p: number("top_p"), max_tokens: number("max_tokens"),
  };
  if (state.mode === "completion") {
    body.prompt = text;
    if (body.max_tokens === undefined) {  // the rest of the context, as the chat endpoint does by itself
      const res = await api("/tokenize", { method: "POST", body: JSON.stringify({ model: body.model, prompt: text }) });
      const { count, max_model_len } = await res.json();
      body.max_tokens = Math.max(max_model_len - count, 1);
    }
    return ["/v1/completions", body];
  }
  const system = $("system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
                   { role: "user", content: text }];
  return ["/v1/chat/completions", body];
}

async function send() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.controller) return;
  input.value = "";
  $("notice").hidden = state.mode === "chat";
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const out = box.querySelector(".text");
  const meta = document.createElement("div");
  meta.className = "meta";
  box.append(meta);

  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const stats = { start: performance.now(), first: null, end: null, prompt: null, completion: 0, finish: null };
  let reply = "";
  let chunks = 0;
  try {
    const [path, body] = await requestBody(text);
    const res = await api(path, { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const chunk of events(res)) {
      if (chunk.usage) {
        stats.prompt = chunk.usage.prompt_tokens;
        stats.completion = chunk.usage.completion_tokens;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = state.mode === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (delta) {
        if (stats.first === null) stats.first = performance.now();
        reply += delta;
        chunks += 1;
        out.textContent = reply;  // text, never HTML
        box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) stats.finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") {
      stats.finish = "stopped";
    } else {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = "error: " + e.message;
      box.append(err);
    }
  } finally {
    stats.end = performance.now();
    if (stats.prompt === null) Object.assign(stats, { completion: chunks, counted: true });
    meta.textContent = statsLine(stats);
    box.classList.remove("streaming");
    box.dataset.finish = stats.finish || "error";
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  // a failed request leaves no turn behind; a stopped one keeps what arrived, as it is shown
  if (state.mode === "chat" && reply) state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
  if (reply) addReplyTools(box, state.mode === "completion" ? text + reply : reply);
}

function stop() {
  if (state.controller) state.controller.abort();  // the server cancels the request when the client leaves
}

function newConversation() {
  stop();
  state.history = [];
  $("messages").replaceChildren();
  $("input").focus();
}

// ------------------------------------------------------------------ attention view (/v1/attention)
async function toggleAttention(box, text, btn) {
  let panel = box.querySelector(".attention");
  if (panel) {
    panel.hidden = !panel.hidden;
    btn.textContent = panel.hidden ? "Show attention" : "Hide attention";
    return;
  }
  panel = document.createElement("div");
  panel.className = "attention";
  const layer = document.createElement("select");
  const head = document.createElement("select");
  const controls = document.createElement("div");
  controls.className = "controls";
  controls.append(labelled("layer ", layer), labelled("head ", head));
  const canvas = document.createElement("canvas");
  const caption = document.createElement("div");
  caption.className = "caption";
  panel.append(controls, canvas, caption);
  box.append(panel);
  btn.textContent = "Hide attention";

  let maps = null;
  async function load(l) {
    caption.textContent = "running the model…";
    try {
      const res = await api("/v1/attention", { method: "POST",
        body: JSON.stringify({ model: $("model").value, text, layer: l }) });
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
    drawHeatmap(canvas, caption, maps.tokens, w);
    panel.dataset.tokens = String(maps.tokens.length);
    caption.textContent = `layer ${maps.layer} · head ${head.value} · ${maps.tokens.length} tokens` +
      (maps.truncated ? " (the first tokens only: the text is longer than the context)" : "") +
      " · each row: which earlier tokens that token attends to";
  }
  layer.addEventListener("change", () => load(+layer.value));
  head.addEventListener("change", draw);
  await load(null);
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

// A heatmap on a canvas: row i = query token i, column j = key token j; labels drawn as text.
function drawHeatmap(canvas, caption, tokens, w) {
  const T = tokens.length;
  const ctx = canvas.getContext("2d");
  const font = '12px system-ui, "Noto Sans CJK SC", sans-serif';
  ctx.font = font;
  const margin = Math.min(120, 12 + Math.max(...tokens.map((t) => ctx.measureText(t).width)));
  const cell = Math.max(6, Math.min(28, Math.floor(560 / T)));
  const scale = window.devicePixelRatio || 1;
  canvas.width = (margin + T * cell + 4) * scale;
  canvas.height = (margin + T * cell + 4) * scale;
  canvas.style.width = `${margin + T * cell + 4}px`;
  ctx.scale(scale, scale);
  ctx.font = font;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, margin + T * cell + 4, margin + T * cell + 4);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      const v = w[i][j];
      ctx.fillStyle = `rgb(${Math.round(255 - 218 * v)}, ${Math.round(255 - 156 * v)}, ${Math.round(255 - 20 * v)})`;
      ctx.fillRect(margin + j * cell, margin + i * cell, cell, cell);
    }
  }
  ctx.fillStyle = "#1f2328";
  ctx.textBaseline = "middle";
  const step = Math.ceil(12 / cell);  // skip labels when the cells are smaller than the text
  for (let i = 0; i < T; i += step) {
    ctx.textAlign = "right";
    ctx.fillText(tokens[i], margin - 4, margin + (i + 0.5) * cell, margin - 6);
    ctx.save();
    ctx.translate(margin + (i + 0.5) * cell, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(tokens[i], 0, 0, margin - 6);
    ctx.restore();
  }
  canvas.onmousemove = (e) => {
    const r = canvas.getBoundingClientRect();
    const k = (margin + T * cell + 4) / r.width;
    const j = Math.floor(((e.clientX - r.left) * k - margin) / cell);
    const i = Math.floor(((e.clientY - r.top) * k - margin) / cell);
    if (i >= 0 && j >= 0 && i < T && j < T) {
      caption.textContent = `“${tokens[i]}” (${i}) → “${tokens[j]}” (${j}): ${w[i][j].toFixed(3)}`;
    }
  };
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
$("new").addEventListener("click", newConversation);
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
for (const name of SETTINGS) $(name).addEventListener("change", saveSettings);
$("model").addEventListener("change", () => { saveSettings(); newConversation(); loadMode().catch((e) => showError(e.message)); });

loadSettings();
loadModels().catch((e) => showError("could not load the models: " + e.message));
