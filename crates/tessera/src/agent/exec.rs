//! `tessera exec` and `tessera port-forward` on the node: a process inside a running replica,
//! and a TCP connection to a port the replica listens on, each over a WebSocket the controller
//! opens (with its secret) on a user's behalf.
//!
//! The process joins the replica as its own processes are: its cgroup (so its limits count
//! it), its mount, pid, ipc and uts namespaces, its root and working directory, its uid and gid,
//! no new privileges, and the environment the replica's program started with. Everything that
//! runs as root on the host runs with a clean environment and absolute paths, so that nothing
//! the tenant wrote (its environment, its PATH, a library to preload) reaches a root process.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as AxPath, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::cgroup::Backend;
use super::{AgentConfig, Shared};
use crate::interactive::{self as wire, ExecQuery};

/// What the exec and port-forward handlers need of the agent.
#[derive(Clone)]
pub(super) struct Node {
    pub(super) shared: Arc<Shared>,
    pub(super) config: AgentConfig,
    pub(super) backend: Backend,
}

/// The host tools the chain is made of, found at fixed paths (never through a PATH).
fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The replica's program: the lowest pid in its cgroup that is not Tessera's own shim (the
/// program itself, or the init of its pid namespace).
fn program_pid(backend: &Backend, cgroup: &str) -> Option<i32> {
    let me = std::env::current_exe().ok()?;
    let mut pids = backend.pids(cgroup);
    pids.sort_unstable();
    pids.into_iter()
        .find(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|exe| exe != me))
}

/// A process's real uid and gid, from /proc.
fn ids_of(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// The environment the program runs with (NAME=VALUE entries; malformed ones dropped).
fn environment_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|e| String::from_utf8(e.to_vec()).ok())
        .filter(|e| e.split_once('=').is_some_and(|(k, _)| !k.is_empty()))
        .collect()
}

/// Whether the controller sent this request (its secret): logs, exec and port-forward.
pub(super) fn from_controller(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            use sha2::Digest;
            let presented: [u8; 32] = sha2::Sha256::digest(t.as_bytes()).into();
            shared
                .callback_hash
                .get()
                .is_some_and(|h| crate::auth::same_secret(h, &presented))
        })
}

/// The running replica `key` on this node: its program's pid and its cgroup's `cgroup.procs`
/// files; or the answer that says why there is none.
fn replica(
    node: &Node,
    headers: &HeaderMap,
    key: &str,
) -> Result<(i32, Vec<PathBuf>), (StatusCode, String)> {
    let refuse = |s: StatusCode, t: &str| Err((s, t.to_string()));
    if !from_controller(&node.shared, headers) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the controller's secret is required",
        );
    }
    if crate::state::parse_key(key).is_none() {
        return refuse(StatusCode::BAD_REQUEST, "not a replica key");
    }
    let cgroup = super::cgroup_name(&node.config, key);
    let Some(pid) = program_pid(&node.backend, &cgroup) else {
        return refuse(
            StatusCode::CONFLICT,
            "the replica is not running on this node (or this node has no cgroups to find it by)",
        );
    };
    let procs = node
        .backend
        .dirs(&cgroup)
        .into_iter()
        .map(|d| d.join("cgroup.procs"))
        .collect();
    Ok((pid, procs))
}

pub(super) async fn serve_exec(
    AxState(node): AxState<Node>,
    headers: HeaderMap,
    AxPath(key): AxPath<String>,
    Query(q): Query<ExecQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let (pid, procs) = match replica(&node, &headers, &key) {
        Ok(found) => found,
        Err(answer) => return answer.into_response(),
    };
    let command = match wire::command_of(&q) {
        Ok(c) => c,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = exec(socket, pid, procs, command, q).await {
            tracing::warn!("exec into {key}: {e:#}");
        }
    })
}

/// The chain that starts the process: as root, a shell that moves itself into the replica's
/// cgroup, then no new privileges, a session with the terminal (with one), and nsenter into
/// the replica's namespaces as its uid; inside, `env -i` gives the command the program's
/// environment.
fn chain(
    pid: i32,
    procs: &[PathBuf],
    command: &[String],
    q: &ExecQuery,
) -> anyhow::Result<std::process::Command> {
    let need = |name: &str| {
        tool(name).ok_or_else(|| {
            anyhow::anyhow!("this node lacks {name} (util-linux), which exec needs; install it")
        })
    };
    let (sh, setpriv, nsenter) = (need("sh")?, need("setpriv")?, need("nsenter")?);
    let (uid, gid) =
        ids_of(pid).ok_or_else(|| anyhow::anyhow!("the replica's program has ended"))?;
    let mut cmd = std::process::Command::new(sh);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("-c")
        .arg(r#"for p in "$@"; do [ "$p" = -- ] && break; echo 0 > "$p" || exit 126; shift; done; shift; exec "$@""#)
        .arg("sh")
        .args(procs)
        .arg("--")
        .arg(setpriv)
        .arg("--no-new-privs");
    if q.tty {
        cmd.arg(need("setsid")?).args(["-w", "-c"]);
    }
    cmd.arg(nsenter)
        .args(["-t", &pid.to_string(), "-m", "-p", "-i", "-u", "-r", "-w"])
        .args(["-S", &uid.to_string(), "-G", &gid.to_string(), "--"])
        .args(["env", "-i"]);
    let mut env = environment_of(pid);
    if let Some(term) = q
        .term
        .as_ref()
        .filter(|t| !t.is_empty() && !t.contains('\0'))
    {
        env.retain(|e| !e.starts_with("TERM="));
        env.push(format!("TERM={term}"));
    }
    cmd.args(env).args(command);
    Ok(cmd)
}

/// Runs the process and relays it over `socket` until it ends.
async fn exec(
    socket: WebSocket,
    pid: i32,
    procs: Vec<PathBuf>,
    command: Vec<String>,
    q: ExecQuery,
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = socket.split();
    let started = chain(pid, &procs, &command, &q).and_then(|cmd| start(cmd, q.tty));
    let mut child = match started {
        Ok(c) => c,
        Err(e) => {
            let msg = wire::frame(wire::FAILED, format!("{e:#}").as_bytes());
            tx.send(Message::Binary(msg.into())).await?;
            return Ok(());
        }
    };
    // Output of the process, from its reader threads.
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    for (channel, reader) in child.readers.drain(..) {
        let out = out_tx.clone();
        std::thread::spawn(move || pump(reader, channel, out));
    }
    drop(out_tx);
    let mut stdin = child.stdin.take();
    let resize = child.resize.take();
    let mut output_open = true;
    loop {
        tokio::select! {
            out = out_rx.recv(), if output_open => match out {
                Some(f) => tx.send(Message::Binary(f.into())).await?,
                None => output_open = false,
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => match wire::split(&b) {
                    Some((wire::STDIN, data)) => {
                        if let Some(w) = stdin.as_mut() {
                            let data = data.to_vec();
                            let mut w2 = w.try_clone()?;
                            tokio::task::spawn_blocking(move || w2.write_all(&data)).await??;
                        }
                    }
                    Some((wire::STDIN_END, _)) => stdin = None,
                    Some((wire::RESIZE, data)) => {
                        if let (Some(r), Ok(size)) = (&resize, serde_json::from_slice::<serde_json::Value>(data)) {
                            let cols = size["cols"].as_u64().unwrap_or(80).min(1000) as u16;
                            let rows = size["rows"].as_u64().unwrap_or(24).min(1000) as u16;
                            let _ = set_size(r, cols, rows);
                        }
                    }
                    _ => {}
                },
                // The user went away: the process goes too.
                None | Some(Ok(Message::Close(_))) | Some(Err(_)) => {
                    // With a terminal, its hangup ends the session; without, the group goes.
                    let group = nix::unistd::Pid::from_raw(child.process.id() as i32);
                    if !q.tty {
                        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                    }
                    let _ = child.process.kill();
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)), if !output_open => {
                if let Some(status) = child.process.try_wait()? {
                    use std::os::unix::process::ExitStatusExt;
                    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                    let body = serde_json::json!({ "code": code }).to_string();
                    tx.send(Message::Binary(wire::frame(wire::EXIT, body.as_bytes()).into())).await?;
                    let _ = tx.send(Message::Close(None)).await;
                    break;
                }
            }
        }
    }
    let _ = child.process.wait();
    Ok(())
}

/// A started process: its input, its outputs by channel, and its terminal (to resize).
struct Started {
    process: std::process::Child,
    stdin: Option<std::fs::File>,
    readers: Vec<(u8, Box<dyn Read + Send>)>,
    resize: Option<std::fs::File>,
}

fn start(mut cmd: std::process::Command, tty: bool) -> anyhow::Result<Started> {
    use std::process::Stdio;
    if tty {
        let pty = nix::pty::openpty(None, None)?;
        let slave = std::fs::File::from(pty.slave);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        let process = cmd.spawn()?;
        // Only the child holds the terminal's other end now: the master reads EOF (EIO) once
        // the process and its children have closed it.
        let master = std::fs::File::from(pty.master);
        Ok(Started {
            process,
            stdin: Some(master.try_clone()?),
            readers: vec![(wire::STDOUT, Box::new(master.try_clone()?))],
            resize: Some(master),
        })
    } else {
        use std::os::unix::process::CommandExt;
        // Its own process group: when the user goes away, the whole chain (nsenter's child
        // inside the replica too) is killed, not only its first process.
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut process = cmd.spawn()?;
        let stdin = process
            .stdin
            .take()
            .map(|s| std::fs::File::from(std::os::fd::OwnedFd::from(s)));
        let mut readers: Vec<(u8, Box<dyn Read + Send>)> = Vec::new();
        if let Some(o) = process.stdout.take() {
            readers.push((wire::STDOUT, Box::new(o)));
        }
        if let Some(e) = process.stderr.take() {
            readers.push((wire::STDERR, Box::new(e)));
        }
        Ok(Started {
            process,
            stdin,
            readers,
            resize: None,
        })
    }
}

/// Copies `reader` into frames of `channel` until it ends.
fn pump(mut reader: Box<dyn Read + Send>, channel: u8, out: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.blocking_send(wire::frame(channel, &buf[..n])).is_err() {
                    return;
                }
            }
        }
    }
}

nix::ioctl_write_ptr_bad!(set_window_size, nix::libc::TIOCSWINSZ, nix::libc::winsize);

fn set_size(master: &std::fs::File, cols: u16, rows: u16) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let size = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call; the fd
    // is the terminal's master, open for the life of `master`.
    unsafe { set_window_size(master.as_raw_fd(), &size) }.map(|_| ())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardQuery {
    pub port: u16,
}

/// The inodes of sockets listening on `port` in the network namespace of `pid` (IPv4 and 6).
fn listening_inodes(pid: i32, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening = *state == "0A";
            let at = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listening && at == Some(port) {
                out.extend(inode.parse::<u64>().ok());
            }
        }
    }
    out
}

/// Whether one of the processes `pids` holds one of the sockets `inodes`: the replica itself
/// listens there, not another tenant or the node.
fn held_by(pids: &[i32], inodes: &[u64]) -> bool {
    pids.iter().any(|p| {
        std::fs::read_dir(format!("/proc/{p}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| {
                    l.to_str()
                        .and_then(|s| s.strip_prefix("socket:["))
                        .and_then(|s| s.strip_suffix(']'))
                        .and_then(|s| s.parse::<u64>().ok())
                        .is_some_and(|i| inodes.contains(&i))
                })
            })
    })
}

pub(super) async fn serve_forward(
    AxState(node): AxState<Node>,
    headers: HeaderMap,
    AxPath(key): AxPath<String>,
    Query(q): Query<ForwardQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let (pid, _) = match replica(&node, &headers, &key) {
        Ok(found) => found,
        Err(answer) => return answer.into_response(),
    };
    let cgroup = super::cgroup_name(&node.config, &key);
    let pids = node.backend.pids(&cgroup);
    if !held_by(&pids, &listening_inodes(pid, q.port)) {
        return (
            StatusCode::CONFLICT,
            format!(
                "port {}: the replica does not listen there (only a port the replica's own \
                 processes listen on can be forwarded)",
                q.port
            ),
        )
            .into_response();
    }
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = forward(socket, pid, q.port).await {
            tracing::debug!("port-forward to {key}: {e:#}");
        }
    })
}

/// A connection to `port` on the loopback of the network namespace of process `pid`: the
/// node's own, or one the replica made for itself (`unshare -rn`, say). Into a namespace of
/// the replica's own, the connection is made on a thread of its own that enters it and then
/// ends, so no other work of the agent runs there; the socket keeps the namespace it was made
/// in. The tenant rules that namespace (it may drop packets): the attempt is bounded in time.
async fn connect_in(pid: i32, port: u16) -> anyhow::Result<tokio::net::TcpStream> {
    use anyhow::Context;
    const WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .context("the replica's network namespace")?;
    let same = std::fs::read_link("/proc/self/ns/net").ok()
        == std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let addrs = [
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    if same {
        let connect = async {
            match tokio::net::TcpStream::connect(addrs[0]).await {
                Ok(t) => Ok(t),
                Err(_) => tokio::net::TcpStream::connect(addrs[1]).await,
            }
        };
        return Ok(tokio::time::timeout(WITHIN, connect).await??);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, not one of the runtime's pools: a thread that entered a namespace
    // must not run other work afterwards.
    std::thread::spawn(move || {
        let connect = || -> anyhow::Result<std::net::TcpStream> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the replica's network namespace")?;
            let tcp = std::net::TcpStream::connect_timeout(&addrs[0], WITHIN)
                .or_else(|_| std::net::TcpStream::connect_timeout(&addrs[1], WITHIN))?;
            tcp.set_nonblocking(true)?;
            Ok(tcp)
        };
        let _ = tx.send(connect());
    });
    let stream = rx.await.context("the connecting thread ended")??;
    Ok(tokio::net::TcpStream::from_std(stream)?)
}

/// Relays `socket` to the replica's port, bytes as they are, until either side closes.
async fn forward(socket: WebSocket, pid: i32, port: u16) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = connect_in(pid, port).await?;
    let (mut r, mut w) = tcp.into_split();
    let (mut tx, mut rx) = socket.split();
    let up = async {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) => w.write_all(&b).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tx.send(Message::Binary(buf[..n].to_vec().into())).await?;
        }
        let _ = tx.send(Message::Close(None)).await;
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
