// passlb status page: polls the admin API once a second; no external resources.
"use strict";

const POLL_MS = 1000;
const MAX_EVENTS = 100;
let lastEvent = 0;

function token() {
  return window.localStorage.getItem("passlb-token") || "";
}

async function api(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Error("the API needs a bearer token");
  }
  if (!resp.ok) {
    throw new Error(path + ": HTTP " + resp.status);
  }
  return resp.json();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function rate(value) {
  const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
  for (const [unit, size] of units) {
    if (value >= size) return (value / size).toFixed(1) + unit;
  }
  return value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1);
}

const COLUMNS = [
  ["backend", false], ["health", false], ["role", false], ["admin", false],
  ["weight", true], ["ring", true], ["flows", true], ["new flows", true],
  ["flows/s", true], ["pkt/s", true], ["bytes/s", true], ["check", true],
];

function backendRow(b) {
  const drain = b.drain_deadline_in === null ? "" : " (drain " + b.drain_deadline_in.toFixed(0) + "s)";
  const latency = b.check_latency === null ? "-" : (b.check_latency * 1000).toFixed(1) + " ms";
  const cells = [
    b.key + (b.backup ? " (backup)" : ""),
    null,
    b.role,
    b.admin + drain,
    String(b.weight),
    String(b.ring_weight),
    String(b.active_flows),
    String(b.new_flows),
    rate(b.rates.new_flows),
    rate(b.rates.packets),
    rate(b.rates.bytes),
    latency,
  ];
  const row = el("tr", { "data-backend": b.key, "data-health": b.health });
  cells.forEach((text, i) => {
    if (i === 1) {
      row.append(el("td", { class: "health " + b.health, title: b.health_reason }, b.health));
    } else {
      row.append(el("td", COLUMNS[i][1] ? { class: "num" } : {}, text));
    }
  });
  return row;
}

function renderServices(doc) {
  const section = document.getElementById("services");
  const tables = doc.services.map((svc) => {
    const head = el("tr", {}, ...COLUMNS.map(([name, num]) => el("th", num ? { class: "num" } : {}, name)));
    const body = el("tbody", {}, ...svc.backends.map(backendRow));
    const drop = svc.dropping ? " — no backend serving: dropping new flows" : "";
    return el("div", { "data-service": svc.name },
      el("h2", {}, svc.name + " ",
        el("small", {}, svc.protocol + " " + svc.vip + " ports " + svc.ports + " · mode " + svc.mode + drop)),
      el("table", {}, el("thead", {}, head), body));
  });
  section.replaceChildren(...tables);
  const up = doc.services.flatMap((s) => s.backends).filter((b) => b.health === "up").length;
  const all = doc.services.flatMap((s) => s.backends).length;
  document.getElementById("summary").textContent =
    doc.services.length + " service(s), " + up + "/" + all + " backends up, " +
    doc.applies + " applies (" + doc.apply_failures + " failed), up " + doc.uptime.toFixed(0) + "s";
  const sync = document.getElementById("sync");
  sync.textContent = doc.state.in_sync ? "in sync" : "pending: " + doc.state.pending;
  sync.className = "badge " + (doc.state.in_sync ? "ok" : "bad");
}

function renderEvents(events) {
  const list = document.getElementById("events");
  for (const e of events) {
    const at = new Date(e.at * 1000).toLocaleTimeString();
    const bad = e.ok === false || e.healthy === false;
    list.prepend(el("li", { class: bad ? "bad" : "", "data-kind": e.kind }, at + "  " + e.kind + "  " + e.message));
    lastEvent = Math.max(lastEvent, e.seq);
  }
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function showProblem(message) {
  const problem = document.getElementById("problem");
  problem.hidden = !message;
  problem.textContent = message || "";
}

async function poll() {
  try {
    const [doc, events] = await Promise.all([
      api("/api/v1/status"),
      api("/api/v1/events?since=" + lastEvent),
    ]);
    renderServices(doc);
    renderEvents(events.events);
    showProblem(doc.errors.length ? "counter read failed: " + doc.errors.join("; ") : "");
  } catch (err) {
    showProblem("cannot read the passlb API: " + err.message);
  } finally {
    window.setTimeout(poll, POLL_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  window.localStorage.setItem("passlb-token", document.getElementById("token").value);
  document.getElementById("token-form").hidden = true;
});

poll();
