//! The audit log: every placement, preemption, move, resize, policy decision and admin action,
//! written in the same commit as the decision (a refused request in its own), and queryable by
//! time, project, job and action.

use axum::Json;
use axum::extract::Query;
use serde::{Deserialize, Serialize};

use super::{ApiError, AxState, Caller, S, now_ms};

/// One decision or action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub ts_ms: u64,
    /// A user's name, `scheduler`, or `controller`.
    pub actor: String,
    /// e.g. `place`, `preempt`, `consolidate`, `migrate`, `grow`, `shrink`, `cancel`, `deny`,
    /// `requeue`, `idle-warning`, `idle-stop`, `cordon`, `drain`, `project-create`, ...
    pub action: String,
    pub project: Option<String>,
    pub job: Option<u64>,
    pub detail: String,
}

/// Records one entry in the current transaction.
pub fn record(
    c: &crate::store::Write,
    ts_ms: u64,
    actor: &str,
    action: &str,
    project: Option<&str>,
    job: Option<u64>,
    detail: &str,
) -> crate::store::StoreResult<()> {
    c.add_audit(&Entry {
        seq: 0,
        ts_ms,
        actor: actor.to_string(),
        action: action.to_string(),
        project: project.map(str::to_string),
        job,
        detail: detail.to_string(),
    })
}

/// Records a refusal in a write of its own: the refused request itself wrote nothing.
pub async fn record_refusal(
    ctl: &super::Ctl,
    actor: String,
    project: String,
    job: Option<u64>,
    detail: String,
) -> Result<(), ApiError> {
    ctl.store
        .write(move |c, _| -> Result<(), ApiError> {
            record(c, c.now_ms, &actor, "deny", Some(&project), job, &detail)?;
            Ok(())
        })
        .await
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub project: Option<String>,
    pub job: Option<u64>,
    pub action: Option<String>,
    pub limit: Option<usize>,
}

/// Most entries one query returns.
const MAX_ENTRIES: usize = 10_000;

/// `GET /v1/audit?since=1d&project=vision&job=12&action=preempt`: newest first. Members see the
/// entries of their projects; admins and viewers see all.
pub async fn get_audit(
    AxState(ctl): S,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<Entry>>, ApiError> {
    let (user, role) = caller.user()?;
    let window = crate::metering::Window::parse(
        Some(q.since.as_deref().unwrap_or("1d")),
        q.until.as_deref(),
        now_ms(),
    )
    .map_err(ApiError::bad)?;
    let visible = ctl.store.read(|s| s.visible_projects(user, role));
    if let (Some(p), Some(v)) = (&q.project, &visible)
        && !v.contains(p)
    {
        return Err(ApiError::not_found(format!(
            "project {p}: no such project among yours"
        )));
    }
    let limit = q.limit.unwrap_or(1000).min(MAX_ENTRIES);
    let filter = crate::store::AuditFilter {
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        project: q.project,
        job: q.job,
        action: q.action,
    };
    let entries = ctl
        .store
        .read_ledger("audit log", move |l| {
            let mut out = Vec::new();
            l.audit(&filter, &mut |e| {
                // A member sees only entries of the projects they belong to.
                let shown = visible
                    .as_ref()
                    .is_none_or(|v| e.project.as_ref().is_some_and(|p| v.contains(p)));
                if shown {
                    out.push(e);
                }
                out.len() < limit
            })?;
            Ok(out)
        })
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(Json(entries))
}
