// thinblock dashboard: a client of the REST API under /api/v1, nothing else.
// The bearer token is kept in sessionStorage (this tab only) and sent with every request;
// every state-changing request sends a JSON body ({} when there is nothing to say), so it
// passes the API's cross-site rules (only application/json is accepted for those).
// Data is put into the page with textContent only, never as HTML.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "thinblock-token";
const REFRESH_MS = 2000;
const HISTORY_MS = 5000;
const state = { pools: [], volumes: [], status: null };

// --- talking to the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const init = { method, headers };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error : `HTTP ${response.status}`;
    if (response.status === 401) showLogin(message);
    throw new ApiError(response.status, message);
  }
  return data;
}

// --- formatting (as the CLI does: binary units) -------------------------------------------------

function size(n) {
  if (n === null || n === undefined) return "-";
  const units = [["PiB", 2 ** 50], ["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, mult] of units) {
    if (Math.abs(n) >= mult) {
      const v = n / mult;
      return (Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1)) + " " + unit;
    }
  }
  return n + " B";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
  const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

function pct(part, whole) { return whole ? (100 * part / whole).toFixed(1) + "%" : "-"; }

function forecastText(f, what) {
  if (!f || f.rate === null) return "no history yet";
  if (f.rate <= 0) return "not growing";
  const parts = [size(Math.round(f.rate)) + "/s"];
  if (f.to_warning !== null) parts.push("warning " + (f.to_warning === 0 ? "reached" : "in " + duration(f.to_warning)));
  if (f.to_limit !== null) parts.push(what + " " + (f.to_limit === 0 ? "reached" : "in " + duration(f.to_limit)));
  return parts.join(", ");
}

// --- small DOM helpers ---------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function healthCell(text) { return el("td", { class: "health-" + text }, text); }

function gauge(parts, small) {
  // parts: [{cls, fraction}] drawn as bars (cap, used) or marks (warning, limit)
  const g = el("div", { class: "gauge" + (small ? " small" : "") });
  for (const p of parts) {
    if (p.fraction === null || p.fraction === undefined || !isFinite(p.fraction)) continue;
    const f = Math.max(0, Math.min(1, p.fraction)) * 100;
    if (p.mark) g.append(el("div", { class: "mark " + p.cls, style: `left: calc(${f}% - 1px)`, title: p.title || "" }));
    else g.append(el("div", { class: p.cls, style: `width: ${f}%`, title: p.title || "" }));
  }
  return g;
}

function replaceRows(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function banner(message) {
  const b = document.getElementById("banner");
  b.textContent = message || "";
  b.hidden = !message;
}

// --- confirmations (the CLI's wording) -----------------------------------------------------------

function confirmDialog(text, inputCaption) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  const label = document.getElementById("confirm-input-label");
  const input = document.getElementById("confirm-input");
  label.hidden = !inputCaption;
  input.value = "";
  document.getElementById("confirm-input-caption").textContent = inputCaption || "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "yes" ? (inputCaption ? input.value : true) : null);
    }, { once: true });
    dialog.showModal();
  });
}

// --- rendering -----------------------------------------------------------------------------------

function renderSummary(s) {
  document.getElementById("node").textContent = `${s.node} · thinblock ${s.version} · up ${duration(s.uptime)}`;
  document.getElementById("alert-count").textContent = s.open_alerts ? String(s.open_alerts) : "";
  const card = (title, big, sub) => el("div", { class: "card" }, el("div", { class: "muted" }, title), el("div", { class: "big" }, big), el("div", { class: "muted" }, sub));
  document.getElementById("summary").replaceChildren(
    card("Pools", `${size(s.used)} used`, `of ${size(s.capacity)} (${pct(s.used, s.capacity)})`),
    card("Volumes", `${s.volumes}`, `${size(s.allocated)} allocated of ${size(s.virtual)} virtual`),
    card("Overcommit", s.overcommit === null ? "-" : s.overcommit + "x", "virtual over what the pools may hold"),
    card("Disks", `${s.pds} PDs, ${s.lds} LDs`, (s.pds_failed ? `${s.pds_failed} PD failed` : "no PD failed") + (s.lds_degraded ? `, ${s.lds_degraded} LD not normal` : "")),
    card("Alerts", `${s.open_alerts} open`, s.rebuild_running ? "rebuild running" : ""),
  );
}

function renderPools(pools) {
  const cards = pools.map((p) => {
    const top = Math.max(p.growth_limit || 0, p.capacity, p.growth_warning || 0, p.used) || 1;
    const g = gauge([
      { cls: "cap", fraction: p.capacity / top, title: "capacity " + size(p.capacity) },
      { cls: "used", fraction: p.used / top, title: "used " + size(p.used) },
      { cls: "warning", mark: true, fraction: p.growth_warning === null ? null : p.growth_warning / top, title: "growth warning " + size(p.growth_warning) },
      { cls: "limit", mark: true, fraction: p.growth_limit === null ? null : p.growth_limit / top, title: "growth limit " + size(p.growth_limit) },
    ]);
    return el("div", { class: "card pool", dataset: { pool: p.name } },
      el("div", { class: "big" }, p.name, " ", el("span", { class: "muted" }, `RAID ${p.raid} (${p.set_size})`), " ", el("span", { class: "health-" + p.state }, p.state)),
      g,
      el("dl", {},
        el("dt", {}, "used"), el("dd", { class: "pool-used" }, `${size(p.used)} of ${size(p.capacity)} (${pct(p.used, p.capacity)})`),
        el("dt", {}, "free"), el("dd", {}, size(p.free)),
        el("dt", {}, "growth"), el("dd", {}, `increment ${size(p.growth_increment)}, warning ${size(p.growth_warning)}, limit ${size(p.growth_limit)}`),
        el("dt", {}, "volumes"), el("dd", {}, `${p.volumes}: ${size(p.virtual)} virtual, overcommit ${p.overcommit === null ? "-" : p.overcommit + "x"}`),
        el("dt", {}, "forecast"), el("dd", { class: "pool-forecast" }, forecastText(p.forecast, "limit")),
      ));
  });
  document.getElementById("pool-cards").replaceChildren(...cards);
  const select = document.getElementById("create-pool");
  const chosen = select.value;
  select.replaceChildren(...pools.map((p) => el("option", { value: p.name }, p.name)));
  if (chosen && pools.some((p) => p.name === chosen)) select.value = chosen;
}

function renderVolumes(volumes, owner) {
  replaceRows("#volume-table", volumes.map((v) => {
    const marks = [
      { cls: "used", fraction: v.allocated / v.size, title: `allocated ${size(v.allocated)}` },
      { cls: "warning", mark: true, fraction: v.alloc_warning === null ? null : v.alloc_warning / v.size, title: "warning " + size(v.alloc_warning) },
      { cls: "limit", mark: true, fraction: v.alloc_limit === null ? null : v.alloc_limit / v.size, title: "limit " + size(v.alloc_limit) },
    ];
    const clients = v.clients.map((c) => `${c.protocol} ${c.peer}`).join(", ");
    return el("tr", { dataset: { volume: v.name } },
      el("td", {}, v.name),
      el("td", {}, v.pool),
      el("td", {}, el("span", { class: "allocated" }, `${size(v.allocated)} of ${size(v.size)}`), gauge(marks, true)),
      el("td", {}, `${v.alloc_warning_spec || "-"} / ${v.alloc_limit_spec || "-"}`,
        v.snapshot_limit === null ? "" : el("div", { class: "snapshot-space muted", title: `at the limit: ${v.snapshot_limit_policy}` },
          `snapshots ${size(v.snapshot_space)} of ${v.snapshot_limit_spec}`)),
      el("td", { class: "muted" }, forecastText(v.forecast, "limit")),
      el("td", {}, v.cache_mode),
      el("td", {}, owner),
      el("td", { class: "clients", title: clients }, v.clients.length ? `${v.clients.length}: ${clients}` : "0"),
      el("td", {},
        el("button", { type: "button", class: "grow", onclick: () => growVolume(v) }, "Grow"), " ",
        el("button", { type: "button", class: "danger delete", onclick: () => deleteVolume(v) }, "Delete")));
  }));
}

function renderDisks(pds, lds, rebuild) {
  replaceRows("#pd-table", pds.map((pd) => el("tr", { dataset: { pd: pd.id } },
    el("td", {}, pd.id), el("td", {}, pd.path), el("td", {}, size(pd.size)),
    el("td", {}, `${pd.chunklets_used} / ${pd.chunklets_free} (${size(pd.chunklet_size)} each)`),
    healthCell(pd.health))));
  replaceRows("#ld-table", lds.map((ld) => el("tr", { dataset: { ld: ld.id } },
    el("td", {}, ld.id), el("td", {}, ld.pool), el("td", {}, `${ld.raid} (${ld.set_size})`),
    el("td", {}, size(ld.size)), el("td", {}, `${ld.regions_used} of ${ld.regions}`),
    el("td", {}, [...new Set(ld.chunklets.map((c) => c.pd_id))].join(", ")),
    healthCell(ld.health))));
  const r = document.getElementById("rebuild");
  if (rebuild.running) r.textContent = `rebuild: ${pct(rebuild.bytes_done, rebuild.bytes_total)} (${size(rebuild.bytes_done)} of ${size(rebuild.bytes_total)}, LD ${rebuild.current_ld})`;
  else if (rebuild.error) r.textContent = "last rebuild failed: " + rebuild.error;
  else r.textContent = "";
}

function renderAlerts(alerts) {
  const sorted = [...alerts].reverse();
  replaceRows("#alert-table", sorted.map((a) => el("tr", { dataset: { alert: a.id, kind: a.kind } },
    el("td", {}, a.id), el("td", {}, new Date(a.time * 1000).toLocaleString()),
    el("td", { class: "sev-" + a.severity }, a.severity), el("td", {}, a.kind), el("td", {}, a.object),
    el("td", {}, a.message), el("td", { class: "state" }, a.state),
    el("td", {}, a.state === "new" ? el("button", { type: "button", class: "ack", onclick: () => ackAlert(a) }, "Acknowledge") : ""))));
}

// --- charts (canvas, drawn here: no library) -----------------------------------------------------

const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563"];

function drawChart(canvasId, legendId, times, series, format) {
  const canvas = document.getElementById(canvasId);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 70, bottom = 20, top = 8, right = 8;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e5e7eb";
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  max = max || 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + (h - top - bottom) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.fillText(format(max * i / 4), 4, y + 4);
  }
  if (times.length < 2) {
    ctx.fillText("collecting samples...", left + 10, h / 2);
  } else {
    const t0 = times[0], t1 = times[times.length - 1];
    const x = (t) => left + (w - left - right) * (t - t0) / ((t1 - t0) || 1);
    const y = (v) => top + (h - top - bottom) * (1 - v / max);
    ctx.fillText(new Date(t0 * 1000).toLocaleTimeString(), left, h - 4);
    const end = new Date(t1 * 1000).toLocaleTimeString();
    ctx.fillText(end, w - right - ctx.measureText(end).width, h - 4);
    series.forEach((s, i) => {
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      let started = false;
      s.values.forEach((v, j) => {
        if (v === null) { started = false; return; }
        if (!started) { ctx.moveTo(x(times[j]), y(v)); started = true; } else ctx.lineTo(x(times[j]), y(v));
      });
      ctx.stroke();
      ctx.lineWidth = 1;
      ctx.strokeStyle = "#e5e7eb";
    });
  }
  document.getElementById(legendId).replaceChildren(...series.map((s, i) =>
    el("span", {}, el("i", { style: "background:" + COLORS[i % COLORS.length] }), s.name)));
}

function rates(times, counters) {
  // per-second differences of a counter; null where either side is missing or it went down
  return counters.map((v, i) => {
    if (i === 0 || v === null || counters[i - 1] === null) return null;
    const dt = times[i] - times[i - 1];
    const d = v - counters[i - 1];
    return dt > 0 && d >= 0 ? d / dt : null;
  });
}

async function refreshHistory() {
  const h = await api("GET", "/history?seconds=10800");
  const span = h.times.length > 1 ? duration(h.times[h.times.length - 1] - h.times[0]) : "just started";
  document.getElementById("history-span").textContent = `${span}, a sample every ${h.interval} s`;
  drawChart("chart-alloc", "legend-alloc", h.times,
    Object.entries(h.pools).map(([name, s]) => ({ name, values: s.used })), size);
  const sum = (field) => h.times.map((_, i) => {
    let total = null;
    for (const v of Object.values(h.volumes)) if (v[field][i] !== null) total = (total || 0) + v[field][i];
    return total;
  });
  drawChart("chart-io", "legend-io", h.times, [
    { name: "read", values: rates(h.times, sum("read_bytes")) },
    { name: "write", values: rates(h.times, sum("write_bytes")) },
  ], (v) => size(Math.round(v)) + "/s");
}

// --- actions -------------------------------------------------------------------------------------

async function createVolume(event) {
  event.preventDefault();
  const result = document.getElementById("create-result");
  const body = {
    name: document.getElementById("create-name").value.trim(),
    pool: document.getElementById("create-pool").value,
    size: document.getElementById("create-size").value.trim(),
  };
  const warning = document.getElementById("create-warning").value.trim();
  const limit = document.getElementById("create-limit").value.trim();
  const cache = document.getElementById("create-cache").value;
  if (warning) body.alloc_warning = warning;
  if (limit) body.alloc_limit = limit;
  if (cache) body.cache_mode = cache;
  const snapLimit = document.getElementById("create-snap-limit").value.trim();
  const snapPolicy = document.getElementById("create-snap-policy").value;
  if (snapLimit) body.snapshot_limit = snapLimit;
  if (snapPolicy) body.snapshot_limit_policy = snapPolicy;
  try {
    const v = await api("POST", "/volumes", body);
    result.className = "";
    result.textContent = `created ${v.name} (${size(v.size)}): ${v.export_uri || ""}`;
    document.getElementById("create-form").reset();
    await refresh();
  } catch (e) {
    result.className = "error";
    result.textContent = e.message;
  }
}

async function growVolume(v) {
  const answer = await confirmDialog(`Grow volume '${v.name}' (now ${size(v.size)}) to:`, "new size (e.g. 200GiB)");
  if (!answer) return;
  try { await api("POST", `/volumes/${encodeURIComponent(v.name)}/grow`, { size: answer.trim() }); banner(""); }
  catch (e) { banner(e.message); }
  await refresh();
}

async function deleteVolume(v) {
  // The CLI's question: delete volume 'NAME' (SIZE, ALLOCATED of data)? [y/N]
  if (!await confirmDialog(`delete volume '${v.name}' (${size(v.size)}, ${size(v.allocated)} of data)?`)) return;
  const path = `/volumes/${encodeURIComponent(v.name)}`;
  try {
    await api("DELETE", path);
    banner("");
  } catch (e) {
    if (e.status === 409 && /in use/.test(e.message)) {
      // As `vv delete --force`: the clients are disconnected and their I/O fails from then on.
      if (await confirmDialog(e.message + ". Disconnect and delete anyway?")) {
        try { await api("DELETE", path + "?force=true"); banner(""); } catch (e2) { banner(e2.message); }
      }
    } else {
      banner(e.message);
    }
  }
  await refresh();
}

async function ackAlert(a) {
  try { await api("POST", `/alerts/${a.id}/ack`); banner(""); } catch (e) { banner(e.message); }
  await refresh();
}

// --- log in, refresh loop ------------------------------------------------------------------------

function showLogin(message) {
  document.getElementById("app").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? message : "";
  document.getElementById("logout").hidden = true;
}

function showApp() {
  document.getElementById("login").hidden = true;
  document.getElementById("app").hidden = false;
  document.getElementById("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const [status, pools, volumes, pds, lds, rebuild, alerts] = await Promise.all([
      api("GET", "/status"), api("GET", "/pools"), api("GET", "/volumes"), api("GET", "/pds"),
      api("GET", "/lds"), api("GET", "/rebuild"), api("GET", "/alerts?all=false"),
    ]);
    showApp();
    Object.assign(state, { status, pools, volumes });
    renderSummary(status);
    renderPools(pools);
    renderVolumes(volumes, status.node);
    renderDisks(pds, lds, rebuild);
    renderAlerts(alerts);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) banner("cannot reach the daemon: " + e.message);
  } finally {
    refreshing = false;
  }
}

async function login(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("login-token").value);
  document.getElementById("login-token").value = "";
  await refresh();
  await refreshHistory().catch(() => {});
}

function start() {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("create-form").addEventListener("submit", createVolume);
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });
  refresh().then(() => refreshHistory().catch(() => {}));
  setInterval(() => { if (!document.getElementById("app").hidden) refresh(); }, REFRESH_MS);
  setInterval(() => { if (!document.getElementById("app").hidden) refreshHistory().catch(() => {}); }, HISTORY_MS);
}

start();
