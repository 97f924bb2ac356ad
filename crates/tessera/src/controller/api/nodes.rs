//! Nodes: list, get, cordon, uncordon, drain, replace.

use super::*;

/// What a node's labels say about its checkpoints (its agent sets them).
pub(super) fn checkpoint_kinds(labels: &BTreeMap<String, String>) -> Vec<String> {
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

pub(super) fn node_view(s: &State, name: &str) -> Option<NodeView> {
    let n = s.nodes.get(name)?;
    let mut used = vec![0u32; n.spec.devices.len()];
    let (mut cpu, mut replicas) = (0, 0);
    for j in s.jobs_on(name) {
        for r in j
            .replicas
            .iter()
            .filter(|r| r.is_on(name) && !r.phase.is_done())
        {
            if r.node == name {
                replicas += 1;
                cpu += r.cpu_milli;
            }
            if r.device_node() != name {
                continue;
            }
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

pub async fn list_nodes<R: Reader>(
    AxState(reader): AxState<Arc<R>>,
    caller: Caller,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    caller.user()?;
    Ok(Json(reader.read(|s| {
        s.nodes.keys().filter_map(|n| node_view(s, n)).collect()
    })))
}

pub async fn get_node<R: Reader>(
    AxState(reader): AxState<Arc<R>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    caller.user()?;
    reader
        .read(|s| node_view(s, &name))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {name}; see `tessera nodes`")))
}

pub(super) async fn set_cordon(
    ctl: &crate::controller::Ctl,
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
            crate::controller::audit::record(
                c,
                now,
                &admin,
                action,
                None,
                None,
                &format!("node {n}"),
            )?;
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
                        .any(|r| r.is_on(&n) && !r.phase.is_done())
                    {
                        let mut job = job.clone();
                        job.stop = Some(Box::new(StopCause::Drain { node: n.clone() }));
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
            s.changed_for_scheduler();
            Ok(())
        })
        .await?;
    node_answer(ctl, &name)
}

/// The node as an answer to an admin action on it.
pub(super) fn node_answer(
    ctl: &crate::controller::Ctl,
    name: &str,
) -> Result<Json<NodeView>, ApiError> {
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
            crate::controller::audit::record(
                c,
                c.now_ms,
                &admin,
                "node-replace",
                None,
                None,
                &detail,
            )?;
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
