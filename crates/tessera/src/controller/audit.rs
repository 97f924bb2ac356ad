//! The audit log: every placement, preemption, move, resize, policy decision and admin action,
//! written in the same commit as the decision (a refused request in its own), and queryable by
//! time, project, job and action.

use axum::Json;
use axum::extract::Query;
use rusqlite::{Connection, params};
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
    c: &Connection,
    ts_ms: u64,
    actor: &str,
    action: &str,
    project: Option<&str>,
    job: Option<u64>,
    detail: &str,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO audit (ts_ms, actor, action, project, job, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![ts_ms as i64, actor, action, project, job.map(|j| j as i64), detail],
    )?;
    Ok(())
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
            record(c, now_ms(), &actor, "deny", Some(&project), job, &detail)?;
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
    let entries = super::read_store(&ctl, "audit log", move |c| {
        let mut stmt = c.prepare(
            "SELECT seq, ts_ms, actor, action, project, job, detail FROM audit
             WHERE ts_ms >= ?1 AND ts_ms <= ?2
               AND (?3 IS NULL OR project = ?3)
               AND (?4 IS NULL OR job = ?4)
               AND (?5 IS NULL OR action = ?5)
             ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map(
            params![
                window.since_ms as i64,
                window.until_ms as i64,
                q.project,
                q.job.map(|j| j as i64),
                q.action
            ],
            |r| {
                Ok(Entry {
                    seq: r.get::<_, i64>(0)? as u64,
                    ts_ms: r.get::<_, i64>(1)? as u64,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    project: r.get(4)?,
                    job: r.get::<_, Option<i64>>(5)?.map(|j| j as u64),
                    detail: r.get(6)?,
                })
            },
        )?;
        let mut out = Vec::new();
        for e in rows {
            let e = e?;
            // A member sees only entries of the projects they belong to.
            if let Some(v) = &visible
                && !e.project.as_ref().is_some_and(|p| v.contains(p))
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(Json(entries))
}
