//! The embedded store: one SQLite file (WAL, full sync) and a writer thread with group commit.
//!
//! Writes are closures that run on the writer thread inside one transaction per batch, each in its
//! own savepoint. The thread holds the in-memory state's lock from the first change of a batch
//! until the commit, and replies only after the commit: a reply means durable, and no reader ever
//! sees a change the file does not hold. Batching many writes into one commit is what makes
//! thousands of acknowledged submissions per second possible with an fsync per commit.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::state::{Event, Job, Node, Project, State, TokenRecord, User};

/// Most writes committed together.
const MAX_BATCH: usize = 1024;

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE users (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE projects (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE jobs (id INTEGER PRIMARY KEY, project TEXT NOT NULL, state TEXT NOT NULL,
                        doc TEXT NOT NULL);
     CREATE INDEX jobs_project ON jobs(project);
     CREATE TABLE nodes (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE tokens (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
     CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job INTEGER NOT NULL,
                          ts_ms INTEGER NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
     CREATE INDEX events_job ON events(job, seq);
     CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // The latest complete checkpoint of each replica of each job: a manifest of files whose
    // contents are content-addressed chunks in the blob area beside the store.
    "CREATE TABLE checkpoints (job INTEGER NOT NULL, replica INTEGER NOT NULL, id TEXT NOT NULL,
                               doc TEXT NOT NULL, PRIMARY KEY (job, replica));",
    "CREATE TABLE services (name TEXT PRIMARY KEY, doc TEXT NOT NULL);",
    // The usage ledger: one row per replica run, written when the run ends.
    "CREATE TABLE usage (seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, project TEXT NOT NULL,
                         start_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL, doc TEXT NOT NULL);
     CREATE INDEX usage_end ON usage(end_ms);",
    // Telemetry: one point per series per minute (see `controller::telemetry`).
    "CREATE TABLE samples (series TEXT NOT NULL, ts_ms INTEGER NOT NULL, doc TEXT NOT NULL,
                           PRIMARY KEY (series, ts_ms));
     CREATE INDEX samples_ts ON samples(ts_ms);",
    // The audit log (see `controller::audit`).
    "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL,
                         actor TEXT NOT NULL, action TEXT NOT NULL, project TEXT, job INTEGER,
                         detail TEXT NOT NULL);
     CREATE INDEX audit_ts ON audit(ts_ms);
     CREATE INDEX audit_job ON audit(job);",
    // Agents' callback secrets are derived from the controller's key, no longer stored.
    "UPDATE nodes SET doc = json_remove(doc, '$.callback_secret');",
    // Projects' registry logins (see `controller::registries`).
    "CREATE TABLE registry_logins (project TEXT NOT NULL, registry TEXT NOT NULL,
                                   doc TEXT NOT NULL, PRIMARY KEY (project, registry));",
];

/// Opens (creating if needed) and migrates the store.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    let mut conn =
        Connection::open(path).with_context(|| format!("opening the store {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "the store {} has schema version {version}, newer than this tessera ({}); run a \
             newer tessera or restore a backup",
            path.display(),
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("schema migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(conn)
}

fn load_docs<T: DeserializeOwned>(conn: &Connection, table: &str) -> anyhow::Result<Vec<T>> {
    let mut stmt = conn.prepare(&format!("SELECT doc FROM {table}"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        let doc = row?;
        out.push(serde_json::from_str(&doc).with_context(|| format!("a record in table {table}"))?);
    }
    Ok(out)
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

/// Reads the whole state back (at start-up).
pub fn load(conn: &Connection, now_ms: u64) -> anyhow::Result<State> {
    let mut state = State::default();
    for u in load_docs::<User>(conn, "users")? {
        state.users.insert(u.name.clone(), u);
    }
    for p in load_docs::<Project>(conn, "projects")? {
        state.projects.insert(p.name.clone(), p);
    }
    for mut n in load_docs::<Node>(conn, "nodes")? {
        n.last_seen_ms = now_ms;
        state.nodes.insert(n.spec.name.clone(), n);
    }
    for m in load_docs::<crate::state::CheckpointManifest>(conn, "checkpoints")? {
        state.checkpoints.insert((m.job, m.replica), m);
    }
    for svc in load_docs::<crate::state::Service>(conn, "services")? {
        state.services.insert(svc.name.clone(), svc);
    }
    for t in load_docs::<TokenRecord>(conn, "tokens")? {
        state.tokens.insert(t.id.clone(), t);
    }
    for l in load_docs::<crate::controller::registries::RegistryLogin>(conn, "registry_logins")? {
        state
            .registry_logins
            .insert((l.project.clone(), l.registry.clone()), l);
    }
    for j in load_docs::<Job>(conn, "jobs")? {
        state.next_job_id = state.next_job_id.max(j.id);
        state.next_start_seq = state.next_start_seq.max(j.started_seq);
        state.remember_request(&j.def.spec.request);
        state.insert_job(j);
    }
    state.usage_seq = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM usage", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    let mut stmt = conn.prepare(
        "SELECT job, ts_ms, kind, message FROM events WHERE seq > \
         (SELECT COALESCE(MAX(seq), 0) FROM events) - 200000 ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (job, ts_ms, kind, message) = row?;
        let kind = crate::state::EventKind::parse(&kind)
            .with_context(|| format!("job {job} has an event of unknown kind {kind:?}"))?;
        state.push_event(Event {
            job,
            ts_ms,
            kind,
            message,
        });
    }
    Ok(state)
}

fn doc<T: Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

pub fn put_user(c: &Connection, u: &User) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO users (name, doc) VALUES (?1, ?2)",
        params![u.name, doc(u)?],
    )?;
    Ok(())
}

pub fn put_project(c: &Connection, p: &Project) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO projects (name, doc) VALUES (?1, ?2)",
        params![p.name, doc(p)?],
    )?;
    Ok(())
}

pub fn put_job(c: &Connection, j: &Job) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO jobs (id, project, state, doc) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![j.id as i64, j.project(), j.state.name(), doc(j)?])?;
    Ok(())
}

pub fn put_node(c: &Connection, n: &Node) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO nodes (name, doc) VALUES (?1, ?2)",
        params![n.spec.name, doc(n)?],
    )?;
    Ok(())
}

pub fn put_service(c: &Connection, svc: &crate::state::Service) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT OR REPLACE INTO services (name, doc) VALUES (?1, ?2)")?
        .execute(params![svc.name, doc(svc)?])?;
    Ok(())
}

pub fn delete_service(c: &Connection, name: &str) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM services WHERE name = ?1")?
        .execute([name])?;
    Ok(())
}

pub fn put_registry_login(
    c: &Connection,
    l: &crate::controller::registries::RegistryLogin,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO registry_logins (project, registry, doc) VALUES (?1, ?2, ?3)",
        params![l.project, l.registry, doc(l)?],
    )?;
    Ok(())
}

pub fn delete_registry_login(
    c: &Connection,
    project: &str,
    registry: &str,
) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM registry_logins WHERE project = ?1 AND registry = ?2",
        params![project, registry],
    )?;
    Ok(())
}

pub fn put_token(c: &Connection, t: &TokenRecord) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO tokens (id, doc) VALUES (?1, ?2)",
        params![t.id, doc(t)?],
    )?;
    Ok(())
}

pub fn put_checkpoint(
    c: &Connection,
    m: &crate::state::CheckpointManifest,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO checkpoints (job, replica, id, doc) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![m.job as i64, m.replica, m.id, doc(m)?])?;
    Ok(())
}

pub fn delete_checkpoint(c: &Connection, job: u64, replica: u32) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM checkpoints WHERE job = ?1 AND replica = ?2",
        params![job as i64, replica],
    )?;
    Ok(())
}

pub fn add_event(c: &Connection, e: &Event) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO events (job, ts_ms, kind, message) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![
            e.job as i64,
            e.ts_ms as i64,
            e.kind.as_str(),
            e.message
        ])?;
    Ok(())
}

pub fn get_meta(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub fn put_meta(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, value],
    )?;
    Ok(())
}

/// Wakes whoever waits on a change: the scheduler, and agents long-polling for their node.
#[derive(Default)]
pub struct Notifier {
    pub schedule: Notify,
    nodes: Mutex<std::collections::HashMap<String, watch::Sender<u64>>>,
}

impl Notifier {
    /// A receiver that changes whenever the node's desired set does.
    pub fn watch_node(&self, node: &str) -> watch::Receiver<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn wake_node(&self, node: &str) {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = nodes.get(node) {
            tx.send_modify(|v| *v += 1);
        }
    }
}

/// Answers a write once its batch is committed, or with the reason the commit failed.
type Reply = Box<dyn FnOnce(Option<&StoreFault>) + Send>;
type Op = Box<dyn FnOnce(&Connection, &mut State) -> (Outcome, Reply) + Send>;

/// How one write ended: its savepoint is kept only when it is `Done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Refused,
    /// The write panicked: its SQL is rolled back and the memory reloaded from the store.
    Panicked,
}

/// What `/healthz` reports about the writer.
#[derive(Debug, Default)]
pub struct WriterHealth {
    /// Writes that panicked and were rolled back since the controller started.
    pub faults: std::sync::atomic::AtomicU64,
    /// The id and message of the latest such panic.
    pub last_fault: Mutex<Option<String>>,
    /// Set when the writer thread has stopped (the controller is going down).
    pub stopped: std::sync::atomic::AtomicBool,
    /// When the writer last committed a batch (Unix ms).
    pub last_commit_ms: std::sync::atomic::AtomicU64,
}

impl WriterHealth {
    fn record(&self, fault: &StoreFault) {
        self.faults
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.last_fault.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("{}: {}", fault.id, fault.message));
    }
}

/// The handle through which every change reaches the store.
#[derive(Clone)]
pub struct Store {
    ops: mpsc::UnboundedSender<Op>,
    pub state: Arc<Mutex<State>>,
    pub notifier: Arc<Notifier>,
    pub health: Arc<WriterHealth>,
}

impl Store {
    /// Starts the writer thread over an open connection.
    pub fn start(mut conn: Connection, state: State) -> Store {
        let (tx, mut rx) = mpsc::unbounded_channel::<Op>();
        let state = Arc::new(Mutex::new(state));
        let notifier = Arc::new(Notifier::default());
        let health = Arc::new(WriterHealth::default());
        let (st, nt, hl) = (state.clone(), notifier.clone(), health.clone());
        let stopped = health.clone();
        std::thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || {
                // Marks the writer stopped however the thread ends.
                struct Stopped(Arc<WriterHealth>);
                impl Drop for Stopped {
                    fn drop(&mut self) {
                        self.0
                            .stopped
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let _stopped = Stopped(stopped);
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let mut state = st.lock().unwrap_or_else(|e| e.into_inner());
                    let mut replies = Vec::with_capacity(batch.len());
                    let failed = match run_batch(&mut conn, &mut state, batch, &mut replies) {
                        Ok(()) => None,
                        Err(err) => {
                            // Nothing of the batch is in the file (its transaction rolled back):
                            // fail every write of it, and put memory back to what the file holds.
                            let fault = StoreFault::commit(&err);
                            tracing::error!(
                                fault = %fault.id,
                                "a store commit failed; its {} write(s) are refused: {err}",
                                replies.len()
                            );
                            hl.record(&fault);
                            if let Err(e) = reload(&conn, &mut state) {
                                // Memory would hold changes the file does not: stop rather than
                                // acknowledge anything more. A restart reloads the file.
                                tracing::error!(
                                    "reloading the state failed, stopping the controller: {e:#}"
                                );
                                std::process::exit(70);
                            }
                            Some(fault)
                        }
                    };
                    if failed.is_none() {
                        hl.last_commit_ms.store(
                            crate::controller::now_ms(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    let kick = std::mem::take(&mut state.kick);
                    let dirty = std::mem::take(&mut state.dirty_nodes);
                    drop(state);
                    for reply in replies {
                        reply(failed.as_ref());
                    }
                    if kick {
                        nt.schedule.notify_one();
                    }
                    for node in dirty {
                        nt.wake_node(&node);
                    }
                }
            })
            .expect("spawning the store thread");
        Store {
            ops: tx,
            state,
            notifier,
            health,
        }
    }

    /// Runs `f` in the next batch; it must write the store before changing `State`, and change
    /// `State` only once nothing can fail. Resolves after the commit.
    pub async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: Send + 'static + From<StoreGone> + From<StoreFault>,
        F: FnOnce(&Connection, &mut State) -> Result<R, E> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let health = self.health.clone();
        let op: Op = Box::new(move |c, s| {
            // A bug in one write must not take the writer (and with it every other write) down:
            // the panic fails this write alone, and the batch rolls back what it changed.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c, s))) {
                Ok(result) => {
                    let outcome = if result.is_ok() {
                        Outcome::Done
                    } else {
                        Outcome::Refused
                    };
                    (
                        outcome,
                        Box::new(move |failed: Option<&StoreFault>| {
                            let _ = tx.send(match failed {
                                None => result,
                                Some(f) => Err(E::from(f.clone())),
                            });
                        }),
                    )
                }
                Err(payload) => {
                    let fault = StoreFault::new(FaultKind::Panic, panic_message(payload.as_ref()));
                    tracing::error!(
                        fault = %fault.id,
                        "a store write panicked and was rolled back: {}",
                        fault.message
                    );
                    health.record(&fault);
                    (
                        Outcome::Panicked,
                        Box::new(move |_: Option<&StoreFault>| {
                            let _ = tx.send(Err(E::from(fault)));
                        }),
                    )
                }
            }
        });
        self.ops.send(op).map_err(|_| StoreGone)?;
        rx.await.map_err(|_| StoreGone)?
    }

    /// Whether the writer still commits: a no-op write must come back within `wait`.
    pub async fn writer_ok(&self, wait: std::time::Duration) -> bool {
        let probe = self.write(|_, _| Ok::<(), WriteProbeError>(()));
        matches!(tokio::time::timeout(wait, probe).await, Ok(Ok(())))
    }

    /// Reads the state (short critical sections only).
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&state)
    }
}

/// The writer thread is gone (the controller is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the store is stopping")]
pub struct StoreGone;

/// A write that failed inside the store and changed nothing: it panicked, or its batch's commit
/// failed. `id` ties the answer to the line in the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.words())]
pub struct StoreFault {
    pub id: String,
    pub kind: FaultKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Panic,
    /// The store's file system is full.
    DiskFull,
    Commit,
}

impl StoreFault {
    fn new(kind: FaultKind, message: String) -> StoreFault {
        StoreFault {
            id: fault_id(),
            kind,
            message,
        }
    }

    fn commit(err: &rusqlite::Error) -> StoreFault {
        let full = matches!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
        let kind = if full {
            FaultKind::DiskFull
        } else {
            FaultKind::Commit
        };
        StoreFault::new(kind, err.to_string())
    }

    fn words(&self) -> String {
        match self.kind {
            FaultKind::DiskFull => format!(
                "the store's disk is full, so nothing was changed ({}); an admin must free space \
                 on the controller's disk",
                self.id
            ),
            _ => format!(
                "internal error {} (nothing was changed; the controller log has the details)",
                self.id
            ),
        }
    }
}

/// A fresh id for an internal error, given to the caller and written beside the details in the
/// log, so that a user's report leads to the log line.
pub fn fault_id() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    format!("fault-{}", hex::encode(bytes))
}

/// The error of the writer's health probe (which never fails on its own).
#[derive(Debug)]
enum WriteProbeError {
    Gone,
    Fault,
}

impl From<StoreGone> for WriteProbeError {
    fn from(_: StoreGone) -> Self {
        WriteProbeError::Gone
    }
}

impl From<StoreFault> for WriteProbeError {
    fn from(_: StoreFault) -> Self {
        WriteProbeError::Fault
    }
}

pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs a batch in one transaction, pushing each write's reply as it runs; on an error the
/// transaction rolls back (writes not yet run are dropped, so their callers hear `StoreGone`).
fn run_batch(
    conn: &mut Connection,
    state: &mut State,
    batch: Vec<Op>,
    replies: &mut Vec<Reply>,
) -> rusqlite::Result<()> {
    let mut tx = conn.transaction()?;
    for op in batch {
        let sp = tx.savepoint()?;
        state.acting = None;
        let (outcome, reply) = op(&sp, state);
        state.acting = None;
        replies.push(reply);
        match outcome {
            Outcome::Done => sp.commit()?,
            // A refused op changed nothing in memory; its savepoint rolls back when dropped.
            Outcome::Refused => drop(sp),
            Outcome::Panicked => {
                drop(sp);
                // Memory may hold part of the write: rebuild it from what the store holds now
                // (this batch's earlier writes included), keeping what is only in memory.
                reload(&tx, state).map_err(|e| {
                    rusqlite::Error::ToSqlConversionFailure(
                        format!("reloading the state after a fault: {e:#}").into(),
                    )
                })?;
            }
        }
    }
    tx.commit()
}

/// Replaces the stored part of `state` with what `conn` holds, keeping the derived, memory-only
/// part (leases, reported use, wait reasons), and wakes every agent and the scheduler.
fn reload(conn: &Connection, state: &mut State) -> anyhow::Result<()> {
    let mut fresh = load(conn, crate::controller::now_ms())?;
    for (name, node) in fresh.nodes.iter_mut() {
        if let Some(old) = state.nodes.get(name) {
            node.last_seen_ms = old.last_seen_ms;
            node.last_seq = old.last_seq;
            node.heartbeats = old.heartbeats;
        }
    }
    fresh.node_revision = std::mem::take(&mut state.node_revision);
    for name in fresh.nodes.keys() {
        *fresh.node_revision.entry(name.clone()).or_default() += 1;
    }
    fresh.dirty_nodes = fresh.nodes.keys().cloned().collect();
    fresh.kick = true;
    fresh.wait_reasons = std::mem::take(&mut state.wait_reasons);
    fresh.replica_usage = std::mem::take(&mut state.replica_usage);
    fresh.usage_history = std::mem::take(&mut state.usage_history);
    fresh.replica_idle = std::mem::take(&mut state.replica_idle);
    fresh.id_ceiling = state.id_ceiling.take();
    *state = fresh;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Role;

    #[derive(Debug)]
    enum TestError {
        Gone,
        Fault(String),
    }
    impl From<StoreGone> for TestError {
        fn from(_: StoreGone) -> Self {
            TestError::Gone
        }
    }
    impl From<StoreFault> for TestError {
        fn from(f: StoreFault) -> Self {
            TestError::Fault(f.id)
        }
    }

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            role: Role::Member,
            created_ms: 1,
            uid: None,
        }
    }

    /// Writes `name` to the file and to memory, then panics half-way when asked to.
    async fn add_user(store: &Store, name: &'static str, panic: bool) -> Result<(), TestError> {
        store
            .write(move |c, s| {
                put_user(c, &user(name))?;
                s.users.insert(name.into(), user(name));
                if panic {
                    let missing: std::collections::HashMap<u64, u64> = Default::default();
                    let _ = missing[&42];
                }
                Ok::<(), TestError>(())
            })
            .await
    }

    impl From<rusqlite::Error> for TestError {
        fn from(_: rusqlite::Error) -> Self {
            TestError::Gone
        }
    }

    fn users_on_disk(path: &Path) -> Vec<String> {
        let c = read_only(path).unwrap();
        let mut st = c.prepare("SELECT name FROM users ORDER BY name").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_fails_alone_rolls_back_memory_and_file_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tessera.db");
        let conn = open(&path).unwrap();
        let state = load(&conn, 0).unwrap();
        let store = Store::start(conn, state);

        // Three writes in flight together (likely one batch): the middle one panics.
        let (a, b, c) = tokio::join!(
            add_user(&store, "before", false),
            add_user(&store, "broken", true),
            add_user(&store, "after", false),
        );
        assert!(a.is_ok(), "{a:?}");
        assert!(c.is_ok(), "{c:?}");
        match b {
            Err(TestError::Fault(id)) => assert!(id.starts_with("fault-"), "{id}"),
            other => panic!("the panicking write must fail with a fault id, got {other:?}"),
        }
        let names = store.read(|s| s.users.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            names,
            ["after", "before"],
            "memory keeps only committed writes"
        );
        assert_eq!(users_on_disk(&path), ["after", "before"]);
        assert_eq!(
            store
                .health
                .faults
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        assert!(
            store
                .health
                .last_fault
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|f| f.contains("no entry found for key")),
            "the fault's message names the panic"
        );

        // The writer goes on: later writes commit and the probe answers.
        add_user(&store, "later", false).await.unwrap();
        assert!(store.writer_ok(std::time::Duration::from_secs(5)).await);
        assert_eq!(users_on_disk(&path), ["after", "before", "later"]);
    }
}
