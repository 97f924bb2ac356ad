//! The command line of the GPU server and the relay, shared by `tessera-remote` and the
//! `tessera remote-gpu` command the agent runs (so that the server ships inside tessera).
//!
//! `serve --listen ADDR --secret-file F [--tls-cert C --tls-key K]`: the GPU
//! node's side of remote attachments (started by the agent under the slice library), over TLS
//! when given a certificate.
//! `relay --listen ADDR --to ADDR --rtt-us N`: a relay that adds N µs to each
//! round trip, for tests and benchmarks.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::{driver::Driver, relay, server};

fn fail(msg: &str) -> ! {
    eprintln!("tessera-remote: {msg}");
    std::process::exit(2);
}

fn value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).map(|i| {
        args.get(i + 1)
            .map(String::as_str)
            .unwrap_or_else(|| fail(&format!("{name} needs a value")))
    })
}

fn addr(args: &[String], name: &str) -> SocketAddr {
    let v = value(args, name).unwrap_or_else(|| fail(&format!("{name} ADDR:PORT is required")));
    v.parse()
        .unwrap_or_else(|_| fail(&format!("{name} {v}: not an address such as 10.0.0.2:7070")))
}

/// Binds `--listen` and says where (tests and the agent read the port from this line when they
/// asked for port 0).
fn bind(listen: SocketAddr) -> TcpListener {
    let listener =
        TcpListener::bind(listen).unwrap_or_else(|e| fail(&format!("--listen {listen}: {e}")));
    println!(
        "listening on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    listener
}

/// Runs `serve` or `relay` with the arguments after the program's name; exits on failure.
pub fn main(args: Vec<String>) {
    match args.first().map(String::as_str) {
        Some("serve") => {
            if args.iter().any(|a| a == "--die-with-parent") {
                // SAFETY: prctl with a signal number; the server goes when the agent that
                // started it goes, so a lost agent never leaves a slice held.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            }
            let secret = value(&args, "--secret-file")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    fail("--secret-file PATH is required (the attachment's secret)")
                });
            let secret = crate::read_secret(&secret).unwrap_or_else(|e| fail(&e));
            let listen = addr(&args, "--listen");
            let tls = match (value(&args, "--tls-cert"), value(&args, "--tls-key")) {
                (Some(cert), Some(key)) => Some(
                    crate::tls::server_config(cert.as_ref(), key.as_ref())
                        .unwrap_or_else(|e| fail(&e)),
                ),
                (None, None) => None,
                _ => {
                    fail("--tls-cert and --tls-key go together (the certificate and its key, PEM)")
                }
            };
            let driver = Driver::open().unwrap_or_else(|e| fail(&e));
            let listener = bind(listen);
            if let Err(e) = server::serve(listener, Arc::new(secret), driver, tls) {
                fail(&e.to_string());
            }
        }
        Some("relay") => {
            let listen = addr(&args, "--listen");
            let to = addr(&args, "--to");
            let rtt: u64 = value(&args, "--rtt-us")
                .map(|v| {
                    v.parse().unwrap_or_else(|_| {
                        fail(&format!("--rtt-us {v}: not a number of microseconds"))
                    })
                })
                .unwrap_or(0);
            let listener = bind(listen);
            if let Err(e) = relay::run(listener, to, Duration::from_micros(rtt)) {
                fail(&e.to_string());
            }
        }
        _ => fail(
            "usage: tessera-remote (or tessera remote-gpu) serve --listen ADDR --secret-file F [--tls-cert C --tls-key K] [--die-with-parent] | relay --listen ADDR --to ADDR [--rtt-us N]",
        ),
    }
}
