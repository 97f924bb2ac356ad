//! Checkpoint chunks: content-addressed blobs named by their SHA-256. Beside a SQLite store they
//! are files in the data dir (`blobs/ab/cdef…`, written to a temporary file, synced, renamed, so
//! a chunk on disk is always whole); on PostgreSQL they are rows of the `blobs` table, so that
//! every controller of the pool reads what the one that led before stored. Callers check a
//! chunk's hash before it is put; the calls block (run them off the async threads).

use std::path::PathBuf;

use super::StoreResult;

pub trait Blobs: Send + Sync {
    /// Which of `hashes` are not stored.
    fn missing(&self, hashes: Vec<String>) -> StoreResult<Vec<String>>;
    /// Stores a chunk (nothing happens when it is there already).
    fn put(&self, hash: &str, bytes: &[u8]) -> StoreResult<()>;
    fn get(&self, hash: &str) -> StoreResult<Option<Vec<u8>>>;
}

/// Chunks as files under a directory.
pub struct Dir(pub PathBuf);

impl Dir {
    fn path(&self, hash: &str) -> PathBuf {
        self.0.join(&hash[..2]).join(&hash[2..])
    }
}

fn io(e: std::io::Error) -> super::StoreError {
    let disk_full = e.raw_os_error() == Some(libc::ENOSPC);
    super::StoreError {
        message: format!("the blob area: {e}"),
        disk_full,
        unavailable: false,
    }
}

impl Blobs for Dir {
    fn missing(&self, hashes: Vec<String>) -> StoreResult<Vec<String>> {
        Ok(hashes
            .into_iter()
            .filter(|h| !self.path(h).exists())
            .collect())
    }

    fn put(&self, hash: &str, bytes: &[u8]) -> StoreResult<()> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("a chunk path has a parent");
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(".{}.tmp", &hash[2..]));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn get(&self, hash: &str) -> StoreResult<Option<Vec<u8>>> {
        match std::fs::read(self.path(hash)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdb::PgCluster;
    use super::*;
    use sha2::Digest;

    fn chunk(n: u8) -> (String, Vec<u8>) {
        let bytes = vec![n; 300_000];
        (hex::encode(sha2::Sha256::digest(&bytes)), bytes)
    }

    fn round_trip(blobs: &dyn Blobs) {
        let (a, a_bytes) = chunk(1);
        let (b, _) = chunk(2);
        assert_eq!(
            blobs.missing(vec![a.clone(), b.clone()]).unwrap(),
            [a.clone(), b.clone()]
        );
        assert_eq!(blobs.get(&a).unwrap(), None);
        blobs.put(&a, &a_bytes).unwrap();
        blobs.put(&a, &a_bytes).unwrap();
        assert_eq!(blobs.missing(vec![a.clone(), b.clone()]).unwrap(), [b]);
        assert_eq!(blobs.get(&a).unwrap().as_deref(), Some(&a_bytes[..]));
    }

    #[test]
    fn chunks_round_trip_as_files() {
        let dir = tempfile::tempdir().unwrap();
        round_trip(&Dir(dir.path().join("blobs")));
    }

    #[test]
    fn chunks_round_trip_in_postgresql_and_every_controller_reads_them() {
        let pg = PgCluster::start();
        let one = super::super::postgres::Postgres::open(&pg.url()).unwrap();
        round_trip(super::super::Backend::blobs(&one).unwrap().as_ref());
        // Another controller's connection reads what the first stored.
        let other = super::super::postgres::Postgres::open(&pg.url()).unwrap();
        let (a, a_bytes) = chunk(1);
        let blobs = super::super::Backend::blobs(&other).unwrap();
        assert_eq!(blobs.get(&a).unwrap().as_deref(), Some(&a_bytes[..]));
    }
}
