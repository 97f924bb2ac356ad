//! Interactive work from the command line: `tessera exec` (a process inside a running replica,
//! with a terminal for `-t`), `tessera port-forward` (a local port to one the replica listens
//! on) and `tessera run -it` (a job for as long as a shell in it lasts, as `srun --pty`).

use std::io::{Read, Write};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::Client;
use crate::interactive as wire;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the controller's WebSocket at `path` as this client: `ws://` to a controller served
/// over HTTP, `wss://` over HTTPS, trusting the same certificates as the client's other calls.
async fn open(c: &Client, path: &str) -> anyhow::Result<Socket> {
    let base = c.controllers.current().to_string();
    let (url, tls) = if let Some(rest) = base.strip_prefix("http://") {
        (format!("ws://{rest}{path}"), None)
    } else if let Some(rest) = base.strip_prefix("https://") {
        (format!("wss://{rest}{path}"), Some(tls_config(c)?))
    } else {
        bail!("{base}: a controller URL starts with http:// or https://");
    };
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", c.token).parse()?);
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    match tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await {
        Ok((s, _)) => Ok(s),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body =
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("{msg}")
        }
        Err(e) => Err(e).with_context(|| format!("calling the controller at {base}")),
    }
}

/// TLS for `wss://`: the CA given (--ca-cert, TESSERA_CA_CERT or the config file) and nothing
/// else, as for the pool's own CA; without one, the public roots.
fn tls_config(c: &Client) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    if let Some(ca) = &c.ca_cert {
        return tessera_remote::tls::client_config(ca)
            .map_err(|e| anyhow::anyhow!("--ca-cert {e}"));
    }
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// The query of an exec.
fn exec_path(id: u64, replica: u32, tty: bool, command: &[String]) -> anyhow::Result<String> {
    let mut u = reqwest::Url::parse("http://x/")?;
    u.query_pairs_mut()
        .append_pair("replica", &replica.to_string())
        .append_pair("command", &serde_json::to_string(command)?)
        .append_pair("tty", if tty { "true" } else { "false" });
    if tty && let Ok(term) = std::env::var("TERM") {
        u.query_pairs_mut().append_pair("term", &term);
    }
    Ok(format!(
        "/v1/jobs/{id}/exec?{}",
        u.query().unwrap_or_default()
    ))
}

/// Puts the local terminal in raw mode while it lives (keys go to the remote process as typed).
struct Raw(Option<nix::sys::termios::Termios>);

impl Raw {
    fn new(on: bool) -> Raw {
        use nix::sys::termios;
        if !on {
            return Raw(None);
        }
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return Raw(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        Raw(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The local terminal's size, when standard output is one.
fn terminal_size() -> Option<(u16, u16)> {
    nix::ioctl_read_bad!(get_window_size, nix::libc::TIOCGWINSZ, nix::libc::winsize);
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which is valid for the call;
    // a descriptor that is no terminal fails the call and nothing is written.
    unsafe { get_window_size(std::io::stdout().as_raw_fd(), &mut size) }.ok()?;
    (size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// `tessera exec JOB [--replica N] [-i] [-t] -- CMD`: runs CMD inside the replica and returns its
/// exit code. `stdin`: send this terminal's input; `tty`: give it a terminal.
pub fn exec(
    c: &Client,
    id: u64,
    replica: u32,
    stdin: bool,
    tty: bool,
    command: &[String],
) -> anyhow::Result<i32> {
    if command.is_empty() {
        bail!("name what to run after `--`, e.g. tessera exec -it {id} -- bash");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let socket = open(c, &exec_path(id, replica, tty, command)?).await?;
        let (mut tx, mut rx) = socket.split();
        let _raw = Raw::new(tty && stdin);
        if tty && let Some((cols, rows)) = terminal_size() {
            let size = serde_json::json!({"cols": cols, "rows": rows}).to_string();
            tx.send(Message::Binary(
                wire::frame(wire::RESIZE, size.as_bytes()).into(),
            ))
            .await?;
        }
        // Standard input, read on a thread of its own (it blocks), as frames.
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        if stdin {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut input = std::io::stdin();
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = in_tx.blocking_send(wire::frame(wire::STDIN_END, &[]));
                            return;
                        }
                        Ok(n) => {
                            if in_tx
                                .blocking_send(wire::frame(wire::STDIN, &buf[..n]))
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        } else {
            tx.send(Message::Binary(wire::frame(wire::STDIN_END, &[]).into()))
                .await?;
            drop(in_tx);
        }
        let mut input_open = stdin;
        // A terminal resized while the process runs is resized there too (as ssh does).
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        loop {
            tokio::select! {
                frame = in_rx.recv(), if input_open => match frame {
                    Some(f) => tx.send(Message::Binary(f.into())).await?,
                    None => input_open = false,
                },
                _ = winch.recv(), if tty => {
                    if let Some((cols, rows)) = terminal_size() {
                        let size = serde_json::json!({"cols": cols, "rows": rows}).to_string();
                        tx.send(Message::Binary(
                            wire::frame(wire::RESIZE, size.as_bytes()).into(),
                        ))
                        .await?;
                    }
                },
                msg = rx.next() => {
                    let Some(msg) = msg else { bail!("the connection to the replica ended") };
                    let Message::Binary(b) = msg? else { continue };
                    match wire::split(&b) {
                        Some((wire::STDOUT, d)) => {
                            let mut out = std::io::stdout();
                            out.write_all(d)?;
                            out.flush()?;
                        }
                        Some((wire::STDERR, d)) => std::io::stderr().write_all(d)?,
                        Some((wire::EXIT, d)) => {
                            let v: Value = serde_json::from_slice(d)?;
                            return Ok(v["code"].as_i64().unwrap_or(1) as i32);
                        }
                        Some((wire::FAILED, d)) => {
                            bail!("{}", String::from_utf8_lossy(d))
                        }
                        _ => {}
                    }
                }
            }
        }
    })
}

/// `tessera port-forward JOB LOCAL:REMOTE`: each connection to LOCAL on this machine reaches
/// REMOTE in the replica, until interrupted. `ready` is told the local port once it listens.
pub fn port_forward(
    c: &Client,
    id: u64,
    replica: u32,
    ports: &str,
    ready: impl FnOnce(u16),
) -> anyhow::Result<()> {
    let (local, remote) = match ports.split_once(':') {
        Some((l, r)) => (l, r),
        None => (ports, ports),
    };
    let bad = || {
        anyhow::anyhow!(
            "{ports}: write LOCAL:REMOTE ports, e.g. 8888:8888 (0 for any free local port)"
        )
    };
    let local: u16 = local.parse().map_err(|_| bad())?;
    let remote: u16 = remote.parse().map_err(|_| bad())?;
    if remote == 0 {
        return Err(bad());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let path = format!("/v1/jobs/{id}/port-forward?replica={replica}&port={remote}");
        // Refused at once (no such job, not running, nothing listening) rather than at the
        // first connection.
        let first = open(c, &path).await?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", local))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
        let at = listener.local_addr()?.port();
        eprintln!(
            "Forwarding from 127.0.0.1:{at} to port {remote} of job {id} (replica {replica})"
        );
        ready(at);
        let mut first = Some(first);
        loop {
            let (tcp, _) = tokio::select! {
                got = listener.accept() => got?,
                // Interrupted: the caller may clean up (`notebook` cancels its job).
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let socket = match first.take() {
                Some(s) => s,
                None => match open(c, &path).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("port-forward: {e:#}");
                        continue;
                    }
                },
            };
            tokio::spawn(carry(tcp, socket));
        }
    })
}

/// Carries one local connection over its socket, both ways, until either side closes.
async fn carry(tcp: tokio::net::TcpStream, socket: Socket) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tcp.into_split();
    let (mut tx, mut rx) = socket.split();
    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0
                || tx
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
            {
                break;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if w.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
}

/// `tessera run -it [submit flags] -- CMD`: a job that holds its resources while CMD runs inside
/// it with this terminal, cancelled when CMD ends (as `srun --pty`). Returns CMD's exit code.
pub fn run(c: &Client, args: &super::SubmitArgs, stdin: bool, tty: bool) -> anyhow::Result<i32> {
    let command = args.command.clone();
    if command.is_empty() {
        bail!("name what to run after `--`, e.g. tessera run -it --gpu 0.5 -- bash");
    }
    let mut holder = args.clone();
    holder.command = vec![
        "sh".into(),
        "-c".into(),
        "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done".into(),
    ];
    holder.interactive = true;
    if holder.name.is_none() {
        holder.name = Some(format!(
            "run-{}",
            command[0].rsplit('/').next().unwrap_or("shell")
        ));
    }
    let job = c.post("/v1/jobs", super::manifest_from(&holder)?)?;
    let id = job["id"].as_u64().context("the pool answered no job id")?;
    eprintln!("[tessera: job {id} submitted; waiting for it to start]");
    let outcome = (|| {
        loop {
            let j = c.get(&format!("/v1/jobs/{id}"))?;
            let running = j["assignments"]
                .as_array()
                .is_some_and(|a| a.iter().any(|r| r["phase"] == "running"));
            match j["state"].as_str() {
                Some("running") if running => break,
                Some(s @ ("succeeded" | "failed" | "cancelled")) => {
                    bail!(
                        "job {id} {s} before it ran: {}",
                        j["reason"].as_str().unwrap_or("")
                    )
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(300)),
            }
        }
        exec(c, id, 0, stdin, tty, &command)
    })();
    // However it went, the job gives its resources back.
    let _ = c.post(&format!("/v1/jobs/{id}/cancel"), serde_json::json!({}));
    eprintln!("[tessera: job {id} cancelled]");
    outcome
}

/// What a notebook job runs: Jupyter (Lab where it is installed, else the classic notebook) on
/// a free port of the node's loopback, with the token the CLI chose (JUPYTER_TOKEN); a clear
/// word when neither
/// is installed.
const NOTEBOOK: &str = r#"port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
set -- --no-browser --ip=127.0.0.1 --port="$port" --ServerApp.root_dir="$PWD" --NotebookApp.notebook_dir="$PWD"
if jupyter lab --version >/dev/null 2>&1; then exec jupyter lab "$@"; fi
if jupyter notebook --version >/dev/null 2>&1; then exec jupyter notebook "$@"; fi
echo "tessera: Jupyter is not installed in this job's environment: install it (pip install jupyterlab) or use an image that has it (--image)" >&2
exit 127"#;

/// `tessera notebook [submit flags] [--port LOCAL]`: an interactive job running Jupyter, its
/// port forwarded here; prints the URL to open, and cancels the job when interrupted.
pub fn notebook(c: &Client, args: &super::SubmitArgs, local: u16) -> anyhow::Result<()> {
    let token = crate::auth::random_secret();
    let mut job = args.clone();
    job.command = vec!["sh".into(), "-c".into(), NOTEBOOK.into()];
    job.interactive = true;
    // Jupyter reads its token from JUPYTER_TOKEN (the job's environment is seen only by those
    // who may see the job).
    job.env.push(format!("JUPYTER_TOKEN={token}"));
    if job.name.is_none() {
        job.name = Some("notebook".into());
    }
    let submitted = c.post("/v1/jobs", super::manifest_from(&job)?)?;
    let id = submitted["id"]
        .as_u64()
        .context("the pool answered no job id")?;
    eprintln!("[tessera: notebook job {id} submitted; waiting for Jupyter to start]");
    let found = (|| -> anyhow::Result<u16> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        let at = regex_port();
        loop {
            let j = c.get(&format!("/v1/jobs/{id}"))?;
            let state = j["state"].as_str().unwrap_or("");
            if matches!(state, "running" | "succeeded" | "failed" | "cancelled")
                && let Ok(v) = c.get(&format!("/v1/jobs/{id}/logs?replica=0"))
            {
                let text = v["data"].as_str().unwrap_or("");
                if let Some(port) = at(text) {
                    return Ok(port);
                }
                if state != "running" {
                    let said = text.lines().rev().take(5).collect::<Vec<_>>();
                    let said: Vec<&str> = said.into_iter().rev().collect();
                    bail!(
                        "job {id} {state} before Jupyter served: {}\n{}",
                        j["reason"].as_str().unwrap_or(""),
                        said.join("\n")
                    );
                }
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "Jupyter did not say where it serves within 10 minutes; see `tessera logs {id}`"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    })();
    let outcome = found.and_then(|remote| {
        port_forward(c, id, 0, &format!("{local}:{remote}"), |at| {
            println!("Jupyter (job {id}): http://127.0.0.1:{at}/?token={token}");
            println!(
                "Interrupt (Ctrl-C) to stop it; an idle notebook follows its project's idle policy."
            );
            let _ = std::io::stdout().flush();
        })
    });
    let _ = c.post(&format!("/v1/jobs/{id}/cancel"), serde_json::json!({}));
    eprintln!("[tessera: notebook job {id} cancelled]");
    outcome
}

/// Finds the port in Jupyter's "http://127.0.0.1:PORT/" line.
fn regex_port() -> impl Fn(&str) -> Option<u16> {
    |text: &str| {
        text.split("http://127.0.0.1:").skip(1).find_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
    }
}
