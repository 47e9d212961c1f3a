// sandqueue dashboard: live updates over Server-Sent Events. No framework, no build step.
// Every value from the server is set with textContent or setAttribute, never as HTML.
"use strict";

const MILESTONES = {
  queued: "queued", started: "picked up by a worker", retrying: "retrying",
  sandbox_created: "sandbox created", gateway_ready: "MCP gateway ready",
  agent_started: "agent running", handed_back: "handed back to the queue", result: "result",
};
const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function clock(ts) {
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function duration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 10) return s.toFixed(2) + "s";
  if (s < 120) return Math.round(s) + "s";
  if (s < 7200) return Math.floor(s / 60) + "m" + String(Math.round(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

function usd(v) {
  if (v === null || v === undefined) return "—";
  return v < 1 ? "$" + v.toFixed(4) : "$" + v.toFixed(2);
}

function setStatus(node, status) {
  node.textContent = status;
  node.className = node.className.replace(/\bst-\S+/g, "").trim() + " st-" + status;
}

function addRow(tbody, cells, attrs) {
  const tr = el("tr");
  for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  tbody.appendChild(tr);
  return tr;
}

function taskPage() {
  const live = document.getElementById("live");
  if (!live || live.dataset.ended === "yes") return;
  const source = new EventSource(live.dataset.events);
  const timeline = document.querySelector("#timeline tbody");
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    const detail = Object.entries(e).filter(([k]) => k !== "ts" && k !== "phase")
      .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
    const ts = e.ts || Date.now() / 1000;
    addRow(document.querySelector("#events tbody"),
      [[clock(ts), "mono"], [e.phase, ""], [detail, "detail"]]);
    if (e.phase in MILESTONES) {
      const rows = timeline.querySelectorAll("tr");
      const prev = rows.length ? parseFloat(rows[rows.length - 1].dataset.ts) : null;
      const label = e.phase === "result" ? "result: " + (e.status || "?") : MILESTONES[e.phase];
      const extra = ["attempt", "worker", "error", "sandbox_id"].filter((k) => e[k])
        .map((k) => k + "=" + e[k]).join(", ");
      addRow(timeline, [[clock(ts), "mono"], [label, ""],
        [prev === null ? "" : duration(ts - prev), "num"], [extra, "muted"]],
        {"data-phase": e.phase, "data-ts": String(ts)});
    }
    if (e.phase === "tool_call") {
      addRow(document.querySelector("#tools tbody"), [[clock(ts), "mono"], [e.name, "mono"]]);
      const count = document.getElementById("tool-count");
      count.textContent = String(parseInt(count.textContent || "0", 10) + 1);
    }
    if (e.phase === "started" || e.phase === "sandbox_created") {
      setStatus(document.getElementById("status"), "running");
    }
    if (e.phase === "retrying") setStatus(document.getElementById("status"), "retrying");
    if (e.phase === "result") {
      setStatus(document.getElementById("status"), e.status || "unknown");
      const form = document.getElementById("cancel-form");
      if (form) form.hidden = true;
      document.getElementById("ended-note").hidden = false;
      document.getElementById("live-state").textContent = "ended";
      source.close();
    }
  };
}

function tasksPage() {
  const table = document.getElementById("tasks");
  const rows = document.querySelectorAll("#tasks tbody tr[data-id]");
  if (!rows.length) return;
  const ids = Array.from(rows, (r) => r.dataset.id).filter((id) => /^[\w.:-]+$/.test(id));
  const query = new URLSearchParams({ids: ids.join(","), tenant: table.dataset.tenant || ""});
  if (table.dataset.newerThan) query.set("newer_than", table.dataset.newerThan);
  const source = new EventSource("/live/tasks?" + query.toString());
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    const note = document.getElementById("live-note");
    note.hidden = !data.newer;
    document.getElementById("newer-count").textContent = String(data.newer || 0);
    const changed = data.rows || {};
    for (const [id, row] of Object.entries(changed)) {
      const tr = document.querySelector(`#tasks tr[data-id="${CSS.escape(id)}"]`);
      if (!tr) continue;
      setStatus(tr.querySelector('[data-f="status"]'), row.status || "unknown");
      tr.querySelector('[data-f="attempt"]').textContent = row.attempt || "—";
      tr.querySelector('[data-f="error"]').textContent = row.error || "";
      tr.querySelector('[data-f="tool_calls"]').textContent = row.tool_calls || "—";
      tr.querySelector('[data-f="cost_usd"]').textContent = row.cost_usd ? usd(parseFloat(row.cost_usd)) : "—";
      if (row.updated_at) {
        const cell = tr.querySelector('[data-f="updated_at"]');
        cell.textContent = duration(Math.max(0, Date.now() / 1000 - parseFloat(row.updated_at))) + " ago";
        cell.title = clock(parseFloat(row.updated_at)) + " UTC";
      }
    }
  };
}

function batchPage() {
  const live = document.getElementById("live");
  if (!live || live.dataset.ended === "yes") return;
  const source = new EventSource(live.dataset.batch);
  source.onmessage = (message) => {
    const b = JSON.parse(message.data);
    for (const name of ["done", "failed", "running", "queued", "total"]) {
      document.getElementById("n-" + name).textContent = String(b[name]);
    }
    const total = b.total || 1;
    let x = 0;
    for (const name of ["done", "failed", "running"]) {
      const rect = document.querySelector("#progress .p-" + name);
      const w = (100 * b[name]) / total;
      rect.setAttribute("x", String(x));
      rect.setAttribute("width", String(w));
      x += w;
    }
    document.getElementById("cost").textContent = usd(b.cost_usd) +
      (b.budget_usd ? " of " + usd(b.budget_usd) + " budget" : "");
    document.getElementById("rate").textContent = b.rate_per_min + " / min";
    document.getElementById("eta").textContent = b.eta_s === null ? "—" : duration(b.eta_s);
    document.getElementById("p50").textContent = duration(b.p50_s);
    document.getElementById("p95").textContent = duration(b.p95_s);
    document.getElementById("p50h").textContent = duration(b.p50_s);
    document.getElementById("p95h").textContent = duration(b.p95_s);
    drawHistogram(b.histogram || []);
    setStatus(document.getElementById("batch-status"), b.status);
    const errors = document.querySelector("#by-error tbody");
    errors.replaceChildren();
    for (const [cat, n] of Object.entries(b.by_error)) addRow(errors, [[cat, ""], [n, "num"]]);
    if (!errors.children.length) addRow(errors, [["None.", "empty"]]);
    const statuses = document.querySelector("#by-status tbody");
    statuses.replaceChildren();
    for (const [s, n] of Object.entries(b.by_status).sort()) {
      const tr = addRow(statuses, [["", ""], [n, "num"]]);
      tr.firstChild.appendChild(el("span", s, "st st-" + s));
    }
    const retry = document.getElementById("retry-form");
    if (retry) {
      retry.hidden = !b.retryable;
      document.getElementById("retry-n").textContent = String(b.failed);
    }
    const cancel = document.getElementById("cancel-form");
    if (cancel && b.ended) cancel.hidden = true;
    if (b.ended) source.close();
  };
}

function drawHistogram(bins) {
  const svg = document.getElementById("histogram");
  const axis = document.getElementById("histogram-axis");
  const peak = Math.max(1, ...bins.map(([, n]) => n));
  svg.replaceChildren();
  axis.replaceChildren();
  bins.forEach(([upto, n], i) => {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = (30 * n) / peak;
    for (const [k, v] of [["x", i * 10 + 0.5], ["y", 30 - h], ["width", 9], ["height", h]]) {
      rect.setAttribute(k, String(v));
    }
    rect.setAttribute("class", "bin");
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = "≤ " + upto + ": " + n;
    rect.appendChild(title);
    svg.appendChild(rect);
    axis.appendChild(el("span", upto));
  });
}

function fleetPage() {
  const live = document.getElementById("live");
  if (!live) return;
  const source = new EventSource(live.dataset.fleet);
  source.onmessage = (message) => {
    const f = JSON.parse(message.data);
    for (const [id, value] of Object.entries(f.figures || {})) {
      const node = document.getElementById(id);
      if (node) node.textContent = String(value);
    }
    for (const [id, rows] of Object.entries(f.tables || {})) {
      const body = document.querySelector("#" + id + " tbody");
      if (!body || !rows.length) continue;
      const classes = Array.from(body.querySelectorAll("tr:first-child td"), (td) => td.className);
      body.replaceChildren();
      for (const row of rows) addRow(body, row.map((cell, i) => [cell, classes[i] || ""]));
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const pages = {task: taskPage, tasks: tasksPage, batch: batchPage, fleet: fleetPage};
  const run = pages[document.body.dataset.page];
  if (run) run();
});
