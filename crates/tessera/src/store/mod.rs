//! The store: a backend (SQLite in `sqlite.rs`, PostgreSQL in `postgres.rs`) behind the [`Tx`]
//! and [`Ledger`] traits, and a writer thread with group commit. No SQL lives outside this folder.
//!
//! Writes are closures that run on the writer thread inside one transaction per batch, each in its
//! own savepoint, and see a [`Write`]: the transaction, who asked, and when. The thread holds the
//! in-memory state's lock while it applies a batch, releases it for the commit, and replies only
//! after the commit: a reply means durable. A reader may see a batch while it commits; what it
//! answers waits for that commit and is withdrawn if the commit failed ([`gate`]). Batching many
//! writes into one commit is what makes thousands of acknowledged submissions per second
//! possible with an fsync (or a database round trip) per commit.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::controller::audit::Entry;
use crate::controller::registries::RegistryLogin;
use crate::controller::telemetry::Point;
use crate::metering::{Segment, Window};
use crate::state::{
    CheckpointManifest, Event, Job, Node, Project, Service, State, TokenRecord, User,
};

pub mod blobs;
pub mod follow;
pub mod gate;
pub mod lease;
pub mod postgres;
pub mod schema;
pub mod sqlite;

/// Most writes committed together.
const MAX_BATCH: usize = 1024;

/// A backend's error, in words.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub message: String,
    /// The store's file system (or database server's disk) is full.
    pub disk_full: bool,
    /// The store could not be reached (the database is down or the connection was cut).
    pub unavailable: bool,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            disk_full: false,
            unavailable: false,
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::new(format!("a stored record: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A record as the store keeps it: JSON.
fn doc<T: Serialize>(value: &T) -> StoreResult<String> {
    Ok(serde_json::to_string(value)?)
}

/// Every change the controller makes to the store, inside the writer's open transaction. One
/// implementation per backend; no SQL outside `store/`.
pub trait Tx {
    fn put_user(&self, u: &User) -> StoreResult<()>;
    fn put_project(&self, p: &Project) -> StoreResult<()>;
    fn put_job(&self, j: &Job) -> StoreResult<()>;
    fn put_node(&self, n: &Node) -> StoreResult<()>;
    fn put_service(&self, svc: &Service) -> StoreResult<()>;
    fn delete_service(&self, name: &str) -> StoreResult<()>;
    fn put_registry_login(&self, l: &RegistryLogin) -> StoreResult<()>;
    fn delete_registry_login(&self, project: &str, registry: &str) -> StoreResult<()>;
    fn put_token(&self, t: &TokenRecord) -> StoreResult<()>;
    fn put_checkpoint(&self, m: &CheckpointManifest) -> StoreResult<()>;
    fn delete_checkpoint(&self, job: u64, replica: u32) -> StoreResult<()>;
    fn add_event(&self, e: &Event) -> StoreResult<()>;
    fn get_meta(&self, key: &str) -> StoreResult<Option<String>>;
    fn put_meta(&self, key: &str, value: &str) -> StoreResult<()>;
    /// One ended run in the usage ledger, under sequence number `seq`.
    fn add_usage(&self, seq: u64, s: &Segment) -> StoreResult<()>;
    /// One audit entry (its `seq` is given by the store).
    fn add_audit(&self, e: &Entry) -> StoreResult<()>;
    /// One telemetry point of `series` (a later point of the same minute replaces it).
    fn put_sample(&self, series: &str, p: &Point) -> StoreResult<()>;
    fn delete_samples_before(&self, ts_ms: u64) -> StoreResult<()>;
}

/// What one write sees: the transaction, who asked for the change (`None`: the controller or
/// the scheduler itself), and the time the write runs at.
pub struct Write<'a> {
    tx: &'a dyn Tx,
    pub actor: Option<&'a str>,
    pub now_ms: u64,
}

impl<'a> Write<'a> {
    pub(crate) fn new(tx: &'a dyn Tx, actor: Option<&'a str>) -> Self {
        Write {
            tx,
            actor,
            now_ms: crate::controller::now_ms(),
        }
    }
}

impl<'a> std::ops::Deref for Write<'a> {
    type Target = dyn Tx + 'a;

    fn deref(&self) -> &Self::Target {
        self.tx
    }
}

/// Reads of the tables the state does not keep in memory (usage ledger, audit log, telemetry),
/// beside the writer.
pub trait Ledger {
    /// Ended runs with sequence number up to `seq` that overlap the window.
    fn usage(&self, seq: u64, w: Window) -> StoreResult<Vec<Segment>>;
    /// Audit entries that match, newest first, until `each` returns false.
    fn audit(&self, f: &AuditFilter, each: &mut dyn FnMut(Entry) -> bool) -> StoreResult<()>;
    /// The newest `limit` events of `job`, oldest first.
    fn events(&self, job: u64, limit: u64) -> StoreResult<Vec<Event>>;
    /// Stored points of the series named `prefix` (or starting with it), from `since_ms`.
    fn samples(
        &self,
        prefix: &str,
        exact: bool,
        since_ms: u64,
    ) -> StoreResult<Vec<(String, Point)>>;
}

/// What reading the state back needs of a backend: the records of a table and the ledger's
/// last sequence number.
pub trait Records {
    /// Every record (JSON) of `table`.
    fn docs(&self, table: &str) -> anyhow::Result<Vec<String>>;
    fn usage_seq(&self) -> anyhow::Result<u64>;
}

/// The tables whose records the state keeps in memory, in the order a full read applies them.
pub const STATE_TABLES: [&str; 8] = [
    "users",
    "projects",
    "nodes",
    "checkpoints",
    "services",
    "tokens",
    "registry_logins",
    "jobs",
];

fn parse<T: serde::de::DeserializeOwned>(table: &str, doc: &str) -> anyhow::Result<T> {
    serde_json::from_str(doc).map_err(|e| anyhow::anyhow!("a record in table {table}: {e}"))
}

/// Puts one stored record of `table` into the state, replacing the one with its key: how the
/// state is read back, and how a standby follows the leader's changes. Nodes count as seen at
/// `now_ms`.
pub fn apply_doc(state: &mut State, table: &str, doc: &str, now_ms: u64) -> anyhow::Result<()> {
    match table {
        "users" => {
            let u: User = parse(table, doc)?;
            state.users.insert(u.name.clone(), u);
        }
        "projects" => {
            let p: Project = parse(table, doc)?;
            state.projects.insert(p.name.clone(), p);
        }
        "nodes" => {
            let mut n: Node = parse(table, doc)?;
            n.last_seen_ms = now_ms;
            state.nodes.insert(n.spec.name.clone(), n);
        }
        "checkpoints" => {
            let m: CheckpointManifest = parse(table, doc)?;
            state.checkpoints.insert((m.job, m.replica), m);
        }
        "services" => {
            let svc: Service = parse(table, doc)?;
            state.services.insert(svc.name.clone(), svc);
        }
        "tokens" => {
            let t: TokenRecord = parse(table, doc)?;
            state.tokens.insert(t.id.clone(), t);
        }
        "registry_logins" => {
            let l: RegistryLogin = parse(table, doc)?;
            state
                .registry_logins
                .insert((l.project.clone(), l.registry.clone()), l);
        }
        "jobs" => {
            let j: Job = parse(table, doc)?;
            state.next_job_id = state.next_job_id.max(j.id);
            state.next_start_seq = state.next_start_seq.max(j.started_seq);
            if !state.jobs.contains_key(&j.id) {
                state.remember_request(&j.def.spec.request);
            }
            state.insert_job(j);
        }
        other => anyhow::bail!("the state keeps no table {other}"),
    }
    Ok(())
}

/// Removes the record of `table` whose key is `key` (JSON, as the change log keeps it: a name,
/// or `[project, registry]`, or `[job, replica]`).
pub fn apply_deletion(state: &mut State, table: &str, key: &str) -> anyhow::Result<()> {
    let bad = |e: serde_json::Error| anyhow::anyhow!("a deletion of table {table}: {e}");
    match table {
        "services" => {
            let name: String = serde_json::from_str(key).map_err(bad)?;
            state.services.remove(&name);
        }
        "registry_logins" => {
            let k: (String, String) = serde_json::from_str(key).map_err(bad)?;
            state.registry_logins.remove(&k);
        }
        "checkpoints" => {
            let k: (u64, u32) = serde_json::from_str(key).map_err(bad)?;
            state.checkpoints.remove(&k);
        }
        other => anyhow::bail!("records of table {other} are never removed"),
    }
    Ok(())
}

/// Reads the whole state back, the same way from every backend (at start-up, and to put memory
/// back after a failed write). Nodes count as seen now.
pub fn load_state(from: &dyn Records, now_ms: u64) -> anyhow::Result<State> {
    let mut state = State::default();
    for table in STATE_TABLES {
        for doc in from.docs(table)? {
            apply_doc(&mut state, table, &doc, now_ms)?;
        }
    }
    state.usage_seq = from.usage_seq()?;
    Ok(state)
}

/// An event as stored: its kind by name.
pub fn event_of(job: u64, ts_ms: u64, kind: &str, message: String) -> StoreResult<Event> {
    let kind = crate::state::EventKind::parse(kind).ok_or_else(|| {
        StoreError::new(format!("job {job} has an event of unknown kind {kind:?}"))
    })?;
    Ok(Event {
        job,
        ts_ms,
        kind,
        message,
    })
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub since_ms: u64,
    pub until_ms: u64,
    pub project: Option<String>,
    pub job: Option<u64>,
    pub action: Option<String>,
}

/// The writer's connection: a transaction per batch and a savepoint per write in it.
pub trait Backend: Send + 'static {
    fn begin(&mut self) -> StoreResult<()>;
    fn savepoint(&mut self) -> StoreResult<()>;
    fn release(&mut self) -> StoreResult<()>;
    fn rollback_to_savepoint(&mut self) -> StoreResult<()>;
    fn commit(&mut self) -> StoreResult<()>;
    /// Ends the open transaction, if any, keeping nothing of it.
    fn rollback(&mut self);
    /// Reconnects if the connection was lost (a database that went away and came back).
    fn reconnect(&mut self) -> StoreResult<()> {
        Ok(())
    }
    fn tx(&self) -> &dyn Tx;
    /// The whole state as stored (inside an open transaction: with its changes).
    fn load(&self, now_ms: u64) -> anyhow::Result<State>;
    /// Opens readers of the ledger tables, one per call.
    fn ledger(&self) -> LedgerOpener;
    /// Where checkpoint chunks live when the database keeps them (shared by every controller);
    /// `None`: in files beside the store.
    fn blobs(&self) -> Option<Arc<dyn blobs::Blobs>> {
        None
    }
}

/// Opens a reader of the ledger tables.
pub type LedgerOpener = Box<dyn Fn() -> StoreResult<Box<dyn Ledger>> + Send + Sync>;

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
/// A write: run with the transaction and the state, or, when the store cannot be reached,
/// with `None` (it then only makes its reply, which the writer gives the fault).
type Op = Box<dyn FnOnce(Option<(&dyn Tx, &mut State)>) -> (Outcome, Reply) + Send>;

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
    /// Batches committed, the writes in them, and the time their commits took (µs): what group
    /// commit achieves (`/metrics`).
    pub batches: std::sync::atomic::AtomicU64,
    pub batched_writes: std::sync::atomic::AtomicU64,
    pub commit_micros: std::sync::atomic::AtomicU64,
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
    pub gate: Arc<gate::CommitGate>,
    ledger: Arc<LedgerOpener>,
}

impl Store {
    /// Starts the writer thread over an open backend.
    pub fn start(mut backend: Box<dyn Backend>, state: State) -> Store {
        let ledger = Arc::new(backend.ledger());
        let (tx, mut rx) = mpsc::unbounded_channel::<Op>();
        let state = Arc::new(Mutex::new(state));
        let notifier = Arc::new(Notifier::default());
        let health = Arc::new(WriterHealth::default());
        let gate = Arc::new(gate::CommitGate::default());
        let (st, nt, hl, gt) = (
            state.clone(),
            notifier.clone(),
            health.clone(),
            gate.clone(),
        );
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
                let mut stale = false;
                let mut seq = 0u64;
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
                    // After a failure memory is what the store held; until the store can be read
                    // again nothing is written (each write is refused, 503).
                    if stale {
                        match reload(backend.as_mut(), &mut state) {
                            Ok(()) => {
                                tracing::info!("the store can be read again; writes resume");
                                stale = false;
                            }
                            Err(e) => {
                                let fault = StoreFault::new(
                                    FaultKind::Unavailable,
                                    format!("the store cannot be read: {e:#}"),
                                );
                                for op in batch {
                                    replies.push(op(None).1);
                                }
                                drop(state);
                                for reply in replies {
                                    reply(Some(&fault));
                                }
                                continue;
                            }
                        }
                    }
                    seq += 1;
                    // Apply under the lock; commit without it (see `gate`), so that readers, the
                    // scheduler and the requests queueing for the next batch go on meanwhile.
                    let mut outcome =
                        apply_batch(backend.as_mut(), &mut state, batch, &mut replies);
                    gt.apply(seq);
                    let mut kick = std::mem::take(&mut state.kick);
                    let mut dirty = std::mem::take(&mut state.dirty_nodes);
                    if outcome.is_ok() {
                        drop(state);
                        let committing = std::time::Instant::now();
                        outcome = backend.commit();
                        let took = committing.elapsed().as_micros() as u64;
                        state = st.lock().unwrap_or_else(|e| e.into_inner());
                        if outcome.is_ok() {
                            use std::sync::atomic::Ordering::Relaxed;
                            hl.batches.fetch_add(1, Relaxed);
                            hl.batched_writes.fetch_add(replies.len() as u64, Relaxed);
                            hl.commit_micros.fetch_add(took, Relaxed);
                        }
                    }
                    let failed = match outcome {
                        Ok(()) => None,
                        Err(err) => {
                            backend.rollback();
                            // Nothing of the batch is in the store (its transaction rolled back):
                            // fail every write of it, and put memory back to what the store holds.
                            let fault = StoreFault::commit(&err);
                            tracing::error!(
                                fault = %fault.id,
                                "a store commit failed; its {} write(s) are refused: {err}",
                                replies.len()
                            );
                            hl.record(&fault);
                            if let Err(e) = reload(backend.as_mut(), &mut state) {
                                // Memory may hold changes the store does not: acknowledge
                                // nothing more until it can be read back (tried before each
                                // batch), rather than stop the controller for a database that
                                // is away for a moment.
                                tracing::error!(
                                    "reloading the state failed; writes are refused until the \
                                     store can be read: {e:#}"
                                );
                                stale = true;
                            }
                            kick |= std::mem::take(&mut state.kick);
                            dirty.append(&mut std::mem::take(&mut state.dirty_nodes));
                            Some(fault)
                        }
                    };
                    drop(state);
                    gt.decide(seq, failed.is_none());
                    if failed.is_none() {
                        hl.last_commit_ms.store(
                            crate::controller::now_ms(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
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
            gate,
            ledger,
        }
    }

    /// Runs `read` on a reader of the ledger tables (usage, audit, telemetry), off the async
    /// threads. `what` names it in errors.
    pub async fn read_ledger<T: Send + 'static>(
        &self,
        what: &'static str,
        read: impl FnOnce(&dyn Ledger) -> StoreResult<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let open = self.ledger.clone();
        tokio::task::spawn_blocking(move || read(open()?.as_ref()))
            .await
            .map_err(|_| anyhow::anyhow!("the {what} reader failed"))?
            .map_err(|e| anyhow::anyhow!("reading the {what}: {e}"))
    }

    /// Runs `f` in the next batch as the controller itself (no user asked for it); see
    /// [`Store::write_as`].
    pub async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: Send + 'static + From<StoreGone> + From<StoreFault>,
        F: FnOnce(&Write, &mut State) -> Result<R, E> + Send + 'static,
    {
        self.write_as(None, f).await
    }

    /// Runs `f` in the next batch on behalf of `actor`; it must write the store before changing
    /// `State`, and change `State` only once nothing can fail. Resolves after the commit.
    pub async fn write_as<R, E, F>(&self, actor: Option<String>, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: Send + 'static + From<StoreGone> + From<StoreFault>,
        F: FnOnce(&Write, &mut State) -> Result<R, E> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let health = self.health.clone();
        let op: Op = Box::new(move |run| {
            let Some((t, s)) = run else {
                return (
                    Outcome::Refused,
                    Box::new(move |failed: Option<&StoreFault>| {
                        let fault = failed.cloned().unwrap_or_else(|| {
                            StoreFault::new(FaultKind::Unavailable, "the store is away".into())
                        });
                        let _ = tx.send(Err(E::from(fault)));
                    }) as Reply,
                );
            };
            let w = Write::new(t, actor.as_deref());
            // A bug in one write must not take the writer (and with it every other write) down:
            // the panic fails this write alone, and the batch rolls back what it changed.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&w, s))) {
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
    /// The store cannot be reached or read (the database is down or cut off).
    Unavailable,
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

    fn commit(err: &StoreError) -> StoreFault {
        let kind = if err.disk_full {
            FaultKind::DiskFull
        } else if err.unavailable {
            FaultKind::Unavailable
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
            FaultKind::Unavailable => format!(
                "the store cannot be reached, so nothing was changed ({}); retry in a few \
                 seconds, and if it lasts an admin must bring the database back",
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

/// Opens the batch's transaction and runs its writes in it, pushing each write's reply as it
/// runs, and leaves the transaction to commit. On an error the caller rolls it back (writes not
/// yet run are dropped, so their callers hear `StoreGone`).
fn apply_batch(
    backend: &mut dyn Backend,
    state: &mut State,
    batch: Vec<Op>,
    replies: &mut Vec<Reply>,
) -> StoreResult<()> {
    if let Err(e) = backend.begin() {
        // Nothing ran: each write hears the fault.
        for op in batch {
            replies.push(op(None).1);
        }
        return Err(e);
    }
    run_in_transaction(backend, state, batch, replies)
}

fn run_in_transaction(
    backend: &mut dyn Backend,
    state: &mut State,
    batch: Vec<Op>,
    replies: &mut Vec<Reply>,
) -> StoreResult<()> {
    for op in batch {
        backend.savepoint()?;
        let (outcome, reply) = op(Some((backend.tx(), state)));
        replies.push(reply);
        match outcome {
            Outcome::Done => backend.release()?,
            // A refused op changed nothing in memory; its savepoint rolls back.
            Outcome::Refused => backend.rollback_to_savepoint()?,
            Outcome::Panicked => {
                backend.rollback_to_savepoint()?;
                // Memory may hold part of the write: rebuild it from what the store holds now
                // (this batch's earlier writes included), keeping what is only in memory.
                reload(backend, state).map_err(|e| {
                    StoreError::new(format!("reloading the state after a fault: {e:#}"))
                })?;
            }
        }
    }
    Ok(())
}

/// Replaces the stored part of `state` with what `conn` holds, keeping the derived, memory-only
/// part (leases, reported use, wait reasons), and wakes every agent and the scheduler.
fn reload(backend: &mut dyn Backend, state: &mut State) -> anyhow::Result<()> {
    backend.reconnect()?;
    let mut fresh = backend.load(crate::controller::now_ms())?;
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
mod testdb;

#[cfg(test)]
mod tests {
    use super::testdb::PgCluster;
    use super::*;
    use crate::state::{Role, TokenKind};

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
    impl From<StoreError> for TestError {
        fn from(_: StoreError) -> Self {
            TestError::Gone
        }
    }

    /// Where a test's store lives: a SQLite file, or a throwaway PostgreSQL cluster.
    enum Place {
        Sqlite(tempfile::TempDir),
        Postgres(PgCluster),
    }

    impl Place {
        fn new(postgres: bool) -> Place {
            if postgres {
                Place::Postgres(PgCluster::start())
            } else {
                Place::Sqlite(tempfile::tempdir().unwrap())
            }
        }

        /// A fresh connection to the store and the state it holds (as a restart reads it).
        async fn open(&self) -> (Box<dyn Backend>, State) {
            match self {
                Place::Sqlite(dir) => {
                    let b = sqlite::Sqlite::open(&dir.path().join("tessera.db")).unwrap();
                    let state = b.load(0).unwrap();
                    (Box::new(b), state)
                }
                Place::Postgres(pg) => {
                    let url = pg.url();
                    tokio::task::spawn_blocking(move || {
                        let b = postgres::Postgres::open(&url).unwrap();
                        let state = b.load(0).unwrap();
                        (Box::new(b) as Box<dyn Backend>, state)
                    })
                    .await
                    .unwrap()
                }
            }
        }

        async fn start(&self) -> Store {
            let (backend, state) = self.open().await;
            Store::start(backend, state)
        }

        /// Users as stored, read back through a connection of their own.
        async fn users(&self) -> Vec<String> {
            self.open().await.1.users.keys().cloned().collect()
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

    /// Writes `name` to the store and to memory, then panics half-way when asked to.
    async fn add_user(store: &Store, name: &'static str, panic: bool) -> Result<(), TestError> {
        store
            .write(move |w, s| {
                w.put_user(&user(name))?;
                s.users.insert(name.into(), user(name));
                if panic {
                    let missing: std::collections::HashMap<u64, u64> = Default::default();
                    let _ = missing[&42];
                }
                Ok::<(), TestError>(())
            })
            .await
    }

    async fn a_panicking_write_fails_alone(place: Place) {
        let store = place.start().await;
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
        assert_eq!(place.users().await, ["after", "before"]);
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
        assert_eq!(place.users().await, ["after", "before", "later"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_fails_alone_rolls_back_memory_and_file_and_the_writer_goes_on() {
        a_panicking_write_fails_alone(Place::new(false)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_fails_alone_on_postgresql_too() {
        a_panicking_write_fails_alone(Place::new(true)).await;
    }

    fn segment(seq: u64, project: &str, start_ms: u64, end_ms: u64) -> Segment {
        Segment {
            job: seq,
            attempt: 1,
            replica: 0,
            user: "ada".into(),
            project: project.into(),
            model: "H100".into(),
            node: "n1".into(),
            gpu_milli: 1000,
            gpu_memory_bytes: 1 << 30,
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            start_ms,
            end_ms,
            energy_mj: 7,
            simulated: true,
            idle_gpu_milli_ms: 0,
        }
    }

    /// Every kind of record goes in through [`Tx`], survives a reconnect, and the ledger reads
    /// return what was written, in the same way on both backends.
    async fn every_record_round_trips(place: Place) {
        let store = place.start().await;
        let token = TokenRecord {
            id: "t1".into(),
            kind: TokenKind::User,
            subject: "ada".into(),
            description: "laptop".into(),
            hash: "h".into(),
            created_ms: 5,
            revoked: false,
            uses_left: Some(2),
            expires_ms: None,
        };
        let project = Project {
            name: "vision".into(),
            parent: None,
            guaranteed_milli: 2000,
            limit_milli: Some(4000),
            over_quota_weight: 1,
            members: ["ada".to_string()].into(),
            created_ms: 3,
            min_runtime_ms: 0,
            policy: Default::default(),
        };
        let (t, p) = (token.clone(), project.clone());
        store
            .write_as(Some("ada".into()), move |w, _| -> Result<(), TestError> {
                assert_eq!(w.actor, Some("ada"));
                w.put_user(&user("ada"))?;
                w.put_user(&user("ada"))?; // a second put replaces
                w.put_project(&p)?;
                w.put_token(&t)?;
                w.put_meta("bootstrapped", "1")?;
                w.put_meta("bootstrapped", "2")?;
                for (job, ts_ms, kind, message) in [
                    (9, 10, crate::state::EventKind::Submitted, "it's here"),
                    (8, 11, crate::state::EventKind::Submitted, "another job's"),
                    (
                        9,
                        12,
                        crate::state::EventKind::Scheduled,
                        "attempt 1: replica 0 on n1",
                    ),
                    (9, 13, crate::state::EventKind::Running, "running on n1"),
                ] {
                    w.add_event(&Event {
                        job,
                        ts_ms,
                        kind,
                        message: message.into(),
                    })?;
                }
                for (seq, (project, start, end)) in
                    [("vision", 0, 100), ("vision", 200, 300), ("nlp", 50, 60)]
                        .into_iter()
                        .enumerate()
                {
                    w.add_usage(
                        seq as u64 + 1,
                        &segment(seq as u64 + 1, project, start, end),
                    )?;
                }
                for (i, action) in ["cancel", "deny", "cancel"].into_iter().enumerate() {
                    crate::controller::audit::record(
                        w,
                        100 + i as u64,
                        "ada",
                        action,
                        Some("vision"),
                        Some(9),
                        &format!("entry {i}"),
                    )?;
                }
                let point = |ts_ms, util_pct| Point {
                    ts_ms,
                    util_pct,
                    ..Default::default()
                };
                w.put_sample("node/n1/gpu0", &point(60_000, 10.0))?;
                w.put_sample("node/n1/gpu0", &point(60_000, 20.0))?; // the same minute again
                w.put_sample("node/n1/gpu1", &point(120_000, 30.0))?;
                w.put_sample("node/n2/gpu0", &point(1_000, 40.0))?;
                w.delete_samples_before(2_000)?;
                Ok(())
            })
            .await
            .unwrap();
        store
            .write(|w, _| -> Result<(), TestError> {
                assert_eq!(w.actor, None);
                assert_eq!(w.get_meta("bootstrapped")?.as_deref(), Some("2"));
                assert_eq!(w.get_meta("missing")?, None);
                Ok(())
            })
            .await
            .unwrap();

        let (_, state) = place.open().await;
        assert_eq!(state.users.keys().collect::<Vec<_>>(), ["ada"]);
        assert_eq!(state.projects.get("vision"), Some(&project));
        assert_eq!(state.tokens.get("t1").map(|t| t.uses_left), Some(Some(2)));
        assert_eq!(state.usage_seq, 3);

        type Read = Box<dyn FnOnce(&dyn Ledger) -> StoreResult<String> + Send>;
        let ledger = |f: Read| store.read_ledger("test", f);
        let usage = ledger(Box::new(|l| {
            let got = l.usage(
                2,
                Window {
                    since_ms: 40,
                    until_ms: 250,
                },
            )?;
            Ok(got
                .iter()
                .map(|s| format!("{}:{}", s.job, s.project))
                .collect::<Vec<_>>()
                .join(","))
        }))
        .await
        .unwrap();
        // Runs 1 and 2 (seq <= 2) overlap the window; 3 is past the sequence asked for.
        assert_eq!(usage, "1:vision,2:vision");
        let audit = ledger(Box::new(|l| {
            let mut seen = Vec::new();
            let filter = AuditFilter {
                since_ms: 0,
                until_ms: 1_000,
                action: Some("cancel".into()),
                ..Default::default()
            };
            l.audit(&filter, &mut |e| {
                let project = e.project.as_deref().unwrap_or("-");
                seen.push(format!(
                    "{} {} {project} {}",
                    e.detail,
                    e.actor,
                    e.job.unwrap_or(0)
                ));
                true
            })?;
            let mut first = Vec::new();
            l.audit(
                &AuditFilter {
                    until_ms: 1_000,
                    ..Default::default()
                },
                &mut |e| {
                    first.push(e.detail);
                    false
                },
            )?;
            Ok(format!("{seen:?} {first:?}"))
        }))
        .await
        .unwrap();
        assert_eq!(
            audit, r#"["entry 2 ada vision 9", "entry 0 ada vision 9"] ["entry 2"]"#,
            "newest first, filtered, and stopped when asked"
        );
        let samples = ledger(Box::new(|l| {
            let all = l.samples("node/n1/", false, 0)?;
            let one = l.samples("node/n1/gpu0", true, 0)?;
            Ok(format!(
                "{:?} {:?}",
                all.iter()
                    .map(|(s, p)| (s.clone(), p.util_pct))
                    .collect::<Vec<_>>(),
                one.iter()
                    .map(|(s, p)| (s.clone(), p.util_pct))
                    .collect::<Vec<_>>()
            ))
        }))
        .await
        .unwrap();
        assert_eq!(
            samples, r#"[("node/n1/gpu0", 20.0), ("node/n1/gpu1", 30.0)] [("node/n1/gpu0", 20.0)]"#,
            "a minute written twice keeps the later point; points before the cut are gone"
        );
        let events = ledger(Box::new(|l| {
            let say = |events: Vec<Event>| {
                events
                    .iter()
                    .map(|e| format!("{} {} {}", e.ts_ms, e.kind.as_str(), e.message))
                    .collect::<Vec<_>>()
            };
            Ok(format!(
                "{:?} {:?}",
                say(l.events(9, 200)?),
                say(l.events(9, 2)?)
            ))
        }))
        .await
        .unwrap();
        assert_eq!(
            events,
            r#"["10 Submitted it's here", "12 Scheduled attempt 1: replica 0 on n1", "13 Running running on n1"] ["12 Scheduled attempt 1: replica 0 on n1", "13 Running running on n1"]"#,
            "one job's events, oldest first; the newest when limited"
        );
    }

    /// A change the database refuses (a usage sequence number given twice) fails its write and
    /// leaves nothing of it, in the store or in memory; later writes go on. (SQLite refuses the
    /// statement at once; PostgreSQL, which receives a batch's changes together, at the commit.)
    async fn a_change_the_database_refuses_changes_nothing(place: Place) {
        let store = place.start().await;
        // A reader that began before the write may have seen it in memory: its answer is
        // withdrawn (see `gate`).
        let from = store.gate.first_unsettled();
        let refused = store
            .write(|w, s| -> Result<(), TestError> {
                w.put_user(&user("half"))?;
                let run = segment(1, "vision", 0, 10);
                w.add_usage(1, &run)?;
                w.add_usage(1, &run)?;
                s.users.insert("half".into(), user("half"));
                Ok(())
            })
            .await;
        assert!(refused.is_err(), "{refused:?}");
        // PostgreSQL refuses it at the commit, after memory changed; SQLite at the statement,
        // before: nothing was ever in memory, and the batch of it committed (nothing).
        let expected = match place {
            Place::Postgres(_) => Err(gate::Tainted),
            _ => Ok(()),
        };
        assert_eq!(
            store.gate.settled(from, store.gate.applied()).await,
            expected
        );
        assert!(place.users().await.is_empty(), "nothing of it stored");
        assert!(
            store.read(|s| s.users.is_empty()),
            "nothing of it in memory"
        );
        let from = store.gate.first_unsettled();
        add_user(&store, "after", false).await.unwrap();
        assert_eq!(store.gate.settled(from, store.gate.applied()).await, Ok(()));
        assert_eq!(place.users().await, ["after"]);
        assert_eq!(place.open().await.1.usage_seq, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_the_database_refuses_changes_nothing_on_sqlite() {
        a_change_the_database_refuses_changes_nothing(Place::new(false)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_the_database_refuses_changes_nothing_on_postgresql() {
        a_change_the_database_refuses_changes_nothing(Place::new(true)).await;
    }

    /// PostgreSQL gone: every write is refused as unavailable (503), nothing is acknowledged,
    /// the controller goes on; PostgreSQL back: writes resume by themselves, and what was
    /// acknowledged before is all there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_the_server_ended_between_batches_is_replaced_before_the_next() {
        let place = Place::new(true);
        let Place::Postgres(pg) = &place else {
            unreachable!()
        };
        let store = place.start().await;
        add_user(&store, "before", false).await.unwrap();
        // The server ends the writer's idle session (an administrator, a restarted pooler).
        let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let ended = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap();
        assert!(ended >= 1, "no session to end");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // The next write goes down a new session instead of failing on the dead one.
        add_user(&store, "after", false).await.unwrap();
        assert_eq!(place.users().await, ["after", "before"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_wait_out_a_database_that_went_away_and_resume_when_it_is_back() {
        let place = Place::new(true);
        let Place::Postgres(pg) = &place else {
            unreachable!()
        };
        let store = place.start().await;
        add_user(&store, "before", false).await.unwrap();
        pg.stop();
        for name in ["during1", "during2", "during3"] {
            match add_user(&store, name, false).await {
                Err(TestError::Fault(id)) => assert!(id.starts_with("fault-"), "{id}"),
                other => panic!("a write with the database away must fail, got {other:?}"),
            }
        }
        assert!(!store.writer_ok(std::time::Duration::from_secs(2)).await);
        pg.start_again();
        let mut resumed = false;
        for _ in 0..50 {
            if add_user(&store, "after", false).await.is_ok() {
                resumed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(resumed, "writes did not resume when the database came back");
        assert_eq!(place.users().await, ["after", "before"]);
        let mut in_memory = store.read(|s| s.users.keys().cloned().collect::<Vec<_>>());
        in_memory.sort();
        assert_eq!(
            in_memory,
            ["after", "before"],
            "memory holds nothing that was refused"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_round_trips_on_sqlite() {
        every_record_round_trips(Place::new(false)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_round_trips_on_postgresql() {
        every_record_round_trips(Place::new(true)).await;
    }
}
