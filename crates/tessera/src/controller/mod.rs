//! The controller: the HTTP API, the store, and the reconcile loop that turns the pool's state
//! into a scheduler snapshot and applies the plan.

pub mod agents;
pub mod api;
pub mod audit;
pub mod checkpoints;
pub mod disk;
pub mod gateway;
pub mod idle;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod reconcile;
pub mod registries;
pub mod services;
pub mod standby;
pub mod telemetry;
pub mod ui;
pub mod usage;
pub mod views;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::FromRequestParts;
pub use axum::extract::State as AxState;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use tessera_sched::ValidationError;

use crate::auth::{NewToken, Principal, Quick, TokenCache, new_token};
use crate::state::{Project, Role, TokenKind, TokenRecord, User};
use crate::store::{self, Store, StoreFault, StoreGone};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`--store`); `None`: SQLite in the data dir.
    pub store: Option<String>,
    /// Where the other controllers, agents and clients reach this controller's API
    /// (`--advertise`; default: the listen address's URL).
    pub advertise: Option<String>,
    /// How long the leader's lease lasts unrenewed among controllers on one PostgreSQL store.
    pub leader_lease: Duration,
    pub listen: SocketAddr,
    /// How long an agent may go unheard before its node is lost; agents stop their workloads
    /// when their own copy of the lease runs out, before the controller moves the work.
    pub lease: Duration,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub seed: u64,
    /// How the live pool places work (`--policy`).
    pub policy: tessera_sched::PolicyKind,
    /// Where the service gateway listens (plain HTTP), if anywhere.
    pub gateway: Option<SocketAddr>,
    /// Chargeback rates and the carbon factor for usage reports.
    pub rates: crate::metering::Rates,
    /// Half-life of past use in fair share; `None`: only current use counts.
    pub fair_share_half_life: Option<Duration>,
    /// Most output kept per replica, told to every agent.
    pub log_limit: u64,
    /// Free bytes kept on the store's file system (see [`disk`]).
    pub disk_reserve: u64,
    /// Most open connections to the API (and, apart, to the gateway), in all and from one
    /// address (see [`limits`]).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Bytes of request bodies the gateway holds at once (see [`gateway::Gateway::new`]).
    pub gateway_body_budget: usize,
    /// Ports reserved for gangs' rendezvous (`MASTER_PORT`) on every node, as Slurm reserves
    /// `MpiParams=ports`: each gang gets one on its rank 0's node, unique there.
    pub rendezvous_ports: std::ops::RangeInclusive<u16>,
}

/// Shared by every request handler and the reconcile loop.
pub struct Controller {
    pub store: Store,
    pub tokens: Arc<TokenCache>,
    pub config: ControllerConfig,
    pub metrics: metrics::Metrics,
    pub http: reqwest::Client,
    pub gateway: Arc<gateway::Gateway>,
    /// Recent device and workload readings (see [`telemetry`]).
    pub telemetry: std::sync::Mutex<telemetry::Telemetry>,
    /// Open connections of the API and of the gateway (see [`limits`]).
    pub connections: [(&'static str, Arc<limits::Connections>); 2],
    /// The key agents' callback secrets are derived from (see [`crate::auth::callback_secret`]):
    /// in its own file beside a SQLite store; in the database, shared by every controller, on
    /// PostgreSQL.
    pub callback_key: Vec<u8>,
    /// Checkpoint chunks: files in the data dir beside SQLite, the database on PostgreSQL.
    pub blobs: Arc<dyn store::blobs::Blobs>,
    /// Whether this controller may act as the leader (always, alone on SQLite).
    pub leadership: Arc<store::lease::Leadership>,
}

pub type Ctl = Arc<Controller>;

/// What answers reads and authenticates callers: the leader's state, or a standby's copy
/// followed from the store (see [`standby::Reads`]). Handlers that only read are generic over
/// it, so that a standby answers them with the leader's code.
pub trait Reader: Send + Sync + 'static {
    fn state(&self) -> &Arc<std::sync::Mutex<crate::state::State>>;
    fn tokens(&self) -> &Arc<TokenCache>;

    fn read<T>(&self, f: impl FnOnce(&crate::state::State) -> T) -> T {
        f(&self.state().lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The commit gate of a state that may show changes still committing (see `store::gate`);
    /// `None` where everything read is already committed.
    fn gate(&self) -> Option<&Arc<store::gate::CommitGate>> {
        None
    }

    /// A job's newest events, oldest first, read from the store (they are not kept in memory).
    fn events(&self, job: u64) -> EventsRead<'_>;
}

/// The answer of [`Reader::events`].
pub type EventsRead<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = anyhow::Result<Vec<crate::state::Event>>> + Send + 'a>,
>;

impl Reader for Controller {
    fn state(&self) -> &Arc<std::sync::Mutex<crate::state::State>> {
        &self.store.state
    }

    fn tokens(&self) -> &Arc<TokenCache> {
        &self.tokens
    }

    fn gate(&self) -> Option<&Arc<store::gate::CommitGate>> {
        Some(&self.store.gate)
    }

    fn events(&self, job: u64) -> EventsRead<'_> {
        Box::pin(self.store.read_ledger("events", move |l| {
            l.events(job, crate::state::EVENTS_PER_JOB as u64)
        }))
    }
}

/// An API error: an HTTP status and a message that names the problem and its fix.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    status: u16,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// Names the request field at fault.
    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

impl From<StoreGone> for ApiError {
    fn from(_: StoreGone) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store is not taking writes now (the controller is stopping, or a commit \
             failed); nothing was changed, try again",
        )
    }
}

impl From<StoreFault> for ApiError {
    fn from(e: StoreFault) -> Self {
        let status = match e.kind {
            store::FaultKind::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            store::FaultKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        ApiError::internal(format!("store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl Caller {
    /// A user, or 403.
    pub fn user(&self) -> Result<(&str, Role), ApiError> {
        match &self.0 {
            Principal::User { name, role } => Ok((name, *role)),
            _ => Err(ApiError::forbidden(
                "this token belongs to an agent or is a join token; use a user's token",
            )),
        }
    }

    pub fn admin(&self) -> Result<&str, ApiError> {
        match self.user()? {
            (name, Role::Admin) => Ok(name),
            (name, _) => Err(ApiError::forbidden(format!(
                "user {name} is not an admin; ask an admin to do this"
            ))),
        }
    }
}

impl<R: Reader> FromRequestParts<Arc<R>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, reader: &Arc<R>) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)?;
        let principal = match reader.tokens().quick(token, reader.state()) {
            Quick::Known(p) => p,
            Quick::Slow => {
                let (tokens, state) = (reader.tokens().clone(), reader.state().clone());
                let token = token.to_string();
                // An earlier version's argon2 hash takes milliseconds of CPU on the token's first
                // use: keep it off the async workers.
                let _slot = argon2_slot().await?;
                tokio::task::spawn_blocking(move || tokens.authenticate(&token, &state))
                    .await
                    .map_err(|_| ApiError::internal("authentication task failed"))?
            }
        };
        principal.map(Caller).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the bearer token is unknown or revoked; get a new one with `tessera token create`",
            )
        })
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no bearer token: send `Authorization: Bearer <token>` (set TESSERA_TOKEN or the \
                 config file for the CLI)",
            )
        })?;
    value.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the Authorization header must be `Bearer <token>`",
        )
    })
}

/// A permit to verify one argon2 hash (tokens of earlier versions). Each takes ~19 MiB and
/// milliseconds of CPU; a caller replaying such a token's id with wrong secrets must queue for
/// the cores, not allocate gigabytes on the blocking pool.
async fn argon2_slot() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    static SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    SLOTS
        .acquire()
        .await
        .map_err(|_| ApiError::internal("token hashing is shut down"))
}

/// Writes the record of token `t` (made by [`new_token`]) and returns it.
pub fn issue_token(
    c: &crate::store::Write,
    state: &mut crate::state::State,
    kind: TokenKind,
    subject: &str,
    description: &str,
    t: NewToken,
) -> crate::store::StoreResult<NewToken> {
    let rec = TokenRecord {
        id: t.id.clone(),
        kind,
        subject: subject.to_string(),
        description: description.to_string(),
        hash: t.hash.clone(),
        created_ms: now_ms(),
        revoked: false,
        uses_left: None,
        expires_ms: None,
    };
    c.put_token(&rec)?;
    state.tokens.insert(rec.id.clone(), rec);
    Ok(t)
}

/// Limits a join token just issued: it joins `uses` nodes and stops working at `expires_ms`.
pub fn limit_join_token(
    c: &crate::store::Write,
    state: &mut crate::state::State,
    id: &str,
    uses: u32,
    expires_ms: Option<u64>,
) -> crate::store::StoreResult<()> {
    if let Some(t) = state.tokens.get_mut(id) {
        t.uses_left = Some(uses);
        t.expires_ms = expires_ms;
        c.put_token(t)?;
    }
    Ok(())
}

/// What a first start creates: the admin user, its token (returned once), the default project.
pub async fn bootstrap(store: &Store) -> anyhow::Result<Option<String>> {
    let t = new_token();
    let token = store
        .write(move |c, s| -> Result<Option<String>, ApiError> {
            if c.get_meta("bootstrapped")?.is_some() {
                return Ok(None);
            }
            let now = c.now_ms;
            let admin = User {
                name: "admin".into(),
                role: Role::Admin,
                created_ms: now,
                uid: None,
            };
            c.put_user(&admin)?;
            let default = Project::open("default", now);
            c.put_project(&default)?;
            c.put_meta("bootstrapped", &now.to_string())?;
            let t = issue_token(c, s, TokenKind::User, "admin", "first admin token", t)?;
            s.users.insert(admin.name.clone(), admin);
            s.projects.insert(default.name.clone(), default);
            Ok(Some(t.text))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(token)
}

/// A join token for the local agent of `tessera up` (created once, kept in the data dir).
pub async fn local_join_token(store: &Store, data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("local-join-token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_string());
    }
    let t = new_token();
    let text = store
        .write(move |c, s| -> Result<String, ApiError> {
            let what = "local agent of tessera up";
            let t = issue_token(c, s, TokenKind::Join, "admin", what, t)?;
            limit_join_token(c, s, &t.id, 1, None)?;
            Ok(t.text)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    write_private(&path, &text)?;
    Ok(text)
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, true)
}

/// Writes a file only its owner can read (0600, also when it existed before), syncing it to disk
/// when `durable`.
pub fn write_file(path: &Path, text: &str, durable: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    if durable {
        f.sync_all()?;
    }
    Ok(())
}

/// Creates directory `dir` if needed and sets its mode (0700: its owner's alone; 0711: others
/// may pass through to a path they know, but not list it).
pub fn restrict(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// A missing or empty store beside what an earlier pool left (its WAL, agent state, checkpoint
/// blobs, reserved job ids, its key) is a lost store, not a new pool: bootstrapping an empty
/// pool there would give agents' replica keys out again and orphan their work.
fn refuse_a_lost_store(data_dir: &Path, db: &Path) -> anyhow::Result<()> {
    let empty = std::fs::metadata(db).map_or(true, |m| m.len() == 0);
    if !empty {
        return Ok(());
    }
    let wal = db.with_file_name("tessera.db-wal");
    let left: Vec<String> = [
        wal.clone(),
        data_dir.join("agent"),
        data_dir.join("blobs"),
        data_dir.join("job-ids"),
        data_dir.join("callback.key"),
    ]
    .iter()
    .filter(|p| std::fs::symlink_metadata(p).is_ok())
    .map(|p| p.display().to_string())
    .collect();
    if left.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the store {} is missing or empty, but the data dir holds an earlier pool's state ({}). \
         Its store was lost: restore tessera.db (with tessera.db-wal if it had one) from a \
         backup and start again; or, to make a new pool, give an empty --data-dir (the old \
         agents must then join the new pool afresh)",
        db.display(),
        left.join(", ")
    )
}

/// Makes the store's files and the controller's own files private where an older version (or
/// another umask) left them readable: `tessera.db*`, blobs, keys.
fn restrict_existing(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with("tessera.db") || name == "callback.key" {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        } else if name == "blobs" {
            restrict(&path, 0o700)?;
        }
    }
    Ok(())
}

/// The controller's key for derived secrets: 32 random bytes in a 0600 file, made on first use.
fn load_or_make_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => Ok(key),
        Ok(_) => anyhow::bail!(
            "{} is shorter than a key; remove it (agents then register again with a new one)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::auth::random_secret();
            write_private(path, &key)?;
            Ok(key.into_bytes())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A running controller.
pub struct Running {
    pub ctl: Ctl,
    pub addr: SocketAddr,
    /// Where the service gateway listens.
    pub gateway: Option<SocketAddr>,
    pub first_admin_token: Option<String>,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ControllerConfig {
    /// The store's SQLite file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("tessera.db")
    }
}

/// Opens the SQLite store in the data dir and reads the state back.
fn open_sqlite(
    config: &ControllerConfig,
) -> anyhow::Result<(Box<dyn store::Backend>, crate::state::State)> {
    refuse_a_lost_store(&config.data_dir, &config.store_path())?;
    let backend = store::sqlite::Sqlite::open(&config.store_path())?;
    let state = store::Backend::load(&backend, now_ms())?;
    Ok((Box::new(backend), state))
}

/// How often a standby tries to take the lease (and reads who holds it).
const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);

/// How often a standby reads the leader's changes from the change log.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// On PostgreSQL: serves the API as a standby (sending requests on to the leader) while it
/// campaigns for the lease; once elected, reads the state back under the lease's fence.
async fn elect_and_open(
    config: &ControllerConfig,
    url: &str,
    switch: &Arc<standby::Switch>,
    gateway: Option<&Arc<standby::Switch>>,
    on_standby: &mut dyn FnMut(Option<&str>),
) -> anyhow::Result<(
    Box<dyn store::Backend>,
    crate::state::State,
    store::lease::Campaign,
)> {
    // Opening waits on the database (and migrates it): not on an async thread.
    let opened = url.to_string();
    let mut backend = tokio::task::spawn_blocking(move || store::postgres::Postgres::open(&opened))
        .await
        .context("opening the PostgreSQL store")??;
    // Meanwhile the state is followed from the change log: the standby answers reads from it,
    // and taking over reads only what changed since the last poll.
    let reads = standby::Reads::new(store::follow::Follower::new(url));
    switch.follow(reads.clone());
    let (stop_following, mut stopped) = tokio::sync::watch::channel(false);
    let following = tokio::spawn({
        let reads = reads.clone();
        async move {
            let mut failing = false;
            loop {
                match reads.catch_up().await {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        tracing::warn!("following the leader's changes: {e:#}");
                        failing = true;
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                    _ = stopped.changed() => return,
                }
            }
        }
    });
    let learning = tokio::spawn(standby::learn_key(url.to_string(), switch.clone()));
    let id = format!("{}#{}", switch.me, &crate::auth::random_secret()[..8]);
    let gateway = gateway.map(|g| g.me.clone()).unwrap_or_default();
    let mut campaign = store::lease::Campaign::new(
        url,
        id,
        switch.me.clone(),
        gateway.clone(),
        config.leader_lease,
    );
    let mut told = None;
    let token = campaign
        .elect(CAMPAIGN_EVERY, |holder, err| {
            if let Some(e) = err {
                // Who led last is the best guess while the lease cannot be read: requests go on
                // to it (a leader that lost its lease refuses them itself).
                tracing::warn!("campaigning for the leader's lease: {e:#}");
                return;
            }
            *switch.holder.lock().unwrap_or_else(|e| e.into_inner()) = holder.cloned();
            let leader = holder.map(|h| h.url.clone());
            if told.as_ref() != Some(&leader) {
                on_standby(leader.as_deref());
                told = Some(leader);
            }
        })
        .await;
    *switch.holder.lock().unwrap_or_else(|e| e.into_inner()) = Some(store::lease::Holder {
        id: String::new(),
        url: switch.me.clone(),
        gateway,
        token,
    });
    let (leadership, lease) = (campaign.leadership.clone(), config.leader_lease);
    // Holding the lease, this controller sees every commit of the one before (whose batches
    // cannot commit any more): what it followed, plus the rest of the log, is the state.
    let _ = stop_following.send(true);
    following.await.context("following the leader's changes")?;
    learning.abort();
    reads.stop_serving();
    let began = std::time::Instant::now();
    let mut follower = reads.follower.lock().await;
    let caught_up = follower.catch_up(now_ms()).await;
    let followed = follower.take_state(now_ms());
    drop(follower);
    // The backend blocks on its own runtime: not on an async thread.
    let (backend, state) = tokio::task::spawn_blocking(move || {
        backend
            .fence_with(leadership, lease)
            .map_err(|e| anyhow::anyhow!("setting up the leader's connection: {e}"))?;
        let state = match caught_up {
            Ok(changes) => {
                tracing::info!(
                    "took over the followed state: {changes} changes caught up in {} ms",
                    began.elapsed().as_millis()
                );
                followed
            }
            Err(e) => {
                tracing::warn!("reading the store whole, the change log failed: {e:#}");
                store::Backend::load(&backend, now_ms())?
            }
        };
        anyhow::Ok((backend, state))
    })
    .await
    .context("reading the PostgreSQL store")??;
    tracing::info!("this controller leads the pool (lease token {token})");
    Ok((Box::new(backend), state, campaign))
}

/// The key for derived secrets on PostgreSQL: in the database, made by the first leader, so
/// that every controller derives the same agents' secrets.
async fn shared_key(store: &Store) -> anyhow::Result<Vec<u8>> {
    let key = store
        .write(|c, _| -> Result<String, ApiError> {
            if let Some(key) = c.get_meta("callback_key")? {
                return Ok(key);
            }
            let key = crate::auth::random_secret();
            c.put_meta("callback_key", &key)?;
            Ok(key)
        })
        .await
        .map_err(|e| anyhow::anyhow!("storing the controller's key: {}", e.message))?;
    Ok(key.into_bytes())
}

/// The URL the other controllers, agents and clients reach this one at.
fn advertised(config: &ControllerConfig, addr: SocketAddr) -> String {
    if let Some(url) = &config.advertise {
        return url.trim_end_matches('/').to_string();
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    format!("{scheme}://{host}")
}

/// The URL the other controllers reach this one's service gateway at: its listen address, or,
/// where that is every address, the host the API is advertised at.
fn gateway_advertised(api: &str, addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return format!("http://{addr}");
    }
    let host = api
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(|authority| match authority.rsplit_once(':') {
            Some((host, _)) => host.to_string(),
            None => authority.to_string(),
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    format!("http://{host}:{}", addr.port())
}

/// Opens the store, bootstraps it, starts the reconcile loop and the HTTP server. On
/// PostgreSQL it first waits for the leader's lease, serving as a standby; `on_standby` is told
/// who leads (or that none does) each time that changes meanwhile.
pub async fn start_telling(
    config: ControllerConfig,
    on_standby: &mut dyn FnMut(Option<&str>),
) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {}", config.data_dir.display()))?;
    // The store and everything beside it are the controller's alone: files it creates are
    // 0600 and directories 0700 (a workload's own files get the usual 022 from its shim).
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    // Under `tessera up` the agent, sharing the data dir, opens it to 0711 for workloads to
    // pass through to the simulated driver.
    restrict(&config.data_dir, 0o700)?;
    restrict_existing(&config.data_dir)?;
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("listening on {} (is it in use?)", config.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let switch = standby::Switch::new(advertised(&config, addr), addr.ip())?;
    // The service gateway: on a standby it sends requests on to the leader's.
    let gateway = match config.gateway {
        Some(at) => {
            let listener = std::net::TcpListener::bind(at)
                .with_context(|| format!("gateway listening on {at} (is it in use?)"))?;
            listener.set_nonblocking(true)?;
            let local = listener.local_addr()?;
            let gw = standby::Switch::gateway(
                &switch,
                gateway_advertised(&switch.me, local),
                addr.ip(),
            )?;
            Some((listener, local, gw))
        }
        None => None,
    };
    let gateway_connections =
        limits::Connections::new(config.max_connections, config.max_connections_per_address);
    if let Some((listener, _, gw)) = &gateway {
        let (listener, app) = (listener.try_clone()?, standby::router(gw.clone()));
        let connections = gateway_connections.clone();
        tokio::spawn(async move {
            if let Err(e) = limits::serve(listener, None, app, connections).await {
                tracing::error!("the gateway stopped: {e}");
            }
        });
    }
    let connections =
        limits::Connections::new(config.max_connections, config.max_connections_per_address);
    let (backend, mut state, campaign, server) = match &config.store {
        // Opened first: a lost SQLite store is told apart from a new pool by what else the data
        // dir holds, the controller's key among it.
        None => {
            let (backend, state) = open_sqlite(&config)?;
            (backend, state, None, None)
        }
        // Several controllers may share the database: the API answers (as a standby) from the
        // start, and this controller takes up the work once elected.
        Some(url) => {
            let server = serve(
                standby::router(switch.clone()),
                &config,
                listener.try_clone()?,
                connections.clone(),
            )
            .await?;
            let (backend, state, campaign) = elect_and_open(
                &config,
                url,
                &switch,
                gateway.as_ref().map(|(_, _, gw)| gw),
                on_standby,
            )
            .await?;
            (backend, state, Some(campaign), Some(server))
        }
    };
    state.id_ceiling = Some(
        crate::state::IdCeiling::load(&config.data_dir.join("job-ids"))
            .context("reading the highest job id given")?,
    );
    let leadership = campaign
        .as_ref()
        .map_or_else(store::lease::Leadership::sole, |c| c.leadership.clone());
    let blobs = store::Backend::blobs(backend.as_ref())
        .unwrap_or_else(|| Arc::new(store::blobs::Dir(config.data_dir.join("blobs"))));
    let store = Store::start(backend, state);
    if let Some(campaign) = campaign {
        tokio::spawn(campaign.keep());
    }
    let first_admin_token = bootstrap(&store).await?;
    let callback_key = match &config.store {
        None => load_or_make_key(&config.data_dir.join("callback.key"))?,
        Some(_) => shared_key(&store).await?,
    };
    let ctl = Arc::new(Controller {
        store,
        tokens: Arc::default(),
        metrics: metrics::Metrics::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?,
        config: config.clone(),
        gateway: Arc::new(gateway::Gateway::new(config.gateway_body_budget)),
        telemetry: Default::default(),
        callback_key,
        connections: [
            ("api", connections.clone()),
            ("gateway", gateway_connections),
        ],
        leadership: leadership.clone(),
        blobs,
    });
    tokio::spawn(reconcile::run(ctl.clone()));
    tokio::spawn(telemetry::run(ctl.clone(), Duration::from_secs(20)));
    tokio::spawn(idle::run(ctl.clone(), Duration::from_millis(500)));
    if let Some(h) = config.fair_share_half_life {
        tokio::spawn(usage::history_loop(ctl.clone(), h, Duration::from_secs(30)));
    }
    tokio::spawn(services::run(ctl.clone()));
    let gateway_addr = gateway.map(|(_, local, gw)| {
        let services = gateway::router(ctl.gateway.clone());
        let (connections, key) = (ctl.connections[1].1.clone(), ctl.callback_key.clone());
        gw.lead(standby::counting_forwarded_clients(
            services,
            connections,
            key,
        ));
        local
    });
    let api = router(ctl.clone()).layer(axum::middleware::from_fn_with_state(
        leadership,
        standby::while_leading,
    ));
    switch.lead(standby::counting_forwarded_clients(
        api,
        connections.clone(),
        ctl.callback_key.clone(),
    ));
    let server = match server {
        Some(server) => server,
        None => serve(standby::router(switch), &config, listener, connections).await?,
    };
    Ok(Running {
        ctl,
        addr,
        gateway: gateway_addr,
        first_admin_token,
        server,
    })
}

async fn serve(
    app: Router,
    config: &ControllerConfig,
    listener: std::net::TcpListener,
    connections: Arc<limits::Connections>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let handle = match &config.tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!(
                        "loading the TLS certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?;
            tokio::spawn(async move {
                limits::serve(listener, Some(tls), app, connections)
                    .await
                    .context("serving HTTPS")
            })
        }
        None => tokio::spawn(async move {
            limits::serve(listener, None, app, connections)
                .await
                .context("serving HTTP")
        }),
    };
    Ok(handle)
}

pub fn router(ctl: Ctl) -> Router {
    use axum::routing::{delete, get, post};
    Router::new()
        .route("/", get(ui::root))
        .route("/ui", get(ui::root))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::app))
        .route("/ui/style.css", get(ui::style))
        .route("/ui/favicon.svg", get(ui::icon))
        .route("/favicon.ico", get(ui::icon))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::scrape))
        .route("/healthz", get(healthz))
        .route(
            "/v1/jobs",
            post(api::submit).get(api::list_jobs::<Controller>),
        )
        .route("/v1/jobs/{id}", get(api::get_job::<Controller>))
        .route("/v1/jobs/{id}/cancel", post(api::cancel_job))
        .route("/v1/jobs/{id}/migrate", post(api::migrate_job))
        .route("/v1/jobs/{id}/manifest", get(api::job_manifest))
        .route("/v1/jobs/{id}/exec", get(api::exec_job))
        .route("/v1/jobs/{id}/port-forward", get(api::forward_job))
        .route("/v1/jobs/{id}/hold", post(api::hold_job))
        .route("/v1/jobs/{id}/release", post(api::release_job))
        .route("/v1/jobs/{id}/requeue", post(api::requeue_job))
        .route("/v1/jobs/{id}/events", get(api::job_events::<Controller>))
        .route("/v1/jobs/{id}/logs", get(api::job_logs))
        .route("/v1/services", post(services::create).get(services::list))
        .route(
            "/v1/services/{name}",
            get(services::get).delete(services::delete),
        )
        .route("/v1/services/{name}/scale", post(services::scale))
        .route("/v1/services/{name}/move", post(services::move_replica))
        .route("/v1/usage", get(usage::get_usage))
        .route("/v1/audit", get(audit::get_audit))
        .route("/v1/telemetry", get(telemetry::get_series))
        .route("/v1/nodes", get(api::list_nodes::<Controller>))
        .route("/v1/nodes/{name}", get(api::get_node::<Controller>))
        .route("/v1/nodes/{name}/cordon", post(api::cordon_node))
        .route("/v1/nodes/{name}/uncordon", post(api::uncordon_node))
        .route("/v1/nodes/{name}/drain", post(api::drain_node))
        .route("/v1/nodes/{name}/replace", post(api::replace_node))
        .route(
            "/v1/projects",
            get(api::list_projects).post(api::create_project),
        )
        .route(
            "/v1/projects/{name}",
            get(api::get_project).patch(api::update_project),
        )
        .route("/v1/projects/{name}/members", post(api::set_members))
        .route("/v1/projects/{name}/registries", get(registries::list))
        .route(
            "/v1/projects/{name}/registries/{registry}",
            axum::routing::put(registries::put).delete(registries::delete),
        )
        .route("/v1/users", get(api::list_users).post(api::create_user))
        .route("/v1/tokens", get(api::list_tokens).post(api::create_token))
        .route("/v1/tokens/{id}", delete(api::revoke_token))
        .route("/v1/whoami", get(api::whoami))
        .route("/v1/pool", get(api::pool))
        .route("/v1/agent/register", post(agents::register))
        .route("/v1/agent/sync", post(agents::sync))
        .route("/v1/agent/chunks/missing", post(checkpoints::missing))
        .route(
            "/v1/agent/chunks/{hash}",
            axum::routing::put(checkpoints::put_chunk).get(checkpoints::get_chunk),
        )
        .route("/v1/agent/checkpoints", post(checkpoints::put_checkpoint))
        .route(
            "/v1/agent/checkpoints/{id}",
            get(checkpoints::get_checkpoint),
        )
        .fallback(|| async {
            ApiError::not_found("no such endpoint; the API is described at /openapi.json")
        })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            handler_panicked,
        ))
        .layer(axum::middleware::from_fn_with_state(
            ctl.store.gate.clone(),
            after_commit,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(ctl)
}

/// Answers built from reads leave only once what they read is durable (see `store::gate`): every
/// read, and an agent's sync (whose answer is the work its node should run). Other writes need no
/// wait, since each one's reply already waits for its own commit; withdrawing a committed write's
/// answer would make its client retry what was done.
async fn after_commit(
    axum::extract::State(gate): axum::extract::State<Arc<store::gate::CommitGate>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reads = req.method() == axum::http::Method::GET
        || req.method() == axum::http::Method::HEAD
        || req.uri().path() == "/v1/agent/sync";
    if !reads {
        return next.run(req).await;
    }
    let from = gate.first_unsettled();
    let resp = next.run(req).await;
    match gate.settled(from, gate.applied()).await {
        Ok(()) => resp,
        Err(tainted) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, tainted.to_string()).into_response()
        }
    }
}

/// Every error of the API is JSON (`{"error": {"status", "message"}}`), also those the HTTP layer
/// makes itself (a malformed query or path, a method the route does not have, a body over the
/// limit), so that clients parse one shape.
async fn json_errors(resp: Response) -> Response {
    use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
    let status = resp.status();
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// A bug in one handler fails that request with a 500 naming a fault id (written to the log
/// with the details) instead of dropping the connection without an answer.
fn handler_panicked(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let id = store::fault_id();
    let message = store::panic_message(payload.as_ref());
    tracing::error!(fault = %id, "a request handler panicked: {message}");
    ApiError::internal(format!(
        "internal error {id}; the controller log has the details"
    ))
    .into_response()
}

/// Liveness for load balancers and supervisors: 200 only while the store's writer commits (a
/// controller whose writer is stuck answers every write 503 and must be restarted, not trusted).
async fn healthz(AxState(ctl): S) -> (StatusCode, Json<serde_json::Value>) {
    use std::sync::atomic::Ordering;
    let health = &ctl.store.health;
    // A writer that committed within the last second is fine without a probe: an open endpoint
    // must not let anyone queue a store write per request.
    let fresh = now_ms().saturating_sub(health.last_commit_ms.load(Ordering::Relaxed)) < 1000;
    let ok = !health.stopped.load(Ordering::SeqCst)
        && (fresh || ctl.store.writer_ok(Duration::from_secs(5)).await);
    let last_fault = health
        .last_fault
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "store": {
            "writer": if ok { "committing" } else { "stopped or stuck" },
            "faults": health.faults.load(Ordering::SeqCst),
            "last_fault": last_fault,
        },
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// The state extractor alias used by handlers.
pub type S = AxState<Ctl>;
