//! Remote GPUs end to end: a GPU node and a CPU-only node in two network namespaces joined by a
//! veth pair; on the GPU node the server under the slice library over the simulated driver; on
//! the CPU node the probe (an unmodified CUDA program) with the remote client as its
//! `libcuda.so.1`. Real processes and real TCP throughout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A library or program the workspace builds, in target/<profile>/ (or its deps/).
fn built(file: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let profile = deps.parent().unwrap();
    [profile.join(file), deps.join(file)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{file} is not in {}: run the tests of the workspace (cargo test --workspace)",
                profile.display()
            )
        })
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (ip) is needed");
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root and network namespaces, as on the machines Tessera's CI runs on)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, "gpu" and "cpu", joined by a veth pair; removed on drop.
struct Link {
    gpu: String,
    cpu: String,
    gpu_ip: String,
    gpu_dev: String,
}

impl Link {
    fn new() -> Link {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() % 4096) * 16 + NEXT.fetch_add(1, Ordering::Relaxed) % 16;
        let (gpu, cpu) = (format!("tsr-g{n}"), format!("tsr-c{n}"));
        let (gdev, cdev) = (format!("tsrg{n}"), format!("tsrc{n}"));
        let net = format!("10.{}.{}", 100 + n / (256 * 64), (n / 64) % 256);
        let host = (n % 64) * 4;
        let (gpu_ip, cpu_ip) = (format!("{net}.{}", host + 1), format!("{net}.{}", host + 2));
        for ns in [&gpu, &cpu] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
        }
        let link = Link {
            gpu,
            cpu,
            gpu_ip: gpu_ip.clone(),
            gpu_dev: gdev.clone(),
        };
        ip(&["link", "add", &gdev, "type", "veth", "peer", "name", &cdev]);
        ip(&["link", "set", &gdev, "netns", &link.gpu]);
        ip(&["link", "set", &cdev, "netns", &link.cpu]);
        for (ns, dev, addr) in [(&link.gpu, &gdev, &gpu_ip), (&link.cpu, &cdev, &cpu_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        link
    }

    /// Cuts the link, as a GPU node lost from the network looks to its clients.
    fn cut(&self) {
        ip(&["-n", &self.gpu, "link", "set", &self.gpu_dev, "down"]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.gpu, &self.cpu] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The GPU node: a simulated device of `device` bytes and the server in a slice of `slice` bytes.
struct GpuNode {
    dir: tempfile::TempDir,
    server: Child,
    addr: String,
}

impl GpuNode {
    fn start(link: &Link, device: u64, slice: u64) -> GpuNode {
        Self::start_with(link, device, slice, |_| vec![])
    }

    /// With more arguments to `serve`, given the node's directory.
    fn start_with(
        link: &Link,
        device: u64,
        slice: u64,
        extra: impl FnOnce(&Path) -> Vec<String>,
    ) -> GpuNode {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let fake = dir.path().join("driver");
        std::fs::create_dir(&fake).unwrap();
        std::os::unix::fs::symlink(built("libcuda.so"), fake.join("libcuda.so.1")).unwrap();
        std::fs::write(
            dir.path().join("secret"),
            "attachment-secret-0123456789abcdef",
        )
        .unwrap();
        let mut server = Command::new("ip")
            .args(["netns", "exec", &link.gpu])
            .arg(env!("CARGO_BIN_EXE_tessera-remote"))
            .args(["serve", "--listen", &format!("{}:0", link.gpu_ip)])
            .arg("--secret-file")
            .arg(dir.path().join("secret"))
            .args(&extra)
            .env("LD_LIBRARY_PATH", &fake)
            .env("TESSERA_FAKECUDA_DIR", dir.path().join("devices"))
            .env("TESSERA_FAKECUDA_MEMORY", device.to_string())
            .env("LD_PRELOAD", built("libtessera_vgpu.so"))
            .env("TESSERA_GPU_MEMORY_BYTES", slice.to_string())
            .env("TESSERA_COMPUTE_SHARE", "1.000")
            .env("TESSERA_VGPU_SHM", dir.path().join("slice"))
            .env("TESSERA_VGPU_DEVICE_SHM", dir.path().join("gpu0"))
            .env_remove("CUDA_VISIBLE_DEVICES")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the server did not start: {line:?}"))
            .to_string();
        GpuNode { dir, server, addr }
    }

    /// The probe on the CPU node, attached to this GPU node at `addr` with `secret`.
    fn probe(&self, link: &Link, addr: &str, secret: &Path, args: &[&str]) -> Command {
        let client = self.dir.path().join("client");
        if !client.exists() {
            std::fs::create_dir(&client).unwrap();
            for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
                std::os::unix::fs::symlink(built("libtessera_remote_cuda.so"), client.join(name))
                    .unwrap();
            }
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &link.cpu])
            .arg(built("tessera-vgpu-probe"))
            .args(args)
            .env("LD_LIBRARY_PATH", &client)
            .env("TESSERA_REMOTE_GPU", addr)
            .env("TESSERA_REMOTE_SECRET_FILE", secret)
            .env_remove("LD_PRELOAD")
            .env_remove("CUDA_VISIBLE_DEVICES");
        c
    }

    fn attached(&self, link: &Link, args: &[&str]) -> Command {
        self.probe(link, &self.addr, &self.dir.path().join("secret"), args)
    }

    fn stop(mut self) -> String {
        let _ = self.server.kill();
        let out = std::mem::replace(&mut self.server, Command::new("true").spawn().unwrap());
        let out = out.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for GpuNode {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

/// The key=value pairs of a successful probe's last line.
fn results(out: &Output) -> HashMap<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(r: &HashMap<String, String>, key: &str) -> u64 {
    r.get(key)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
        .parse()
        .unwrap()
}

#[test]
fn an_unmodified_program_runs_on_a_remote_slice_that_holds_its_cap() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);

    // Launches with their parameters, copies both ways in chunks, memset, events, pinned
    // memory, graphs: each checked by reading device memory back.
    let r = results(&run(node.attached(&link, &["check"])));
    for key in [
        "fill_ok",
        "memset_ok",
        "copy_ok",
        "events_ok",
        "pinned_ok",
        "graph_ok",
        "copy2d_ok",
    ] {
        assert_eq!(r[key], "1", "{key} in {r:?}");
    }

    // Memory info, through the driver and NVML, is the slice's.
    let r = results(&run(node.attached(&link, &["meminfo"])));
    assert_eq!(num(&r, "total_bytes"), GIB, "{r:?}");
    assert_eq!(num(&r, "device_total_bytes"), GIB, "{r:?}");
    assert_eq!(num(&r, "nvml_total_bytes"), GIB, "{r:?}");
    assert_eq!(num(&r, "free_bytes"), GIB, "{r:?}");

    // Every allocation path the client forwards stops at the cap, exactly.
    for via in ["alloc", "pitch", "async", "pool"] {
        let r = results(&run(node.attached(&link, &["oom", "--via", via])));
        assert_eq!(num(&r, "allocated_bytes"), GIB, "--via {via}: {r:?}");
        assert_eq!(r["result"], "CUDA_ERROR_OUT_OF_MEMORY", "--via {via}");
    }
    // Managed memory is the host's by definition; a remote device cannot offer it.
    let r = results(&run(node.attached(&link, &["oom", "--via", "managed"])));
    assert_eq!(r["result"], "CUDA_ERROR_NOT_SUPPORTED", "{r:?}");

    // Entry points found the way the CUDA runtime finds them, per-thread default stream included.
    let r = results(&run(node.attached(
        &link,
        &[
            "launch",
            "--seconds",
            "0.5",
            "--proc-address",
            "--ptds",
            "--sync-every",
            "10",
        ],
    )));
    assert!(num(&r, "syncs") > 0, "{r:?}");
    let r = results(&run(node.attached(&link, &["graph", "--seconds", "0.5"])));
    assert!(num(&r, "launches") > 0, "{r:?}");

    // An asynchronous call's error comes at the next synchronizing call, once.
    let r = results(&run(node.attached(&link, &["async-error"])));
    assert_eq!(r["call_result"], "CUDA_SUCCESS", "{r:?}");
    assert_eq!(r["sync_result"], "CUDA_ERROR_INVALID_VALUE", "{r:?}");
    assert_eq!(r["next_sync_result"], "CUDA_SUCCESS", "{r:?}");
}

#[test]
fn a_wrong_secret_is_refused() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let wrong = node.dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-attachment-secret-at-all").unwrap();
    let out = run(node.probe(&link, &node.addr, &wrong, &["meminfo"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached with a wrong secret");
    assert!(
        stderr.contains("refused this attachment's secret"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cuInit failed: CUDA_ERROR_NO_DEVICE"),
        "{stderr}"
    );
    let log = node.stop();
    assert!(log.contains("proof of the secret is wrong"), "{log}");
}

/// Starts a long launch loop on the CPU node, lets it run, does `lose` to the GPU node, and
/// returns how long the client took to fail after that, and what it said.
fn fails_after(node: &GpuNode, link: &Link, lose: impl FnOnce()) -> (Duration, String) {
    let mut c = node.attached(link, &["launch", "--seconds", "120", "--sync-every", "10"]);
    let mut probe = c
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        probe.try_wait().unwrap().is_none(),
        "the launch loop stopped early"
    );
    let lost = Instant::now();
    lose();
    let deadline = lost + Duration::from_secs(30);
    while probe.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = lost.elapsed();
    let _ = probe.kill();
    let out = probe.wait_with_output().unwrap();
    (took, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn killing_the_server_fails_the_clients_calls_at_once() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let pid = node.server.id() as i32;
    let (took, stderr) = fails_after(&node, &link, || {
        // SAFETY: kill(2) on the server process this test started (and has not reaped).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    });
    assert!(stderr.contains("CUDA_ERROR_DEVICE_UNAVAILABLE"), "{stderr}");
    assert!(stderr.contains("lost the GPU server"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn a_gpu_node_cut_off_the_network_fails_the_clients_calls_within_seconds() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let (took, stderr) = fails_after(&node, &link, || link.cut());
    assert!(stderr.contains("CUDA_ERROR_DEVICE_UNAVAILABLE"), "{stderr}");
    // Keepalive (2 s idle, 3 probes 1 s apart) or the 5 s send timeout: never a hang.
    assert!(took < Duration::from_secs(12), "took {took:?}");
}

#[test]
fn killing_the_client_frees_its_memory_on_the_gpu_node() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let mut holder = node.attached(
        &link,
        &["oom", "--max", &(768 * MIB).to_string(), "--hold", "60"],
    );
    let mut holder = holder.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("allocated_bytes=805306368"), "{line}");
    let r = results(&run(node.attached(&link, &["meminfo"])));
    assert_eq!(num(&r, "free_bytes"), GIB - 768 * MIB, "held: {r:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = results(&run(node.attached(&link, &["meminfo"])));
        if num(&r, "free_bytes") == GIB {
            break;
        }
        assert!(Instant::now() < deadline, "the slice was not freed: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn calls_that_gather_are_sent_when_the_program_stops_calling() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let mut c = node.attached(&link, &["free-burst", "--hold", "30"]);
    let mut holder = c.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("freed=4"), "{line}");
    // The program makes no further call; its frees must reach the GPU node all the same.
    std::thread::sleep(Duration::from_millis(300));
    let r = results(&run(node.attached(&link, &["meminfo"])));
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        num(&r, "free_bytes"),
        GIB,
        "frees held back in the client: {r:?}"
    );
}

#[test]
fn the_relay_adds_latency_without_changing_results() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    // The relay runs on the CPU node, in front of the server, adding 200 µs to each round trip.
    let mut relay = Command::new("ip")
        .args(["netns", "exec", &link.cpu])
        .arg(env!("CARGO_BIN_EXE_tessera-remote"))
        .args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &node.addr,
            "--rtt-us",
            "200",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let secret = node.dir.path().join("secret");
    let r = results(&run(node.probe(&link, &addr, &secret, &["check"])));
    assert_eq!(r["copy_ok"], "1", "{r:?}");
    assert_eq!(r["fill_ok"], "1", "{r:?}");
    // A synchronization per launch now costs at least the added round trip.
    let r = results(&run(node.probe(
        &link,
        &addr,
        &secret,
        &["launch", "--seconds", "0.5", "--empty", "--sync-every", "1"],
    )));
    let per_step = 1.0 / r["launches_per_s"].parse::<f64>().unwrap();
    assert!(
        per_step >= 200e-6,
        "{per_step} s per synchronized launch: {r:?}"
    );
    let _ = relay.kill();
    let _ = relay.wait();
}

/// A self-signed certificate for `ip`, written as `<name>.pem` and `<name>.key` in `dir`.
fn certificate(dir: &Path, name: &str, ip: &str) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec![ip.to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[test]
fn over_tls_the_client_attaches_only_to_the_server_it_trusts() {
    let link = Link::new();
    let ip = link.gpu_ip.clone();
    let node = GpuNode::start_with(&link, 8 * GIB, GIB, |dir| {
        let (cert, key) = certificate(dir, "server", &ip);
        vec![
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    });
    let ca = node.dir.path().join("server.pem");

    // Trusting the server's certificate: everything works as in the clear.
    let mut c = node.attached(&link, &["check"]);
    c.env("TESSERA_REMOTE_TLS_CA", &ca);
    let r = results(&run(c));
    for key in ["fill_ok", "copy_ok", "pinned_ok", "graph_ok"] {
        assert_eq!(r[key], "1", "{key} in {r:?}");
    }

    // Trusting another certificate: a server that cannot prove itself is refused.
    let (other, _) = certificate(node.dir.path(), "other", &ip);
    let mut c = node.attached(&link, &["meminfo"]);
    c.env("TESSERA_REMOTE_TLS_CA", &other);
    let out = run(c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached to an untrusted server");
    assert!(
        stderr.contains("TLS") && stderr.contains("certificate"),
        "{stderr}"
    );

    // A client that does not speak TLS gets no greeting, and is told why, within seconds.
    let started = Instant::now();
    let out = run(node.attached(&link, &["meminfo"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("set TESSERA_REMOTE_TLS_CA"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_flood_of_connections_is_capped_and_the_server_serves_after_it() {
    let link = Link::new();
    let node = GpuNode::start(&link, 8 * GIB, GIB);
    let (host, port) = node.addr.rsplit_once(':').unwrap();
    let cap = tessera_remote::server::MAX_CONNECTIONS;
    // From the CPU node: cap + 8 connections that never answer the greeting. Those within the
    // cap get the server's greeting; the rest are closed at once.
    let script = format!(
        "import socket\n\
         socks = [socket.create_connection(('{host}', {port})) for _ in range({n})]\n\
         greeted = closed = 0\n\
         for s in socks:\n\
         \x20   s.settimeout(3)\n\
         \x20   try:\n\
         \x20       d = s.recv(64)\n\
         \x20   except Exception:\n\
         \x20       d = None\n\
         \x20   if d: greeted += 1\n\
         \x20   elif d == b'': closed += 1\n\
         print(f'greeted={{greeted}} closed={{closed}}')\n",
        n = cap + 8
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &link.cpu, "python3", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("greeted={cap} closed=8")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The flood's connections are gone (the script ended): the attachment's own program is served.
    let r = results(&run(node.attached(&link, &["meminfo"])));
    assert_eq!(num(&r, "total_bytes"), GIB, "{r:?}");
}
