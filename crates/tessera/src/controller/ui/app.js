// Tessera's dashboard: plain JavaScript over the controller's own API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem("tessera-token");
const COLORS = ["#3b7dd8", "#d8823b", "#2e9e6a", "#a04fc4", "#c43b5c", "#3bb2c4", "#7d8b2e", "#6b4fc4"];
const colorOf = (id) => COLORS[id % COLORS.length];

async function api(path, options = {}) {
  const resp = await fetch(path, {
    ...options,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
  });
  const text = await resp.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  if (!resp.ok) {
    const msg = (body && body.error && body.error.message) || text || resp.statusText;
    throw new Error(msg);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// --- login ---
async function showDashboard() {
  try {
    const me = await api("/v1/whoami");
    $("who").textContent = `${me.user} (${me.role})`;
    $("login-panel").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    refresh();
  } catch (e) {
    sessionStorage.removeItem("tessera-token");
    $("login-error").textContent = "Not logged in: " + e.message;
    $("login-panel").hidden = false;
    $("dashboard").hidden = true;
  }
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("tessera-token", $("token").value.trim());
  showDashboard();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("tessera-token");
  location.reload();
});

// --- pool utilisation chart (SVG) ---
function drawChart(points) {
  const w = 800, h = 180, pad = 30;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = (x1, y1, x2, y2, color) => {
    const l = document.createElementNS(svg.namespaceURI, "line");
    Object.entries({ x1, y1, x2, y2, stroke: color }).forEach(([k, v]) => l.setAttribute(k, v));
    svg.append(l);
  };
  const text = (x, y, s) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10"); t.setAttribute("fill", "#667");
    t.textContent = s; svg.append(t);
  };
  for (const pct of [0, 50, 100]) {
    const y = h - pad - (h - 2 * pad) * pct / 100;
    line(pad, y, w - 5, y, "#e4e7eb");
    text(2, y + 3, pct + "%");
  }
  if (points.length > 0) {
    const t0 = points[0].ts_ms, t1 = Math.max(points[points.length - 1].ts_ms, t0 + 1);
    const xy = points.map((p) => [
      pad + (w - pad - 5) * (p.ts_ms - t0) / (t1 - t0),
      h - pad - (h - 2 * pad) * Math.min(100, p.util_pct) / 100,
    ]);
    const poly = document.createElementNS(svg.namespaceURI, "polyline");
    poly.setAttribute("points", xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
    poly.setAttribute("fill", "none"); poly.setAttribute("stroke", "#3b7dd8"); poly.setAttribute("stroke-width", "2");
    svg.append(poly);
    text(pad, h - 8, new Date(t0).toLocaleTimeString());
    text(w - 70, h - 8, new Date(t1).toLocaleTimeString());
  }
  $("util-chart").replaceChildren(svg);
  const last = points[points.length - 1];
  $("util-note").textContent = last
    ? `now ${last.util_pct.toFixed(1)}% busy, ${(last.power_mw / 1000).toFixed(0)} W, ` +
      `${(last.memory_used_bytes / 2 ** 30).toFixed(1)} of ${(last.memory_total_bytes / 2 ** 30).toFixed(0)} GiB device memory` +
      (last.simulated ? " (simulated devices)" : "")
    : "no readings yet";
}

// --- nodes drawn as devices split into the shares jobs hold ---
function drawNodes(nodes, jobs) {
  const holders = {}; // node -> device -> [{job, milli}]
  for (const j of jobs) {
    for (const a of j.assignments) {
      if (a.phase === "exited" || a.phase === "lost" || a.phase === "not_started" || a.devices.length === 0) continue;
      const per = a.gpu_milli / a.devices.length;
      for (const d of a.devices) {
        ((holders[a.node] ||= {})[d] ||= []).push({ job: j, milli: per, replica: a.index });
      }
    }
  }
  const cards = nodes.map((n) => {
    const devices = n.devices.map((d) => {
      const shares = ((holders[n.name] || {})[d.index] || []).map((h) =>
        el("div", {
          class: "share",
          style: `width:${h.milli / 10}%;background:${colorOf(h.job.id)}`,
          title: `job ${h.job.id} (${h.job.name}, ${h.job.project}) replica ${h.replica}: ${h.milli / 1000} GPU`,
        }, `job ${h.job.id} ${h.milli / 1000}`));
      return el("div", { class: "device" },
        el("span", { class: "label" }, `gpu${d.index} ${d.model}${d.simulated ? " (sim)" : ""}`),
        el("div", { class: "bar", "data-node": n.name, "data-device": d.index }, ...shares));
    });
    const state = n.health !== "ready" ? n.health : n.cordoned ? "cordoned" : "ready";
    const labels = Object.entries(n.labels).filter(([k]) => !k.startsWith("tessera.io/"))
      .map(([k, v]) => `${k}=${v}`).join(", ");
    return el("div", { class: "node" },
      el("h3", {}, `${n.name} — ${state}, ${(n.cpu_allocated_milli / 1000)}/${n.cpu_milli / 1000} CPU` + (labels ? `, ${labels}` : "")),
      ...devices);
  });
  $("nodes").replaceChildren(...cards);
}

function drawProjects(projects) {
  fill($("projects").tBodies[0], projects.map((p) => {
    const cap = Math.max(p.limit_gpu || 0, p.guaranteed_gpu, p.used_gpu, 0.001);
    // Over quota: using more than a guarantee it has. Without a guarantee or a limit there is no
    // quota to be over (the project shares what is free).
    const over = p.guaranteed_gpu > 0 && p.used_gpu > p.guaranteed_gpu;
    const used = el("div", {
      class: "used" + (over ? " over" : ""),
      style: `width:${Math.min(100, 100 * p.used_gpu / cap)}%`,
    });
    const noQuota = !p.guaranteed_gpu && p.limit_gpu == null;
    const bar = noQuota
      ? el("span", { class: "no-quota", title: "no guaranteed share and no limit: it uses what is free" }, "no quota")
      : el("div", {
        class: "quota",
        title: `${p.used_gpu} GPU in use of ${p.guaranteed_gpu} guaranteed` +
          (p.limit_gpu != null ? `, limit ${p.limit_gpu}` : "") + (over ? " (over its guarantee)" : ""),
      }, used);
    const policy = [];
    const pol = p.policy || {};
    if (pol.residency) policy.push(Object.entries(pol.residency).map(([k, v]) => `${k}=${v}`).join(","));
    if (pol.device_models) policy.push("models " + pol.device_models.join(","));
    if (pol.max_job_gpu_milli) policy.push(`<=${pol.max_job_gpu_milli / 1000} GPU/job`);
    if (pol.idle_after_ms) policy.push(`idle stop ${pol.idle_after_ms / 1000}s`);
    return el("tr", {},
      el("td", {}, p.name), el("td", {}, bar),
      el("td", {}, p.used_gpu), el("td", {}, p.guaranteed_gpu), el("td", {}, p.limit_gpu ?? "-"),
      el("td", {}, (p.recent_gpu || 0).toFixed(3)), el("td", {}, p.jobs_running), el("td", {}, p.jobs_pending),
      el("td", {}, policy.join("; ") || "-"));
  }));
}

let logJob = null, logOffset = 0;
function drawJobs(jobs) {
  fill($("jobs").tBodies[0], jobs.slice(0, 100).map((j) => {
    const tr = el("tr", { "data-job": j.id },
      el("td", {}, j.id), el("td", {}, j.name), el("td", {}, j.project), el("td", {}, j.owner),
      el("td", { class: "state-" + j.state }, j.state),
      el("td", {}, j.elastic ? `${j.replicas} (${j.elastic.min}-${j.elastic.max})` : j.replicas),
      el("td", {}, j.gpu), el("td", {}, j.reason));
    tr.addEventListener("click", () => openLogs(j.id));
    return tr;
  }));
}

function openLogs(id) {
  logJob = id; logOffset = 0;
  $("log").textContent = "";
  $("log-job").textContent = id;
  $("log-panel").hidden = false;
  pollLogs();
}
$("log-close").addEventListener("click", () => { logJob = null; $("log-panel").hidden = true; });

async function pollLogs() {
  if (logJob === null) return;
  try {
    const chunk = await api(`/v1/jobs/${logJob}/logs?replica=0&offset=${logOffset}`);
    $("log").textContent += chunk.data;
    logOffset = chunk.next_offset;
  } catch (e) {
    if (!$("log").textContent) $("log").textContent = e.message;
  }
}

function drawUsage(report) {
  const rows = [...report.rows, report.total].map((r) => el("tr", {},
    el("td", {}, r.key), el("td", {}, r.gpu_hours.toFixed(3)), el("td", {}, r.idle_gpu_hours.toFixed(3)),
    el("td", {}, r.energy_kwh.toFixed(4) + (r.simulated ? "*" : "")), el("td", {}, r.cost.toFixed(2)), el("td", {}, r.jobs)));
  fill($("usage").tBodies[0], rows);
}

$("submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const gpu = parseFloat($("job-gpu").value || "0");
  const manifest = {
    metadata: { name: $("job-name").value, project: $("job-project").value },
    spec: { resources: { gpu, cpu: 0.5, memory: "256MiB" }, command: ["sh", "-c", $("job-command").value] },
  };
  try {
    const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify(manifest) });
    $("submit-result").textContent = `job ${job.id} submitted`;
    $("submit-result").className = "";
    refresh();
  } catch (e) {
    $("submit-result").textContent = e.message;
    $("submit-result").className = "error";
  }
});

async function refresh() {
  if (!token() || $("dashboard").hidden) return;
  try {
    const [nodes, jobs, projects, pool, usage] = await Promise.all([
      api("/v1/nodes"), api("/v1/jobs?limit=200"), api("/v1/projects"),
      api("/v1/telemetry?name=pool&since=6h"), api("/v1/usage?since=7d&by=project"),
    ]);
    jobs.sort((a, b) => b.id - a.id);
    drawChart(pool.points);
    drawNodes(nodes, jobs);
    drawProjects(projects);
    drawJobs(jobs);
    drawUsage(usage);
    pollLogs();
  } catch (e) {
    $("util-note").textContent = "refresh failed: " + e.message;
  }
}

setInterval(refresh, 2000);
if (token()) showDashboard(); else $("login-panel").hidden = false;
