//! Moving a replica's checkpoint between its run directory and the controller.
//!
//! A checkpoint is complete when the workload has written the file `COMPLETE` into
//! `$TESSERA_CHECKPOINT_DIR` (the Python helper does this last, and removes it before writing the
//! next one). The agent hashes the files in 1 MiB chunks, asks the controller which chunks it
//! lacks, sends only those, then the manifest; a checkpoint whose marker changed while it was
//! being read is not sent (a newer one is being written). On restore it fetches every chunk and
//! checks its SHA-256 before the workload sees a byte.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::state::{CheckpointFile, CheckpointManifest, parse_key};

const CHUNK: usize = 1 << 20;
pub const MARKER: &str = "COMPLETE";

/// How the agent reaches the controller.
#[derive(Clone)]
pub struct Remote {
    pub http: reqwest::Client,
    pub controllers: std::sync::Arc<crate::endpoints::Endpoints>,
    pub token: String,
}

impl Remote {
    /// The controller in use.
    fn base(&self) -> &str {
        self.controllers.current()
    }

    /// An authenticated GET of `path` on the controller; an error status is an error.
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?)
    }
}

#[derive(Deserialize)]
struct Hashes {
    hashes: Vec<String>,
}

#[derive(Deserialize)]
struct Saved {
    id: String,
}

fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The marker's modification time, if the directory holds a complete checkpoint.
pub fn marker_stamp(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir.join(MARKER)).ok()?.modified().ok()
}

/// One chunk of a file: its hash, and where it is (file, offset, length).
type ChunkAt = (String, PathBuf, u64, usize);

/// Hashes every file of the checkpoint in `dir`: the manifest's files, and where each chunk is.
///
/// The directory belongs to the workload, which may swap a file or a directory for a symbolic
/// link while the agent (root) reads it: a file is opened without following links, and only if
/// its owner is the directory's, so nothing the workload could not read itself leaves the node.
fn hash_dir(dir: &Path) -> anyhow::Result<(Vec<CheckpointFile>, Vec<ChunkAt>)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let owner = std::fs::symlink_metadata(dir)?.uid();
    let mut files = Vec::new();
    let mut chunks = Vec::new();
    for path in files_under(dir)? {
        let rel = path
            .strip_prefix(dir)?
            .to_str()
            .context("a checkpoint file name that is not UTF-8")?
            .to_string();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening checkpoint file {rel}"))?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.uid() != owner {
            bail!("checkpoint file {rel} is not a file of the checkpoint's owner; not sent");
        }
        let mut buf = vec![0u8; CHUNK];
        let (mut size, mut hashes) = (0u64, Vec::new());
        loop {
            let mut n = 0;
            while n < CHUNK {
                let r = f.read(&mut buf[n..])?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            if n == 0 {
                break;
            }
            let h = hex::encode(Sha256::digest(&buf[..n]));
            chunks.push((h.clone(), path.clone(), size, n));
            hashes.push(h);
            size += n as u64;
        }
        files.push(CheckpointFile {
            path: rel,
            size,
            chunks: hashes,
        });
    }
    Ok((files, chunks))
}

/// Sends the complete checkpoint in `dir` of replica `key`; `None` when there is none (or it
/// changed while it was read). Returns the checkpoint's id and the bytes that travelled.
pub async fn upload(
    remote: &Remote,
    key: &str,
    dir: &Path,
) -> anyhow::Result<Option<(String, u64)>> {
    let Some(stamp) = marker_stamp(dir) else {
        return Ok(None);
    };
    let Some((job, attempt, replica)) = parse_key(key) else {
        bail!("{key} is not a replica key");
    };
    let d = dir.to_path_buf();
    let (files, chunks) = tokio::task::spawn_blocking(move || hash_dir(&d)).await??;
    if marker_stamp(dir) != Some(stamp) {
        return Ok(None);
    }
    let unique: BTreeSet<&str> = chunks.iter().map(|(h, ..)| h.as_str()).collect();
    let missing: Hashes = remote
        .http
        .post(format!("{}/v1/agent/chunks/missing", remote.base()))
        .bearer_auth(&remote.token)
        .json(&serde_json::json!({ "hashes": unique }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut sent = 0u64;
    let mut done = BTreeSet::new();
    for (hash, path, offset, len) in &chunks {
        if !missing.hashes.contains(hash) || !done.insert(hash.clone()) {
            continue;
        }
        let (p, off, n) = (path.clone(), *offset, *len);
        let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(p)?;
            f.seek(SeekFrom::Start(off))?;
            let mut b = vec![0u8; n];
            f.read_exact(&mut b)?;
            Ok(b)
        })
        .await??;
        sent += bytes.len() as u64;
        remote
            .http
            .put(format!("{}/v1/agent/chunks/{hash}", remote.base()))
            .bearer_auth(&remote.token)
            .body(bytes)
            .send()
            .await?
            .error_for_status()?;
    }
    let manifest = CheckpointManifest {
        id: String::new(),
        job,
        attempt,
        replica,
        files,
        created_ms: 0,
    };
    let saved: Saved = remote
        .http
        .post(format!("{}/v1/agent/checkpoints", remote.base()))
        .bearer_auth(&remote.token)
        .json(&manifest)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(Some((saved.id, sent)))
}

/// Fetches checkpoint `id` into `into`, checking every chunk. An error means the replica must
/// start from the beginning (the message says why).
pub async fn restore(remote: &Remote, id: &str, into: &Path) -> anyhow::Result<()> {
    let m: CheckpointManifest = remote
        .get(&format!("/v1/agent/checkpoints/{id}"))
        .await?
        .json()
        .await?;
    std::fs::create_dir_all(into)?;
    for file in &m.files {
        if file.path.starts_with('/') || file.path.split('/').any(|p| p == "..") {
            bail!("the checkpoint names a file outside itself: {}", file.path);
        }
        let path = into.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&path)?;
        for hash in &file.chunks {
            let bytes = remote
                .get(&format!("/v1/agent/chunks/{hash}"))
                .await?
                .bytes()
                .await?;
            if hex::encode(Sha256::digest(&bytes)) != *hash {
                bail!("chunk {hash} of {} does not match its SHA-256", file.path);
            }
            out.write_all(&bytes)?;
        }
        out.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_of_the_checkpoints_owner_are_read() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "run the tests as root, as the README says (this one changes owners)"
        );
        let dir = tempfile::tempdir().unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), b"the agent's secret").unwrap();
        std::os::unix::fs::chown(dir.path(), Some(200_123), Some(200_123)).unwrap();
        // A workload's link to a file of root's, and a file of root's put in its directory.
        std::os::unix::fs::symlink(secret.path(), dir.path().join("link")).unwrap();
        assert_eq!(
            hash_dir(dir.path()).unwrap().0.len(),
            0,
            "links are not followed"
        );
        std::fs::write(dir.path().join("model"), b"x").unwrap();
        let e = hash_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a file of the checkpoint's owner"), "{e}");
        std::os::unix::fs::chown(dir.path().join("model"), Some(200_123), None).unwrap();
        assert_eq!(hash_dir(dir.path()).unwrap().0.len(), 1);
    }

    #[test]
    fn files_are_hashed_in_chunks_with_their_paths_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("model")).unwrap();
        std::fs::write(dir.path().join("model/weights"), vec![7u8; CHUNK + 10]).unwrap();
        std::fs::write(dir.path().join("COMPLETE"), b"").unwrap();
        let (files, chunks) = hash_dir(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, vec!["COMPLETE", "model/weights"]);
        assert_eq!(files[1].size, CHUNK as u64 + 10);
        assert_eq!(files[1].chunks.len(), 2);
        assert_eq!(files[0].chunks.len(), 0, "an empty file has no chunks");
        assert_eq!(
            files[1].chunks[0],
            hex::encode(Sha256::digest(vec![7u8; CHUNK]))
        );
        assert_eq!(chunks.len(), 2);
        assert!(marker_stamp(dir.path()).is_some());
    }
}
