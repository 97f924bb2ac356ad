//! The usage ledger: every replica run becomes a segment in the store the moment it ends (in the
//! same commit as its end), and runs still going are read from the state. `GET /v1/usage` sums
//! both over a window ([`crate::metering`]).
//!
//! The two reads agree: the state's `usage_seq` names the last segment committed when the state
//! was read, and only segments up to it are read from the store; one that ended later is still
//! an open run in that state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::Json;
use axum::extract::Query;
use serde::Deserialize;

use super::{ApiError, AxState, Caller, S, now_ms};
use crate::metering::{GroupBy, Report, Segment, Window, report};
use crate::protocol::ReplicaUsage;
use crate::state::{IdleCount, Job, Node, Replica, State};

/// A replica's run from its start to `end_ms`, with the energy its agent last counted.
fn segment(
    job: &Job,
    r: &Replica,
    nodes: &BTreeMap<String, Node>,
    usage: &HashMap<String, ReplicaUsage>,
    idle: &HashMap<String, IdleCount>,
    end_ms: u64,
) -> Segment {
    // GPU time is the device's node's (of a remote replica, not where its program ran).
    let node = nodes.get(r.device_node());
    let model = r
        .devices
        .first()
        .and_then(|d| node?.spec.devices.get(d.device as usize))
        .map(|d| d.model.clone())
        .unwrap_or_default();
    let start_ms = r.started_ms.unwrap_or(end_ms);
    Segment {
        job: job.id,
        attempt: job.attempt,
        replica: r.index,
        user: job.owner.clone(),
        project: job.project().to_string(),
        model,
        node: r.device_node().to_string(),
        gpu_milli: r.gpu_milli(),
        gpu_memory_bytes: r.devices.iter().map(|d| d.memory_bytes).sum(),
        cpu_milli: r.cpu_milli,
        memory_bytes: r.memory_bytes,
        start_ms,
        end_ms: end_ms.max(start_ms),
        energy_mj: usage.get(&job.key(r.index)).map_or(0, |u| u.energy_mj),
        simulated: !r.devices.is_empty() && node.is_some_and(|n| n.simulated),
        idle_gpu_milli_ms: idle
            .get(&job.key(r.index))
            .map_or(0, |c| c.idle_gpu_milli_ms),
    }
}

fn is_open(r: &Replica) -> bool {
    r.started_ms.is_some() && !r.phase.is_done()
}

/// The runs that `new` ends compared with `old`: replicas that had started and were not done,
/// and now are done, or are gone (requeued in the same change).
pub fn ended(old: Option<&Job>, new: &Job, s: &State, now: u64) -> Vec<Segment> {
    let (nodes, usage, idle) = (&s.nodes, &s.replica_usage, &s.replica_idle);
    let Some(old) = old else { return vec![] };
    old.replicas
        .iter()
        .filter(|r| is_open(r))
        .filter_map(|r| {
            let now_r = new
                .replicas
                .iter()
                .find(|n| new.attempt == old.attempt && n.index == r.index);
            match now_r {
                Some(n) if is_open(n) => None,
                Some(n) => Some(segment(
                    old,
                    r,
                    nodes,
                    usage,
                    idle,
                    n.finished_ms.unwrap_or(now),
                )),
                None => Some(segment(old, r, nodes, usage, idle, now)),
            }
        })
        .collect()
}

/// Writes ended runs to the ledger; returns the last sequence number used.
pub fn record(
    c: &crate::store::Write,
    mut seq: u64,
    segments: &[Segment],
) -> crate::store::StoreResult<u64> {
    for s in segments {
        seq += 1;
        c.add_usage(seq, s)?;
    }
    Ok(seq)
}

/// Runs going on now, up to `now`.
fn open_runs(s: &State, now: u64) -> Vec<Segment> {
    s.jobs
        .values()
        .filter(|j| j.state.is_active())
        .flat_map(|j| {
            j.replicas
                .iter()
                .filter(|r| is_open(r))
                .map(move |r| segment(j, r, &s.nodes, &s.replica_usage, &s.replica_idle, now))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub by: Option<String>,
    pub project: Option<String>,
    /// Only this job's runs (a job page's usage).
    pub job: Option<u64>,
}

/// `GET /v1/usage?since=7d&by=project`: usage over a window; members see their projects only.
pub async fn get_usage(
    AxState(ctl): S,
    caller: Caller,
    Query(q): Query<UsageQuery>,
) -> Result<Json<Report>, ApiError> {
    let (user, role) = caller.user()?;
    let now = now_ms();
    let by = match q.by.as_deref() {
        None => GroupBy::Project,
        Some(b) => GroupBy::parse(b).ok_or_else(|| {
            ApiError::bad(format!(
                "by {b}: group by project, user, model, job or node"
            ))
        })?,
    };
    let window =
        Window::parse(q.since.as_deref(), q.until.as_deref(), now).map_err(ApiError::bad)?;
    let (mut segments, seq, visible) = ctl.store.read(|s| {
        (
            open_runs(s, now),
            s.usage_seq,
            s.visible_projects(user, role),
        )
    });
    let wanted: Option<BTreeSet<String>> = match (&q.project, visible) {
        (Some(p), Some(v)) if !v.contains(p) => {
            return Err(ApiError::not_found(format!(
                "project {p}: no such project among yours"
            )));
        }
        (Some(p), _) => Some([p.clone()].into()),
        (None, v) => v,
    };
    let closed = ctl
        .store
        .read_ledger("usage ledger", move |l| l.usage(seq, window))
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    segments.extend(closed);
    // Runs of projects the caller may not see are gone before a job is picked out, so a job
    // of another tenant's reads as no usage at all.
    segments.retain(|s| {
        wanted.as_ref().is_none_or(|w| w.contains(&s.project)) && q.job.is_none_or(|j| j == s.job)
    });
    let mut r = report(&segments, window, by, &ctl.config.rates);
    if by == GroupBy::Job {
        // Names for people; the key stays the job's id.
        ctl.store.read(|s| {
            for row in &mut r.rows {
                row.name = row
                    .key
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| s.jobs.get(&id))
                    .map(|j| j.def.spec.name.clone());
            }
        });
    }
    Ok(Json(r))
}

/// Keeps each project's decayed past use (for fair share) fresh: every `every`, from the ledger
/// over the last ten half-lives and the runs going on.
pub async fn history_loop(
    ctl: super::Ctl,
    half_life: std::time::Duration,
    every: std::time::Duration,
) {
    let half_life_ms = half_life.as_millis() as u64;
    loop {
        let now = now_ms();
        let (open, seq) = ctl.store.read(|s| (open_runs(s, now), s.usage_seq));
        let window = Window {
            since_ms: now.saturating_sub(10 * half_life_ms),
            until_ms: now,
        };
        let closed = ctl
            .store
            .read_ledger("usage ledger", move |l| l.usage(seq, window));
        match closed.await {
            Ok(mut segments) => {
                segments.extend(open);
                let history =
                    crate::metering::decayed(&segments, GroupBy::Project, now, half_life_ms);
                ctl.store
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .usage_history = history;
            }
            Err(e) => tracing::warn!("fair-share history not read: {e:#}"),
        }
        tokio::time::sleep(every).await;
    }
}
