//! Running a replica from an image with an OCI runtime (runc, Debian's): its root is an overlay
//! of the image's shared layers with a private upper directory, and its `config.json` (written
//! with oci-spec's runtime types) gives it the confinement of the process mode: a user namespace
//! in which its root is the project's unprivileged uid on the host, its own mount, pid, ipc and
//! uts namespaces, no capabilities and no new privileges, the replica's cgroup (its limits, and
//! the shim's kill of everything in it). Host networking, as NCCL and the gateway need. What it
//! needs of the node is bound in at the same path: its run dir (checkpoints, hostfile, replica
//! set), its volumes (read-only where marked), its slice's accounting region and the simulated
//! driver on simulated nodes.
//!
//! The image's layers belong to the host's root, which is not mapped in the user namespace: to
//! the job they are owned by `nobody` and read-only, as with Docker's `--read-only`; it writes
//! in its work directory, `/tmp`, its volumes and what it creates at the top of its root.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilities, LinuxIdMappingBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::image::Pulled;

/// Where a transparently checkpointed container sees its run dir: the same path on every node and
/// attempt, since CRIU restores mounts (and the open files and environment that name them) by
/// their path in the container.
pub const RUN_DIR_AT: &str = "/.tessera";

/// A container saved and restored whole by the runtime's CRIU support (`runc checkpoint`).
pub struct Checkpointing {
    /// Where dumps go (in the run dir): CRIU's images, then the files the job wrote at the top of
    /// its root (`root.tar`) and in its `/tmp` (`tmp.tar`), packed while it is still frozen.
    pub dir: PathBuf,
    /// A verified checkpoint to restore: its files are put back before the root is mounted.
    pub restore_from: Option<PathBuf>,
}

/// A path bound into the container at the same path.
#[derive(Debug, Clone)]
pub struct Bind {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a container of one replica is made of.
pub struct Plan<'a> {
    /// The runtime's name for it (unique per agent).
    pub id: String,
    /// Where its bundle goes (see [`bundle_dir`]).
    pub bundle: PathBuf,
    pub run_dir: &'a Path,
    /// The image's layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    pub image: &'a Pulled,
    /// The job's command: it replaces the image's `CMD` (Docker's `run IMAGE CMD`).
    pub command: &'a [String],
    /// Tessera's variables and the job's, over the image's own.
    pub env: &'a BTreeMap<String, String>,
    /// Where it starts: the job's workdir, else the image's, else `/`.
    pub workdir: Option<&'a str>,
    /// The host uid its root is (a user namespace maps 0 to it); `None` where the admin allowed
    /// unconfined work (its root is the host's).
    pub uid: Option<u32>,
    pub binds: Vec<Bind>,
    /// Bound on `/tmp`.
    pub tmp: PathBuf,
    /// The replica's cgroup, relative to the hierarchy's root (the runtime joins it).
    pub cgroups_path: Option<String>,
    /// Transparent checkpoints through the runtime.
    pub checkpointing: Option<Checkpointing>,
    /// Real GPUs: the driver's device nodes and libraries (see [`super::cdi`]).
    pub gpu: Option<super::cdi::Edits>,
}

/// The bundle directory of a replica's container: under the data dir, which the container's
/// user may pass through, not in the run dir (under the agent's private directory).
pub fn bundle_dir(data_dir: &Path, key: &str) -> PathBuf {
    data_dir.join("bundles").join(key)
}

/// The program the container runs: entrypoint, then the job's command or the image's `CMD`.
fn args(image: &Pulled, command: &[String]) -> anyhow::Result<Vec<String>> {
    let mut args = image.entrypoint.clone();
    if command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    } else {
        args.extend(command.iter().cloned());
    }
    if args.is_empty() {
        bail!(
            "image {} has no entrypoint or command of its own: give the job a command",
            image.resolved
        );
    }
    Ok(args)
}

/// Makes the bundle: mounts the overlay root and writes `config.json`. Returns the bundle's dir.
/// With a checkpoint to restore, also the directory its images are in (see
/// [`restore_command`]).
pub fn prepare(plan: &Plan) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let bundle = plan.bundle.clone();
    let mut restore_images = None;
    if plan.uid.is_some() {
        passable(&bundle)?;
    }
    if let Some(parent) = bundle.parent() {
        std::fs::create_dir_all(parent)?;
        crate::controller::restrict(parent, 0o711)?;
    }
    let (rootfs, upper, work) = (
        bundle.join("rootfs"),
        bundle.join("upper"),
        bundle.join("work"),
    );
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d)?;
    }
    crate::controller::restrict(&bundle, 0o711)?;
    if let Some(uid) = plan.uid {
        // Its root directory is its own: it may create what it likes at the top.
        std::os::unix::fs::chown(&upper, Some(uid), Some(uid))?;
    }
    if let Some(c) = &plan.checkpointing {
        if let Some(from) = &c.restore_from {
            let owner = std::fs::read_to_string(from.join(OWNER_FILE))
                .ok()
                .and_then(|t| t.trim().parse().ok());
            unpack_saved(&from.join(ROOT_TAR), &upper, owner, plan.uid)?;
            unpack_saved(&from.join(TMP_TAR), &plan.tmp, owner, plan.uid)?;
            // CRIU reads the images partly from inside the user namespace, before and after
            // its ids are mapped (as nobody, then as the container's root): they move where
            // others may pass (the bundle) under a name nobody can guess or list, readable
            // there, and go as soon as the container runs again (the shim removes them). The job
            // itself never sees them (they are not in its mount namespace).
            let images = bundle.join(format!("{RESTORE_IMAGES}-{}", crate::auth::random_hex(16)));
            std::fs::rename(from.join("images"), &images)
                .context("moving the checkpoint's images into the bundle")?;
            readable_by_name(&images)?;
            restore_images = Some(images);
        }
        write_post_dump(plan, &bundle, &upper, &c.dir)?;
        // CRIU's restore opens the sources of bind mounts from inside the user namespace, where
        // the agent's private directories cannot be passed: the run dir and /tmp are bound in
        // from the bundle, which can.
        for (name, source) in [("run", plan.run_dir), ("tmp", plan.tmp.as_path())] {
            let at = bundle.join(MOUNTS).join(name);
            std::fs::create_dir_all(&at)?;
            crate::controller::restrict(&bundle.join(MOUNTS), 0o711)?;
            if !has_mount_under(&at) {
                nix::mount::mount(
                    Some(source),
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .with_context(|| format!("binding {} at {}", source.display(), at.display()))?;
            }
        }
    }
    let empty = bundle.join("empty");
    let mut lower: Vec<String> = plan
        .layers
        .iter()
        .rev()
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    if lower.is_empty() {
        std::fs::create_dir_all(&empty)?;
        lower.push(empty.to_string_lossy().into_owned());
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() > 4000 {
        bail!(
            "the image has {} layers, more than one overlay mount can name here; flatten it \
             (e.g. squash its layers) or shorten the agent's --data-dir",
            plan.layers.len()
        );
    }
    if !has_mount_under(&rootfs) {
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting the image's layers at {}", rootfs.display()))?;
    }
    // Mount points for what is bound in, made as the host's root before the runtime (in the
    // user namespace) would need to.
    let mut targets: Vec<(&Path, bool)> = plan
        .binds
        .iter()
        .map(|b| (b.path.as_path(), b.path.is_dir()))
        .collect();
    let run_dir_at = match plan.checkpointing {
        Some(_) => Path::new(RUN_DIR_AT),
        None => plan.run_dir,
    };
    targets.push((run_dir_at, true));
    for host in ["/etc/hosts", "/etc/resolv.conf"] {
        targets.push((Path::new(host), false));
    }
    targets.push((Path::new("/tmp"), true));
    if let Some(gpu) = &plan.gpu {
        targets.extend(
            gpu.mounts
                .iter()
                .map(|m| (Path::new(m.container_path.as_str()), false)),
        );
    }
    for (path, dir) in targets {
        let inside = rootfs.join(path.strip_prefix("/").unwrap_or(path));
        if dir {
            make_dirs(&rootfs, &inside)?;
        } else {
            make_file(&rootfs, &inside)?;
        }
    }
    spec(plan)?.save(bundle.join("config.json"))?;
    Ok((bundle, restore_images))
}

/// Files 0644 and directories 0711 under `dir` (and it): readable by whoever knows their names.
fn readable_by_name(dir: &Path) -> anyhow::Result<()> {
    set_mode(dir, 0o711)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            readable_by_name(&e.path())?;
        } else if t.is_file() {
            set_mode(&e.path(), 0o644)?;
        }
    }
    Ok(())
}

/// The runtime sets up the root inside the user namespace, as the container's root, which is an
/// unprivileged uid on the host: every directory above the bundle must let others pass.
fn passable(bundle: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for dir in bundle.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            bail!(
                "image jobs run as an unprivileged uid that must pass through {} (mode {:o}) \
                 to reach the image's root; let others pass (chmod o+x), or give the agent a \
                 --data-dir under directories they may pass (e.g. /var/lib/tessera)",
                dir.display(),
                meta.permissions().mode() & 0o7777
            );
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates the directories from `root` down to `dir` that are missing, 0755 (the agent's umask
/// would make them its own, and the container's root could not pass). The image is untrusted and
/// this runs as the host's root: a link on the way (`/var -> /etc`) would lead outside the
/// container's root, so none is followed.
fn make_dirs(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut at = root.to_path_buf();
    for c in dir.strip_prefix(root).unwrap_or(dir).components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => bail!(no_links(root, &at)),
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir(&at)?;
                set_mode(&at, 0o755)?;
            }
        }
    }
    Ok(())
}

/// Creates an empty file at `path` (its directories made by [`make_dirs`]) unless one is there;
/// a link there is refused, and the file is never created through one.
fn make_file(root: &Path, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    make_dirs(root, path.parent().unwrap_or(root))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!(no_links(root, path)),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            Ok(set_mode(path, 0o644)?)
        }
    }
}

fn no_links(root: &Path, at: &Path) -> String {
    format!(
        "the image has a link at /{} where Tessera binds a path of the node; an image may not \
         put links there",
        at.strip_prefix(root).unwrap_or(at).display()
    )
}

/// Whether anything is mounted at `path` or below it, from the kernel's own table (a bind mount
/// from the same file system has its parent's device, so devices cannot tell).
fn has_mount_under(path: &Path) -> bool {
    let Ok(path) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true; // unknown: assume the worst
    };
    table.lines().any(|line| {
        line.split(' ').nth(4).is_some_and(|at| {
            // Spaces and the like are octal escapes in the table.
            let at = at
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\");
            Path::new(&at).starts_with(&path)
        })
    })
}

fn bind(path: &Path, read_only: bool) -> anyhow::Result<oci_spec::runtime::Mount> {
    let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
    if read_only {
        options.push("ro".into());
    }
    Ok(MountBuilder::default()
        .destination(path)
        .typ("bind")
        .source(path)
        .options(options)
        .build()?)
}

/// The runtime's configuration of one replica's container.
fn spec(plan: &Plan) -> anyhow::Result<Spec> {
    let mut env: BTreeMap<String, String> = plan
        .image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    // Paths in the run dir, as the container sees it.
    let seen_at = |v: &str| -> String {
        if plan.checkpointing.is_none() {
            return v.to_string();
        }
        let canonical = std::fs::canonicalize(plan.run_dir).unwrap_or(plan.run_dir.to_path_buf());
        for base in [plan.run_dir, canonical.as_path()] {
            if let Ok(rest) = Path::new(v).strip_prefix(base) {
                return Path::new(RUN_DIR_AT)
                    .join(rest)
                    .to_string_lossy()
                    .into_owned();
            }
        }
        v.to_string()
    };
    env.extend(plan.env.iter().map(|(k, v)| (k.clone(), seen_at(v))));
    let cwd = plan
        .workdir
        .map(str::to_string)
        .or_else(|| plan.image.working_dir.clone())
        .unwrap_or_else(|| "/".into());
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args(plan.image, plan.command)?)
        .env(
            env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(cwd)
        .no_new_privileges(true)
        // No capabilities, as in the process mode (they would hold only in its namespace).
        .capabilities(LinuxCapabilities::default())
        .build()?;
    let mut process = process;
    let none = std::collections::HashSet::new();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(none.clone()))
        .set_effective(Some(none.clone()))
        .set_inheritable(Some(none.clone()))
        .set_permitted(Some(none.clone()))
        .set_ambient(Some(none));
    process.set_capabilities(Some(caps));
    // Open files and the like as the shim has them, not runc's default of 1024.
    process.set_rlimits(None);

    let mut namespaces = vec![];
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    let mut linux = LinuxBuilder::default();
    if let Some(uid) = plan.uid {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()?,
        );
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(uid)
            .size(1u32)
            .build()?;
        linux = linux.uid_mappings(vec![map]).gid_mappings(vec![map]);
    }
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = linux
        .namespaces(namespaces)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()?;
    linux.set_resources(None);
    linux.set_cgroups_path(plan.cgroups_path.as_ref().map(PathBuf::from));

    // The usual /proc, /dev, /dev/pts, /dev/shm and /dev/mqueue; /sys bound read-only from the
    // host (a sysfs mount needs a network namespace of its own).
    let mut mounts: Vec<oci_spec::runtime::Mount> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| !m.destination().starts_with("/sys"))
        .collect();
    if plan.uid.is_some() {
        // In a user namespace devpts takes no gid=5 (no such group is mapped).
        for m in &mut mounts {
            if m.destination() == Path::new("/dev/pts") {
                let options: Vec<String> = m
                    .options()
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|o| !o.starts_with("gid="))
                    .collect();
                m.set_options(Some(options));
            }
        }
    }
    // CRIU cannot restore the host's /sys bound recursively into a user namespace (its submounts
    // are locked there), and a sysfs of its own needs a network namespace: a transparently
    // checkpointed container goes without /sys.
    if plan.checkpointing.is_none() {
        mounts.push(bind(Path::new("/sys"), true)?);
    }
    mounts.push(bind(Path::new("/etc/hosts"), true)?);
    mounts.push(bind(Path::new("/etc/resolv.conf"), true)?);
    let from_bundle = |name: &str, own: &Path| match plan.checkpointing {
        Some(_) => plan.bundle.join(MOUNTS).join(name),
        None => own.to_path_buf(),
    };
    let mut tmp = bind(&from_bundle("tmp", &plan.tmp), false)?;
    tmp.set_destination(PathBuf::from("/tmp"));
    mounts.push(tmp);
    let mut run = bind(&from_bundle("run", plan.run_dir), false)?;
    if plan.checkpointing.is_some() {
        run.set_destination(PathBuf::from(RUN_DIR_AT));
    }
    mounts.push(run);
    for b in &plan.binds {
        mounts.push(bind(&b.path, b.read_only)?);
    }

    let mut spec = Spec::default();
    spec.set_process(Some(process))
        .set_root(Some(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()?,
        ))
        .set_hostname(Some(plan.id.clone()))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    if let Some(gpu) = &plan.gpu {
        super::cdi::apply(gpu, &mut spec)?;
    }
    if plan.checkpointing.is_some() {
        // runc hands CRIU this configuration file on checkpoint and restore.
        spec.set_annotations(Some(std::collections::HashMap::from([(
            "org.criu.config".to_string(),
            plan.bundle.join(CRIU_CONF).to_string_lossy().into_owned(),
        )])));
    }
    Ok(spec)
}

/// In a transparent checkpoint: the files the job wrote at the top of its root, in `/tmp`, and
/// the host uid that owned them.
const ROOT_TAR: &str = "root.tar";
const TMP_TAR: &str = "tmp.tar";
const OWNER_FILE: &str = "owner";
const CRIU_CONF: &str = "criu.conf";
/// Where a transparently checkpointed container's run dir and /tmp are bound, in the bundle.
const MOUNTS: &str = "mnt";
/// Where a restore's images are, in the bundle.
const RESTORE_IMAGES: &str = "restore-images";

/// CRIU's configuration for the container (its post-dump action) and the action itself: while
/// the container is still frozen, the files it wrote at the top of its root and in its `/tmp` are
/// packed beside the images, so that files and memory agree (as the process mode copies its
/// home).
fn write_post_dump(plan: &Plan, bundle: &Path, upper: &Path, dir: &Path) -> anyhow::Result<()> {
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let script = bundle.join("post-dump.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
             tar --xattrs --xattrs-include=trusted.overlay.opaque --numeric-owner -C {upper} \
             -cf {root} . && tar --numeric-owner -C {tmp} -cf {tmp_tar} . && \
             echo {owner} > {owner_file}\n",
            upper = q(upper),
            root = q(&dir.join(ROOT_TAR)),
            tmp = q(&plan.tmp),
            tmp_tar = q(&dir.join(TMP_TAR)),
            owner = plan.uid.unwrap_or(0),
            owner_file = q(&dir.join(OWNER_FILE)),
        ),
    )?;
    set_mode(&script, 0o700)?;
    std::fs::write(
        bundle.join(CRIU_CONF),
        format!("action-script {}\n", script.display()),
    )?;
    Ok(())
}

/// Puts back files a checkpoint saved (`tar`) into `into`: plain files, directories, links and
/// overlay whiteouts only, nothing outside `into`, and what the job's old uid owned now owned by
/// its uid on this node.
fn unpack_saved(
    tar_path: &Path,
    into: &Path,
    old: Option<u32>,
    new: Option<u32>,
) -> anyhow::Result<()> {
    use tar::EntryType;
    let file = std::fs::File::open(tar_path)
        .with_context(|| format!("the checkpoint lacks {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let whiteout = kind == EntryType::Char
            && matches!(entry.header().device_major(), Ok(Some(0)))
            && matches!(entry.header().device_minor(), Ok(Some(0)));
        if !(whiteout
            || matches!(
                kind,
                EntryType::Regular | EntryType::Directory | EntryType::Symlink | EntryType::Link
            ))
        {
            bail!(
                "the checkpoint holds {}, which is not a file, a directory or a link",
                entry.path()?.display()
            );
        }
        let opaque = entry.pax_extensions()?.is_some_and(|mut pax| {
            pax.any(|x| x.is_ok_and(|x| x.key() == Ok("SCHILY.xattr.trusted.overlay.opaque")))
        });
        let path = entry.path()?.into_owned();
        if !entry.unpack_in(into)? {
            bail!(
                "the checkpoint names a path outside its root: {}",
                path.display()
            );
        }
        if opaque && kind == EntryType::Directory {
            super::image::set_opaque(&into.join(&path))?;
        }
    }
    if let (Some(old), Some(new)) = (old, new)
        && old != new
    {
        reown(into, old, new)?;
    }
    Ok(())
}

/// What `old` owns under `dir` (links themselves, not what they name) becomes `new`'s.
fn reown(dir: &Path, old: u32, new: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = (meta.uid() == old).then_some(new);
    let gid = (meta.gid() == old).then_some(new);
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(dir, uid, gid)?;
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(dir)? {
            reown(&e?.path(), old, new)?;
        }
    }
    Ok(())
}

/// The runtime's checkpoint of a running container (the shim's side).
#[derive(Debug, Clone)]
pub struct RuntimeCheckpoint {
    pub runc: PathBuf,
    pub state: PathBuf,
    pub id: String,
    pub criu: PathBuf,
}

impl RuntimeCheckpoint {
    /// Whether the runtime has the container running (a restore has finished).
    pub fn running(&self) -> bool {
        std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state)
            .arg("state")
            .arg(&self.id)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .is_some_and(|s| s["status"] == "running")
    }

    /// Dumps the container into `dir` (CRIU's images in `images/`; the post-dump action packs
    /// its files beside them), then `COMPLETE`. Without `leave_running` the container ends.
    pub fn dump(
        &self,
        dir: &Path,
        leave_running: bool,
        limit: std::time::Duration,
    ) -> anyhow::Result<()> {
        let marker = dir.join(super::checkpoint::MARKER);
        let _ = std::fs::remove_file(&marker);
        let images = dir.join("images");
        if images.exists() {
            std::fs::remove_dir_all(&images)?;
        }
        std::fs::create_dir_all(&images)?;
        let work = dir.with_file_name("criu-work");
        std::fs::create_dir_all(&work)?;
        let mut cmd = std::process::Command::new(&self.runc);
        cmd.arg("--root")
            .arg(&self.state)
            .arg("--criu")
            .arg(&self.criu)
            .arg("checkpoint")
            .arg("--image-path")
            .arg(&images)
            .arg("--work-path")
            .arg(&work);
        if leave_running {
            cmd.arg("--leave-running");
        }
        cmd.arg(&self.id);
        super::criu::run_bounded(cmd, limit, &work.join("dump.log"), "runc checkpoint")?;
        std::fs::write(&marker, b"")?;
        Ok(())
    }
}

/// The shim's command to restore a container from the checkpoint images [`prepare`] put in its
/// bundle (the runtime stays in the foreground, as with [`command`]).
pub fn restore_command(
    runtime: &RuntimeCheckpoint,
    bundle: &Path,
    images: &Path,
    work: &Path,
) -> Vec<OsString> {
    vec![
        runtime.runc.clone().into(),
        "--root".into(),
        runtime.state.clone().into(),
        "--criu".into(),
        runtime.criu.clone().into(),
        "restore".into(),
        "--bundle".into(),
        bundle.into(),
        "--image-path".into(),
        images.into(),
        "--work-path".into(),
        work.into(),
        runtime.id.clone().into(),
    ]
}

/// The shim's command: the runtime runs the container in the foreground, its stdio the pipes the
/// shim gave it, and exits with the program's status.
pub fn command(runc: &Path, state: &Path, bundle: &Path, id: &str) -> Vec<OsString> {
    vec![
        runc.into(),
        "--root".into(),
        state.into(),
        "run".into(),
        "--bundle".into(),
        bundle.into(),
        id.into(),
    ]
}

/// After the container ended: the runtime forgets it, the root is unmounted and what the job
/// wrote at the top of it goes (its output and checkpoints live in the run dir).
pub fn remove(runc: &Path, state: &Path, bundle: &Path, id: &str) {
    let _ = std::process::Command::new(runc)
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let rootfs = bundle.join("rootfs");
    for m in ["run", "tmp"]
        .map(|n| bundle.join(MOUNTS).join(n))
        .iter()
        .chain([&rootfs])
    {
        // (A path that is no mount point answers EINVAL.)
        let _ = nix::mount::umount2(m, MntFlags::MNT_DETACH);
    }
    // Never through a mount still there: the run dir bound in would go with it.
    if !has_mount_under(bundle) {
        let _ = std::fs::remove_dir_all(bundle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> Pulled {
        Pulled {
            reference: "r/x:1".into(),
            resolved: "r/x@sha256:0".into(),
            layers: vec![],
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/opt/bin".into(), "MODEL=tiny".into()],
            working_dir: Some("/srv".into()),
            note: String::new(),
        }
    }

    #[test]
    fn mount_points_are_never_made_through_a_link_of_the_image() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // The image's /var leads to a directory of the host.
        std::os::unix::fs::symlink(outside.path(), root.path().join("var")).unwrap();
        let e = make_dirs(root.path(), &root.path().join("var/lib/tessera")).unwrap_err();
        assert!(e.to_string().contains("a link at /var"), "{e}");
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("hosts"), root.path().join("etc/hosts"))
            .unwrap();
        let e = make_file(root.path(), &root.path().join("etc/hosts")).unwrap_err();
        assert!(e.to_string().contains("a link at /etc/hosts"), "{e}");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing made outside"
        );
        // Plain paths are made, 0755 and 0644.
        make_file(root.path(), &root.path().join("srv/a/b")).unwrap();
        assert!(root.path().join("srv/a/b").is_file());
    }

    #[test]
    fn removing_a_bundle_never_reaches_through_what_is_bound_in() {
        let run = tempfile::tempdir().unwrap();
        std::fs::write(run.path().join("output.log"), "keep me").unwrap();
        let data = tempfile::tempdir().unwrap();
        let bundle = data.path().join("bundle");
        let at = bundle.join(MOUNTS).join("run");
        std::fs::create_dir_all(&at).unwrap();
        // A bind mount from the same file system: its device is its parent's.
        nix::mount::mount(
            Some(run.path()),
            &at,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mounts (the tests run as root)");
        assert!(has_mount_under(&bundle) && has_mount_under(&at));
        remove(Path::new("/nonexistent/runc"), data.path(), &bundle, "t-1");
        assert!(!has_mount_under(&bundle));
        assert!(!bundle.exists(), "the bundle goes");
        assert_eq!(
            std::fs::read_to_string(run.path().join("output.log")).unwrap(),
            "keep me",
            "what was bound in stays"
        );
    }

    #[test]
    fn saved_files_come_back_as_the_new_uids_and_nothing_but_files_links_and_whiteouts() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let archive = |entries: &[(&str, tar::EntryType, u32)]| {
            let path = dir.path().join("saved.tar");
            let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
            for (name, kind, uid) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(*kind);
                h.set_uid((*uid).into());
                h.set_gid((*uid).into());
                h.set_mode(0o644);
                h.set_size(if *kind == tar::EntryType::Regular {
                    3
                } else {
                    0
                });
                if matches!(kind, tar::EntryType::Block | tar::EntryType::Char) {
                    let major = if *kind == tar::EntryType::Block { 8 } else { 0 };
                    h.set_device_major(major).unwrap();
                    h.set_device_minor(0).unwrap();
                }
                let n = h.size().unwrap() as usize;
                // Written raw: the builder itself refuses names with `..`.
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, &b"abc"[..n]).unwrap();
            }
            b.finish().unwrap();
            path
        };
        let into = dir.path().join("upper");
        std::fs::create_dir(&into).unwrap();
        let saved = archive(&[
            ("mine.txt", tar::EntryType::Regular, 200_001),
            ("copied-up.txt", tar::EntryType::Regular, 0),
            ("gone.txt", tar::EntryType::Char, 0),
        ]);
        unpack_saved(&saved, &into, Some(200_001), Some(200_007)).unwrap();
        let meta = |n: &str| std::fs::symlink_metadata(into.join(n)).unwrap();
        assert_eq!(
            meta("mine.txt").uid(),
            200_007,
            "the job's files are its uid here"
        );
        assert_eq!(
            meta("copied-up.txt").uid(),
            0,
            "the image's stay the host's root's"
        );
        assert_eq!(meta("gone.txt").rdev(), 0, "a whiteout");
        for bad in [
            archive(&[("disk", tar::EntryType::Block, 0)]),
            archive(&[("../escape.txt", tar::EntryType::Regular, 0)]),
        ] {
            let e = unpack_saved(&bad, &into, None, None).unwrap_err();
            assert!(
                e.to_string().contains("not a file") || e.to_string().contains("outside"),
                "{e:#}"
            );
        }
        assert!(!dir.path().join("escape.txt").exists());
        assert!(!into.join("disk").exists());
    }

    #[test]
    fn the_jobs_command_replaces_the_images_cmd_after_its_entrypoint() {
        let img = image(&["/entry.sh"], &["serve"]);
        assert_eq!(args(&img, &[]).unwrap(), ["/entry.sh", "serve"]);
        assert_eq!(
            args(&img, &["python".into(), "train.py".into()]).unwrap(),
            ["/entry.sh", "python", "train.py"]
        );
        let bare = image(&[], &[]);
        assert!(
            args(&bare, &[])
                .unwrap_err()
                .to_string()
                .contains("give the job a command")
        );
    }

    #[test]
    fn the_config_maps_root_to_the_projects_uid_with_no_capabilities_and_host_networking() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(&[], &["sh"]);
        let env = BTreeMap::from([("MODEL".to_string(), "big".to_string())]);
        let plan = Plan {
            id: "t-1".into(),
            bundle: dir.path().join("bundle"),
            run_dir: dir.path(),
            layers: vec![],
            image: &img,
            command: &[],
            env: &env,
            workdir: None,
            uid: Some(200_001),
            binds: vec![Bind {
                path: "/datasets".into(),
                read_only: true,
            }],
            tmp: dir.path().join("tmp"),
            cgroups_path: Some("/tessera/x".into()),
            checkpointing: None,
            gpu: None,
        };
        let v = serde_json::to_value(spec(&plan).unwrap()).unwrap();
        let linux = &v["linux"];
        assert_eq!(linux["uidMappings"][0]["hostID"], 200_001);
        assert_eq!(linux["uidMappings"][0]["containerID"], 0);
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(
            ns.contains(&"user") && ns.contains(&"pid") && !ns.contains(&"network"),
            "{ns:?}"
        );
        assert_eq!(linux["cgroupsPath"], "/tessera/x");
        let p = &v["process"];
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["capabilities"]["bounding"], serde_json::json!([]));
        assert_eq!(p["cwd"], "/srv");
        let env: Vec<&str> = p["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"MODEL=big") && env.contains(&"PATH=/opt/bin"),
            "{env:?}"
        );
        let datasets = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/datasets")
            .unwrap();
        assert!(
            datasets["options"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("ro"))
        );
    }
}
