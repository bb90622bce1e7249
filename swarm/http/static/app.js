// The live page of one vswarm peer. Reads /ui/events (Server-Sent Events), classifies
// through POST /v1/classify. Every text from the network goes in as textContent.
"use strict";

const FEED_MAX = 50;          // decisions kept on screen, as the peer keeps them
const GONE_KEEP_MS = 60000;   // a peer that left the table stays listed, greyed, this long

const view = {
  self: null,
  classes: [],
  peers: new Map(),           // peer id -> last row seen
  gone: new Map(),            // peer id -> [row, when it left]
  shown: new Set(),           // decision seq numbers already in the feed
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "width") node.style.width = value;   // CSSOM: allowed by the page's CSP
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const short = (id) => (id || "").slice(0, 8);
const fmt = (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const className = (cls) => view.classes[cls] ?? `class ${cls}`;

function peerName(id) {
  const row = view.peers.get(id) || (view.gone.get(id) || [])[0];
  return row ? `${row.variant || row.role} · ${short(id)}` : short(id);
}

// --- connection ---

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

function connect() {
  const source = new EventSource("/ui/events");
  source.addEventListener("open", () => setStatus("live", "live"));
  source.addEventListener("error", () => setStatus("down", "reconnecting…"));
  source.addEventListener("hello", (event) => {
    const doc = JSON.parse(event.data);
    view.self = doc.self;
    view.classes = doc.self.classes;
    renderSelf();
    renderPeers(doc.peers);
    renderStats(doc.stats);
    // A hello follows every (re)connection, and a restarted peer numbers its calls anew:
    // the snapshot replaces the feed.
    document.getElementById("feed").replaceChildren();
    view.shown.clear();
    for (const entry of doc.decisions) addToFeed(entry);
    setStatus("live", "live");
  });
  source.addEventListener("decision", (event) => addToFeed(JSON.parse(event.data)));
  source.addEventListener("state", (event) => {
    const doc = JSON.parse(event.data);
    renderPeers(doc.peers);
    renderStats(doc.stats);
  });
}

// --- this peer and its swarm ---

function renderSelf() {
  const s = view.self;
  const me = document.getElementById("me");
  me.replaceChildren(
    el("span", { text: `peer ${short(s.peer_id)}`, title: `${s.peer_id}\npublic key ${s.public_key}` }),
    el("span", { text: `variant ${s.variant}` }),
    el("span", { text: `swarm ${s.swarm}` }),
    el("span", { text: `family ${short(s.family)}`, title: s.family }),
  );
  document.title = `vswarm ${s.variant} · ${short(s.peer_id)}`;
}

function peerRow(p, gone) {
  const state = gone ? "gone" : p.state;
  const failures = p.failures ? ` (${p.failures} failed)` : "";
  return el("tr", { "data-peer": p.peer_id, "data-state": state, class: p.self ? "self" : null },
    el("td", { title: `${p.peer_id}\npublic key ${p.public_key}` },
      el("code", { text: short(p.peer_id) }), p.self ? el("span", { class: "tag", text: "this peer" }) : null),
    el("td", { text: p.variant || p.role }),
    el("td", { class: "state" }, el("span", { class: `badge ${state.replace(" ", "-")}`, text: state + failures })),
    el("td", { class: "num", text: p.self ? "local" : p.latency_ms === null ? "–" : `${fmt(p.latency_ms)} ms` }),
    el("td", { class: "num", text: p.reputation === null ? "new" : fmt(p.reputation, 3), title: `${p.observations} answers on record` }),
    el("td", { class: "num", text: fmt(p.weight, 2) }),
    // Every peer serves this page too (unless run with --ui off): its view of the swarm.
    el("td", {}, p.role === "peer" && !p.self && !gone
      ? el("a", { href: `http://${p.address}/`, title: "this peer's own page" }, el("code", { text: p.address }))
      : el("code", { text: p.address })),
    el("td", { title: p.family || "not this peer's family" }, el("code", { text: p.family ? short(p.family) : "other" })),
  );
}

function renderPeers(peers) {
  const now = Date.now();
  const current = new Map(peers.map((p) => [p.peer_id, p]));
  for (const [id, row] of view.peers) {
    if (!current.has(id)) view.gone.set(id, [row, now]);
  }
  for (const id of current.keys()) view.gone.delete(id);
  for (const [id, [, when]] of view.gone) {
    if (now - when > GONE_KEEP_MS) view.gone.delete(id);
  }
  view.peers = current;
  const rows = peers.map((p) => peerRow(p, false));
  for (const [row] of view.gone.values()) rows.push(peerRow(row, true));
  document.getElementById("peers").replaceChildren(...rows);
  const usable = peers.filter((p) => p.state === "healthy").length;
  document.getElementById("peer-count").textContent = `${peers.length} peers, ${usable} healthy`;
}

function renderStats(stats) {
  const items = [];
  const add = (term, value, title) => items.push(el("dt", { text: term, title }), el("dd", { text: value }));
  const sum = (obj) => Object.values(obj).reduce((a, b) => a + b, 0);
  add("inputs answered", `${stats.batches.inputs} in ${stats.batches.count} batches`);
  add("mean batch", stats.batches.mean === null ? "–" : fmt(stats.batches.mean, 2));
  const sizes = stats.batches.sizes.filter(([, n]) => n > 0).map(([le, n]) => `≤${le}: ${n}`);
  add("batch sizes", sizes.length ? sizes.join(", ") : "–");
  add("model run p50 / p99", `${fmt(stats.model_ms.p50, 2)} / ${fmt(stats.model_ms.p99, 2)} ms`,
    "estimated from the metrics histogram's buckets");
  add("classify p50 / p99", `${fmt(stats.classify_ms.p50)} / ${fmt(stats.classify_ms.p99)} ms`,
    "estimated from the metrics histogram's buckets");
  add("decisions", `${stats.decisions} decided, ${stats.no_decision} without a decision`);
  add("HTTP requests", `${sum(stats.requests)}`, Object.entries(stats.requests).map(([k, v]) => `${k}: ${v}`).join("\n"));
  const errors = Object.entries(stats.errors).map(([k, v]) => `${k}: ${v}`);
  add("errors", errors.length ? errors.join(", ") : "none");
  const rejections = Object.entries(stats.rejections).map(([k, v]) => `${k}: ${v}`);
  add("rejected messages", rejections.length ? rejections.join(", ") : "none");
  document.getElementById("stats").replaceChildren(...items);
}

// --- decisions ---

function bars(reply, decided) {
  // The feed says whether a reply dissented; POST /v1/classify's answer leaves it to us.
  const dissent = reply.dissent ?? (reply.topk.length > 0 && reply.topk[0][0] !== decided);
  const weight = reply.weight === undefined ? "" : ` · weight ${fmt(reply.weight, 2)}`;
  return el("div", { class: `reply${dissent ? " dissent" : ""}`, "data-peer": reply.peer },
    el("div", { class: "who" },
      el("span", { text: peerName(reply.peer), title: dissent ? "its top-1 is not the decision" : null }),
      el("span", { class: "muted", text: `${fmt(reply.latency_ms)} ms${weight}` })),
    ...reply.topk.map(([cls, prob]) => el("div", { class: "bar" },
      el("span", { class: "fill", width: `${Math.max(0, Math.min(1, prob)) * 100}%` }),
      el("span", { class: "text", text: `${className(cls)} ${fmt(prob * 100, 1)}%` }))),
  );
}

function peerList(title, cls, items) {
  if (!items.length) return null;
  return el("div", { class: `others ${cls}` }, el("span", { class: "muted", text: `${title}: ` }),
    ...items.map(([peer, reason]) => el("span", { class: "chip", "data-peer": peer, title: peer, text: `${peerName(peer)}${reason ? ` (${reason})` : ""}` })));
}

function decisionView(doc, thumbnail) {
  const when = doc.at ? new Date(doc.at * 1000).toLocaleTimeString() : "";
  const thumb = thumbnail || doc.thumbnail;
  const image = thumb ? el("img", { class: "thumb", src: thumb, alt: "input" }) : el("div", { class: "thumb" });
  const rejected = (doc.rejected || []).map((r) => [r.peer, r.reason]);
  const missing = (doc.missing || []).map((p) => [p, "no answer"]);
  const skipped = (doc.skipped || []).map((p) => [p, "not needed"]);
  if (doc.error) {
    return el("article", { class: "decision failed" }, image,
      el("div", { class: "body" },
        el("div", { class: "head" }, el("strong", { class: "label", text: "no decision" }), el("span", { class: "muted", text: when })),
        el("p", { class: "why", text: doc.error }),
        peerList("rejected", "rejected", rejected), peerList("missing", "missing", missing)));
  }
  const facts = `confidence ${fmt(doc.confidence * 100, 1)}% · certified f=${doc.certified_f} · ${fmt(doc.latency_ms)} ms · ${doc.rule}` +
    (doc.wave ? ` · wave ${doc.wave}` : "");
  return el("article", { class: "decision", "data-label": doc.label }, image,
    el("div", { class: "body" },
      el("div", { class: "head" }, el("strong", { class: "label", text: doc.label }), el("span", { class: "muted", text: when })),
      el("div", { class: "facts", text: facts,
        title: `certified f: how many of the counted replies could be lies without changing this label` }),
      el("div", { class: "replies" }, ...doc.replies.map((r) => bars(r, doc.class))),
      peerList("rejected", "rejected", rejected), peerList("missing", "missing", missing),
      peerList("skipped", "skipped", skipped)));
}

function addToFeed(entry) {
  if (view.shown.has(entry.seq)) return;
  view.shown.add(entry.seq);
  const feed = document.getElementById("feed");
  feed.prepend(el("li", { "data-seq": entry.seq }, decisionView(entry)));
  while (feed.children.length > FEED_MAX) {
    view.shown.delete(Number(feed.lastElementChild.dataset.seq));
    feed.lastElementChild.remove();
  }
}

// --- classifying an image of the user's ---

function showError(text) {
  const box = document.getElementById("error");
  box.textContent = text;
  box.hidden = !text;
}

async function classify(blob, name) {
  showError("");
  const result = document.getElementById("result");
  const local = URL.createObjectURL(blob);
  result.replaceChildren(el("p", { class: "muted", text: `classifying ${name}…` }));
  let response;
  let doc;
  try {
    response = await fetch("/v1/classify", {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    doc = await response.json();
  } catch (err) {
    result.replaceChildren();
    showError(`${name}: the peer did not answer (${err.message}); is it still running?`);
    return;
  }
  if (!response.ok) {
    result.replaceChildren();
    showError(`${name}: ${doc.error || `HTTP ${response.status}`}: ${doc.message || ""}`);
    return;
  }
  doc.at = Date.now() / 1000;
  result.replaceChildren(el("p", { class: "muted", text: name }), decisionView(doc, local));
}

function firstFile(files) {
  if (!files || !files.length) return;
  classify(files[0], files[0].name);
}

function setUpInput() {
  const drop = document.getElementById("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => { event.preventDefault(); firstFile(event.dataTransfer.files); });
  const input = document.getElementById("file");
  input.addEventListener("change", () => { firstFile(input.files); input.value = ""; });
  setUpCamera();
}

function setUpCamera() {
  const media = navigator.mediaDevices;
  if (!media || !media.getUserMedia) return;   // only in a secure context (https, localhost)
  const button = document.getElementById("camera");
  const box = document.getElementById("camera-view");
  const video = document.getElementById("video");
  let stream = null;
  const stop = () => {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    box.hidden = true;
  };
  button.hidden = false;
  button.addEventListener("click", async () => {
    try {
      stream = await media.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (err) {
      showError(`the camera is not available: ${err.message}`);
      return;
    }
    video.srcObject = stream;
    box.hidden = false;
  });
  document.getElementById("camera-close").addEventListener("click", stop);
  document.getElementById("snap").addEventListener("click", () => {
    // A centred square, small enough for the classify route's size limit.
    const side = Math.min(video.videoWidth, video.videoHeight);
    if (!side) return;
    const canvas = el("canvas", { width: 224, height: 224 });
    canvas.getContext("2d").drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2, side, side, 0, 0, 224, 224);
    canvas.toBlob((blob) => { if (blob) classify(blob, "camera"); }, "image/png");
  });
}

setUpInput();
connect();
