//! Several controllers on one PostgreSQL store: which one answers what. The API is served by a
//! [`Switch`]: until this controller is elected it is a standby, which answers its own health and
//! sends every other request on to the leader (whose URL is in the lease row), so agents, the
//! CLI and scripts may be pointed at any controller of the pool. The service gateway is served
//! the same way, sending requests on to the leader's gateway. A standby answers some reads itself
//! from the state it follows from the store ([`Reads`]). Once elected, the switch hands
//! every request to the leader's router, which refuses work the moment the lease is no longer
//! surely held (a leader paused past its lease answers nothing it could get wrong).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

use super::gateway::hop_by_hop;
use super::{Reader, api};
use crate::auth::TokenCache;
use crate::state::State as PoolState;
use crate::store::follow::Follower;
use crate::store::lease::{Holder, Leadership};

/// The header a standby adds to what it sends on, naming itself: a request that arrives with it
/// is not sent on again (two controllers that each think the other leads would loop).
pub const FORWARDED_BY: &str = "x-tessera-forwarded-by";

/// The client a standby sent a request on for (its address), with the standby's proof (see
/// [`crate::auth::forwarded_proof`]): the leader counts the request against that client's
/// places, not the standby's. Taken from clients, these are dropped; unproven, ignored.
pub const FORWARDED_CLIENT: &str = "x-tessera-forwarded-client";
pub const FORWARDED_PROOF: &str = "x-tessera-forwarded-proof";

/// What a switch serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    Api,
    Gateway,
}

/// What answers the API (or the gateway): the leader's router once elected, the standby's
/// forwarding until then.
pub struct Switch {
    leader: OnceLock<Router>,
    /// Who leads, as last read from the lease row (shared by the API's and the gateway's).
    pub holder: Arc<Mutex<Option<Holder>>>,
    http: reqwest::Client,
    /// This controller's URL (`--advertise`), or its gateway's.
    pub me: String,
    serves: Serves,
    /// A standby's own answers to reads, once it follows the store.
    reads: OnceLock<(Arc<Reads>, Router)>,
    /// The pool's key, once read from the store: with it a standby vouches for the clients it
    /// sends requests on for.
    key: Arc<OnceLock<Vec<u8>>>,
}

/// The header on an answer a standby made itself from the state it follows (at most a
/// moment behind the leader's; see docs/ha.md).
pub const READ_FROM: &str = "x-tessera-read-from";

/// What a standby reads from: the state it follows from the store's change log.
pub struct Reads {
    /// Behind an async lock: the follow loop, a write sent on to the leader (which catches up
    /// before answering, so that its client reads what it wrote) and the takeover take turns.
    pub follower: tokio::sync::Mutex<Follower>,
    state: Arc<Mutex<PoolState>>,
    tokens: Arc<TokenCache>,
    /// The follower has read the store and still holds the state (a takeover takes it).
    serving: AtomicBool,
    /// When the last successful catch-up began (its copy holds every commit before that): a
    /// copy older than [`STALE_AFTER`] is not read from.
    caught_up_at: Mutex<Option<std::time::Instant>>,
    /// Jobs' events, read from the store on a connection of their own.
    events: crate::store::follow::EventReader,
}

/// A standby whose copy has not caught up with the store for this long (the database away or
/// cut off) sends reads on to the leader instead of answering from an old copy.
pub const STALE_AFTER: Duration = Duration::from_millis(1500);

/// How long one catch-up may take before its connection is given up on.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(2);

impl Reads {
    pub fn new(follower: Follower) -> Arc<Reads> {
        Arc::new(Reads {
            state: follower.shared().clone(),
            events: follower.event_reader(),
            follower: tokio::sync::Mutex::new(follower),
            tokens: Arc::default(),
            serving: AtomicBool::new(false),
            caught_up_at: Mutex::new(None),
        })
    }

    /// Reads what the leader committed since the last call.
    pub async fn catch_up(&self) -> anyhow::Result<usize> {
        self.catch_up_after(None).await
    }

    /// Makes the copy hold every commit made before `after`: a catch-up that began since then
    /// already read them, so a burst of writes sent on together costs one catch-up, not one
    /// each.
    async fn catch_up_after(&self, after: Option<std::time::Instant>) -> anyhow::Result<usize> {
        let mut follower = self.follower.lock().await;
        let last = *self.caught_up_at.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(after), Some(last)) = (after, last)
            && last >= after
        {
            return Ok(0);
        }
        let began = std::time::Instant::now();
        let now = super::now_ms();
        let changes = match tokio::time::timeout(CATCH_UP_WITHIN, follower.catch_up(now)).await {
            Ok(changes) => changes?,
            Err(_) => {
                follower.disconnect();
                anyhow::bail!("the database did not answer within {CATCH_UP_WITHIN:?}");
            }
        };
        *self.caught_up_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        // Not once the takeover took the state.
        if follower.warm() && !follower.taken() {
            self.serving.store(true, Ordering::SeqCst);
        }
        Ok(changes)
    }

    /// Whether reads are answered from the copy: it holds the state and caught up lately.
    fn fresh(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
            && self
                .caught_up_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < STALE_AFTER)
    }

    /// From now on reads are sent on (this controller takes over the state).
    pub fn stop_serving(&self) {
        self.serving.store(false, Ordering::SeqCst);
    }
}

impl Reader for Reads {
    fn state(&self) -> &Arc<Mutex<PoolState>> {
        &self.state
    }

    fn tokens(&self) -> &Arc<TokenCache> {
        &self.tokens
    }

    fn events(&self, job: u64) -> super::EventsRead<'_> {
        Box::pin(async move {
            let read = self.events.events(job, crate::state::EVENTS_PER_JOB as u64);
            tokio::time::timeout(CATCH_UP_WITHIN, read).await?
        })
    }
}

/// The reads a standby answers itself: those whose answers come whole from the store. A job's
/// own view is sent on: a waiting job's reason there is the leader's last scheduling round,
/// which is not stored.
fn reads_router(reads: Arc<Reads>) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/v1/jobs", get(api::list_jobs::<Reads>))
        .route("/v1/jobs/{id}/events", get(api::job_events::<Reads>))
        .route("/v1/nodes", get(api::list_nodes::<Reads>))
        .route("/v1/nodes/{name}", get(api::get_node::<Reads>))
        .with_state(reads)
}

/// Whether a standby answers `GET path` itself.
fn read_here(path: &str) -> bool {
    let one_segment = |rest: &str| !rest.is_empty() && !rest.contains('/');
    path == "/v1/jobs"
        || path == "/v1/nodes"
        || path.strip_prefix("/v1/nodes/").is_some_and(one_segment)
        || path
            .strip_prefix("/v1/jobs/")
            .and_then(|rest| rest.strip_suffix("/events"))
            .is_some_and(one_segment)
}

impl Switch {
    /// The API's switch of the controller at `me`, whose requests to the leader leave from
    /// `local` (the address it listens on, unless that is every address).
    pub fn new(me: String, local: std::net::IpAddr) -> anyhow::Result<Arc<Switch>> {
        Switch::serving(me, local, Serves::Api, Arc::default(), Arc::default())
    }

    /// The gateway's switch, beside the API's `api`.
    pub fn gateway(
        api: &Switch,
        me: String,
        local: std::net::IpAddr,
    ) -> anyhow::Result<Arc<Switch>> {
        Switch::serving(
            me,
            local,
            Serves::Gateway,
            api.holder.clone(),
            api.key.clone(),
        )
    }

    fn serving(
        me: String,
        local: std::net::IpAddr,
        serves: Serves,
        holder: Arc<Mutex<Option<Holder>>>,
        key: Arc<OnceLock<Vec<u8>>>,
    ) -> anyhow::Result<Arc<Switch>> {
        // No overall timeout: agents' long polls and log streams go through.
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none());
        if !local.is_unspecified() {
            http = http.local_address(local);
        }
        Ok(Arc::new(Switch {
            leader: OnceLock::new(),
            holder,
            http: http.build()?,
            me,
            serves,
            reads: OnceLock::new(),
            key,
        }))
    }

    /// The pool's key, read from the store: from now on requests sent on name their clients.
    pub fn know_key(&self, key: Vec<u8>) {
        let _ = self.key.set(key);
    }

    /// From now on this standby answers reads from `reads` while it serves.
    pub fn follow(&self, reads: Arc<Reads>) {
        let router = reads_router(reads.clone());
        let _ = self.reads.set((reads, router));
    }

    /// From now on every request goes to `router` (this controller leads).
    pub fn lead(&self, router: Router) {
        let _ = self.leader.set(router);
    }

    fn holder(&self) -> Option<Holder> {
        self.holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The API's router over a switch.
pub fn router(switch: Arc<Switch>) -> Router {
    Router::new().fallback(dispatch).with_state(switch)
}

async fn dispatch(State(sw): State<Arc<Switch>>, req: Request) -> Response {
    if let Some(router) = sw.leader.get() {
        return match router.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
    }
    if sw.serves == Serves::Api && req.uri().path() == "/healthz" {
        let leader = sw.holder().map(|h| h.url);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "standby",
                "role": "standby",
                "leader": leader,
            })),
        )
            .into_response();
    }
    let reads = sw.reads.get().filter(|(r, _)| r.fresh());
    if let Some((_, router)) = reads
        && sw.serves == Serves::Api
        && req.method() == axum::http::Method::GET
        && read_here(req.uri().path())
    {
        let mut resp = match router.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        if let Ok(me) = axum::http::HeaderValue::from_str(&format!("standby {}", sw.me)) {
            resp.headers_mut().insert(READ_FROM, me);
        }
        return resp;
    }
    let write = req.method() != axum::http::Method::GET;
    let resp = forward(&sw, req).await;
    let answered = std::time::Instant::now();
    // The leader committed what it acknowledged: read it before answering, so that a client
    // writing and reading through this standby reads its own writes.
    if write
        && resp.status().is_success()
        && let Some((reads, _)) = sw.reads.get()
        && let Err(e) = reads.catch_up_after(Some(answered)).await
    {
        tracing::warn!("following the leader's changes after a write: {e:#}");
    }
    resp
}

fn error(status: StatusCode, message: String) -> Response {
    let mut resp = (
        status,
        axum::Json(serde_json::json!({"error": {"message": message}})),
    )
        .into_response();
    resp.headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    resp
}

/// Sends a request on to the leader and streams its answer back.
async fn forward(sw: &Switch, req: Request) -> Response {
    let Some(holder) = sw.holder() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no controller of this pool holds the leader's lease yet (an election is under \
             way); retry in a second"
                .into(),
        );
    };
    let target = match sw.serves {
        Serves::Api => holder.url.clone(),
        Serves::Gateway => holder.gateway.clone(),
    };
    if target.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the leader at {} runs no service gateway", holder.url),
        );
    }
    if target == sw.me {
        // The lease names this controller, which has not taken up the work yet.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this controller is taking over as the leader; retry in a second".into(),
        );
    }
    if let Some(by) = req.headers().get(FORWARDED_BY) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this controller is a standby, and so is {} that sent the request on; the \
                 leadership is changing, retry in a second",
                by.to_str().unwrap_or("?")
            ),
        );
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = sw
        .http
        .request(parts.method.clone(), format!("{target}{path}"))
        .header(FORWARDED_BY, &sw.me)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()));
    for (name, value) in &parts.headers {
        // Only this controller vouches for a client, never the client itself.
        let claimed = *name == FORWARDED_CLIENT || *name == FORWARDED_PROOF;
        if !hop_by_hop(name.as_str()) && !claimed {
            out = out.header(name, value);
        }
    }
    let client = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    if let (Some(key), Some(client)) = (sw.key.get(), client) {
        let proof = crate::auth::forwarded_proof(key, &client, super::now_ms() / 1000);
        out = out
            .header(FORWARDED_CLIENT, client)
            .header(FORWARDED_PROOF, proof);
    }
    match out.send().await {
        Ok(resp) => {
            let status = resp.status();
            let mut headers = HeaderMap::new();
            for (name, value) in resp.headers() {
                if !hop_by_hop(name.as_str()) {
                    headers.append(name, value.clone());
                }
            }
            (status, headers, Body::from_stream(resp.bytes_stream())).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the leader at {target} cannot be reached ({e}); a standby takes over within \
                 seconds, retry"
            ),
        ),
    }
}

/// Reads the pool's key from the store until it is there (the first leader makes it), so that
/// this standby can vouch for the clients it sends requests on for.
pub async fn learn_key(url: String, switch: Arc<Switch>) {
    loop {
        match read_key(&url).await {
            Ok(Some(key)) => {
                switch.know_key(key.into_bytes());
                return;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("reading the pool's key: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn read_key(url: &str) -> Result<Option<String>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driving = tokio::spawn(connection);
    let row = client
        .query_opt("SELECT value FROM meta WHERE key = 'callback_key'", &[])
        .await;
    drop(client);
    let _ = driving.await;
    Ok(row?.map(|r| r.get(0)))
}

/// What the leader needs to count a standby's request against the client it names.
pub struct Vouched {
    connections: Arc<super::limits::Connections>,
    key: Vec<u8>,
}

/// `router` (the leader's API or service gateway) behind [`count_forwarded_client`], counting
/// against `connections` the clients that standbys vouch for under `key`.
pub fn counting_forwarded_clients(
    router: Router,
    connections: Arc<super::limits::Connections>,
    key: Vec<u8>,
) -> Router {
    let vouched = Arc::new(Vouched { connections, key });
    router.layer(axum::middleware::from_fn_with_state(
        vouched,
        count_forwarded_client,
    ))
}

/// A layer of the leader's router: a request a standby sent on, naming its client with a valid
/// proof, is counted against that client's places (`--max-connections-per-address`) while it
/// is answered, body included, instead of against the standby's, which all its other clients
/// share. A client over its share gets 503; a claim without a valid proof counts for nothing.
/// The same layer stands before the leader's service gateway.
async fn count_forwarded_client(
    State(vouched): State<Arc<Vouched>>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    // Taken out: what is behind the leader (a service behind its gateway) never sees a proof
    // it could replay.
    let mut take = |h: &str| {
        req.headers_mut()
            .remove(h)
            .and_then(|v| v.to_str().ok().map(str::to_string))
    };
    let (client, proof) = (take(FORWARDED_CLIENT), take(FORWARDED_PROOF));
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let (Some(client), Some(proof), Some(peer)) = (client, proof, peer) else {
        return next.run(req).await;
    };
    let now = super::now_ms() / 1000;
    let Some(client) = crate::auth::forwarded_client(&vouched.key, &client, &proof, now) else {
        // Anyone can send the headers: a refused claim is not worth a warning per request.
        tracing::debug!("{peer} named a client it sent a request on for without a valid proof");
        return next.run(req).await;
    };
    let Some(charged) = vouched.connections.charge_to(peer, client) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{client} holds as many requests and connections as one address may \
                 (--max-connections-per-address); retry when some are answered"
            ),
        );
    };
    let (parts, body) = next.run(req).await.into_parts();
    // Counted until the answer's last byte is sent (a log stream holds its place as long).
    let body = futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _held = &charged;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// A layer of the leader's router: once the lease is not surely held, nothing more is answered,
/// checked when a request arrives and again when its answer is ready (an agent told of replicas
/// by a leader that was already replaced could run one twice).
pub async fn while_leading(
    State(leadership): State<Arc<Leadership>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if leadership.holds() {
        let answer = next.run(req).await;
        // An agent's long poll may have waited past the lease's end: its answer would tell of
        // replicas that the next leader may already have moved.
        if leadership.holds() {
            return answer;
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this controller lost the leader's lease and is stopping; retry (another controller of \
         the pool answers)"
            .into(),
    )
}
