//! A replica's output under a size cap, as Docker's `max-size`/`max-file` and the kubelet's
//! `containerLogMaxSize` keep it. The workload writes into two pipes; the shim copies both into
//! one file, `output.log`, a record per line as the kubelet's CRI log format keeps them (`TIME
//! STREAM F|P TEXT`: the time it was read, stdout or stderr, a full or a partial line), so that
//! readers get both streams interleaved in the order they came, or one of them, from any time.
//! When the file reaches half the cap it becomes `output.log.1` (replacing the older one) and a
//! new file starts, at a record's boundary. At most the cap (and one record) stays on disk
//! however much a workload writes.
//!
//! Offsets are those of the whole file's history, so that `tessera logs -f` follows across
//! rotations: `<name>.start` holds where the current file begins. A reader asking for output
//! that rotated away gets the oldest byte kept and is told how many bytes were cut.
//!
//! A transparent (CRIU) replica writes `stdout.log` and `stderr.log` itself (CRIU restores them by
//! path): those are read as plain text, one stream at a time, without times.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The default cap of one replica's output (stdout and stderr together).
pub const DEFAULT_LIMIT: u64 = 64 << 20;

/// The smallest cap that still keeps useful output (a traceback and some context).
pub const MIN_LIMIT: u64 = 64 << 10;

/// The file of a replica's tagged output records.
pub const OUTPUT: &str = "output.log";

/// Longest record text: a longer line is split into partial records.
const MAX_RECORD: usize = 16 << 10;

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

    /// Appends `record` whole, rotating first when it would pass the half (a record never spans
    /// two files, so a reader of one file reads whole records).
    pub fn write_record(&mut self, record: &[u8]) -> io::Result<()> {
        if self.len > 0 && self.len + record.len() as u64 > self.half {
            self.rotate()?;
        }
        self.file.write_all(record)?;
        self.len += record.len() as u64;
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

/// Which of a workload's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// What the node said about the replica (an image pull's progress), not the program.
    Tessera,
}

impl Stream {
    fn tag(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Tessera => "tessera",
        }
    }
}

/// One line of output read back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    /// When the shim read it (Unix ms); 0 where unknown (a transparent replica's files).
    pub ts_ms: u64,
    pub stream: Stream,
    pub text: String,
    /// The line goes on in the next record of its stream (no newline yet).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// `TIME STREAM F|P TEXT\n`.
fn record(ts_ms: u64, stream: Stream, partial: bool, text: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{ts_ms} {} {} ",
        stream.tag(),
        if partial { 'P' } else { 'F' }
    )
    .into_bytes();
    r.extend_from_slice(text);
    r.push(b'\n');
    r
}

/// The records wholly in `data`, and the bytes they take; a fragment that is not a record (an
/// offset inside one, a record being written) is skipped or left.
fn parse(data: &[u8]) -> (Vec<Line>, usize) {
    let mut lines = Vec::new();
    let mut used = 0;
    for raw in data.split_inclusive(|b| *b == b'\n') {
        if raw.last() != Some(&b'\n') {
            break;
        }
        used += raw.len();
        let raw = &raw[..raw.len() - 1];
        let mut parts = raw.splitn(4, |b| *b == b' ');
        let (Some(ts), Some(stream), Some(kind)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(ts_ms) = std::str::from_utf8(ts).ok().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let stream = match stream {
            b"stdout" => Stream::Stdout,
            b"stderr" => Stream::Stderr,
            b"tessera" => Stream::Tessera,
            _ => continue,
        };
        let partial = match kind {
            b"F" => false,
            b"P" => true,
            _ => continue,
        };
        lines.push(Line {
            ts_ms,
            stream,
            text: String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned(),
            partial,
        });
    }
    (lines, used)
}

/// Appends a line of the node's own to a replica's output (before its shim starts: the shim
/// then appends after it), at most `DEFAULT_LIMIT` kept.
pub fn note(dir: &Path, text: &str) -> io::Result<()> {
    let mut out = Rotating::open(dir, OUTPUT, DEFAULT_LIMIT)?;
    let line = format!("[tessera] {text}");
    out.write_record(&record(
        super::now_ms(),
        Stream::Tessera,
        false,
        line.as_bytes(),
    ))
}

/// The workload's output pipes, copied as records into one capped file by the shim's own loop:
/// a shim that made a new pid namespace for its workload cannot start threads (the kernel
/// refuses).
#[derive(Default)]
pub struct Pump {
    out: Option<Rotating>,
    /// The job's own output file (`--output-file`): the bytes as they came, both streams.
    also: Option<fs::File>,
    pipes: Vec<Pipe>,
    /// Writing failed (a full disk) and was said once: output is dropped rather than left to
    /// fill the pipe and stall the workload.
    failing: bool,
}

struct Pipe {
    from: fs::File,
    stream: Stream,
}

impl Pump {
    /// A pump writing records into `out`.
    pub fn into(out: Rotating) -> Pump {
        Pump {
            out: Some(out),
            ..Pump::default()
        }
    }

    /// Also appends everything to `file`, as it comes.
    pub fn also(&mut self, file: fs::File) {
        self.also = Some(file);
    }

    /// Copies `from` as `stream` until every writer of the pipe has closed it.
    pub fn add(&mut self, from: std::os::fd::OwnedFd, stream: Stream) -> io::Result<()> {
        let from = fs::File::from(from);
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        fcntl(&from, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        self.pipes.push(Pipe { from, stream });
        Ok(())
    }

    /// Whether every pipe has been read to its end.
    pub fn is_done(&self) -> bool {
        self.pipes.is_empty()
    }

    /// Writes `data` read from `stream` as records: a record per line, a line longer than a
    /// record in parts, and what is left without a newline as a partial record (so that a
    /// progress bar shows as it runs).
    fn write(&mut self, stream: Stream, data: &[u8]) {
        let ts = super::now_ms();
        if let Some(f) = self.also.as_mut()
            && let Err(e) = f.write_all(data)
        {
            eprintln!("tessera: the job's output file is no longer written: {e}");
            self.also = None;
        }
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let mut result = Ok(());
        for piece in data.split_inclusive(|b| *b == b'\n') {
            let (text, full) = match piece.strip_suffix(b"\n") {
                Some(t) => (t, true),
                None => (piece, false),
            };
            let mut chunks = text.chunks(MAX_RECORD).peekable();
            if text.is_empty() {
                result = result.and(out.write_record(&record(ts, stream, false, b"")));
            }
            while let Some(c) = chunks.next() {
                let partial = chunks.peek().is_some() || !full;
                result = result.and_then(|()| out.write_record(&record(ts, stream, partial, c)));
            }
        }
        match result {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                eprintln!("tessera: output of this replica is being dropped: {e}");
                self.failing = true;
            }
            Err(_) => {}
        }
    }

    /// Waits up to `ms` for output and copies what there is; returns early on a signal.
    pub fn wait(&mut self, ms: u16) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = self
                .pipes
                .iter()
                .map(|p| PollFd::new(p.from.as_fd(), PollFlags::POLLIN))
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
        for i in (0..self.pipes.len()).filter(|i| ready[*i]) {
            // Bounded, so that a writer faster than the disk cannot keep the shim from its
            // other duties (the lease, stop requests).
            let mut budget = 16usize << 20;
            while budget > 0 {
                match self.pipes[i].from.read(&mut buf) {
                    Ok(0) => {
                        ended.push(i);
                        break;
                    }
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        let stream = self.pipes[i].stream;
                        self.write(stream, &buf[..n]);
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
            self.pipes.remove(i);
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

/// Whether `dir` keeps tagged records (a piped replica's) rather than plain files.
fn has_records(dir: &Path) -> bool {
    dir.join(OUTPUT).exists() || dir.join(format!("{OUTPUT}.1")).exists()
}

/// The last lines of `name` from its last `window` bytes, read on across a rotation.
fn tail_bytes(dir: &Path, name: &str, window: u64) -> Option<Vec<u8>> {
    let start = start_of(dir, name);
    let len = fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let mut at = (start + len).saturating_sub(window);
    let mut data = Vec::new();
    loop {
        let chunk = read(dir, name, at, window).ok()?;
        if chunk.data.is_empty() {
            break;
        }
        at = chunk.from + chunk.data.len() as u64;
        data.extend_from_slice(&chunk.data);
    }
    Some(data)
}

/// `line` trimmed and shortened to `max` characters.
fn shortened(line: &str, max: usize) -> String {
    let line = line.trim();
    let mut out: String = line.chars().take(max).collect();
    if line.chars().count() > max {
        out.push('…');
    }
    out
}

/// The last non-empty line the workload wrote to stderr (at most `max` characters), if any: what
/// a failed program last said there is usually why it failed.
pub fn last_error_line(dir: &Path, max: usize) -> Option<String> {
    if !has_records(dir) {
        return last_line(dir, "stderr.log", max);
    }
    let data = tail_bytes(dir, OUTPUT, 32 << 10)?;
    let (lines, _) = parse(&data);
    let line = lines
        .iter()
        .rev()
        .find(|l| l.stream == Stream::Stderr && !l.text.trim().is_empty())?;
    Some(shortened(&line.text, max))
}

/// The last line of a plain output file (at most `max` characters, from its last 4 KiB).
fn last_line(dir: &Path, name: &str, max: usize) -> Option<String> {
    let data = tail_bytes(dir, name, 4096)?;
    let text = String::from_utf8_lossy(&data);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(shortened(line, max))
}

/// Output lines read back, with where they were in the replica's output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Page {
    /// The offset the lines start at (later than the one asked for when output there was cut,
    /// or earlier when it asked past the end).
    pub from: u64,
    /// Bytes from the offset asked for up to `from` that are no longer kept.
    pub cut: u64,
    /// Where to read on.
    pub next: u64,
    pub lines: Vec<Line>,
}

/// Whether output offset `at` starts a record: the first byte kept, or one after a newline.
fn at_record_start(dir: &Path, at: u64) -> io::Result<bool> {
    let Some(before) = at.checked_sub(1) else {
        return Ok(true);
    };
    let prev = read(dir, OUTPUT, before, 1)?;
    Ok(prev.from != before || prev.data.is_empty() || prev.data == b"\n")
}

/// Up to `max` bytes of a replica's output from `offset`: the lines of `stream` (both when
/// `None`) read at or after `since_ms`. A transparent replica's plain files give one stream
/// (stdout when both are asked for), without times.
pub fn read_page(
    dir: &Path,
    stream: Option<Stream>,
    since_ms: u64,
    offset: u64,
    max: u64,
) -> io::Result<Page> {
    let plain =
        !has_records(dir) && (dir.join("stdout.log").exists() || dir.join("stderr.log").exists());
    if plain {
        let stream = stream.unwrap_or(Stream::Stdout);
        let name = format!("{}.log", stream.tag());
        let chunk = read(dir, &name, offset, max)?;
        let text = String::from_utf8_lossy(&chunk.data);
        let lines = text
            .split_inclusive('\n')
            .map(|l| Line {
                ts_ms: 0,
                stream,
                text: l.strip_suffix('\n').unwrap_or(l).to_string(),
                partial: !l.ends_with('\n'),
            })
            .collect();
        return Ok(Page {
            from: chunk.from,
            cut: chunk.cut,
            next: chunk.from + chunk.data.len() as u64,
            lines,
        });
    }
    let chunk = read(dir, OUTPUT, offset, max)?;
    // An offset inside a record (any offset a client makes up) reads on from the next one.
    let skip = if at_record_start(dir, chunk.from)? {
        0
    } else {
        chunk
            .data
            .iter()
            .position(|b| *b == b'\n')
            .map_or(chunk.data.len(), |i| i + 1)
    };
    let (mut lines, used) = parse(&chunk.data[skip..]);
    let used = skip + used;
    lines.retain(|l| stream.is_none_or(|s| s == l.stream) && (l.ts_ms == 0 || l.ts_ms >= since_ms));
    Ok(Page {
        from: chunk.from,
        cut: chunk.cut,
        next: chunk.from + used as u64,
        lines,
    })
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
        let mut w = Rotating::open(dir.path(), OUTPUT, 20).unwrap();
        // Seven records of 5 bytes through a cap of 20: files of two records, the first four
        // records rotated away.
        let records: Vec<Vec<u8>> = (0..7u8).map(|i| vec![b'a' + i; 4]).collect();
        for r in &records {
            w.write_record(&[r.as_slice(), b"\n"].concat()).unwrap();
        }
        let on_disk: u64 = [OUTPUT, "output.log.1"]
            .iter()
            .map(|n| fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert_eq!(on_disk, 15, "the current 5 bytes and the previous 10");

        let c = read(dir.path(), OUTPUT, 0, 100).unwrap();
        assert_eq!((c.from, c.cut), (20, 20));
        assert_eq!(c.data, b"eeee\nffff\n", "one file per read");
        let c = read(dir.path(), OUTPUT, 30, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.as_slice()), (30, 0, &b"gggg\n"[..]));
        let c = read(dir.path(), OUTPUT, 25, 3).unwrap();
        assert_eq!(c.data, b"fff");
        // Past the end (a follower, or a hostile offset): nothing, from the end.
        let c = read(dir.path(), OUTPUT, u64::MAX, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.len()), (35, 0, 0));
        // A file never written reads empty.
        let c = read(dir.path(), "stderr.log", 0, 100).unwrap();
        assert_eq!((c.from, c.cut, c.data.len()), (0, 0, 0));
    }

    #[test]
    fn the_last_error_line_is_the_last_non_empty_stderr_line_shortened() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_error_line(dir.path(), 10), None);
        // Small files, so that the lines span a rotation.
        let mut pump = Pump::into(Rotating::open(dir.path(), OUTPUT, 200).unwrap());
        pump.write(
            Stream::Stderr,
            b"first\nTraceback\nValueError: a very long message\n\n",
        );
        pump.write(Stream::Stdout, b"stdout after it\n");
        assert_eq!(
            last_error_line(dir.path(), 10).as_deref(),
            Some("ValueError…")
        );
        // A transparent replica's plain stderr file.
        let plain = tempfile::tempdir().unwrap();
        fs::write(plain.path().join("stderr.log"), "a\nlast words\n\n").unwrap();
        assert_eq!(
            last_error_line(plain.path(), 80).as_deref(),
            Some("last words")
        );
    }

    fn texts(page: &Page) -> Vec<(Stream, &str, bool)> {
        page.lines
            .iter()
            .map(|l| (l.stream, l.text.as_str(), l.partial))
            .collect()
    }

    #[test]
    fn both_streams_interleave_in_order_and_each_can_be_read_alone_from_any_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut pump = Pump::into(Rotating::open(dir.path(), OUTPUT, 1 << 20).unwrap());
        pump.write(Stream::Stdout, b"epoch 1\nprogress 10%");
        pump.write(Stream::Stderr, b"warning: slow\n");
        pump.write(Stream::Stdout, b" 100%\n");
        let all = read_page(dir.path(), None, 0, 0, 1 << 20).unwrap();
        use Stream::*;
        assert_eq!(
            texts(&all),
            [
                (Stdout, "epoch 1", false),
                (Stdout, "progress 10%", true),
                (Stderr, "warning: slow", false),
                (Stdout, " 100%", false)
            ]
        );
        assert_eq!(
            all.next,
            fs::metadata(dir.path().join(OUTPUT)).unwrap().len()
        );
        let err = read_page(dir.path(), Some(Stderr), 0, 0, 1 << 20).unwrap();
        assert_eq!(texts(&err), [(Stderr, "warning: slow", false)]);
        assert_eq!(err.next, all.next, "a filtered read still moves on");
        // Lines read before a time are left out; from the end there is nothing.
        let later = read_page(
            dir.path(),
            None,
            super::super::now_ms() + 60_000,
            0,
            1 << 20,
        );
        assert!(later.unwrap().lines.is_empty());
        let end = read_page(dir.path(), None, 0, u64::MAX, 1 << 20).unwrap();
        assert_eq!((end.from, end.lines.len()), (all.next, 0));
        // An offset inside a record skips to the next whole one; a short read ends at a record.
        let inside = read_page(dir.path(), None, 0, 3, 1 << 20).unwrap();
        assert_eq!(inside.lines[0].text, "progress 10%");
        let short = read_page(dir.path(), None, 0, 0, 40).unwrap();
        assert_eq!(texts(&short), [(Stdout, "epoch 1", false)]);
        assert!(short.next < 40);
    }

    #[test]
    fn a_line_longer_than_a_record_is_split_into_partial_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut pump = Pump::into(Rotating::open(dir.path(), OUTPUT, 1 << 20).unwrap());
        let mut long = vec![b'x'; MAX_RECORD + 5];
        long.push(b'\n');
        pump.write(Stream::Stdout, &long);
        let page = read_page(dir.path(), None, 0, 0, 1 << 20).unwrap();
        assert_eq!(page.lines.len(), 2);
        assert!(page.lines[0].partial && !page.lines[1].partial);
        assert_eq!(
            page.lines[0].text.len() + page.lines[1].text.len(),
            MAX_RECORD + 5
        );
    }

    #[test]
    fn a_pipe_is_pumped_into_the_capped_files_until_its_writers_close() {
        let dir = tempfile::tempdir().unwrap();
        let w = Rotating::open(dir.path(), OUTPUT, 1 << 20).unwrap();
        let (r, tx) = pipe().unwrap();
        let mut tx = fs::File::from(tx);
        let mut pump = Pump::into(w);
        pump.add(r, Stream::Stdout).unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..64 {
                tx.write_all(&[b'x'; 64 << 10]).unwrap();
            }
        });
        while !pump.is_done() {
            pump.wait(50);
        }
        writer.join().unwrap();
        let kept: u64 = [OUTPUT, "output.log.1"]
            .iter()
            .map(|n| fs::metadata(dir.path().join(n)).unwrap().len())
            .sum();
        assert!(kept <= (1 << 20) + MAX_RECORD as u64 + 64, "{kept}");
        let page = read_page(dir.path(), None, 0, 0, 1 << 20).unwrap();
        assert!(page.cut > 3 << 20, "most of 4 MiB was cut: {}", page.cut);
        assert!(page.lines.iter().all(|l| l.text.bytes().all(|b| b == b'x')));
    }
}
