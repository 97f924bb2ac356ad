//! Limits on what an unauthenticated client can hold of the controller: connections (in all and
//! per address), time to send a request's headers (which also bounds an idle keep-alive
//! connection), time to send its body, and time to be answered. Without them a few thousand held
//! or trickling connections stop the pool for everyone, before any token is checked.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long a client may take to send a request's headers, and how long a keep-alive connection
/// may stay idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two parts of a request body.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request may take, body included (agents' long polls wait a third of the lease).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Open connections, in all and per client address.
pub struct Connections {
    max: usize,
    per_address: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    /// Connections counted against another address than their peer's: a standby's connection
    /// while it carries a request of the client it names (see [`Connections::charge_to`]).
    charged: HashMap<SocketAddr, IpAddr>,
}

impl Open {
    fn take(&mut self, ip: IpAddr) {
        *self.by_address.entry(ip).or_default() += 1;
    }

    fn give_back(&mut self, ip: IpAddr) {
        if let Some(n) = self.by_address.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_address.remove(&ip);
            }
        }
    }

    fn from(&self, ip: IpAddr) -> usize {
        self.by_address.get(&ip).copied().unwrap_or(0)
    }
}

impl Connections {
    /// At most `max` connections, and `per_address` from one address: one client cannot take
    /// every connection.
    pub fn new(max: usize, per_address: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max,
            per_address: per_address.min(max),
            open: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection from `peer`, or `None` when the limits are reached.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Admitted> {
        let mut open = self.lock();
        if open.total >= self.max || open.from(peer.ip()) >= self.per_address {
            return None;
        }
        open.total += 1;
        open.take(peer.ip());
        Some(Admitted {
            connections: self.clone(),
            peer,
        })
    }

    /// Counts the connection from `peer` against `client` instead, until the returned guard is
    /// dropped: a standby's connection carrying a request of the client it vouches for, so that
    /// one client flooding through a standby spends its own places, not the standby's (which
    /// every other client of that standby needs). `None` when `client` holds its share already.
    pub fn charge_to(self: &Arc<Self>, peer: SocketAddr, client: IpAddr) -> Option<Charged> {
        let mut open = self.lock();
        let now = open.charged.get(&peer).copied().unwrap_or(peer.ip());
        if now == client {
            return Some(Charged {
                connections: self.clone(),
                peer,
                client: None,
            });
        }
        if open.from(client) >= self.per_address {
            return None;
        }
        open.give_back(now);
        open.take(client);
        open.charged.insert(peer, client);
        Some(Charged {
            connections: self.clone(),
            peer,
            client: Some(client),
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Places counted against `ip` now.
    pub fn from(&self, ip: IpAddr) -> usize {
        self.lock().from(ip)
    }
}

/// A connection's place; given back when the connection closes.
pub struct Admitted {
    connections: Arc<Connections>,
    peer: SocketAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.total = open.total.saturating_sub(1);
        let ip = open.charged.remove(&self.peer).unwrap_or(self.peer.ip());
        open.give_back(ip);
    }
}

/// A connection counted against a client it carries a request of (see
/// [`Connections::charge_to`]); counted against its peer again when dropped, unless it closed
/// meanwhile.
pub struct Charged {
    connections: Arc<Connections>,
    peer: SocketAddr,
    /// `None`: it was already counted against that client, by an earlier guard.
    client: Option<IpAddr>,
}

impl Drop for Charged {
    fn drop(&mut self) {
        let Some(client) = self.client else { return };
        let mut open = self.connections.lock();
        if open.charged.get(&self.peer) == Some(&client) {
            open.charged.remove(&self.peer);
            open.give_back(client);
            open.take(self.peer.ip());
        }
    }
}

/// An acceptor (plain or TLS) that admits a connection only within the limits.
#[derive(Clone)]
pub struct Limited<A> {
    inner: A,
    connections: Arc<Connections>,
}

impl<A> Limited<A> {
    pub fn new(inner: A, connections: Arc<Connections>) -> Limited<A> {
        Limited { inner, connections }
    }
}

impl<A, S> axum_server::accept::Accept<TcpStream, S> for Limited<A>
where
    A: axum_server::accept::Accept<TcpStream, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Held<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let admitted = stream
            .peer_addr()
            .ok()
            .and_then(|peer| self.connections.admit(peer));
        let Some(admitted) = admitted else {
            // Closing it at once is the answer: the client sees a reset and may retry later.
            tracing::debug!("connection refused: the connection limit is reached");
            return Box::pin(std::future::ready(Err(io::Error::other(
                "the connection limit is reached",
            ))));
        };
        let accepting = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepting.await?;
            Ok((
                Held {
                    stream,
                    first_byte: Some(Box::pin(tokio::time::sleep(HEADER_TIMEOUT))),
                    _admitted: admitted,
                },
                service,
            ))
        })
    }
}

/// A connection holding its place.
pub struct Held<S> {
    stream: S,
    /// The deadline of the connection's first byte. The server reads a first request to learn
    /// its HTTP version before the header timeout applies, so a client that connects and sends
    /// nothing is cut off here; from the first request on, the header timeout bounds each
    /// request's head and each idle wait between requests.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
    _admitted: Admitted,
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some(deadline) = self.first_byte.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.first_byte = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header timeout",
                )))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Answers 408 (as JSON, like every error) when a request takes longer than [`REQUEST_TIMEOUT`],
/// body included.
async fn within_request_timeout(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => super::ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} s (body included); send it faster or in parts",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) within the limits.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    app: axum::Router,
    connections: Arc<Connections>,
) -> io::Result<()> {
    let app = app
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_IDLE_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(within_request_timeout));
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .http1_only();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match tls {
        Some(tls) => {
            let mut server = axum_server::from_tcp_rustls(listener, tls).map(|acceptor| {
                Limited::new(acceptor.handshake_timeout(HEADER_TIMEOUT), connections)
            });
            *server.http_builder() = builder;
            server.serve(service).await
        }
        None => {
            let mut server =
                axum_server::from_tcp(listener).map(|acceptor| Limited::new(acceptor, connections));
            *server.http_builder() = builder;
            server.serve(service).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_connection_and_places_come_back_on_close() {
        let c = Connections::new(5, 3);
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let held: Vec<Admitted> = (0..3).map(|_| c.admit(a).unwrap()).collect();
        assert!(c.admit(a).is_none(), "a fourth from one address");
        let b1 = c.admit(b).unwrap();
        let _b2 = c.admit(b).unwrap();
        assert!(c.admit(b).is_none(), "the pool-wide limit of 5");
        assert_eq!(c.open(), 5);
        drop(b1);
        assert!(
            c.admit(b).is_some(),
            "a closed connection gives its place back"
        );
        drop(held);
        assert_eq!(c.open(), 1);
        assert!(c.admit(a).is_some());
    }

    #[test]
    fn a_standbys_connection_counts_against_the_client_it_carries_while_it_carries_it() {
        let c = Connections::new(100, 2);
        let standby = |port| SocketAddr::from(([10, 0, 0, 9], port));
        let flooder: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let conns: Vec<Admitted> = (1..=2).map(|p| c.admit(standby(p)).unwrap()).collect();
        // Full from the standby's address, until its connections carry their clients' requests.
        assert!(c.admit(standby(3)).is_none());
        let first = c.charge_to(standby(1), flooder).unwrap();
        let second = c.charge_to(standby(2), flooder).unwrap();
        assert_eq!(c.from(flooder), 2);
        assert_eq!(c.from(standby(1).ip()), 0);
        // The flooder's third request is refused; another client of the standby is served.
        let third = c.admit(standby(3)).unwrap();
        assert!(c.charge_to(standby(3), flooder).is_none());
        let served = c.charge_to(standby(3), other).unwrap();
        assert_eq!(c.from(other), 1);
        // A second request on a connection already counted against its client costs nothing.
        let again = c.charge_to(standby(1), flooder).unwrap();
        drop(again);
        assert_eq!(c.from(flooder), 2);
        // Answered, a connection counts against the standby again; closed, against nobody.
        drop(first);
        assert_eq!((c.from(flooder), c.from(standby(1).ip())), (1, 1));
        drop(third);
        drop(served);
        assert_eq!((c.from(other), c.from(standby(1).ip())), (0, 1));
        drop(conns);
        drop(second);
        assert_eq!(
            (c.from(flooder), c.from(standby(1).ip()), c.open()),
            (0, 0, 0)
        );
    }
}
