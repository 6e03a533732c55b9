/* Piccolo's own page. Plain JavaScript, no build step, no outside resources.
 *
 * Reads and changes the server through /api/<path> (the CoAP API's
 * resources with the same answers), follows its state through the
 * Server-Sent Events of /events ("path\nJSON value" per event), and plots
 * on canvases with the few lines below.
 */
"use strict";

const TOKEN_META = document.querySelector('meta[name="piccolo-token"]');
let token = TOKEN_META ? TOKEN_META.content : "";
const state = {};                 // path -> latest value
const STATUS_WORDS = {1: "no worker", 2: "powered off", 3: "dropped", 4: "connecting",
                      5: "disconnected", 6: "idle", 7: "recording", 8: "autointegrating"};
const COLOURS = ["#1f6fb2", "#d35400", "#2e8b57", "#8e44ad", "#b8860b", "#c0392b"];
const FILES_PAGE = 50;
let spectrometers = [], channels = [], paths = new Set();
const live = {};                  // spectrometer -> {canvas, legend, series}
let files = {run: null, names: [], shown: 0, chosen: null, picked: false};
let readOnly = null;              // why this device may not control, or null

// -- small helpers ----------------------------------------------------------

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function encodePath(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

function pad(n) { return String(n).padStart(2, "0"); }

function clockTime(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function dateTime(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  if (isNaN(d)) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min`;
  return `${s} s`;
}

function every(seconds) {
  if (seconds === null || seconds === undefined) return "once";
  for (const [n, unit] of [[86400, "day"], [3600, "h"], [60, "min"]]) {
    if (seconds % n === 0) return seconds === n ? `1 ${unit}` : `${seconds / n} ${unit}${unit === "day" ? "s" : ""}`;
  }
  return `${seconds} s`;
}

// -- the API ------------------------------------------------------------------

async function api(method, path, body, retried) {
  const init = {method, headers: {"X-Piccolo-Token": token}, cache: "no-store"};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch("/api/" + encodePath(path), init);
  } catch (e) {
    return {ok: false, status: 0, text: "the server cannot be reached"};
  }
  const text = await response.text();
  const type = response.headers.get("Content-Type") || "";
  let value = null;
  if (response.ok && text && type.startsWith("application/json")) value = JSON.parse(text);
  if (response.status === 403 && text.includes("X-Piccolo-Token") && !retried) {
    // a restarted server has a new token: take it and ask once more
    const fresh = await fetch("/token", {cache: "no-store"}).catch(() => null);
    if (fresh && fresh.ok) {
      token = await fresh.text();
      return api(method, path, body, true);
    }
  }
  return {ok: response.ok, status: response.status, text, value};
}

async function get(path) {
  const r = await api("GET", path);
  return r.ok ? r.value : undefined;
}

function say(text, ok) {
  const p = $("answer");
  p.textContent = text;
  p.className = "answer " + (ok ? "ok" : "err");
}

async function act(label, method, path, body, done = "done") {
  const r = await api(method, path, body);
  if (r.ok) say(`${label}: ${done}`, true);
  else say(`${label} refused (${r.status}): ${r.text || "no answer"}`, false);
  return r;
}

/* A setting typed into a field: PUT to the server; refused (403) or
   invalid (400), the field shows the server's value again, marked, with
   the reason as its title. */
function setting(input, label, path, value) {
  input.addEventListener("change", async () => {
    const r = await act(label, "PUT", path, value());
    input.classList.toggle("refused", !r.ok);
    input.title = r.ok ? "" : r.text || "";
    if (!r.ok && state[path] !== undefined) {
      if (input.type === "checkbox") input.checked = !!state[path];
      else input.value = state[path];
    }
  });
  input.addEventListener("input", () => input.classList.remove("refused"));
}

// -- plotting -------------------------------------------------------------------

function niceStep(range, n) {
  const raw = range / Math.max(n, 1);
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/* Tick values of round numbers between lo and hi, about n of them and
   never fewer than three where the axis allows. */
function ticks(lo, hi, n) {
  let step = niceStep(hi - lo, n), out = [];
  for (let tries = 0; tries < 4; tries++) {
    out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    if (out.length >= 3) break;
    step = niceStep(step, 2.2);          // a finer round step
  }
  return out;
}

function countLabel(v) {
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M";
  if (Math.abs(v) >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k";
  return String(Math.round(v));
}

/* series: [{x: [nm], y: [counts], colour, dashed}], extra: {saturation} */
function drawPlot(canvas, series, extra) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 200;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = "11px system-ui, sans-serif";
  const drawn = series.filter(s => s.x.length > 1);
  if (!drawn.length) {
    g.fillStyle = "#5f6b78";
    g.textAlign = "center";
    g.fillText(extra && extra.empty || "no spectrum yet", w / 2, h / 2);
    return;
  }
  let x0 = Infinity, x1 = -Infinity, ymax = 0;
  for (const s of drawn) {
    x0 = Math.min(x0, s.x[0], s.x[s.x.length - 1]);
    x1 = Math.max(x1, s.x[0], s.x[s.x.length - 1]);
    for (const v of s.y) if (v > ymax) ymax = v;
  }
  const sat = extra && extra.saturation;
  if (sat && sat < ymax * 1.6) ymax = Math.max(ymax, sat);
  ymax = ymax > 0 ? ymax * 1.06 : 1;
  if (x1 <= x0) x1 = x0 + 1;
  const L = 46, R = 8, T = 18, B = 30;
  const pw = w - L - R, ph = h - T - B;
  const X = v => L + (v - x0) / (x1 - x0) * pw;
  const Y = v => T + ph - v / ymax * ph;
  // grid and ticks
  g.strokeStyle = "#e3e8ed";
  g.fillStyle = "#5f6b78";
  g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (const v of ticks(0, ymax, Math.max(2, Math.floor(ph / 40)))) {
    const y = Math.round(Y(v)) + .5;
    g.beginPath(); g.moveTo(L, y); g.lineTo(L + pw, y); g.stroke();
    g.fillText(countLabel(v), L - 4, y);
  }
  g.textAlign = "center"; g.textBaseline = "top";
  const xt = ticks(x0, x1, Math.max(3, Math.floor(pw / 70)));
  for (const v of xt) {
    const x = Math.round(X(v)) + .5;
    g.beginPath(); g.moveTo(x, T); g.lineTo(x, T + ph); g.stroke();
    g.fillText(String(Math.round(v)), x, T + ph + 3);
  }
  canvas.dataset.xticks = String(xt.length);
  g.textAlign = "right";
  g.fillText("nm", L + pw, T + ph + 15);
  g.textAlign = "left"; g.textBaseline = "bottom";
  g.fillText("counts", 4, T - 3);
  g.strokeStyle = "#9aa8b6";
  g.strokeRect(L + .5, T + .5, pw, ph);
  // saturation
  if (sat && sat <= ymax) {
    g.save();
    g.setLineDash([2, 3]);
    g.strokeStyle = "#c0392b";
    g.beginPath(); g.moveTo(L, Y(sat)); g.lineTo(L + pw, Y(sat)); g.stroke();
    g.restore();
  }
  // the spectra
  g.save();
  g.beginPath(); g.rect(L, T, pw, ph); g.clip();
  for (const s of drawn) {
    g.strokeStyle = s.colour;
    g.lineWidth = 1.4;
    g.setLineDash(s.dashed ? [5, 4] : []);
    g.beginPath();
    for (let i = 0; i < s.x.length; i++) {
      const x = X(s.x[i]), y = Y(s.y[i]);
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    }
    g.stroke();
  }
  g.restore();
}

function colourOf(channel) {
  const i = channels.indexOf(channel);
  return COLOURS[(i < 0 ? channels.length : i) % COLOURS.length];
}

// -- live spectra ---------------------------------------------------------------

function buildLive() {
  const box = $("plots");
  box.replaceChildren();
  box.classList.toggle("two", spectrometers.length > 1);
  for (const s of spectrometers) {
    const canvas = el("canvas", {class: "plot", "data-spectrometer": s, "data-updates": "0",
                                 role: "img", "aria-label": `latest spectra of ${s}`});
    const legend = el("tbody");
    box.append(el("figure", {id: `live-${s}`},
      el("figcaption", {}, el("span", {text: s}), el("span", {class: "muted small", id: `live-state-${s}`})),
      canvas,
      el("div", {class: "table-wrap"}, el("table", {class: "legend"},
        el("thead", {}, el("tr", {},
          el("th", {text: "channel"}), el("th", {class: "kind", text: "kind"}),
          el("th", {text: "ms"}), el("th", {text: "peak"}),
          el("th", {}, el("span", {class: "long", text: "saturated"}), el("span", {class: "short", text: "sat."})),
          el("th", {class: "when", text: "time"}))), legend))));
    live[s] = {canvas, legend, series: {}, pending: false};
    drawLive(s);
  }
}

function onSpectrum(spectrometer, channel, doc) {
  const entry = live[spectrometer];
  if (!entry || !doc || !doc.kind) return;
  const slot = entry.series[channel] || (entry.series[channel] = {});
  const kind = doc.kind === "dark" ? "dark" : "light";
  if (slot[kind] && slot[kind].time === doc.time) return;     // seen (last_spectrum and last_dark)
  slot[kind] = doc;
  entry.canvas.dataset.updates = String(Number(entry.canvas.dataset.updates) + 1);
  entry.canvas.dataset.last = doc.time || "";
  if (!entry.pending && !document.hidden) {
    // (a hidden page draws nothing: it draws everything when shown again)
    entry.pending = true;
    requestAnimationFrame(() => { entry.pending = false; drawLive(spectrometer); });
  }
}

function swatch(colour, dashed) {
  const span = el("span", {class: "swatch" + (dashed ? " dashed" : "")});
  span.style.borderColor = colour;     // the CSSOM: inline style attributes are not allowed
  return span;
}

function drawLive(spectrometer) {
  const entry = live[spectrometer];
  const series = [], rows = [];
  let saturation = null;
  for (const c of channels) {
    const slot = entry.series[c] || {};
    for (const kind of ["light", "dark"]) {
      const doc = slot[kind];
      if (!doc) continue;
      saturation = doc.saturation_level || saturation;
      series.push({x: doc.wavelengths, y: doc.pixels, colour: colourOf(c), dashed: kind === "dark"});
      const sat = doc.saturated;
      rows.push(el("tr", {},
        el("td", {}, swatch(colourOf(c), kind === "dark"), c),
        el("td", {class: "kind", text: doc.kind === "autointegration" ? "auto probe" : doc.kind}),
        el("td", {text: doc.integration_time === null ? "-" : String(doc.integration_time)}),
        el("td", {text: doc.peak === null ? "-" : String(doc.peak)}),
        el("td", {class: sat ? "sat" : "", text: sat === null || sat === undefined ? "-" : (sat ? `${sat} px` : "0")}),
        el("td", {class: "when", text: clockTime(doc.time)})));
    }
  }
  entry.legend.replaceChildren(...(rows.length ? rows :
    [el("tr", {}, el("td", {colspan: "6", class: "muted", text: "nothing recorded since the server started"}))]));
  drawPlot(entry.canvas, series, {saturation});
}

// -- state from the event stream -------------------------------------------------------

const handlers = [];
function when(pattern, fn) { handlers.push([pattern, fn]); }

function apply(path, value) {
  state[path] = value;
  for (const [pattern, fn] of handlers) {
    const m = path.match(pattern);
    if (m) fn(value, ...m.slice(1));
  }
}

when(/^control\/status$/, status => {
  const badge = $("status");
  badge.textContent = status;
  badge.className = "badge" + (status === "idle" ? "" : status === "paused" ? " paused" : " busy");
  showControls();
  $("b-pause").textContent = status === "paused" ? "Resume" : "Pause";
  // a procedure ended: its files are listed
  if (status === "idle" && files.run !== null && files.run === state["data_dir/current_run"]) loadFiles(files.run);
  showNow();
});
when(/^control\/progress$/, showNow);
when(/^control\/current_sequence$/, showNow);
when(/^control\/fault$/, fault => {
  const p = $("fault");
  p.hidden = !fault;
  p.textContent = fault ? `Last batch stopped: ${fault}` : "";
  if (fault) $("status").classList.add("fault");
});
for (const [key, id] of [["numSequences", "f-nsequence"], ["autointegration", "f-auto"],
                         ["delay", "f-delay"], ["target", "f-target"]]) {
  when(new RegExp(`^control/${key}$`), v => { const i = $(id); if (document.activeElement !== i) i.value = v; });
}
when(/^data_dir\/current_run$/, run => {
  const i = $("f-run");
  if (document.activeElement !== i) i.value = run;
  showNow();
  // the files follow the current run, unless a run was picked by hand
  if (files.run === null || !files.picked) loadRuns(run);
});
when(/^spectrometer\/([^/]+)\/last_(spectrum|dark)\/([^/]+)$/, (doc, s, which, c) => onSpectrum(s, c, doc));
when(/^spectrometer\/([^/]+)\/(status|min_time|max_time|TECenabled|target_temperature)$/, (v, s) => showSpec(s));
when(/^spectrometer\/([^/]+)\/(current_time|autointegration)\/([^/]+)$/, (v, s) => showSpec(s));
when(/^sysinfo\/health$/, showHealth);
when(/^control\/scheduler\/jobs$/, showJobs);
when(/^control\/scheduler\/(quietTimeEnabled|quietStart|quietEnd|powerOffEnabled|powerDelay)$/, showQuiet);
when(/^control\/scheduler\/fault$/, f => { const p = $("sched-fault"); p.hidden = !f; p.textContent = f || ""; });
when(/^control\/scheduler\/history$/, showHistory);

/* Buttons follow the status; on a read-only device every control is off,
   its title saying why. */
function showControls() {
  const status = state["control/status"];
  const busy = status !== undefined && status !== "idle";
  const off = !!readOnly;
  for (const [id, enabled] of [["b-record", !busy], ["b-dark", !busy], ["b-auto", !busy],
                               ["b-pause", busy], ["b-abort", busy]]) {
    $(id).disabled = off || !enabled;
  }
  for (const node of document.querySelectorAll("#control input, #specs input, #b-sync, #jobs button")) {
    node.disabled = off;
  }
  for (const node of document.querySelectorAll("#control button, #control input, #specs input, #b-sync, #jobs button")) {
    if (node.dataset.title === undefined) node.dataset.title = node.title;
    if (node.classList.contains("refused")) continue;     // its own reason
    node.title = off ? `read only: ${readOnly}` : node.dataset.title;
  }
}

function showNow() {
  const status = state["control/status"] || "…";
  const p = state["control/progress"] || {};
  $("now-text").textContent = status === "idle" ? "idle" : `${p.kind || "busy"}: ${status}`;
  let text = "", fraction = 0;
  if (p.kind && p.run !== null && p.run !== undefined) {
    text = `run ${p.run}`;
    if (p.batch !== null && p.batch !== undefined) text += `, batch ${p.batch}`;
    if (p.sequence !== null && p.sequence !== undefined && p.nsequence) {
      text += `, sequence ${p.sequence + 1} of ${p.nsequence}`;
      fraction = (p.sequence + 1) / p.nsequence;
    }
  } else if (p.kind) {
    text = p.kind;
  } else if (state["data_dir/current_run"]) {
    text = `current run ${state["data_dir/current_run"]}`;
  }
  $("progress-text").textContent = text;
  $("progress-bar").style.width = `${Math.round(fraction * 100)}%`;
}

// -- spectrometers --------------------------------------------------------------------

function buildSpecs() {
  const box = $("specs");
  box.replaceChildren();
  for (const s of spectrometers) {
    const grid = el("div", {class: "spec-grid"});
    for (const c of channels) {
      const input = el("input", {type: "text", inputmode: "numeric", class: "narrow",
        id: `t-${s}-${c}`, "aria-label": `${s} ${c} integration time (ms)`});
      setting(input, `${s} ${c} integration time`, `spectrometer/${s}/current_time/${c}`,
              () => input.value.trim());
      grid.append(el("div", {}, el("label", {for: input.id, text: `${c} (ms)`}), input,
                     el("span", {class: "muted small", id: `a-${s}-${c}`})));
    }
    for (const key of ["min_time", "max_time"]) {
      const input = el("input", {type: "text", inputmode: "numeric", class: "narrow", id: `${key}-${s}`});
      setting(input, `${s} ${key}`, `spectrometer/${s}/${key}`, () => input.value.trim());
      grid.append(el("div", {}, el("label", {for: input.id, text: key === "min_time" ? "minimum (ms)" : "maximum (ms)"}), input));
    }
    const tec = el("div", {id: `tec-${s}`, hidden: true});
    const tecOn = el("input", {type: "checkbox", id: `tec-on-${s}`});
    setting(tecOn, `${s} cooler`, `spectrometer/${s}/TECenabled`, () => tecOn.checked);
    const tecTarget = el("input", {type: "text", inputmode: "decimal", class: "narrow", id: `tec-target-${s}`});
    setting(tecTarget, `${s} cooler target`, `spectrometer/${s}/target_temperature`,
            () => tecTarget.value.trim());
    tec.append(el("label", {for: tecOn.id}, tecOn, " cooler on"), el("label", {for: tecTarget.id, text: "target (°C)"}), tecTarget);
    grid.append(tec);
    box.append(el("div", {class: "spec", id: `spec-${s}`},
      el("div", {class: "spec-head"}, el("strong", {text: s}),
        el("span", {}, el("span", {class: "state", id: `state-${s}`, text: "…"}), " ",
           el("span", {class: "muted small", id: `temp-${s}`}))),
      grid));
    showSpec(s);
  }
  showControls();
}

function setInput(id, value) {
  const i = $(id);
  if (i && document.activeElement !== i && value !== undefined && value !== null) i.value = value;
}

function showSpec(s) {
  if (!$(`spec-${s}`)) return;
  const base = `spectrometer/${s}`;
  const code = state[`${base}/status`];
  const badge = $(`state-${s}`);
  if (code !== undefined) {
    badge.textContent = STATUS_WORDS[code] || `status ${code}`;
    badge.className = `state s${code}`;
    const liveState = $(`live-state-${s}`);
    if (liveState) liveState.textContent = STATUS_WORDS[code] || "";
  }
  for (const c of channels) {
    setInput(`t-${s}-${c}`, state[`${base}/current_time/${c}`]);
    const auto = state[`${base}/autointegration/${c}`];
    $(`a-${s}-${c}`).textContent = auto ? ` auto: ${auto}` : "";
  }
  setInput(`min_time-${s}`, state[`${base}/min_time`]);
  setInput(`max_time-${s}`, state[`${base}/max_time`]);
  const tecOn = $(`tec-on-${s}`);
  if (state[`${base}/TECenabled`] !== undefined && document.activeElement !== tecOn) tecOn.checked = !!state[`${base}/TECenabled`];
  setInput(`tec-target-${s}`, state[`${base}/target_temperature`]);
}

// -- health -----------------------------------------------------------------------

function showHealth(h) {
  if (!h) return;
  const rows = [];
  const add = (k, v, bad) => rows.push(el("dt", {text: k}), el("dd", {class: bad ? "bad" : "", text: v}));
  add("disk", `${bytes(h.disk_free)} free of ${bytes(h.disk_total)}`,
      h.disk_total && h.disk_free / h.disk_total < 0.05);
  add("days left", h.days_left === null || h.days_left === undefined ? "- (no recent recording)" : `${h.days_left}`,
      h.days_left !== null && h.days_left < 7);
  add("files today", String(h.files_today ?? "-"));
  add("last batch", dateTime(h.last_batch));
  add("clock", h.clock_synchronised === true ? "synchronised" :
      h.clock_synchronised === false ? "NOT synchronised" : "unknown", h.clock_synchronised === false);
  add("uptime", `system ${duration(h.uptime)}, server ${duration(h.server_uptime)}`);
  for (const [serial, sp] of Object.entries(h.spectrometers || {})) {
    let text = sp.status ? sp.status.toLowerCase() : "-";
    if (sp.temperature !== undefined) text += `, ${sp.temperature === null ? "-" : sp.temperature.toFixed(1) + " °C"}`;
    if (sp.errors) text += `, dropped ${sp.errors}×`;
    if (sp.last_error) text += ` (${sp.last_error})`;
    add(sp.name || serial, text, sp.status === "DROPPED");
    const temp = $(`temp-${sp.name}`);
    if (temp) temp.textContent = typeof sp.temperature === "number" ? `${sp.temperature.toFixed(1)} °C` : "";
    const tec = $(`tec-${sp.name}`);
    if (tec) tec.hidden = sp.temperature === undefined;      // no cooler: no settings
  }
  const faults = Object.entries(h.faults || {}).map(([k, v]) => `${k}: ${v}`);
  if (h.fault) faults.unshift(`batch: ${h.fault}`);
  add("faults", faults.length ? faults.join("; ") : "none", faults.length > 0);
  $("health-list").replaceChildren(...rows);
}

let clockOffset = null;
async function checkClock() {
  const t0 = Date.now();
  const server = await get("sysinfo/clock");
  const t1 = Date.now();
  if (!server) return;
  clockOffset = new Date(server).getTime() - (t0 + t1) / 2;
  const off = Math.abs(clockOffset) / 1000;
  $("clock-text").textContent = `Server clock ${dateTime(server)}` +
    (off > 60 ? `, ${duration(off)} ${clockOffset < 0 ? "behind" : "ahead of"} this device` : ", agrees with this device");
  $("b-sync").hidden = off <= 60;
}

// -- scheduler ----------------------------------------------------------------------

function jobName(job) {
  if (!Array.isArray(job)) return String(job);
  if (job[0] === "record" && Array.isArray(job[1])) {
    const [run, n, auto, delay] = job[1];
    return `record ${n}× into ${run}` + (auto >= 0 ? `, auto ${auto}` : "") + (delay ? `, ${delay} s apart` : "");
  }
  return String(job[0]).replace("_", " ");
}

function showJobs(jobs) {
  const body = $("jobs").tBodies[0];
  const rows = (jobs || []).map(([id, job, start, end, interval, status]) => {
    const toggle = status === "suspended" ? "unsuspend" : "suspend";
    const repeat = interval === null || interval === undefined ? "once" :
      `every ${every(interval)}` + (end ? ` until ${dateTime(end)}` : "");
    return el("tr", {class: status},
      el("td", {text: String(id)}), el("td", {class: "wrap", text: jobName(job)}),
      el("td", {text: dateTime(start)}), el("td", {class: "wrap", text: repeat}),
      el("td", {text: status}),
      el("td", {class: "actions"},
        el("button", {type: "button", class: "small-button", text: toggle === "suspend" ? "Suspend" : "Resume",
                      onclick: () => act(`${toggle} job ${id}`, "PUT", `control/scheduler/${toggle}`, id)}), " ",
        el("button", {type: "button", class: "small-button", text: "Delete",
                      onclick: () => { if (confirm(`Delete job ${id}?`)) act(`delete job ${id}`, "PUT", "control/scheduler/delete", id); }})));
  });
  body.replaceChildren(...rows);
  $("jobs-empty").hidden = rows.length > 0;
  showControls();
  if (paths.has("control/scheduler/history") && !state.historyObserved) loadHistory();
}

function showQuiet() {
  const on = state["control/scheduler/quietTimeEnabled"];
  let text = on ? `Quiet time ${state["control/scheduler/quietStart"]} to ${state["control/scheduler/quietEnd"]}` : "No quiet time";
  if (on && state["control/scheduler/powerOffEnabled"]) text += `; spectrometers off inside it (${state["control/scheduler/powerDelay"]} s margin)`;
  $("quiet").textContent = text + ".";
}

async function loadHistory() {
  const h = await get("control/scheduler/history");
  if (h !== undefined) showHistory(h);
}

function cell(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "string" && /^\d{4}-\d\d-\d\dT/.test(v)) return dateTime(v);
  if (typeof v === "object") return Array.isArray(v) && v.length && typeof v[0] === "string" ? jobName(v) : JSON.stringify(v);
  return String(v);
}

function showHistory(history) {
  $("history-box").hidden = false;
  const items = Array.isArray(history) ? history : (history && history.history) || [];
  const rows = items.slice(0, 50).map(entry => el("tr", {},
    ...(Array.isArray(entry) ? entry : Object.values(entry || {})).map(v => el("td", {text: cell(v)}))));
  $("history").tBodies[0].replaceChildren(...(rows.length ? rows :
    [el("tr", {}, el("td", {class: "muted", text: "nothing has run yet"}))]));
}

// -- runs and files -----------------------------------------------------------------

async function loadRuns(select) {
  const r = await api("PUT", "data_dir/all_runs", {reverse: true});
  if (!r.ok) return;
  const sel = $("run-select");
  const want = select || sel.value || state["data_dir/current_run"];
  sel.replaceChildren(...r.value.map(run => el("option", {value: run, text: run})));
  if (r.value.includes(want)) sel.value = want;
  await loadFiles(sel.value);
}

async function loadFiles(run) {
  files = {run, names: [], shown: 0, chosen: files.run === run ? files.chosen : null, picked: files.picked};
  $("zip-link").href = run ? `/zip/${encodeURIComponent(run)}` : "#";
  $("file-list").replaceChildren();
  if (!run) return;
  const names = await get(`data_dir/runs/${run}/spectra_list`);
  files.names = names || [];
  $("files-count").textContent = `${files.names.length} file${files.names.length === 1 ? "" : "s"}`;
  moreFiles();
}

function moreFiles() {
  const list = $("file-list");
  const next = files.names.slice(files.shown, files.shown + FILES_PAGE);
  for (const name of next) {
    const href = `/files/${encodeURIComponent(files.run)}/${encodeURIComponent(name)}`;
    list.append(el("li", {"data-name": name, class: name === files.chosen ? "chosen" : ""},
      el("button", {type: "button", text: name, onclick: () => plotFile(files.run, name)}),
      el("a", {href: href + "?download=1", download: name, text: "download"})));
  }
  files.shown += next.length;
  $("b-more").hidden = files.shown >= files.names.length;
}

function coefficientsOf(meta) {
  return meta.WavelengthCalibrationCoefficientsPiccolo || meta.WavelengthCalibrationCoefficients || [0, 1];
}

function wavelengthsOf(coefficients, n) {
  const out = new Array(n);
  for (let i = 0; i < n; i++) {
    let v = 0;
    for (let k = coefficients.length - 1; k >= 0; k--) v = v * i + coefficients[k];
    out[i] = v;
  }
  return out;
}

async function plotFile(run, name) {
  files.chosen = name;
  for (const li of $("file-list").children) li.classList.toggle("chosen", li.dataset.name === name);
  const href = `/files/${encodeURIComponent(run)}/${encodeURIComponent(name)}`;
  $("file-name").textContent = `${run} / ${name}`;
  // on a phone the plot is below the list: bring it into view
  const plotBox = document.querySelector(".file-plot-box");
  if (plotBox.getBoundingClientRect().top > window.innerHeight * 0.5) plotBox.scrollIntoView({block: "start"});
  const link = $("file-download");
  link.href = href + "?download=1";
  link.setAttribute("download", name);
  link.hidden = false;
  const box = $("file-plots");
  box.replaceChildren(el("p", {class: "muted", text: "loading…"}));
  let doc;
  try {
    const response = await fetch(href, {cache: "no-store"});
    if (!response.ok) throw new Error(await response.text());
    doc = await response.json();
  } catch (e) {
    box.replaceChildren(el("p", {class: "fault", text: `cannot plot ${name}: ${e.message}`}));
    return;
  }
  const bySpec = new Map();
  for (const sp of doc.Spectra || []) {
    const meta = sp.Metadata || {};
    const key = meta.SerialNumber ? `S_${meta.SerialNumber}` : "?";      // the spectrometer's name
    if (!bySpec.has(key)) bySpec.set(key, []);
    bySpec.get(key).push(sp);
  }
  box.replaceChildren();
  box.classList.toggle("two", bySpec.size > 1);
  for (const [serial, spectra] of bySpec) {
    const canvas = el("canvas", {class: "plot", role: "img", "aria-label": `${name}: ${serial}`});
    const legend = el("div", {class: "muted small"});
    box.append(el("figure", {}, el("figcaption", {text: serial}), canvas, legend));
    let saturation = null;
    const series = spectra.map(sp => {
      const meta = sp.Metadata || {};
      saturation = meta.SaturationLevel || saturation;
      const px = sp.Pixels || [];
      return {x: wavelengthsOf(coefficientsOf(meta), px.length), y: px,
              colour: colourOf(meta.Direction), dashed: !!meta.Dark};
    });
    legend.textContent = spectra.map(sp => {
      const m = sp.Metadata || {};
      return `${m.Direction} ${m.Dark ? "dark" : "light"} ${m.IntegrationTime} ms, peak ${Math.max(...(sp.Pixels || [0]))}`;
    }).join(" · ");
    drawPlot(canvas, series, {saturation});
    canvas.dataset.series = String(series.length);
  }
  if (plotBox.getBoundingClientRect().top > window.innerHeight * 0.5) plotBox.scrollIntoView({block: "start"});
}

// -- controls -----------------------------------------------------------------------

function recordArgs() {
  const args = {};
  for (const key of ["run", "nsequence", "auto", "delay", "target"]) {
    const v = $(`f-${key}`).value.trim();
    if (v !== "") args[key] = v;
  }
  return args;
}

function wire() {
  $("record-form").addEventListener("submit", e => { e.preventDefault(); $("b-record").click(); });
  $("b-record").addEventListener("click", () => act("record", "PUT", "control/record_sequence", recordArgs(), "started"));
  $("b-pause").addEventListener("click", () => act(state["control/status"] === "paused" ? "resume" : "pause", "POST", "control/pause"));
  $("b-abort").addEventListener("click", () => act("abort", "POST", "control/abort"));
  $("b-dark").addEventListener("click", () => {
    const run = $("f-run").value.trim();
    act("dark sequence", "PUT", "control/record_dark", run ? {run} : {}, "started");
  });
  $("b-auto").addEventListener("click", () => {
    const target = $("f-target").value.trim();
    act("autointegration", "PUT", "control/auto", target ? {target} : {}, "started");
  });
  $("b-sync").addEventListener("click", async () => {
    await act("set the clock", "PUT", "sysinfo/clock", new Date().toISOString());
    checkClock();
  });
  $("run-select").addEventListener("change", e => {
    files.picked = e.target.value !== state["data_dir/current_run"];
    loadFiles(e.target.value);
  });
  $("b-more").addEventListener("click", moreFiles);
  $("b-refresh").addEventListener("click", () => loadRuns());
  let resize = null;
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) return;
    for (const s of spectrometers) drawLive(s);
    if (retryTimer !== null) connect();       // back in view: try the stream at once
  });
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => { for (const s of spectrometers) drawLive(s); }, 150);
  });
}

// -- start --------------------------------------------------------------------------

/* The live stream. EventSource reconnects by itself after a cut
   connection, but gives up for good when the server answers anything but
   a stream (503 when it is full or this device opened too many, a proxy's
   error page): then the page tries again itself, waiting longer each time
   (2 s doubling to a minute, with jitter), so a refusal never leaves it
   "reconnecting" until someone reloads it. */
const RETRY_FIRST = 2000, RETRY_MOST = 60000;
let stream = null, retryWait = RETRY_FIRST, retryTimer = null;

function connect() {
  const link = $("link");
  clearTimeout(retryTimer);
  retryTimer = null;
  if (stream) stream.close();
  const events = stream = new EventSource("/events");
  events.onopen = () => {
    retryWait = RETRY_FIRST;
    link.textContent = "live";
    link.className = "link";
  };
  events.onerror = () => {
    link.className = "link off";
    if (events.readyState !== EventSource.CLOSED) {
      link.textContent = "reconnecting…";
      return;
    }
    events.close();
    const wait = Math.round(retryWait * (0.8 + 0.4 * Math.random()));
    retryWait = Math.min(retryWait * 2, RETRY_MOST);
    link.textContent = `reconnecting in ${Math.ceil(wait / 1000)} s…`;
    link.dataset.retries = String(Number(link.dataset.retries || 0) + 1);
    retryTimer = setTimeout(connect, wait);
  };
  events.onmessage = e => {
    const i = e.data.indexOf("\n");
    if (i < 0) return;
    const path = e.data.slice(0, i);
    let value;
    try { value = JSON.parse(e.data.slice(i + 1)); } catch (err) { return; }
    if (path === "control/scheduler/history") state.historyObserved = true;
    apply(path, value);
  };
}

async function start() {
  wire();
  const index = await get("") || [];
  for (const r of index) paths.add(r.path);
  channels = await get("spectrometer/channels") || [];
  spectrometers = await get("spectrometer/spectrometers") || [];
  buildLive();
  buildSpecs();
  $("history-box").hidden = !paths.has("control/scheduler/history");
  connect();
  const [host, version, me] = await Promise.all([get("sysinfo/host"), get("sysinfo/version"),
                                                 fetch("/whoami").then(r => r.json()).catch(() => null)]);
  if (host) { $("host").textContent = `Piccolo ${host}`; document.title = `Piccolo ${host}`; }
  if (version) $("version").textContent = `piccolo-twisted ${version}`;
  if (me && !me.control) {
    readOnly = me.reason;
    const p = $("readonly");
    p.hidden = false;
    p.textContent = `Read only from this device: ${me.reason}`;
    showControls();
  }
  checkClock();
  setInterval(checkClock, 300000);
}

document.addEventListener("DOMContentLoaded", start);
