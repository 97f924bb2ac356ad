//! Time series of device and workload use: the agents' samples, kept raw in memory for the last
//! minutes and folded into one point per minute in the store (kept 30 days), so the series are
//! bounded however long the pool runs.
//!
//! Series are named `gpu/NODE/INDEX` (a device) and `job/ID/REPLICA` (a workload). A controller
//! that stops loses at most the minute not yet folded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::Query;
use serde::{Deserialize, Serialize};

use super::{ApiError, AxState, Caller, Ctl, S, now_ms};
use crate::protocol::{NodeSample, ReplicaUsage};

/// Raw samples kept in memory per series.
const RAW_KEEP_MS: u64 = 15 * 60_000;
/// Stored minute points are kept this long.
pub const RETENTION_MS: u64 = 30 * 86_400_000;
const MINUTE_MS: u64 = 60_000;

/// One reading of a series (a device's, or a workload's use of what it holds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub ts_ms: u64,
    /// GPU utilisation, percent.
    pub util_pct: f64,
    /// Device memory in use (a device's, or a workload's).
    pub memory_used_bytes: u64,
    /// A device's memory; 0 for a workload.
    #[serde(default)]
    pub memory_total_bytes: u64,
    /// A device's power draw, milliwatts; 0 for a workload.
    #[serde(default)]
    pub power_mw: u64,
    /// A workload's CPU, percent of one core; 0 for a device.
    #[serde(default)]
    pub cpu_pct: f64,
    /// A workload's memory in use; 0 for a device.
    #[serde(default)]
    pub host_memory_bytes: u64,
    /// The readings are simulated.
    #[serde(default)]
    pub simulated: bool,
}

/// The in-memory side: recent raw points per series and the latest reading of each device.
#[derive(Default)]
pub struct Telemetry {
    raw: HashMap<String, VecDeque<Point>>,
    /// The latest sample of each node, for `/metrics`.
    pub latest: BTreeMap<String, NodeSample>,
    /// Minutes before this one are in the store.
    folded_until_ms: u64,
}

pub fn device_series(node: &str, index: u32) -> String {
    format!("gpu/{node}/{index}")
}

pub fn replica_series(job: u64, replica: u32) -> String {
    format!("job/{job}/{replica}")
}

impl Telemetry {
    fn push(&mut self, series: String, p: Point) {
        let q = self.raw.entry(series).or_default();
        if q.back().is_some_and(|last| last.ts_ms >= p.ts_ms) {
            return;
        }
        q.push_back(p);
    }

    /// Records a node's device sample.
    pub fn record_node(&mut self, node: &str, sample: &NodeSample) {
        for d in &sample.devices {
            self.push(
                device_series(node, d.index),
                Point {
                    ts_ms: sample.at_ms,
                    util_pct: d.util_pct,
                    memory_used_bytes: d.memory_used_bytes,
                    memory_total_bytes: d.memory_total_bytes,
                    power_mw: d.power_mw,
                    simulated: sample.simulated,
                    ..Default::default()
                },
            );
        }
        self.latest.insert(node.to_string(), sample.clone());
    }

    /// Records one replica's use at `at_ms`.
    pub fn record_replica(&mut self, job: u64, replica: u32, u: &ReplicaUsage, at_ms: u64) {
        self.push(
            replica_series(job, replica),
            Point {
                ts_ms: at_ms,
                util_pct: u.gpu_util_pct,
                memory_used_bytes: u.gpu_memory_bytes,
                cpu_pct: u.cpu_pct,
                host_memory_bytes: u.memory_bytes,
                simulated: u.simulated,
                ..Default::default()
            },
        );
    }

    /// Minute averages of every complete minute not yet folded, up to `now`; drops raw points
    /// older than the raw window.
    fn fold(&mut self, now: u64) -> Vec<(String, Point)> {
        let until = now / MINUTE_MS * MINUTE_MS;
        let from = self.folded_until_ms;
        let mut out = Vec::new();
        for (series, q) in &mut self.raw {
            let mut minutes: BTreeMap<u64, Vec<&Point>> = BTreeMap::new();
            for p in q.iter().filter(|p| p.ts_ms >= from && p.ts_ms < until) {
                minutes.entry(p.ts_ms / MINUTE_MS).or_default().push(p);
            }
            for (minute, points) in minutes {
                out.push((series.clone(), average(minute * MINUTE_MS, &points)));
            }
            while q.front().is_some_and(|p| p.ts_ms + RAW_KEEP_MS < now) {
                q.pop_front();
            }
        }
        self.raw.retain(|_, q| !q.is_empty());
        self.folded_until_ms = until;
        out
    }
}

/// The average of `points`, stamped `ts_ms`.
pub fn average(ts_ms: u64, points: &[&Point]) -> Point {
    let n = points.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Point) -> f64| points.iter().map(|p| f(p)).sum::<f64>() / n;
    Point {
        ts_ms,
        util_pct: avg(&|p| p.util_pct),
        memory_used_bytes: avg(&|p| p.memory_used_bytes as f64) as u64,
        memory_total_bytes: points
            .iter()
            .map(|p| p.memory_total_bytes)
            .max()
            .unwrap_or(0),
        power_mw: avg(&|p| p.power_mw as f64) as u64,
        cpu_pct: avg(&|p| p.cpu_pct),
        host_memory_bytes: avg(&|p| p.host_memory_bytes as f64) as u64,
        simulated: points.iter().any(|p| p.simulated),
    }
}

/// Folds complete minutes into the store every `every`, and drops stored points past retention.
pub async fn run(ctl: Ctl, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let now = now_ms();
        let points = lock(&ctl.telemetry).fold(now);
        let result = ctl
            .store
            .write(move |c, _| -> Result<(), ApiError> {
                for (series, p) in &points {
                    c.put_sample(series, p)?;
                }
                c.delete_samples_before(now.saturating_sub(RETENTION_MS))?;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("telemetry not stored: {}", e.message);
        }
    }
}

pub fn lock(t: &Mutex<Telemetry>) -> std::sync::MutexGuard<'_, Telemetry> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Deserialize)]
pub struct SeriesQuery {
    /// `gpu/NODE/INDEX`, `job/ID/REPLICA`, or `pool`.
    pub name: String,
    pub since: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// Minute averages from the store, then the raw points of the last minutes.
    pub points: Vec<Point>,
}

/// `GET /v1/telemetry?name=gpu/n1/0&since=6h`: one series; `name=pool` averages every device's
/// utilisation and sums memory and power, per minute.
pub async fn get_series(
    AxState(ctl): S,
    caller: Caller,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<Series>, ApiError> {
    let (user, role) = caller.user()?;
    let now = now_ms();
    let window =
        crate::metering::Window::parse(Some(q.since.as_deref().unwrap_or("6h")), None, now)
            .map_err(ApiError::bad)?;
    let prefix = match q.name.as_str() {
        "pool" => "gpu/".to_string(),
        n if n.starts_with("gpu/") => n.to_string(),
        n if n.starts_with("job/") => {
            let id: u64 = n
                .split('/')
                .nth(1)
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| ApiError::bad(format!("name {n}: write job/ID/REPLICA")))?;
            // A workload's series is visible to whoever may see the job.
            ctl.store.read(|s| {
                let visible = s.visible_projects(user, role);
                match s.jobs.get(&id) {
                    Some(j) if visible.as_ref().is_none_or(|v| v.contains(j.project())) => Ok(()),
                    _ => Err(ApiError::not_found(format!("job {id} not found"))),
                }
            })?;
            n.to_string()
        }
        n => {
            return Err(ApiError::bad(format!(
                "name {n}: give pool, gpu/NODE/INDEX or job/ID/REPLICA"
            )));
        }
    };
    let exact = q.name != "pool";
    let stored = {
        let prefix = prefix.clone();
        ctl.store
            .read_ledger("telemetry", move |l| {
                l.samples(&prefix, exact, window.since_ms)
            })
            .await
            .map_err(|e| ApiError::internal(format!("{e:#}")))?
    };
    let stored_until = stored
        .iter()
        .map(|(_, p)| p.ts_ms + MINUTE_MS)
        .max()
        .unwrap_or(0);
    let mut rows = stored;
    {
        let t = lock(&ctl.telemetry);
        for (series, q) in &t.raw {
            let matches = if exact {
                *series == prefix
            } else {
                series.starts_with(&prefix)
            };
            if matches {
                rows.extend(
                    q.iter()
                        .filter(|p| p.ts_ms >= window.since_ms.max(stored_until))
                        .map(|p| (series.clone(), p.clone())),
                );
            }
        }
    }
    let points = if exact {
        let mut points: Vec<Point> = rows.into_iter().map(|(_, p)| p).collect();
        points.sort_by_key(|p| p.ts_ms);
        points
    } else {
        pool_points(&rows)
    };
    Ok(Json(Series {
        name: q.name,
        points,
    }))
}

/// The pool per minute: each device's average in that minute, then the mean utilisation over
/// devices and the sums of memory and power.
pub fn pool_points(rows: &[(String, Point)]) -> Vec<Point> {
    let mut per: BTreeMap<u64, BTreeMap<&str, Vec<&Point>>> = BTreeMap::new();
    for (series, p) in rows {
        per.entry(p.ts_ms / MINUTE_MS)
            .or_default()
            .entry(series.as_str())
            .or_default()
            .push(p);
    }
    per.into_iter()
        .map(|(minute, devices)| {
            let each: Vec<Point> = devices
                .values()
                .map(|ps| average(minute * MINUTE_MS, ps))
                .collect();
            let n = each.len().max(1) as f64;
            Point {
                ts_ms: minute * MINUTE_MS,
                util_pct: each.iter().map(|p| p.util_pct).sum::<f64>() / n,
                memory_used_bytes: each.iter().map(|p| p.memory_used_bytes).sum(),
                memory_total_bytes: each.iter().map(|p| p.memory_total_bytes).sum(),
                power_mw: each.iter().map(|p| p.power_mw).sum(),
                simulated: each.iter().any(|p| p.simulated),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts_ms: u64, util: f64) -> Point {
        Point {
            ts_ms,
            util_pct: util,
            memory_total_bytes: 100,
            power_mw: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn raw_points_fold_into_minute_averages_once_and_age_out() {
        let mut t = Telemetry::default();
        for (ts, u) in [(0, 10.0), (30_000, 30.0), (60_000, 50.0), (61_000, 70.0)] {
            t.push("gpu/n1/0".into(), p(ts, u));
        }
        t.push("gpu/n1/0".into(), p(30_000, 99.0)); // out of order: ignored
        let folded = t.fold(90_000);
        // Only the complete first minute is folded.
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].1.ts_ms, 0);
        assert_eq!(folded[0].1.util_pct, 20.0);
        let folded = t.fold(120_000);
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].1.util_pct, 60.0);
        assert!(t.fold(130_000).is_empty(), "a minute is folded once");
        assert_eq!(t.raw["gpu/n1/0"].len(), 4);
        t.fold(RAW_KEEP_MS + 200_000);
        assert!(!t.raw.contains_key("gpu/n1/0"), "raw points age out");
    }

    #[test]
    fn the_pool_is_the_mean_utilisation_and_the_sum_of_memory_and_power() {
        let rows = vec![
            ("gpu/a/0".to_string(), p(0, 100.0)),
            ("gpu/a/0".to_string(), p(10_000, 50.0)),
            ("gpu/b/0".to_string(), p(5_000, 0.0)),
            ("gpu/b/0".to_string(), p(65_000, 40.0)),
        ];
        let pool = pool_points(&rows);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool[0].util_pct, 37.5); // (75 + 0) / 2
        assert_eq!(pool[0].memory_total_bytes, 200);
        assert_eq!(pool[0].power_mw, 2000);
        assert_eq!(pool[1].util_pct, 40.0);
    }
}
