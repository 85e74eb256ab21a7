// The CodeAct chat page: conversations from /api, turns over one websocket per open conversation.
// Model text goes through Markdown.render (escaped first); outputs go in as text nodes; images as data: URLs
// of image types only; HTML results (a pandas table) in a sandboxed iframe with no scripts.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conversations: [], current: null, socket: null, busy: false, draft: null, cell: null };

function cookie(name) {
  const found = document.cookie.split("; ").find((part) => part.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

async function api(method, path, body, raw) {
  const headers = { "X-XSRFToken": cookie("_xsrf") };
  if (body !== undefined && !raw) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: raw ? body : body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) { showLogin(); throw new Error("log in first"); }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.message) || `${response.status} ${response.statusText}`);
  return data;
}

function showLogin() {
  $("log").replaceChildren(element("div", "notice", "This server needs its token: open /login?token=<token> once."));
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(message, kind = "error") {
  const node = element("div", `notice ${kind}`, message);
  $("log").append(node);
  scrollDown();
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// -- conversations ---------------------------------------------------------------------------------------

async function loadConversations() {
  state.conversations = (await api("GET", "/api/conversations")).conversations;
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const item = element("li", c.id === state.current?.id ? "active" : "");
    const link = element("a", "", c.title);
    link.href = `#${c.id}`;
    item.append(link);
    return item;
  }));
}

async function newConversation() {
  const created = await api("POST", "/api/conversations", { title: "New conversation" });
  location.hash = created.id;
}

async function openConversation(id) {
  if (state.socket) { state.socket.onclose = null; state.socket.close(); }
  const { conversation, items } = await api("GET", `/api/conversations/${id}`);
  state.current = conversation;
  state.draft = state.cell = null;
  $("title").textContent = conversation.title;
  document.title = `${conversation.title} - CodeAct`;
  $("export-jsonl").href = `/api/conversations/${id}/export?format=jsonl`;
  $("export-sharegpt").href = `/api/conversations/${id}/export?format=sharegpt`;
  const form = $("settings-form");
  for (const key of ["llm_url", "model", "timeout", "max_executions"]) form.elements[key].value = conversation.settings[key] ?? "";
  $("log").replaceChildren();
  for (const item of items) showItem(item);
  setKernel("idle");
  await loadConversations();
  connect(id);
  await loadFiles();
  document.body.classList.remove("sidebar-open");
}

function connect(id) {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/conversations/${id}/ws`);
  state.socket = socket;
  socket.onmessage = (message) => onEvent(JSON.parse(message.data));
  socket.onclose = () => { if (state.socket === socket) { setBusy(false); say("Disconnected from the server; reload the page to reconnect."); } };
}

// -- a turn's events -------------------------------------------------------------------------------------

function onEvent(event) {
  switch (event.type) {
    case "hello": setBusy(event.busy); break;
    case "delta": onDelta(event.text); break;
    case "cell_start": startCell(event.code); setKernel("running"); break;
    case "output": addStream(state.cell, event.name, event.text); break;
    case "result": addResult(state.cell, event.kind, event.data); break;
    case "item": showItem(event); if (event.kernel) setKernel(event.kernel); break;
    case "error": say(event.message); break;
    case "deleted": say("This conversation was deleted.", "info"); setBusy(false); break;
    case "title": $("title").textContent = event.title; document.title = `${event.title} - CodeAct`; loadConversations(); break;
  }
  scrollDown();
}

function onDelta(text) {
  if (!state.draft) {
    state.draft = { text: "", node: element("div", "message assistant draft") };
    $("log").append(state.draft.node);
  }
  state.draft.text += text;
  state.draft.node.innerHTML = Markdown.render(state.draft.text, true);
}

function showItem(item) {
  const { kind, data } = item;
  if (kind === "user") {
    $("log").append(element("div", "message user", data.text));
    setBusy(true);
  } else if (kind === "assistant") {
    const node = state.draft ? state.draft.node : element("div", "message assistant");
    node.classList.remove("draft");
    node.innerHTML = Markdown.render(data.text, true);
    if (!state.draft) $("log").append(node);
    if (!node.textContent.trim()) node.remove();
    state.draft = null;
  } else if (kind === "cell") {
    const live = state.cell;  // streamed into already; from the store (a reload), its outputs are added here
    const cell = live || startCell(data.code);
    if (!live) for (const output of data.outputs) output.type === "stream" ? addStream(cell, output.name, output.text) : addResult(cell, output.type, output.data);
    finishCell(cell, data);
    state.cell = null;
  } else if (kind === "end") {
    if (data.stop_reason !== "answer") say(`Stopped: ${data.stop_reason.replace("_", " ")}.`, "info");
    setBusy(false);
    loadFiles();
    loadConversations();
  } else if (kind === "error") {
    say(data.message);
    setBusy(false);
  }
}

function startCell(code) {
  const cell = element("div", "cell running");
  const source = element("div", "code");
  source.innerHTML = `<button type="button" class="copy" title="Copy">Copy</button><pre><code>${Markdown.highlight(code)}</code></pre>`;
  const outputs = element("div", "outputs");
  const status = element("div", "cell-status", "running...");
  cell.append(source, outputs, status);
  $("log").append(cell);
  state.cell = cell;
  return cell;
}

function addStream(cell, name, text) {
  if (!cell) return;
  const outputs = cell.querySelector(".outputs");
  let last = outputs.lastElementChild;
  if (!last || !last.classList.contains(name)) { last = element("pre", `stream ${name}`); outputs.append(last); }
  last.textContent += text;
}

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif"];

function addResult(cell, kind, data) {
  if (!cell) return;
  const outputs = cell.querySelector(".outputs");
  const image = IMAGE_TYPES.find((type) => typeof data[type] === "string");
  if (image) {
    const img = element("img", "result-image");
    img.src = `data:${image};base64,${data[image].replace(/[^A-Za-z0-9+/=]/g, "")}`;
    img.alt = data["text/plain"] || "image";
    outputs.append(img);
  } else if (typeof data["text/html"] === "string") {
    const frame = element("iframe", "result-html");
    frame.setAttribute("sandbox", "");  // no scripts, no same origin: a table to look at, nothing more
    frame.srcdoc = `<style>body{font:13px sans-serif;margin:0}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>${data["text/html"]}`;
    frame.onload = () => { try { frame.style.height = "0"; } catch (e) { /* sandboxed: keep the CSS height */ } };
    outputs.append(frame);
  } else if (typeof data["text/plain"] === "string") {
    outputs.append(element("pre", "stream result", data["text/plain"]));
  }
}

function finishCell(cell, data) {
  cell.classList.remove("running");
  cell.classList.add(data.status === "ok" ? "ok" : "failed");
  if (data.error) {
    const traceback = element("pre", "stream error", `${data.error.name}: ${data.error.value}\n${(data.error.traceback || []).join("\n")}`);
    cell.querySelector(".outputs").append(traceback);
  }
  const seconds = data.duration_ms !== undefined ? ` in ${(data.duration_ms / 1000).toFixed(2)} s` : "";
  const notes = { restarted: "the kernel was restarted: earlier variables are gone", died: "the kernel died and was replaced: earlier variables are gone", timeout: "timed out" };
  cell.querySelector(".cell-status").textContent = `${data.status}${seconds}${notes[data.status] ? ": " + notes[data.status] : ""}${data.message ? " (" + data.message + ")" : ""}`;
}

function setKernel(kernelState) {
  const node = $("kernel");
  node.className = `kernel ${kernelState}`;
  node.textContent = { running: "kernel running", idle: "kernel idle", restarted: "kernel restarted: earlier variables are gone" }[kernelState] || kernelState;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// -- files -----------------------------------------------------------------------------------------------

async function loadFiles() {
  if (!state.current) return;
  const id = state.current.id;
  let files = [];
  try { files = (await api("GET", `/api/conversations/${id}/files`)).files; } catch (error) { return; }
  $("files").replaceChildren(...files.filter((f) => !f.path.startsWith(".")).map((f) => {
    const link = element("a", "file", f.path);
    link.href = `/api/conversations/${id}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`;
    link.setAttribute("download", f.path.split("/").pop());
    return link;
  }));
}

async function upload(files) {
  for (const file of files) {
    try {
      await api("PUT", `/api/conversations/${state.current.id}/files/${encodeURIComponent(file.name)}`, file, true);
      say(`Uploaded ${file.name}: the code can open it as '${file.name}'.`, "info");
    } catch (error) { say(`Upload of ${file.name} failed: ${error.message}`); }
  }
  $("upload").value = "";
  await loadFiles();
}

// -- wiring ----------------------------------------------------------------------------------------------

function send() {
  const text = $("message").value;
  if (!text.trim() || !state.socket || state.busy) return;
  state.socket.send(JSON.stringify({ type: "send", text }));
  $("message").value = "";
}

document.addEventListener("DOMContentLoaded", async () => {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.socket && state.socket.send(JSON.stringify({ type: "stop" })));
  $("new").addEventListener("click", () => newConversation().catch((error) => say(error.message)));
  $("rename").addEventListener("click", async () => {
    const title = prompt("Title", state.current?.title || "");
    if (title === null || !state.current) return;
    try { const updated = await api("PATCH", `/api/conversations/${state.current.id}`, { title }); state.current = updated; $("title").textContent = updated.title; await loadConversations(); } catch (error) { say(error.message); }
  });
  $("delete").addEventListener("click", async () => {
    if (!state.current || !confirm(`Delete "${state.current.title}"?`)) return;
    try { await api("DELETE", `/api/conversations/${state.current.id}`); state.current = null; location.hash = ""; await start(); } catch (error) { say(error.message); }
  });
  $("settings-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target, settings = {};
    for (const key of ["llm_url", "model"]) if (form.elements[key].value) settings[key] = form.elements[key].value;
    for (const key of ["timeout", "max_executions"]) if (form.elements[key].value !== "") settings[key] = Number(form.elements[key].value);
    try { state.current = await api("PATCH", `/api/conversations/${state.current.id}`, { settings }); $("settings-state").textContent = "Saved: used from the next message (with a fresh kernel)."; } catch (error) { $("settings-state").textContent = error.message; }
  });
  $("upload").addEventListener("change", (event) => upload([...event.target.files]));
  $("log").addEventListener("click", (event) => {
    if (!event.target.classList.contains("copy")) return;
    const code = event.target.parentElement.querySelector("code").textContent;
    navigator.clipboard.writeText(code).then(() => { event.target.textContent = "Copied"; setTimeout(() => { event.target.textContent = "Copy"; }, 1500); });
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  window.addEventListener("hashchange", () => start().catch((error) => say(error.message)));
  await start().catch((error) => say(error.message));
});

async function showServerConfig() {
  const { defaults, mcp_servers: servers } = await api("GET", "/api/config");
  const form = $("settings-form");
  for (const key of ["llm_url", "model", "timeout", "max_executions"]) if (defaults[key] !== null) form.elements[key].placeholder = String(defaults[key]);
  $("server-config").textContent = servers.length
    ? `Tools from MCP servers (set by the operator): ${servers.map((s) => `${s.name} (${s.transport})`).join(", ")}`
    : "No MCP servers configured (codeact web --mcp-config).";
}

async function start() {
  showServerConfig().catch(() => {});
  await loadConversations();
  const wanted = location.hash.slice(1);
  if (wanted && state.conversations.some((c) => c.id === wanted)) return openConversation(wanted);
  if (state.conversations.length) { location.hash = state.conversations[0].id; return; }
  await newConversation();
}
