//! The SQLite backend: one file (WAL, full sync), its migrations (from `schema.rs`), and every SQL
//! statement the controller runs against it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AuditFilter, Backend, Ledger, LedgerOpener, StoreError, StoreResult, Tx, Write, doc, schema,
};
use crate::controller::audit::Entry;
use crate::controller::registries::RegistryLogin;
use crate::controller::telemetry::Point;
use crate::metering::{Segment, Window};
use crate::state::{
    CheckpointManifest, Event, Job, Node, Project, Service, State, TokenRecord, User,
};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError {
            disk_full: matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull)),
            unavailable: false,
            message: e.to_string(),
        }
    }
}

/// The writer's connection to one SQLite file.
pub struct Sqlite {
    conn: Connection,
    path: PathBuf,
}

impl Sqlite {
    /// Opens (creating if needed) and migrates the store.
    pub fn open(path: &Path) -> anyhow::Result<Sqlite> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("opening the store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > schema::MIGRATIONS.len() {
            anyhow::bail!(
                "the store {} has schema version {version}, newer than this tessera ({}); run a \
                 newer tessera or restore a backup",
                path.display(),
                schema::MIGRATIONS.len()
            );
        }
        for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(m.sqlite)
                .with_context(|| format!("schema migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Sqlite {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Writes in a transaction of their own, outside the writer (the usage benchmark fills a
    /// ledger this way).
    pub fn in_transaction<R>(
        &mut self,
        f: impl FnOnce(&Write) -> StoreResult<R>,
    ) -> StoreResult<R> {
        let tx = self.conn.transaction()?;
        let out = f(&Write::new(&*tx, None))?;
        tx.commit()?;
        Ok(out)
    }
}

impl Backend for Sqlite {
    fn begin(&mut self) -> StoreResult<()> {
        Ok(self.conn.execute_batch("BEGIN IMMEDIATE")?)
    }

    fn savepoint(&mut self) -> StoreResult<()> {
        Ok(self.conn.execute_batch("SAVEPOINT op")?)
    }

    fn release(&mut self) -> StoreResult<()> {
        Ok(self.conn.execute_batch("RELEASE op")?)
    }

    fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        Ok(self.conn.execute_batch("ROLLBACK TO op; RELEASE op")?)
    }

    fn commit(&mut self) -> StoreResult<()> {
        Ok(self.conn.execute_batch("COMMIT")?)
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn tx(&self) -> &dyn Tx {
        &self.conn
    }

    fn load(&self, now_ms: u64) -> anyhow::Result<State> {
        super::load_state(&self.conn, now_ms)
    }

    fn ledger(&self) -> LedgerOpener {
        let path = self.path.clone();
        Box::new(move || Ok(Box::new(read_only(&path)?) as Box<dyn Ledger>))
    }
}

/// A read-only connection beside the writer, for queries over tables the state does not keep in
/// memory (usage ledger, telemetry, audit log); WAL lets it read while the writer commits.
pub fn read_only(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

impl super::Records for Connection {
    fn docs(&self, table: &str) -> anyhow::Result<Vec<String>> {
        let mut stmt = self.prepare(&format!("SELECT doc FROM {table}"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn usage_seq(&self) -> anyhow::Result<u64> {
        Ok(
            self.query_row("SELECT COALESCE(MAX(seq), 0) FROM usage", [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
        )
    }
}

impl Tx for Connection {
    fn put_user(&self, u: &User) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO users (name, doc) VALUES (?1, ?2)",
            params![u.name, doc(u)?],
        )?;
        Ok(())
    }

    fn put_project(&self, p: &Project) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO projects (name, doc) VALUES (?1, ?2)",
            params![p.name, doc(p)?],
        )?;
        Ok(())
    }

    fn put_job(&self, j: &Job) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT OR REPLACE INTO jobs (id, project, state, doc) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![j.id as i64, j.project(), j.state.name(), doc(j)?])?;
        Ok(())
    }

    fn put_node(&self, n: &Node) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO nodes (name, doc) VALUES (?1, ?2)",
            params![n.spec.name, doc(n)?],
        )?;
        Ok(())
    }

    fn put_service(&self, svc: &Service) -> StoreResult<()> {
        self.prepare_cached("INSERT OR REPLACE INTO services (name, doc) VALUES (?1, ?2)")?
            .execute(params![svc.name, doc(svc)?])?;
        Ok(())
    }

    fn delete_service(&self, name: &str) -> StoreResult<()> {
        self.prepare_cached("DELETE FROM services WHERE name = ?1")?
            .execute([name])?;
        Ok(())
    }

    fn put_registry_login(&self, l: &RegistryLogin) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO registry_logins (project, registry, doc) VALUES (?1, ?2, ?3)",
            params![l.project, l.registry, doc(l)?],
        )?;
        Ok(())
    }

    fn delete_registry_login(&self, project: &str, registry: &str) -> StoreResult<()> {
        self.execute(
            "DELETE FROM registry_logins WHERE project = ?1 AND registry = ?2",
            params![project, registry],
        )?;
        Ok(())
    }

    fn put_token(&self, t: &TokenRecord) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO tokens (id, doc) VALUES (?1, ?2)",
            params![t.id, doc(t)?],
        )?;
        Ok(())
    }

    fn put_checkpoint(&self, m: &CheckpointManifest) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT OR REPLACE INTO checkpoints (job, replica, id, doc) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![m.job as i64, m.replica, m.id, doc(m)?])?;
        Ok(())
    }

    fn delete_checkpoint(&self, job: u64, replica: u32) -> StoreResult<()> {
        self.execute(
            "DELETE FROM checkpoints WHERE job = ?1 AND replica = ?2",
            params![job as i64, replica],
        )?;
        Ok(())
    }

    fn add_event(&self, e: &Event) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT INTO events (job, ts_ms, kind, message) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            e.job as i64,
            e.ts_ms as i64,
            e.kind.as_str(),
            e.message
        ])?;
        Ok(())
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn put_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    fn add_usage(&self, seq: u64, s: &Segment) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT INTO usage (seq, job, project, start_ms, end_ms, doc) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            seq as i64,
            s.job as i64,
            s.project,
            s.start_ms as i64,
            s.end_ms as i64,
            doc(s)?
        ])?;
        Ok(())
    }

    fn add_audit(&self, e: &Entry) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, action, project, job, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            e.ts_ms as i64,
            e.actor,
            e.action,
            e.project,
            e.job.map(|j| j as i64),
            e.detail
        ])?;
        Ok(())
    }

    fn put_sample(&self, series: &str, p: &Point) -> StoreResult<()> {
        self.prepare_cached(
            "INSERT OR REPLACE INTO samples (series, ts_ms, doc) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![series, p.ts_ms as i64, doc(p)?])?;
        Ok(())
    }

    fn delete_samples_before(&self, ts_ms: u64) -> StoreResult<()> {
        self.execute(
            "DELETE FROM samples WHERE ts_ms < ?1",
            params![ts_ms as i64],
        )?;
        Ok(())
    }
}

impl Ledger for Connection {
    fn events(&self, job: u64, limit: u64) -> StoreResult<Vec<Event>> {
        let mut stmt = self.prepare_cached(
            "SELECT ts_ms, kind, message FROM events WHERE job = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![job as i64, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (ts_ms, kind, message) = row?;
            out.push(super::event_of(job, ts_ms, &kind, message)?);
        }
        out.reverse();
        Ok(out)
    }

    fn usage(&self, seq: u64, w: Window) -> StoreResult<Vec<Segment>> {
        let mut stmt = self
            .prepare("SELECT doc FROM usage WHERE seq <= ?1 AND end_ms > ?2 AND start_ms < ?3")?;
        let rows = stmt.query_map(
            params![seq as i64, w.since_ms as i64, w.until_ms as i64],
            |r| r.get::<_, String>(0),
        )?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        Ok(out)
    }

    fn audit(&self, f: &AuditFilter, each: &mut dyn FnMut(Entry) -> bool) -> StoreResult<()> {
        let mut stmt = self.prepare(
            "SELECT seq, ts_ms, actor, action, project, job, detail FROM audit
             WHERE ts_ms >= ?1 AND ts_ms <= ?2
               AND (?3 IS NULL OR project = ?3)
               AND (?4 IS NULL OR job = ?4)
               AND (?5 IS NULL OR action = ?5)
             ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map(
            params![
                f.since_ms as i64,
                f.until_ms as i64,
                f.project,
                f.job.map(|j| j as i64),
                f.action
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
        for e in rows {
            if !each(e?) {
                break;
            }
        }
        Ok(())
    }

    fn samples(
        &self,
        prefix: &str,
        exact: bool,
        since_ms: u64,
    ) -> StoreResult<Vec<(String, Point)>> {
        let pattern = if exact {
            prefix.to_string()
        } else {
            format!("{prefix}%")
        };
        let mut stmt = self.prepare(
            "SELECT series, doc FROM samples WHERE series LIKE ?1 AND ts_ms >= ?2 ORDER BY ts_ms",
        )?;
        let rows = stmt.query_map(params![pattern, since_ms as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (series, doc) = row?;
            out.push((series, serde_json::from_str(&doc)?));
        }
        Ok(out)
    }
}
