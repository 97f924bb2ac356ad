//! A job's output: read from the agents that ran it, by replica, attempt, offset and time.

use super::*;

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
    // The current attempt, or the last one that ran; where an earlier attempt ran is in the
    // job's events (read from the store).
    let (attempt, current) = ctl.store.read(|s| {
        let job = visible_job(s, &caller, id)?;
        // An elastic job's replicas are numbered on as it grows.
        if job.def.elastic.is_none() && replica >= job.def.spec.replicas {
            return Err(ApiError::bad(format!(
                "replica {replica}: job {id} has replicas 0 to {}",
                job.def.spec.replicas - 1
            )));
        }
        let attempt = q.attempt.unwrap_or(job.attempt);
        if attempt == 0 {
            return Err(ApiError::conflict(format!(
                "job {id} has not started yet, so it has no output; see `tessera describe job {id}`"
            )));
        }
        let current = job
            .replicas
            .iter()
            .find(|r| r.index == replica && attempt == job.attempt)
            .map(|r| (r.node.clone(), r.phase.is_done() || job.state.is_final()));
        Ok((attempt, current))
    })?;
    let (node, replica_done) = match current {
        Some(found) => found,
        None => {
            let events = ctl
                .store
                .read_ledger("events", move |l| {
                    l.events(id, crate::state::EVENTS_PER_JOB as u64)
                })
                .await
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            let node = last_node_of(&events, attempt, replica).ok_or_else(|| {
                ApiError::not_found(format!(
                    "no record of where replica {replica} of job {id} (attempt {attempt}) ran"
                ))
            })?;
            (node, true)
        }
    };
    let (key, address, secret) = ctl.store.read(|s| {
        let n = s
            .nodes
            .get(&node)
            .ok_or_else(|| ApiError::not_found(format!("node {node} is gone")))?;
        Ok::<_, ApiError>((
            format!("{id}.{attempt}.{replica}"),
            n.address.clone(),
            crate::auth::callback_secret(&ctl.callback_key, &node),
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
pub(super) fn last_node_of(
    events: &[crate::state::Event],
    attempt: u32,
    replica: u32,
) -> Option<String> {
    let prefix = format!("attempt {attempt}: replica {replica} on ");
    events.iter().find_map(|e| {
        e.message
            .split("; ")
            .find_map(|part| part.strip_prefix(&prefix))
            .map(|n| n.split_whitespace().next().unwrap_or_default().to_string())
    })
}
