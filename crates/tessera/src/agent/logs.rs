//! A replica's output under a size cap, as Docker's `max-size`/`max-file` and the kubelet's
//! `containerLogMaxSize` keep it: the workload writes into a pipe, the shim copies it into
//! `stdout.log`, and when that file reaches half the stream's share of the cap it becomes
//! `stdout.log.1` (replacing the older one) and a new file starts. At most the cap stays on disk
//! however much a workload writes.
//!
//! Offsets are those of the whole stream, so that `tessera logs -f` follows across rotations:
//! `<name>.start` holds where the current file begins. A reader asking for output that rotated
//! away gets the oldest byte kept and is told how many bytes were cut.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The default cap of one replica's output (stdout and stderr together).
pub const DEFAULT_LIMIT: u64 = 64 << 20;

/// The smallest cap that still keeps useful output (a traceback and some context).
pub const MIN_LIMIT: u64 = 64 << 10;

/// One stream of output being written, rotated at `half` bytes per file.
pub struct Rotating {
    dir: PathBuf,
    name: String,
    half: u64,
    file: fs::File,
    /// The stream offset of the current file's first byte.
    start: u64,
    /// Bytes in the current file.
    len: u64,
}

fn open_append(path: &Path) -> io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn start_of(dir: &Path, name: &str) -> u64 {
    fs::read_to_string(dir.join(format!("{name}.start")))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn set_start(dir: &Path, name: &str, start: u64) -> io::Result<()> {
    let marker = dir.join(format!("{name}.start"));
    let tmp = dir.join(format!("{name}.start.tmp"));
    fs::write(&tmp, start.to_string())?;
    fs::rename(&tmp, &marker)
}

impl Rotating {
    /// Opens (or continues) stream `name` in `dir`, keeping at most `limit` bytes of it (the
    /// current file and the one before, each up to half).
    pub fn open(dir: &Path, name: &str, limit: u64) -> io::Result<Rotating> {
        let file = open_append(&dir.join(name))?;
        let len = file.metadata()?.len();
        Ok(Rotating {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            half: (limit / 2).max(1),
            file,
            start: start_of(dir, name),
            len,
        })
    }

    /// Appends `buf`, rotating as often as it takes.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.len >= self.half {
                self.rotate()?;
            }
            let room = (self.half - self.len) as usize;
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.len += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let current = self.dir.join(&self.name);
        fs::rename(&current, self.dir.join(format!("{}.1", self.name)))?;
        self.start += self.len;
        set_start(&self.dir, &self.name, self.start)?;
        self.file = open_append(&current)?;
        self.len = 0;
        Ok(())
    }
}

/// A pipe whose ends are not inherited by programs the shim starts (the workload gets its write
/// end as stdout or stderr only).
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The workload's output pipes, copied into their streams by the shim's own loop: a shim that
/// made a new pid namespace for its workload cannot start threads (the kernel refuses).
#[derive(Default)]
pub struct Pump {
    streams: Vec<Stream>,
}

struct Stream {
    from: fs::File,
    to: Rotating,
    /// Writing failed (a full disk) and was said once: output is dropped rather than left to
    /// fill the pipe and stall the workload.
    failing: bool,
}

impl Pump {
    /// Copies `from` into `to` until every writer of the pipe has closed it.
    pub fn add(&mut self, from: std::os::fd::OwnedFd, to: Rotating) -> io::Result<()> {
        let from = fs::File::from(from);
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(&from, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        self.streams.push(Stream {
            from,
            to,
            failing: false,
        });
        Ok(())
    }

    /// Whether every pipe has been read to its end.
    pub fn is_done(&self) -> bool {
        self.streams.is_empty()
    }

    /// Waits up to `ms` for output and copies what there is; returns early on a signal.
    pub fn wait(&mut self, ms: u16) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = self
                .streams
                .iter()
                .map(|s| PollFd::new(s.from.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                _ => return,
            }
        };
        let mut buf = vec![0u8; 64 << 10];
        let mut ended = vec![];
        for (i, s) in self
            .streams
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| ready[*i])
        {
            // Bounded, so that a writer faster than the disk cannot keep the shim from its
            // other duties (the lease, stop requests).
            let mut budget = 16usize << 20;
            while budget > 0 {
                match s.from.read(&mut buf) {
                    Ok(0) => {
                        ended.push(i);
                        break;
                    }
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        match s.to.write_all(&buf[..n]) {
                            Ok(()) => s.failing = false,
                            Err(e) if !s.failing => {
                                eprintln!("tessera: output of this replica is being dropped: {e}");
                                s.failing = true;
                            }
                            Err(_) => {}
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("tessera: reading the workload's output failed: {e}");
                        ended.push(i);
                        break;
                    }
                }
            }
        }
        for i in ended.into_iter().rev() {
            self.streams.remove(i);
        }
    }
}

/// Keeps a file the workload writes itself (a transparent replica's) under `limit`: once it
/// holds half, its content becomes `<name>.1` and it is truncated (its writer appends, so it
/// goes on at the new end). Output written between the copy and the truncation is lost: the
/// price of files CRIU can restore.
pub fn truncate_over(dir: &Path, name: &str, limit: u64) -> io::Result<()> {
    let path = dir.join(name);
    let len = match fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if len < (limit / 2).max(1) {
        return Ok(());
    }
    let previous = dir.join(format!("{name}.1"));
    let copied = fs::copy(&path, &previous)?;
    set_start(dir, name, start_of(dir, name) + copied)?;
    fs::OpenOptions::new().write(true).open(&path)?.set_len(0)
}

/// The last line a stream wrote (at most `max` characters, from its last 4 KiB), if any: what a
/// failed program last said on stderr is usually why it failed.
pub fn last_line(dir: &Path, name: &str, max: usize) -> Option<String> {
    let start = start_of(dir, name);
    let len = fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    // A read gives one file at a time: read on across a rotation.
    let mut at = (start + len).saturating_sub(4096);
    let mut data = Vec::new();
    loop {
        let chunk = read(dir, name, at, 4096).ok()?;
        if chunk.data.is_empty() {
            break;
        }
        at = chunk.from + chunk.data.len() as u64;
        data.extend_from_slice(&chunk.data);
    }
    let text = String::from_utf8_lossy(&data);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max {
        out.push('…');
    }
    Some(out)
}

/// Output read back from a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    /// The stream offset of `data[0]`.
    pub from: u64,
    /// Bytes between the offset asked for and `from` that rotated away.
    pub cut: u64,
}

/// Reads up to `max` bytes of stream `name` from stream offset `offset`. An offset past the end
/// reads nothing from the end; one before the oldest byte kept reads from that byte.
pub fn read(dir: &Path, name: &str, offset: u64, max: u64) -> io::Result<Chunk> {
    let start = start_of(dir, name);
    let len = |p: &Path| match fs::metadata(p) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    };
    let current = dir.join(name);
    let previous = dir.join(format!("{name}.1"));
    let (cur_len, prev_len) = (len(&current)?, len(&previous)?);
    let oldest = start.saturating_sub(prev_len);
    let end = start + cur_len;
    let at = offset.clamp(oldest, end);
    let cut = oldest.saturating_sub(offset);
    let (path, pos, avail) = if at < start {
        (previous, at - oldest, start - at)
    } else {
        (current, at - start, end - at)
    };
    let mut data = Vec::new();
    if avail > 0 {
        let mut f = fs::File::open(&path)?;
        f.seek(SeekFrom::Start(pos))?;
        f.take(avail.min(max)).read_to_end(&mut data)?;
    }
    Ok(Chunk {
        data,
        from: at,
        cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_cap_rotates_and_readers_are_told_what_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Rotating::open(dir.path(), "stdout.log", 20).unwrap();
        // 35 bytes through a cap of 20: files of 10, the first two rotated away.
        let text: Vec<u8> = (0..35u8).map(|i| b'a' + (i % 26)).collect();
        w.write_all(&text[..7]).unwrap();
        w.write_all(&text[7..]).unwrap();
        let on_disk: u64 = ["stdout.log", "stdout.log.1"]
            .iter()
            .map(|n| fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert_eq!(on_disk, 15, "the current 5 bytes and the previous 10");

        let c = read(dir.path(), "stdout.log", 0, 100).unwrap();
        assert_eq!((c.from, c.cut), (20, 20));
        assert_eq!(c.data, &text[20..30], "one file per read");
        let c = read(dir.path(), "stdout.log", 30, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.as_slice()), (30, 0, &text[30..]));
        let c = read(dir.path(), "stdout.log", 25, 3).unwrap();
        assert_eq!(c.data, &text[25..28]);
        // Past the end (a follower, or a hostile offset): nothing, from the end.
        let c = read(dir.path(), "stdout.log", u64::MAX, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.len()), (35, 0, 0));
        // A stream that never wrote reads empty.
        let c = read(dir.path(), "stderr.log", 0, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.len()), (0, 0, 0));
    }

    #[test]
    fn the_last_line_of_a_stream_is_its_last_non_empty_one_shortened() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_line(dir.path(), "stderr.log", 10), None);
        // Small files, so that the last line spans a rotation.
        let mut w = Rotating::open(dir.path(), "stderr.log", 80).unwrap();
        w.write_all(b"first\nTraceback\nValueError: a very long message\n\n")
            .unwrap();
        assert_eq!(
            last_line(dir.path(), "stderr.log", 10).as_deref(),
            Some("ValueError…")
        );
    }

    #[test]
    fn a_pipe_is_pumped_into_the_capped_files_until_its_writers_close() {
        let dir = tempfile::tempdir().unwrap();
        let w = Rotating::open(dir.path(), "stdout.log", 1 << 20).unwrap();
        let (r, tx) = pipe().unwrap();
        let mut tx = fs::File::from(tx);
        let mut pump = Pump::default();
        pump.add(r, w).unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..64 {
                tx.write_all(&[b'x'; 64 << 10]).unwrap();
            }
        });
        while !pump.is_done() {
            pump.wait(50);
        }
        writer.join().unwrap();
        let kept: u64 = ["stdout.log", "stdout.log.1"]
            .iter()
            .map(|n| fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert!(kept <= 1 << 20, "{kept}");
        let c = read(dir.path(), "stdout.log", 0, 1).unwrap();
        assert_eq!(
            c.cut,
            (4 << 20) - (1 << 20),
            "all but the last MiB of 4 MiB was cut"
        );
    }
}
