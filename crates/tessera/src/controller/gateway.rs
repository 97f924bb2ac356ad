//! The service gateway: `http://GATEWAY/NAME/path` goes to a ready replica of service NAME.
//!
//! Replicas are chosen by fewest requests in flight. A replica takes requests only once its
//! readiness check has passed, and none once it is draining; a request whose replica refuses
//! the connection goes to another one (nothing was sent), so a replica that died between two
//! probes costs a retry, not a failed request. The counters here (requests in flight, requests
//! served) are what draining waits on and what the autoscaler reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State as AxState};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::now_ms;

/// One replica the gateway may send requests to.
#[derive(Debug)]
pub struct Endpoint {
    pub job: u64,
    pub node: String,
    /// `http://host:port`.
    pub url: String,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    pub in_flight: AtomicU64,
    pub served: AtomicU64,
    failures: AtomicU32,
    probing: AtomicBool,
    last_probe_ms: AtomicU64,
}

impl Endpoint {
    fn new(job: u64, node: String, url: String) -> Endpoint {
        Endpoint {
            job,
            node,
            url,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            last_probe_ms: AtomicU64::new(0),
        }
    }

    fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::SeqCst) + 1 >= 2 {
            self.ready.store(false, Ordering::SeqCst);
        }
    }
}

/// A service as the gateway sees it.
#[derive(Debug, Default)]
pub struct Route {
    pub endpoints: Vec<Arc<Endpoint>>,
    pub readiness_path: String,
    pub readiness_period_ms: u64,
    /// Requests received, ever (the autoscaler's rate is its change over time).
    pub requests: Arc<AtomicU64>,
}

pub struct Gateway {
    client: reqwest::Client,
    /// Bytes of request bodies the gateway may hold at once, across all requests: each body is
    /// kept until it is answered (it may be resent to another replica), so without a bound a few
    /// large uploads take the controller's memory.
    body_budget: Arc<tokio::sync::Semaphore>,
    budget_bytes: usize,
    routes: RwLock<HashMap<String, Arc<Route>>>,
    /// Endpoints by job, kept across refreshes so their counters and readiness survive.
    by_job: Mutex<HashMap<u64, Arc<Endpoint>>>,
    requests: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

/// What a refresh is told about one service replica.
pub struct Seen {
    pub job: u64,
    pub node: String,
    pub url: String,
    pub draining: bool,
}

/// Most bytes of a request body the gateway buffers (it may resend it to another replica).
const MAX_BODY: usize = 64 << 20;
/// How long a request waits for a ready replica before the gateway answers 503.
const WAIT_FOR_READY: Duration = Duration::from_secs(10);

impl Gateway {
    /// A gateway holding at most `body_budget` bytes of request bodies at once.
    pub fn new(body_budget: usize) -> Gateway {
        Gateway {
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(64)
                .build()
                .expect("a plain HTTP client"),
            body_budget: Arc::new(tokio::sync::Semaphore::new(body_budget)),
            budget_bytes: body_budget,
            routes: Default::default(),
            by_job: Default::default(),
            requests: Default::default(),
        }
    }

    /// Reads a request body within the budget: the body and the budget it holds until dropped,
    /// or the answer to give (413 over [`MAX_BODY`], 503 while the budget is spent).
    async fn take_body(
        &self,
        body: Body,
    ) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), Response> {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                )
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            if data.len() + chunk.len() > MAX_BODY {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over the gateway's {} MiB per request",
                        MAX_BODY >> 20
                    ),
                ));
            }
            let permit = self
                .body_budget
                .clone()
                .try_acquire_many_owned(chunk.len() as u32)
                .map_err(|_| {
                    let mut resp = error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the gateway holds its most request bytes in flight ({} MiB); \
                             retry shortly",
                            self.budget_bytes >> 20
                        ),
                    );
                    resp.headers_mut()
                        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                    resp
                })?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            data.extend_from_slice(&chunk);
        }
        Ok((Bytes::from(data), held))
    }

    /// Replaces the routing table with what the store says runs now.
    pub fn refresh(&self, services: Vec<(String, String, u64, Vec<Seen>)>) {
        let mut by_job = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep = HashMap::new();
        let mut routes = HashMap::new();
        for (name, path, period, seen) in services {
            let endpoints = seen
                .into_iter()
                .map(|s| {
                    let ep = match by_job.get(&s.job) {
                        Some(e) if e.url == s.url => e.clone(),
                        _ => Arc::new(Endpoint::new(s.job, s.node, s.url)),
                    };
                    if s.draining {
                        ep.draining.store(true, Ordering::SeqCst);
                    }
                    keep.insert(ep.job, ep.clone());
                    ep
                })
                .collect();
            let counter = requests.entry(name.clone()).or_default().clone();
            routes.insert(
                name,
                Arc::new(Route {
                    endpoints,
                    readiness_path: path,
                    readiness_period_ms: period,
                    requests: counter,
                }),
            );
        }
        requests.retain(|name, _| routes.contains_key(name));
        *by_job = keep;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    pub fn route(&self, service: &str) -> Option<Arc<Route>> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
            .cloned()
    }

    pub fn endpoint(&self, job: u64) -> Option<Arc<Endpoint>> {
        self.by_job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .cloned()
    }

    /// Starts the readiness checks that are due (each endpoint at its service's period).
    pub fn probe_due(self: &Arc<Self>) {
        let now = now_ms();
        let routes: Vec<Arc<Route>> = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for route in routes {
            for ep in &route.endpoints {
                let last = ep.last_probe_ms.load(Ordering::SeqCst);
                if now < last + route.readiness_period_ms || ep.probing.swap(true, Ordering::SeqCst)
                {
                    continue;
                }
                ep.last_probe_ms.store(now, Ordering::SeqCst);
                let (gw, ep, url) = (
                    self.clone(),
                    ep.clone(),
                    format!("{}{}", ep.url, route.readiness_path),
                );
                tokio::spawn(async move {
                    let ok = gw
                        .client
                        .get(&url)
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        ep.failures.store(0, Ordering::SeqCst);
                        ep.ready.store(true, Ordering::SeqCst);
                    } else {
                        ep.failed();
                    }
                    ep.probing.store(false, Ordering::SeqCst);
                });
            }
        }
    }

    /// A ready, not draining endpoint with the fewest requests in flight, counted as taking
    /// one more (the caller gives it back with [`InFlight`]).
    fn pick(&self, route: &Route, tried: &[u64]) -> Option<InFlight> {
        let mut best: Option<&Arc<Endpoint>> = None;
        for ep in &route.endpoints {
            if !ep.ready.load(Ordering::SeqCst)
                || ep.draining.load(Ordering::SeqCst)
                || tried.contains(&ep.job)
            {
                continue;
            }
            if best.is_none_or(|b| {
                ep.in_flight.load(Ordering::SeqCst) < b.in_flight.load(Ordering::SeqCst)
            }) {
                best = Some(ep);
            }
        }
        let ep = best?.clone();
        ep.in_flight.fetch_add(1, Ordering::SeqCst);
        // Counted first, then checked: a drain that starts now either sees this request or
        // this request sees the drain.
        if ep.draining.load(Ordering::SeqCst) {
            ep.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight(ep))
    }
}

/// A request counted against its endpoint until dropped.
struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.served.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Headers that belong to one connection, not to the request.
pub fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({"error": {"message": message}}).to_string(),
    )
        .into_response()
}

pub async fn proxy_root(
    gw: AxState<Arc<Gateway>>,
    Path(service): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    forward(gw.0, service, String::new(), method, uri, headers, body).await
}

pub async fn proxy(
    gw: AxState<Arc<Gateway>>,
    Path((service, rest)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    forward(gw.0, service, rest, method, uri, headers, body).await
}

async fn forward(
    gw: Arc<Gateway>,
    service: String,
    rest: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(route) = gw.route(&service) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no service {service}; see `tessera services`"),
        );
    };
    route.requests.fetch_add(1, Ordering::SeqCst);
    let (body, _budget) = match gw.take_body(body).await {
        Ok(taken) => taken,
        Err(resp) => return resp,
    };
    let path = match uri.query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let idempotent = matches!(
        method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    );
    let deadline = tokio::time::Instant::now() + WAIT_FOR_READY;
    let mut tried = Vec::new();
    loop {
        // The route may have been refreshed while we waited.
        let route = gw.route(&service).unwrap_or_else(|| route.clone());
        let Some(held) = gw.pick(&route, &tried) else {
            if tokio::time::Instant::now() >= deadline {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("service {service} has no ready replica"),
                );
            }
            if route.endpoints.iter().all(|e| tried.contains(&e.job)) {
                tried.clear();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut req = gw
            .client
            .request(method.clone(), format!("{}{path}", held.0.url))
            .body(body.clone());
        for (name, value) in &headers {
            if !hop_by_hop(name.as_str()) {
                req = req.header(name, value);
            }
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let mut out = HeaderMap::new();
                for (name, value) in resp.headers() {
                    if !hop_by_hop(name.as_str()) {
                        out.append(name, value.clone());
                    }
                }
                // The answer streams through (its size is the program's business); the replica
                // counts as busy until it has been sent.
                let stream = futures_util::StreamExt::map(resp.bytes_stream(), move |chunk| {
                    let _busy = &held;
                    chunk
                });
                return (status, out, Body::from_stream(stream)).into_response();
            }
            // Nothing reached the program: any request may go elsewhere. Otherwise only one
            // that may safely run twice.
            Err(e) if e.is_connect() || idempotent => {
                held.0.failed();
                held.0.ready.store(false, Ordering::SeqCst);
                tried.push(held.0.job);
                if tokio::time::Instant::now() >= deadline {
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!("no replica of {service} answered: {e}"),
                    );
                }
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("replica {} of {service} failed: {e}", held.0.job),
                );
            }
        }
    }
}

/// The gateway's router: `/NAME` and `/NAME/...`.
pub fn router(gw: Arc<Gateway>) -> axum::Router {
    use axum::routing::any;
    axum::Router::new()
        .route("/{service}", any(proxy_root))
        .route("/{service}/", any(proxy_root))
        .route("/{service}/{*rest}", any(proxy))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(gw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(eps: &[Arc<Endpoint>]) -> Route {
        Route {
            endpoints: eps.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn picks_the_least_busy_ready_endpoint_and_never_a_draining_one() {
        let gw = Gateway::new(64 << 20);
        let a = Arc::new(Endpoint::new(1, "n1".into(), "http://a".into()));
        let b = Arc::new(Endpoint::new(2, "n2".into(), "http://b".into()));
        let r = route(&[a.clone(), b.clone()]);
        assert!(gw.pick(&r, &[]).is_none(), "nothing is ready yet");
        a.ready.store(true, Ordering::SeqCst);
        b.ready.store(true, Ordering::SeqCst);
        let first = gw.pick(&r, &[]).unwrap();
        let second = gw.pick(&r, &[]).unwrap();
        assert_ne!(first.0.job, second.0.job, "the idle one is chosen");
        drop(first);
        drop(second);
        b.draining.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            assert_eq!(gw.pick(&r, &[]).unwrap().0.job, 1);
        }
        assert_eq!(a.in_flight.load(Ordering::SeqCst), 0, "given back on drop");
        assert_eq!(a.served.load(Ordering::SeqCst), 6);
        assert!(gw.pick(&r, &[1]).is_none(), "tried ones are skipped");
    }
}
