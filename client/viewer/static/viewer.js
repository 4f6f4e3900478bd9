// cxr-sr viewer: upload, poll the job, fetch the 16-bit pixels, window them here, compare.
//
// Every image arrives as little-endian uint16 [H, W] (the LR at its own size, the others at
// 4x). Window/level runs in the browser through a 65,536-entry lookup table into each image's
// own canvas, so dragging the window never waits for the server. All viewports share one
// view (centre and visible width in display pixels, i.e. HR pixels): zoom and pan are
// synchronised, and the LR is drawn 4x larger with nearest-neighbour sampling.
"use strict";

const LABELS = { lr: "LR", bicubic: "Bicubic", sr: "SR", hr: "HR (reference)" };
const POLL_MS = 300;
const FULL = 65535;

const $ = (sel) => document.querySelector(sel);

const state = {
  status: null,
  file: null,
  job: null,
  images: {}, // kind -> {w, h, data: Uint16Array, canvas, ctx, imageData}
  width: 0, // display size: the SR's
  height: 0,
  view: { cx: 0, cy: 0, span: 1 }, // centre and visible width of the main viewport
  wl: { center: 32768, width: 65536 },
  split: 0.5,
  left: "bicubic",
  right: "sr",
  drawPending: false,
  windowPending: false,
};

// ------------------------------------------------------------------ messages, status

function showMessage(text) {
  const box = $("#message");
  box.textContent = text || "";
  box.hidden = !text;
}

function setProgress(visible, done, total, stage) {
  $("#progress-box").hidden = !visible;
  const bar = $("#progress");
  if (total > 0) {
    bar.max = total;
    bar.value = done;
  } else {
    bar.removeAttribute("value"); // indeterminate
  }
  $("#stage").textContent = stage || "";
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) {
    /* not JSON */
  }
  return `the viewer answered ${response.status} ${response.statusText}`;
}

async function refreshStatus() {
  const pill = $("#server-status");
  try {
    const r = await fetch("api/status", { cache: "no-store" });
    if (!r.ok) throw new Error(await readError(r));
    state.status = await r.json();
    const t = state.status.triton;
    pill.dataset.ready = String(t.ready);
    pill.textContent = t.ready ? `Triton ${t.url} ready: ${t.model}` : `Triton ${t.url}: not answering`;
    pill.title = t.message;
    $("#pacs").hidden = !state.status.pacs;
    $("#pacs-url").textContent = state.status.pacs || "";
  } catch (e) {
    pill.dataset.ready = "false";
    pill.textContent = "viewer not answering";
    pill.title = String(e);
  }
  updateRunButton();
}

function updateRunButton() {
  const busy = state.job && !["done", "failed"].includes(state.job.state);
  $("#run").disabled = !state.file || busy;
  $("#pacs-open").disabled = !$("#studies").value || busy;
}

// ------------------------------------------------------------------ upload and jobs

function chooseFile(file) {
  state.file = file || null;
  $("#file-name").textContent = file ? `${file.name} (${(file.size / 2 ** 20).toFixed(1)} MB)` :
    "Choose or drop a PNG, JPEG, TIFF or DICOM file";
  showMessage("");
  updateRunButton();
}

function jobParams(extra) {
  // the mode and the sampling controls of the form, plus what the caller adds
  const params = new URLSearchParams({
    mode: document.querySelector("input[name=mode]:checked").value,
    ...extra,
  });
  for (const key of ["steps", "seed"]) {
    const v = $(`#${key}`).value.trim();
    if (v) params.set(key, v);
  }
  return params;
}

async function startJob(url, body, stage) {
  showMessage("");
  state.job = { state: "queued" };
  setJobState("uploading");
  updateRunButton();
  setProgress(true, 0, 0, stage);
  let response;
  try {
    const init = { method: "POST" };
    if (body) {
      init.body = body;
      init.headers = { "Content-Type": "application/octet-stream" };
    }
    response = await fetch(url, init);
  } catch (e) {
    return failed("The request did not reach the viewer (is it still running?).");
  }
  if (!response.ok) return failed(await readError(response));
  state.job = await response.json();
  poll();
}

async function run(event) {
  event.preventDefault();
  const file = state.file;
  if (!file) return;
  const limit = state.status ? state.status.max_upload_bytes : Infinity;
  if (file.size > limit) {
    showMessage(`${file.name} is larger than this viewer accepts (${Math.round(limit / 2 ** 20)} MB, --max-upload-mb).`);
    return;
  }
  startJob(`api/jobs?${jobParams({ name: file.name })}`, file, "uploading");
}

// ------------------------------------------------------------------ the PACS picker

async function searchStudies(event) {
  event.preventDefault();
  const params = new URLSearchParams();
  for (const key of ["patient_id", "modality", "date_from", "date_to"]) {
    const v = $(`#${key}`).value.trim();
    if (v) params.set(key, v);
  }
  const list = $("#studies");
  list.innerHTML = "";
  $("#pacs-open").disabled = true;
  $("#pacs-note").textContent = "searching...";
  let body;
  try {
    const r = await fetch(`api/pacs/studies?${params}`, { cache: "no-store" });
    if (!r.ok) {
      $("#pacs-note").textContent = "";
      return showMessage(await readError(r));
    }
    body = await r.json();
  } catch (e) {
    $("#pacs-note").textContent = "";
    return showMessage("The viewer did not answer.");
  }
  showMessage("");
  for (const s of body.studies) {
    const what = [s.study_date, s.patient_id, s.description, s.modalities.join("/")]
      .filter(Boolean).join("  ");
    const option = new Option(what || s.study_uid, s.study_uid);
    option.title = s.study_uid;
    list.add(option);
  }
  const n = body.studies.length;
  $("#pacs-note").textContent = n ? `${n} ${n === 1 ? "study" : "studies"}` +
    (n >= body.limit ? ` (the first ${body.limit}; narrow the search)` : "") : "no study matches";
  if (n) list.selectedIndex = 0;
  updateRunButton();
}

function openStudy() {
  const uid = $("#studies").value;
  if (uid) startJob(`api/pacs/jobs?${jobParams({ study_uid: uid })}`, null, "asking the PACS");
}

function setJobState(value) {
  document.body.dataset.job = value; // what a script (or a test) waits on
}

function failed(message) {
  if (state.job) state.job.state = "failed";
  setJobState("failed");
  setProgress(false);
  showMessage(message);
  updateRunButton();
  refreshStatus();
}

async function poll() {
  let job;
  try {
    const r = await fetch(`api/jobs/${state.job.id}`, { cache: "no-store" });
    if (!r.ok) return failed(await readError(r));
    job = await r.json();
  } catch (e) {
    return failed("Lost the connection to the viewer.");
  }
  state.job = job;
  if (job.state !== "done") setJobState(job.state);
  const p = job.progress;
  const stage = p.total > 1 && job.state === "running" && job.stage.startsWith("super")
    ? `${job.stage}: ${p.done} / ${p.total}` : job.stage;
  setProgress(true, p.done, p.total, stage);
  if (job.state === "failed") return failed(job.message);
  if (job.state !== "done") {
    setTimeout(poll, POLL_MS);
    return;
  }
  setProgress(true, 1, 1, "loading the images");
  try {
    await loadImages(job);
  } catch (e) {
    return failed(`Could not load the images: ${e.message || e}`);
  }
  setProgress(false);
  showResults(job);
  setJobState("done");
  updateRunButton();
}

async function fetchPixels(jobId, kind) {
  const r = await fetch(`api/jobs/${jobId}/pixels/${kind}`, { cache: "no-store" });
  if (!r.ok) throw new Error(await readError(r));
  const w = Number(r.headers.get("X-Width"));
  const h = Number(r.headers.get("X-Height"));
  const data = new Uint16Array(await r.arrayBuffer());
  if (data.length !== w * h) throw new Error(`${kind}: got ${data.length} pixels for ${w}x${h}`);
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  return { w, h, data, canvas, ctx, imageData: ctx.createImageData(w, h) };
}

async function loadImages(job) {
  const kinds = Object.keys(job.sizes);
  const loaded = await Promise.all(kinds.map((k) => fetchPixels(job.id, k)));
  state.images = {};
  kinds.forEach((k, i) => { state.images[k] = loaded[i]; });
  const sr = state.images.sr;
  state.width = sr.w;
  state.height = sr.h;
  fillSelectors(kinds);
  for (const panel of document.querySelectorAll(".panel")) {
    const kind = panel.dataset.kind;
    const img = state.images[kind];
    panel.hidden = !img;
    if (!img) continue;
    panel.dataset.width = img.w;
    panel.dataset.height = img.h;
    panel.dataset.displayWidth = state.width;
    panel.dataset.displayHeight = state.height;
    // sizes as H x W, like the rest of cxr-sr
    const note = kind === "lr" ? `${img.h}x${img.w}, shown ${state.height}x${state.width} (nearest)` :
      `${img.h}x${img.w}`;
    panel.querySelector("figcaption").innerHTML = `<b>${LABELS[kind]}</b> ${note}`;
  }
  document.body.classList.add("has-image");
  autoWindow();
  fit();
  setSplit(0.5);
}

function fmt(v, digits) {
  if (v === "inf") return "\u221e"; // identical images
  return v === null || v === undefined ? "-" : v.toFixed(digits);
}

function showResults(job) {
  const m = job.metrics || {};
  const delta = (key) => {
    const a = m[`${key}_sr`];
    const b = m[`${key}_bicubic`];
    return typeof a === "number" && typeof b === "number" ? a - b : null;
  };
  const signed = (v, digits) => (v === null ? "-" : (v >= 0 ? "+" : "") + v.toFixed(digits));
  for (const [key, id, digits] of [["psnr", "psnr", 2], ["ssim", "ssim", 4], ["lr_psnr", "lr-psnr", 2]]) {
    $(`#${id}-sr`).textContent = fmt(m[`${key}_sr`], digits);
    $(`#${id}-bicubic`).textContent = fmt(m[`${key}_bicubic`], digits);
    $(`#${id}-delta`).textContent = signed(delta(key), digits);
  }
  $("#protocol").textContent = job.mode_text;
  const tiles = job.progress.total > 1 ? `${job.progress.total} tiles, ` : "";
  const size = job.input_size ? `${job.input_size[0]}x${job.input_size[1]} input, ` : "";
  const model = job.model ? `model ${job.model}, ` : "";
  $("#metrics-note").textContent = `${job.name}: ${size}${tiles}${model}${job.seconds.toFixed(1)} s. ` +
    (m.psnr_sr === null ? "No reference in this mode: 'score on this image' gives PSNR/SSIM. " : "") +
    "LR cons. = PSNR of the 4x area downsample against the LR.";
  const png = $("#dl-png");
  png.href = `api/jobs/${job.id}/sr.png`;
  const dcm = $("#dl-dcm");
  dcm.href = `api/jobs/${job.id}/sr.dcm`;
  dcm.setAttribute("aria-disabled", String(Boolean(job.dicom)));
  dcm.title = job.dicom || "a derived Secondary Capture in the source's study";
  $("#dicom-note").textContent = job.dicom ? `Derived DICOM: ${job.dicom}.` : "";
}

// ------------------------------------------------------------------ window / level

function applyWindow() {
  const { center, width } = state.wl;
  const lo = center - width / 2;
  const lut = new Uint32Array(FULL + 1);
  for (let v = 0; v <= FULL; v++) {
    let g = Math.round(((v - lo) / width) * 255);
    g = g < 0 ? 0 : g > 255 ? 255 : g;
    lut[v] = 0xff000000 | (g << 16) | (g << 8) | g;
  }
  for (const img of Object.values(state.images)) {
    const out = new Uint32Array(img.imageData.data.buffer);
    const src = img.data;
    for (let i = 0; i < src.length; i++) out[i] = lut[src[i]];
    img.ctx.putImageData(img.imageData, 0, 0);
  }
  $("#wl-center").value = center;
  $("#wl-width").value = width;
  $("#center-value").textContent = Math.round(center);
  $("#width-value").textContent = Math.round(width);
  document.body.dataset.window = `${Math.round(center)}/${Math.round(width)}`;
}

function setWindow(center, width) {
  state.wl.center = Math.min(FULL, Math.max(0, center));
  state.wl.width = Math.min(FULL + 1, Math.max(1, width));
  if (!state.windowPending) {
    state.windowPending = true;
    requestAnimationFrame(() => {
      state.windowPending = false;
      applyWindow();
      draw();
    });
  }
}

function autoWindow() {
  // 1st to 99th percentile of the SR's histogram
  const img = state.images.sr;
  if (!img) return;
  const hist = new Uint32Array(FULL + 1);
  for (let i = 0; i < img.data.length; i++) hist[img.data[i]]++;
  const n = img.data.length;
  let acc = 0;
  let lo = 0;
  let hi = FULL;
  for (let v = 0; v <= FULL; v++) {
    acc += hist[v];
    if (acc < 0.01 * n) lo = v + 1;
    if (acc >= 0.99 * n) { hi = v; break; }
  }
  setWindow((lo + hi) / 2, Math.max(1, hi - lo));
}

// ------------------------------------------------------------------ drawing

const viewports = () => [$("#split"), ...document.querySelectorAll(".panel:not([hidden])")];

function fitCanvas(canvas) {
  const r = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(r.width * dpr));
  const h = Math.max(1, Math.round(r.height * dpr));
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  return r;
}

function drawImageInto(ctx, kind, s, tx, ty) {
  const img = state.images[kind];
  if (!img) return;
  const k = state.width / img.w; // 4 for the LR
  // the LR is shown nearest-neighbour; the others smoothly only when shrunk
  ctx.imageSmoothingEnabled = kind !== "lr" && s < 1;
  ctx.setTransform(s * k, 0, 0, s * k, tx, ty);
  ctx.drawImage(img.canvas, 0, 0);
}

function drawViewport(el) {
  const canvas = el.querySelector("canvas");
  fitCanvas(canvas);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!state.width) return;
  const s = canvas.width / state.view.span; // device pixels per display pixel
  const tx = canvas.width / 2 - state.view.cx * s;
  const ty = canvas.height / 2 - state.view.cy * s;
  if (el.id === "split") {
    drawImageInto(ctx, state.left, s, tx, ty);
    const x = Math.round(state.split * canvas.width);
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.beginPath();
    ctx.rect(x, 0, canvas.width - x, canvas.height);
    ctx.clip();
    drawImageInto(ctx, state.right, s, tx, ty);
    ctx.restore();
  } else {
    drawImageInto(ctx, el.dataset.kind, s, tx, ty);
  }
}

function draw() {
  state.drawPending = false;
  for (const el of viewports()) drawViewport(el);
  const split = $("#split").getBoundingClientRect();
  const zoom = split.width / state.view.span;
  $("#zoom-level").textContent = state.width ? `zoom ${(zoom * 100).toFixed(0)}%` : "";
  $("#split").dataset.zoom = zoom.toFixed(4);
}

function requestDraw() {
  if (!state.drawPending) {
    state.drawPending = true;
    requestAnimationFrame(draw);
  }
}

function fit() {
  const r = $("#split").getBoundingClientRect();
  const aspect = r.width / Math.max(1, r.height);
  state.view = {
    cx: state.width / 2,
    cy: state.height / 2,
    span: Math.max(state.width, state.height * aspect),
  };
  requestDraw();
}

function oneToOne() {
  state.view.span = $("#split").getBoundingClientRect().width;
  requestDraw();
}

// ------------------------------------------------------------------ the split slider

function setSplit(f) {
  state.split = Math.min(1, Math.max(0, f));
  const pct = (state.split * 100).toFixed(1);
  $("#handle").style.left = `${pct}%`;
  $("#handle").setAttribute("aria-valuenow", pct);
  $("#split").dataset.split = state.split.toFixed(4);
  requestDraw();
}

function fillSelectors(kinds) {
  for (const [id, fallback] of [["#left", "bicubic"], ["#right", "sr"]]) {
    const sel = $(id);
    const side = id.slice(1);
    sel.innerHTML = "";
    for (const k of kinds) sel.add(new Option(LABELS[k], k));
    if (!kinds.includes(state[side])) state[side] = fallback;
    sel.value = state[side];
  }
  updateTags();
}

function updateTags() {
  $("#tag-left").textContent = LABELS[state.left];
  $("#tag-right").textContent = LABELS[state.right];
}

// ------------------------------------------------------------------ pointer interaction

function attachViewport(el) {
  let drag = null;
  el.addEventListener("contextmenu", (e) => e.preventDefault());
  el.addEventListener("pointerdown", (e) => {
    if (!state.width || e.target.id === "handle") return;
    const r = el.getBoundingClientRect();
    const mode = e.button === 2 || e.shiftKey ? "window" : "pan";
    drag = { mode, x: e.clientX, y: e.clientY, view: { ...state.view }, wl: { ...state.wl }, r };
    el.setPointerCapture(e.pointerId);
    el.classList.toggle("panning", mode === "pan");
  });
  el.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x;
    const dy = e.clientY - drag.y;
    if (drag.mode === "pan") {
      const perPx = drag.view.span / drag.r.width; // display pixels per CSS pixel here
      state.view.cx = drag.view.cx - dx * perPx;
      state.view.cy = drag.view.cy - dy * perPx;
      requestDraw();
    } else {
      // right: wider window, down: higher level (the usual radiology convention)
      setWindow(drag.wl.center + dy * (FULL / drag.r.height), drag.wl.width + dx * (FULL / drag.r.width));
    }
  });
  const end = () => {
    drag = null;
    el.classList.remove("panning");
  };
  el.addEventListener("pointerup", end);
  el.addEventListener("pointercancel", end);
  el.addEventListener("dblclick", fit);
  el.addEventListener("wheel", (e) => {
    if (!state.width) return;
    e.preventDefault();
    const r = el.getBoundingClientRect();
    const perPx = state.view.span / r.width;
    const mx = e.clientX - r.left - r.width / 2;
    const my = e.clientY - r.top - r.height / 2;
    const px = state.view.cx + mx * perPx; // the display pixel under the cursor stays put
    const py = state.view.cy + my * perPx;
    const factor = Math.exp(e.deltaY * 0.0015);
    const span = Math.min(Math.max(state.view.span * factor, 8), 4 * Math.max(state.width, state.height));
    const next = span / r.width;
    state.view = { cx: px - mx * next, cy: py - my * next, span };
    requestDraw();
  }, { passive: false });
}

function attachHandle() {
  const handle = $("#handle");
  const split = $("#split");
  let dragging = false;
  handle.addEventListener("pointerdown", (e) => {
    dragging = true;
    handle.setPointerCapture(e.pointerId);
    e.stopPropagation();
  });
  handle.addEventListener("pointermove", (e) => {
    if (!dragging) return;
    const r = split.getBoundingClientRect();
    setSplit((e.clientX - r.left) / r.width);
  });
  handle.addEventListener("pointerup", () => { dragging = false; });
  handle.addEventListener("keydown", (e) => {
    const step = e.shiftKey ? 0.1 : 0.02;
    if (e.key === "ArrowLeft") setSplit(state.split - step);
    else if (e.key === "ArrowRight") setSplit(state.split + step);
    else return;
    e.preventDefault();
  });
}

// ------------------------------------------------------------------ start

function init() {
  $("#upload-form").addEventListener("submit", run);
  $("#file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("#drop");
  for (const ev of ["dragenter", "dragover"]) {
    document.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  document.addEventListener("dragleave", () => drop.classList.remove("over"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) chooseFile(e.dataTransfer.files[0]);
  });
  $("#wl-center").addEventListener("input", (e) => setWindow(Number(e.target.value), state.wl.width));
  $("#wl-width").addEventListener("input", (e) => setWindow(state.wl.center, Number(e.target.value)));
  $("#pacs-search").addEventListener("submit", searchStudies);
  $("#pacs-open").addEventListener("click", openStudy);
  $("#studies").addEventListener("change", updateRunButton);
  $("#studies").addEventListener("dblclick", openStudy);
  $("#wl-auto").addEventListener("click", autoWindow);
  $("#wl-full").addEventListener("click", () => setWindow(32768, 65536));
  $("#fit").addEventListener("click", fit);
  $("#one").addEventListener("click", oneToOne);
  for (const side of ["left", "right"]) {
    $(`#${side}`).addEventListener("change", (e) => {
      state[side] = e.target.value;
      updateTags();
      requestDraw();
    });
  }
  for (const el of [$("#split"), ...document.querySelectorAll(".panel")]) attachViewport(el);
  attachHandle();
  new ResizeObserver(requestDraw).observe($("#layout"));
  refreshStatus();
  setInterval(refreshStatus, 15000);
}

init();
