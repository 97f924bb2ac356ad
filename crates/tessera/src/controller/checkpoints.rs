//! Checkpoints: agents upload a replica's checkpoint as content-addressed chunks (only the chunks
//! the controller lacks travel) and a manifest of its files; a restarted replica is told the
//! latest complete one, and its agent fetches and verifies it.
//!
//! Chunks are content-addressed blobs named by their SHA-256 (see [`crate::store::blobs`]: files
//! beside a SQLite store, rows of the database on PostgreSQL). Manifests are in the store; one is
//! accepted only when every chunk it names is present.

use axum::Json;
use axum::body::Bytes;
use axum::extract::Path as AxPath;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ApiError, AxState, Caller, S, now_ms};
use crate::auth::Principal;
use crate::state::{CheckpointManifest, Event};

fn agent(caller: &Caller) -> Result<&str, ApiError> {
    match &caller.0 {
        Principal::Agent { node } => Ok(node),
        _ => Err(ApiError::forbidden("only agents move checkpoints")),
    }
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Runs a call of the blob store off the async threads.
async fn blobs<T: Send + 'static>(
    ctl: &super::Ctl,
    call: impl FnOnce(&dyn crate::store::blobs::Blobs) -> crate::store::StoreResult<T> + Send + 'static,
) -> Result<T, ApiError> {
    let blobs = ctl.blobs.clone();
    match tokio::task::spawn_blocking(move || call(blobs.as_ref())).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.disk_full => Err(ApiError::new(
            axum::http::StatusCode::INSUFFICIENT_STORAGE,
            format!("storing checkpoints: {}", e.message),
        )),
        Ok(Err(e)) if e.unavailable => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the checkpoint store cannot be reached ({}); retry",
                e.message
            ),
        )),
        Ok(Err(e)) => Err(ApiError::internal(format!(
            "checkpoint chunks: {}",
            e.message
        ))),
        Err(_) => Err(ApiError::internal("the checkpoint chunk store failed")),
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hashes {
    pub hashes: Vec<String>,
}

/// Which of these chunks the controller does not have yet.
pub async fn missing(
    AxState(ctl): S,
    caller: Caller,
    Json(req): Json<Hashes>,
) -> Result<Json<Hashes>, ApiError> {
    agent(&caller)?;
    if let Some(bad) = req.hashes.iter().find(|h| !valid_hash(h)) {
        return Err(ApiError::bad(format!(
            "hashes: {bad} is not a SHA-256 in lower-case hex"
        )));
    }
    let missing = blobs(&ctl, move |b| b.missing(req.hashes)).await?;
    Ok(Json(Hashes { hashes: missing }))
}

/// Stores one chunk, after checking that it is what its name says.
pub async fn put_chunk(
    AxState(ctl): S,
    caller: Caller,
    AxPath(hash): AxPath<String>,
    body: Bytes,
) -> Result<axum::http::StatusCode, ApiError> {
    agent(&caller)?;
    if !valid_hash(&hash) {
        return Err(ApiError::bad(format!(
            "{hash} is not a SHA-256 in lower-case hex"
        )));
    }
    if hex::encode(Sha256::digest(&body)) != hash {
        return Err(ApiError::bad(format!(
            "chunk {hash}: the body's SHA-256 differs (damaged in transit); send it again"
        )));
    }
    blobs(&ctl, move |b| b.put(&hash, &body)).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

pub async fn get_chunk(
    AxState(ctl): S,
    caller: Caller,
    AxPath(hash): AxPath<String>,
) -> Result<Bytes, ApiError> {
    agent(&caller)?;
    if !valid_hash(&hash) {
        return Err(ApiError::bad(format!(
            "{hash} is not a SHA-256 in lower-case hex"
        )));
    }
    let wanted = hash.clone();
    match blobs(&ctl, move |b| b.get(&wanted)).await? {
        Some(b) => Ok(Bytes::from(b)),
        None => Err(ApiError::not_found(format!("no chunk {hash}"))),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Saved {
    pub id: String,
}

/// Records a replica's complete checkpoint: durable before the answer, and only if every chunk
/// it names is stored.
pub async fn put_checkpoint(
    AxState(ctl): S,
    caller: Caller,
    body: Bytes,
) -> Result<Json<Saved>, ApiError> {
    let node = agent(&caller)?.to_string();
    let mut m: CheckpointManifest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("manifest: {e}")))?;
    for f in &m.files {
        if f.path.is_empty() || f.path.starts_with('/') || f.path.split('/').any(|p| p == "..") {
            return Err(ApiError::bad(format!(
                "files.path {}: must be relative, inside the checkpoint",
                f.path
            )));
        }
        if let Some(h) = f.chunks.iter().find(|h| !valid_hash(h)) {
            return Err(ApiError::bad(format!(
                "files.chunks: {h} of {} is not a SHA-256 in lower-case hex",
                f.path
            )));
        }
    }
    let named: Vec<String> = m
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let missing = blobs(&ctl, move |b| b.missing(named)).await?;
    if let Some(h) = missing.first() {
        let path = m
            .files
            .iter()
            .find(|f| f.chunks.contains(h))
            .map_or("?", |f| f.path.as_str());
        return Err(ApiError::bad(format!(
            "files.chunks: chunk {h} of {path} is not stored; upload it first"
        )));
    }
    let files = serde_json::to_vec(&m.files).map_err(|e| ApiError::internal(e.to_string()))?;
    m.id = hex::encode(Sha256::digest(&files));
    m.created_ms = now_ms();
    let saved = m.id.clone();
    ctl.store
        .write(move |c, s| -> Result<(), ApiError> {
            let Some(job) = s.jobs.get(&m.job) else {
                return Err(ApiError::not_found(format!("no job {}", m.job)));
            };
            let here = job
                .replicas
                .iter()
                .any(|r| r.index == m.replica && r.node == node);
            if job.attempt != m.attempt || !here {
                return Err(ApiError::conflict(format!(
                    "replica {} of job {} attempt {} does not run on {node}",
                    m.replica, m.job, m.attempt
                )));
            }
            c.put_checkpoint(&m)?;
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            let e = Event {
                job: m.job,
                ts_ms: m.created_ms,
                kind: crate::state::EventKind::Checkpoint,
                message: format!(
                    "replica {} saved checkpoint {} ({} files, {} bytes)",
                    m.replica,
                    &m.id[..12],
                    m.files.len(),
                    bytes
                ),
            };
            c.add_event(&e)?;
            s.checkpoints.insert((m.job, m.replica), m);
            Ok(())
        })
        .await?;
    Ok(Json(Saved { id: saved }))
}

pub async fn get_checkpoint(
    AxState(ctl): S,
    caller: Caller,
    AxPath(id): AxPath<String>,
) -> Result<Json<CheckpointManifest>, ApiError> {
    let node = agent(&caller)?;
    // Only the agent of a node that runs the checkpoint's replica may read it.
    ctl.store
        .read(|s| {
            s.checkpoints
                .values()
                .find(|m| m.id == id)
                .filter(|m| {
                    s.jobs.get(&m.job).is_some_and(|j| {
                        j.replicas
                            .iter()
                            .any(|r| r.index == m.replica && r.node == node)
                    })
                })
                .cloned()
        })
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {id} for a replica on {node}")))
}
