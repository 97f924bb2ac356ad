//! Container images on a node: pulled from any OCI distribution registry (oci-client speaks the
//! protocol), each layer verified against its digest and unpacked once into a directory that
//! every image and replica holding it shares, kept under an LRU size limit.
//!
//! A layer is streamed from the registry straight into its decompressor (gzip, zstd or plain
//! tar) and unpacked as it arrives, all layers of an image at once, so that a pull is bound by
//! the slowest layer's inflate rather than by the sum (a big ML image's layer takes ~30 s of gzip
//! on one core). Nothing compressed is kept. A layer is unpacked into a partial directory and
//! renamed into place only once its digest and size are checked, so a failed pull (bad
//! credentials, a missing tag, a corrupt layer, an unreachable registry) never leaves a layer in
//! the cache; partial directories a crash left are removed when the store opens.
//!
//! Layers are unpacked in overlayfs's form (whiteouts as 0:0 character devices, opaque
//! directories marked with `trusted.overlay.opaque`), so that a replica's root is an overlay of
//! them. Images are untrusted: paths may not leave the layer (tar checks every entry's parent
//! after resolving links), extended attributes from the image are not applied (a
//! `trusted.overlay.*` one would steer the overlay), and a layer may not unpack to more than the
//! cache's limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Layers not used by a running replica and untouched this long may be collected.
const GC_GRACE_MS: u64 = 10 * 60 * 1000;

/// Credentials for a registry (a project's, stored by the admin).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// What a replica runs from an image: its configuration and its layers, bottom first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pulled {
    /// As the job named it.
    #[serde(default)]
    pub reference: String,
    /// `registry/repository@sha256:…`: what ran, whatever the tag points to later.
    pub resolved: String,
    pub layers: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// For people: what was asked, what it resolved to and how long it took.
    #[serde(default)]
    pub note: String,
}

/// Progress of a pull, for the replica's status and its log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub layers_left: usize,
}

/// What the store knows of a layer beside its directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerMeta {
    /// Bytes it takes unpacked (file contents).
    bytes: u64,
    last_used_ms: u64,
}

/// The node's image store (under the agent's data dir).
pub struct ImageStore {
    root: PathBuf,
    /// Most bytes of unpacked layers kept; least recently used ones go past it.
    limit: u64,
    /// Free space an unpack leaves on the disk (`--image-reserve`); `None` for the default share.
    reserve: Option<u64>,
    /// Registries reached over plain HTTP besides loopback ones (`--insecure-registry`).
    insecure: Vec<String>,
    /// One unpack per layer at a time (two replicas pulling one image share the work).
    unpacking: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Collections one at a time.
    collecting: Mutex<()>,
}

/// `sha256:<hex>` → `sha256-<hex>`, refusing anything else (a digest names a directory).
fn layer_id(digest: &str) -> anyhow::Result<String> {
    match digest.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("sha256-{}", hex.to_ascii_lowercase()))
        }
        _ => bail!("digest {digest:?} is not a sha256 digest"),
    }
}

/// What a registry's error may tell the job's owner. Image references are the member's choice,
/// so the server answering may be any service on the node's loopback (or whatever a hostile
/// registry's auth realm points at): bodies that are not a registry's structured errors are
/// never echoed, and what is echoed is clipped to one short line.
fn registry_reason(e: oci_client::errors::OciDistributionError) -> String {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::ServerError { code, url, .. } => format!(
            "{} answered HTTP {code}, not a registry's answer (is the image reference right?)",
            clip(&url)
        ),
        E::AuthenticationFailure(_) => {
            "the registry's token service refused the credentials (ask the admin to check the \
             project's login with `tessera projects logins`)"
                .to_string()
        }
        E::RegistryError { envelope, url } => {
            let errors: Vec<String> = envelope
                .errors
                .iter()
                .take(3)
                .map(|x| clip(&format!("{:?}: {}", x.code, x.message)))
                .collect();
            format!("{} answered: {}", clip(&url), errors.join("; "))
        }
        other => clip(&other.to_string()),
    }
}

/// One printable line of at most 200 characters.
fn clip(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    if text.chars().count() > 200 {
        format!("{line}…")
    } else {
        line
    }
}

/// Whether `registry` (host[:port]) is on this host: plain HTTP is allowed there, as Docker does.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ImageStore {
    /// Opens the store at `root`, removing what a crash left half-unpacked.
    /// `reserve` is the free space an unpack leaves on the disk (`None`: 5% of it, at most
    /// 4 GiB).
    pub fn open(
        root: &Path,
        limit: u64,
        reserve: Option<u64>,
        insecure: Vec<String>,
    ) -> anyhow::Result<ImageStore> {
        let layers = root.join("layers");
        std::fs::create_dir_all(&layers)
            .with_context(|| format!("creating the image store {}", layers.display()))?;
        std::fs::create_dir_all(root.join("images"))?;
        for e in std::fs::read_dir(&layers)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".partial-") {
                remove_tree(&e.path())?;
            }
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
            limit,
            reserve,
            insecure,
            unpacking: Mutex::default(),
            collecting: Mutex::default(),
        })
    }

    /// The directory of a layer (unpacked, in overlay form).
    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.root.join("layers").join(id)
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.root.join("layers").join(format!("{id}.json"))
    }

    fn client(&self, reference: &Reference) -> Client {
        let registry = reference.resolve_registry().to_string();
        let mut plain = self.insecure.clone();
        if is_loopback(&registry) {
            plain.push(registry);
        }
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        })
    }

    /// Pulls `image` (a tag or a digest), unpacking the layers this node lacks, all at once;
    /// `progress` hears of the bytes as they arrive. Errors carry the registry's reason.
    pub async fn pull(
        self: &Arc<Self>,
        image: &str,
        credentials: Option<&Credentials>,
        progress: impl Fn(Progress) + Send + Sync + 'static,
    ) -> anyhow::Result<Pulled> {
        let reference: Reference = image.parse().map_err(|e| {
            anyhow::anyhow!("image {image:?} is not an image reference ({e}); write e.g. registry.example.com/team/train:1.0")
        })?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = Arc::new(self.client(&reference));
        let registry = reference.resolve_registry().to_string();
        let (manifest, digest, config) = client
            .pull_manifest_and_config(&reference, &auth)
            .await
            .map_err(|e| {
            anyhow::anyhow!("pulling {image} from {registry}: {}", registry_reason(e))
        })?;
        let config: oci_spec::image::ImageConfiguration = serde_json::from_str(&config)
            .with_context(|| format!("{image}: its configuration is not an OCI image config"))?;
        let mut ids = Vec::new();
        let mut wanted = Vec::new();
        for layer in &manifest.layers {
            let id = layer_id(&layer.digest)?;
            decompressor_for(&layer.media_type)?;
            if !self.layer_dir(&id).exists() {
                wanted.push(layer.clone());
            }
            ids.push(id);
        }
        let total: u64 = wanted.iter().map(|l| l.size.max(0) as u64).sum();
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(wanted.len()));
        let progress = Arc::new(progress);
        progress(Progress {
            done_bytes: 0,
            total_bytes: total,
            layers_left: wanted.len(),
        });
        // All layers of the image together may not unpack to more than the cache holds.
        let unpacked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Set when one layer fails: the others stop downloading, and each removes its partial
        // unpack before the pull returns.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for layer in wanted {
            let (store, client, reference) = (self.clone(), client.clone(), reference.clone());
            let (unpacked, stopped) = (unpacked.clone(), stopped.clone());
            let (done, left, progress) = (done.clone(), left.clone(), progress.clone());
            tasks.spawn(async move {
                let report = {
                    let (done, left, progress) = (done.clone(), left.clone(), progress.clone());
                    move |n: u64| {
                        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                        progress(Progress {
                            done_bytes: d,
                            total_bytes: total,
                            layers_left: left.load(std::sync::atomic::Ordering::Relaxed),
                        });
                    }
                };
                let r = store
                    .fetch_layer(&client, &reference, &layer, &unpacked, stopped, report)
                    .await;
                left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                r
            });
        }
        let mut first_error = None;
        while let Some(r) = tasks.join_next().await {
            let r = r
                .map_err(|e| anyhow::anyhow!("a layer's pull failed: {e}"))
                .and_then(|r| r);
            if let Err(e) = r {
                if first_error.is_none() {
                    // The others stop with it: a failed image needs none of its layers now.
                    let _ = stop.send(true);
                    first_error = Some(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.context(format!("pulling {image}")));
        }
        let now = super::now_ms();
        for id in &ids {
            self.touch(id, now);
        }
        let body = config.config().clone().unwrap_or_default();
        let repository = format!("{registry}/{}", reference.repository());
        let pulled = Pulled {
            reference: image.to_string(),
            resolved: format!("{repository}@{digest}"),
            layers: ids,
            entrypoint: body.entrypoint().clone().unwrap_or_default(),
            cmd: body.cmd().clone().unwrap_or_default(),
            env: body.env().clone().unwrap_or_default(),
            working_dir: body.working_dir().clone().filter(|w| !w.is_empty()),
            note: String::new(),
        };
        let record = self
            .root
            .join("images")
            .join(format!("{}.json", layer_id(&digest)?));
        crate::controller::write_private(&record, &serde_json::to_string(&pulled)?)?;
        Ok(pulled)
    }

    /// Streams one layer into its decompressor and unpacks it, then checks it and moves it into
    /// place; on any failure nothing of it stays.
    async fn fetch_layer(
        self: &Arc<Self>,
        client: &Client,
        reference: &Reference,
        layer: &OciDescriptor,
        image_bytes: &Arc<std::sync::atomic::AtomicU64>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
        report: impl Fn(u64) + Send + 'static,
    ) -> anyhow::Result<()> {
        let id = layer_id(&layer.digest)?;
        let lock = {
            let mut all = self.unpacking.lock().unwrap_or_else(|e| e.into_inner());
            all.entry(id.clone()).or_default().clone()
        };
        // Held by the unpacker until it has moved the layer into place or removed it, even if
        // this pull is dropped halfway: the next pull of the layer starts from a clean slate.
        let one = lock.lock_owned().await;
        if self.layer_dir(&id).exists() {
            return Ok(());
        }
        let mut stream = client
            .pull_blob_stream(reference, layer)
            .await
            .map_err(|e| anyhow::anyhow!("layer {}: {}", layer.digest, registry_reason(e)))?
            .stream;
        let partial = self
            .root
            .join("layers")
            .join(format!(".partial-{id}-{}", std::process::id()));
        if *stopped.borrow() {
            bail!("stopped: another layer of the image failed");
        }
        // Chunks go to a blocking unpacker through a bounded channel: download and inflate
        // overlap, and a slow disk slows the download instead of filling memory. The unpacker
        // also checks the layer and moves it into place, or removes it: even a pull cancelled
        // halfway leaves nothing behind.
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let store = self.clone();
        let (layer_copy, into, image_bytes) = (layer.clone(), partial.clone(), image_bytes.clone());
        let unpacker = tokio::task::spawn_blocking(move || {
            let result = store.unpack_checked(rx, &layer_copy, &into, &image_bytes);
            if result.is_err() {
                let _ = remove_tree(&into);
            }
            drop(one);
            result
        });
        let sent = async {
            loop {
                let chunk = tokio::select! {
                    chunk = stream.next() => chunk,
                    _ = stopped.wait_for(|s| *s) => bail!("stopped: another layer of the image failed"),
                };
                let Some(chunk) = chunk else { break };
                let chunk = chunk.map_err(|e| anyhow::anyhow!("downloading: {e}"))?;
                report(chunk.len() as u64);
                if tx.send(chunk).await.is_err() {
                    break; // the unpacker stopped: its error says why
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        drop(tx);
        let unpacked = unpacker
            .await
            .map_err(|e| anyhow::anyhow!("the unpacker failed: {e}"))?;
        // A layer that unpacked and checked is whole, whatever the download said after.
        match (sent, unpacked) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => {
                let _ = remove_tree(&partial);
                Err(e.context(format!("layer {}", layer.digest)))
            }
        }
    }

    /// In the unpacker's thread: unpacks what arrives on `rx` into `into`, checks its digest and
    /// size against `layer`, and moves it into place.
    fn unpack_checked(
        &self,
        rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
        layer: &OciDescriptor,
        into: &Path,
        image_bytes: &std::sync::atomic::AtomicU64,
    ) -> anyhow::Result<()> {
        let id = layer_id(&layer.digest)?;
        let mut source = Verified::new(ChannelReader::new(rx));
        let room = Room {
            image_bytes,
            limit: self.limit,
            reserve: self.reserve,
        };
        let bytes = unpack_layer(&mut source, &layer.media_type, into, &room)?;
        // Whatever the tar did not read still counts toward the digest.
        std::io::copy(&mut source, &mut std::io::sink())?;
        let (digest, size) = source.finish();
        if digest != layer.digest || size != layer.size.max(0) as u64 {
            bail!(
                "it arrived corrupt: {size} bytes with digest {digest} (the manifest says {} \
                 bytes); nothing of it was kept",
                layer.size
            );
        }
        std::fs::rename(into, self.layer_dir(&id))?;
        let meta = LayerMeta {
            bytes,
            last_used_ms: super::now_ms(),
        };
        crate::controller::write_private(&self.meta_path(&id), &serde_json::to_string(&meta)?)?;
        Ok(())
    }

    /// Marks a layer used now (the LRU order).
    fn touch(&self, id: &str, now: u64) {
        let path = self.meta_path(id);
        let mut meta: LayerMeta = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(LayerMeta {
                bytes: 0,
                last_used_ms: now,
            });
        meta.last_used_ms = now;
        if let Ok(text) = serde_json::to_string(&meta) {
            let _ = crate::controller::write_private(&path, &text);
        }
    }

    /// The images (as jobs named them) whose every layer is in the cache, newest first, at most
    /// `max`.
    pub fn held(&self, max: usize) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("images")) else {
            return vec![];
        };
        let mut found: Vec<(std::time::SystemTime, String)> = entries
            .flatten()
            .filter_map(|e| {
                let modified = e.metadata().ok()?.modified().ok()?;
                let p: Pulled = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                let whole = p.layers.iter().all(|l| self.layer_dir(l).is_dir());
                (whole && !p.reference.is_empty()).then_some((modified, p.reference))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut out: Vec<String> = found.into_iter().map(|(_, r)| r).collect();
        out.dedup();
        out.truncate(max);
        out
    }

    /// Layers this node holds, with their unpacked bytes.
    pub fn layers(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(self.root.join("layers")) else {
            return out;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                let bytes = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<LayerMeta>(&b).ok())
                    .map_or(0, |m| m.bytes);
                if self.layer_dir(id).is_dir() {
                    out.insert(id.to_string(), bytes);
                }
            }
        }
        out
    }

    /// Removes least recently used layers until the store is under its limit, sparing those in
    /// `in_use` and those touched in the last ten minutes (a replica about to start). Returns
    /// the layers removed.
    pub fn collect(&self, in_use: &BTreeSet<String>, now: u64) -> Vec<String> {
        let _one = self.collecting.lock().unwrap_or_else(|e| e.into_inner());
        let mut metas: Vec<(String, LayerMeta)> = self
            .layers()
            .into_keys()
            .filter_map(|id| {
                let meta =
                    serde_json::from_slice(&std::fs::read(self.meta_path(&id)).ok()?).ok()?;
                Some((id, meta))
            })
            .collect();
        let mut total: u64 = metas.iter().map(|(_, m)| m.bytes).sum();
        metas.sort_by_key(|(_, m)| m.last_used_ms);
        let mut removed = Vec::new();
        for (id, meta) in metas {
            if total <= self.limit {
                break;
            }
            if in_use.contains(&id) || now.saturating_sub(meta.last_used_ms) < GC_GRACE_MS {
                continue;
            }
            // Renamed first, so that no reader ever sees half a layer.
            let doomed = self.root.join("layers").join(format!(".partial-gc-{id}"));
            if std::fs::rename(self.layer_dir(&id), &doomed).is_ok() {
                let _ = std::fs::remove_file(self.meta_path(&id));
                let _ = remove_tree(&doomed);
                total = total.saturating_sub(meta.bytes);
                removed.push(id);
            }
        }
        removed
    }
}

/// `tessera images …`: the node's cache from the command line.
#[derive(Debug, clap::Subcommand)]
pub enum ImagesCmd {
    /// Pull an image into the cache of the agent whose data dir is given (the agent shares it).
    Pull {
        reference: String,
        /// The agent's data dir.
        #[arg(long, default_value = "tessera-agent")]
        data_dir: PathBuf,
        /// Most disk the cache keeps (as the agent's --image-cache).
        #[arg(long, default_value = "50GiB")]
        image_cache: String,
        /// Free space the unpack leaves on the disk (as the agent's --image-reserve).
        #[arg(long)]
        image_reserve: Option<String>,
        /// A registry (HOST:PORT) reached over plain HTTP (loopback ones always are).
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// A user name for the registry; the password is read from standard input.
        #[arg(long)]
        username: Option<String>,
        /// Print one JSON object instead of words.
        #[arg(long)]
        json: bool,
    },
    /// The layers the cache holds, with their sizes.
    List {
        #[arg(long, default_value = "tessera-agent")]
        data_dir: PathBuf,
    },
    /// This node's GPU driver as the CDI spec its GPU image jobs get (what the agent writes to
    /// <data dir>/cdi at start), for a check on a GPU host or another runtime.
    Cdi {
        /// Where the driver's files are (as the NVIDIA toolkit's --driver-root).
        #[arg(long, default_value = "/")]
        driver_root: PathBuf,
    },
}

/// Runs `tessera images …`.
pub async fn command(cmd: ImagesCmd) -> anyhow::Result<()> {
    match cmd {
        ImagesCmd::Pull {
            reference,
            data_dir,
            image_cache,
            image_reserve,
            insecure_registries,
            username,
            json,
        } => {
            let limit = crate::units::parse_bytes(
                "--image-cache",
                &crate::units::Quantity::Text(image_cache),
            )?;
            let reserve = image_reserve
                .map(|r| {
                    crate::units::parse_bytes("--image-reserve", &crate::units::Quantity::Text(r))
                })
                .transpose()?;
            let credentials = match username {
                Some(username) => {
                    let mut password = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)?;
                    Some(Credentials {
                        username,
                        password: password.trim_end_matches(['\n', '\r']).to_string(),
                    })
                }
                None => None,
            };
            let store = Arc::new(ImageStore::open(
                &data_dir.join("images"),
                limit,
                reserve,
                insecure_registries,
            )?);
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "pulling {msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(reference.clone());
            let began = std::time::Instant::now();
            let shown = bar.clone();
            let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let seen = total.clone();
            let pulled = store
                .pull(&reference, credentials.as_ref(), move |p| {
                    seen.store(p.total_bytes, std::sync::atomic::Ordering::Relaxed);
                    shown.set_length(p.total_bytes);
                    shown.set_position(p.done_bytes);
                })
                .await?;
            bar.finish_and_clear();
            let secs = began.elapsed().as_secs_f64();
            let downloaded = total.load(std::sync::atomic::Ordering::Relaxed);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"reference": reference, "resolved": pulled.resolved,
                        "layers": pulled.layers.len(), "downloaded_bytes": downloaded,
                        "seconds": secs})
                );
            } else {
                println!(
                    "pulled {reference} as {} ({} layers, {:.1} MiB downloaded) in {secs:.2} s",
                    pulled.resolved,
                    pulled.layers.len(),
                    downloaded as f64 / (1 << 20) as f64
                );
            }
            Ok(())
        }
        ImagesCmd::Cdi { driver_root } => {
            let Some(inventory) = super::devices::nvml_inventory()? else {
                bail!("no NVIDIA management library on this host, so no GPUs to describe");
            };
            let spec = super::cdi::discover(&driver_root, inventory.devices.len())?;
            println!("{}", serde_json::to_string_pretty(&spec)?);
            Ok(())
        }
        ImagesCmd::List { data_dir } => {
            let store = ImageStore::open(&data_dir.join("images"), u64::MAX, None, vec![])?;
            let layers = store.layers();
            for (id, bytes) in &layers {
                println!("{id}  {:.1} MiB", *bytes as f64 / (1 << 20) as f64);
            }
            let total: u64 = layers.values().sum();
            println!(
                "{} layers, {:.1} MiB",
                layers.len(),
                total as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}

/// Removes a tree that may hold read-only directories (as images ship them).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// A decompressor for a layer's media type; an error names what is not supported.
fn decompressor_for(media_type: &str) -> anyhow::Result<Compression> {
    let base = media_type
        .trim_start_matches("application/vnd.oci.image.layer.v1.")
        .trim_start_matches("application/vnd.docker.image.rootfs.diff.");
    Ok(match base {
        "tar+gzip" | "tar.gzip" => Compression::Gzip,
        "tar+zstd" => Compression::Zstd,
        "tar" => Compression::None,
        _ => bail!(
            "layer media type {media_type} is not supported (gzip, zstd or plain tar layers are)"
        ),
    })
}

enum Compression {
    Gzip,
    Zstd,
    None,
}

/// Share of the image disk's space an unpack leaves free for the node's other users (run dirs,
/// logs, checkpoints), but never more than [`RESERVE_SPACE_MAX`]: a fixed share of a big disk
/// shared with other things would refuse every pull long before anyone lacked room.
const RESERVE_SPACE_PERCENT: u64 = 5;
const RESERVE_SPACE_MAX: u64 = 4 << 30;
/// Share of the image disk's inodes an unpack leaves free (kubelet's `nodefs.inodesFree`).
const RESERVE_INODES_PERCENT: u64 = 5;

/// What an unpack may take: the image's layers together stay under the cache's limit (a
/// decompression bomb, or an image bigger than the cache), and every entry leaves the disk's
/// reserve of space and inodes free, however many pulls run at once (a hostile image of tiny
/// files would otherwise exhaust the inodes of the disk that holds everyone's logs).
struct Room<'a> {
    image_bytes: &'a std::sync::atomic::AtomicU64,
    limit: u64,
    reserve: Option<u64>,
}

impl Room<'_> {
    /// Takes `bytes` more for one entry written under `dir`, or says why it does not fit.
    fn take(&self, dir: &Path, bytes: u64) -> anyhow::Result<()> {
        let all = self
            .image_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
            + bytes;
        if all > self.limit {
            bail!(
                "the image unpacks to more than the node's image cache limit ({} bytes); ask \
                 the admin for a larger --image-cache or use a smaller image",
                self.limit
            );
        }
        let disk = nix::sys::statvfs::statvfs(dir)
            .with_context(|| format!("measuring the free space of {}", dir.display()))?;
        let block = disk.fragment_size().max(1) as u64;
        let total = disk.blocks() as u64 * block;
        let free = disk.blocks_available() as u64 * block;
        // The entry's own inode and its data rounded up to whole blocks.
        let need = bytes.div_ceil(block) * block;
        let reserve = self
            .reserve
            .unwrap_or((total / 100 * RESERVE_SPACE_PERCENT).min(RESERVE_SPACE_MAX));
        if free.saturating_sub(need) < reserve {
            bail!(
                "the node's image disk is nearly full ({} MiB of {} MiB free; an unpack leaves \
                 {} MiB free for other work): try again once the cache is collected, or ask the \
                 admin for a smaller --image-cache or --image-reserve",
                free >> 20,
                total >> 20,
                reserve >> 20
            );
        }
        let inodes = disk.files() as u64;
        if inodes > 0
            && (disk.files_available() as u64).saturating_sub(1)
                < inodes / 100 * RESERVE_INODES_PERCENT
        {
            bail!(
                "the node's image disk is nearly out of inodes ({} of {} free; an unpack leaves \
                 {RESERVE_INODES_PERCENT}% free): the image has too many files for this node",
                disk.files_available(),
                inodes
            );
        }
        Ok(())
    }
}

/// Unpacks a layer's tar stream into `into` in overlay form; the file bytes it holds. Each entry
/// must fit `room`.
fn unpack_layer(
    source: &mut impl Read,
    media_type: &str,
    into: &Path,
    room: &Room,
) -> anyhow::Result<u64> {
    std::fs::create_dir_all(into)?;
    let reader: Box<dyn Read + '_> = match decompressor_for(media_type)? {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(source)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(source)?),
        Compression::None => Box::new(source),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut bytes = 0u64;
    for entry in archive.entries().context("reading the layer's tar")? {
        let mut entry = entry.context("reading the layer's tar")?;
        let size = entry.header().size().unwrap_or(0);
        bytes += size;
        room.take(into, size)?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                let dir = inside(into, path.parent().unwrap_or(Path::new("")))?;
                std::fs::create_dir_all(&dir)?;
                set_opaque(&dir)?;
            }
            Some(n) if n.starts_with(".wh.") => {
                let hidden = &n[4..];
                if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                    bail!(
                        "the layer has a whiteout that names no file: {}",
                        path.display()
                    );
                }
                let parent = inside(into, path.parent().unwrap_or(Path::new("")))?;
                std::fs::create_dir_all(&parent)?;
                whiteout(&parent.join(hidden))?;
            }
            _ => {
                entry
                    .unpack_in(into)
                    .with_context(|| format!("unpacking {}", path.display()))?;
            }
        }
    }
    Ok(bytes)
}

/// `base/rel` for a relative path of plain components only (what a whiteout may name).
fn inside(base: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("the layer names a path outside itself: {}", rel.display()),
        }
    }
    // A link on the way could still lead out: its parent must resolve inside the layer.
    let real = std::fs::canonicalize(base)?;
    if let Ok(resolved) = std::fs::canonicalize(&out)
        && !resolved.starts_with(&real)
    {
        bail!("the layer's path {} leads outside it", rel.display());
    }
    Ok(out)
}

/// Overlayfs's whiteout: a 0:0 character device hides the lower file of its name.
fn whiteout(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .with_context(|| format!("making the whiteout {}", path.display()))
}

/// Overlayfs's opaque directory: the lower directories of its name are hidden.
pub(super) fn set_opaque(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: both strings are NUL-terminated and live across the call; the value is 1 byte.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("marking {} opaque", dir.display()));
    }
    Ok(())
}

/// A reader over chunks sent from the download (read on a blocking thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Self {
        ChannelReader {
            rx,
            chunk: bytes::Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// Hashes and counts what passes through: the layer's digest, checked once it is all read.
struct Verified<R> {
    inner: R,
    hash: Sha256,
    size: u64,
}

impl<R: Read> Verified<R> {
    fn new(inner: R) -> Self {
        Verified {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    /// The digest (`sha256:<hex>`) and size of everything read.
    fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hash.finalize())),
            self.size,
        )
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_registry::{Image, Layer, Registry};

    #[test]
    fn digests_name_layers_and_nothing_else_does() {
        let hex = "ab".repeat(32);
        assert_eq!(
            layer_id(&format!("sha256:{hex}")).unwrap(),
            format!("sha256-{hex}")
        );
        for bad in [
            "sha256:../../etc",
            "md5:abc",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(layer_id(bad).is_err(), "{bad}");
        }
        assert!(
            is_loopback("127.0.0.1:5000") && is_loopback("localhost") && is_loopback("[::1]:5000")
        );
        assert!(!is_loopback("registry.example.com:5000") && !is_loopback("10.0.0.1"));
    }

    fn base() -> Layer {
        Layer {
            busybox: true,
            files: vec![
                ("/etc/motd".into(), b"base\n".to_vec()),
                ("/data/old/a.txt".into(), b"old\n".to_vec()),
                ("/gone.txt".into(), b"to be removed\n".to_vec()),
            ],
            ..Layer::default()
        }
    }

    /// Two layers: the second removes a file (a whiteout) and replaces a directory (opaque).
    fn two_layers() -> Image {
        Image {
            layers: vec![
                base(),
                Layer {
                    files: vec![("/data/new.txt".into(), b"new\n".to_vec())],
                    remove: vec!["/gone.txt".into(), "/data/old".into()],
                    ..Layer::default()
                },
            ],
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["cat /etc/motd".into()],
            env: vec!["PATH=/bin".into(), "MODEL=tiny".into()],
            workdir: Some("/data".into()),
            ..Image::default()
        }
    }

    /// A store whose unpacks leave 1 MiB free, as an admin sets `--image-reserve` on a small
    /// disk: the tests must not depend on how full the host's disk is.
    fn store(dir: &Path, limit: u64) -> Arc<ImageStore> {
        Arc::new(ImageStore::open(dir, limit, Some(1 << 20), vec![]).unwrap())
    }

    /// A store with the default reserve (a share of its disk).
    fn store_with_default_reserve(dir: &Path, limit: u64) -> Arc<ImageStore> {
        Arc::new(ImageStore::open(dir, limit, None, vec![]).unwrap())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Runtime::new().unwrap()
    }

    /// Every layer the store holds and any partial directory left.
    fn contents(dir: &Path) -> (Vec<String>, Vec<String>) {
        let mut layers = vec![];
        let mut partial = vec![];
        for e in std::fs::read_dir(dir.join("layers")).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".partial") {
                partial.push(name);
            } else if !name.ends_with(".json") {
                layers.push(name);
            }
        }
        layers.sort();
        (layers, partial)
    }

    #[test]
    fn an_image_pulls_into_verified_shared_layers_in_overlay_form_with_its_config() {
        let reg = Registry::start(None);
        let reference = reg.push("team/train:1", &two_layers());
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path(), 1 << 30);
        let rt = runtime();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let pulled = rt
            .block_on(images.pull(&reference, None, move |p| log.lock().unwrap().push(p)))
            .unwrap();
        assert_eq!(pulled.layers.len(), 2);
        assert!(
            pulled
                .resolved
                .starts_with(&format!("{}/team/train@sha256:", reg.addr))
        );
        assert_eq!(pulled.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(pulled.cmd, ["cat /etc/motd"]);
        assert!(pulled.env.contains(&"MODEL=tiny".to_string()));
        assert_eq!(pulled.working_dir.as_deref(), Some("/data"));
        let progress = seen.lock().unwrap().clone();
        let last = progress.last().unwrap();
        assert!(
            last.total_bytes > 500_000 && last.done_bytes == last.total_bytes,
            "{last:?}"
        );
        // The base layer as it was; the top one's removals as overlay whiteouts.
        let (bottom, top) = (
            images.layer_dir(&pulled.layers[0]),
            images.layer_dir(&pulled.layers[1]),
        );
        assert_eq!(
            std::fs::read_to_string(bottom.join("etc/motd")).unwrap(),
            "base\n"
        );
        assert!(bottom.join("bin/busybox").is_file());
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let gone = std::fs::symlink_metadata(top.join("gone.txt")).unwrap();
        assert!(
            gone.file_type().is_char_device() && gone.rdev() == 0,
            "a whiteout"
        );
        assert!(
            std::fs::symlink_metadata(top.join("data/old"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        assert_eq!(
            std::fs::read_to_string(top.join("data/new.txt")).unwrap(),
            "new\n"
        );
        assert_eq!(contents(dir.path()).1, Vec::<String>::new());

        // Pulled again: nothing to download. Another image on the same base downloads only its
        // own layer, and both share the base on disk.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let again = rt
            .block_on(images.pull(&reference, None, move |p| log.lock().unwrap().push(p)))
            .unwrap();
        assert_eq!(again, pulled);
        assert_eq!(seen.lock().unwrap().last().unwrap().total_bytes, 0);
        let family = reg.push_family(
            "team/base:1",
            &Image {
                layers: vec![base()],
                ..Image::default()
            },
            &[
                (
                    "team/eval:1",
                    Layer {
                        files: vec![("/etc/eval".into(), b"x".to_vec())],
                        ..Layer::default()
                    },
                ),
                (
                    "team/serve:1",
                    Layer {
                        files: vec![("/etc/serve".into(), b"y".to_vec())],
                        ..Layer::default()
                    },
                ),
            ],
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let eval = rt
            .block_on(images.pull(&family[1], None, move |p| log.lock().unwrap().push(p)))
            .unwrap();
        let first = seen.lock().unwrap().last().unwrap().total_bytes;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let other = rt
            .block_on(images.pull(&family[2], None, move |p| log.lock().unwrap().push(p)))
            .unwrap();
        let second = seen.lock().unwrap().last().unwrap().total_bytes;
        assert!(
            second < 4096,
            "only its own layer: {second} bytes after {first}"
        );
        assert_eq!(other.layers[0], eval.layers[0], "one base layer, shared");
        assert!(contents(dir.path()).0.len() >= 4);
    }

    #[test]
    fn zstd_layers_unpack_too() {
        let reg = Registry::start(None);
        let image = Image {
            zstd: true,
            ..two_layers()
        };
        let reference = reg.push("z:1", &image);
        let dir = tempfile::tempdir().unwrap();
        let pulled = runtime()
            .block_on(store(dir.path(), 1 << 30).pull(&reference, None, |_| {}))
            .unwrap();
        let top = dir.path().join("layers").join(&pulled.layers[1]);
        assert_eq!(
            std::fs::read_to_string(top.join("data/new.txt")).unwrap(),
            "new\n"
        );
    }

    #[test]
    fn failed_pulls_say_why_and_leave_nothing_in_the_cache() {
        let reg = Registry::start(Some("alice:s3cret"));
        let reference = reg.push("private/train:1", &two_layers());
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path(), 1 << 30);
        let rt = runtime();
        let pull = |image: &str, creds: Option<&Credentials>| {
            rt.block_on(images.pull(image, creds, |_| {}))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        let good = Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        let bad = Credentials {
            password: "guess".into(),
            ..good.clone()
        };
        let e = pull(&reference, Some(&bad)).unwrap_err();
        let refused = |e: &str| e.contains("Not authorized") || e.contains("401");
        assert!(e.contains("pulling") && refused(&e), "{e}");
        assert!(!e.contains("guess"), "the password is never shown: {e}");
        let e = pull(&reference, None).unwrap_err();
        assert!(refused(&e), "{e}");
        let e = pull(&format!("{}/private/train:2", reg.addr), Some(&good)).unwrap_err();
        assert!(
            e.to_lowercase().contains("manifest unknown") || e.contains("404"),
            "{e}"
        );
        let e = pull("127.0.0.1:9/nothing/here:1", None).unwrap_err();
        assert!(e.contains("127.0.0.1:9"), "{e}");
        let e = pull("Not A Reference!", None).unwrap_err();
        assert!(e.contains("not an image reference"), "{e}");
        assert_eq!(contents(dir.path()), (vec![], vec![]));

        // A corrupt layer (a byte changed, same size): refused, nothing of it kept.
        let biggest = reg
            .blob_files()
            .into_iter()
            .max_by_key(|f| std::fs::metadata(f).unwrap().len())
            .unwrap();
        let mut data = std::fs::read(&biggest).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&biggest, data).unwrap();
        let e = pull(&reference, Some(&good)).unwrap_err();
        // Caught by the download's digest check, or by ours when the stream ends early.
        assert!(
            e.contains("Invalid digest") || e.contains("arrived corrupt"),
            "{e}"
        );
        let (layers, partial) = contents(dir.path());
        assert!(partial.is_empty(), "{partial:?}");
        assert!(
            layers.len() <= 1,
            "only the sound layer may stay: {layers:?}"
        );
        let hex = biggest
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(!layers.contains(&format!("sha256-{hex}")), "{layers:?}");
    }

    /// A node-local HTTP service that is not a registry: it answers every request with `status`
    /// and a secret body; with `realm`, it first sends `/v2/` requests to its token "realm".
    fn local_service(status: u16, realm: bool) -> std::net::SocketAddr {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let body = "SECRET-admin-password-hunter2";
                let head = if realm && first.contains("/v2/") && !first.contains("/realm") {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer \
                         realm=\"http://{addr}/realm\",service=\"x\"\r\n"
                    )
                } else {
                    format!("HTTP/1.1 {status} Whatever\r\n")
                };
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    #[test]
    fn a_reference_naming_a_local_service_learns_nothing_of_its_answers() {
        let dir = tempfile::tempdir().unwrap();
        let images = store(dir.path(), 1 << 30);
        let rt = runtime();
        let login = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        for (status, realm) in [(403, false), (404, false), (500, false), (403, true)] {
            let addr = local_service(status, realm);
            let creds = realm.then_some(&login);
            let e = rt
                .block_on(images.pull(&format!("{addr}/admin/keys:1"), creds, |_| {}))
                .map(|_| ())
                .unwrap_err();
            let e = format!("{e:#}");
            assert!(
                !e.contains("SECRET"),
                "a local service's body was echoed: {e}"
            );
            assert!(e.contains(&addr.to_string()), "{e}");
        }
        assert_eq!(contents(dir.path()), (vec![], vec![]));
    }

    /// A tmpfs of `size` with `inodes` inodes at a fresh directory, unmounted when dropped.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount(options: &str) -> SmallDisk {
            let dir = tempfile::tempdir().unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                dir.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(options),
            )
            .expect("mounting a tmpfs (the tests run as root)");
            SmallDisk(dir)
        }

        fn free(&self) -> (u64, u64) {
            let st = nix::sys::statvfs::statvfs(self.0.path()).unwrap();
            (
                st.blocks_available() as u64 * st.fragment_size() as u64,
                st.files_available() as u64,
            )
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// `n` bytes no compressor can shrink.
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn pulls_leave_the_disks_reserve_of_space_and_inodes_free_and_fit_the_cache() {
        let reg = Registry::start(None);
        let one_layer = |files: Vec<(String, Vec<u8>)>| Image {
            layers: vec![Layer {
                files,
                ..Layer::default()
            }],
            ..Image::default()
        };
        let tiny_files = reg.push(
            "tiny:1",
            &one_layer((0..2500).map(|i| (format!("/f/{i}"), vec![b'x'])).collect()),
        );
        let big_file = reg.push("big:1", &one_layer(vec![("/blob".into(), noise(31 << 20))]));
        let disk = SmallDisk::mount("size=32m,nr_inodes=2000");
        let images = store_with_default_reserve(disk.0.path(), 1 << 40);
        let before = disk.free();
        let rt = runtime();
        let pull = |image: &str| {
            rt.block_on(images.pull(image, None, |_| {}))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        let e = pull(&tiny_files).unwrap_err();
        assert!(e.contains("nearly out of inodes"), "{e}");
        let e = pull(&big_file).unwrap_err();
        assert!(
            e.contains("nearly full") && e.contains("of 32 MiB free"),
            "{e}"
        );
        assert_eq!(contents(disk.0.path()), (vec![], vec![]));
        let after = disk.free();
        assert!(
            after.0 + (64 << 10) >= before.0 && after.1 + 8 >= before.1,
            "failed pulls gave their room back: {before:?} → {after:?}"
        );
        // A sound image still fits, but not under an admin's larger reserve.
        let sound = reg.push("sound:1", &two_layers());
        let e = rt
            .block_on(
                Arc::new(ImageStore::open(disk.0.path(), 1 << 40, Some(32 << 20), vec![]).unwrap())
                    .pull(&sound, None, |_| {}),
            )
            .map(|_| ())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("leaves 32 MiB free") && e.contains("--image-reserve"),
            "{e}"
        );
        pull(&sound).unwrap();

        // Layers that fit one by one but not together do not fit the cache.
        let two_halves = Image {
            layers: vec![
                Layer {
                    files: vec![("/a".into(), noise(600 << 10))],
                    ..Layer::default()
                },
                Layer {
                    files: vec![("/b".into(), noise(600 << 10))],
                    ..Layer::default()
                },
            ],
            ..Image::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let small_cache = store(dir.path(), 1 << 20);
        let e = rt
            .block_on(small_cache.pull(&reg.push("halves:1", &two_halves), None, |_| {}))
            .map(|_| ())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("image cache limit (1048576 bytes)"), "{e}");
        assert_eq!(contents(dir.path()).1, Vec::<String>::new());
    }

    #[test]
    fn the_least_recently_used_layers_go_past_the_limit_but_not_those_in_use() {
        let reg = Registry::start(None);
        let dir = tempfile::tempdir().unwrap();
        // Room for the busybox image and little more.
        let images = store(dir.path(), 3 << 20);
        let rt = runtime();
        let a = rt
            .block_on(images.pull(&reg.push("a:1", &two_layers()), None, |_| {}))
            .unwrap();
        let b_image = Image {
            layers: vec![Layer {
                files: vec![("/b".into(), vec![7; 2 << 20])],
                ..Layer::default()
            }],
            ..Image::default()
        };
        let b = rt
            .block_on(images.pull(&reg.push("b:1", &b_image), None, |_| {}))
            .unwrap();
        let now = super::super::now_ms();
        // Within the grace after a pull nothing goes: a replica may be about to start.
        assert!(images.collect(&BTreeSet::new(), now).is_empty());
        let later = now + GC_GRACE_MS + 1;
        let in_use: BTreeSet<String> = a.layers.iter().cloned().collect();
        let removed = images.collect(&in_use, later);
        assert_eq!(removed, b.layers);
        assert_eq!(contents(dir.path()).0, {
            let mut l = a.layers.clone();
            l.sort();
            l
        });
        // Under the limit nothing more goes; with a smaller one, all that is not in use.
        assert!(images.collect(&BTreeSet::new(), later).is_empty());
        let smaller = store(dir.path(), 1);
        assert_eq!(smaller.collect(&BTreeSet::new(), later).len(), 2);
        assert_eq!(contents(dir.path()), (vec![], vec![]));
    }
}
