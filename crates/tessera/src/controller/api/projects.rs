//! Projects: quotas, limits, members and policies.

use super::*;

pub(super) fn project_view(s: &State, p: &Project) -> ProjectView {
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

pub(super) mod double_option {
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

pub(super) fn apply_project_body(
    p: &mut Project,
    b: &ProjectBody,
    s: &State,
) -> Result<(), ApiError> {
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

pub(super) fn apply_policy(
    pol: &mut crate::state::ProjectPolicy,
    b: &ProjectBody,
) -> Result<(), ApiError> {
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
            crate::controller::audit::record(
                c,
                c.now_ms,
                &admin,
                "project-create",
                Some(&name),
                None,
                &serde_json::to_string(&b).unwrap_or_default(),
            )?;
            s.projects.insert(name.clone(), p);
            s.changed_for_scheduler();
            s.projects
                .get(&name)
                .map(|p| project_view(s, p))
                .ok_or_else(|| ApiError::not_found(format!("no project {name}")))
        })
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(view)))
}

pub(super) async fn change_project(
    ctl: &crate::controller::Ctl,
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
            crate::controller::audit::record(
                c,
                c.now_ms,
                &admin,
                "project-update",
                Some(&name),
                None,
                &serde_json::to_string(&b).unwrap_or_default(),
            )?;
            s.projects.insert(name.clone(), p);
            s.changed_for_scheduler();
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
