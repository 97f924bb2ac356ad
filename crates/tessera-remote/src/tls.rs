//! TLS for remote attachments over networks the pool's operators do not trust.
//!
//! The server proves itself with a certificate the client trusts (the pool's CA, or the server's
//! own certificate given to the client); inside TLS the handshake of [`crate::auth`] still proves
//! the attachment's secret both ways. Both sides keep working on a plain stream: a pump thread
//! carries the TLS connection's plaintext over a local socket pair, so that the server can read
//! on one thread and answer on another exactly as over TCP. That hop costs a wake-up per burst
//! of messages (measured in docs/benchmarks.md, "Remote GPUs").

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS from its certificate chain and key (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it (a PEM file)",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map(Arc::new)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))
}

/// The client's TLS, trusting the certificates in `ca` (PEM) and nothing else.
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in certs {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{}: no certificate in it (a PEM file)",
            ca.display()
        ));
    }
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The name the server's certificate must carry: `name` when given, else the host of `addr`
/// (an IP address or a DNS name).
pub fn server_name(addr: &str, name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match name {
        Some(n) => n.to_string(),
        None => addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    };
    ServerName::try_from(host.clone()).map_err(|e| format!("{host}: not a server name: {e}"))
}

/// Completes the server's handshake on `tcp`; the plaintext end of the pump.
pub fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<UnixStream> {
    let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    start(tcp, Connection::Server(conn))
}

/// Completes the client's handshake on `tcp`; the plaintext end of the pump.
pub fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> io::Result<UnixStream> {
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    start(tcp, Connection::Client(conn))
}

fn start(mut tcp: TcpStream, mut tls: Connection) -> io::Result<UnixStream> {
    tcp.set_read_timeout(Some(crate::server::HANDSHAKE_TIMEOUT))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    tcp.set_read_timeout(None)?;
    let (ours, theirs) = UnixStream::pair()?;
    std::thread::spawn(move || {
        let _ = pump(tls, tcp, theirs);
    });
    Ok(ours)
}

/// Most plaintext kept for a local side that is not reading.
const BACKLOG: usize = 4 << 20;

/// Carries plaintext between `local` and the TLS connection on `tcp` until either side ends.
fn pump(mut tls: Connection, mut tcp: TcpStream, mut local: UnixStream) -> io::Result<()> {
    // Plaintext is taken from the local side only once TLS has sent what it holds, at most a
    // buffer at a time: rustls's own limit would refuse part of a large copy instead.
    tls.set_buffer_limit(None);
    tcp.set_nonblocking(true)?;
    local.set_nonblocking(true)?;
    let mut to_local: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let (mut tcp_open, mut local_open) = (true, true);
    let result = loop {
        // Plaintext that arrived over TLS, on to the local side.
        while !to_local.is_empty() {
            match local.write(&to_local) {
                Ok(n) => {
                    to_local.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Records waiting to go out.
        while tls.wants_write() {
            match tls.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if (!tcp_open && to_local.is_empty()) || (!local_open && !tls.wants_write()) {
            break Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                // Take no more from the network while the local side lags.
                events: (if tcp_open && to_local.len() < BACKLOG {
                    libc::POLLIN
                } else {
                    0
                }) | (if tls.wants_write() { libc::POLLOUT } else { 0 }),
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                // Read more plaintext only while TLS is not backed up.
                events: (if local_open && !tls.wants_write() {
                    libc::POLLIN
                } else {
                    0
                }) | (if to_local.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                }),
                revents: 0,
            },
        ];
        // SAFETY: two pollfds we own; no timeout.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if fds[0].revents != 0 && tcp_open {
            match tls.read_tls(&mut tcp) {
                Ok(0) => tcp_open = false,
                Ok(_) => {
                    tls.process_new_packets().map_err(io::Error::other)?;
                    loop {
                        match tls.reader().read(&mut buf) {
                            Ok(0) => {
                                tcp_open = false;
                                break;
                            }
                            Ok(n) => to_local.extend_from_slice(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => tcp_open = false,
            }
        }
        if fds[1].revents != 0 && local_open && !tls.wants_write() {
            match local.read(&mut buf) {
                Ok(0) => {
                    local_open = false;
                    tls.send_close_notify();
                }
                Ok(n) => tls.writer().write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => local_open = false,
            }
        }
    };
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    let _ = local.shutdown(std::net::Shutdown::Both);
    result
}
