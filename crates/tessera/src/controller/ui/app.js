// Tessera's dashboard: plain JavaScript over the controller's own API (no build step).
// Everything a workload or a member wrote (names, commands, output, audit details) reaches the
// page as text nodes only, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const token = () => sessionStorage.getItem("tessera-token");
const COLORS = ["#3b7dd8", "#d8823b", "#2e9e6a", "#a04fc4", "#c43b5c", "#3bb2c4", "#7d8b2e", "#6b4fc4"];
const colorOf = (id) => COLORS[id % COLORS.length];
const ACTIVE = ["pending", "scheduled", "running"];

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
    const err = new Error(msg);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return e;
}

const fill = (tbody, rows) => tbody.replaceChildren(...rows);
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "-");
const jobLink = (id) => el("a", { href: `#/jobs/${id}` }, id);
const bytes = (n) => {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${+n.toFixed(1)} ${units[i]}`;
};

/// Keeps a <select>'s options to `values` (after its first "any"), its choice kept.
function setOptions(select, values) {
  const current = select.value;
  const have = [...select.options].slice(1).map((o) => o.value);
  const want = [...new Set(values)].sort();
  if (current && !want.includes(current)) want.push(current);
  if (have.join("\n") === want.join("\n")) return;
  select.replaceChildren(select.options[0], ...want.map((v) => el("option", { value: v }, v)));
  select.value = current;
}

// --- login ---
let me = null;
async function showDashboard() {
  try {
    me = await api("/v1/whoami");
    $("who").textContent = `${me.user} (${me.role})`;
    $("login-panel").hidden = true;
    $("logout").hidden = false;
    route();
  } catch (e) {
    sessionStorage.removeItem("tessera-token");
    $("login-error").textContent = "Not logged in: " + e.message;
    $("login-panel").hidden = false;
    $("dashboard").hidden = true;
    $("job-page").hidden = true;
  }
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("tessera-token", $("token").value.trim());
  showDashboard();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("tessera-token");
  location.hash = "";
  location.reload();
});

// --- pages: the overview (#/) and a job's page (#/jobs/ID) ---
let page = { kind: "overview" };
function route() {
  if (!me) return;
  const m = /^#\/jobs\/(\d+)$/.exec(location.hash);
  page = m ? { kind: "job", id: Number(m[1]) } : { kind: "overview" };
  $("dashboard").hidden = page.kind !== "overview";
  $("job-page").hidden = page.kind !== "job";
  if (page.kind === "job") openJob(page.id); else closeLog();
  refresh();
}
window.addEventListener("hashchange", route);

// --- a utilisation chart (SVG) of telemetry points ---
function drawChart(target, note, points) {
  const w = 800, h = 180, pad = 30;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "GPU utilisation over time");
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
  target.replaceChildren(svg);
  const last = points[points.length - 1];
  note.textContent = last
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
        ((holders[a.gpu_node || a.node] ||= {})[d] ||= []).push({ job: j, milli: per, replica: a.index });
      }
    }
  }
  const cards = nodes.map((n) => {
    const devices = n.devices.map((d) => {
      const shares = ((holders[n.name] || {})[d.index] || []).map((h) =>
        el("a", {
          class: "share",
          href: `#/jobs/${h.job.id}`,
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
  $("project-names").replaceChildren(...projects.map((p) => el("option", { value: p.name })));
  setOptions($("filter-project"), projects.map((p) => p.name));
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

// --- the jobs table, filtered by the pool (state, project, owner) ---
const owners = new Set();
function jobsQuery() {
  const q = new URLSearchParams({ limit: "200" });
  for (const [key, id] of [["state", "filter-state"], ["project", "filter-project"], ["owner", "filter-owner"]]) {
    if ($(id).value) q.set(key, $(id).value);
  }
  return "/v1/jobs?" + q;
}
for (const id of ["filter-state", "filter-project", "filter-owner"]) $(id).addEventListener("change", refresh);
$("job-filters").addEventListener("submit", (ev) => ev.preventDefault());

function drawJobs(jobs) {
  for (const j of jobs) owners.add(j.owner);
  if (me) owners.add(me.user);
  setOptions($("filter-owner"), [...owners]);
  const shown = jobs.slice(0, 100);
  $("jobs-count").textContent = `${shown.length} job${shown.length === 1 ? "" : "s"} shown` +
    (jobs.length > shown.length ? ` (newest ${shown.length})` : "");
  fill($("jobs").tBodies[0], shown.map((j) => {
    const tr = el("tr", { "data-job": j.id, "data-state": j.state },
      el("td", {}, jobLink(j.id)), el("td", {}, j.name), el("td", {}, j.project), el("td", {}, j.owner),
      el("td", { class: "state-" + j.state }, j.state),
      el("td", {}, j.elastic ? `${j.replicas} (${j.elastic.min}-${j.elastic.max})` : j.replicas),
      el("td", {}, j.gpu), el("td", {}, j.reason));
    tr.addEventListener("click", (ev) => {
      if (ev.target.tagName !== "A") location.hash = `#/jobs/${j.id}`;
    });
    return tr;
  }));
}

function drawServices(services) {
  $("services-note").textContent = services.length ? "" : "no services";
  fill($("services").tBodies[0], services.map((s) => el("tr", { "data-service": s.name },
    el("td", {}, s.name), el("td", {}, s.project), el("td", {}, s.owner),
    el("td", {}, `${s.ready}/${s.replicas}` + (s.autoscale ? ` (${s.autoscale.min}-${s.autoscale.max})` : "")),
    el("td", {}, el("code", {}, s.path)),
    el("td", {}, ...s.jobs.flatMap((id, i) => (i ? [", ", jobLink(id)] : [jobLink(id)]))))));
}

function drawAudit(entries) {
  $("audit-note").textContent = entries.length ? `newest ${entries.length}` : "nothing recorded yet";
  fill($("audit").tBodies[0], entries.map((e) => el("tr", { "data-seq": e.seq },
    el("td", {}, time(e.ts_ms)), el("td", {}, e.actor), el("td", {}, e.action),
    el("td", {}, e.project ?? "-"), el("td", {}, e.job != null ? jobLink(e.job) : "-"), el("td", {}, e.detail))));
}

function drawUsage(report) {
  const rows = [...report.rows, report.total].map((r) => el("tr", {},
    el("td", {}, r.key), el("td", {}, r.gpu_hours.toFixed(3)), el("td", {}, r.idle_gpu_hours.toFixed(3)),
    el("td", {}, r.energy_kwh.toFixed(4) + (r.simulated ? "*" : "")), el("td", {}, r.cost.toFixed(2)), el("td", {}, r.jobs)));
  fill($("usage").tBodies[0], rows);
}

$("submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resources = {
    gpu: parseFloat($("job-gpu").value || "0"),
    cpu: parseFloat($("job-cpu").value || "0.5"),
    memory: $("job-memory").value.trim() || "256MiB",
  };
  if ($("job-gpu-memory").value.trim()) resources.gpuMemory = $("job-gpu-memory").value.trim();
  const manifest = {
    metadata: { name: $("job-name").value, project: $("job-project").value },
    spec: {
      replicas: parseInt($("job-replicas").value || "1", 10),
      resources,
      command: ["sh", "-c", $("job-command").value],
    },
  };
  try {
    const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify(manifest) });
    $("submit-result").replaceChildren("job ", jobLink(job.id), " submitted");
    $("submit-result").className = "";
    refresh();
  } catch (e) {
    $("submit-result").textContent = e.message;
    $("submit-result").className = "error";
  }
});

async function refreshOverview() {
  const [nodes, jobs, projects, pool, usage, services, audit] = await Promise.all([
    api("/v1/nodes"), api(jobsQuery()), api("/v1/projects"),
    api("/v1/telemetry?name=pool&since=6h"), api("/v1/usage?since=7d&by=project"),
    api("/v1/services"), api("/v1/audit?since=7d&limit=50"),
  ]);
  jobs.sort((a, b) => b.id - a.id);
  drawChart($("util-chart"), $("util-note"), pool.points);
  // The devices show every job that holds a share, whatever the table's filters.
  const filtered = $("filter-state").value || $("filter-project").value || $("filter-owner").value;
  drawNodes(nodes, filtered ? await api("/v1/jobs?state=scheduled,running&limit=1000") : jobs);
  drawProjects(projects);
  drawJobs(jobs);
  drawServices(services);
  drawAudit(audit);
  drawUsage(usage);
}

// --- a job's page: what it asked for, where it runs, its events, its use, its output ---
function openJob(id) {
  $("job-title").textContent = `Job ${id}`;
  $("job-state").textContent = "";
  $("job-error").textContent = "";
  $("job-summary").replaceChildren();
  $("job-cancel").hidden = true;
  for (const t of ["job-placement", "job-usage", "job-events"]) fill($(t).tBodies[0], []);
  $("job-chart").replaceChildren();
  $("job-chart-note").textContent = "";
  $("log-replica").replaceChildren();
  $("log-attempt").replaceChildren();
  closeLog();
}

function summary(job) {
  const res = [`${job.gpu} GPU`];
  if (job.gpu_memory_bytes) res.push(`${bytes(job.gpu_memory_bytes)} GPU memory`);
  res.push(`${job.cpu_milli / 1000} CPU`, `${bytes(job.memory_bytes)} memory`);
  const rows = [
    ["Project", job.project], ["Owner", job.owner], ["State", job.state], ["Reason", job.reason || "-"],
    ["Resources", res.join(", ") + ` × ${job.replicas} replica${job.replicas === 1 ? "" : "s"}`],
    ["Command", job.command.join(" ")], ["Priority", job.priority],
    ["Attempt", `${job.attempt} (${job.restarts} restart${job.restarts === 1 ? "" : "s"}, policy ${job.restart})`],
    ["Submitted", time(job.created_ms)], ["Finished", time(job.finished_ms)],
  ];
  if (job.time_limit_ms) rows.push(["Time limit", `${job.time_limit_ms / 1000} s`]);
  if (job.array) rows.push(["Array", `task ${job.array.index} of array ${job.array.id}`]);
  if (job.after && job.after.length) rows.push(["After", job.after.map((a) => JSON.stringify(a)).join(", ")]);
  if (job.held) rows.push(["Held", "yes: it starts when released"]);
  $("job-summary").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

/// Keeps a picker's options to `values` (newest last), choosing `fallback` when nothing is.
function setPicker(select, values, fallback) {
  const current = select.value;
  const have = [...select.options].map((o) => o.value).join(",");
  if (have !== values.join(",")) {
    select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  }
  select.value = values.includes(current) ? current : String(fallback);
}

async function refreshJob(id) {
  let job;
  try {
    job = await api(`/v1/jobs/${id}`);
  } catch (e) {
    $("job-error").textContent = e.message;
    return;
  }
  if (page.kind !== "job" || page.id !== id) return;
  $("job-error").textContent = "";
  $("job-title").textContent = `Job ${job.id} ${job.name}`;
  $("job-state").textContent = job.state;
  $("job-state").className = "state-" + job.state;
  $("job-cancel").hidden = !ACTIVE.includes(job.state) || (me && me.role === "viewer");
  summary(job);
  fill($("job-placement").tBodies[0], job.assignments.map((a) => el("tr", {},
    el("td", {}, a.index), el("td", {}, a.gpu_node ? `${a.node} (GPU on ${a.gpu_node})` : a.node),
    el("td", {}, a.devices.map((d) => "gpu" + d).join(", ") || "-"), el("td", {}, a.gpu_milli / 1000),
    el("td", {}, a.phase + (a.exit_code != null ? ` (exit ${a.exit_code})` : "") +
      (a.exit_message ? `: ${a.exit_message}` : "")))));

  // The pickers: every replica the job has had, every attempt it has run.
  const replicas = new Set([...Array(job.replicas).keys()].map(String));
  for (const a of job.assignments) replicas.add(String(a.index));
  const replicaList = [...replicas].sort((a, b) => a - b);
  const attempts = [...Array(job.attempt).keys()].map((i) => String(i + 1));
  const before = `${$("log-replica").value}/${$("log-attempt").value}`;
  setPicker($("log-replica"), replicaList, replicaList[0]);
  setPicker($("log-attempt"), attempts, job.attempt);
  const after = `${$("log-replica").value}/${$("log-attempt").value}`;
  if (job.attempt === 0) {
    closeLog();
    $("log-note").textContent = `not started yet (${job.reason || job.state})`;
  } else if (!log || before !== after || log.job !== id) {
    openLog(id, Number($("log-replica").value), Number($("log-attempt").value), false);
  } else {
    pollLog();
  }

  const since = Math.max(0, job.created_ms - 1000);
  const [events, usage, series] = await Promise.all([
    api(`/v1/jobs/${id}/events`),
    api(`/v1/usage?by=job&job=${id}&since=${since}`),
    job.gpu > 0
      ? api(`/v1/telemetry?name=job/${id}/${$("log-replica").value || 0}&since=${since}`).catch(() => ({ points: [] }))
      : null,
  ]);
  if (page.kind !== "job" || page.id !== id) return;
  fill($("job-events").tBodies[0], events.map((e) => el("tr", { "data-kind": e.kind },
    el("td", {}, time(e.ts_ms)), el("td", {}, e.kind), el("td", {}, e.message))));
  const u = usage.total;
  fill($("job-usage").tBodies[0], [el("tr", {},
    el("td", {}, u.gpu_hours.toFixed(4)), el("td", {}, u.idle_gpu_hours.toFixed(4)),
    el("td", {}, u.gpu_memory_gib_hours.toFixed(4)), el("td", {}, u.cpu_hours.toFixed(4)),
    el("td", {}, u.energy_kwh.toFixed(5) + (u.simulated ? " (simulated)" : "")), el("td", {}, u.cost.toFixed(2)))]);
  if (series) {
    drawChart($("job-chart"), $("job-chart-note"), series.points);
  } else {
    $("job-chart").replaceChildren();
    $("job-chart-note").textContent = "it holds no GPU, so there are no device readings";
  }
}

$("job-cancel").addEventListener("click", async () => {
  if (page.kind !== "job") return;
  try {
    await api(`/v1/jobs/${page.id}/cancel`, { method: "POST", body: "{}" });
    refresh();
  } catch (e) {
    $("job-error").textContent = e.message;
  }
});

// --- logs: they open at the latest line and follow it while the reader stays at the bottom ---
const LOG_WINDOW = 64 * 1024; // bytes read back from the end when logs open
const LOG_KEEP = 1 << 20; // characters the page keeps; older ones are dropped
const END = Number.MAX_SAFE_INTEGER; // asks where the output ends
let log = null;

function closeLog() {
  log = null;
  $("log").textContent = "";
  $("log-note").textContent = "";
  $("log-all").hidden = true;
}

const logPath = (l, offset) =>
  `/v1/jobs/${l.job}/logs?replica=${l.replica}&attempt=${l.attempt}&offset=${offset}`;

function atBottom() {
  const p = $("log");
  return p.scrollHeight - p.scrollTop - p.clientHeight < 8;
}

function appendLog(text) {
  if (!text) return;
  const p = $("log");
  const follow = atBottom();
  let all = p.textContent + text;
  if (all.length > LOG_KEEP) {
    const cut = all.indexOf("\n", all.length - LOG_KEEP / 2);
    all = all.slice(cut + 1);
    $("log-note").textContent = "older output dropped from this page (it is still kept by the pool)";
    $("log-all").hidden = false;
  }
  p.textContent = all;
  if (follow) p.scrollTop = p.scrollHeight;
}

/// Opens a replica's output of one attempt at its end (the last 64 KiB), or from its start.
async function openLog(job, replica, attempt, fromStart) {
  const l = { job, replica, attempt, offset: 0, busy: true, done: false };
  log = l;
  $("log").textContent = "";
  $("log-note").textContent = "";
  $("log-all").hidden = true;
  try {
    const end = (await api(logPath(l, END))).offset;
    let at = fromStart ? 0 : Math.max(0, end - LOG_WINDOW);
    const skipped = at;
    let text = "";
    while (at < end) {
      const chunk = await api(logPath(l, at));
      if (log !== l) return;
      if (chunk.next_offset <= at) break;
      text += chunk.data;
      at = chunk.next_offset;
    }
    if (skipped > 0) {
      // Read back from the middle of a line: start at the next whole one.
      text = text.slice(text.indexOf("\n") + 1);
      const lines = text.split("\n").length - 1;
      $("log-note").textContent = `the newest ${lines} lines; earlier output not shown`;
      $("log-all").hidden = false;
    }
    l.offset = at;
    $("log").textContent = text;
    $("log").scrollTop = $("log").scrollHeight;
  } catch (e) {
    if (log === l) $("log-note").textContent = e.message;
  } finally {
    l.busy = false;
  }
}

async function pollLog() {
  const l = log;
  if (!l || l.busy || l.done) return;
  l.busy = true;
  try {
    const chunk = await api(logPath(l, l.offset));
    if (log !== l) return;
    if (chunk.cut > 0) appendLog(`[${chunk.cut} bytes of output were cut: the pool keeps only the newest]\n`);
    appendLog(chunk.data);
    l.offset = chunk.next_offset;
    if (chunk.done) {
      l.done = true;
      if (!$("log-note").textContent) $("log-note").textContent = "this replica's output has ended";
    }
  } catch (e) {
    if (log === l) $("log-note").textContent = e.message;
  } finally {
    l.busy = false;
  }
}

for (const id of ["log-replica", "log-attempt"]) {
  $(id).addEventListener("change", () => {
    if (page.kind === "job") openLog(page.id, Number($("log-replica").value), Number($("log-attempt").value), false);
  });
}
$("log-all").addEventListener("click", () => {
  if (log) openLog(log.job, log.replica, log.attempt, true);
});
$("log-controls").addEventListener("submit", (ev) => ev.preventDefault());

// One refresh at a time; one asked for meanwhile (a filter changed) runs when it ends.
let refreshing = false, again = false;
async function refresh() {
  if (!token() || !me) return;
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    do {
      again = false;
      try {
        if (page.kind === "job") await refreshJob(page.id); else await refreshOverview();
      } catch (e) {
        const note = page.kind === "job" ? $("job-error") : $("util-note");
        note.textContent = "refresh failed: " + e.message;
      }
    } while (again);
  } finally {
    refreshing = false;
  }
}

setInterval(refresh, 2000);
if (token()) showDashboard(); else $("login-panel").hidden = false;
