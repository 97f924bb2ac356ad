//! Summaries of many replays: one row per (trace, policy), as a table, JSON lines or CSV.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;
use tessera_sched::policy::PolicyKind;

use crate::metrics::{MAX_ARRIVED_PCT, mean_sd};
use crate::published::Published;
use crate::replay::RunResult;

/// One (trace, policy) over all its seeds; the JSON form of `tessera sim openb -o json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub trace: String,
    pub policy: String,
    pub seeds: Vec<u64>,
    pub unallocated_pct_at_100_mean: f64,
    pub unallocated_pct_at_100_sd: f64,
    pub unallocated_pct_at_130_mean: f64,
    pub unallocated_pct_at_130_sd: f64,
    pub tasks_mean: f64,
    pub placed_mean: f64,
    /// The FGD paper's value for the same trace and policy, where it has one.
    pub published_unallocated_pct_at_100_mean: Option<f64>,
    pub published_unallocated_pct_at_100_sd: Option<f64>,
    pub published_unallocated_pct_at_130_mean: Option<f64>,
}

/// Summarises results (any order) into rows sorted by trace, then policy.
pub fn summarize(results: &[RunResult], published: Option<&Published>) -> Vec<Summary> {
    let mut keys: Vec<(String, PolicyKind)> = results
        .iter()
        .map(|r| (r.trace.clone(), r.policy))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|(trace, policy)| {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.trace == trace && r.policy == policy)
                .collect();
            let at = |pct: usize| -> Vec<f64> {
                runs.iter()
                    .filter_map(|r| r.curve.unallocated_at(pct))
                    .collect()
            };
            let (m100, sd100) = mean_sd(&at(100));
            let (m130, sd130) = mean_sd(&at(MAX_ARRIVED_PCT));
            let count = runs.len() as f64;
            let pub_at = |pct: usize| -> Option<(f64, f64)> {
                let curves = published?.curves(&trace, policy.published_label()?)?;
                let v: Vec<f64> = curves
                    .iter()
                    .filter_map(|(_, c)| c.unallocated_at(pct))
                    .collect();
                (!v.is_empty()).then(|| mean_sd(&v))
            };
            Summary {
                seeds: runs.iter().map(|r| r.seed).collect(),
                unallocated_pct_at_100_mean: m100,
                unallocated_pct_at_100_sd: sd100,
                unallocated_pct_at_130_mean: m130,
                unallocated_pct_at_130_sd: sd130,
                tasks_mean: runs.iter().map(|r| r.tasks as f64).sum::<f64>() / count,
                placed_mean: runs.iter().map(|r| r.placed as f64).sum::<f64>() / count,
                published_unallocated_pct_at_100_mean: pub_at(100).map(|x| x.0),
                published_unallocated_pct_at_100_sd: pub_at(100).map(|x| x.1),
                published_unallocated_pct_at_130_mean: pub_at(MAX_ARRIVED_PCT).map(|x| x.0),
                policy: policy.name().to_owned(),
                trace,
            }
        })
        .collect()
}

/// The human table: policy × unallocated GPU % at arrived 100% and 130%, ours beside published.
pub fn table(rows: &[Summary]) -> String {
    let mut out = String::new();
    let opt = |v: Option<f64>, sd: Option<f64>| match (v, sd) {
        (Some(v), Some(sd)) => format!("{v:6.2} ± {sd:4.2}"),
        (Some(v), None) => format!("{v:6.2}"),
        _ => "—".to_owned(),
    };
    let _ = writeln!(
        out,
        "{:<28} {:<14} {:>16} {:>16} {:>9} {:>9}",
        "trace", "policy", "unalloc@100 %", "published@100", "@130 %", "pub@130"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<28} {:<14} {:>16} {:>16} {:>9.2} {:>9}",
            r.trace,
            r.policy,
            format!(
                "{:6.2} ± {:4.2}",
                r.unallocated_pct_at_100_mean, r.unallocated_pct_at_100_sd
            ),
            opt(
                r.published_unallocated_pct_at_100_mean,
                r.published_unallocated_pct_at_100_sd
            ),
            r.unallocated_pct_at_130_mean,
            opt(r.published_unallocated_pct_at_130_mean, None),
        );
    }
    out
}

/// Writes every run's curve as CSV: trace, policy, seed, arrived %, allocated %, unallocated %.
pub fn write_curves_csv(results: &[RunResult], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "trace,policy,seed,arrived_pct,allocated_pct,unallocated_pct"
    )?;
    for r in results {
        for (pct, alloc) in r.curve.alloc_pct.iter().enumerate() {
            if let Some(a) = alloc {
                writeln!(
                    out,
                    "{},{},{},{},{:.2},{:.2}",
                    r.trace,
                    r.policy.name(),
                    r.seed,
                    pct,
                    a,
                    100.0 - a
                )?;
            }
        }
    }
    Ok(())
}
