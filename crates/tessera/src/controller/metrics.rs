//! Prometheus metrics at `/metrics`: counters and histograms kept as events happen, and gauges
//! computed from the state at scrape time (so they can never drift from it).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{AxState, S, now_ms};
use crate::state::{JobState, NodeHealth};

#[derive(Clone)]
pub struct Metrics {
    pub submitted: Counter,
    pub heartbeats: Counter,
    pub preemptions: Counter,
    pub schedule_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    registry: std::sync::Arc<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        let submitted = Counter::default();
        let heartbeats = Counter::default();
        let preemptions = Counter::default();
        let schedule_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 20));
        let mut registry = Registry::with_prefix("tessera");
        registry.register(
            "jobs_submitted",
            "Jobs accepted by the API",
            submitted.clone(),
        );
        registry.register(
            "agent_heartbeats",
            "Sync calls received from agents",
            heartbeats.clone(),
        );
        registry.register(
            "preemptions",
            "Jobs preempted by the scheduler",
            preemptions.clone(),
        );
        registry.register(
            "scheduling_latency_seconds",
            "Time of one scheduling round (snapshot to plan)",
            schedule_seconds.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from entering the queue to being placed",
            queue_wait_seconds.clone(),
        );
        Metrics {
            submitted,
            heartbeats,
            preemptions,
            schedule_seconds,
            queue_wait_seconds,
            registry: std::sync::Arc::new(registry),
        }
    }

    pub fn observe_wait(&self, ms: u64) {
        self.queue_wait_seconds.observe(ms as f64 / 1000.0);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A sample value with `places` decimals; what rounds to zero is written without a sign (a `-0.0`
/// reads as a fault to people and to some scrapers).
fn decimal(v: f64, places: usize) -> String {
    let text = format!("{v:.places$}");
    match text.strip_prefix('-') {
        Some(digits) if digits.chars().all(|c| c == '0' || c == '.') => digits.to_string(),
        _ => text,
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn scrape(AxState(ctl): S) -> impl IntoResponse {
    let mut out = String::new();
    let _ = encode(&mut out, &ctl.metrics.registry);
    // Served in the classic text format, which has no end marker.
    if let Some(stripped) = out.strip_suffix("# EOF\n") {
        out = stripped.to_string();
    }
    {
        use std::sync::atomic::Ordering::Relaxed;
        let h = &ctl.store.health;
        let _ = writeln!(
            out,
            "# HELP tessera_store_batches Batches the store's writer committed (group commit).\n# TYPE tessera_store_batches counter\ntessera_store_batches_total {}\n# HELP tessera_store_batched_writes Writes in those batches.\n# TYPE tessera_store_batched_writes counter\ntessera_store_batched_writes_total {}\n# HELP tessera_store_commit_seconds Time spent committing them.\n# TYPE tessera_store_commit_seconds counter\ntessera_store_commit_seconds_total {}",
            h.batches.load(Relaxed),
            h.batched_writes.load(Relaxed),
            h.commit_micros.load(Relaxed) as f64 / 1e6
        );
    }
    let latest = super::telemetry::lock(&ctl.telemetry).latest.clone();
    let _ = writeln!(
        out,
        "# HELP tessera_http_connections Open connections, per listener (see --max-connections).\n# TYPE tessera_http_connections gauge"
    );
    for (listener, c) in &ctl.connections {
        let _ = writeln!(
            out,
            "tessera_http_connections{{listener=\"{listener}\"}} {}",
            c.open()
        );
    }
    ctl.store.read(|s| {
        devices(&mut out, s, &latest);
        let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut project_gpu: BTreeMap<&str, u64> = BTreeMap::new();
        let mut node_used: BTreeMap<&str, u64> = BTreeMap::new();
        for j in s.jobs.values() {
            *by_state.entry((j.project(), j.state.name())).or_default() += 1;
            if j.state.is_active() {
                *project_gpu.entry(j.project()).or_default() += j.gpu_milli_held();
                for r in j.replicas.iter().filter(|r| !r.phase.is_done()) {
                    *node_used.entry(r.device_node()).or_default() += r.gpu_milli();
                }
            }
        }
        let _ = writeln!(out, "# HELP tessera_jobs Jobs by state and project.\n# TYPE tessera_jobs gauge");
        for p in s.projects.keys() {
            for st in JobState::ALL {
                let n = by_state.get(&(p.as_str(), st.name())).copied().unwrap_or(0);
                let _ = writeln!(out, "tessera_jobs{{project=\"{}\",state=\"{}\"}} {n}", esc(p), st.name());
            }
        }
        let _ = writeln!(out, "# HELP tessera_gpu_allocated_milli Milli-GPU allocated, per node and device model.\n# TYPE tessera_gpu_allocated_milli gauge");
        let _ = writeln!(out, "# HELP tessera_gpu_capacity_milli Milli-GPU capacity, per node and device model.\n# TYPE tessera_gpu_capacity_milli gauge");
        let mut model_used: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (name, n) in &s.nodes {
            let model = n.spec.devices.first().map(|d| d.model.clone()).unwrap_or_else(|| "none".into());
            let cap = n.spec.devices.len() as u64 * 1000;
            let used = node_used.get(name.as_str()).copied().unwrap_or(0);
            let e = model_used.entry(model.clone()).or_default();
            e.0 += used;
            e.1 += cap;
            let labels = format!("node=\"{}\",model=\"{}\",simulated=\"{}\"", esc(name), esc(&model), n.simulated);
            let _ = writeln!(out, "tessera_gpu_allocated_milli{{{labels}}} {used}");
            let _ = writeln!(out, "tessera_gpu_capacity_milli{{{labels}}} {cap}");
        }
        let _ = writeln!(out, "# HELP tessera_model_gpu_allocated_milli Milli-GPU allocated per device model.\n# TYPE tessera_model_gpu_allocated_milli gauge");
        for (model, (used, cap)) in &model_used {
            let _ = writeln!(out, "tessera_model_gpu_allocated_milli{{model=\"{}\"}} {used}", esc(model));
            let _ = writeln!(out, "tessera_model_gpu_capacity_milli{{model=\"{}\"}} {cap}", esc(model));
        }
        let _ = writeln!(out, "# HELP tessera_project_gpu_allocated_milli Milli-GPU held per project.\n# TYPE tessera_project_gpu_allocated_milli gauge");
        for (name, p) in &s.projects {
            let used = project_gpu.get(name.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "tessera_project_gpu_allocated_milli{{project=\"{}\"}} {used}", esc(name));
            let _ = writeln!(out, "tessera_project_gpu_guaranteed_milli{{project=\"{}\"}} {}", esc(name), p.guaranteed_milli);
        }
        let _ = writeln!(out, "# HELP tessera_agent_last_heartbeat_age_seconds Seconds since each agent was last heard from.\n# TYPE tessera_agent_last_heartbeat_age_seconds gauge");
        let now = now_ms();
        for (name, n) in &s.nodes {
            let _ = writeln!(
                out,
                "tessera_agent_last_heartbeat_age_seconds{{node=\"{}\"}} {}",
                esc(name),
                decimal(now.saturating_sub(n.last_seen_ms) as f64 / 1000.0, 3)
            );
            let _ = writeln!(
                out,
                "tessera_node_ready{{node=\"{}\"}} {}",
                esc(name),
                u8::from(n.health == NodeHealth::Ready && !n.cordoned)
            );
        }
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// A gauge family's name and help.
type Family = (&'static str, &'static str);

/// Writes each gauge family's header, then its samples.
fn gauges(out: &mut String, families: &[Family], samples: Vec<Vec<String>>) {
    for ((name, help), lines) in families.iter().zip(samples) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    }
}

/// Device series under the names dcgm-exporter users already chart, then per-workload (slice)
/// and per-project series. Simulated devices carry `simulated="true"`.
fn devices(
    out: &mut String,
    s: &crate::state::State,
    latest: &BTreeMap<String, crate::protocol::NodeSample>,
) {
    const DCGM: [Family; 5] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
        ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB)."),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
    ];
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); DCGM.len()];
    for (node, sample) in latest {
        let Some(n) = s.nodes.get(node) else { continue };
        for d in &sample.devices {
            let model = n
                .spec
                .devices
                .get(d.index as usize)
                .map_or("unknown", |m| m.model.as_str());
            let labels = format!(
                "gpu=\"{i}\",UUID=\"TESSERA-{node}-{i}\",device=\"nvidia{i}\",modelName=\"{model}\",Hostname=\"{node}\",simulated=\"{sim}\"",
                i = d.index,
                node = esc(node),
                model = esc(model),
                sim = sample.simulated
            );
            const MIB: u64 = 1 << 20;
            let values = [
                decimal(d.util_pct, 1),
                (d.memory_used_bytes / MIB).to_string(),
                (d.memory_total_bytes.saturating_sub(d.memory_used_bytes) / MIB).to_string(),
                (d.memory_total_bytes / MIB).to_string(),
                decimal(d.power_mw as f64 / 1000.0, 3),
            ];
            for (k, v) in values.into_iter().enumerate() {
                lines[k].push(format!("{}{{{labels}}} {v}", DCGM[k].0));
            }
        }
    }
    gauges(out, &DCGM, lines);
    // Workloads (each replica's share of its devices) and projects.
    const WORKLOAD: [Family; 4] = [
        (
            "tessera_workload_gpu_util_percent",
            "A replica's GPU utilisation, percent of its share's device.",
        ),
        (
            "tessera_workload_gpu_memory_used_bytes",
            "Device memory a replica uses.",
        ),
        (
            "tessera_workload_gpu_share_milli",
            "Milli-GPU a replica holds (1000 per whole device).",
        ),
        (
            "tessera_workload_energy_joules",
            "Energy of a replica's share of its devices since it started.",
        ),
    ];
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); WORKLOAD.len()];
    let mut project_mem: BTreeMap<&str, u64> = BTreeMap::new();
    let mut project_power: BTreeMap<&str, f64> = BTreeMap::new();
    for j in s.jobs.values().filter(|j| j.state.is_active()) {
        for r in j
            .replicas
            .iter()
            .filter(|r| r.phase == crate::state::ReplicaPhase::Running)
        {
            let Some(u) = s.replica_usage.get(&j.key(r.index)) else {
                continue;
            };
            let gpus: Vec<String> = r.devices.iter().map(|d| d.device.to_string()).collect();
            let labels = format!(
                "job=\"{}\",replica=\"{}\",project=\"{}\",node=\"{}\",gpu=\"{}\",slice=\"{}\",simulated=\"{}\"",
                j.id,
                r.index,
                esc(j.project()),
                esc(r.device_node()),
                gpus.join(","),
                r.devices.first().is_some_and(|d| d.milli < 1000),
                u.simulated
            );
            let values = [
                decimal(u.gpu_util_pct, 1),
                u.gpu_memory_bytes.to_string(),
                r.gpu_milli().to_string(),
                decimal(u.energy_mj as f64 / 1000.0, 3),
            ];
            for (k, v) in values.into_iter().enumerate() {
                lines[k].push(format!("{}{{{labels}}} {v}", WORKLOAD[k].0));
            }
            *project_mem.entry(j.project()).or_default() += u.gpu_memory_bytes;
            // The replica's part of its devices' power now.
            let power: f64 = r
                .devices
                .iter()
                .filter_map(|d| {
                    let sample = latest.get(r.device_node())?;
                    let dev = sample.devices.iter().find(|x| x.index == d.device)?;
                    Some(dev.power_mw as f64 / 1000.0 * f64::from(d.milli) / 1000.0)
                })
                .sum();
            *project_power.entry(j.project()).or_default() += power;
        }
    }
    gauges(out, &WORKLOAD, lines);
    let _ = writeln!(
        out,
        "# HELP tessera_project_gpu_memory_used_bytes Device memory the project's replicas use.\n# TYPE tessera_project_gpu_memory_used_bytes gauge"
    );
    let _ = writeln!(
        out,
        "# HELP tessera_project_power_watts The project's share of its devices' power draw.\n# TYPE tessera_project_power_watts gauge"
    );
    for p in s.projects.keys() {
        let mem = project_mem.get(p.as_str()).copied().unwrap_or(0);
        let power = project_power.get(p.as_str()).copied().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "tessera_project_gpu_memory_used_bytes{{project=\"{}\"}} {mem}",
            esc(p)
        );
        let _ = writeln!(
            out,
            "tessera_project_power_watts{{project=\"{}\"}} {}",
            esc(p),
            decimal(power, 3)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_zero_is_written_as_zero() {
        assert_eq!(decimal(-0.0, 3), "0.000");
        assert_eq!(decimal(-0.0001, 1), "0.0");
        assert_eq!(decimal(2.25, 1), "2.2");
        assert_eq!(decimal(-1.5, 1), "-1.5");
    }
}
