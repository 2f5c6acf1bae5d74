// trio-echo admin dashboard: talks only to the origin that served it (HTTP for /auth, WebSocket /ws).
"use strict";

const HISTORY_SECONDS = 300;
const MAX_TRACE_LINES = 500;
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  ws: null,
  retry: 0,
  history: [],          // {t, active, rate}
  last: null,           // previous stats message, for rates
  connectionsTimer: null,
};

// ---- formatting -------------------------------------------------------------------------------
function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : String(n)) + " " + units[i];
}
function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}
function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "pill pill-" + kind;
}

// ---- token ------------------------------------------------------------------------------------
function tokenFromFragment() {
  const match = /(?:^|[#&])token=([A-Za-z0-9_-]+)/.exec(location.hash);
  if (match) {
    history.replaceState(null, "", location.pathname);  // keep it out of the address bar
    return match[1];
  }
  return null;
}

async function checkToken(token) {
  // 204: good token; 401: wrong token; anything else (or no answer): the server is not reachable.
  try {
    const response = await fetch("/auth", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    if (response.status === 204) return "ok";
    if (response.status === 401) return "bad";
    return "down";
  } catch (e) {
    return "down";
  }
}

function showLogin(message, isError) {
  $("main").hidden = true;
  $("login").hidden = false;
  const text = $("login-message");
  if (message) text.textContent = message;
  text.className = isError ? "error" : "";
  $("token-input").focus();
}

async function start(token) {
  const verdict = await checkToken(token);
  if (verdict === "bad") {
    sessionStorage.removeItem("trio-echo-token");
    setStatus("wrong token", "bad");
    showLogin("That token was not accepted by this server. Check admin-PORT.token in its runtime directory.", true);
    return;
  }
  state.token = token;
  sessionStorage.setItem("trio-echo-token", token);
  $("login").hidden = true;
  $("main").hidden = false;
  if (verdict === "down") { scheduleReconnect(); return; }
  connect();
}

// ---- channel ----------------------------------------------------------------------------------
function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

// One page of the table (the server filters, sorts and pages, and reads TCP_INFO only for these
// rows), so a refresh costs the same with 20,000 connections as with 500.
const PAGE_SIZE = 100;

function requestConnections() {
  const filter = $("conn-filter").value.trim();
  send(filter ? { type: "connections", limit: PAGE_SIZE, filter } : { type: "connections", limit: PAGE_SIZE });
}

function selectedFlags() {
  return [...document.querySelectorAll("#flags input:checked")].map((i) => i.value).join(",");
}

function connect() {
  setStatus("connecting…", "wait");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`, ["trio-echo.v1", "token." + state.token]);
  state.ws = ws;
  ws.onopen = () => {
    state.retry = 0;
    setStatus("live", "ok");
    send({ type: "subscribe", flags: selectedFlags() });
    requestConnections();
    clearInterval(state.connectionsTimer);
    state.connectionsTimer = setInterval(requestConnections, 2000);
  };
  ws.onmessage = (event) => handle(JSON.parse(event.data));
  ws.onclose = () => {
    clearInterval(state.connectionsTimer);
    if (state.ws === ws) scheduleReconnect();
  };
}

async function scheduleReconnect() {
  state.ws = null;
  const delay = Math.min(10000, 500 * 2 ** state.retry++);
  setStatus(`reconnecting in ${Math.round(delay / 1000)} s`, "wait");
  await new Promise((resolve) => setTimeout(resolve, delay));
  const verdict = await checkToken(state.token);
  if (verdict === "bad") { start(state.token); return; }   // the server restarted with another token
  if (verdict === "down") { scheduleReconnect(); return; }
  connect();
}

function handle(message) {
  switch (message.type) {
    case "hello": return onHello(message);
    case "stats": return onStats(message);
    case "connections": return onConnections(message.items, message.total);
    case "trace": return onTrace(message.event);
    case "close": return onClosed(message.id);
    case "set_trace_flags": return showServerFlags(message.flags);
    case "set_faults":
      $("faults-message").textContent = `${message.listener}: ${describeFaults(message.faults)}`;
      return undefined;
    case "error":
      if (String(message.message).startsWith("set_faults")) $("faults-message").textContent = message.message;
      return onTrace({ ts: Date.now() / 1000, flag: "error", event: "admin.error", message: message.message });
    default: return undefined;
  }
}

function showServerFlags(flags) {
  state.serverFlags = flags;
  $("server-flags").textContent = flags || "nothing";
}

function onHello(message) {
  showServerFlags(message.trace_flags);
  $("version").textContent = "v" + message.version;
  document.title = `trio-echo · ${location.host}`;
}

function onStats(message) {
  const c = message.connections;
  $("active").textContent = c.active;
  $("total").textContent = c.total;
  $("refused").textContent = c.refused;
  $("bytes-in").textContent = bytes(message.bytes.in);
  $("bytes-out").textContent = bytes(message.bytes.out);
  $("uptime").textContent = duration(message.uptime);
  let rateIn = 0, rateOut = 0;
  if (state.last && message.uptime > state.last.uptime) {
    const dt = message.uptime - state.last.uptime;
    rateIn = Math.max(0, (message.bytes.in - state.last.bytes.in) / dt);
    rateOut = Math.max(0, (message.bytes.out - state.last.bytes.out) / dt);
  }
  $("rate-in").textContent = bytes(Math.round(rateIn)) + "/s";
  $("rate-out").textContent = bytes(Math.round(rateOut)) + "/s";
  state.last = message;
  const listeners = $("listeners");
  listeners.replaceChildren(...message.listeners.map((l) => {
    const chip = document.createElement("span");
    chip.textContent = l.address;
    const count = document.createElement("b");
    count.textContent = l.active;
    chip.append(count);
    return chip;
  }));
  showWorkers(message.workers, c.active);
  showFaults(message.faults || {}, message.fault_profiles || {});
  state.history.push({ t: message.uptime, active: c.active, rate: rateOut });
  while (state.history.length && state.history[0].t < message.uptime - HISTORY_SECONDS) state.history.shift();
  drawChart();
}

function showWorkers(workers, active) {
  // Only a master ([server] workers > 1) reports workers: one row each, with its share of the load.
  $("workers-panel").hidden = !workers;
  if (!workers) return;
  $("workers").tBodies[0].replaceChildren(...workers.map((w) => {
    const row = document.createElement("tr");
    row.dataset.worker = w.index;
    row.className = "worker-" + w.state;
    const share = active ? w.active / active : 0;
    for (const value of [w.index, w.pid ?? "–", w.state, w.active, null, w.total, w.restarts]) {
      const cell = document.createElement("td");
      if (value === null) {
        const bar = document.createElement("span");
        bar.className = "load";
        bar.style.width = Math.round(share * 100) + "%";
        bar.title = Math.round(share * 100) + "% of the open connections";
        cell.append(bar);
      } else {
        cell.textContent = value;
      }
      row.append(cell);
    }
    return row;
  }));
}

function describeFaults(profile) {
  if (!profile) return "none";
  const { name, ...keys } = profile;
  const text = Object.entries(keys).map(([k, v]) => `${k}=${v}`).join(" ");
  return name ? `${name} (${text || "nothing set"})` : text || "nothing set";
}

function showFaults(inForce, profiles) {
  // One row per listener: what its new connections get now, and a way to change it. The rows are
  // rebuilt only when the listeners or the named profiles change, so a choice being made survives
  // the stats refresh.
  const body = $("faults").tBodies[0];
  const shape = JSON.stringify([Object.keys(inForce), Object.keys(profiles)]);
  if (body.dataset.shape !== shape) {
    body.dataset.shape = shape;
    body.replaceChildren(...Object.keys(inForce).map((listener) => {
      const row = document.createElement("tr");
      row.dataset.listener = listener;
      const name = document.createElement("td");
      name.textContent = listener;
      const current = document.createElement("td");
      current.className = "in-force";
      const choose = document.createElement("td");
      const select = document.createElement("select");
      select.setAttribute("aria-label", "fault profile for " + listener);
      for (const [value, label] of [["", "none"], ...Object.keys(profiles).map((p) => [p, p]), ["{}", "custom (JSON)…"]]) {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = label;
        select.append(option);
      }
      const custom = document.createElement("input");
      custom.className = "custom";
      custom.placeholder = '{"latency": 0.1}';
      custom.spellcheck = false;
      custom.hidden = true;
      custom.setAttribute("aria-label", "fault keys as JSON for " + listener);
      select.onchange = () => { custom.hidden = select.value !== "{}"; };
      choose.append(select, custom);
      const action = document.createElement("td");
      const button = document.createElement("button");
      button.className = "apply";
      button.textContent = "apply";
      button.onclick = () => applyFaults(listener, select, custom);
      action.append(button);
      row.append(name, current, choose, action);
      return row;
    }));
  }
  for (const row of body.rows) {
    row.querySelector(".in-force").textContent = describeFaults(inForce[row.dataset.listener]);
  }
}

function applyFaults(listener, select, custom) {
  let faults = select.value || null;
  if (select.value === "{}") {
    try {
      faults = JSON.parse(custom.value || "{}");
    } catch (error) {
      $("faults-message").textContent = "not JSON: " + error.message;
      return;
    }
  }
  send({ type: "set_faults", listener, faults });
}

function onConnections(items, total) {
  const body = $("connections").tBodies[0];
  const all = total ?? items.length;
  $("conn-count").textContent = all > items.length ? `(${items.length} of ${all})` : `(${all})`;
  if (!items.length) {
    const row = body.insertRow();
    body.replaceChildren(row);
    const cell = row.insertCell();
    cell.colSpan = 10;
    cell.className = "empty";
    cell.textContent = $("conn-filter").value.trim() ? "no connection matches the filter" : "no open connections";
    return;
  }
  body.replaceChildren(...items.map((item) => {  // the server's order: the oldest first
    const row = document.createElement("tr");
    row.dataset.id = item.id;
    // A web listener's connection says which protocol it speaks now (http, or websocket once upgraded).
    const listener = item.protocol ? `${item.listener} · ${item.protocol}` : item.listener;
    const cells = [item.id, item.peer, listener, duration(item.age), bytes(item.bytes_in), bytes(item.bytes_out),
      item.rtt_us === undefined ? "–" : (item.rtt_us / 1000).toFixed(2) + " ms",
      item.retransmits ?? "–", item.pmtu ?? "–"];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    if (item.proxy) {
      row.children[1].title = "via " + item.proxy; // PROXY protocol: the load balancer it came through
    }
    if (item.worker !== undefined) row.children[0].title = "worker " + item.worker;
    const action = document.createElement("td");
    const button = document.createElement("button");
    button.className = "close";
    button.textContent = "close";
    button.title = "close this connection gracefully (reason: admin)";
    button.onclick = () => { button.disabled = true; send({ type: "close", id: item.id }); };
    action.append(button);
    row.append(action);
    return row;
  }));
}

function onClosed(id) {
  // The close is under way (a graceful close may linger briefly): drop the row now, then refresh.
  const row = document.querySelector(`#connections tr[data-id="${id}"]`);
  if (row) row.remove();
  requestConnections();
}

function onTrace(event) {
  const box = $("trace");
  const line = document.createElement("div");
  const time = document.createElement("span");
  time.className = "t";
  time.textContent = new Date(event.ts * 1000).toLocaleTimeString();
  const text = document.createElement("span");
  text.className = "f-" + event.flag;
  const { ts, flag, event: name, ...fields } = event;
  text.textContent = name + " " + Object.entries(fields).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  line.append(time, text);
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.append(line);
  while (box.childElementCount > MAX_TRACE_LINES) box.firstElementChild.remove();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

// ---- chart ------------------------------------------------------------------------------------
function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const points = state.history;
  canvas.dataset.points = String(points.length);
  if (!points.length) return;
  const now = points[points.length - 1].t;
  const x = (t) => width - 8 - (now - t) / HISTORY_SECONDS * (width - 16);
  const maxActive = Math.max(1, ...points.map((p) => p.active));
  const maxRate = Math.max(1, ...points.map((p) => p.rate));
  g.strokeStyle = "#1f2c38";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = 8 + i * (height - 24) / 4;
    g.beginPath(); g.moveTo(0, y); g.lineTo(width, y); g.stroke();
  }
  const plot = (key, max, color, fill) => {
    g.beginPath();
    points.forEach((p, i) => {
      const y = height - 16 - (p[key] / max) * (height - 24);
      if (i === 0) g.moveTo(x(p.t), y); else g.lineTo(x(p.t), y);
    });
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.stroke();
    if (fill) {
      g.lineTo(x(now), height - 16);
      g.lineTo(x(points[0].t), height - 16);
      g.closePath();
      g.fillStyle = fill;
      g.fill();
    }
  };
  plot("rate", maxRate, "#60a5fa", null);
  plot("active", maxActive, "#2dd4bf", "rgba(45, 212, 191, 0.08)");
  g.fillStyle = "#7d8f9c";
  g.font = "11px ui-monospace, monospace";
  g.fillText(`${maxActive} conns`, 8, 20);
  g.textAlign = "right";
  g.fillText(bytes(Math.round(maxRate)) + "/s", width - 8, 20);
}

// ---- wiring -----------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (token) start(token);
  });
  $("flags").addEventListener("change", () => send({ type: "subscribe", flags: selectedFlags() }));
  $("clear-trace").addEventListener("click", () => $("trace").replaceChildren());
  $("conn-filter").addEventListener("input", requestConnections);
  window.addEventListener("resize", drawChart);
  const token = tokenFromFragment() || sessionStorage.getItem("trio-echo-token");
  if (token) start(token); else showLogin(null, false);
});
