//! Limits on what an unauthenticated client can hold of the controller: connections (in all and
//! per address), time to send a request's headers (which also bounds an idle keep-alive
//! connection), time to send its body, and time to be answered. Without them a few thousand held
//! or trickling connections stop the pool for everyone, before any token is checked.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
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
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Connections {
    /// At most `max` connections, and `per_address` from one address: one client cannot take
    /// every connection.
    pub fn new(max: usize, per_address: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max,
            per_address: per_address.min(max),
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for a connection from `ip`, or `None` when the limits are reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = open.1.get(&ip).copied().unwrap_or(0);
        if open.0 >= self.max || from_ip >= self.per_address {
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, from_ip + 1);
        Some(Admitted {
            connections: self.clone(),
            ip,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// A connection's place; given back when the connection closes.
pub struct Admitted {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
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
            .and_then(|peer| self.connections.admit(peer.ip()));
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
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
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
}
