//! Services: the API, and the loop that keeps each service at its replica count, carries out
//! make-before-break moves and scale-downs, and autoscales (see [`crate::service`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use serde::{Deserialize, Serialize};

use super::audit;
use super::gateway::{Gateway, Seen};
use super::lifecycle::Note;
use super::ops::{
    acting_user, cancel, may_use_project, move_target, parse_body, parse_body_or_default,
    parse_manifest, save_job,
};
use super::{ApiError, Caller, Ctl, now_ms};
use crate::service::{ScaleMemory, ScaleMetric, desired_replicas};
use crate::state::{EventKind, Job, JobState, ReplicaPhase, Service, State};

type S = AxState<Ctl>;

/// How often the loop looks (routing, readiness, drains) and how often it autoscales.
const TICK: Duration = Duration::from_millis(50);
const SCALE_EVERY_MS: u64 = 1000;
/// A drained replica stops only after the gateway has seen it draining for this long.
const SETTLE_MS: u64 = 200;

#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointView {
    pub job: u64,
    pub node: String,
    pub url: String,
    pub ready: bool,
    pub draining: bool,
    pub in_flight: u64,
    pub served: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub project: String,
    pub owner: String,
    /// Replicas wanted now.
    pub replicas: u32,
    pub ready: u32,
    /// Where to send requests: the gateway's path for this service.
    pub path: String,
    pub autoscale: Option<crate::service::Autoscale>,
    /// Its replica jobs that have not ended.
    pub jobs: Vec<u64>,
    pub endpoints: Vec<EndpointView>,
}

fn view(svc: &Service, s: &State, gw: &Gateway) -> ServiceView {
    let jobs: Vec<u64> = children(s, &svc.name).map(|j| j.id).collect();
    let endpoints: Vec<EndpointView> = jobs
        .iter()
        .filter_map(|id| gw.endpoint(*id))
        .map(|e| EndpointView {
            job: e.job,
            node: e.node.clone(),
            url: e.url.clone(),
            ready: e.ready.load(Ordering::SeqCst),
            draining: e.draining.load(Ordering::SeqCst),
            in_flight: e.in_flight.load(Ordering::SeqCst),
            served: e.served.load(Ordering::SeqCst),
        })
        .collect();
    ServiceView {
        name: svc.name.clone(),
        project: svc.template.spec.project.clone(),
        owner: svc.owner.clone(),
        replicas: svc.def.replicas,
        ready: endpoints.iter().filter(|e| e.ready && !e.draining).count() as u32,
        path: format!("/{}/", svc.name),
        autoscale: svc.def.autoscale.clone(),
        jobs,
        endpoints,
    }
}

/// The service's replica jobs that have not ended.
fn children<'a>(s: &'a State, name: &'a str) -> impl Iterator<Item = &'a Job> + 'a {
    s.jobs
        .values()
        .map(|j| &**j)
        .filter(move |j| j.service.as_deref() == Some(name) && !j.state.is_final())
}

/// Every service's replica jobs that have not ended, in one pass over the jobs.
fn by_service(s: &State) -> HashMap<&str, Vec<&Job>> {
    let mut out: HashMap<&str, Vec<&Job>> = HashMap::new();
    if s.services.is_empty() {
        return out;
    }
    for j in s.jobs.values() {
        if let Some(name) = &j.service
            && !j.state.is_final()
        {
            out.entry(name.as_str()).or_default().push(j);
        }
    }
    out
}

/// A new replica job of `svc`, pinned to `to` when given.
fn add_replica(
    c: &crate::store::Write,
    s: &mut State,
    svc: &Service,
    replaces: Option<u64>,
    to: Option<String>,
    now: u64,
) -> Result<u64, ApiError> {
    let id = s
        .take_job_id()
        .map_err(|e| ApiError::internal(format!("reserving a job id: {e}")))?;
    let mut job = Job::new(id, &svc.owner, svc.template.clone(), now);
    job.service = Some(svc.name.clone());
    job.replaces = replaces;
    job.pin_node = to;
    let what = match replaces {
        Some(old) => format!("replica of service {} taking over from job {old}", svc.name),
        None => format!("replica of service {}", svc.name),
    };
    s.remember_request(&job.def.spec.request);
    save_job(c, s, job, vec![(EventKind::Submitted, what)], now)?;
    s.next_job_id = id;
    Ok(id)
}

pub async fn create(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<ServiceView>), ApiError> {
    let user = acting_user(&caller, "create services")?;
    let role = caller.user()?.1;
    let m = parse_manifest(&body)?;
    let name = m.metadata.name.trim().to_string();
    let (mut template, def) = m.into_service("default")?;
    super::disk::guard(&ctl, "services")?;
    let gw = ctl.gateway.clone();
    let v = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<ServiceView, ApiError> {
                may_use_project(s, &user, role, &template.spec.project)?;
                super::ops::resolve_mounts(s, &mut template)?;
                // Each replica is a job: one no node could hold is refused as a job would be.
                super::ops::refuse_never_fitting(s, &template)?;
                if s.services.contains_key(&name) {
                    return Err(ApiError::conflict(format!(
                        "metadata.name {name}: a service of that name exists; pick another name or \
                     `tessera services delete {name}` first"
                    )));
                }
                let now = c.now_ms;
                let svc = Service {
                    name: name.clone(),
                    owner: user.clone(),
                    template,
                    def,
                    created_ms: now,
                };
                c.put_service(&svc)?;
                let project = svc.template.spec.project.clone();
                let what = format!("service {name} with {} replica(s)", svc.def.replicas);
                audit::record(c, now, &user, "service-create", Some(&project), None, &what)?;
                for _ in 0..svc.def.replicas {
                    add_replica(c, s, &svc, None, None, now)?;
                }
                s.services.insert(name.clone(), svc);
                Ok(view(service(s, &name)?, s, &gw))
            },
        )
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(v)))
}

/// The service named `name`, looked up inside the request's own read or write: a concurrent
/// delete may have removed it since the request was checked.
fn service<'a>(s: &'a State, name: &str) -> Result<&'a Service, ApiError> {
    s.services
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("no service {name}; see `tessera services`")))
}

fn visible(s: &State, caller: &Caller, name: &str) -> Result<(), ApiError> {
    let svc = service(s, name)?;
    let (user, role) = caller.user()?;
    if let Some(p) = s.visible_projects(user, role)
        && !p.contains(&svc.template.spec.project)
    {
        return Err(ApiError::not_found(format!("no service {name}")));
    }
    Ok(())
}

pub async fn list(AxState(ctl): S, caller: Caller) -> Result<Json<Vec<ServiceView>>, ApiError> {
    let (user, role) = caller.user()?;
    Ok(Json(ctl.store.read(|s| {
        let allowed = s.visible_projects(user, role);
        s.services
            .values()
            .filter(|svc| {
                allowed
                    .as_ref()
                    .is_none_or(|p| p.contains(&svc.template.spec.project))
            })
            .map(|svc| view(svc, s, &ctl.gateway))
            .collect()
    })))
}

pub async fn get(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    ctl.store.read(|s| {
        visible(s, &caller, &name)?;
        Ok(Json(view(service(s, &name)?, s, &ctl.gateway)))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    pub replicas: u32,
}

pub async fn scale(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceView>, ApiError> {
    let user = acting_user(&caller, "scale services")?;
    let b: ScaleBody = parse_body(&body)?;
    let current = ctl.store.read(|s| {
        visible(s, &caller, &name)?;
        Ok::<_, ApiError>(service(s, &name)?.def.replicas)
    })?;
    if b.replicas > current {
        super::disk::guard(&ctl, "replicas")?;
    }
    let gw = ctl.gateway.clone();
    let v = ctl
        .store
        .write(move |c, s| -> Result<ServiceView, ApiError> {
            let mut svc = service(s, &name)?.clone();
            let (lo, hi) = svc
                .def
                .autoscale
                .as_ref()
                .map_or((1, crate::service::MAX_REPLICAS), |a| (a.min, a.max));
            if b.replicas < lo || b.replicas > hi {
                return Err(ApiError::new(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "replicas {}: out of range; use {lo} to {hi}{}",
                        b.replicas,
                        if svc.def.autoscale.is_some() {
                            " (the service's autoscale range)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            tracing::info!("{user} scales service {name} to {}", b.replicas);
            svc.def.replicas = b.replicas;
            c.put_service(&svc)?;
            let what = format!("service {name} to {} replica(s)", b.replicas);
            let project = svc.template.spec.project.clone();
            audit::record(
                c,
                c.now_ms,
                &user,
                "service-scale",
                Some(&project),
                None,
                &what,
            )?;
            s.services.insert(name.clone(), svc);
            s.changed_for_scheduler();
            Ok(view(service(s, &name)?, s, &gw))
        })
        .await?;
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    /// The replica (its job id) to move; the oldest when absent.
    pub job: Option<u64>,
    pub to: Option<String>,
}

/// Starts a make-before-break move of one replica of a service; returns the new replica's id.
pub fn start_move(
    c: &crate::store::Write,
    s: &mut State,
    name: &str,
    job: Option<u64>,
    to: Option<String>,
) -> Result<u64, ApiError> {
    let svc = service(s, name)?.clone();
    let old = match job {
        Some(id) => s
            .jobs
            .get(&id)
            .filter(|j| j.service.as_deref() == Some(name) && !j.state.is_final())
            .ok_or_else(|| {
                ApiError::not_found(format!("job {id} is not a live replica of service {name}"))
            })?,
        None => children(s, name)
            .filter(|j| j.draining_since_ms.is_none() && j.replaces.is_none())
            .min_by_key(|j| j.id)
            .ok_or_else(|| ApiError::conflict(format!("service {name} has no replica to move")))?,
    };
    let old_id = old.id;
    if old.draining_since_ms.is_some()
        || s.jobs
            .values()
            .any(|j| j.replaces == Some(old_id) && !j.state.is_final())
    {
        return Err(ApiError::conflict(format!(
            "replica {old_id} of {name} is already being replaced or removed"
        )));
    }
    if let Some(to) = &to {
        move_target(s, to)?;
    }
    let now = now_ms();
    add_replica(c, s, &svc, Some(old_id), to, now)
}

pub async fn move_replica(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<ServiceView>, ApiError> {
    let user = acting_user(&caller, "move services")?;
    let b: MoveBody = parse_body_or_default(&body)?;
    ctl.store.read(|s| visible(s, &caller, &name))?;
    let gw = ctl.gateway.clone();
    let v = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<ServiceView, ApiError> {
                let what = format!(
                    "service {name}: replica {} to {}",
                    b.job.map_or("any".into(), |j| j.to_string()),
                    b.to.clone().unwrap_or_else(|| "anywhere".into())
                );
                let project = service(s, &name)?.template.spec.project.clone();
                audit::record(
                    c,
                    c.now_ms,
                    &user,
                    "service-move",
                    Some(&project),
                    b.job,
                    &what,
                )?;
                start_move(c, s, &name, b.job, b.to)?;
                Ok(view(service(s, &name)?, s, &gw))
            },
        )
        .await?;
    Ok(Json(v))
}

pub async fn delete(
    AxState(ctl): S,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, ApiError> {
    let user = acting_user(&caller, "delete services")?;
    ctl.store.read(|s| visible(s, &caller, &name))?;
    let gw = ctl.gateway.clone();
    let v = ctl
        .store
        .write_as(
            Some(user.clone()),
            move |c, s| -> Result<ServiceView, ApiError> {
                let v = view(service(s, &name)?, s, &gw);
                let now = c.now_ms;
                let project = service(s, &name)?.template.spec.project.clone();
                let what = format!("service {name}");
                audit::record(c, now, &user, "service-delete", Some(&project), None, &what)?;
                let ids: Vec<u64> = children(s, &name).map(|j| j.id).collect();
                for id in ids {
                    let Some(mut job) = s.jobs.get(&id).cloned() else {
                        continue;
                    };
                    let notes = cancel(&mut job, &user, now);
                    save_job(c, s, job, notes, now)?;
                }
                c.delete_service(&name)?;
                s.services.remove(&name);
                Ok(v)
            },
        )
        .await?;
    Ok(Json(v))
}

/// What the store says the gateway should route: each service's running replicas.
fn routes(s: &State) -> Vec<(String, String, u64, Vec<Seen>)> {
    let kids = by_service(s);
    s.services
        .values()
        .map(|svc| {
            let seen = kids
                .get(svc.name.as_str())
                .into_iter()
                .flatten()
                .filter(|j| j.state == JobState::Running)
                .filter_map(|j| {
                    let r = j.replicas.first()?;
                    let port = r.port?;
                    if r.phase != ReplicaPhase::Running {
                        return None;
                    }
                    let node = s.nodes.get(&r.node)?;
                    let host = node
                        .address
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .rsplit_once(':')
                        .map_or(node.address.as_str(), |(h, _)| h)
                        .to_string();
                    Some(Seen {
                        job: j.id,
                        node: r.node.clone(),
                        url: format!("http://{host}:{port}"),
                        draining: j.draining_since_ms.is_some() || j.stop.is_some(),
                    })
                })
                .collect();
            (
                svc.name.clone(),
                svc.def.readiness_path.clone(),
                svc.def.readiness_period_ms,
                seen,
            )
        })
        .collect()
}

/// Changes a tick found necessary.
#[derive(Default)]
struct Plan {
    /// Replacements that are ready: (new, old).
    promote: Vec<(u64, u64)>,
    /// Replicas to start draining (or cancel at once when they never ran).
    drain: Vec<u64>,
    /// Drained replicas to stop.
    stop: Vec<u64>,
    /// Services short of replicas: (name, how many to add).
    add: Vec<(String, u32)>,
    /// New replica counts from the autoscaler.
    scale: Vec<(String, u32)>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.promote.is_empty()
            && self.drain.is_empty()
            && self.stop.is_empty()
            && self.add.is_empty()
            && self.scale.is_empty()
    }
}

fn ready(gw: &Gateway, job: u64) -> bool {
    gw.endpoint(job)
        .is_some_and(|e| e.ready.load(Ordering::SeqCst))
}

fn plan(s: &State, gw: &Gateway, now: u64) -> Plan {
    let mut p = Plan::default();
    let all = by_service(s);
    for svc in s.services.values() {
        let kids: Vec<&Job> = all.get(svc.name.as_str()).cloned().unwrap_or_default();
        for j in &kids {
            if let Some(old) = j.replaces {
                let old_live = s.jobs.get(&old).is_some_and(|o| !o.state.is_final());
                if ready(gw, j.id) || !old_live {
                    p.promote.push((j.id, old));
                }
            }
            if let Some(since) = j.draining_since_ms {
                let ep = gw.endpoint(j.id);
                let idle = ep
                    .as_ref()
                    .is_none_or(|e| e.in_flight.load(Ordering::SeqCst) == 0);
                let settled = now >= since + SETTLE_MS;
                if j.stop.is_none() && ((idle && settled) || now >= since + svc.def.drain_ms) {
                    p.stop.push(j.id);
                }
            }
        }
        // Replicas that count: not draining, not a replacement still warming up.
        let mut serving: Vec<&Job> = kids
            .iter()
            .copied()
            .filter(|j| j.draining_since_ms.is_none() && j.replaces.is_none())
            .collect();
        let want = svc.def.replicas as usize;
        if serving.len() < want {
            p.add
                .push((svc.name.clone(), (want - serving.len()) as u32));
        } else if serving.len() > want {
            // Remove first what serves nothing (not ready), then the newest.
            serving.sort_by_key(|j| (ready(gw, j.id), std::cmp::Reverse(j.id)));
            p.drain
                .extend(serving[..serving.len() - want].iter().map(|j| j.id));
        }
    }
    p
}

fn apply(c: &crate::store::Write, s: &mut State, p: Plan, now: u64) -> Result<(), ApiError> {
    let drain = |c: &crate::store::Write, s: &mut State, id: u64, why: String| {
        let Some(mut job) = s.jobs.get(&id).cloned() else {
            return Ok(());
        };
        if job.state.is_final() || job.draining_since_ms.is_some() {
            return Ok(());
        }
        let notes: Vec<Note> = if job.state == JobState::Pending {
            cancel(&mut job, "the service", now)
        } else {
            job.draining_since_ms = Some(now);
            vec![(EventKind::Draining, why)]
        };
        save_job(c, s, job, notes, now)
    };
    for (new, old) in p.promote {
        if let Some(mut j) = s.jobs.get(&new).cloned() {
            j.replaces = None;
            save_job(
                c,
                s,
                j,
                vec![(EventKind::Ready, format!("took over from job {old}"))],
                now,
            )?;
        }
        drain(
            c,
            s,
            old,
            "replaced by a ready replica; finishing its requests".into(),
        )?;
    }
    for id in p.drain {
        drain(
            c,
            s,
            id,
            "the service scales down; finishing its requests".into(),
        )?;
    }
    for id in p.stop {
        if let Some(mut job) = s.jobs.get(&id).cloned() {
            let notes = cancel(&mut job, "the service (drained)", now);
            save_job(c, s, job, notes, now)?;
        }
    }
    for (name, n) in p.add {
        let Some(svc) = s.services.get(&name).cloned() else {
            continue;
        };
        for _ in 0..n {
            add_replica(c, s, &svc, None, None, now)?;
        }
    }
    for (name, replicas) in p.scale {
        if let Some(mut svc) = s.services.get(&name).cloned() {
            tracing::info!(
                "service {name}: autoscaled from {} to {replicas}",
                svc.def.replicas
            );
            svc.def.replicas = replicas;
            c.put_service(&svc)?;
            s.services.insert(name, svc);
        }
    }
    Ok(())
}

/// The autoscaler's view of one service between decisions.
#[derive(Default)]
struct Load {
    last_requests: u64,
    last_ms: u64,
    /// Sum and count of in-flight samples since the last decision.
    in_flight_sum: f64,
    samples: u32,
    memory: ScaleMemory,
}

/// Runs for the controller's life: routing, readiness, moves, drains, replica counts,
/// autoscaling.
pub async fn run(ctl: Ctl) {
    let gw: Arc<Gateway> = ctl.gateway.clone();
    let mut loads: HashMap<String, Load> = HashMap::new();
    let mut last_scale = 0u64;
    loop {
        tokio::time::sleep(TICK).await;
        let now = now_ms();
        gw.refresh(ctl.store.read(routes));
        gw.probe_due();
        let mut p = ctl.store.read(|s| plan(s, &gw, now));
        // Autoscaling: sample in flight every tick, decide every second.
        let decide = now >= last_scale + SCALE_EVERY_MS;
        let scaled: Vec<(String, crate::service::Autoscale, u32)> = ctl.store.read(|s| {
            s.services
                .values()
                .filter_map(|svc| {
                    Some((
                        svc.name.clone(),
                        svc.def.autoscale.clone()?,
                        svc.def.replicas,
                    ))
                })
                .collect()
        });
        for (name, a, current) in scaled {
            let Some(route) = gw.route(&name) else {
                continue;
            };
            let load = loads.entry(name.clone()).or_default();
            load.in_flight_sum += route
                .endpoints
                .iter()
                .map(|e| e.in_flight.load(Ordering::SeqCst) as f64)
                .sum::<f64>();
            load.samples += 1;
            if !decide {
                continue;
            }
            let requests = route.requests.load(Ordering::SeqCst);
            let value = match a.metric {
                ScaleMetric::InFlight => load.in_flight_sum / f64::from(load.samples.max(1)),
                ScaleMetric::Rps if load.last_ms > 0 => {
                    (requests - load.last_requests.min(requests)) as f64 * 1000.0
                        / (now - load.last_ms).max(1) as f64
                }
                ScaleMetric::Rps => 0.0,
            };
            (load.last_requests, load.last_ms) = (requests, now);
            (load.in_flight_sum, load.samples) = (0.0, 0);
            let want = desired_replicas(&a, current, value, now, &mut load.memory);
            if want != current {
                p.scale.push((name, want));
            }
        }
        if decide {
            last_scale = now;
        }
        if p.is_empty() {
            continue;
        }
        // Draining starts in the gateway at once, before the store says so.
        for id in p
            .promote
            .iter()
            .map(|(_, old)| *old)
            .chain(p.drain.iter().copied())
        {
            if let Some(e) = gw.endpoint(id) {
                e.draining.store(true, Ordering::SeqCst);
            }
        }
        let r = ctl
            .store
            .write(move |c, s| -> Result<(), ApiError> { apply(c, s, p, c.now_ms) })
            .await;
        if let Err(e) = r {
            tracing::warn!("services: {e:?}");
        }
    }
}
