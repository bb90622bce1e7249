// The simulator's live page: reads /events (Server-Sent Events). Text from the run goes
// in as textContent only.
"use strict";

const WINDOW = 20;       // results in the rolling accuracy
const EVENTS_MAX = 200;  // events listed
const H = 220, PAD = 28;

const run = { started: 0, results: [], faults: [], counts: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function resetCounts() {
  run.counts = { results: 0, correct: 0, failed: 0, rejected: {}, missing: 0 };
}

function prediction(ev) {
  if (ev.pred !== undefined) return ev.pred;
  return ev.preds ? ev.preds.robust : null;
}

function onResult(ev) {
  const c = run.counts;
  const pred = prediction(ev);
  c.results += 1;
  if (pred === null || pred === undefined) c.failed += 1;
  else if (pred === ev.label) c.correct += 1;
  for (const [, reason] of ev.rejected || []) c.rejected[reason] = (c.rejected[reason] || 0) + 1;
  c.missing += (ev.missing || []).length;
  run.results.push({ t: ev.t, ok: pred === ev.label });
  if (pred === null || pred === undefined) {
    addEvent(`image ${ev.i}: no decision: ${ev.error || "no answer"}`, ev.t, false);
  }
}

function onFault(ev) {
  run.faults.push(ev);
  addEvent(`${ev.peer}: ${ev.action}`, ev.t, true);
}

function addEvent(text, t, fault) {
  const list = document.getElementById("events");
  const when = `${(t - run.started).toFixed(1)} s`;
  list.prepend(el("li", { class: fault ? "fault" : null, text: `${when}  ${text}` }));
  while (list.children.length > EVENTS_MAX) list.lastElementChild.remove();
}

function renderCounts() {
  const c = run.counts;
  const items = [];
  const add = (k, v) => items.push(el("dt", { text: k }), el("dd", { text: v }));
  add("results", String(c.results));
  add("accuracy", c.results ? `${((c.correct / c.results) * 100).toFixed(1)}%` : "–");
  add("no decision", String(c.failed));
  const rej = Object.entries(c.rejected).map(([k, v]) => `${k}: ${v}`);
  add("rejected replies", rej.length ? rej.join(", ") : "none");
  add("missing replies", String(c.missing));
  document.getElementById("counts").replaceChildren(...items);
}

function renderChart() {
  const chart = document.getElementById("chart");
  const W = Math.max(300, chart.clientWidth || 600);  // drawn at its own width: no stretched text
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const now = Date.now() / 1000;
  const last = run.results.length ? run.results[run.results.length - 1].t : now;
  const span = Math.max(5, last - run.started);
  const x = (t) => PAD + ((t - run.started) / span) * (W - 2 * PAD);
  const y = (acc) => H - PAD - acc * (H - 2 * PAD);
  const nodes = [];
  for (const level of [0, 0.5, 1]) {
    nodes.push(svg("line", { class: "grid", x1: PAD, x2: W - PAD, y1: y(level), y2: y(level) }));
    nodes.push(svg("text", { class: "axis", x: 2, y: y(level) + 4 }, `${level * 100}%`));
  }
  nodes.push(svg("text", { class: "axis", x: W - PAD - 30, y: H - 8 }, `${span.toFixed(0)} s`));
  // Faults close in time get their labels on rows of their own; where every row is taken
  // the mark stands alone (the event list below has it all).
  const rowEnds = [-Infinity, -Infinity, -Infinity, -Infinity];
  for (const f of run.faults) {
    const at = x(f.t);
    nodes.push(svg("line", { class: "fault", x1: at, x2: at, y1: PAD / 2, y2: H - PAD }));
    const text = `${f.peer}: ${f.action}`;
    const row = rowEnds.findIndex((end) => end < at);
    if (row >= 0) {
      rowEnds[row] = at + 6.5 * text.length;
      nodes.push(svg("text", { class: "fault-label", x: at + 2, y: PAD / 2 + 10 + row * 12 }, text));
    }
  }
  const points = [];
  let correct = 0;
  run.results.forEach((r, i) => {
    correct += r.ok ? 1 : 0;
    if (i >= WINDOW) correct -= run.results[i - WINDOW].ok ? 1 : 0;
    const n = Math.min(i + 1, WINDOW);
    points.push(`${x(r.t).toFixed(1)},${y(correct / n).toFixed(1)}`);
  });
  if (points.length) nodes.push(svg("polyline", { class: "line", points: points.join(" ") }));
  chart.replaceChildren(...nodes);
}

function renderState(state) {
  const rows = (state.procs || []).map((p) => {
    const status = !p.alive ? "down" : p.paused ? "paused" : "alive";
    const badge = { alive: "healthy", paused: "backing-off", down: "suspected" }[status];
    const mode = Object.entries(p.mode || {})
      .filter(([k, v]) => !(k === "attack" && v === "honest") && !(k === "slowdown" && v === 1) && !(k === "delay_ms" && v === 0))
      .map(([k, v]) => `${k} ${v}`).join(", ");
    const address = p.address && p.kind === "peer" && p.address.startsWith("127.0.0.1:")
      ? el("a", { href: `http://${p.address}/`, target: "_blank", rel: "noopener", text: p.address })
      : el("code", { text: p.address || "" });
    return el("tr", { "data-proc": p.name, "data-state": status },
      el("td", { text: p.name }), el("td", { text: p.kind }), el("td", { text: p.variant || "" }),
      el("td", {}, el("span", { class: `badge ${badge}`, text: status })),
      el("td", { text: mode || "none" }), el("td", {}, address));
  });
  document.getElementById("procs").replaceChildren(...rows);
  const status = document.getElementById("status");
  status.textContent = state.finished ? "finished" : "running";
  const report = document.getElementById("report");
  report.hidden = !state.report;
  if (state.report && !report.children.length) {
    report.append(el("a", { href: "/run/report.html", target: "_blank", text: "the run's report" }));
  }
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("error", () => {
    const status = document.getElementById("status");
    status.dataset.state = "down";
    status.textContent = "disconnected";
  });
  source.addEventListener("hello", (event) => {
    const doc = JSON.parse(event.data);
    run.started = doc.started;
    run.results = [];
    run.faults = [];
    resetCounts();
    document.getElementById("events").replaceChildren();
    document.getElementById("me").replaceChildren(
      el("span", { text: `scenario ${doc.scenario}` }), el("span", { text: doc.out }));
    for (const ev of doc.events) (ev.kind === "fault" ? onFault : onResult)(ev);
    if (doc.state && doc.state.procs) renderState(doc.state);
    document.getElementById("status").dataset.state = "live";
    renderCounts();
    renderChart();
  });
  source.addEventListener("result", (event) => { onResult(JSON.parse(event.data)); renderCounts(); renderChart(); });
  source.addEventListener("fault", (event) => { onFault(JSON.parse(event.data)); renderChart(); });
  source.addEventListener("state", (event) => renderState(JSON.parse(event.data)));
}

resetCounts();
connect();
