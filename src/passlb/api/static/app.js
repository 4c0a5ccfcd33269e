// passlb status page: polls the admin API; no external resources, no build step.
//
// Rendering stays cheap with hundreds of backends: each service's table and
// each backend's row are built once and afterwards only the cells whose text
// changed are written. Graphs are drawn on canvases from the daemon's history
// (GET /api/v1/history), which it keeps in bounded rings.
"use strict";

const POLL_MS = 1000;
const HISTORY_MS = 2000;
const MAX_EVENTS = 100;
const TOKEN_KEY = "passlb-token";

const state = {
  access: null, // {token_required, read, change} from /api/v1/access
  lastEvent: 0,
  services: new Map(), // name -> {block, rows: Map(key -> row), graphs, selected}
  doc: null,
};

// -- the API -----------------------------------------------------------------

function token() {
  return window.localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  return token() ? { Authorization: "Bearer " + token() } : {};
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const init = Object.assign({ cache: "no-store" }, options || {});
  init.headers = Object.assign({}, authHeaders(), init.headers || {});
  const resp = await fetch(path, init);
  let body = null;
  try {
    body = await resp.json();
  } catch (err) {
    body = null;
  }
  if (!resp.ok) {
    const message = body && body.error ? body.error : path + ": HTTP " + resp.status;
    throw new ApiError(resp.status, message);
  }
  return body;
}

// -- small helpers -------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setAttr(node, name, value) {
  if (node.getAttribute(name) !== value) node.setAttribute(name, value);
}

function rate(value) {
  const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
  for (const [unit, size] of units) {
    if (value >= size) return (value / size).toFixed(1) + unit;
  }
  return value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1);
}

function pad2(n) {
  return String(n).padStart(2, "0");
}

// Local time, 24-hour: the same as `passlb top` (views.EVENT_TIME_FORMAT).
function clock(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + pad2(s % 60) + "s";
  return Math.floor(s / 3600) + "h" + pad2(Math.floor((s % 3600) / 60)) + "m";
}

function latency(seconds) {
  return seconds == null ? "-" : (seconds * 1000).toFixed(1) + " ms";
}

function portsText(ports) {
  return ports.length === 1 && ports[0] === "1-65535" ? "all" : ports.join(",");
}

// -- access: whether this page may read and change ----------------------------------

async function refreshAccess() {
  const access = await api("/api/v1/access");
  const before = state.access;
  state.access = access;
  document.body.dataset.access = access.change ? "change" : access.read ? "read" : "none";
  const badge = document.getElementById("access");
  const form = document.getElementById("token-form");
  const why = document.getElementById("token-why");
  document.getElementById("token-forget").hidden = !token();
  if (access.change) {
    badge.textContent = access.token_required ? "actions enabled (token)" : "actions enabled";
    badge.className = "badge ok";
    badge.title = access.token_required
      ? "this browser holds the API's bearer token"
      : "this API takes changes without a token: it listens on loopback or a unix socket only";
    form.hidden = true;
  } else {
    badge.textContent = "read-only";
    badge.className = "badge warn";
    form.hidden = false;
    const refused = token() ? "The token this browser holds was refused. " : "";
    if (access.read) {
      badge.title = "changes need the API's bearer token";
      why.textContent = refused + "Read-only: drain, enable, disable and weight need the API's bearer token.";
    } else {
      badge.title = "this API needs its bearer token even to read";
      why.textContent = refused + "This API needs its bearer token to show its status.";
    }
  }
  if (before && before.change !== access.change) {
    // Rows are built with or without their action buttons: rebuild them.
    for (const svc of state.services.values()) svc.block.remove();
    state.services.clear();
  }
}

// -- services and backends -------------------------------------------------------

const COLUMNS = [
  // [heading, numeric, title]
  ["backend", false, "backend key"],
  ["health", false, "the health check's verdict; hover for the reason"],
  ["role", false, "what the ring does with it: active, standby, draining, drained, down, disabled"],
  ["admin", false, "admin state: enabled, drain, disabled; removed: gone from the file, draining"],
  ["weight", true, "configured weight (with a runtime override)"],
  ["reported", true, "the weight its health check reports (-: none)"],
  ["ring", true, "the weight the ring was built with"],
  ["share", true, "slots of the Maglev ring it holds"],
  ["flows", true, "flows in the data plane's table now (dsr: flow-table entries)"],
  ["new flows", true, "new flows since the counters started"],
  ["flows/s", true, "new flows per second"],
  ["pkt/s", true, "packets per second, client to backend"],
  ["bytes/s", true, "bytes per second, client to backend"],
  ["check", true, "how long the last health check took"],
  ["drain", true, "time left until a draining backend's flows are cut"],
];

function serviceBlock(svc) {
  const head = el("tr", {}, ...COLUMNS.map(([name, num, title]) =>
    el("th", num ? { class: "num", title } : { title }, name)));
  if (state.access && state.access.change) head.append(el("th", {}, "actions"));
  const tbody = el("tbody");
  const graphs = el("div", { class: "graphs" });
  const charts = {};
  for (const [metric, title] of GRAPHS) {
    const canvas = el("canvas", { "data-metric": metric, "data-points": "0" });
    const now = el("span", { class: "now" });
    graphs.append(el("figure", {}, el("figcaption", {}, title + " ", now), canvas));
    charts[metric] = { canvas, now };
  }
  const legend = el("p", { class: "legend" },
    el("span", { class: "swatch total" }), " service total  ",
    el("span", { class: "swatch backend" }), " ",
    el("span", { class: "selected" }, "click a backend to graph it"));
  const detail = el("div", { class: "detail", hidden: "" });
  const title = el("small");
  const note = el("p", { class: "note", hidden: "" });
  const block = el("div", { class: "service", "data-service": svc.name },
    el("h2", {}, svc.name + " ", title), note, graphs, legend,
    el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), tbody)), detail);
  const entry = { block, tbody, title, note, charts, legend, detail, rows: new Map(), selected: null };
  tbody.addEventListener("click", (event) => {
    if (event.target.closest("button")) return;
    const row = event.target.closest("tr[data-backend]");
    if (row) selectBackend(svc.name, row.dataset.backend);
  });
  return entry;
}

function backendRow(service, b) {
  const cells = COLUMNS.map(([, num]) => el("td", num ? { class: "num" } : {}));
  cells[1].className = "health";
  const share = el("span", { class: "bar" });
  const shareText = el("span");
  cells[7].append(shareText, share);
  const tr = el("tr", { "data-backend": b.key }, ...cells);
  if (state.access && state.access.change) {
    const actions = el("td", { class: "actions" });
    for (const [label, kind] of [["drain", "drain"], ["enable", "enabled"], ["disable", "disabled"], ["weight…", "weight"]]) {
      const button = el("button", { type: "button", class: "action", "data-action": kind }, label);
      button.addEventListener("click", () => askAction(service, b.key, kind));
      actions.append(button);
    }
    tr.append(actions);
  }
  return { tr, cells, share, shareText };
}

function updateRow(row, b) {
  const c = row.cells;
  setAttr(row.tr, "data-health", b.health);
  setAttr(row.tr, "data-role", b.role);
  setAttr(row.tr, "data-admin", b.admin);
  setText(c[0], b.key + (b.backup ? " (backup)" : ""));
  setText(c[1], b.health);
  setAttr(c[1], "class", "health " + b.health);
  setAttr(c[1], "title", b.health_reason || "");
  setText(c[2], b.role);
  setAttr(c[2], "class", "role " + b.role);
  setText(c[3], b.removed ? "removed" : b.admin);
  setText(c[4], String(b.weight));
  setText(c[5], b.reported_weight == null ? "-" : String(b.reported_weight));
  setText(c[6], String(b.ring_weight));
  const share = b.ring_share || 0;
  setText(row.shareText, share.toFixed(1) + "%");
  const width = (3 * Math.min(100, share) / 100).toFixed(2) + "em";
  if (row.share.style.width !== width) row.share.style.width = width;
  const rates = b.rates || {};
  setText(c[8], b.active_flows == null ? "-" : String(b.active_flows)); // null: not counted yet
  setText(c[9], String(b.new_flows));
  setText(c[10], rate(rates.new_flows || 0));
  setText(c[11], rate(rates.packets || 0));
  setText(c[12], rate(rates.bytes || 0));
  setText(c[13], latency(b.check_latency));
  setText(c[14], b.drain_deadline_in == null
    ? (b.role === "drained" ? "ended" : "")
    : duration(b.drain_deadline_in));
}

function renderServices(doc) {
  const section = document.getElementById("services");
  const seen = new Set();
  for (const svc of doc.services) {
    seen.add(svc.name);
    let entry = state.services.get(svc.name);
    if (!entry) {
      entry = serviceBlock(svc);
      state.services.set(svc.name, entry);
    }
    if (entry.block.parentNode !== section) section.append(entry.block);
    const drop = svc.dropping ? " — no backend serving: dropping new flows" : "";
    setText(entry.title, svc.protocol + " " + svc.vip + " ports " + portsText(svc.ports) +
      " · mode " + svc.mode + drop);
    setAttr(entry.block, "data-dropping", String(svc.dropping));
    const notes = [];
    if (svc.reported_weights && svc.reported_weights !== "none") {
      notes.push("reported weights " + svc.reported_weights + ": " + svc.reported_weights_note);
    }
    if (svc.protection && svc.protection.summary) notes.push("protection: " + svc.protection.summary);
    const drops = Object.entries(svc.drops || {}).filter(([, n]) => n > 0);
    if (drops.length) notes.push("dropped: " + drops.map(([r, n]) => r + " " + n).join(", "));
    if (svc.mode === "dsr") {
      notes.push("flows: dsr flow-table entries; the load balancer never sees the backend's FIN, " +
        "so a finished TCP connection counts until it idles out (tcp_timeout)");
    }
    setText(entry.note, notes.join(" · "));
    entry.note.hidden = notes.length === 0;
    const keys = new Set();
    for (const b of svc.backends) {
      keys.add(b.key);
      let row = entry.rows.get(b.key);
      if (!row) {
        row = backendRow(svc.name, b);
        entry.rows.set(b.key, row);
        entry.tbody.append(row.tr);
      }
      updateRow(row, b);
    }
    for (const [key, row] of entry.rows) {
      if (!keys.has(key)) {
        row.tr.remove();
        entry.rows.delete(key);
      }
    }
    // Keep the table in the document's order when backends were added.
    let expected = entry.tbody.firstChild;
    for (const b of svc.backends) {
      const tr = entry.rows.get(b.key).tr;
      if (tr !== expected) entry.tbody.insertBefore(tr, expected);
      expected = tr.nextSibling;
    }
    if (entry.selected) renderDetail(svc, entry);
  }
  for (const [name, entry] of state.services) {
    if (!seen.has(name)) {
      entry.block.remove();
      state.services.delete(name);
    }
  }
  renderSummary(doc);
}

function renderSummary(doc) {
  const all = doc.services.flatMap((s) => s.backends);
  const up = all.filter((b) => b.health === "up").length;
  setText(document.getElementById("summary"),
    doc.services.length + " service(s), " + up + "/" + all.length + " backends up, " +
    doc.applies + " applies (" + doc.apply_failures + " failed), up " + duration(doc.uptime));
  const sync = document.getElementById("sync");
  setText(sync, doc.state.in_sync ? "in sync" : "pending: " + doc.state.pending);
  setAttr(sync, "class", "badge " + (doc.state.in_sync ? "ok" : "bad"));
  // What needs attention, at the top where a wall screen shows it.
  const alerts = [];
  for (const svc of doc.services) {
    if (svc.dropping) alerts.push(svc.name + ": no backend serving, new flows are dropped");
    for (const b of svc.backends) {
      if (b.health === "down") alerts.push(svc.name + "/" + b.key + " down: " + b.health_reason);
    }
  }
  renderBgp(doc, alerts);
  if (doc.last_apply && doc.last_apply.error) alerts.push("last apply failed: " + doc.last_apply.error);
  if (doc.last_reload && doc.last_reload.ok === false) {
    alerts.push("last reload rejected: " + (doc.last_reload.issues || []).join("; "));
  }
  const list = document.getElementById("alerts");
  const text = alerts.join("\n");
  if (list.dataset.text !== text) {
    list.dataset.text = text;
    list.replaceChildren(...alerts.slice(0, 20).map((a) => el("li", {}, a)));
    if (alerts.length > 20) list.append(el("li", {}, "… and " + (alerts.length - 20) + " more"));
  }
  list.hidden = alerts.length === 0;
}

// -- BGP: the node's sessions and announced VIPs (only with [bgp]) ----------------------

function renderBgp(doc, alerts) {
  const section = document.getElementById("bgp");
  const bgp = doc.bgp;
  section.hidden = !bgp;
  if (!bgp) return;
  const node = bgp.node.drained
    ? (bgp.node.traffic_moved ? "drained: the routers moved the traffic away" : "draining")
    : "serving";
  const rows = [
    ...bgp.peers.map((p) => ["peer " + p.address, "AS" + p.asn, p.state,
      p.routes_exported + " route(s) announced" + (p.last_error ? " (" + p.last_error + ")" : "")]),
    ...bgp.vips.map((v) => ["vip " + v.prefix, "", v.announced ? "announced" : "withdrawn", v.reason]),
  ];
  const text = JSON.stringify([node, rows]);
  if (section.dataset.text !== text) {
    section.dataset.text = text;
    section.replaceChildren(
      el("h2", {}, "BGP ", el("small", {}, "AS" + bgp.asn + " via " + bgp.speaker + " · node " + node)),
      el("table", { class: "bgp" }, el("tbody", {}, ...rows.map((cells) =>
        el("tr", { "data-state": cells[2] }, ...cells.map((c) => el("td", {}, c)))))));
  }
  for (const p of bgp.peers) {
    if (!p.established) alerts.push("BGP peer " + p.address + " " + p.state);
  }
  for (const v of bgp.vips) {
    if (!v.announced && !bgp.node.drained) alerts.push(v.prefix + " withdrawn: " + v.reason);
  }
}

// -- one backend's detail: health history, weights, drain -----------------------------

function selectBackend(service, key) {
  const entry = state.services.get(service);
  entry.selected = entry.selected === key ? null : key;
  for (const [k, row] of entry.rows) row.tr.classList.toggle("selected", k === entry.selected);
  setText(entry.legend.querySelector(".selected"),
    entry.selected ? "backend " + entry.selected : "click a backend to graph it");
  entry.detail.hidden = !entry.selected;
  const svc = state.doc && state.doc.services.find((s) => s.name === service);
  if (svc) renderDetail(svc, entry);
  pollHistory();
}

function renderDetail(svc, entry) {
  const b = svc.backends.find((x) => x.key === entry.selected);
  if (!b) {
    entry.detail.hidden = true;
    return;
  }
  const facts = [
    ["health", b.health + (b.health_reason ? " (" + b.health_reason + ")" : "")],
    ["check latency", latency(b.check_latency)],
    ["weight", "configured " + b.config_weight + ", in effect " + b.weight +
      ", reported " + (b.reported_weight == null ? "none" : b.reported_weight) + ", ring " + b.ring_weight],
    ["ring", (b.ring_slots || 0) + " slots (" + (b.ring_share || 0).toFixed(2) + "%)"],
    ["role", b.role + (b.drain_deadline_in == null ? "" : ", flows cut in " + duration(b.drain_deadline_in))],
  ];
  const history = (b.health_history || []).map((t) =>
    el("li", { class: t.health }, clock(t.at) + "  " + t.health + ": " + t.reason));
  const text = JSON.stringify([facts, b.health_history]);
  if (entry.detail.dataset.text === text) return;
  entry.detail.dataset.text = text;
  entry.detail.replaceChildren(
    el("h3", {}, b.key),
    el("dl", {}, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h4", {}, "health transitions (newest first)"),
    history.length ? el("ol", { class: "health-history" }, ...history) : el("p", {}, "none yet"));
}

// -- actions -------------------------------------------------------------------------

const ACTION_TEXT = {
  drain: "Drain {b} in {s}? It takes no new flows; its flows are cut after the service's drain_timeout.",
  enabled: "Enable {b} in {s}? It returns to the ring when healthy.",
  disabled: "Disable {b} in {s}? It takes no new flows and its existing flows are cut at once.",
  weight: "Set the weight of {b} in {s} (until a reload drops the backend):",
};

function askAction(service, key, kind) {
  const dialog = document.getElementById("confirm");
  const input = document.getElementById("weight-input");
  const error = document.getElementById("confirm-error");
  setText(document.getElementById("confirm-text"),
    ACTION_TEXT[kind].replace("{b}", key).replace("{s}", service));
  document.getElementById("weight-field").hidden = kind !== "weight";
  error.hidden = true;
  const row = state.services.get(service).rows.get(key);
  input.value = row ? row.cells[4].textContent : "1";
  dialog.dataset.service = service;
  dialog.dataset.backend = key;
  dialog.dataset.kind = kind;
  dialog.returnValue = "";
  dialog.showModal();
}

async function runAction(dialog) {
  const kind = dialog.dataset.kind;
  const body = kind === "weight"
    ? { weight: Number(document.getElementById("weight-input").value) }
    : { state: kind };
  const path = "/api/v1/services/" + encodeURIComponent(dialog.dataset.service) +
    "/backends/" + encodeURIComponent(dialog.dataset.backend);
  const result = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  showProblem("");
  return result.message;
}

function setupDialog() {
  const dialog = document.getElementById("confirm");
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await runAction(dialog);
      poll(false);
    } catch (err) {
      showProblem("the daemon refused: " + err.message);
      if (err.status === 401) refreshAccess().catch(() => {});
    }
  });
}

// -- graphs ----------------------------------------------------------------------------

const GRAPHS = [
  ["new_flows", "new flows/s"],
  ["packets", "packets/s"],
  ["bytes", "bytes/s"],
  ["active_flows", "active flows"],
];
const COLORS = { total: "#0969da", backend: "#bc4c00" };

function drawChart(chart, times, lines, span) {
  const canvas = chart.canvas;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 90;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const end = times.length ? times[times.length - 1] : Date.now() / 1000;
  const start = end - span;
  let max = 0;
  let points = 0;
  for (const line of lines) {
    for (const v of line.values) {
      if (v !== null) {
        max = Math.max(max, v);
        points += 1;
      }
    }
  }
  const top = max > 0 ? max * 1.1 : 1;
  const pad = 14;
  const x = (t) => ((t - start) / span) * width;
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  ctx.strokeStyle = "#d0d7de";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, y(0) + 0.5);
  ctx.lineTo(width, y(0) + 0.5);
  ctx.stroke();
  for (const line of lines) {
    ctx.strokeStyle = line.color;
    ctx.lineWidth = 1.5;
    ctx.fillStyle = line.color;
    ctx.beginPath();
    line.values.forEach((v, i) => {
      if (v === null) return; // a gap: nothing was measured then
      const before = i > 0 ? line.values[i - 1] : null;
      const after = i + 1 < line.values.length ? line.values[i + 1] : null;
      if (before === null) ctx.moveTo(x(times[i]), y(v));
      else ctx.lineTo(x(times[i]), y(v));
      if (before === null && after === null) ctx.fillRect(x(times[i]) - 1.5, y(v) - 1.5, 3, 3);
    });
    ctx.stroke();
  }
  ctx.fillStyle = "#57606a";
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText("max " + rate(max), 2, 10);
  ctx.fillText("-" + duration(span), 2, height - 2);
  ctx.textAlign = "right";
  ctx.fillText("now", width - 2, height - 2);
  ctx.textAlign = "left";
  canvas.dataset.points = String(points);
  canvas.dataset.max = String(max);
}

function lastValue(values) {
  for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null) return values[i];
  return null;
}

function renderHistory(totals, perBackend, span) {
  for (const [name, entry] of state.services) {
    const total = totals.series.find((s) => s.service === name && s.backend === null);
    const mine = perBackend.get(name);
    for (const [metric] of GRAPHS) {
      const lines = [];
      if (total) lines.push({ color: COLORS.total, values: total[metric] });
      if (mine && mine.series) lines.push({ color: COLORS.backend, values: mine.series[metric] });
      const times = mine && mine.series ? mine.times : totals.times;
      drawChart(entry.charts[metric], times, lines, span);
      const now = total ? lastValue(total[metric]) : null;
      setText(entry.charts[metric].now, now === null ? "" : rate(now));
    }
  }
}

async function pollHistory() {
  if (!state.access || !state.access.read || !state.services.size) return;
  const span = Number(document.getElementById("range").value);
  try {
    const totals = await api("/api/v1/history?seconds=" + span);
    const perBackend = new Map();
    for (const [name, entry] of state.services) {
      if (!entry.selected) continue;
      const found = await api("/api/v1/history?seconds=" + span + "&service=" +
        encodeURIComponent(name) + "&backend=" + encodeURIComponent(entry.selected));
      const series = found.series.find((s) => s.backend === entry.selected);
      perBackend.set(name, { times: found.times, series });
    }
    renderHistory(totals, perBackend, span);
  } catch (err) {
    showProblem("cannot read the history: " + err.message);
  }
}

// -- events ----------------------------------------------------------------------------

function renderEvents(events) {
  const list = document.getElementById("events");
  for (const e of events) {
    const bad = e.ok === false || e.healthy === false;
    list.prepend(el("li", { class: bad ? "bad" : "", "data-kind": e.kind },
      clock(e.at) + "  " + e.kind + "  " + e.message));
    state.lastEvent = Math.max(state.lastEvent, e.seq);
  }
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function showProblem(message) {
  const problem = document.getElementById("problem");
  problem.hidden = !message;
  setText(problem, message || "");
}

// -- the loop --------------------------------------------------------------------------

async function poll(again) {
  try {
    if (!state.access) await refreshAccess();
    if (state.access.read) {
      const [doc, events] = await Promise.all([
        api("/api/v1/status"),
        api("/api/v1/events?since=" + state.lastEvent),
      ]);
      state.doc = doc;
      renderServices(doc);
      renderEvents(events.events);
      showProblem(doc.errors.length ? "counter read failed: " + doc.errors.join("; ") : "");
    }
  } catch (err) {
    if (err.status === 401) {
      state.access = null; // the token changed or was withdrawn: ask again
    } else {
      showProblem("cannot read the passlb API: " + err.message);
    }
  } finally {
    if (again !== false) window.setTimeout(poll, POLL_MS);
  }
}

async function historyLoop() {
  await pollHistory();
  window.setTimeout(historyLoop, HISTORY_MS);
}

document.getElementById("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  window.localStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  document.getElementById("token").value = "";
  await refreshAccess().catch((err) => showProblem(err.message));
  poll(false);
});

document.getElementById("token-forget").addEventListener("click", async () => {
  window.localStorage.removeItem(TOKEN_KEY);
  await refreshAccess().catch((err) => showProblem(err.message));
});

document.getElementById("range").addEventListener("change", () => pollHistory());

setupDialog();
poll();
historyLoop();
