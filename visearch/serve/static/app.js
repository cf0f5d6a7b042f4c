// visearch page: upload / paste / drop a photo, draw a region, search, show crops and results. No dependencies.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990",
  "#800000"];
const $ = (id) => document.getElementById(id);
const state = {
  file: null,          // the uploaded File, or null when searching with a stored image
  id: null,            // database image id of a "more like this" search
  size: null,          // [width, height] of the query image in pixels
  box: null,           // [x0, y0, x1, y1] drawn by the user (image pixels)
  result: null,
  token: sessionStorage.getItem("visearch_token") || "",
  busy: false,
  downloadUrl: null,
};

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") Object.assign(e.style, v);  // CSSOM, allowed by the page's CSP (style attributes are not)
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function showError(msg) {
  const box = $("error");
  box.textContent = msg || "";
  box.hidden = !msg;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  let resp;
  try {
    resp = await fetch(path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new Error("cannot reach the server (is `visearch serve` still running?)");
  }
  if (resp.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this server needs a token: enter it above");
  }
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
    if (resp.status === 503) msg = "server busy: " + msg.replace(/^server busy: /, "");
    throw new Error(msg);
  }
  return resp;
}

function thumbUrl(dataset, id, size) {
  return "/api/image/" + encodeURIComponent(dataset) + "/" + encodeURIComponent(id) + "?size=" + size;
}

// ---- controls and URL state ----------------------------------------------------------------------------------------
let health = null;

function fillSelect(sel, values, current) {
  const keep = Array.from(sel.options).filter((o) => o.value === "");
  sel.replaceChildren(...keep);
  for (const v of values) sel.append(el("option", { value: v, text: v }));
  if (current && values.includes(current)) sel.value = current;
}

function updateModels() {
  const ds = health && health.datasets[$("dataset").value];
  fillSelect($("model"), ds ? ds.models : [], $("model").value || new URLSearchParams(location.search).get("model"));
}

async function loadHealth() {
  const resp = await api("/api/health");
  health = await resp.json();
  const params = new URLSearchParams(location.search);
  const names = Object.keys(health.datasets);
  fillSelect($("dataset"), names, params.get("dataset"));
  updateModels();
  fillSelect($("detector"), health.detectors, params.get("detector"));
  const total = names.map((n) => n + " (" + health.datasets[n].images + " images)").join(", ");
  const missing = Object.entries(health.unavailable || {}).map(([d, m]) => d + " [" + Object.keys(m).join(", ") + "]");
  $("server-status").textContent = "serving " + total + (missing.length ? "; no store for " + missing.join(", ") : "");
  if (params.get("prompt")) $("prompt").value = params.get("prompt");
  if (params.get("top_k")) $("top-k").value = params.get("top_k");
  if (params.get("rerank") === "false") $("rerank").checked = false;
  $("token-form").hidden = true;
  if (params.get("id")) await searchById(params.get("id"), false);
  refreshButton();
}

function settings() {
  return {
    dataset: $("dataset").value, model: $("model").value, prompt: $("prompt").value.trim(),
    detector: $("detector").value, top_k: $("top-k").value || "5", rerank: $("rerank").checked,
  };
}

function pushUrl() {
  const s = settings();
  const p = new URLSearchParams();
  p.set("dataset", s.dataset);
  p.set("model", s.model);
  if (s.prompt) p.set("prompt", s.prompt);
  if (s.detector) p.set("detector", s.detector);
  p.set("top_k", s.top_k);
  if (!s.rerank) p.set("rerank", "false");
  if (state.id) p.set("id", state.id);
  history.replaceState(null, "", "?" + p.toString());
}

function refreshButton() {
  $("search").disabled = state.busy || !(state.file || state.id) || !health;
  $("search").textContent = state.busy ? "Searching…" : "Search";
  document.body.classList.toggle("busy", state.busy);
}

// ---- the query photo and the region the user draws ---------------------------------------------------------------
function setPhoto(src, size) {
  const img = $("photo");
  state.size = size;
  return new Promise((resolve) => {
    img.onload = () => {
      if (!state.size) state.size = [img.naturalWidth, img.naturalHeight];
      // shown at most 520 x 420 px, small photos enlarged too (boxes are drawn in image pixels on top)
      const scale = Math.min(520 / state.size[0], 420 / state.size[1]);
      img.style.width = Math.round(state.size[0] * scale) + "px";
      $("overlay").setAttribute("viewBox", "0 0 " + state.size[0] + " " + state.size[1]);
      $("overlay").setAttribute("preserveAspectRatio", "none");
      $("query-view").hidden = false;
      resolve();
    };
    img.onerror = () => { showError("the browser cannot display this image (the server may still search it)"); resolve(); };
    img.src = src;
  });
}

function useFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { showError(file.name + ": not an image"); return; }
  showError("");
  state.file = file;
  state.id = null;
  state.box = null;
  $("drop-text").textContent = file.name + " (" + Math.round(file.size / 1024) + " KB): drop or paste another";
  setPhoto(URL.createObjectURL(file), null).then(() => { drawBoxes(); search(); });
  refreshButton();
}

function pointInImage(ev) {
  const r = $("overlay").getBoundingClientRect();
  const x = Math.min(Math.max(ev.clientX - r.left, 0), r.width) / r.width * state.size[0];
  const y = Math.min(Math.max(ev.clientY - r.top, 0), r.height) / r.height * state.size[1];
  return [x, y];
}

function setupDrawing() {
  const ov = $("overlay");
  let start = null;
  ov.addEventListener("pointerdown", (ev) => {
    if (!state.size) return;
    start = pointInImage(ev);
    ov.setPointerCapture(ev.pointerId);
  });
  ov.addEventListener("pointermove", (ev) => {
    if (!start) return;
    const p = pointInImage(ev);
    state.box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])];
    drawBoxes();
  });
  ov.addEventListener("pointerup", () => {
    if (!start) return;
    start = null;
    const b = state.box;
    if (!b || b[2] - b[0] < 4 || b[3] - b[1] < 4) { state.box = null; drawBoxes(); return; }
    state.box = b.map(Math.round);
    search();
  });
  $("clear-box").addEventListener("click", () => { state.box = null; drawBoxes(); search(); });
}

function drawBoxes() {
  const ov = $("overlay");
  ov.replaceChildren();
  const crops = state.result ? state.result.crops : [];
  crops.forEach((c, i) => {
    if (c.label === "whole image" && crops.length > 1) return;
    const [x0, y0, x1, y1] = c.box;
    const colour = COLOURS[i % COLOURS.length];
    ov.append(svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colour, class: "crop" }));
    const t = svg("text", { x: x0 + 4, y: y0 + 16, fill: colour, class: "crop-number" });
    t.textContent = String(i + 1);
    ov.append(t);
  });
  if (state.box) {
    const [x0, y0, x1, y1] = state.box;
    ov.append(svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "drawn" }));
  }
  $("clear-box").hidden = !state.box;
}

// ---- searching ---------------------------------------------------------------------------------------------------
async function search() {
  if (state.busy || !health || !(state.file || state.id)) return;
  const s = settings();
  let req;
  if (state.file) {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "pasted.png");
    for (const k of ["dataset", "model", "prompt", "detector", "top_k"]) if (s[k]) form.append(k, s[k]);
    form.append("rerank", s.rerank ? "true" : "false");
    if (state.box) form.append("box", state.box.join(","));
    req = { method: "POST", body: form };
  } else {
    const body = { dataset: s.dataset, model: s.model, id: state.id, top_k: Number(s.top_k), rerank: s.rerank };
    if (s.prompt) body.prompt = s.prompt;
    if (s.detector) body.detector = s.detector;
    if (state.box) body.box = state.box;
    req = { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
  }
  state.busy = true;
  refreshButton();
  showError("");
  try {
    const resp = await api("/api/query", req);
    state.result = await resp.json();
    pushUrl();
    render(s.dataset);
  } catch (e) {
    showError(e.message);
  } finally {
    state.busy = false;
    refreshButton();
  }
}

async function searchById(id, keepBox) {
  const s = settings();
  showError("");
  state.file = null;
  state.id = id;
  if (!keepBox) state.box = null;
  $("drop-text").textContent = "searching with " + id + ": drop, paste or choose a photo to search with your own";
  try {
    const resp = await api(thumbUrl(s.dataset, id, 1024));
    const size = (resp.headers.get("X-Image-Size") || "").split(",").map(Number);
    const blob = await resp.blob();
    await setPhoto(URL.createObjectURL(blob), size.length === 2 && size[0] > 0 ? size : null);
  } catch (e) {
    showError(e.message);
    return;
  }
  drawBoxes();
  await search();
}

function render(dataset) {
  const res = state.result;
  drawBoxes();
  $("query-label").textContent = res.query + " · " + res.model;
  const t = $("timings");
  t.replaceChildren();
  for (const k of ["detect", "describe", "search", "rerank", "total"]) {
    t.append(el("tr", {}, el("td", { text: k }), el("td", { text: res.timings_ms[k].toFixed(1) + " ms" })));
  }
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(new Blob([JSON.stringify(res, null, 2)], { type: "application/json" }));
  $("download").href = state.downloadUrl;
  $("download").hidden = false;

  const out = $("results");
  out.replaceChildren();
  if (res.crops.length > 1) {  // the merged ranking first: it is the answer; the rows per crop explain it
    out.append(el("div", { class: "crop-row merged", "data-crop": "merged" },
      el("h2", { text: "merged (best score per image over " + res.crops.length + " crops)" }), hitsRow(res.merged, dataset)));
  }
  const rows = res.crops.map((c, i) => ({ c, i }));
  rows.forEach(({ c, i }) => {
    const colour = COLOURS[i % COLOURS.length];
    const det = c.score === null ? "" : " " + c.score.toFixed(2);
    const title = el("h2", {}, el("span", { class: "badge", text: String(i + 1), style: { background: colour } }),
      c.label + det + "  [" + c.box.map((v) => Math.round(v)).join(", ") + "]");
    const row = el("div", { class: "crop-row", style: { borderLeftColor: colour }, "data-crop": String(i + 1) }, title,
      hitsRow(c.results, dataset));
    out.append(row);
  });
}

function hitsRow(results, dataset) {
  const row = el("div", { class: "hits" });
  if (!results.length) row.append(el("span", { class: "muted", text: "no results" }));
  for (const r of results) {
    const img = el("img", { src: thumbUrl(dataset, r.id, 256), alt: r.id, loading: "lazy", title: r.path });
    const card = el("button", { type: "button", class: "hit", "data-id": r.id, title: "search with " + r.id },
      img, el("div", { class: "score", text: "#" + r.rank + "  " + r.score.toFixed(4) }),
      el("div", { class: "id", text: r.id }));
    card.addEventListener("click", () => searchById(r.id, false));
    row.append(card);
  }
  return row;
}

// ---- wiring ------------------------------------------------------------------------------------------------------
function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => useFile(ev.target.files[0]));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    useFile(ev.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
  document.addEventListener("paste", (ev) => {
    const item = Array.from(ev.clipboardData ? ev.clipboardData.items : []).find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
  $("query-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("dataset").addEventListener("change", () => { updateModels(); if (state.id) { state.id = null; state.result = null; refreshButton(); } });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("visearch_token", state.token);
    // thumbnails are plain <img> requests: they carry the token as a same-site cookie
    document.cookie = "visearch_token=" + encodeURIComponent(state.token) + "; path=/; SameSite=Strict";
    loadHealth().catch((e) => showError(e.message));
  });
  if (state.token) document.cookie = "visearch_token=" + encodeURIComponent(state.token) + "; path=/; SameSite=Strict";
  setupDrawing();
  loadHealth().catch((e) => { $("server-status").textContent = "not connected"; showError(e.message); });
}

document.addEventListener("DOMContentLoaded", setup);
