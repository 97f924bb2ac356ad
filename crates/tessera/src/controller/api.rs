//! User-facing handlers under `/v1/`: thin edges over the store and the job lifecycle.

use crate::state::EventKind;
use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use serde::{Deserialize, Serialize};
use tessera_sched::GpuRequest;

use super::lifecycle::{Note, settle};
use super::{ApiError, AxState, Caller, S, issue_token, now_ms};
use crate::manifest::{Manifest, check_name};
use crate::state::{
    Event, Job, JobState, NodeHealth, Project, ReplicaPhase, Role, State, StopCause, TokenKind,
    User,
};
use crate::units::{Quantity, parse_gpu_milli};

/// Parses a JSON body strictly, naming what is wrong.
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

pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("request body: {e}")))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub index: u32,
    pub node: String,
    pub phase: ReplicaPhase,
    pub gpu_milli: u64,
    pub devices: Vec<u32>,
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_message: Option<String>,
    /// Given back by its elastic job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub name: String,
    pub project: String,
    pub owner: String,
    pub state: JobState,
    pub reason: String,
    pub priority: i32,
    /// Replicas it runs now (an elastic job between its min and max), or asks for.
    pub replicas: u32,
    /// An elastic job's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<crate::manifest::Elastic>,
    pub gpu: f64,
    pub gpu_memory_bytes: u64,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub command: Vec<String>,
    pub restart: crate::manifest::RestartPolicy,
    pub attempt: u32,
    pub restarts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    pub assignments: Vec<ReplicaView>,
}

fn gpu_count(g: GpuRequest) -> f64 {
    match g {
        GpuRequest::None => 0.0,
        GpuRequest::Share { milli } => f64::from(milli) / 1000.0,
        GpuRequest::Whole { devices } => f64::from(devices),
    }
}

/// The view of job `id`, looked up inside the request's own read or write (never by `[]`: a
/// concurrent request may have changed the map since).
fn job_view(s: &State, id: u64) -> Result<JobView, ApiError> {
    s.jobs
        .get(&id)
        .map(|j| view(j, s))
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

pub fn view(job: &Job, state: &State) -> JobView {
    let s = &job.def.spec;
    let mut reason = job.reason.clone();
    if job.state == JobState::Pending {
        let now = now_ms();
        if job.not_before_ms > now {
            reason = format!(
                "{reason} (restarting in {:.1} s)",
                (job.not_before_ms - now) as f64 / 1000.0
            );
        } else if let Some(w) = state.wait_reasons.get(&job.id) {
            reason = w.clone();
        }
    }
    JobView {
        id: job.id,
        name: s.name.clone(),
        project: s.project.clone(),
        owner: job.owner.clone(),
        state: job.state,
        reason,
        priority: s.priority,
        replicas: match job.def.elastic {
            Some(_) if job.state.is_active() => job.members().count() as u32,
            _ => s.replicas,
        },
        elastic: job.def.elastic,
        gpu: gpu_count(s.request.gpu),
        gpu_memory_bytes: s.request.gpu_memory_bytes,
        cpu_milli: s.request.cpu_milli,
        memory_bytes: s.request.memory_bytes,
        command: job.def.command.clone(),
        restart: job.def.restart,
        attempt: job.attempt,
        restarts: job.restarts,
        created_ms: job.created_ms,
        updated_ms: job.updated_ms,
        finished_ms: job.finished_ms,
        assignments: job
            .replicas
            .iter()
            .map(|r| ReplicaView {
                index: r.index,
                node: r.node.clone(),
                phase: r.phase,
                gpu_milli: r.gpu_milli(),
                devices: r.devices.iter().map(|d| d.device).collect(),
                exit_code: r.exit_code,
                exit_message: r.exit_message.clone(),
                leaving: r.leaving,
            })
            .collect(),
    }
}

/// Installs a changed job: writes it and its events, then updates memory and indexes.
pub fn save_job(
    c: &crate::store::Write,
    s: &mut State,
    mut job: Job,
    notes: Vec<Note>,
    now: u64,
) -> crate::store::StoreResult<()> {
    job.updated_ms = now;
    c.put_job(&job)?;
    let ended = super::usage::ended(s.jobs.get(&job.id), &job, s, now);
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
        .map(|o| o.replicas.iter().map(|r| r.node.clone()).collect())
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
    });
    // An elastic job that starts running may grow: worth a scheduling round.
    let may_grow = job.def.elastic.is_some() && old.is_some_and(|o| o.state != job.state);
    if changed_desired {
        for n in old_nodes.iter().chain(job.replicas.iter().map(|r| &r.node)) {
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
    for e in events {
        s.push_event(e);
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

/// The job if the caller may see it; 404 otherwise (a job of another project does not exist for
/// a member who cannot see it).
fn visible_job<'a>(s: &'a State, caller: &Caller, id: u64) -> Result<&'a Job, ApiError> {
    let (name, role) = caller.user()?;
    let job = s.jobs.get(&id);
    match (job, s.visible_projects(name, role)) {
        (Some(j), None) => Ok(j),
        (Some(j), Some(p)) if p.contains(j.project()) => Ok(j),
        _ => Err(ApiError::not_found(format!(
            "no job {id} that you can see; list yours with `tessera jobs`"
        ))),
    }
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

pub async fn submit(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<JobView>), ApiError> {
    let user = acting_user(&caller, "submit jobs")?;
    let role = caller.user()?.1;
    let def = parse_manifest(&body)?.into_def("default")?;
    let project = def.spec.project.clone();
    check_policy(&ctl, &user, &def).await?;
    super::disk::guard(&ctl, "submissions")?;
    let job = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<JobView, ApiError> {
                may_use_project(s, &user, role, &project)?;
                let mut def = def;
                resolve_mounts(s, &mut def)?;
                refuse_never_fitting(s, &def)?;
                let now = c.now_ms;
                let id = s
                    .take_job_id()
                    .map_err(|e| ApiError::internal(format!("reserving a job id: {e}")))?;
                let job = Job::new(id, &user, def, now);
                let note = (EventKind::Submitted, format!("submitted by {user}"));
                s.remember_request(&job.def.spec.request);
                save_job(c, s, job, vec![note], now)?;
                s.next_job_id = id;
                job_view(s, id)
            },
        )
        .await?;
    ctl.metrics.submitted.inc();
    Ok((axum::http::StatusCode::CREATED, Json(job)))
}

/// Refuses a job no node of the pool could ever hold, naming the resource and the largest node,
/// unless it asked to wait for capacity (nodes may join).
pub(super) fn refuse_never_fitting(
    s: &State,
    def: &crate::manifest::JobDef,
) -> Result<(), ApiError> {
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
pub(super) fn pool_never_fits(
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

/// Refuses a job its project's policy does not allow, naming the field and the rule; the
/// refusal is in the audit log.
pub async fn check_policy(
    ctl: &super::Ctl,
    user: &str,
    def: &crate::manifest::JobDef,
) -> Result<(), ApiError> {
    let project = def.spec.project.clone();
    let Err(breach) = ctl
        .store
        .read(|s| s.placement_rules(&project).narrow_job(&def.spec))
    else {
        return Ok(());
    };
    use tessera_sched::rules::Rule;
    let field = match breach.rule {
        Rule::Residency => "spec.resources.nodeSelector",
        Rule::DeviceModels => "spec.resources.deviceModels",
        Rule::MaxJobGpu => "spec.resources.gpu",
    };
    let message = format!(
        "{field}: the job {}; change the request, or ask an admin to change project {project}'s \
         policy (`tessera projects`)",
        breach.why
    );
    let (who, what) = (
        user.to_string(),
        format!("{}: {}", def.spec.name, breach.why),
    );
    super::audit::record_refusal(ctl, who, project, None, what).await?;
    Err(ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, message).with_field(field))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    pub project: Option<String>,
    pub state: Option<String>,
    pub owner: Option<String>,
    pub limit: Option<usize>,
}

pub async fn list_jobs(
    AxState(ctl): S,
    caller: Caller,
    Query(f): Query<JobFilter>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    let (user, role) = caller.user()?;
    let states: Option<Vec<JobState>> = match &f.state {
        None => None,
        Some(text) => Some(
            text.split(',')
                .map(|t| {
                    JobState::parse(t.trim()).ok_or_else(|| {
                        ApiError::bad(format!(
                            "state {t}: unknown; use pending, scheduled, running, succeeded, \
                             failed or cancelled (comma-separated)"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let limit = f.limit.unwrap_or(1000).min(100_000);
    Ok(Json(ctl.store.read(|s| {
        let visible = s.visible_projects(user, role);
        s.jobs
            .values()
            .rev()
            .filter(|j| visible.as_ref().is_none_or(|v| v.contains(j.project())))
            .filter(|j| f.project.as_ref().is_none_or(|p| p == j.project()))
            .filter(|j| f.owner.as_ref().is_none_or(|o| *o == j.owner))
            .filter(|j| states.as_ref().is_none_or(|st| st.contains(&j.state)))
            .take(limit)
            .map(|j| view(j, s))
            .collect()
    })))
}

pub async fn get_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    ctl.store
        .read(|s| visible_job(s, &caller, id).map(|j| view(j, s)))
        .map(Json)
}

pub async fn job_events(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<Vec<Event>>, ApiError> {
    ctl.store.read(|s| {
        visible_job(s, &caller, id)?;
        Ok(Json(
            s.events
                .get(&id)
                .map(|e| e.iter().cloned().collect())
                .unwrap_or_default(),
        ))
    })
}

pub async fn cancel_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    let user = acting_user(&caller, "cancel jobs")?;
    ctl.store
        .read(|s| visible_job(s, &caller, id).map(|_| ()))?;
    let job = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<JobView, ApiError> {
                let mut job = s
                    .jobs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
                if job.state.is_final() {
                    return Err(ApiError::conflict(format!(
                        "job {id} has already ended ({}); nothing to cancel",
                        job.state.name()
                    )));
                }
                let now = c.now_ms;
                let notes = cancel(&mut job, &user, now);
                save_job(c, s, job, notes, now)?;
                job_view(s, id)
            },
        )
        .await?;
    Ok(Json(job))
}

/// Cancels an active job on behalf of `by`: at once when pending, else by stopping it.
pub fn cancel(job: &mut Job, by: &str, now: u64) -> Vec<Note> {
    let mut notes = vec![];
    if job.state == JobState::Pending {
        job.state = JobState::Cancelled;
        job.reason = format!("cancelled by {by} before it started");
        job.finished_ms = Some(now);
        notes.push((EventKind::Cancelled, job.reason.clone()));
    } else if !matches!(job.stop, Some(StopCause::Cancel { .. })) {
        job.stop = Some(StopCause::Cancel { by: by.to_string() });
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The node to move to; anywhere the scheduler likes when absent.
    pub to: Option<String>,
}

/// Moves a running job: it is stopped the way preemption stops it (a checkpointing job saves
/// first) and started again, on `to` when given.
pub async fn migrate_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
    body: Bytes,
) -> Result<Json<JobView>, ApiError> {
    let user = acting_user(&caller, "move jobs")?;
    let b: MigrateBody = parse_body_or_default(&body)?;
    ctl.store
        .read(|s| visible_job(s, &caller, id).map(|_| ()))?;
    // A move outside the project's residency is refused, and the refusal audited.
    if let Some(to) = b.to.clone()
        && let Some((project, why)) = ctl.store.read(|s| {
            let job = s.jobs.get(&id)?;
            let node = &s.nodes.get(&to)?.spec;
            let rules = s.placement_rules(job.project());
            let model = node.devices.first().map(|d| d.model.as_str());
            (!rules.allows(&node.labels, model)).then(|| {
                let policy = s
                    .projects
                    .get(job.project())
                    .map_or("-".into(), |p| p.policy.summary());
                (
                    job.project().to_string(),
                    format!(
                        "node {to} is outside project {}'s policy ({policy})",
                        job.project()
                    ),
                )
            })
        })
    {
        let what = format!("migrate job {id}: {why}");
        super::audit::record_refusal(&ctl, user.clone(), project, Some(id), what).await?;
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!("to: {why}; pick a node it allows"),
        )
        .with_field("to"));
    }
    let job = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<JobView, ApiError> {
                let mut job = s
                    .jobs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
                // A target that cannot take it is the request's fault, whatever the job's state.
                if let Some(to) = &b.to {
                    move_target(s, to)?;
                }
                // A service replica moves make-before-break: a replacement starts first.
                if let Some(name) = job.service.clone()
                    && s.services.contains_key(&name)
                {
                    super::services::start_move(c, s, &name, Some(id), b.to.clone())?;
                    return job_view(s, id);
                }
                if !job.state.is_active() || job.stop.is_some() {
                    return Err(ApiError::conflict(format!(
                        "job {id} is {} and not running; only a running job can be moved",
                        if job.stop.is_some() {
                            "stopping"
                        } else {
                            job.state.name()
                        }
                    )));
                }
                if let Some(to) = &b.to {
                    if job.replicas.iter().all(|r| r.node == *to) {
                        return Err(ApiError::conflict(format!("job {id} already runs on {to}")));
                    }
                }
                let now = c.now_ms;
                let target = b.to.as_ref().map_or(String::new(), |n| format!(" to {n}"));
                let mut notes = vec![(
                    EventKind::Migrating,
                    format!("{user} asked to move the job{target}; stopping its replicas"),
                )];
                job.reason = format!("moving{target} at the request of {user}; stopping it first");
                job.stop = Some(StopCause::Migrate {
                    by: user.clone(),
                    to: b.to.clone(),
                });
                notes.extend(settle(&mut job, now));
                save_job(c, s, job, notes, now)?;
                job_view(s, id)
            },
        )
        .await?;
    Ok(Json(job))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    pub replica: Option<u32>,
    /// `all` (default: both interleaved as they came), `stdout` or `stderr`.
    pub stream: Option<String>,
    pub offset: Option<u64>,
    pub attempt: Option<u32>,
    /// Only lines from this time: a duration back from now (10m) or Unix milliseconds.
    pub since: Option<String>,
    /// Each line of `data` starts with the RFC 3339 time it was written.
    pub timestamps: Option<bool>,
    /// Also answer the lines one by one, each with its stream and time (`lines`).
    pub lines: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LogChunk {
    pub data: String,
    /// Where `data` starts in the replica's output (later than the offset asked for when
    /// output there was cut, or earlier when it asked past the end).
    #[serde(default)]
    pub offset: u64,
    /// Bytes from the offset asked for up to `offset` that are no longer kept (the pool keeps
    /// only the newest output of each replica, `--log-limit`).
    #[serde(default)]
    pub cut: u64,
    pub next_offset: u64,
    /// No more output will come (the replica has ended).
    pub done: bool,
    /// With `lines=true`: each line with its stream and time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<crate::agent::logs::Line>>,
}

/// `ts_ms` as RFC 3339 with milliseconds (UTC).
pub fn rfc3339(ts_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ts_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The text of `lines`: a full line ends with a newline, a partial one goes on in the next;
/// with `timestamps`, each line that starts begins with its time.
pub fn log_text(
    lines: &[crate::agent::logs::Line],
    timestamps: bool,
    mut at_start: bool,
) -> String {
    let mut out = String::new();
    for l in lines {
        if timestamps && at_start {
            out.push_str(&rfc3339(l.ts_ms));
            out.push(' ');
        }
        out.push_str(&l.text);
        if !l.partial {
            out.push('\n');
        }
        at_start = !l.partial;
    }
    out
}

pub async fn job_logs(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
    Query(q): Query<LogQuery>,
) -> Result<Json<LogChunk>, ApiError> {
    let stream = q.stream.clone().unwrap_or_else(|| "all".into());
    if !matches!(stream.as_str(), "all" | "stdout" | "stderr") {
        return Err(ApiError::bad(format!(
            "stream {stream}: use all (both, interleaved), stdout or stderr"
        )));
    }
    let since_ms = match q.since.as_deref() {
        None => 0,
        Some(t) => {
            crate::metering::Window::parse(Some(t), None, now_ms())
                .map_err(ApiError::bad)?
                .since_ms
        }
    };
    let replica = q.replica.unwrap_or(0);
    let offset = q.offset.unwrap_or(0);
    let (key, address, secret, replica_done) = ctl.store.read(|s| {
        let job = visible_job(s, &caller, id)?;
        // An elastic job's replicas are numbered on as it grows.
        if job.def.elastic.is_none() && replica >= job.def.spec.replicas {
            return Err(ApiError::bad(format!(
                "replica {replica}: job {id} has replicas 0 to {}",
                job.def.spec.replicas - 1
            )));
        }
        // The current attempt, or the last one that ran (kept in the events' history).
        let attempt = q.attempt.unwrap_or(job.attempt);
        if attempt == 0 {
            return Err(ApiError::conflict(format!(
                "job {id} has not started yet, so it has no output; see `tessera describe job {id}`"
            )));
        }
        let node = job
            .replicas
            .iter()
            .find(|r| r.index == replica && attempt == job.attempt)
            .map(|r| (r.node.clone(), r.phase.is_done()))
            .or_else(|| last_node_of(s, id, attempt, replica).map(|n| (n, true)));
        let Some((node, done)) = node else {
            return Err(ApiError::not_found(format!(
                "no record of where replica {replica} of job {id} (attempt {attempt}) ran"
            )));
        };
        let n = s
            .nodes
            .get(&node)
            .ok_or_else(|| ApiError::not_found(format!("node {node} is gone")))?;
        Ok((
            format!("{id}.{attempt}.{replica}"),
            n.address.clone(),
            crate::auth::callback_secret(&ctl.callback_key, &node),
            done || job.state.is_final(),
        ))
    })?;
    let url =
        format!("{address}/v1/logs/{key}?stream={stream}&offset={offset}&since_ms={since_ms}");
    let resp = ctl
        .http
        .get(&url)
        .bearer_auth(&secret)
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                format!("the node's agent did not answer for logs: {e}"),
            )
        })?;
    if resp.status() == reqwest::StatusCode::GONE {
        let text = resp.text().await.unwrap_or_default();
        return Err(ApiError::new(axum::http::StatusCode::GONE, text));
    }
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            format!("the node's agent answered {status} for logs: {text}"),
        ));
    }
    let page: crate::agent::logs::Page = resp.json().await.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            format!("reading logs from the node: {e}"),
        )
    })?;
    let timestamps = q.timestamps.unwrap_or(false);
    Ok(Json(LogChunk {
        offset: page.from,
        cut: page.cut,
        next_offset: page.next,
        // A page starts at a record: each page's text starts a line, unless the one before
        // ended partway (the CLI keeps that across pages).
        data: log_text(&page.lines, timestamps, true),
        done: replica_done && page.next == page.from,
        lines: q.lines.unwrap_or(false).then_some(page.lines),
    }))
}

/// The node an earlier attempt's replica ran on, from the job's events.
fn last_node_of(s: &State, job: u64, attempt: u32, replica: u32) -> Option<String> {
    let prefix = format!("attempt {attempt}: replica {replica} on ");
    s.events.get(&job)?.iter().find_map(|e| {
        e.message
            .split("; ")
            .find_map(|part| part.strip_prefix(&prefix))
            .map(|n| n.split_whitespace().next().unwrap_or_default().to_string())
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
    pub allocated_milli: u32,
    pub simulated: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub health: NodeHealth,
    pub cordoned: bool,
    pub simulated: bool,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// How this node can checkpoint: `cooperative` everywhere, `criu-4.1.1` where CRIU works,
    /// `cuda` where it saves GPU state too.
    #[serde(default)]
    pub checkpoint: Vec<String>,
    /// How its agent confines workloads (`confined (uids …)`, or why not).
    #[serde(default)]
    pub confinement: String,
    /// Where its agent serves (the controller calls it for logs).
    #[serde(default)]
    pub address: String,
    pub devices: Vec<DeviceView>,
    pub gpu_allocated_milli: u64,
    pub cpu_allocated_milli: u64,
    pub replicas: u32,
    pub last_seen_ms_ago: u64,
}

/// What a node's labels say about its checkpoints (its agent sets them).
fn checkpoint_kinds(labels: &BTreeMap<String, String>) -> Vec<String> {
    use crate::agent::criu::{CRIU_LABEL, CRIU_VERSION_LABEL, CUDA_LABEL, IMAGES_LABEL};
    let mut kinds = vec!["cooperative".to_string()];
    if labels.get(CRIU_LABEL).is_some_and(|v| v == "true") {
        let version = labels.get(CRIU_VERSION_LABEL).map_or("", String::as_str);
        kinds.push(format!("criu-{version}").trim_end_matches('-').to_string());
        if labels.get(CUDA_LABEL).is_some_and(|v| v == "true") {
            kinds.push("cuda".into());
        }
    }
    // Image jobs checkpointed by the runtime (confined, even where processes could not be).
    if labels.get(IMAGES_LABEL).is_some_and(|v| v == "true") {
        kinds.push("criu-images".into());
    }
    kinds
}

fn node_view(s: &State, name: &str) -> Option<NodeView> {
    let n = s.nodes.get(name)?;
    let mut used = vec![0u32; n.spec.devices.len()];
    let (mut cpu, mut replicas) = (0, 0);
    for j in s.jobs_on(name) {
        for r in j
            .replicas
            .iter()
            .filter(|r| r.node == name && !r.phase.is_done())
        {
            replicas += 1;
            cpu += r.cpu_milli;
            for d in &r.devices {
                if let Some(u) = used.get_mut(d.device as usize) {
                    *u += d.milli;
                }
            }
        }
    }
    Some(NodeView {
        name: name.to_string(),
        health: n.health,
        cordoned: n.cordoned,
        simulated: n.simulated,
        cpu_milli: n.spec.cpu_milli,
        memory_bytes: n.spec.memory_bytes,
        labels: n.spec.labels.clone(),
        checkpoint: checkpoint_kinds(&n.spec.labels),
        confinement: n.confinement.clone(),
        address: n.address.clone(),
        gpu_allocated_milli: used.iter().map(|&u| u64::from(u)).sum(),
        devices: n
            .spec
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceView {
                index: i as u32,
                model: d.model.clone(),
                memory_bytes: d.memory_bytes,
                allocated_milli: used[i],
                simulated: n.simulated,
            })
            .collect(),
        cpu_allocated_milli: cpu,
        replicas,
        last_seen_ms_ago: now_ms().saturating_sub(n.last_seen_ms),
    })
}

pub async fn list_nodes(AxState(ctl): S, caller: Caller) -> Result<Json<Vec<NodeView>>, ApiError> {
    caller.user()?;
    Ok(Json(ctl.store.read(|s| {
        s.nodes.keys().filter_map(|n| node_view(s, n)).collect()
    })))
}

pub async fn get_node(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    caller.user()?;
    ctl.store
        .read(|s| node_view(s, &name))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {name}; see `tessera nodes`")))
}

async fn set_cordon(
    ctl: &super::Ctl,
    caller: &Caller,
    name: String,
    cordon: bool,
    drain: bool,
) -> Result<Json<NodeView>, ApiError> {
    let admin = caller.admin()?.to_string();
    let n = name.clone();
    ctl.store
        .write_as(Some(admin.clone()), move |c, s| -> Result<(), ApiError> {
            let mut node =
                s.nodes.get(&n).cloned().ok_or_else(|| {
                    ApiError::not_found(format!("no node {n}; see `tessera nodes`"))
                })?;
            node.cordoned = cordon;
            c.put_node(&node)?;
            let now = c.now_ms;
            let action = match (cordon, drain) {
                (_, true) => "drain",
                (true, false) => "cordon",
                (false, false) => "uncordon",
            };
            super::audit::record(c, now, &admin, action, None, None, &format!("node {n}"))?;
            let mut changed = Vec::new();
            if drain {
                for job in s
                    .jobs
                    .values()
                    .filter(|j| j.state.is_active() && j.stop.is_none())
                {
                    if job
                        .replicas
                        .iter()
                        .any(|r| r.node == n && !r.phase.is_done())
                    {
                        let mut job = job.clone();
                        job.stop = Some(StopCause::Drain { node: n.clone() });
                        let mut notes =
                            vec![(EventKind::Requeued, format!("{admin} drains node {n}"))];
                        notes.extend(settle(&mut job, now));
                        changed.push((job, notes));
                    }
                }
            }
            for (job, notes) in changed {
                save_job(c, s, job, notes, now)?;
            }
            s.nodes.insert(n.clone(), node);
            s.kick = true;
            Ok(())
        })
        .await?;
    node_answer(ctl, &name)
}

/// The node as an answer to an admin action on it.
fn node_answer(ctl: &super::Ctl, name: &str) -> Result<Json<NodeView>, ApiError> {
    ctl.store
        .read(|s| node_view(s, name))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {name}")))
}

/// Revokes the node's agent credentials (its agent is cut off; its work moves when its lease runs
/// out), so that a join token may register a new machine under the name.
pub async fn replace_node(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let admin = caller.admin()?.to_string();
    let n = name.clone();
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            if !s.nodes.contains_key(&n) {
                return Err(ApiError::not_found(format!(
                    "no node {n}; see `tessera nodes`"
                )));
            }
            let ids: Vec<String> = s
                .tokens
                .values()
                .filter(|t| t.kind == TokenKind::Agent && t.subject == n && !t.revoked)
                .map(|t| t.id.clone())
                .collect();
            for id in &ids {
                if let Some(t) = s.tokens.get_mut(id) {
                    t.revoked = true;
                    c.put_token(t)?;
                }
            }
            let detail = format!(
                "node {n}: {} agent credential(s) revoked for a replacement",
                ids.len()
            );
            super::audit::record(c, c.now_ms, &admin, "node-replace", None, None, &detail)?;
            Ok(())
        })
        .await?;
    node_answer(&ctl, &name)
}

pub async fn cordon_node(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_cordon(&ctl, &caller, name, true, false).await
}

pub async fn uncordon_node(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_cordon(&ctl, &caller, name, false, false).await
}

pub async fn drain_node(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    set_cordon(&ctl, &caller, name, true, true).await
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectView {
    pub name: String,
    pub parent: Option<String>,
    pub guaranteed_gpu: f64,
    pub limit_gpu: Option<f64>,
    pub over_quota_weight: u32,
    pub members: BTreeSet<String>,
    /// Seconds a job runs before it may be preempted.
    pub min_runtime_s: f64,
    pub used_gpu: f64,
    pub jobs_running: u32,
    pub jobs_pending: u32,
    #[serde(default)]
    pub policy: crate::state::ProjectPolicy,
    /// Its past use as fair share sees it: average GPUs, decayed with the pool's half-life.
    #[serde(default)]
    pub recent_gpu: f64,
}

fn project_view(s: &State, p: &Project) -> ProjectView {
    let (mut used, mut running, mut pending) = (0u64, 0, 0);
    for j in s.jobs.values().filter(|j| j.project() == p.name) {
        if j.state.is_active() {
            used += j.gpu_milli_held();
            running += 1;
        } else if j.state == JobState::Pending {
            pending += 1;
        }
    }
    ProjectView {
        name: p.name.clone(),
        parent: p.parent.clone(),
        guaranteed_gpu: p.guaranteed_milli as f64 / 1000.0,
        limit_gpu: p.limit_milli.map(|l| l as f64 / 1000.0),
        over_quota_weight: p.over_quota_weight,
        members: p.members.clone(),
        min_runtime_s: p.min_runtime_ms as f64 / 1000.0,
        used_gpu: used as f64 / 1000.0,
        jobs_running: running,
        jobs_pending: pending,
        policy: p.policy.clone(),
        recent_gpu: s.usage_history.get(&p.name).copied().unwrap_or(0.0) / 1000.0,
    }
}

pub async fn list_projects(
    AxState(ctl): S,
    caller: Caller,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    caller.user()?;
    Ok(Json(ctl.store.read(|s| {
        s.projects.values().map(|p| project_view(s, p)).collect()
    })))
}

pub async fn get_project(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    caller.user()?;
    ctl.store
        .read(|s| s.projects.get(&name).map(|p| project_view(s, p)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no project {name}; see `tessera projects`")))
}

/// Quota settings as the API takes them (GPU counts, not milli).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectBody {
    pub name: Option<String>,
    pub parent: Option<String>,
    pub guaranteed_gpu: Option<Quantity>,
    /// A number of GPUs, or null for no limit.
    #[serde(default, with = "double_option")]
    pub limit_gpu: Option<Option<Quantity>>,
    pub over_quota_weight: Option<u32>,
    pub members: Option<BTreeSet<String>>,
    /// How long a job runs before it may be preempted, e.g. 10m.
    pub min_runtime: Option<String>,
    /// Node labels the project's jobs must run on, e.g. {"region": "eu"}; {} clears.
    pub residency: Option<BTreeMap<String, String>>,
    /// Device models its jobs may use; [] allows any.
    pub device_models: Option<Vec<String>>,
    /// Most GPUs one job may ask for, or null for no cap.
    #[serde(default, with = "double_option")]
    pub max_gpu_per_job: Option<Option<Quantity>>,
    /// Stop interactive jobs idle this long (e.g. 30m), or "off".
    pub idle_after: Option<String>,
    /// Under this GPU utilisation (percent) a job is idle (default 5).
    pub idle_threshold: Option<f64>,
    /// Warn this long before an idle job is stopped (default 5m, at most idle_after).
    pub idle_warning: Option<String>,
    /// Host paths its jobs may mount, `PATH` or `PATH:ro`; [] removes them all.
    pub volumes: Option<Vec<String>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Ok(Some(Option::deserialize(d)?))
    }
}

fn apply_project_body(p: &mut Project, b: &ProjectBody, s: &State) -> Result<(), ApiError> {
    if let Some(parent) = &b.parent {
        if !s.projects.contains_key(parent) {
            return Err(ApiError::bad(format!("parent {parent}: no such project")));
        }
        // Refuse cycles: the parent must not be this project or under it.
        let mut at = Some(parent.clone());
        while let Some(name) = at {
            if name == p.name {
                return Err(ApiError::bad(format!(
                    "parent {parent}: would make project {} its own ancestor",
                    p.name
                )));
            }
            at = s.projects.get(&name).and_then(|x| x.parent.clone());
        }
        p.parent = Some(parent.clone());
    }
    if let Some(q) = &b.guaranteed_gpu {
        p.guaranteed_milli = parse_gpu_milli("guaranteed_gpu", q)?;
    }
    if let Some(limit) = &b.limit_gpu {
        p.limit_milli = match limit {
            None => None,
            Some(q) => Some(parse_gpu_milli("limit_gpu", q)?),
        };
    }
    if let Some(limit) = p.limit_milli
        && limit < p.guaranteed_milli
    {
        return Err(ApiError::bad(format!(
            "limit_gpu {}: below guaranteed_gpu {}; a hard limit must be at least the guarantee",
            limit as f64 / 1000.0,
            p.guaranteed_milli as f64 / 1000.0
        )));
    }
    if let Some(w) = b.over_quota_weight {
        if w == 0 || w > 1000 {
            return Err(ApiError::bad(format!(
                "over_quota_weight {w}: use a whole number from 1 to 1000"
            )));
        }
        p.over_quota_weight = w;
    }
    if let Some(d) = &b.min_runtime {
        let d = crate::units::parse_duration("min_runtime", d)?;
        if d > std::time::Duration::from_secs(7 * 24 * 3600) {
            return Err(ApiError::bad(
                "min_runtime: at most 7 days; longer protects a job from every reclaim",
            ));
        }
        p.min_runtime_ms = d.as_millis() as u64;
    }
    apply_policy(&mut p.policy, b)?;
    if let Some(m) = &b.members {
        for user in m {
            if !s.users.contains_key(user) {
                return Err(ApiError::bad(format!(
                    "members: no user {user}; create it with `tessera users create {user}`"
                )));
            }
        }
        p.members = m.clone();
    }
    Ok(())
}

fn apply_policy(pol: &mut crate::state::ProjectPolicy, b: &ProjectBody) -> Result<(), ApiError> {
    if let Some(r) = &b.residency {
        for (k, v) in r {
            if k.is_empty() || v.is_empty() {
                return Err(ApiError::bad(format!(
                    "residency {k}={v}: give label keys and values, e.g. {{\"region\": \"eu\"}}"
                )));
            }
        }
        pol.residency = r.clone();
    }
    if let Some(m) = &b.device_models {
        pol.device_models = m
            .iter()
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
    }
    if let Some(max) = &b.max_gpu_per_job {
        pol.max_job_gpu_milli = match max {
            None => None,
            Some(q) => Some(parse_gpu_milli("max_gpu_per_job", q)?).filter(|m| *m > 0),
        };
    }
    if let Some(t) = b.idle_threshold {
        if !(0.0..=100.0).contains(&t) {
            return Err(ApiError::bad(format!(
                "idle_threshold {t}: a utilisation in percent, 0 to 100"
            )));
        }
        pol.idle_threshold_pct = Some(t);
    }
    if let Some(a) = &b.idle_after {
        pol.idle_after_ms = if a == "off" {
            0
        } else {
            let d = crate::units::parse_duration("idle_after", a)?;
            if d < std::time::Duration::from_secs(1) {
                return Err(ApiError::bad("idle_after: at least 1s, or off"));
            }
            d.as_millis() as u64
        };
        if pol.idle_after_ms > 0 && b.idle_warning.is_none() && pol.idle_warning_ms == 0 {
            pol.idle_warning_ms = (5 * 60_000).min(pol.idle_after_ms / 2);
        }
    }
    if let Some(list) = &b.volumes {
        if list.len() > crate::volumes::MAX_VOLUMES {
            return Err(ApiError::bad(format!(
                "volumes: {} given; a project may have at most {}",
                list.len(),
                crate::volumes::MAX_VOLUMES
            )));
        }
        let mut volumes: Vec<crate::volumes::Volume> = Vec::new();
        for (i, text) in list.iter().enumerate() {
            let v = crate::volumes::Volume::parse(&format!("volumes[{i}]"), text)?;
            if volumes.iter().any(|o| o.path == v.path) {
                return Err(ApiError::bad(format!(
                    "volumes[{i}] {text}: {} is given twice; name each path once",
                    v.path
                )));
            }
            volumes.push(v);
        }
        pol.volumes = volumes;
    }
    if let Some(w) = &b.idle_warning {
        pol.idle_warning_ms = crate::units::parse_duration("idle_warning", w)?.as_millis() as u64;
    }
    if pol.idle_after_ms > 0 && pol.idle_warning_ms >= pol.idle_after_ms {
        return Err(ApiError::bad(format!(
            "idle_warning: must be shorter than idle_after ({} s)",
            pol.idle_after_ms / 1000
        )));
    }
    Ok(())
}

pub async fn create_project(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<ProjectView>), ApiError> {
    let admin = caller.admin()?.to_string();
    let b: ProjectBody = parse_body(&body)?;
    let name = b
        .name
        .clone()
        .ok_or_else(|| ApiError::bad("name: missing; give the new project a name"))?;
    check_name("name", &name)?;
    let view = ctl
        .store
        .write(move |c, s| -> Result<ProjectView, ApiError> {
            if s.projects.contains_key(&name) {
                return Err(ApiError::conflict(format!(
                    "project {name} exists; change it with `tessera projects set`"
                )));
            }
            let mut p = Project {
                name: name.clone(),
                parent: None,
                guaranteed_milli: 0,
                limit_milli: None,
                over_quota_weight: 1,
                members: BTreeSet::new(),
                created_ms: c.now_ms,
                min_runtime_ms: 0,
                policy: Default::default(),
            };
            apply_project_body(&mut p, &b, s)?;
            c.put_project(&p)?;
            super::audit::record(
                c,
                c.now_ms,
                &admin,
                "project-create",
                Some(&name),
                None,
                &serde_json::to_string(&b).unwrap_or_default(),
            )?;
            s.projects.insert(name.clone(), p);
            s.kick = true;
            s.projects
                .get(&name)
                .map(|p| project_view(s, p))
                .ok_or_else(|| ApiError::not_found(format!("no project {name}")))
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

async fn change_project(
    ctl: &super::Ctl,
    admin: String,
    name: String,
    b: ProjectBody,
) -> Result<Json<ProjectView>, ApiError> {
    ctl.store
        .write(move |c, s| -> Result<ProjectView, ApiError> {
            let mut p = s.projects.get(&name).cloned().ok_or_else(|| {
                ApiError::not_found(format!("no project {name}; see `tessera projects`"))
            })?;
            apply_project_body(&mut p, &b, s)?;
            c.put_project(&p)?;
            super::audit::record(
                c,
                c.now_ms,
                &admin,
                "project-update",
                Some(&name),
                None,
                &serde_json::to_string(&b).unwrap_or_default(),
            )?;
            s.projects.insert(name.clone(), p);
            s.kick = true;
            s.projects
                .get(&name)
                .map(|p| project_view(s, p))
                .ok_or_else(|| ApiError::not_found(format!("no project {name}")))
        })
        .await
        .map(Json)
}

pub async fn update_project(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ProjectView>, ApiError> {
    let admin = caller.admin()?.to_string();
    let b: ProjectBody = parse_body(&body)?;
    if b.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::bad("name: a project cannot be renamed"));
    }
    change_project(&ctl, admin, name, b).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersBody {
    pub members: BTreeSet<String>,
}

pub async fn set_members(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ProjectView>, ApiError> {
    let admin = caller.admin()?.to_string();
    let b: MembersBody = parse_body(&body)?;
    change_project(
        &ctl,
        admin,
        name,
        ProjectBody {
            members: Some(b.members),
            ..Default::default()
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    pub name: String,
    pub role: Role,
    /// The user's uid on the nodes (their replicas run as it).
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The least uid a user may be mapped to: below are the system's accounts (root among them).
pub const MIN_USER_UID: u32 = 1000;

pub async fn list_users(AxState(ctl): S, caller: Caller) -> Result<Json<Vec<User>>, ApiError> {
    caller.admin()?;
    Ok(Json(
        ctl.store.read(|s| s.users.values().cloned().collect()),
    ))
}

pub async fn create_user(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<User>), ApiError> {
    let admin = caller.admin()?.to_string();
    let b: UserBody = parse_body(&body)?;
    check_name("name", &b.name)?;
    if let Some(uid) = b.uid
        && !(MIN_USER_UID..u32::MAX - 1).contains(&uid)
    {
        return Err(ApiError::bad(format!(
            "uid {uid}: give the user's own uid on the nodes, {MIN_USER_UID} or more (not a \
             system account)"
        ))
        .with_field("uid"));
    }
    let user = ctl
        .store
        .write(move |c, s| -> Result<User, ApiError> {
            if s.users.contains_key(&b.name) {
                return Err(ApiError::conflict(format!("user {} exists", b.name)));
            }
            let u = User {
                name: b.name,
                role: b.role,
                created_ms: c.now_ms,
                uid: b.uid,
            };
            c.put_user(&u)?;
            let what = format!("user {} as {:?}", u.name, u.role).to_lowercase();
            super::audit::record(c, c.now_ms, &admin, "user-create", None, None, &what)?;
            s.users.insert(u.name.clone(), u.clone());
            Ok(u)
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(user)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// `user` (default) or `join`.
    pub kind: Option<TokenKind>,
    /// The user the token is for (admins only; default: the caller).
    pub user: Option<String>,
    pub description: Option<String>,
    /// Join tokens: how many nodes it may join (default 1).
    pub uses: Option<u32>,
    /// Join tokens: how long it works, e.g. `1h` (default), `7d`.
    pub expires_in: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub kind: TokenKind,
    pub subject: String,
    pub description: String,
    pub created_ms: u64,
    pub revoked: bool,
    /// Join tokens: nodes it may still join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
    /// When it stops working (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The token itself: shown once, on creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

pub async fn create_token(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<TokenView>), ApiError> {
    let (me, role) = caller.user()?;
    let b: TokenBody = if body.is_empty() {
        TokenBody {
            kind: None,
            user: None,
            description: None,
            uses: None,
            expires_in: None,
        }
    } else {
        parse_body(&body)?
    };
    let kind = b.kind.unwrap_or(TokenKind::User);
    if kind == TokenKind::Agent {
        return Err(ApiError::bad(
            "kind agent: agents get their credential when they join; create a join token",
        ));
    }
    let subject = b.user.clone().unwrap_or_else(|| me.to_string());
    if (kind == TokenKind::Join || subject != me) && role != Role::Admin {
        return Err(ApiError::forbidden(
            "only an admin can create join tokens or tokens for other users",
        ));
    }
    let description = b.description.unwrap_or_default();
    if description.len() > 200 {
        return Err(ApiError::bad("description: at most 200 characters"));
    }
    if kind != TokenKind::Join && (b.uses.is_some() || b.expires_in.is_some()) {
        return Err(ApiError::bad(
            "uses, expires_in: only join tokens are limited this way; leave them out",
        ));
    }
    let uses = b.uses.unwrap_or(1);
    if !(1..=10_000).contains(&uses) {
        return Err(ApiError::bad(format!(
            "uses {uses}: a join token joins 1 to 10000 nodes"
        )));
    }
    let ttl = match &b.expires_in {
        None => std::time::Duration::from_secs(3600),
        Some(t) => crate::units::parse_duration("expires_in", t)
            .map_err(|e| ApiError::bad(format!("{e:#}")))?,
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(365 * 86_400) {
        return Err(ApiError::bad(
            "expires_in: give a duration from 1s to 365d, e.g. 1h",
        ));
    }
    let expires_ms = now_ms() + ttl.as_millis() as u64;
    let t = super::hashed_token().await?;
    let creator = me.to_string();
    let view = ctl
        .store
        .write(move |c, s| -> Result<TokenView, ApiError> {
            if kind == TokenKind::User && !s.users.contains_key(&subject) {
                return Err(ApiError::bad(format!(
                    "user {subject}: no such user; create it first"
                )));
            }
            let t = issue_token(c, s, kind, &subject, &description, t)?;
            if kind == TokenKind::Join {
                super::limit_join_token(c, s, &t.id, uses, Some(expires_ms))?;
            }
            let what = format!("{kind:?} token {} for {subject}", t.id).to_lowercase();
            super::audit::record(c, c.now_ms, &creator, "token-create", None, None, &what)?;
            let rec = s
                .tokens
                .get(&t.id)
                .ok_or_else(|| ApiError::internal("the token just issued is missing"))?;
            Ok(TokenView {
                id: rec.id.clone(),
                kind,
                subject: rec.subject.clone(),
                description: rec.description.clone(),
                created_ms: rec.created_ms,
                revoked: false,
                uses_left: rec.uses_left,
                expires_ms: rec.expires_ms,
                token: Some(t.text),
            })
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

pub async fn list_tokens(
    AxState(ctl): S,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let (me, role) = caller.user()?;
    Ok(Json(ctl.store.read(|s| {
        s.tokens
            .values()
            .filter(|t| role == Role::Admin || (t.kind == TokenKind::User && t.subject == me))
            .map(|t| TokenView {
                id: t.id.clone(),
                kind: t.kind,
                subject: t.subject.clone(),
                description: t.description.clone(),
                created_ms: t.created_ms,
                revoked: t.revoked,
                uses_left: t.uses_left,
                expires_ms: t.expires_ms,
                token: None,
            })
            .collect()
    })))
}

pub async fn revoke_token(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let (me, role) = caller.user()?;
    let (me, admin) = (me.to_string(), role == Role::Admin);
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            let mut t = s
                .tokens
                .get(&id)
                .cloned()
                .filter(|t| admin || (t.kind == TokenKind::User && t.subject == me))
                .ok_or_else(|| {
                    ApiError::not_found(format!("no token {id} of yours; see `tessera token list`"))
                })?;
            t.revoked = true;
            c.put_token(&t)?;
            let what = format!("token {id} of {}", t.subject);
            super::audit::record(c, c.now_ms, &me, "token-revoke", None, None, &what)?;
            s.tokens.insert(id, t);
            Ok(())
        })
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub role: Role,
    pub projects: Option<BTreeSet<String>>,
}

/// How the pool is run, for `tessera nodes` and dashboards.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolView {
    /// The placement policy (`tessera controller --policy`).
    pub policy: String,
    pub nodes: usize,
}

pub async fn pool(AxState(ctl): S, caller: Caller) -> Result<Json<PoolView>, ApiError> {
    caller.user()?;
    let nodes = ctl.store.read(|s| s.nodes.len());
    Ok(Json(PoolView {
        policy: ctl.config.policy.name().to_string(),
        nodes,
    }))
}

pub async fn whoami(AxState(ctl): S, caller: Caller) -> Result<Json<WhoAmI>, ApiError> {
    let (user, role) = caller.user()?;
    Ok(Json(WhoAmI {
        user: user.to_string(),
        role,
        projects: ctl.store.read(|s| s.visible_projects(user, role)),
    }))
}
