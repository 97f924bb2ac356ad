//! The PostgreSQL backend: the same tables as SQLite, reached with tokio-postgres. No
//! connection runs on the controller's runtime (the writer blocks on the database, and handlers
//! may occupy every worker): the writer's is driven by the writer's own thread (see [`Driver`]),
//! and readers of the ledger and checkpoint chunks share connections on a small runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};

use super::{AuditFilter, Backend, Ledger, LedgerOpener, StoreError, StoreResult, Tx, doc, schema};
use crate::controller::audit::Entry;
use crate::controller::registries::RegistryLogin;
use crate::controller::telemetry::Point;
use crate::metering::{Segment, Window};
use crate::state::{
    CheckpointManifest, Event, Job, Node, Project, Service, State, TokenRecord, User,
};

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let disk_full = e
            .code()
            .is_some_and(|c| *c == tokio_postgres::error::SqlState::DISK_FULL);
        // The server's own words (e.g. a constraint's) are in the source error.
        let message = match e.as_db_error() {
            Some(db) => format!("postgresql: {}", db.message()),
            None => format!("postgresql: {e}"),
        };
        // No SQLSTATE: the server did not answer (down, cut off, the connection closed). A
        // deposed leader's write is refused as the store being away: another controller
        // answers it.
        let unavailable = e.code().is_none()
            || message.contains(super::lease::FENCED)
            || message.contains(super::lease::LAPSED);
        StoreError {
            message,
            disk_full,
            unavailable,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects, and drives the connection on `rt` until it closes.
fn connect(rt: &Driver, url: &str) -> StoreResult<Client> {
    let (client, connection) = rt.block_on(tokio_postgres::connect(url, NoTls))?;
    rt.spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("postgresql connection ended: {e}");
        }
    });
    Ok(client)
}

/// What polls a connection. The writer's connection is driven by the writer's own thread, on a
/// single-thread runtime polled only while the writer waits for an answer: each exchange with
/// the server then needs no hand-off to another thread (on a busy machine every hand-off waits
/// for a core). Readers and checkpoint chunks, used from many threads, share a runtime.
#[derive(Clone)]
enum Driver {
    Local(Arc<OwnRuntime>),
    Shared(Handle),
}

impl Driver {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Driver::Local(rt) => rt.get().block_on(f),
            Driver::Shared(h) => h.block_on(f),
        }
    }

    /// Gives the connection's task a turn on the writer's runtime, which runs only while the
    /// writer waits on it: a session the server ended since the last batch is then seen as
    /// closed (and replaced) before a batch is sent down it. Two yields: the first polls the
    /// socket and wakes the task, the second lets it run.
    fn turn(&self) {
        if let Driver::Local(rt) = self {
            rt.get().block_on(async {
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
            });
        }
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self {
            Driver::Local(rt) => drop(rt.get().spawn(f)),
            Driver::Shared(h) => drop(h.spawn(f)),
        }
    }
}

/// The writer's connection to one PostgreSQL database.
pub struct Postgres {
    url: String,
    /// The writer's connection's driver (see [`Driver`]).
    local: Driver,
    rt: Handle,
    _runtime: Arc<OwnRuntime>,
    /// `None` after the connection was lost, until the next batch reconnects.
    conn: Option<PgConn>,
    readers: Arc<Mutex<Option<Arc<Client>>>>,
    /// With several controllers: the lease every batch must still hold (see [`super::lease`]),
    /// and its length.
    fence: Option<(Arc<super::lease::Leadership>, std::time::Duration)>,
    /// A batch's transaction is open: a connection lost now lost the batch with it, and must
    /// not be replaced by a fresh one whose COMMIT would report nothing wrong.
    in_batch: bool,
}

/// A connection and the runtime that drives it: what [`Tx`] and [`Ledger`] run on.
pub struct PgConn {
    client: Client,
    rt: Driver,
    /// Statements prepared on this connection, by their text.
    prepared: Mutex<HashMap<String, Statement>>,
    /// Changes of the open transaction not yet sent: they go together, pipelined, before the
    /// commit (or a read), so that a batch of writes costs a few round trips, not one each.
    pending: Mutex<Vec<(Statement, Vec<Encoded>)>>,
    /// Where the current write's changes begin in `pending` (its savepoint).
    mark: Mutex<usize>,
    /// A transaction was begun and its BEGIN not sent yet: it goes with the first changes.
    unsent_begin: Mutex<bool>,
}

/// The mark of a write some of whose changes were already sent.
const SENT: usize = usize::MAX;

/// A parameter already in PostgreSQL's binary form (`None`: NULL), so that a change can wait in
/// `pending` without borrowing from the write that made it.
#[derive(Debug)]
struct Encoded(Option<Vec<u8>>);

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(b) => {
                out.extend_from_slice(b);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl PgConn {
    fn new(client: Client, rt: Driver) -> Self {
        PgConn {
            client,
            rt,
            prepared: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
            mark: Mutex::new(0),
            unsent_begin: Mutex::new(false),
        }
    }

    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
        {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Queues a change of the open transaction (sent by [`PgConn::flush`]).
    fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> StoreResult<()> {
        let stmt = self.rt.block_on(self.statement(sql))?;
        let mut encoded = Vec::with_capacity(params.len());
        for (p, ty) in params.iter().zip(stmt.params()) {
            let mut buf = bytes::BytesMut::new();
            let value = match p.to_sql_checked(ty, &mut buf) {
                Ok(IsNull::No) => Some(buf.to_vec()),
                Ok(IsNull::Yes) => None,
                Err(e) => return Err(StoreError::new(format!("a value for {sql:?}: {e}"))),
            };
            encoded.push(Encoded(value));
        }
        lock(&self.pending).push((stmt, encoded));
        Ok(())
    }

    /// Sends every queued change, behind the transaction's BEGIN if that is not sent yet and,
    /// with `commit`, followed by COMMIT: all pipelined, so a batch costs one round trip. When a
    /// change fails the server aborts the transaction (its COMMIT then rolls back) and the
    /// change's error is returned.
    fn flush(&self, commit: bool) -> StoreResult<()> {
        let work = std::mem::take(&mut *lock(&self.pending));
        let mut mark = lock(&self.mark);
        // Changes of the current write went out: it can no longer be rolled back alone.
        *mark = if work.len() > *mark { SENT } else { 0 };
        drop(mark);
        let begin = std::mem::replace(&mut *lock(&self.unsent_begin), false);
        if work.is_empty() && !begin && !commit {
            return Ok(());
        }
        self.rt.block_on(async {
            let begin = async {
                match begin {
                    true => self.client.batch_execute("BEGIN").await,
                    false => Ok(()),
                }
            };
            let changes = futures_util::future::try_join_all(work.iter().map(|(stmt, params)| {
                self.client
                    .execute_raw(stmt, params.iter().map(|p| p as &(dyn ToSql + Sync)))
            }));
            let end = async {
                match commit {
                    true => self.client.batch_execute("COMMIT").await,
                    false => Ok(()),
                }
            };
            // Polled in this order, the three are sent in this order.
            let (begun, changed, committed) =
                futures_util::future::join3(begin, changes, end).await;
            begun?;
            changed?;
            committed
        })?;
        Ok(())
    }

    fn batch(&self, sql: &str) -> StoreResult<()> {
        Ok(self.rt.block_on(self.client.batch_execute(sql))?)
    }

    /// Reads, after the changes queued so far (a read sees the transaction's own changes).
    fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<tokio_postgres::Row>> {
        self.flush(false)?;
        Ok(self.rt.block_on(async {
            let stmt = self.statement(sql).await?;
            self.client.query(&stmt, params).await
        })?)
    }
}

impl Postgres {
    /// Connects to `url` (`postgresql://USER:PASS@HOST:PORT/DB`) and migrates the schema. Call
    /// from a thread that is not running async code (the writer blocks on the connection).
    pub fn open(url: &str) -> anyhow::Result<Postgres> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-postgresql")
            .enable_all()
            .build()
            .context("starting the PostgreSQL client's runtime")?;
        let rt = runtime.handle().clone();
        let runtime = Arc::new(OwnRuntime(Some(runtime)));
        let local = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the PostgreSQL writer's runtime")?;
        let local = Driver::Local(Arc::new(OwnRuntime(Some(local))));
        let client =
            connect(&local, url).with_context(|| format!("connecting to {}", redact(url)))?;
        let conn = PgConn::new(client, local.clone());
        migrate(&conn)?;
        Ok(Postgres {
            url: url.to_string(),
            local,
            rt,
            _runtime: runtime,
            conn: Some(conn),
            readers: Arc::new(Mutex::new(None)),
            fence: None,
            in_batch: false,
        })
    }

    /// From now on every batch begins with the fence of `leadership`'s token: it commits only
    /// while that token holds an unexpired lease, and a refused one marks the leadership lost.
    /// A transaction left open longer than `lease` (its controller paused between two round
    /// trips of a batch) is ended by the server, so that its lock on the lease row cannot hold
    /// off the next leader.
    pub fn fence_with(
        &mut self,
        leadership: Arc<super::lease::Leadership>,
        lease: std::time::Duration,
    ) -> StoreResult<()> {
        self.fence = Some((leadership, lease));
        if let Some(conn) = &self.conn {
            conn.batch(&idle_limit(lease))?;
        }
        Ok(())
    }

    fn conn(&mut self) -> StoreResult<&PgConn> {
        if !self.in_batch {
            self.local.turn();
        }
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            if self.in_batch {
                return Err(StoreError {
                    message: "postgresql: the connection was lost during the batch; none of it \
                              was stored"
                        .into(),
                    disk_full: false,
                    unavailable: true,
                });
            }
            self.conn = None;
            let client = connect(&self.local, &self.url)?;
            let conn = PgConn::new(client, self.local.clone());
            if let Some((_, lease)) = &self.fence {
                conn.batch(&idle_limit(*lease))?;
            }
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref().expect("connected just above"))
    }
}

/// The setting that ends a session left idle inside a transaction for longer than `lease`.
fn idle_limit(lease: std::time::Duration) -> String {
    format!(
        "SET idle_in_transaction_session_timeout = {}",
        lease.as_millis().max(1000)
    )
}

/// The client's runtime, shut down without waiting when the backend goes (which may happen on
/// an async thread, where a runtime may not block).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Applies the schema migrations this database has not run, each in its own transaction.
fn migrate(conn: &PgConn) -> anyhow::Result<()> {
    conn.batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    // One controller migrates at a time (several may start together).
    conn.batch("BEGIN; LOCK TABLE schema_version IN EXCLUSIVE MODE")?;
    let done = (|| -> anyhow::Result<()> {
        let rows = conn.rows("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?;
        let version = rows.first().map_or(0, |r| r.get::<_, i32>(0)) as usize;
        if version > schema::MIGRATIONS.len() {
            anyhow::bail!(
                "the database has schema version {version}, newer than this tessera ({}); run a \
                 newer tessera",
                schema::MIGRATIONS.len()
            );
        }
        for (i, m) in schema::MIGRATIONS.iter().enumerate().skip(version) {
            conn.batch(m.postgres)
                .with_context(|| format!("schema migration {}", i + 1))?;
            conn.exec(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&((i + 1) as i32)],
            )?;
        }
        Ok(())
    })();
    match done {
        Ok(()) => conn.flush(true)?,
        Err(e) => {
            let _ = conn.batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(())
}

impl Backend for Postgres {
    fn begin(&mut self) -> StoreResult<()> {
        let token = self.fence.as_ref().and_then(|(f, _)| f.token());
        self.in_batch = false;
        self.conn()?;
        self.in_batch = true;
        let conn = self.conn()?;
        lock(&conn.pending).clear();
        *lock(&conn.unsent_begin) = true;
        if let Some(token) = token {
            // First in the transaction, so a deposed leader's batch aborts before any change.
            conn.exec("SELECT tessera_fence($1)", &[&token])?;
        }
        Ok(())
    }

    // A write's changes wait in `pending` until the commit: its savepoint is where they begin
    // there, and rolling back to it drops them before they were ever sent. (A write that reads
    // sends what came before it first; its own reads then see the database, as in SQLite.)
    fn savepoint(&mut self) -> StoreResult<()> {
        let conn = self.conn()?;
        *lock(&conn.mark) = lock(&conn.pending).len();
        Ok(())
    }

    fn release(&mut self) -> StoreResult<()> {
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        let conn = self.conn()?;
        let mark = *lock(&conn.mark);
        let mut pending = lock(&conn.pending);
        if mark != SENT {
            pending.truncate(mark);
            Ok(())
        } else {
            // The write read the database, which sent its earlier changes: they cannot be
            // taken back alone, so the batch fails and memory is reloaded.
            Err(StoreError::new(
                "a write that read the store cannot be rolled back alone",
            ))
        }
    }

    fn commit(&mut self) -> StoreResult<()> {
        let done = self.conn().and_then(|c| c.flush(true));
        self.in_batch = false;
        if let (Err(e), Some((fence, _))) = (&done, &self.fence)
            && e.message.contains(super::lease::FENCED)
        {
            tracing::error!("a write batch was refused: {}", e.message);
            fence.lose();
        }
        done
    }

    fn rollback(&mut self) {
        self.in_batch = false;
        if let Some(c) = &self.conn {
            lock(&c.pending).clear();
            *lock(&c.unsent_begin) = false;
        }
        // (Outside a transaction PostgreSQL only warns.)
        if let Some(c) = &self.conn
            && c.batch("ROLLBACK").is_err()
        {
            // A connection that cannot even roll back is dropped; the next batch reconnects.
            self.conn = None;
        }
    }

    fn reconnect(&mut self) -> StoreResult<()> {
        self.conn().map(|_| ())
    }

    fn tx(&self) -> &dyn Tx {
        match &self.conn {
            Some(c) => c,
            None => &Disconnected,
        }
    }

    fn load(&self, now_ms: u64) -> anyhow::Result<State> {
        let conn = self
            .conn
            .as_ref()
            .context("the database connection was lost")?;
        super::load_state(conn, now_ms)
    }

    fn blobs(&self) -> Option<Arc<dyn super::blobs::Blobs>> {
        Some(Arc::new(PgBlobs {
            url: self.url.clone(),
            rt: self.rt.clone(),
            _runtime: self._runtime.clone(),
            client: Mutex::new(None),
        }))
    }

    fn ledger(&self) -> LedgerOpener {
        let (url, rt, readers) = (self.url.clone(), self.rt.clone(), self.readers.clone());
        let runtime = self._runtime.clone();
        Box::new(move || {
            let _alive = &runtime;
            let mut shared = readers.lock().unwrap_or_else(|e| e.into_inner());
            let client = match shared.as_ref().filter(|c| !c.is_closed()) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(connect(&Driver::Shared(rt.clone()), &url)?);
                    *shared = Some(c.clone());
                    c
                }
            };
            Ok(Box::new(PgReader {
                client,
                rt: rt.clone(),
            }) as Box<dyn Ledger>)
        })
    }
}

/// Checkpoint chunks in the `blobs` table, on a connection of their own (reconnected when
/// lost), so that uploads never wait behind the writer.
struct PgBlobs {
    url: String,
    rt: Handle,
    _runtime: Arc<OwnRuntime>,
    client: Mutex<Option<Arc<Client>>>,
}

impl PgBlobs {
    fn client(&self) -> StoreResult<Arc<Client>> {
        let mut shared = lock(&self.client);
        if let Some(c) = shared.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(connect(&Driver::Shared(self.rt.clone()), &self.url)?);
        *shared = Some(c.clone());
        Ok(c)
    }
}

impl super::blobs::Blobs for PgBlobs {
    fn missing(&self, hashes: Vec<String>) -> StoreResult<Vec<String>> {
        let c = self.client()?;
        let rows = self
            .rt
            .block_on(c.query("SELECT hash FROM blobs WHERE hash = ANY($1)", &[&hashes]))?;
        let present: std::collections::HashSet<String> =
            rows.iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(hashes
            .into_iter()
            .filter(|h| !present.contains(h))
            .collect())
    }

    fn put(&self, hash: &str, bytes: &[u8]) -> StoreResult<()> {
        let c = self.client()?;
        self.rt.block_on(c.execute(
            "INSERT INTO blobs (hash, data) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING",
            &[&hash, &bytes],
        ))?;
        Ok(())
    }

    fn get(&self, hash: &str) -> StoreResult<Option<Vec<u8>>> {
        let c = self.client()?;
        let row = self
            .rt
            .block_on(c.query_opt("SELECT data FROM blobs WHERE hash = $1", &[&hash]))?;
        Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
    }
}

/// What a write sees while the database is unreachable: every change fails.
struct Disconnected;

fn unreachable_db<T>() -> StoreResult<T> {
    Err(StoreError {
        unavailable: true,
        ..StoreError::new("the database is unreachable; the write was not made")
    })
}

impl Tx for Disconnected {
    fn put_user(&self, _: &User) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_project(&self, _: &Project) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_job(&self, _: &Job) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_node(&self, _: &Node) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_service(&self, _: &Service) -> StoreResult<()> {
        unreachable_db()
    }
    fn delete_service(&self, _: &str) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_registry_login(&self, _: &RegistryLogin) -> StoreResult<()> {
        unreachable_db()
    }
    fn delete_registry_login(&self, _: &str, _: &str) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_token(&self, _: &TokenRecord) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_checkpoint(&self, _: &CheckpointManifest) -> StoreResult<()> {
        unreachable_db()
    }
    fn delete_checkpoint(&self, _: u64, _: u32) -> StoreResult<()> {
        unreachable_db()
    }
    fn add_event(&self, _: &Event) -> StoreResult<()> {
        unreachable_db()
    }
    fn get_meta(&self, _: &str) -> StoreResult<Option<String>> {
        unreachable_db()
    }
    fn put_meta(&self, _: &str, _: &str) -> StoreResult<()> {
        unreachable_db()
    }
    fn add_usage(&self, _: u64, _: &Segment) -> StoreResult<()> {
        unreachable_db()
    }
    fn add_audit(&self, _: &Entry) -> StoreResult<()> {
        unreachable_db()
    }
    fn put_sample(&self, _: &str, _: &Point) -> StoreResult<()> {
        unreachable_db()
    }
    fn delete_samples_before(&self, _: u64) -> StoreResult<()> {
        unreachable_db()
    }
}

impl super::Records for PgConn {
    fn docs(&self, table: &str) -> anyhow::Result<Vec<String>> {
        let rows = self.rows(&format!("SELECT doc FROM {table}"), &[])?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    fn usage_seq(&self) -> anyhow::Result<u64> {
        let rows = self.rows("SELECT COALESCE(MAX(seq), 0) FROM usage", &[])?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }
}

/// Inserts or replaces a document keyed by `key` columns.
fn upsert(conn: &PgConn, sql: &str, params: &[&(dyn ToSql + Sync)]) -> StoreResult<()> {
    conn.exec(sql, params)
}

impl Tx for PgConn {
    fn put_user(&self, u: &User) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO users (name, doc) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&u.name, &doc(u)?],
        )
    }

    fn put_project(&self, p: &Project) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO projects (name, doc) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&p.name, &doc(p)?],
        )
    }

    fn put_job(&self, j: &Job) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO jobs (id, project, state, doc) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET project = EXCLUDED.project, \
             state = EXCLUDED.state, doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&(j.id as i64), &j.project(), &j.state.name(), &doc(j)?],
        )
    }

    fn put_node(&self, n: &Node) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO nodes (name, doc) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&n.spec.name, &doc(n)?],
        )
    }

    fn put_service(&self, svc: &Service) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO services (name, doc) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&svc.name, &doc(svc)?],
        )
    }

    fn delete_service(&self, name: &str) -> StoreResult<()> {
        // The key stays in the change log for standbys (see `store::follow`).
        self.exec(
            "WITH gone AS (DELETE FROM services WHERE name = $1 RETURNING name) \
             INSERT INTO deletions (tbl, key) SELECT 'services', to_json(name)::text FROM gone",
            &[&name],
        )
    }

    fn put_registry_login(&self, l: &RegistryLogin) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO registry_logins (project, registry, doc) VALUES ($1, $2, $3) \
             ON CONFLICT (project, registry) DO UPDATE SET doc = EXCLUDED.doc, \
             rev = EXCLUDED.rev",
            &[&l.project, &l.registry, &doc(l)?],
        )
    }

    fn delete_registry_login(&self, project: &str, registry: &str) -> StoreResult<()> {
        self.exec(
            "WITH gone AS (DELETE FROM registry_logins WHERE project = $1 AND registry = $2 \
             RETURNING project, registry) INSERT INTO deletions (tbl, key) \
             SELECT 'registry_logins', json_build_array(project, registry)::text FROM gone",
            &[&project, &registry],
        )
    }

    fn put_token(&self, t: &TokenRecord) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO tokens (id, doc) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, rev = EXCLUDED.rev",
            &[&t.id, &doc(t)?],
        )
    }

    fn put_checkpoint(&self, m: &CheckpointManifest) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO checkpoints (job, replica, id, doc) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (job, replica) DO UPDATE SET id = EXCLUDED.id, doc = EXCLUDED.doc, \
             rev = EXCLUDED.rev",
            &[&(m.job as i64), &(m.replica as i32), &m.id, &doc(m)?],
        )
    }

    fn delete_checkpoint(&self, job: u64, replica: u32) -> StoreResult<()> {
        self.exec(
            "WITH gone AS (DELETE FROM checkpoints WHERE job = $1 AND replica = $2 \
             RETURNING job, replica) INSERT INTO deletions (tbl, key) \
             SELECT 'checkpoints', json_build_array(job, replica)::text FROM gone",
            &[&(job as i64), &(replica as i32)],
        )
    }

    fn add_event(&self, e: &Event) -> StoreResult<()> {
        self.exec(
            "INSERT INTO events (job, ts_ms, kind, message) VALUES ($1, $2, $3, $4)",
            &[
                &(e.job as i64),
                &(e.ts_ms as i64),
                &e.kind.as_str(),
                &e.message,
            ],
        )
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        let rows = self.rows("SELECT value FROM meta WHERE key = $1", &[&key])?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn put_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value],
        )
    }

    fn add_usage(&self, seq: u64, s: &Segment) -> StoreResult<()> {
        self.exec(
            "INSERT INTO usage (seq, job, project, start_ms, end_ms, doc) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &(seq as i64),
                &(s.job as i64),
                &s.project,
                &(s.start_ms as i64),
                &(s.end_ms as i64),
                &doc(s)?,
            ],
        )
    }

    fn add_audit(&self, e: &Entry) -> StoreResult<()> {
        self.exec(
            "INSERT INTO audit (ts_ms, actor, action, project, job, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &(e.ts_ms as i64),
                &e.actor,
                &e.action,
                &e.project,
                &e.job.map(|j| j as i64),
                &e.detail,
            ],
        )
    }

    fn put_sample(&self, series: &str, p: &Point) -> StoreResult<()> {
        upsert(
            self,
            "INSERT INTO samples (series, ts_ms, doc) VALUES ($1, $2, $3) \
             ON CONFLICT (series, ts_ms) DO UPDATE SET doc = EXCLUDED.doc",
            &[&series, &(p.ts_ms as i64), &doc(p)?],
        )
    }

    fn delete_samples_before(&self, ts_ms: u64) -> StoreResult<()> {
        self.exec("DELETE FROM samples WHERE ts_ms < $1", &[&(ts_ms as i64)])
    }
}

/// A reader of the ledger tables on the shared reader connection.
struct PgReader {
    client: Arc<Client>,
    rt: Handle,
}

impl PgReader {
    fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<tokio_postgres::Row>> {
        Ok(self.rt.block_on(self.client.query(sql, params))?)
    }
}

/// A job's newest events (`$1` the job, `$2` how many), newest first: the leader's reader and a
/// standby's both ask this.
pub(super) const JOB_EVENTS: &str =
    "SELECT ts_ms, kind, message FROM events WHERE job = $1 ORDER BY seq DESC LIMIT $2";

/// The rows of [`JOB_EVENTS`] as events, oldest first.
pub(super) fn job_events(job: u64, rows: &[tokio_postgres::Row]) -> StoreResult<Vec<Event>> {
    rows.iter()
        .rev()
        .map(|r| super::event_of(job, r.get::<_, i64>(0) as u64, r.get(1), r.get(2)))
        .collect()
}

impl Ledger for PgReader {
    fn events(&self, job: u64, limit: u64) -> StoreResult<Vec<Event>> {
        let rows = self.rows(JOB_EVENTS, &[&(job as i64), &(limit as i64)])?;
        job_events(job, &rows)
    }

    fn usage(&self, seq: u64, w: Window) -> StoreResult<Vec<Segment>> {
        let rows = self.rows(
            "SELECT doc FROM usage WHERE seq <= $1 AND end_ms > $2 AND start_ms < $3",
            &[&(seq as i64), &(w.since_ms as i64), &(w.until_ms as i64)],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(serde_json::from_str(r.get::<_, &str>(0))?);
        }
        Ok(out)
    }

    fn audit(&self, f: &AuditFilter, each: &mut dyn FnMut(Entry) -> bool) -> StoreResult<()> {
        let rows = self.rows(
            "SELECT seq, ts_ms, actor, action, project, job, detail FROM audit
             WHERE ts_ms >= $1 AND ts_ms <= $2
               AND ($3::TEXT IS NULL OR project = $3)
               AND ($4::BIGINT IS NULL OR job = $4)
               AND ($5::TEXT IS NULL OR action = $5)
             ORDER BY seq DESC",
            &[
                &(f.since_ms as i64),
                &(f.until_ms as i64),
                &f.project,
                &f.job.map(|j| j as i64),
                &f.action,
            ],
        )?;
        for r in rows {
            let e = Entry {
                seq: r.get::<_, i64>(0) as u64,
                ts_ms: r.get::<_, i64>(1) as u64,
                actor: r.get(2),
                action: r.get(3),
                project: r.get(4),
                job: r.get::<_, Option<i64>>(5).map(|j| j as u64),
                detail: r.get(6),
            };
            if !each(e) {
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
        let rows = self.rows(
            "SELECT series, doc FROM samples WHERE series LIKE $1 AND ts_ms >= $2 ORDER BY ts_ms",
            &[&pattern, &(since_ms as i64)],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((r.get(0), serde_json::from_str(r.get::<_, &str>(1))?));
        }
        Ok(out)
    }
}
