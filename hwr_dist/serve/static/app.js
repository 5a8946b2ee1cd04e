// The draw-a-digit page: pointer events (mouse, pen, touch) draw on a canvas; each finished stroke
// sends the canvas as a PNG to /v1/predict and shows the 28x28 input, the top-3 classes and the latency.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const photo = document.getElementById("photo");
const $ = (id) => document.getElementById(id);
const SIZES = { digit: [280, 280], number: [840, 280] };
let mode = "digit";
let last = null; // the previous point of the stroke being drawn
let seq = 0; // only the newest request's answer is shown
let inflight = 0;

function resetPad() {
  [pad.width, pad.height] = SIZES[mode];
  ctx.fillStyle = "#fff"; // paper, so the PNG has no transparency to guess about
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#000";
  ctx.fillStyle = "#000";
  ctx.lineWidth = pad.height / 14;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  photo.hidden = true;
}

function point(e) {
  const r = pad.getBoundingClientRect(); // CSS may scale the canvas on small screens
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function dot([x, y]) {
  ctx.beginPath();
  ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
  ctx.fill();
}

pad.addEventListener("pointerdown", (e) => {
  if (e.button !== 0) return;
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  if (!photo.hidden) resetPad(); // drawing replaces an uploaded photo
  last = point(e);
  dot(last);
});

pad.addEventListener("pointermove", (e) => {
  if (!last) return;
  e.preventDefault();
  // coalesced events keep fast strokes smooth where the browser batches pointer moves
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
  ctx.beginPath();
  ctx.moveTo(...last);
  for (const ev of events.length ? events : [e]) {
    last = point(ev);
    ctx.lineTo(...last);
  }
  ctx.stroke();
});

function endStroke() {
  if (!last) return;
  last = null;
  setBusy(+1); // busy from the stroke's end: toBlob answers asynchronously
  pad.toBlob((blob) => send(blob, "image/png").finally(() => setBusy(-1)), "image/png");
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

async function send(body, type) {
  const mine = ++seq;
  const started = performance.now();
  const url = `/v1/predict?top_k=3&include_input=true&segment=${mode === "number"}`;
  try {
    const r = await fetch(url, { method: "POST", body, headers: type ? { "Content-Type": type } : {} });
    const data = await r.json();
    const rtt = performance.now() - started;
    if (mine !== seq) return; // a newer stroke or upload has been sent since
    if (r.ok) show(data, rtt);
    else fail(data.error || `HTTP ${r.status}`);
  } catch (err) {
    if (mine === seq) fail(`no answer from the server (${err.message})`);
  }
}

function setBusy(delta) {
  inflight += delta;
  document.body.dataset.inflight = String(inflight);
}

function show(data, rtt) {
  $("error").textContent = "";
  const inputs = $("inputs");
  inputs.replaceChildren(...(data.input || []).map((src, i) => {
    const img = new Image();
    img.src = src;
    img.alt = `28x28 input ${i + 1}`;
    return img;
  }));
  const answer = $("answer");
  answer.textContent = data.prediction;
  answer.dataset.prediction = data.prediction;
  answer.dataset.probability = String(data.probability);
  const groups = data.characters || [data.top];
  const bars = [];
  groups.forEach((top, i) => {
    if (data.characters) bars.push(Object.assign(document.createElement("div"), {
      className: "char", textContent: `character ${i + 1}` }));
    for (const c of top) bars.push(bar(c, i));
  });
  $("bars").replaceChildren(...bars);
  $("latency").textContent = `server ${data.time_ms.toFixed(1)} ms, round trip ${rtt.toFixed(1)} ms`;
  $("latency").dataset.serverMs = String(data.time_ms);
  document.body.dataset.state = "done";
}

function bar(c, character) {
  const row = document.createElement("div");
  row.className = "bar";
  row.dataset.class = c.class;
  row.dataset.probability = String(c.probability);
  row.dataset.character = String(character);
  const cls = Object.assign(document.createElement("span"), { className: "cls", textContent: c.class });
  const track = Object.assign(document.createElement("span"), { className: "track" });
  const fill = Object.assign(document.createElement("span"), { className: "fill" });
  fill.style.display = "block";
  fill.style.width = `${(100 * c.probability).toFixed(1)}%`;
  track.append(fill);
  const pct = Object.assign(document.createElement("span"), {
    className: "pct", textContent: `${(100 * c.probability).toFixed(1)}%` });
  row.append(cls, track, pct);
  return row;
}

function fail(message) {
  $("error").textContent = message;
  $("answer").textContent = "?";
  delete $("answer").dataset.prediction;
  $("bars").replaceChildren();
  document.body.dataset.state = "error";
}

function clearAll() {
  seq++; // answers still on their way are for a sheet that is gone
  resetPad();
  $("inputs").replaceChildren();
  $("answer").textContent = "\u2013";
  delete $("answer").dataset.prediction;
  $("bars").replaceChildren();
  $("latency").textContent = "";
  $("error").textContent = "";
  document.body.dataset.state = "idle";
}

$("clear").addEventListener("click", clearAll);

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  clearAll();
  photo.src = URL.createObjectURL(file);
  photo.hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  setBusy(+1);
  send(form, null).finally(() => setBusy(-1));
  $("file").value = ""; // the same file can be chosen again
});

for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => {
    mode = radio.value;
    clearAll();
  });
}

async function describeModel() {
  try {
    const m = await (await fetch("/v1/model")).json();
    const acc = m.training.test_accuracy;
    $("model").textContent = `${m.architecture} (${m.format}), ${m.classes.length} classes` +
      (m.training.data_set ? `, trained on ${m.training.data_set}` : "") +
      (typeof acc === "number" ? `, test accuracy ${(100 * acc).toFixed(1)}%` : "") + ` \u00b7 ${m.id}`;
  } catch (err) {
    $("model").textContent = "the model description is unavailable";
  }
}

resetPad();
describeModel();
