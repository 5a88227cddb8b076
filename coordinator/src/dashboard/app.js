// longhaul's dashboard: plain JavaScript and SVG, no dependency, nothing fetched from anywhere
// but the coordinator that served it. Every value from the API is shown through textContent or
// SVG attributes, never parsed as HTML (run names and log lines come from users and workers).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;
let timer = null;
let source = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { showLogin(await r.text()); throw new Error("unauthorized"); }
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return v.toFixed(digits === undefined ? (Number.isInteger(v) ? 0 : 3) : digits);
}

// An axis label: three significant digits, with k/M/G/T beyond a thousand.
function compact(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && a < 1e-3) return v.toExponential(1);
  for (const [d, s] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (a >= d) return (v / d).toPrecision(3) + s;
  }
  return String(Number(v.toPrecision(3)));
}

function bytes(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b) + " " + u[i];
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? s + "s ago" : s < 3600 ? Math.round(s / 60) + "m ago" : Math.round(s / 3600) + "h ago";
}

function showLogin(msg) {
  stop();
  document.getElementById("login").hidden = false;
  document.getElementById("view").replaceChildren();
  document.getElementById("logout").hidden = true;
  document.getElementById("login-error").textContent = msg && !msg.includes("needs") ? msg : "";
}

async function login(token) {
  const r = await fetch("/api/login", { method: "POST", body: token, credentials: "same-origin" });
  if (!r.ok) { showLogin(await r.text()); return false; }
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  return true;
}

function stop() {
  if (timer) { clearInterval(timer); timer = null; }
  if (source) { source.close(); source = null; }
}

// A line chart of `key` over `step`, in plain SVG. Returns the <svg>.
function chart(points, key, opts) {
  const W = 420, H = 170, L = 56, R = 8, T = 8, B = 20;
  const pts = points.filter(p => p[key] !== null && p[key] !== undefined && Number.isFinite(p[key]));
  const s = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, "data-metric": key, "data-points": pts.length });
  s.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  s.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (pts.length === 0) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
    t.textContent = "no data yet";
    s.append(t);
    return s;
  }
  const xs = pts.map(p => p.step), ys = pts.map(p => p[key]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (opts && opts.zero) y0 = Math.min(0, y0);
  if (opts && opts.unit) { y0 = Math.min(0, y0); y1 = Math.max(1, y1); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + Math.abs(y0 || 1) * 0.1; y0 -= Math.abs(y0 || 1) * 0.1; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const d = pts.map((p, i) => (i ? "L" : "M") + X(p.step).toFixed(1) + " " + Y(p[key]).toFixed(1)).join("");
  s.append(svg("path", { class: "line", d }));
  const label = (x, y, text, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor || "end" });
    t.textContent = text;
    s.append(t);
  };
  const f = opts && opts.format ? opts.format : compact;
  label(L - 4, T + 8, f(y1)); label(L - 4, H - B, f(y0));
  label(L, H - 6, "step " + x0, "start"); label(W - R, H - 6, "step " + x1);
  return s;
}

// Bytes on the ring per step, from the run's cumulative counter: over windows of at least a
// 60th of the steps shown (members report at different times, so adjacent points are noisy),
// within one membership (a membership change resets the sum: such windows are skipped).
function perStep(points) {
  const out = [];
  if (points.length < 2) return out;
  const span = Math.max(1, (points[points.length - 1].step - points[0].step) / 60);
  let a = points[0];
  for (let i = 1; i < points.length; i++) {
    const b = points[i];
    if (b.workers !== a.workers || b.bytes_moved < a.bytes_moved) { a = b; continue; }
    if (b.step - a.step < span) continue;
    out.push({ step: b.step, bytes_per_step: (b.bytes_moved - a.bytes_moved) / (b.step - a.step) });
    a = b;
  }
  return out;
}

function ring(members) {
  const W = 360, H = 340, cx = W / 2, cy = H / 2 - 5, r = Math.min(W, H) / 2 - 48;
  const s = svg("svg", { id: "ring", viewBox: `0 0 ${W} ${H}`, "data-members": members.length });
  const n = members.length;
  const pos = members.map((_, i) => {
    const a = -Math.PI / 2 + 2 * Math.PI * i / Math.max(1, n);
    return [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  for (let i = 0; n > 1 && i < n; i++) {
    const [xa, ya] = pos[i], [xb, yb] = pos[(i + 1) % n];
    s.append(svg("line", { x1: xa, y1: ya, x2: xb, y2: yb }));
    const rtt = members[i].rtt_ms_to_next;
    const t = svg("text", { class: "rtt", x: (xa + xb) / 2, y: (ya + yb) / 2 - 4 });
    t.textContent = rtt === null || rtt === undefined ? "rtt ?" : fmt(rtt, 1) + " ms";
    s.append(t);
  }
  members.forEach((m, i) => {
    const g = svg("g", { class: "member " + m.liveness, "data-worker-id": m.worker_id });
    g.append(svg("circle", { class: "node", cx: pos[i][0], cy: pos[i][1], r: 22 }));
    const t = svg("text", { x: pos[i][0], y: pos[i][1] + 4 });
    t.textContent = m.name.replace("worker-", "w");
    const h = svg("text", { x: pos[i][0], y: pos[i][1] + 38 });
    h.textContent = m.host;
    g.append(t, h);
    s.append(g);
  });
  if (n === 0) {
    const t = svg("text", { x: cx, y: cy });
    t.textContent = "no ring (the run has no members now)";
    s.append(t);
  }
  return s;
}

function split(w) {
  const c = w.compute_ms || 0, m = w.comm_ms || 0, i = w.idle_ms || 0, t = c + m + i;
  const bar = el("span", { class: "split", title: `compute ${fmt(c / 1000, 1)} s, ring ${fmt(m / 1000, 1)} s, idle ${fmt(i / 1000, 1)} s` });
  if (t > 0) for (const [k, v] of [["c", c], ["m", m], ["i", i]]) {
    const b = el("i", { class: k });
    b.style.width = (100 * v / t).toFixed(1) + "%";
    bar.append(b);
  }
  return bar;
}

function stat(label, value, key) {
  return el("div", { class: "stat", "data-stat": key }, el("b", {}, value), el("span", {}, label));
}

async function runsPage() {
  const { runs } = await api("/api/runs");
  const view = document.getElementById("view");
  const rows = runs.map(r => el("tr", { "data-run-id": r.run_id },
    el("td", {}, el("a", { href: "#/runs/" + r.run_id }, "#" + r.run_id)),
    el("td", {}, r.name),
    el("td", { class: "state-" + r.state }, r.state),
    el("td", { class: "num" }, r.committed_step + " / " + r.total_steps),
    el("td", { class: "num" }, r.workers),
    el("td", { class: "num" }, fmt(r.loss, 4)),
    el("td", { class: "num" }, r.accuracy === null ? "–" : (100 * r.accuracy).toFixed(1) + "%"),
    el("td", { class: "num" }, fmt(r.tokens_per_sec, 0)),
    el("td", {}, ago(r.updated_unix_ms))));
  view.replaceChildren(el("h1", {}, "Runs"), el("table", { id: "runs" },
    el("tr", {}, ...["run", "name", "state", "step", "workers", "loss", "accuracy", "tokens/s", "updated"].map(h => el("th", {}, h))),
    ...rows));
  if (runs.length === 0) view.append(el("p", { class: "muted" }, "No runs yet: `longhaul submit run.toml`."));
}

function workersTable(workers) {
  const head = ["worker", "host", "liveness", "time split", "samples", "verified", "syncs", "excluded",
                "audits passed", "strikes", "audited others", "wrong", "banned from", "uptime"];
  return el("table", { id: "workers" },
    el("tr", {}, ...head.map(h => el("th", {}, h))),
    ...workers.map(w => el("tr", { "data-worker-id": w.worker_id },
      el("td", {}, w.name), el("td", {}, w.host),
      el("td", { class: "live-" + w.liveness }, w.liveness),
      el("td", {}, split(w)),
      el("td", { class: "num" }, w.samples), el("td", { class: "num" }, w.verified_samples),
      el("td", { class: "num" }, w.syncs), el("td", { class: "num" }, w.excluded),
      el("td", { class: "num" }, w.audits_passed), el("td", { class: "num" }, w.strikes),
      el("td", { class: "num" }, w.audits_performed), el("td", { class: "num" }, w.audits_wrong),
      el("td", {}, w.banned_from.length ? w.banned_from.map(r => "#" + r).join(" ") : "–"),
      el("td", { class: "num" }, fmt(w.uptime_ms / 1000, 0) + " s"))));
}

async function workersPage() {
  const { workers } = await api("/api/workers");
  document.getElementById("view").replaceChildren(el("h1", {}, "Workers"), workersTable(workers));
}

function summary(r) {
  const box = el("div", { class: "stats", id: "summary", "data-state": r.state, "data-step": r.committed_step,
                          "data-total": r.total_steps, "data-workers": r.workers, "data-hash": r.committed_hash,
                          "data-epoch": r.epoch });
  box.append(
    stat("state", r.state, "state"),
    stat("step", r.committed_step + " / " + r.total_steps, "step"),
    stat("loss", fmt(r.loss, 4), "loss"),
    stat("accuracy", r.accuracy === null ? "–" : (100 * r.accuracy).toFixed(1) + "%", "accuracy"),
    stat("tokens/s", fmt(r.tokens_per_sec, 0), "tokens_per_sec"),
    stat("compute utilisation", (100 * r.compute_utilisation).toFixed(1) + "%", "compute_utilisation"),
    stat("ring bytes", bytes(r.bytes_moved), "bytes_moved"),
    stat("workers", r.workers + " (" + r.min_workers + "–" + r.max_workers + ")", "workers"),
    stat("epoch / data epoch", r.epoch + " / " + r.data_epoch, "epoch"),
    stat("restarts", r.restarts + " of " + r.restart_budget, "restarts"),
    stat("state hash", r.committed_hash || "–", "hash"));
  return box;
}

async function runPage(id) {
  const view = document.getElementById("view");
  const title = el("h1", {}, "Run #" + id);
  const sum = el("div", { id: "summary-slot" });
  const charts = el("div", { class: "charts", id: "charts" });
  const ringCard = el("div", { class: "card" }, el("h3", {}, "ring (in order; each link's measured round-trip time where known)"));
  const workersSlot = el("div", { id: "workers-slot" });
  const log = el("div", { id: "log" });
  const message = el("p", { class: "muted", id: "message" });
  view.replaceChildren(title, message, sum, el("h2", {}, "Curves"), charts,
    el("h2", {}, "Ring and workers"), el("div", { class: "row" }, ringCard, workersSlot),
    el("h2", {}, "Events"), log);

  const draw = async () => {
    const [{ run, ring: members, workers }, { points, total }] =
      await Promise.all([api("/api/runs/" + id), api("/api/runs/" + id + "/metrics?max=1500")]);
    title.textContent = "Run #" + id + " · " + run.name;
    message.textContent = run.message;
    sum.replaceChildren(summary(run));
    const card = (name, node) => el("div", { class: "card" }, el("h3", {}, name), node);
    const pct = v => (100 * v).toFixed(0) + "%";
    charts.replaceChildren(
      card("loss", chart(points, "loss")),
      card("accuracy", chart(points, "accuracy", { unit: true, format: pct })),
      card("tokens/s (run)", chart(points, "tokens_per_sec", { zero: true })),
      card("compute utilisation", chart(points, "compute_utilisation", { unit: true, format: pct })),
      card("ring bytes per step", chart(perStep(points), "bytes_per_step", { zero: true, format: v => bytes(Math.round(v)) })));
    charts.dataset.total = total;
    ringCard.replaceChildren(ringCard.firstChild, ring(members));
    workersSlot.replaceChildren(workersTable(workers));
    return run.state;
  };
  const state = await draw();
  if (!["completed", "failed", "stopped"].includes(state)) {
    timer = setInterval(() => { draw().catch(e => { document.getElementById("conn").textContent = String(e); }); }, REFRESH_MS);
  }
  // The event log, live: the log so far, then every line and status until the run ends.
  source = new EventSource("/api/runs/" + id + "/events");
  const conn = document.getElementById("conn");
  source.addEventListener("open", () => { conn.textContent = "live"; });
  source.addEventListener("log", e => {
    const { unix_ms, line } = JSON.parse(e.data);
    const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(el("div", { class: "line" }, new Date(unix_ms).toISOString().slice(11, 19) + "  " + line));
    while (log.childNodes.length > 2000) log.removeChild(log.firstChild);
    if (stick) log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("status", e => {
    const { run } = JSON.parse(e.data);
    sum.replaceChildren(summary(run));
    message.textContent = run.message;
    if (["completed", "failed", "stopped"].includes(run.state)) {
      conn.textContent = "run " + run.state;
      source.close();
      if (timer) { clearInterval(timer); timer = null; draw().catch(() => {}); }
    }
  });
  source.addEventListener("error", () => { if (source && source.readyState === EventSource.CLOSED) conn.textContent = "disconnected"; });
}

async function route() {
  stop();
  const h = location.hash.replace(/^#/, "");
  const m = h.match(/^\/runs\/(\d+)$/);
  try {
    if (m) await runPage(m[1]);
    else if (h === "/workers") await workersPage();
    else await runsPage();
    document.getElementById("login").hidden = true;
    document.getElementById("logout").hidden = false;
  } catch (e) {
    if (String(e.message) !== "unauthorized") {
      document.getElementById("view").replaceChildren(el("p", { class: "error" }, String(e.message)));
    }
  }
}

async function start() {
  // `#token=…` (as `longhaul token create --viewer` suggests): sign in with it, then drop it
  // from the address bar and the history.
  const t = location.hash.match(/^#token=([A-Za-z0-9_]+)(?:&(\/[A-Za-z0-9\/]*))?$/);
  if (t) {
    history.replaceState(null, "", location.pathname + (t[2] ? "#" + t[2] : ""));
    if (!(await login(t[1]))) return;
  } else if (location.hash.startsWith("#token=")) {
    history.replaceState(null, "", location.pathname);
  }
  document.getElementById("login-form").addEventListener("submit", async e => {
    e.preventDefault();
    if (await login(document.getElementById("token").value.trim())) route();
  });
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
    showLogin("");
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
