//! A real OCI registry for tests (Debian's `docker-registry`, distribution v2) on 127.0.0.1, and
//! small images built without Docker: `umoci` makes the layers from a directory tree (busybox
//! from `busybox-static` where a shell is needed), `skopeo` pushes them. `scripts/test-deps.sh`
//! installs all three. Shared by the pool tests and the agent's image store tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A registry process with its storage in a temp dir; killed when dropped.
pub struct Registry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
    /// `user:password` when the registry asks for them.
    pub creds: Option<String>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Registry {
    /// Starts a registry; with `creds` (`user:password`) it asks for them (htpasswd, bcrypt).
    pub fn start(creds: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(c) = creds {
            let (user, password) = c.split_once(':').unwrap();
            let hash = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .unwrap();
            let hash = String::from_utf8(hash.stdout).unwrap();
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{}\n", hash.trim())).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd: {{realm: tessera-test, path: {}}}\n",
                file.display()
            ));
        }
        let conf = dir.path().join("config.yml");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/test-deps.sh installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            addr,
            dir,
            child,
            creds: creds.map(str::to_string),
        }
    }

    /// Builds `image` and pushes it as `name:tag`; returns the reference.
    pub fn push(&self, name_tag: &str, image: &Image) -> String {
        self.push_family(name_tag, image, &[]).remove(0)
    }

    /// Pushes `base` as `name_tag` and, for each of `tops`, an image of `base` with one more
    /// layer, built from the very same base blobs (so that they share layers, as images built
    /// FROM one base do).
    pub fn push_family(&self, name_tag: &str, base: &Image, tops: &[(&str, Layer)]) -> Vec<String> {
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("layout");
        let img = format!("{}:t", layout.display());
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &img]));
        let bundle = work.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image", &img])
            .arg(&bundle));
        for layer in &base.layers {
            layer.apply(&bundle.join("rootfs"));
            run(Command::new("umoci")
                .args(["repack", "--refresh-bundle", "--image", &img])
                .arg(&bundle));
        }
        let mut config = vec!["config".to_string(), "--image".into(), img.clone()];
        for e in &base.entrypoint {
            config.push(format!("--config.entrypoint={e}"));
        }
        for c in &base.cmd {
            config.push(format!("--config.cmd={c}"));
        }
        for e in &base.env {
            config.push(format!("--config.env={e}"));
        }
        if let Some(w) = &base.workdir {
            config.push(format!("--config.workingdir={w}"));
        }
        run(Command::new("umoci").args(&config));
        let mut refs = vec![self.copy(&img, name_tag, base.zstd)];
        for (i, (top_name, layer)) in tops.iter().enumerate() {
            let top = format!("{}:top{i}", layout.display());
            let b = work.path().join(format!("bundle{i}"));
            run(Command::new("umoci")
                .args(["unpack", "--image", &img])
                .arg(&b));
            layer.apply(&b.join("rootfs"));
            run(Command::new("umoci")
                .args(["repack", "--image", &top])
                .arg(&b));
            refs.push(self.copy(&top, top_name, base.zstd));
        }
        refs
    }

    /// Pushes the layout image `img` as `name_tag`.
    fn copy(&self, img: &str, name_tag: &str, zstd: bool) -> String {
        let reference = format!("{}/{name_tag}", self.addr);
        let mut copy = Command::new("skopeo");
        copy.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if zstd {
            copy.args(["--dest-compress", "--dest-compress-format", "zstd"]);
        }
        if let Some(c) = &self.creds {
            copy.args(["--dest-creds", c]);
        }
        copy.arg(format!("oci:{img}"))
            .arg(format!("docker://{reference}"));
        run(&mut copy);
        reference
    }

    /// The files of every blob the registry stores (to corrupt one in a test).
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        let blobs = self.dir.path().join("data/docker/registry/v2/blobs/sha256");
        for a in std::fs::read_dir(blobs).unwrap().flatten() {
            for b in std::fs::read_dir(a.path()).unwrap().flatten() {
                out.push(b.path().join("data"));
            }
        }
        out
    }
}

/// What changes in one layer.
#[derive(Default, Clone)]
pub struct Layer {
    /// Files written (path in the image, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Executable files written (path in the image, contents), mode 0755.
    pub programs: Vec<(String, Vec<u8>)>,
    /// Paths removed (become whiteouts).
    pub remove: Vec<String>,
    /// Put busybox-static in /bin with the applets a test needs.
    pub busybox: bool,
}

impl Layer {
    fn apply(&self, rootfs: &Path) {
        if self.busybox {
            let bin = rootfs.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static");
            for applet in [
                "sh", "cat", "ls", "id", "echo", "pwd", "env", "sleep", "touch", "head", "grep",
                "test", "[", "stat", "mkdir", "rm", "wc", "true", "false",
            ] {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
            }
        }
        for (path, contents) in &self.files {
            let p = rootfs.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, contents).unwrap();
        }
        for (path, contents) in &self.programs {
            use std::os::unix::fs::PermissionsExt;
            let p = rootfs.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, contents).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for path in &self.remove {
            let p = rootfs.join(path.trim_start_matches('/'));
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }
}

/// An image: its layers, bottom first, and its configuration.
#[derive(Default, Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// Layers compressed with zstd instead of gzip.
    pub zstd: bool,
}
