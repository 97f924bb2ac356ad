//! The agents' side of the API: registration, and the sync call that carries heartbeats and
//! workload reports one way and the node's desired allocations the other.
//!
//! The sync is a long poll: when nothing changed, the controller holds it until the node's desired
//! set changes or `wait_ms` passes, so assignments reach agents at once without a fixed tick.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use tessera_sched::NodeSpec;
use tessera_sched::validate::validate_node;

use super::lifecycle::{Note, apply_status, settle};
use super::ops::save_job;
use super::{ApiError, AxState, Caller, Ctl, S, issue_token, now_ms};
use crate::auth::Principal;
use crate::manifest::check_name;
use crate::protocol::{
    Assignment, ImageRun, Member, Peer, RegisterRequest, RegisterResponse, RemoteDevice,
    Rendezvous, ReplicaSet, ReplicaStatus, ReplicaUsage, RunPhase, SyncRequest, SyncResponse,
};
use crate::state::{
    EventKind, Job, Node, NodeHealth, Replica, ReplicaPhase, State, StopCause, TokenKind,
    parse_either_key,
};
use crate::volumes::Volume;

pub async fn register(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<Json<RegisterResponse>, ApiError> {
    let req: RegisterRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("request body: {e}")))?;
    check_name("name", &req.name)?;
    let spec = NodeSpec {
        name: req.name.clone(),
        cpu_milli: req.cpu_milli,
        memory_bytes: req.memory_bytes,
        labels: req.labels.clone(),
        devices: req.devices.clone(),
    };
    validate_node(&spec)?;
    if req.confinement.len() > 500 {
        return Err(ApiError::bad("confinement: at most 500 characters"));
    }
    check_address(&req.address)?;
    if req.callback_secret.len() > 256 {
        return Err(
            ApiError::bad("callback_secret: at most 256 characters (it is not used)")
                .with_field("callback_secret"),
        );
    }
    let node_name = req.name.clone();
    let joining = match &caller.0 {
        Principal::Join { token_id } => Some(token_id.clone()),
        Principal::Agent { node } if *node == req.name => None,
        Principal::Agent { node } => {
            return Err(ApiError::forbidden(format!(
                "this agent credential belongs to node {node}, not {}",
                req.name
            )));
        }
        Principal::User { .. } => {
            return Err(ApiError::forbidden(
                "agents join with a join token (`tessera token create --join`), not a user token",
            ));
        }
    };
    let lease_ms = ctl.config.lease.as_millis() as u64;
    let fresh = if joining.is_some() {
        Some(crate::auth::new_token())
    } else {
        None
    };
    let token = ctl
        .store
        .write(move |c, s| -> Result<Option<String>, ApiError> {
            let now = c.now_ms;
            let old = s.nodes.get(&req.name).cloned();
            if let Some(id) = &joining {
                // A join spends one use of its token, checked again inside the write so that
                // two joins cannot share the last use.
                let mut t = s
                    .tokens
                    .get(id)
                    .filter(|t| t.usable(now))
                    .cloned()
                    .ok_or_else(|| ApiError::unauthorized("this join token is used up, expired or revoked; ask an admin for a new one (`tessera token create --join`)"))?;
                // A name with a live credential is a node in service: joining under it would
                // take it over.
                if s.tokens.values().any(|t| {
                    t.kind == TokenKind::Agent && t.subject == req.name && !t.revoked
                }) {
                    return Err(ApiError::conflict(format!(
                        "node {} is already in the pool with a live agent credential; to replace \
                         that machine, an admin runs `tessera nodes replace {}` first, or join \
                         under another --node-name",
                        req.name, req.name
                    )));
                }
                t.uses_left = t.uses_left.map(|u| u.saturating_sub(1));
                c.put_token(&t)?;
                s.tokens.insert(t.id.clone(), t);
            }
            let node = Node {
                spec,
                simulated: req.simulated,
                address: req.address,
                cordoned: old.as_ref().is_some_and(|o| o.cordoned),
                health: old.as_ref().map_or(NodeHealth::Ready, |o| o.health),
                registered_ms: now,
                confinement: req.confinement,
                last_seen_ms: now,
                last_seq: old.as_ref().map_or(0, |o| o.last_seq),
                heartbeats: 0,
            };
            c.put_node(&node)?;
            let token = if let Some(fresh) = fresh {
                // A node that joins again (e.g. after losing its data dir) gets a new credential;
                // the old one stops working.
                let stale: Vec<String> = s
                    .tokens
                    .values()
                    .filter(|t| {
                        t.kind == TokenKind::Agent && t.subject == node.spec.name && !t.revoked
                    })
                    .map(|t| t.id.clone())
                    .collect();
                for id in &stale {
                    let Some(mut t) = s.tokens.get(id).cloned() else {
                        continue;
                    };
                    t.revoked = true;
                    c.put_token(&t)?;
                }
                let what = "agent credential";
                let t = issue_token(c, s, TokenKind::Agent, &node.spec.name, what, fresh)?;
                for id in stale {
                    if let Some(t) = s.tokens.get_mut(&id) {
                        t.revoked = true;
                    }
                }
                Some(t.text)
            } else {
                None
            };
            s.touch_node(&node.spec.name);
            s.nodes.insert(node.spec.name.clone(), node);
            s.changed_for_scheduler();
            Ok(token)
        })
        .await?;
    let callback_secret = crate::auth::callback_secret(&ctl.callback_key, &node_name);
    Ok(Json(RegisterResponse {
        token,
        lease_ms,
        callback_secret,
    }))
}

/// What node `name` should run now, and the revision of that set. `key` is the controller's
/// (remote attachments' secrets derive from it).
fn desired(s: &State, key: &[u8], name: &str) -> (u64, Vec<Assignment>) {
    let revision = s.node_revision.get(name).copied().unwrap_or(0);
    let mut out = Vec::new();
    let Some(node) = s.nodes.get(name) else {
        return (revision, out);
    };
    if node.health != NodeHealth::Ready {
        return (revision, out);
    }
    let live = |r: &&Replica| {
        !r.leaving && matches!(r.phase, ReplicaPhase::Assigned | ReplicaPhase::Running)
    };
    for job in s.jobs_on(name) {
        // A GPU server outlives its job's stop until its program has ended: a program stopping
        // through its checkpoint still needs its device to save what is on it.
        for r in job.replicas.iter().filter(live) {
            if r.gpu_node.as_deref() == Some(name) && (job.stop.is_none() || r.gpu_serving) {
                out.extend(serves_device(s, key, job, r, node));
            }
        }
        if job.stop.is_some() {
            continue;
        }
        let elastic = job.def.elastic.map(|e| replica_set(s, job, e));
        let rendezvous = rendezvous(s, job);
        let (volumes, hidden_volumes, workdir) = mounts(s, job);
        for r in job.replicas.iter().filter(live) {
            // A remote replica's program starts once its GPU server runs.
            if r.node != name || (r.gpu_node.is_some() && !r.gpu_serving) {
                continue;
            }
            let spec = &job.def.spec;
            out.push(Assignment {
                key: job.key(r.index),
                job_id: job.id,
                job_name: spec.name.clone(),
                project: spec.project.clone(),
                replica: r.index,
                replicas: elastic
                    .as_ref()
                    .map_or(spec.replicas, |e| e.replicas.len() as u32),
                attempt: job.attempt,
                command: job.def.command.clone(),
                env: job.def.env.clone(),
                cpu_milli: r.cpu_milli,
                memory_bytes: r.memory_bytes,
                devices: r.devices.clone(),
                device_memory: device_memory(s, r.gpu_node.as_deref().unwrap_or(name)),
                checkpoint: job.def.checkpoint.as_deref().cloned(),
                resume: job
                    .def
                    .checkpoint
                    .as_ref()
                    .and_then(|_| {
                        s.checkpoints
                            .get(&(job.id, r.index))
                            .or_else(|| s.checkpoints.get(&(job.id, r.resume_of?)))
                    })
                    .map(|m| m.id.clone()),
                port: job
                    .service
                    .as_ref()
                    .and_then(|name| s.services.get(name))
                    .map(|svc| svc.def.port.unwrap_or(0)),
                elastic: elastic.clone(),
                uid: s.users.get(&job.owner).and_then(|u| u.uid),
                rendezvous: rendezvous.clone(),
                volumes: volumes.clone(),
                hidden_volumes: hidden_volumes.clone(),
                output_file: job
                    .def
                    .output_file
                    .as_deref()
                    .map(|o| crate::batch::expand_output(o, job, name)),
                workdir: workdir.clone(),
                image: job.def.image.clone().map(|reference| ImageRun {
                    credentials: super::registries::login_for(s, job.project(), &reference),
                    reference,
                }),
                remote_device: r.gpu_node.as_ref().and_then(|g| {
                    Some(RemoteDevice {
                        address: format!("{}:{}", node_host(s, g), r.gpu_port?),
                        secret: crate::auth::attachment_secret(key, &job.key(r.index)),
                    })
                }),
                serves_device: None,
            });
        }
    }
    (revision, out)
}

/// The memory of each device of node `name`.
fn device_memory(s: &State, name: &str) -> Vec<u64> {
    s.nodes
        .get(name)
        .map(|n| n.spec.devices.iter().map(|d| d.memory_bytes).collect())
        .unwrap_or_default()
}

/// What the GPU server of a remote attachment may use on its node: limits, not reservations
/// (the device half of a pair reserves the device alone, which is what lets a node whose CPUs
/// are all taken lend its GPUs). One core, and memory for its copy buffers and module cache.
pub const SERVER_CPU_MILLI: u64 = 1000;
pub const SERVER_MEMORY_BYTES: u64 = 1536 << 20;

/// The device half of remote replica `r` on `node`: its GPU server, listening on the node's
/// address at the port reserved at placement, with the replica's devices and none of the job's
/// command, environment, image or volumes.
fn serves_device(s: &State, key: &[u8], job: &Job, r: &Replica, node: &Node) -> Option<Assignment> {
    let port = r.gpu_port?;
    let host = node_host(s, &node.spec.name);
    // The node's address when it is one; a name is served on every address.
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let all_volumes = s.projects.values().flat_map(|p| &p.policy.volumes);
    Some(Assignment {
        key: job.device_key(r.index),
        job_id: job.id,
        job_name: job.def.spec.name.clone(),
        project: job.project().to_string(),
        replica: r.index,
        replicas: job.def.spec.replicas,
        attempt: job.attempt,
        command: Vec::new(),
        env: BTreeMap::new(),
        cpu_milli: SERVER_CPU_MILLI,
        memory_bytes: SERVER_MEMORY_BYTES,
        devices: r.devices.clone(),
        device_memory: device_memory(s, &node.spec.name),
        checkpoint: None,
        resume: None,
        port: None,
        elastic: None,
        uid: s.users.get(&job.owner).and_then(|u| u.uid),
        rendezvous: None,
        volumes: Vec::new(),
        hidden_volumes: crate::volumes::hidden(all_volumes, &[]),
        workdir: None,
        image: None,
        remote_device: None,
        serves_device: Some(RemoteDevice {
            address: std::net::SocketAddr::new(ip, port).to_string(),
            secret: crate::auth::attachment_secret(key, &job.key(r.index)),
        }),
        output_file: None,
    })
}

/// What a job mounts now: its volumes its project still offers (read-only where either says so),
/// every other volume of the pool to hide, and its working directory while a volume holds it.
fn mounts(s: &State, job: &Job) -> (Vec<Volume>, Vec<String>, Option<String>) {
    let offered = s
        .projects
        .get(job.project())
        .map(|p| p.policy.volumes.as_slice())
        .unwrap_or_default();
    let volumes: Vec<Volume> = job
        .def
        .volumes
        .iter()
        .filter_map(|v| {
            let now = offered.iter().find(|o| o.path == v.path)?;
            Some(Volume {
                path: v.path.clone(),
                read_only: v.read_only || now.read_only,
            })
        })
        .collect();
    let all = s.projects.values().flat_map(|p| &p.policy.volumes);
    let hidden = crate::volumes::hidden(all, &volumes);
    let workdir = job
        .def
        .workdir
        .clone()
        .filter(|w| volumes.iter().any(|v| crate::volumes::under(w, &v.path)));
    (volumes, hidden, workdir)
}

/// The host a node's agent listens on: where its replicas are reached.
pub(crate) fn node_host(s: &State, node: &str) -> String {
    s.nodes
        .get(node)
        .and_then(|n| reqwest::Url::parse(&n.address).ok())
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// Where a gang's replicas meet: rank 0's host and the port reserved there at placement, and its
/// replicas (an elastic job's current members) in rank order.
fn rendezvous(s: &State, job: &Job) -> Option<Rendezvous> {
    let master_port = job.rendezvous_port?;
    // A gang's ranks are its replicas' indices for its whole run (one that ended early keeps its
    // place); an elastic job's are positions in its replica set now.
    let members: Vec<Peer> = job
        .replicas
        .iter()
        .filter(|r| {
            if job.def.elastic.is_some() {
                !r.leaving && !r.phase.is_done()
            } else {
                !r.leaving
            }
        })
        .map(|r| Peer {
            index: r.index,
            node: r.node.clone(),
            host: node_host(s, &r.node),
            gpus: r.devices.len() as u32,
        })
        .collect();
    let master_addr = members.first()?.host.clone();
    Some(Rendezvous {
        master_addr,
        master_port,
        members,
    })
}

/// An elastic job's replica set as its programs see it.
fn replica_set(s: &State, job: &Job, e: crate::manifest::Elastic) -> ReplicaSet {
    let host = |node: &str| node_host(s, node);
    ReplicaSet {
        generation: job.generation,
        min: e.min,
        max: e.max,
        replicas: job
            .members()
            .map(|r| Member {
                index: r.index,
                node: r.node.clone(),
                host: host(&r.node),
            })
            .collect(),
    }
}

/// Where an agent serves logs: an `http` or `https` URL of a host, nothing else (the controller
/// calls it with the node's secret).
fn check_address(address: &str) -> Result<(), ApiError> {
    let ok = reqwest::Url::parse(address).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some_and(|h| !h.is_empty())
            && u.username().is_empty()
            && u.password().is_none()
            && matches!(u.path(), "" | "/")
            && u.query().is_none()
    });
    if ok && address.len() <= 256 {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "address {address:?}: give where the agent serves, as http://HOST:PORT or \
             https://HOST:PORT"
        ))
        .with_field("address"))
    }
}

/// What an agent reports must be possible: a sequence number not beyond a day from now (the
/// agent counts from the current time in microseconds; a larger one would lock the node out of
/// its own later syncs), readings within their ranges, each device once.
fn check_sync(req: &SyncRequest, devices: usize, now_ms: u64) -> Result<(), ApiError> {
    let bad = |field: &str, what: String| Err(ApiError::bad(what).with_field(field));
    let latest = (now_ms + 86_400_000).saturating_mul(1000);
    if req.seq > latest {
        return bad(
            "seq",
            format!(
                "seq {}: beyond a day from now; an agent counts from the current time in \
                 microseconds (check the node's clock)",
                req.seq
            ),
        );
    }
    let pct = |v: f64, most: f64| v.is_finite() && (0.0..=most).contains(&v);
    if let Some(sample) = &req.sample {
        let mut seen = std::collections::BTreeSet::new();
        for d in &sample.devices {
            if d.index as usize >= devices || !seen.insert(d.index) {
                return bad(
                    "sample.devices.index",
                    format!(
                        "device {}: each of the node's {devices} devices is reported at most \
                         once, by its index",
                        d.index
                    ),
                );
            }
            if !pct(d.util_pct, 100.0) || d.memory_used_bytes > d.memory_total_bytes {
                return bad(
                    "sample.devices",
                    format!(
                        "device {}: utilisation must be 0 to 100 and memory used at most its \
                         total",
                        d.index
                    ),
                );
            }
        }
    }
    for st in &req.statuses {
        if let Some(u) = &st.usage
            && !(pct(u.gpu_util_pct, 100.0) && pct(u.cpu_pct, 100.0 * 65_536.0))
        {
            return bad(
                "statuses.usage",
                format!(
                    "{}: GPU utilisation must be 0 to 100 and CPU 0 or more percent",
                    st.key
                ),
            );
        }
    }
    Ok(())
}

pub async fn sync(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<Json<SyncResponse>, ApiError> {
    let Principal::Agent { node } = caller.0 else {
        return Err(ApiError::forbidden(
            "only an agent's own credential may sync",
        ));
    };
    let mut req: SyncRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("request body: {e}")))?;
    let devices = ctl
        .store
        .read(|s| s.nodes.get(&node).map(|n| n.spec.devices.len()))
        .unwrap_or(0);
    check_sync(&req, devices, now_ms())?;
    // An agent speaks only for replicas assigned to its own node.
    let foreign: Vec<ReplicaStatus> = ctl.store.read(|s| {
        req.statuses
            .iter()
            .filter(|st| !reportable(s, &node, &st.key))
            .cloned()
            .collect()
    });
    req.statuses
        .retain(|st| !foreign.iter().any(|f| f.key == st.key));
    if !foreign.is_empty() {
        let (n, keys) = (
            node.clone(),
            foreign.iter().map(|f| f.key.clone()).collect::<Vec<_>>(),
        );
        tracing::warn!("agent of node {n} reported replicas of other nodes: {keys:?}; ignored");
        ctl.store
            .write(move |c, _| -> Result<(), ApiError> {
                let detail = format!(
                    "ignored reports about replicas not assigned to node {n}: {}",
                    keys.join(", ")
                );
                super::audit::record(
                    c,
                    c.now_ms,
                    &format!("agent:{n}"),
                    "forged-report",
                    None,
                    None,
                    &detail,
                )?;
                Ok(())
            })
            .await?;
    }
    let name = node.clone();
    let statuses = req.statuses.clone();
    let seq = req.seq;
    ctl.metrics.heartbeats.inc();
    if let Some(sample) = &req.sample {
        super::telemetry::lock(&ctl.telemetry).record_node(&node, sample);
    }
    // What images the node holds (for the scheduler's tie-break), bounded as agents are told.
    let images: std::collections::BTreeSet<String> = req
        .images
        .iter()
        .take(512)
        .filter(|i| i.len() <= 512)
        .cloned()
        .collect();
    let (acked, readings) = ctl
        .store
        .write(move |c, s| -> Result<_, ApiError> {
            let (acked, readings) = report(c, s, &name, seq, &statuses)?;
            if s.node_images.get(&name) != Some(&images) {
                s.node_images.insert(name.clone(), images);
                s.changed_for_scheduler();
            }
            Ok((acked, readings))
        })
        .await?;
    {
        let now = now_ms();
        let mut t = super::telemetry::lock(&ctl.telemetry);
        for (job, index, u) in &readings {
            t.record_replica(*job, *index, u, now);
        }
    }
    let wait = Duration::from_millis(req.wait_ms.min(ctl.config.lease.as_millis() as u64 / 3));
    let mut watch = ctl.store.notifier.watch_node(&node);
    watch.borrow_and_update();
    let (mut revision, mut want) = ctl.store.read(|s| desired(s, &ctl.callback_key, &node));
    if revision == req.revision && acked.is_empty() && !wait.is_zero() {
        let _ = tokio::time::timeout(wait, watch.changed()).await;
        (revision, want) = ctl.store.read(|s| desired(s, &ctl.callback_key, &node));
    }
    Ok(Json(SyncResponse {
        revision,
        lease_ms: ctl.config.lease.as_millis() as u64,
        log_limit_bytes: ctl.config.log_limit,
        desired: want,
        acked,
    }))
}

/// May node `node` report on replica `key`? Only on replicas of the job's current attempt that
/// are assigned to it; an earlier attempt's replica is reported only to be acknowledged (its
/// report changes nothing), and a key that names no job changes nothing either.
fn reportable(s: &State, node: &str, key: &str) -> bool {
    let Some(((job, attempt, index), device_half)) = parse_either_key(key) else {
        return true;
    };
    match s.jobs.get(&job) {
        // A GPU server's key is its device node's to report, a program's its own node's.
        Some(j) if j.attempt == attempt => j.replicas.iter().any(|r| {
            r.index == index
                && if device_half {
                    r.gpu_node.as_deref() == Some(node)
                } else {
                    r.node == node
                }
        }),
        _ => true,
    }
}

/// Running replicas' use as a report leaves it: (job, replica, use), for telemetry.
type Readings = Vec<(u64, u32, ReplicaUsage)>;

/// Records a heartbeat and the agent's report; returns the exits now durable, and the running
/// replicas' use for telemetry.
fn report(
    c: &crate::store::Write,
    s: &mut State,
    name: &str,
    seq: u64,
    statuses: &[ReplicaStatus],
) -> Result<(Vec<String>, Readings), ApiError> {
    let now = now_ms();
    let Some(mut node) = s.nodes.get(name).cloned() else {
        return Err(ApiError::conflict(format!(
            "node {name} is not registered; restart its agent"
        )));
    };
    if seq <= node.last_seq {
        return Err(ApiError::conflict(format!(
            "stale sync {seq} from node {name} (already saw {})",
            node.last_seq
        )));
    }
    let came_back = node.health == NodeHealth::Lost;
    let by_key: BTreeMap<&str, &ReplicaStatus> =
        statuses.iter().map(|st| (st.key.as_str(), st)).collect();
    // Every reported exit is recorded (or is stale) in this very commit, so all are acknowledged.
    let acked: Vec<String> = statuses
        .iter()
        .filter(|st| st.phase == RunPhase::Exited)
        .map(|st| st.key.clone())
        .collect();
    // Jobs touched by this report, with their events; only those that changed are written, so a
    // heartbeat about steadily running work costs no store write.
    let mut changed: BTreeMap<u64, (Job, Vec<Note>)> = BTreeMap::new();
    // Jobs whose reason changed without an event (an image pull's progress).
    let mut progressed: std::collections::BTreeSet<u64> = Default::default();
    let readings = record_use(s, statuses, now);
    if !came_back {
        for st in statuses {
            let Some(((job_id, attempt, index), device_half)) = parse_either_key(&st.key) else {
                continue;
            };
            let mut corrupt = None;
            if let Some(bad) = &st.resume_failed
                && !device_half
                && s.checkpoints
                    .get(&(job_id, index))
                    .is_some_and(|m| m.id == *bad)
            {
                // Never again: the next start of this replica begins from the beginning too.
                c.delete_checkpoint(job_id, index)?;
                s.checkpoints.remove(&(job_id, index));
                corrupt = Some(format!(
                    "checkpoint {} of replica {index} failed its integrity check; the replica \
                     started from the beginning",
                    &bad[..bad.len().min(12)]
                ));
            }
            // Stale work (an earlier attempt, an ended job) is not in the desired set, so the
            // agent stops it; its exit needs no record.
            let Some(job) = s
                .jobs
                .get(&job_id)
                .filter(|j| j.attempt == attempt && j.state.is_active())
            else {
                continue;
            };
            let (job, notes) = changed
                .entry(job_id)
                .or_insert_with(|| ((**job).clone(), Vec::new()));
            if device_half {
                let stopping = job.stop.is_some();
                let more = device_status(job, index, st, name);
                if !stopping && job.stop.is_some() {
                    audit_attachment(c, now, job, &more[0].1)?;
                }
                notes.extend(more);
                continue;
            }
            if let Some(text) = corrupt {
                notes.push((EventKind::CheckpointCorrupt, text));
            }
            if st.phase == RunPhase::Preparing {
                // Pull progress: the job's reason says it as it goes, an event says it began.
                let assigned = job
                    .replicas
                    .iter()
                    .any(|r| r.index == index && r.phase == ReplicaPhase::Assigned);
                let reason = format!("replica {index} on {name}: {}", st.message);
                if assigned && job.reason != reason {
                    // Progress says "(12 of 340 MiB …)" after its step: a new step is an event.
                    let step = |text: &str| text.split(" (").next().unwrap_or("").to_string();
                    if step(&job.reason) != step(&reason) {
                        notes.push((EventKind::Replica, reason.clone()));
                    }
                    job.reason = reason;
                    progressed.insert(job_id);
                }
                continue;
            }
            let stopping = job.stop.is_some();
            if apply_status(job, index, st, now) {
                let remote = job
                    .replicas
                    .iter()
                    .any(|r| r.index == index && r.gpu_node.is_some());
                if remote && st.interrupted && !stopping && job.stop.is_some() {
                    let what = format!("replica {index} on {name}: {}", st.message);
                    audit_attachment(c, now, job, &what)?;
                }
                let what = match (st.phase, &st.image) {
                    (RunPhase::Running, None) => format!("replica {index} started on {name}"),
                    (RunPhase::Running, Some(image)) => {
                        format!("replica {index} started on {name} from {image}")
                    }
                    (_, _) => format!("replica {index} on {name}: {}", st.message),
                };
                notes.push((EventKind::Replica, what));
            }
        }
        // Replicas of this node that the agent no longer reports: stopped before they started,
        // or lost by the agent.
        for job in s.jobs_on(name) {
            let missing: Vec<u32> = job
                .replicas
                .iter()
                .filter(|r| {
                    r.node == name
                        && !r.phase.is_done()
                        && (job.stop.is_some() || r.leaving || r.phase == ReplicaPhase::Running)
                        && !by_key.contains_key(job.key(r.index).as_str())
                })
                .map(|r| r.index)
                .collect();
            // GPU servers of running remote replicas that the agent no longer reports.
            let servers_gone: Vec<u32> = job
                .replicas
                .iter()
                .filter(|r| {
                    r.gpu_node.as_deref() == Some(name)
                        && r.gpu_serving
                        && !r.phase.is_done()
                        && !by_key.contains_key(job.device_key(r.index).as_str())
                })
                .map(|r| r.index)
                .collect();
            if missing.is_empty() && servers_gone.is_empty() {
                continue;
            }
            let (j, notes) = changed
                .entry(job.id)
                .or_insert_with(|| (job.clone(), Vec::new()));
            for index in servers_gone {
                let stopping = j.stop.is_some();
                let more = server_ended(j, index, name, "no longer known to its agent");
                if !stopping {
                    audit_attachment(c, now, j, &more[0].1)?;
                }
                notes.extend(more);
            }
            for index in missing {
                let Some(r) = j.replicas.iter_mut().find(|r| r.index == index) else {
                    continue;
                };
                if r.phase == ReplicaPhase::Running {
                    r.phase = ReplicaPhase::Exited;
                    r.exit_code = None;
                    notes.push((
                        EventKind::Replica,
                        format!("replica {index} is no longer known to the agent on {name}"),
                    ));
                } else {
                    r.phase = ReplicaPhase::NotStarted;
                    notes.push((
                        EventKind::Replica,
                        format!("replica {index} was stopped before {name} started it"),
                    ));
                }
                r.finished_ms = Some(now);
            }
        }
    }
    for (job, notes) in changed.values_mut() {
        let more = settle(job, now);
        notes.extend(more);
    }
    if came_back {
        node.health = NodeHealth::Ready;
        c.put_node(&node)?;
    }
    for (job, notes) in changed
        .into_values()
        .filter(|(job, notes)| !notes.is_empty() || progressed.contains(&job.id))
    {
        save_job(c, s, job, notes, now)?;
    }
    node.last_seen_ms = now;
    node.last_seq = seq;
    node.heartbeats += 1;
    if came_back {
        s.changed_for_scheduler();
        s.touch_node(name);
    }
    s.nodes.insert(name.to_string(), node);
    Ok((acked, readings))
}

/// What the report of a remote replica's GPU server on `node` changes: once it runs, the
/// replica's program may start; if it ends while the replica runs, the replica's device is gone.
fn device_status(job: &mut Job, index: u32, st: &ReplicaStatus, node: &str) -> Vec<Note> {
    let Some(r) = job.replicas.iter_mut().find(|r| r.index == index) else {
        return Vec::new();
    };
    if r.phase.is_done() {
        return Vec::new();
    }
    match st.phase {
        RunPhase::Running if !r.gpu_serving && job.stop.is_none() => {
            r.gpu_serving = true;
            vec![(
                EventKind::Replica,
                format!("replica {index}'s GPU server started on {node}"),
            )]
        }
        RunPhase::Exited if r.gpu_serving || job.stop.is_none() => {
            let why = if st.message.is_empty() {
                "it exited".to_string()
            } else {
                st.message.clone()
            };
            server_ended(job, index, node, &why)
        }
        _ => Vec::new(),
    }
}

/// Writes in the audit log that a remote GPU attachment of `job` lost one of its halves.
fn audit_attachment(
    c: &crate::store::Write,
    now: u64,
    job: &Job,
    what: &str,
) -> Result<(), ApiError> {
    super::audit::record(
        c,
        now,
        "controller",
        "remote-gpu-lost",
        Some(job.project()),
        Some(job.id),
        what,
    )?;
    Ok(())
}

/// A remote replica's GPU server on `node` ended while the replica was to run: its program has
/// no device any more, so the job stops and is queued again (resuming from its checkpoint)
/// without using a restart of its own. (Of a job already stopping, it is only said.)
fn server_ended(job: &mut Job, index: u32, node: &str, why: &str) -> Vec<Note> {
    if let Some(r) = job.replicas.iter_mut().find(|r| r.index == index) {
        // Not to be sent again: it serves no more.
        r.gpu_serving = false;
    }
    let why = format!("replica {index}'s GPU server on {node} ended ({why})");
    if job.stop.is_none() {
        job.stop = Some(Box::new(StopCause::Interrupted {
            replica: index,
            why: why.clone(),
        }));
    }
    vec![(EventKind::Replica, why)]
}

/// Keeps the latest use of replicas still running (an exit carries the final energy count; read
/// when their run ends, see `usage::ended`) and their idle time: each reading's GPU share counts
/// idle until the next while under the project's threshold. A remote replica's use is its two
/// halves': the device's readings from its GPU server's report, the CPU and memory from its
/// program's. Returns each running replica's use as now known, for telemetry.
fn record_use(s: &mut State, statuses: &[ReplicaStatus], now: u64) -> Readings {
    let mut readings = Vec::new();
    for st in statuses {
        let Some(u) = &st.usage else { continue };
        let Some(((job, attempt, index), device_half)) = parse_either_key(&st.key) else {
            continue;
        };
        let Some(j) = s.jobs.get(&job).filter(|j| j.attempt == attempt) else {
            continue;
        };
        let Some(r) = j
            .replicas
            .iter()
            .find(|r| r.index == index && !r.phase.is_done())
        else {
            continue;
        };
        let replica_key = j.key(index);
        let remote = r.gpu_node.is_some();
        if remote && !device_half {
            // The program's half: no device on its node; its CPU and memory only.
            let e = s
                .replica_usage
                .entry(replica_key)
                .or_insert_with(|| ReplicaUsage {
                    gpu_util_pct: 0.0,
                    gpu_memory_bytes: 0,
                    energy_mj: 0,
                    ..u.clone()
                });
            e.cpu_pct = u.cpu_pct;
            e.memory_bytes = u.memory_bytes;
            if st.phase == RunPhase::Running {
                readings.push((job, index, e.clone()));
            }
            continue;
        }
        let milli = r.gpu_milli();
        let threshold = s.projects.get(j.project()).map_or(
            crate::state::ProjectPolicy::DEFAULT_IDLE_THRESHOLD_PCT,
            |p| p.policy.idle_threshold(),
        );
        let c = s.replica_idle.entry(replica_key.clone()).or_default();
        if c.last_at > 0 && milli > 0 && c.last_util_pct < threshold {
            // A gap in the readings counts at most a minute.
            c.idle_gpu_milli_ms += milli * now.saturating_sub(c.last_at).min(60_000);
        }
        c.last_at = now;
        c.last_util_pct = u.gpu_util_pct;
        let mut merged = u.clone();
        if device_half {
            // The server's own CPU and memory are not the program's.
            let (cpu_pct, memory_bytes) = s
                .replica_usage
                .get(&replica_key)
                .map_or((0.0, 0), |e| (e.cpu_pct, e.memory_bytes));
            merged.cpu_pct = cpu_pct;
            merged.memory_bytes = memory_bytes;
        }
        if st.phase == RunPhase::Running {
            readings.push((job, index, merged.clone()));
        }
        s.replica_usage.insert(replica_key, merged);
    }
    readings
}

/// The jobs that node `name`, silent for `silent_ms`, loses: their replicas on it (programs, or
/// remote replicas' devices) are lost, and each job stops to be queued again.
fn lose_node(s: &State, name: &str, silent_ms: u64, now: u64) -> Vec<(Job, Vec<Note>)> {
    let mut changed = Vec::new();
    for job in s.jobs_on(name) {
        // A remote replica is lost with either of its nodes.
        if !job
            .replicas
            .iter()
            .any(|r| r.is_on(name) && !r.phase.is_done())
        {
            continue;
        }
        let mut job = job.clone();
        for r in job
            .replicas
            .iter_mut()
            .filter(|r| r.is_on(name) && !r.phase.is_done())
        {
            r.phase = ReplicaPhase::Lost;
            r.finished_ms = Some(now);
        }
        let mut notes = vec![(
            EventKind::NodeLost,
            format!(
                "node {name} missed heartbeats for {silent_ms} ms; its agent has stopped the \
                 replicas there"
            ),
        )];
        if job.stop.is_none() {
            job.stop = Some(Box::new(StopCause::NodeLost {
                node: name.to_string(),
            }));
        }
        notes.extend(settle(&mut job, now));
        changed.push((job, notes));
    }
    changed
}

/// Marks nodes unheard-from for longer than lease + grace as lost, and requeues their work.
/// Returns when the next node would expire.
pub async fn expire_leases(ctl: &Ctl) -> Option<u64> {
    let lease = ctl.config.lease.as_millis() as u64;
    let grace = lease / 2;
    let now = now_ms();
    let (expired, next): (Vec<String>, Option<u64>) = ctl.store.read(|s| {
        let mut expired = Vec::new();
        let mut next: Option<u64> = None;
        for (name, n) in &s.nodes {
            if n.health != NodeHealth::Ready {
                continue;
            }
            let deadline = n.last_seen_ms + lease + grace;
            if deadline <= now {
                expired.push(name.clone());
            } else {
                next = Some(next.map_or(deadline, |x| x.min(deadline)));
            }
        }
        (expired, next)
    });
    for name in expired {
        let result = ctl
            .store
            .write(move |c, s| -> Result<(), ApiError> {
                let now = c.now_ms;
                let Some(mut node) = s.nodes.get(&name).cloned() else {
                    return Ok(());
                };
                // Heard from in the meantime: not lost.
                if node.health != NodeHealth::Ready || node.last_seen_ms + lease + grace > now {
                    return Ok(());
                }
                node.health = NodeHealth::Lost;
                c.put_node(&node)?;
                let changed = lose_node(s, &name, now - node.last_seen_ms, now);
                for (job, notes) in changed {
                    let attached = s.jobs.get(&job.id).is_some_and(|old| {
                        old.replicas
                            .iter()
                            .any(|r| r.gpu_node.is_some() && r.is_on(&name) && !r.phase.is_done())
                    });
                    if attached {
                        let what = format!(
                            "a remote GPU attachment lost node {name}; the job is queued again"
                        );
                        audit_attachment(c, now, &job, &what)?;
                    }
                    save_job(c, s, job, notes, now)?;
                }
                s.nodes.insert(name.clone(), node);
                s.touch_node(&name);
                s.changed_for_scheduler();
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("marking a node lost failed: {}", e.message);
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DeviceSample, NodeSample, ReplicaUsage};
    use crate::state::{JobState, Replica, StopCause};
    use crate::testkit::{alloc, job, node};
    use tessera_sched::ResourceRequest;

    /// Nodes a (ready) and b (lost); job 1 runs replica 0 on a and replica 1 on b, job 2 is
    /// stopping on a, job 3 has a replica on a that is leaving.
    fn pool() -> State {
        let mut s = State::default();
        s.nodes
            .insert("a".into(), node("a", NodeHealth::Ready, false));
        s.nodes
            .insert("b".into(), node("b", NodeHealth::Lost, false));
        let running = |id, nodes: &[&str]| {
            let mut j = job(id, ResourceRequest::default());
            j.state = JobState::Running;
            j.attempt = 2;
            j.def.spec.replicas = nodes.len() as u32;
            j.replicas = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Replica::assigned(i as u32, n, &alloc(0)))
                .collect();
            j
        };
        s.insert_job(running(1, &["a", "b"]));
        let mut stopping = running(2, &["a"]);
        stopping.stop = Some(Box::new(StopCause::Preempt {
            for_job: 9,
            reason: "room".into(),
        }));
        s.insert_job(stopping);
        let mut leaving = running(3, &["a", "a"]);
        leaving.replicas[1].leaving = true;
        s.insert_job(leaving);
        s.users.insert(
            "ana".into(),
            crate::state::User {
                name: "ana".into(),
                role: crate::state::Role::Member,
                created_ms: 0,
                uid: Some(4242),
            },
        );
        s
    }

    #[test]
    fn a_node_is_told_only_its_own_replicas_of_jobs_that_are_not_stopping() {
        let s = pool();
        let (_, told) = desired(&s, b"key", "a");
        let keys: Vec<String> = told.iter().map(|a| a.key.clone()).collect();
        assert_eq!(keys, [s.jobs[&1].key(0), s.jobs[&3].key(0)]);
        assert!(
            told.iter().all(|a| a.uid == Some(4242)),
            "the owner's mapped uid"
        );
        assert_eq!((told[0].replicas, told[0].attempt), (2, 2));
        // A lost node is told nothing: its work is judged elsewhere.
        assert!(desired(&s, b"key", "b").1.is_empty());
        assert!(desired(&s, b"key", "nowhere").1.is_empty());
    }

    #[test]
    fn an_agent_speaks_only_for_the_replicas_of_its_own_node() {
        let s = pool();
        let on_a = s.jobs[&1].key(0);
        let on_b = s.jobs[&1].key(1);
        assert!(reportable(&s, "a", &on_a));
        assert!(
            !reportable(&s, "a", &on_b),
            "a's agent cannot report b's replica"
        );
        assert!(!reportable(&s, "b", &on_a));
        // Keys of no current replica (an earlier attempt, an ended or unknown job) are not
        // forgeries: the report is stale and judged as such.
        let mut earlier = s.jobs[&1].clone();
        earlier.attempt = 1;
        assert!(reportable(&s, "b", &earlier.key(0)));
        assert!(reportable(&s, "a", "not a key"));
    }

    /// Adds GPU node c (at 10.0.0.3) and job 7, whose one replica runs its program on a and has
    /// half of c's device 1 attached, its server's port reserved on c.
    fn attached(s: &mut State) {
        let mut c = node("c", NodeHealth::Ready, false);
        c.address = "http://10.0.0.3:7000".into();
        s.nodes.insert("c".into(), c);
        let mut j = job(7, ResourceRequest::default());
        j.state = JobState::Scheduled;
        j.attempt = 1;
        let mut r = Replica::assigned(0, "a", &alloc(0));
        r.devices = vec![tessera_sched::DeviceShare {
            device: 1,
            milli: 500,
            memory_bytes: 40 << 30,
        }];
        r.gpu_node = Some("c".into());
        r.gpu_port = Some(29_501);
        j.replicas = vec![r];
        s.insert_job(j);
    }

    #[test]
    fn a_remote_replica_runs_its_gpu_server_first_then_its_program_attached_to_it() {
        let mut s = pool();
        attached(&mut s);
        let ours = |node: &str, s: &State| -> Vec<Assignment> {
            desired(s, b"key", node)
                .1
                .into_iter()
                .filter(|a| a.job_id == 7)
                .collect()
        };
        let on_c = ours("c", &s);
        assert_eq!(on_c.len(), 1, "{on_c:?}");
        let server = &on_c[0];
        assert_eq!(server.key, s.jobs[&7].device_key(0));
        // Nothing of the job's own runs beside the device: no command, environment, image,
        // volumes or checkpoint; the devices are the replica's, on the node's own address.
        assert!(server.command.is_empty() && server.env.is_empty() && server.image.is_none());
        assert!(server.volumes.is_empty() && server.checkpoint.is_none());
        assert_eq!(server.devices, s.jobs[&7].replicas[0].devices);
        assert_eq!(server.device_memory, [80 << 30, 80 << 30]);
        assert_eq!(
            (server.cpu_milli, server.memory_bytes),
            (SERVER_CPU_MILLI, SERVER_MEMORY_BYTES)
        );
        let serve = server.serves_device.clone().unwrap();
        assert_eq!(serve.address, "10.0.0.3:29501");
        assert!(server.remote_device.is_none());
        assert!(
            ours("a", &s).is_empty(),
            "the program waits for its GPU server"
        );

        // The server runs: the program is sent, attached to it with the same secret.
        let mut j = (*s.jobs[&7]).clone();
        let mut st = status(&j.device_key(0), RunPhase::Running);
        assert_eq!(device_status(&mut j, 0, &st, "c").len(), 1);
        assert!(j.replicas[0].gpu_serving);
        s.insert_job(j.clone());
        let on_a = ours("a", &s);
        assert_eq!(on_a.len(), 1, "{on_a:?}");
        let program = &on_a[0];
        assert_eq!(program.key, j.key(0));
        assert!(program.serves_device.is_none());
        let remote = program.remote_device.clone().unwrap();
        assert_eq!(remote.address, "10.0.0.3:29501");
        assert_eq!(remote.secret, serve.secret);
        assert_eq!(
            remote.secret,
            crate::auth::attachment_secret(b"key", &j.key(0))
        );
        assert_ne!(
            remote.secret,
            crate::auth::attachment_secret(b"another pool's key", &j.key(0))
        );
        let mut next = j.clone();
        next.attempt += 1;
        assert_ne!(
            remote.secret,
            crate::auth::attachment_secret(b"key", &next.key(0)),
            "each attempt has its own secret"
        );
        assert_eq!(program.devices, j.replicas[0].devices);
        assert_eq!(
            program.device_memory,
            [80 << 30, 80 << 30],
            "the device node's"
        );
        assert_eq!(ours("c", &s).len(), 1, "the server keeps running");

        // The server ends under a running replica: the job stops, to be queued again.
        st.phase = RunPhase::Exited;
        st.message = "killed by signal 9".into();
        let notes = device_status(&mut j, 0, &st, "c");
        assert!(notes[0].1.contains("GPU server on c ended"), "{notes:?}");
        assert!(matches!(
            j.stop.as_deref(),
            Some(StopCause::Interrupted { replica: 0, .. })
        ));
        // Once stopping, later reports of its server change nothing.
        assert!(device_status(&mut j, 0, &st, "c").is_empty());
        s.insert_job(j);
        assert!(ours("a", &s).is_empty() && ours("c", &s).is_empty());
    }

    #[test]
    fn a_stopping_remote_replica_keeps_its_gpu_server_until_its_program_has_ended() {
        let mut s = pool();
        attached(&mut s);
        let mut j = (*s.jobs[&7]).clone();
        j.state = JobState::Running;
        j.replicas[0].phase = ReplicaPhase::Running;
        j.replicas[0].gpu_serving = true;
        // Preempted: the program is stopped through its checkpoint, which needs the device.
        j.stop = Some(Box::new(StopCause::Preempt {
            for_job: 9,
            reason: "room".into(),
        }));
        s.insert_job(j.clone());
        let on = |node: &str, s: &State| -> Vec<String> {
            desired(s, b"key", node)
                .1
                .into_iter()
                .filter(|a| a.job_id == 7)
                .map(|a| a.key)
                .collect()
        };
        assert!(on("a", &s).is_empty(), "the program is stopped");
        assert_eq!(on("c", &s), [j.device_key(0)], "its server stays");
        // Its server ends meanwhile: said, and not sent again.
        let mut st = status(&j.device_key(0), RunPhase::Exited);
        st.message = "killed".into();
        let mut ended = j.clone();
        assert_eq!(device_status(&mut ended, 0, &st, "c").len(), 1);
        assert!(!ended.replicas[0].gpu_serving);
        assert!(
            matches!(ended.stop.as_deref(), Some(StopCause::Preempt { .. })),
            "the cause stays"
        );
        assert!(
            device_status(&mut ended, 0, &st, "c").is_empty(),
            "said once"
        );
        // The program has ended: the server goes too.
        j.replicas[0].phase = ReplicaPhase::Exited;
        s.insert_job(j.clone());
        assert!(on("c", &s).is_empty());
        // A server that never started is not started for a job already stopping.
        j.replicas[0].phase = ReplicaPhase::Assigned;
        j.replicas[0].gpu_serving = false;
        s.insert_job(j);
        assert!(on("c", &s).is_empty());
    }

    #[test]
    fn only_the_device_node_speaks_for_a_gpu_server_and_both_nodes_hold_the_job() {
        let mut s = pool();
        attached(&mut s);
        let j = &s.jobs[&7];
        assert!(reportable(&s, "c", &j.device_key(0)));
        assert!(!reportable(&s, "a", &j.device_key(0)), "a runs the program");
        assert!(!reportable(&s, "c", &j.key(0)), "c runs the server");
        assert!(reportable(&s, "a", &j.key(0)));
        assert_eq!(
            crate::state::parse_device_key(&j.device_key(0)),
            Some((7, 1, 0))
        );
        assert_eq!(crate::state::parse_key(&j.device_key(0)), None);
        for n in ["a", "c"] {
            assert!(s.jobs_on(n).any(|j| j.id == 7), "job 7 is on {n}");
        }
    }

    #[test]
    fn a_remote_replica_is_lost_with_either_of_its_nodes() {
        for lost in ["a", "c"] {
            let mut s = pool();
            attached(&mut s);
            let mut j = (*s.jobs[&7]).clone();
            j.state = JobState::Running;
            j.replicas[0].phase = ReplicaPhase::Running;
            j.replicas[0].gpu_serving = true;
            s.insert_job(j);
            let changed = lose_node(&s, lost, 5_000, 10_000);
            let (job, notes) = changed
                .iter()
                .find(|(j, _)| j.id == 7)
                .unwrap_or_else(|| panic!("losing {lost} loses job 7: {changed:?}"));
            assert!(
                notes[0].1.contains(&format!("node {lost} missed")),
                "{notes:?}"
            );
            // Queued again: the other node's agent stops its half, which is no longer wanted.
            assert_eq!(job.state, JobState::Pending, "{notes:?}");
            s.insert_job(job.clone());
            let other = if lost == "a" { "c" } else { "a" };
            assert!(!desired(&s, b"key", other).1.iter().any(|a| a.job_id == 7));
        }
        // A node that holds neither half loses nothing of it.
        let mut s = pool();
        attached(&mut s);
        s.nodes
            .insert("d".into(), node("d", NodeHealth::Ready, false));
        assert!(lose_node(&s, "d", 5_000, 10_000).is_empty());
    }

    #[test]
    fn a_remote_replicas_use_is_its_devices_from_the_server_and_its_cpu_from_the_program() {
        let usage = |gpu: f64, cpu: f64, energy: u64| ReplicaUsage {
            gpu_util_pct: gpu,
            gpu_memory_bytes: if gpu > 0.0 { 2 << 30 } else { 0 },
            cpu_pct: cpu,
            memory_bytes: if gpu > 0.0 { 300 << 20 } else { 1 << 30 },
            energy_mj: energy,
            simulated: true,
        };
        for device_first in [true, false] {
            let mut s = pool();
            attached(&mut s);
            let mut j = (*s.jobs[&7]).clone();
            j.state = JobState::Running;
            j.replicas[0].phase = ReplicaPhase::Running;
            j.replicas[0].gpu_serving = true;
            s.insert_job(j.clone());
            let mut program = status(&j.key(0), RunPhase::Running);
            program.usage = Some(usage(0.0, 150.0, 0));
            let mut server = status(&j.device_key(0), RunPhase::Running);
            server.usage = Some(usage(80.0, 40.0, 5_000));
            // The program's node has no device: a long run of its readings alone is not idle
            // time of the replica's GPU.
            record_use(&mut s, std::slice::from_ref(&program), 1_000);
            record_use(&mut s, std::slice::from_ref(&program), 50_000);
            assert_eq!(
                s.replica_idle
                    .get(&j.key(0))
                    .map_or(0, |c| c.idle_gpu_milli_ms),
                0
            );
            let both = if device_first {
                vec![server.clone(), program.clone()]
            } else {
                vec![program.clone(), server.clone()]
            };
            let readings = record_use(&mut s, &both, 60_000);
            let u = &s.replica_usage[&j.key(0)];
            assert_eq!(
                (u.gpu_util_pct, u.gpu_memory_bytes, u.energy_mj),
                (80.0, 2 << 30, 5_000),
                "the device's, from its server"
            );
            assert_eq!(
                (u.cpu_pct, u.memory_bytes),
                (150.0, 1 << 30),
                "the program's"
            );
            assert!(!s.replica_usage.contains_key(&j.device_key(0)));
            assert_eq!(s.replica_idle[&j.key(0)].last_util_pct, 80.0);
            assert_eq!(
                readings.last().unwrap().2,
                *u,
                "telemetry sees the whole replica"
            );
        }
    }

    fn status(key: &str, phase: RunPhase) -> ReplicaStatus {
        ReplicaStatus::new(key, phase)
    }

    fn sync(seq: u64) -> SyncRequest {
        SyncRequest {
            seq,
            revision: 0,
            statuses: vec![],
            wait_ms: 1000,
            sample: None,
            images: vec![],
        }
    }

    fn device(index: u32, util_pct: f64) -> DeviceSample {
        DeviceSample {
            index,
            util_pct,
            memory_used_bytes: 1,
            memory_total_bytes: 2,
            power_mw: 0,
        }
    }

    #[test]
    fn impossible_reports_are_refused_by_field() {
        let now = 1_000_000;
        let field = |r: &SyncRequest| check_sync(r, 2, now).err().and_then(|e| e.field);
        assert_eq!(field(&sync(now * 1000)), None, "a sound report passes");
        assert_eq!(field(&sync(u64::MAX)).as_deref(), Some("seq"));
        let sampled = |devices| SyncRequest {
            sample: Some(NodeSample {
                at_ms: now,
                simulated: true,
                devices,
            }),
            ..sync(1)
        };
        let twice = sampled(vec![device(0, 5.0), device(0, 5.0)]);
        assert_eq!(field(&twice).as_deref(), Some("sample.devices.index"));
        let beyond = sampled(vec![device(2, 5.0)]);
        assert_eq!(field(&beyond).as_deref(), Some("sample.devices.index"));
        let busy = sampled(vec![device(1, 101.0)]);
        assert_eq!(field(&busy).as_deref(), Some("sample.devices"));
        assert_eq!(
            field(&sampled(vec![device(0, 5.0), device(1, 100.0)])),
            None
        );
        let usage = ReplicaUsage {
            gpu_util_pct: f64::NAN,
            gpu_memory_bytes: 0,
            cpu_pct: 10.0,
            memory_bytes: 0,
            energy_mj: 0,
            simulated: true,
        };
        let status = ReplicaStatus {
            key: "k".into(),
            phase: crate::protocol::RunPhase::Running,
            exit_code: None,
            interrupted: false,
            message: String::new(),
            resume_failed: None,
            port: None,
            usage: Some(usage),
            image: None,
        };
        let nan = SyncRequest {
            statuses: vec![status],
            ..sync(1)
        };
        assert_eq!(field(&nan).as_deref(), Some("statuses.usage"));
    }
}
