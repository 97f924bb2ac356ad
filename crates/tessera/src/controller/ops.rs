//! The controller's shared job operations: who may act, parsing request bodies, saving a job with
//! its events, usage and audit in one write, cancelling, checking a move's target. Used by the
//! handlers of every resource (jobs, services, nodes) and by the reconcile loop.

use std::collections::BTreeSet;

use super::lifecycle::Note;
use super::lifecycle::settle;
use super::{ApiError, Caller};
use crate::manifest::Manifest;
use crate::state::{Event, EventKind, Job, JobState, NodeHealth, Replica, Role, State, StopCause};

/// The user behind a call that changes jobs; viewers may not `what`.
pub fn acting_user(caller: &Caller, what: &str) -> Result<String, ApiError> {
    let (user, role) = caller.user()?;
    if role == Role::Viewer {
        return Err(ApiError::forbidden(format!(
            "user {user} is a viewer and cannot {what}"
        )));
    }
    Ok(user.to_string())
}

/// An optional request body: its type's default when empty.
pub fn parse_body_or_default<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        parse_body(body)
    }
}

/// Parses a JSON body strictly, naming what is wrong.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("request body: {e}")))
}

/// Installs a changed job: writes it and its events, then updates memory and indexes.
pub fn save_job(
    c: &crate::store::Write,
    s: &mut State,
    job: impl Into<Job>,
    notes: Vec<Note>,
    now: u64,
) -> crate::store::StoreResult<()> {
    let mut job: Job = job.into();
    job.updated_ms = now;
    c.put_job(&job)?;
    let ended = super::usage::ended(s.jobs.get(&job.id).map(|j| &**j), &job, s, now);
    let usage_seq = super::usage::record(c, s.usage_seq, &ended)?;
    let events: Vec<Event> = notes
        .into_iter()
        .map(|(kind, message)| Event {
            job: job.id,
            ts_ms: now,
            kind,
            message,
        })
        .collect();
    for e in &events {
        c.add_event(e)?;
        if let Some((actor, action)) = decision(c.actor, e.kind) {
            super::audit::record(
                c,
                now,
                &actor,
                action,
                Some(job.project()),
                Some(job.id),
                &e.message,
            )?;
        }
    }
    // Nothing below can fail.
    s.usage_seq = usage_seq;
    for seg in &ended {
        let key = format!("{}.{}.{}", seg.job, seg.attempt, seg.replica);
        s.replica_usage.remove(&key);
        s.replica_idle.remove(&key);
    }
    let old = s.jobs.get(&job.id);
    let was_pending = old.is_some_and(|o| o.state == JobState::Pending);
    let old_nodes: BTreeSet<String> = old
        .map(|o| {
            o.replicas
                .iter()
                .flat_map(Replica::nodes)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let is_new = old.is_none();
    let done = |j: &Job| j.replicas.iter().filter(|r| r.phase.is_done()).count();
    // A replica that finished frees capacity: worth a scheduling round.
    let freed = old.is_some_and(|o| o.attempt == job.attempt && done(o) != done(&job));
    let changed_desired = old.is_none_or(|o| {
        o.state != job.state
            || o.attempt != job.attempt
            || o.stop.is_some() != job.stop.is_some()
            || o.generation != job.generation
            // A remote replica's program is sent once its GPU server runs.
            || o.replicas.iter().map(|r| r.gpu_serving).ne(job.replicas.iter().map(|r| r.gpu_serving))
    });
    // An elastic job that starts running may grow: worth a scheduling round.
    let may_grow = job.def.elastic.is_some() && old.is_some_and(|o| o.state != job.state);
    if changed_desired {
        for n in old_nodes
            .iter()
            .chain(job.replicas.iter().flat_map(Replica::nodes))
        {
            s.touch_node(&n.clone());
        }
    }
    if was_pending != (job.state == JobState::Pending)
        || is_new
        || freed
        || may_grow
        || job.state.is_final()
    {
        s.kick = true;
    }
    if job.state != JobState::Pending {
        s.wait_reasons.remove(&job.id);
    }
    s.insert_job(job);
    Ok(())
}

/// The audit action of a job event that records a decision, and who made it: the user whose
/// request it serves, else the scheduler (placements, preemptions, moves, resizes) or the
/// controller (requeues after a node loss or drain, idle reclaim).
fn decision(acting: Option<&str>, kind: EventKind) -> Option<(String, &'static str)> {
    let action = kind.audit_action(acting.is_some())?;
    let by_scheduler = matches!(
        action,
        "place" | "preempt" | "consolidate" | "grow" | "shrink"
    );
    let actor = match acting {
        Some(user) => user.to_string(),
        None if by_scheduler => "scheduler".into(),
        None => "controller".into(),
    };
    Some((actor, action))
}

/// The project exists and `user` may submit to it.
pub fn may_use_project(s: &State, user: &str, role: Role, project: &str) -> Result<(), ApiError> {
    if !s.projects.contains_key(project) {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "metadata.project {project}: no such project; create it with `tessera \
         projects create {project}` or pick one from `tessera projects`"
            ),
        ));
    }
    if let Some(p) = s.visible_projects(user, role)
        && !p.contains(project)
    {
        return Err(ApiError::forbidden(format!(
            "user {user} is not a member of project {project}"
        )));
    }
    Ok(())
}

/// A manifest from a request body (YAML or JSON).
pub fn parse_manifest(body: &[u8]) -> Result<Manifest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad("the manifest is not UTF-8"))?;
    Manifest::parse(text).map_err(ApiError::bad)
}

/// Resolves what the manifest asked to mount, and where to start, against the project's
/// volumes now (see [`crate::volumes::resolve`]).
pub fn resolve_mounts(s: &State, def: &mut crate::manifest::JobDef) -> Result<(), ApiError> {
    let project = &def.spec.project;
    let allowed = s
        .projects
        .get(project)
        .map(|p| p.policy.volumes.as_slice())
        .unwrap_or_default();
    let asked = std::mem::take(&mut def.asked);
    let r = crate::volumes::resolve(
        project,
        allowed,
        &asked.volumes,
        asked.workdir.as_deref(),
        asked.submit_dir.as_deref(),
    )?;
    def.volumes = r.volumes;
    def.workdir = r.workdir;
    Ok(())
}

/// Cancels an active job on behalf of `by`: at once when pending, else by stopping it.
pub fn cancel(job: &mut Job, by: &str, now: u64) -> Vec<Note> {
    let mut notes = vec![];
    if job.state == JobState::Pending {
        job.state = JobState::Cancelled;
        job.reason = format!("cancelled by {by} before it started");
        job.finished_ms = Some(now);
        notes.push((EventKind::Cancelled, job.reason.clone()));
    } else if !matches!(job.stop.as_deref(), Some(StopCause::Cancel { .. })) {
        job.stop = Some(Box::new(StopCause::Cancel { by: by.to_string() }));
        // What `tessera cancel` says it did, until the replicas have stopped.
        job.reason = format!("cancelling at the request of {by}; stopping its replicas");
        notes.push((
            EventKind::Cancelling,
            format!("{by} asked to cancel; stopping its replicas"),
        ));
        notes.extend(settle(job, now));
    }
    notes
}

/// A node work may be moved to: it exists, is ready and is not cordoned.
pub fn move_target(s: &State, to: &str) -> Result<(), ApiError> {
    let ready = s
        .nodes
        .get(to)
        .is_some_and(|n| n.health == NodeHealth::Ready && !n.cordoned);
    if ready {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!("to {to}: no ready, uncordoned node of that name; see `tessera nodes`"),
        ))
    }
}

/// Refuses a job no node of the pool could ever hold, naming the resource and the largest node,
/// unless it asked to wait for capacity (nodes may join).
pub fn refuse_never_fitting(s: &State, def: &crate::manifest::JobDef) -> Result<(), ApiError> {
    if def.wait_for_capacity {
        return Ok(());
    }
    // A project's hard limit (or an ancestor's) below what the job needs at once.
    let total = def.spec.request.gpu.total_milli() * u64::from(def.spec.replicas);
    let mut at = Some(def.spec.project.as_str());
    while let Some(name) = at {
        let Some(p) = s.projects.get(name) else { break };
        if let Some(limit) = p.limit_milli.filter(|l| total > *l) {
            return Err(ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "spec.resources.gpu: it could never start: it needs {} GPU at once and \
                     project {name}'s hard limit is {} GPU. Ask for less, or ask an admin to \
                     raise the limit (`tessera projects set {name} --limit N`)",
                    total as f64 / 1000.0,
                    limit as f64 / 1000.0
                ),
            )
            .with_field("spec.resources.gpu"));
        }
        at = p.parent.as_deref();
    }
    match pool_never_fits(s, &def.spec.request) {
        None => Ok(()),
        Some(m) => Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}: no node of the pool could ever hold one replica: it {}. Change the request, \
                 or submit it with --queue-anyway (manifest waitForCapacity: true) to wait for \
                 nodes that may join",
                m.field, m.why
            ),
        )
        .with_field(m.field)),
    }
}

/// Why no node of the pool could ever hold one replica of `r`, if none could. Cheap when one can
/// (submissions go through it): the first node that holds it ends the search.
pub fn pool_never_fits(
    s: &State,
    r: &tessera_sched::ResourceRequest,
) -> Option<tessera_sched::fit::Misfit> {
    if s.nodes
        .values()
        .any(|n| tessera_sched::fit::holds(r, &n.spec))
    {
        return None;
    }
    let nodes: Vec<&tessera_sched::NodeSpec> = s.nodes.values().map(|n| &n.spec).collect();
    tessera_sched::fit::never_fits(r, &nodes)
}
