//! Metering: what each replica held, for how long, summed by project, user, device model, job
//! or node over a window. Pure: the controller hands in the segments (closed ones from the store,
//! open ones from its state) and the clock.
//!
//! Quantities are kept as integers so that sums are exact and a total always equals the sum of
//! its rows: GPU in milli-GPU-milliseconds (a half-GPU slice for one second counts 500,000),
//! memory in MiB-milliseconds, CPU in milli-CPU-milliseconds, energy in millijoules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::units::parse_duration;

/// One replica's hold on resources from `start_ms` to `end_ms` (one run of one replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub job: u64,
    pub attempt: u32,
    pub replica: u32,
    pub user: String,
    pub project: String,
    /// Device model of its GPUs; empty without GPU.
    pub model: String,
    pub node: String,
    /// Milli-GPU held (a share, or 1000 per whole device).
    pub gpu_milli: u64,
    /// Device memory held, over all its devices.
    pub gpu_memory_bytes: u64,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Energy of its share of its devices over the segment; 0 where no power was reported.
    #[serde(default)]
    pub energy_mj: u64,
    /// The devices' readings were simulated (no real GPU on the node).
    #[serde(default)]
    pub simulated: bool,
    /// Milli-GPU-milliseconds its GPU share sat under the idle threshold.
    #[serde(default)]
    pub idle_gpu_milli_ms: u64,
}

/// What rows are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Project,
    User,
    Model,
    Job,
    Node,
}

impl GroupBy {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "project" => GroupBy::Project,
            "user" => GroupBy::User,
            "model" => GroupBy::Model,
            "job" => GroupBy::Job,
            "node" => GroupBy::Node,
            _ => return None,
        })
    }

    fn key(self, s: &Segment) -> String {
        match self {
            GroupBy::Project => s.project.clone(),
            GroupBy::User => s.user.clone(),
            GroupBy::Model if s.model.is_empty() => "(no gpu)".into(),
            GroupBy::Model => s.model.clone(),
            GroupBy::Job => s.job.to_string(),
            GroupBy::Node => s.node.clone(),
        }
    }
}

/// Chargeback rates and the carbon factor, from the controller's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Price of one GPU-hour per device model; `*` is the rate of models not listed.
    pub gpu_hour: BTreeMap<String, f64>,
    /// Grams of CO2 per kWh, when configured.
    pub carbon_g_per_kwh: Option<f64>,
}

impl Rates {
    fn per_gpu_hour(&self, model: &str) -> f64 {
        self.gpu_hour
            .get(model)
            .or_else(|| self.gpu_hour.get("*"))
            .copied()
            .unwrap_or(0.0)
    }

    /// Reads `MODEL=PRICE` (the `--gpu-hour-rate` flag).
    pub fn add_rate(&mut self, text: &str) -> Result<(), String> {
        let (model, price) = text.split_once('=').ok_or_else(|| {
            format!("--gpu-hour-rate {text}: write MODEL=PRICE, e.g. H100-80GB=2.50 or *=1")
        })?;
        let price: f64 = price
            .trim()
            .parse()
            .ok()
            .filter(|p: &f64| p.is_finite() && *p >= 0.0)
            .ok_or_else(|| {
                format!("--gpu-hour-rate {text}: the price must be a number, zero or more")
            })?;
        self.gpu_hour.insert(model.trim().to_string(), price);
        Ok(())
    }
}

/// The window a report covers, in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub since_ms: u64,
    pub until_ms: u64,
}

impl Window {
    /// Reads `since` and `until` as durations back from `now` (`7d`, `12h`) or as milliseconds
    /// since the epoch; `until` defaults to now, `since` to the beginning.
    pub fn parse(since: Option<&str>, until: Option<&str>, now: u64) -> Result<Self, String> {
        let at = |field: &str, text: &str| -> Result<u64, String> {
            if let Ok(ms) = text.trim().parse::<u64>() {
                return Ok(ms);
            }
            parse_duration(field, text)
                .map(|d| now.saturating_sub(d.as_millis() as u64))
                .map_err(|_| {
                    format!(
                        "{field} {text}: give a duration back from now (7d, 12h, 30m) or \
                         milliseconds since 1970"
                    )
                })
        };
        let since_ms = since.map(|t| at("since", t)).transpose()?.unwrap_or(0);
        let until_ms = until.map(|t| at("until", t)).transpose()?.unwrap_or(now);
        if since_ms > until_ms {
            return Err(format!(
                "since is after until ({since_ms} > {until_ms}): swap them"
            ));
        }
        Ok(Window { since_ms, until_ms })
    }

    /// Milliseconds of `[start, end)` inside the window.
    fn overlap(&self, start: u64, end: u64) -> u64 {
        end.min(self.until_ms)
            .saturating_sub(start.max(self.since_ms))
    }
}

/// Usage of one key (or the total) over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub key: String,
    /// By job: the job's name, while the pool still knows the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Milli-GPU-milliseconds (exact).
    pub gpu_milli_ms: u64,
    /// Device-memory MiB-milliseconds (exact).
    pub gpu_memory_mib_ms: u64,
    /// Milli-CPU-milliseconds (exact).
    pub cpu_milli_ms: u64,
    /// Memory MiB-milliseconds (exact).
    pub memory_mib_ms: u64,
    /// Millijoules (exact over the readings kept).
    pub energy_mj: u64,
    /// Milli-GPU-milliseconds held while idle (under the idle threshold).
    pub idle_gpu_milli_ms: u64,
    /// Replica runs counted.
    pub segments: u64,
    /// Distinct jobs.
    pub jobs: u64,
    /// Derived, for people: GPU-hours, GiB-hours of device memory, CPU-hours, kWh.
    pub gpu_hours: f64,
    pub idle_gpu_hours: f64,
    pub gpu_memory_gib_hours: f64,
    pub cpu_hours: f64,
    pub memory_gib_hours: f64,
    pub energy_kwh: f64,
    /// GPU-hours times each model's rate.
    pub cost: f64,
    /// kWh times the carbon factor, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co2_kg: Option<f64>,
    /// Some of it comes from simulated devices (their energy is simulated).
    pub simulated: bool,
}

/// A usage report: one row per key, and their total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub by: GroupBy,
    pub window: Window,
    pub rows: Vec<UsageRow>,
    pub total: UsageRow,
}

const MIB: u64 = 1 << 20;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// Sums `segments` over `window`, keyed by `by`.
pub fn report<'a>(
    segments: impl IntoIterator<Item = &'a Segment>,
    window: Window,
    by: GroupBy,
    rates: &Rates,
) -> Report {
    let mut rows: BTreeMap<String, (UsageRow, std::collections::BTreeSet<u64>, f64)> =
        BTreeMap::new();
    for s in segments {
        let ms = window.overlap(s.start_ms, s.end_ms);
        if ms == 0 {
            continue;
        }
        let span = s.end_ms.saturating_sub(s.start_ms).max(1);
        let (row, jobs, cost) = rows.entry(by.key(s)).or_default();
        row.gpu_milli_ms += s.gpu_milli * ms;
        row.gpu_memory_mib_ms += s.gpu_memory_bytes / MIB * ms;
        row.cpu_milli_ms += s.cpu_milli * ms;
        row.memory_mib_ms += s.memory_bytes / MIB * ms;
        // Energy is known per segment: the window takes its part in proportion to time.
        row.energy_mj += (u128::from(s.energy_mj) * u128::from(ms) / u128::from(span)) as u64;
        row.idle_gpu_milli_ms +=
            (u128::from(s.idle_gpu_milli_ms) * u128::from(ms) / u128::from(span)) as u64;
        row.segments += 1;
        row.simulated |= s.simulated;
        jobs.insert(s.job);
        *cost += (s.gpu_milli * ms) as f64 / 1000.0 / MS_PER_HOUR * rates.per_gpu_hour(&s.model);
    }
    let mut total = UsageRow {
        key: "total".into(),
        ..Default::default()
    };
    let mut all_jobs = std::collections::BTreeSet::new();
    let mut total_cost = 0.0;
    let rows: Vec<UsageRow> = rows
        .into_iter()
        .map(|(key, (mut row, jobs, cost))| {
            row.key = key;
            row.jobs = jobs.len() as u64;
            all_jobs.extend(jobs);
            total.gpu_milli_ms += row.gpu_milli_ms;
            total.gpu_memory_mib_ms += row.gpu_memory_mib_ms;
            total.cpu_milli_ms += row.cpu_milli_ms;
            total.memory_mib_ms += row.memory_mib_ms;
            total.energy_mj += row.energy_mj;
            total.idle_gpu_milli_ms += row.idle_gpu_milli_ms;
            total.segments += row.segments;
            total.simulated |= row.simulated;
            total_cost += cost;
            finish(&mut row, cost, rates);
            row
        })
        .collect();
    total.jobs = all_jobs.len() as u64;
    finish(&mut total, total_cost, rates);
    Report {
        by,
        window,
        rows,
        total,
    }
}

/// Each key's past use as an average milli-GPU, each moment weighted by 2^(-age / half-life)
/// (a project that held m milli-GPU for ever scores m; one idle for a half-life keeps half).
pub fn decayed<'a>(
    segments: impl IntoIterator<Item = &'a Segment>,
    by: GroupBy,
    now: u64,
    half_life_ms: u64,
) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    let h = half_life_ms.max(1) as f64;
    for s in segments {
        let weight = |t: u64| (-(now.saturating_sub(t) as f64) / h).exp2();
        let part = s.gpu_milli as f64 * (weight(s.end_ms.min(now)) - weight(s.start_ms.min(now)));
        *out.entry(by.key(s)).or_default() += part.max(0.0);
    }
    out
}

/// Fills in the derived, human units.
fn finish(row: &mut UsageRow, cost: f64, rates: &Rates) {
    row.gpu_hours = row.gpu_milli_ms as f64 / 1000.0 / MS_PER_HOUR;
    row.idle_gpu_hours = row.idle_gpu_milli_ms as f64 / 1000.0 / MS_PER_HOUR;
    row.gpu_memory_gib_hours = row.gpu_memory_mib_ms as f64 / 1024.0 / MS_PER_HOUR;
    row.cpu_hours = row.cpu_milli_ms as f64 / 1000.0 / MS_PER_HOUR;
    row.memory_gib_hours = row.memory_mib_ms as f64 / 1024.0 / MS_PER_HOUR;
    row.energy_kwh = row.energy_mj as f64 / 3.6e9;
    row.cost = cost;
    row.co2_kg = rates.carbon_g_per_kwh.map(|g| row.energy_kwh * g / 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(job: u64, project: &str, model: &str, milli: u64, start: u64, end: u64) -> Segment {
        Segment {
            job,
            attempt: 1,
            replica: 0,
            user: format!("u{}", job % 2),
            project: project.into(),
            model: model.into(),
            node: "n1".into(),
            gpu_milli: milli,
            gpu_memory_bytes: 40 << 30,
            cpu_milli: 2000,
            memory_bytes: 8 << 30,
            start_ms: start,
            end_ms: end,
            energy_mj: (end - start) * 350, // 350 W
            simulated: false,
            idle_gpu_milli_ms: 0,
        }
    }

    #[test]
    fn a_scripted_timeline_meters_exactly_and_rows_sum_to_the_total() {
        // Job 1: a half GPU 0..10 s, preempted, again 15..25 s. Job 2: two whole GPUs 5..8 s.
        // Job 3: no GPU, 0..60 s.
        let segs = vec![
            seg(1, "vision", "H100", 500, 0, 10_000),
            seg(1, "vision", "H100", 500, 15_000, 25_000),
            seg(2, "nlp", "A100", 2000, 5_000, 8_000),
            seg(3, "nlp", "", 0, 0, 60_000),
        ];
        let mut rates = Rates::default();
        rates.add_rate("H100=3.6").unwrap();
        rates.add_rate("*=1.8").unwrap();
        rates.carbon_g_per_kwh = Some(400.0);
        let all = Window {
            since_ms: 0,
            until_ms: 100_000,
        };
        let r = report(&segs, all, GroupBy::Project, &rates);
        let keys: Vec<&str> = r.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, vec!["nlp", "vision"]);
        assert_eq!(r.rows[1].gpu_milli_ms, 500 * 20_000);
        assert_eq!(r.rows[0].gpu_milli_ms, 2000 * 3_000);
        assert_eq!(r.total.gpu_milli_ms, 500 * 20_000 + 2000 * 3_000);
        assert_eq!((r.rows[1].jobs, r.rows[1].segments), (1, 2));
        assert_eq!(r.total.jobs, 3);
        // 20 s of half a GPU = 1/360 GPU-hour at 3.6 = 0.01; 6 GPU-s at 1.8/h = 0.003.
        assert!((r.rows[1].cost - 0.01).abs() < 1e-12, "{}", r.rows[1].cost);
        assert!((r.total.cost - 0.013).abs() < 1e-12, "{}", r.total.cost);
        assert_eq!(r.total.energy_mj, 350 * (20_000 + 3_000 + 60_000));
        let kwh = r.total.energy_kwh;
        assert!((r.total.co2_kg.unwrap() - kwh * 0.4).abs() < 1e-12);

        // Every grouping sums to the same total, and a window takes only its part.
        for by in [GroupBy::User, GroupBy::Model, GroupBy::Job, GroupBy::Node] {
            let other = report(&segs, all, by, &rates);
            assert_eq!(other.total, r.total, "{by:?}");
            let sum: u64 = other.rows.iter().map(|r| r.gpu_milli_ms).sum();
            assert_eq!(sum, r.total.gpu_milli_ms);
        }
        let part = report(
            &segs,
            Window {
                since_ms: 5_000,
                until_ms: 20_000,
            },
            GroupBy::Job,
            &rates,
        );
        let job1 = &part.rows[0];
        assert_eq!(job1.gpu_milli_ms, 500 * (5_000 + 5_000));
        // Energy is cut in proportion: half of each of job 1's segments.
        assert_eq!(job1.energy_mj, 350 * 10_000);
        let model = report(&segs, all, GroupBy::Model, &rates);
        assert_eq!(model.rows[0].key, "(no gpu)");
    }

    #[test]
    fn past_use_decays_by_half_each_half_life() {
        let h = 1_000_000;
        let long = [seg(1, "a", "H100", 1000, 0, 100 * h)];
        let at = |now| decayed(&long, GroupBy::Project, now, h)["a"].round();
        assert_eq!(at(100 * h), 1000.0);
        // Stopped one half-life ago: half of it counts; two: a quarter.
        assert_eq!(at(101 * h), 500.0);
        assert_eq!(at(102 * h), 250.0);
    }

    #[test]
    fn windows_read_durations_or_epoch_milliseconds_and_refuse_nonsense() {
        let now = 10 * 86_400_000;
        let w = Window::parse(Some("7d"), None, now).unwrap();
        assert_eq!((w.since_ms, w.until_ms), (3 * 86_400_000, now));
        let w = Window::parse(Some("1000"), Some("2000"), now).unwrap();
        assert_eq!((w.since_ms, w.until_ms), (1000, 2000));
        assert!(Window::parse(Some("yesterday"), None, now).is_err());
        assert!(Window::parse(Some("2000"), Some("1000"), now).is_err());
        let mut r = Rates::default();
        assert!(r.add_rate("H100").is_err());
        assert!(r.add_rate("H100=-1").is_err());
    }
}
