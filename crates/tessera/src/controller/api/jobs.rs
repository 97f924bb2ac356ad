//! Jobs: submit, list, get, events, cancel, migrate.

use super::*;

pub(super) fn gpu_count(g: GpuRequest) -> f64 {
    match g {
        GpuRequest::None => 0.0,
        GpuRequest::Share { milli } => f64::from(milli) / 1000.0,
        GpuRequest::Whole { devices } => f64::from(devices),
    }
}

/// The view of job `id`, looked up inside the request's own read or write (never by `[]`: a
/// concurrent request may have changed the map since).
pub(super) fn job_view(s: &State, id: u64) -> Result<JobView, ApiError> {
    s.jobs
        .get(&id)
        .map(|j| view(j, s))
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

/// Tasks of `job`'s array that are scheduled or running, up to its limit (0 when it is not a
/// limited array's). Tasks start in id order, so the scan for the limit ends early.
fn array_active(s: &State, job: &Job) -> u32 {
    match &job.def.array {
        Some(t) if t.limit.is_some() => s
            .jobs
            .range(t.id..t.id + u64::from(t.count))
            .filter(|(_, j)| j.state.is_active())
            .take(t.limit.unwrap_or_default() as usize)
            .count() as u32,
        _ => 0,
    }
}

pub fn view(job: &Job, state: &State) -> JobView {
    let s = &job.def.spec;
    let mut reason = job.reason.clone();
    if job.state == JobState::Pending {
        let now = now_ms();
        let gate = crate::batch::gate(
            job,
            |id| state.jobs.get(&id).map(|j| &**j),
            array_active(state, job),
        );
        if job.not_before_ms > now && job.attempt == 0 && job.def.begin.is_some() {
            reason = format!(
                "starts no earlier than {} (--begin)",
                crate::controller::api::rfc3339(job.not_before_ms)
            );
        } else if job.not_before_ms > now {
            reason = format!(
                "{reason} (restarting in {:.1} s)",
                (job.not_before_ms - now) as f64 / 1000.0
            );
        } else if let crate::batch::Gate::Wait(why) | crate::batch::Gate::Never(why) = gate {
            reason = why;
        } else if let Some(why) = state.wait_reasons.get(&job.id) {
            reason = crate::controller::reconcile::describe_wait(state, job, why);
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
                gpu_node: r.gpu_node.clone(),
            })
            .collect(),
        array: job.def.array.as_deref().cloned(),
        after: job.def.after.clone(),
        time_limit_ms: job.def.time_limit_ms,
        held: job.held,
    }
}

/// The job if the caller may see it; 404 otherwise (a job of another project does not exist for
/// a member who cannot see it).
pub(super) fn visible_job<'a>(s: &'a State, caller: &Caller, id: u64) -> Result<&'a Job, ApiError> {
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
    crate::controller::disk::guard(&ctl, "submissions")?;
    let job = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<JobView, ApiError> {
                may_use_project(s, &user, role, &project)?;
                let mut def = def;
                resolve_mounts(s, &mut def)?;
                refuse_never_fitting(s, &def)?;
                // A job may wait only for jobs its submitter can see.
                for a in &def.after {
                    if visible_job(s, &caller, a.job).is_err() {
                        let field = match a.on {
                            crate::batch::AfterKind::Start => "spec.after",
                            crate::batch::AfterKind::Ok => "spec.afterOk",
                            crate::batch::AfterKind::Any => "spec.afterAny",
                        };
                        return Err(ApiError::bad(format!(
                            "{field}: no job {} that you can see; list yours with `tessera jobs`",
                            a.job
                        ))
                        .with_field(field));
                    }
                }
                let weight =
                    crate::batch::dependency_weight(&def.after, |id| s.jobs.get(&id).map(|j| &**j));
                if weight > crate::batch::MAX_DEPENDENCY_TASKS {
                    return Err(ApiError::bad(format!(
                        "spec.after, afterOk, afterAny: its dependencies stand for {weight} jobs \
                         (an array's id counts as its tasks); depend on at most {} at once",
                        crate::batch::MAX_DEPENDENCY_TASKS
                    ))
                    .with_field("spec.after"));
                }
                let now = c.now_ms;
                let array = def.asked_array.take();
                let tasks = array.as_ref().map_or(1, |a| a.indexes.len());
                let mut first = None;
                for k in 0..tasks {
                    let id = s
                        .take_job_id()
                        .map_err(|e| ApiError::internal(format!("reserving a job id: {e}")))?;
                    s.next_job_id = id;
                    let first = *first.get_or_insert(id);
                    let mut def = def.clone();
                    let mut note = format!("submitted by {user}");
                    if let Some(a) = &array {
                        // The ids of an array's tasks follow each other from its first.
                        debug_assert_eq!(id, first + k as u64);
                        let index = a.indexes[k];
                        def.array = Some(Box::new(crate::batch::ArrayTask {
                            id: first,
                            index,
                            count: a.indexes.len() as u32,
                            limit: a.limit,
                            text: a.text.clone(),
                        }));
                        for (key, value) in [
                            ("TESSERA_ARRAY_ID", first.to_string()),
                            ("TESSERA_ARRAY_INDEX", index.to_string()),
                            ("SLURM_ARRAY_JOB_ID", first.to_string()),
                            ("SLURM_ARRAY_TASK_ID", index.to_string()),
                        ] {
                            def.env.insert(key.into(), value);
                        }
                        note = format!("{note} as task {index} of array {first} ({})", a.text);
                    }
                    let job = Job::new(id, &user, def, now);
                    s.remember_request(&job.def.spec.request);
                    save_job(c, s, job, vec![(EventKind::Submitted, note)], now)?;
                }
                job_view(s, first.unwrap_or_default())
            },
        )
        .await?;
    ctl.metrics.submitted.inc();
    Ok((axum::http::StatusCode::CREATED, Json(job)))
}

/// Refuses a job its project's policy does not allow, naming the field and the rule; the
/// refusal is in the audit log.
pub async fn check_policy(
    ctl: &crate::controller::Ctl,
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
    crate::controller::audit::record_refusal(ctl, who, project, None, what).await?;
    Err(ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, message).with_field(field))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    pub project: Option<String>,
    pub state: Option<String>,
    pub owner: Option<String>,
    pub limit: Option<usize>,
    /// Only the tasks of this array.
    pub array: Option<u64>,
}

/// Jobs a list answer puts in words per hold of the state's lock, and jobs it looks at per hold.
/// The answer is streamed in such chunks, so that listing 100,000 jobs neither holds the lock
/// (and with it every write) for the whole list nor keeps every job's view in memory at once.
const LIST_CHUNK: usize = 256;
const LIST_SCAN: usize = 4096;

/// A job list being streamed, newest first: each chunk goes on below the last job id the
/// previous one looked at.
struct JobList {
    user: String,
    role: Role,
    filter: JobFilter,
    states: Option<Vec<JobState>>,
    below: Option<u64>,
    /// Jobs still to send (the request's limit).
    left: usize,
    /// No job is sent yet: the next needs no comma.
    first: bool,
    done: bool,
}

impl JobList {
    /// The next piece of the JSON array: its `[` first, its `]` last.
    fn next_chunk(&mut self, s: &State) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 << 10);
        if self.below.is_none() && self.first {
            out.push(b'[');
        }
        let visible = s.visible_projects(&self.user, self.role);
        let f = &self.filter;
        let range = match self.below {
            None => s.jobs.range(..),
            Some(below) => s.jobs.range(..below),
        };
        let (mut scanned, mut taken) = (0, 0);
        let mut rest = range.rev();
        self.done = loop {
            if scanned == LIST_SCAN || taken == LIST_CHUNK || self.left == 0 {
                break self.left == 0;
            }
            let Some((&id, j)) = rest.next() else {
                break true;
            };
            scanned += 1;
            self.below = Some(id);
            let wanted = visible.as_ref().is_none_or(|v| v.contains(j.project()))
                && f.project.as_ref().is_none_or(|p| p == j.project())
                && f.owner.as_ref().is_none_or(|o| *o == j.owner)
                && f.array
                    .is_none_or(|a| j.def.array.as_ref().is_some_and(|t| t.id == a))
                && self.states.as_ref().is_none_or(|st| st.contains(&j.state));
            if !wanted {
                continue;
            }
            if !self.first {
                out.push(b',');
            }
            self.first = false;
            serde_json::to_writer(&mut out, &view(j, s))?;
            taken += 1;
            self.left -= 1;
        };
        if self.done {
            out.push(b']');
        }
        Ok(out)
    }
}

pub async fn list_jobs<R: Reader>(
    AxState(reader): AxState<Arc<R>>,
    caller: Caller,
    Query(filter): Query<JobFilter>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let (user, role) = caller.user()?;
    let states: Option<Vec<JobState>> = match &filter.state {
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
    let list = JobList {
        user: user.to_string(),
        role,
        left: filter.limit.unwrap_or(1000).min(100_000),
        filter,
        states,
        below: None,
        first: true,
        done: false,
    };
    let chunks = futures_util::stream::unfold((reader, list), |(reader, mut list)| async move {
        if list.done {
            return None;
        }
        let gate = reader.gate().cloned();
        let from = gate.as_ref().map(|g| g.first_unsettled());
        let chunk = reader
            .read(|s| list.next_chunk(s))
            .map_err(|e| e.to_string());
        // What this chunk read must be committed (see `store::gate`); if it was not, the answer
        // stops short, and the client sees an incomplete body, not a wrong list.
        let settled = match (gate, from) {
            (Some(g), Some(from)) => g
                .settled(from, g.applied())
                .await
                .map_err(|t| t.to_string()),
            _ => Ok(()),
        };
        let chunk = chunk
            .and_then(|bytes| settled.map(|()| axum::body::Bytes::from(bytes)))
            .map_err(std::io::Error::other);
        list.done |= chunk.is_err();
        Some((chunk, (reader, list)))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

pub async fn get_job<R: Reader>(
    AxState(reader): AxState<Arc<R>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    reader
        .read(|s| visible_job(s, &caller, id).map(|j| view(j, s)))
        .map(Json)
}

pub async fn job_events<R: Reader>(
    AxState(reader): AxState<Arc<R>>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<Vec<Event>>, ApiError> {
    reader.read(|s| visible_job(s, &caller, id).map(|_| ()))?;
    let events = reader
        .events(id)
        .await
        .map_err(|e| ApiError::internal(format!("reading job {id}'s events: {e:#}")))?;
    Ok(Json(events))
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

/// The manifest that makes a job again (`tessera get job ID -o yaml`), with its status beside
/// it (ignored when submitted).
pub async fn job_manifest(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, ApiError> {
    ctl.store.read(|s| {
        let job = visible_job(s, &caller, id)?;
        let mut m = job.def.to_manifest(job.id, job.held);
        let v = view(job, s);
        m["status"] = serde_json::json!({
            "id": v.id, "state": v.state, "reason": v.reason, "owner": v.owner,
            "attempt": v.attempt, "restarts": v.restarts, "createdMs": v.created_ms,
            "finishedMs": v.finished_ms,
            "nodes": v.assignments.iter().map(|r| r.node.clone()).collect::<Vec<_>>(),
        });
        Ok(Json(m))
    })
}

/// `tessera hold`: a pending job does not start until released.
pub async fn hold_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    change_job(ctl, caller, id, "hold jobs", move |job, user| {
        if job.state != JobState::Pending {
            return Err(ApiError::conflict(format!(
                "job {id} is {}; only a pending job can be held (`tessera requeue {id}` queues                  a running one again)",
                job.state.name()
            )));
        }
        if job.held {
            return Ok(vec![]);
        }
        job.held = true;
        job.reason = format!("held by {user}; it starts once released (`tessera release {id}`)");
        Ok(vec![(EventKind::Held, format!("held by {user}"))])
    })
    .await
}

/// `tessera release`: a held job may start again.
pub async fn release_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    change_job(ctl, caller, id, "release jobs", move |job, user| {
        if !job.held {
            return Err(ApiError::conflict(format!(
                "job {id} is not held; nothing to release"
            )));
        }
        job.held = false;
        job.reason = format!("released by {user}; waiting for the scheduler");
        Ok(vec![(EventKind::Released, format!("released by {user}"))])
    })
    .await
}

/// `tessera requeue`: a running job is stopped (through its checkpoint, as preemption stops it)
/// and queued again without using a restart; an ended one is queued again as a new attempt.
pub async fn requeue_job(
    AxState(ctl): S,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<JobView>, ApiError> {
    change_job(ctl, caller, id, "requeue jobs", move |job, user| {
        if job.service.is_some() {
            return Err(ApiError::conflict(format!(
                "job {id} is a service's replica; move it with `tessera services move`"
            )));
        }
        match job.state {
            JobState::Pending => Err(ApiError::conflict(format!("job {id} is pending already"))),
            s if s.is_final() => {
                job.state = JobState::Pending;
                job.reason = format!("requeued at the request of {user} after it {}", s.name());
                job.finished_ms = None;
                job.not_before_ms = 0;
                job.replicas.clear();
                Ok(vec![(EventKind::Requeued, job.reason.clone())])
            }
            _ if job.stop.is_some() => Err(ApiError::conflict(format!(
                "job {id} is stopping already ({})",
                job.reason
            ))),
            _ => {
                job.stop = Some(Box::new(StopCause::Requeue {
                    by: user.to_string(),
                }));
                job.reason = format!("requeueing at the request of {user}; stopping it first");
                Ok(vec![(
                    EventKind::Requeued,
                    format!("{user} asked to requeue it; stopping its replicas"),
                )])
            }
        }
    })
    .await
}

/// Changes job `id` with `f` on behalf of the caller (who must see it and may act), settles it
/// and saves it; answers the job as it is then.
async fn change_job(
    ctl: crate::controller::Ctl,
    caller: Caller,
    id: u64,
    what: &'static str,
    f: impl FnOnce(&mut Job, &str) -> Result<Vec<crate::controller::lifecycle::Note>, ApiError>
    + Send
    + 'static,
) -> Result<Json<JobView>, ApiError> {
    let user = acting_user(&caller, what)?;
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
                    .map(|j| Job::clone(j))
                    .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
                let now = c.now_ms;
                let mut notes = f(&mut job, &user)?;
                if notes.is_empty() {
                    return job_view(s, id);
                }
                notes.extend(settle(&mut job, now));
                save_job(c, s, job, notes, now)?;
                job_view(s, id)
            },
        )
        .await?;
    Ok(Json(job))
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
        crate::controller::audit::record_refusal(&ctl, user.clone(), project, Some(id), what)
            .await?;
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
                    crate::controller::services::start_move(c, s, &name, Some(id), b.to.clone())?;
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
                job.stop = Some(Box::new(StopCause::Migrate {
                    by: user.clone(),
                    to: b.to.clone(),
                }));
                notes.extend(settle(&mut job, now));
                save_job(c, s, job, notes, now)?;
                job_view(s, id)
            },
        )
        .await?;
    Ok(Json(job))
}
