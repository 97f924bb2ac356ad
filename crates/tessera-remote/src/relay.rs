//! A TCP relay that adds latency, for tests and benchmarks: these machines have `tc` but no
//! `netem`, so a round trip's extra microseconds are added here, in user space.
//!
//! One thread per connection carries both directions: it stamps what it reads and sends each
//! piece when its stamp plus half the added round trip has passed, sleeping (with the timer
//! slack at its minimum) until shortly before and spinning the rest. Pieces keep their order and
//! do not wait on each other, so the delay is latency, not a cap on rate; and no piece changes
//! threads on its way, which on a machine of two busy cores would add more than the delay itself.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Relays every connection to `listener` on to `target`, adding `rtt` to each round trip.
pub fn run(listener: TcpListener, target: SocketAddr, rtt: Duration) -> io::Result<()> {
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tessera-remote relay: {target}: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(e) = carry(client, server, rtt / 2) {
                eprintln!("tessera-remote relay: {e}");
            }
        });
    }
    Ok(())
}

/// Sleeps as precisely as the kernel allows (the default slack is 50 µs, as much as the latency
/// being added).
fn set_timer_slack() {
    // SAFETY: prctl with an integer argument; affects only this thread's timers.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// One direction: what was read and when it is due, and whether its source has ended.
#[derive(Default)]
struct Direction {
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes of the front piece already written.
    written: usize,
    ended: bool,
}

/// Under this, a wait spins instead of sleeping (a sleep wakes some microseconds late).
const SPIN: Duration = Duration::from_micros(30);

fn carry(a: TcpStream, b: TcpStream, delay: Duration) -> io::Result<()> {
    set_timer_slack();
    let mut streams = [a, b];
    for s in &streams {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
    }
    // dirs[0]: a to b; dirs[1]: b to a.
    let mut dirs = [Direction::default(), Direction::default()];
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let now = Instant::now();
        for (i, d) in dirs.iter_mut().enumerate() {
            let to = &mut streams[1 - i];
            while let Some((due, data)) = d.queue.front() {
                if *due > now {
                    break;
                }
                match to.write(&data[d.written..]) {
                    Ok(n) => d.written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
                if d.written == data.len() {
                    d.queue.pop_front();
                    d.written = 0;
                }
            }
            if d.ended && d.queue.is_empty() {
                let _ = to.shutdown(std::net::Shutdown::Write);
            }
        }
        if dirs.iter().all(|d| d.ended && d.queue.is_empty()) {
            return Ok(());
        }
        // Wait for input, room to write, or the next piece falling due.
        let next = dirs
            .iter()
            .filter_map(|d| d.queue.front().map(|(due, _)| *due))
            .min();
        let wait = next.map(|due| due.saturating_duration_since(Instant::now()));
        let timeout = match wait {
            Some(w) if w <= SPIN => Some(Duration::ZERO),
            Some(w) => Some(w - SPIN),
            None => None,
        };
        let mut fds: Vec<libc::pollfd> = (0..2)
            .map(|i| {
                let mut events = 0;
                if !dirs[i].ended {
                    events |= libc::POLLIN;
                }
                if dirs[1 - i].written > 0 {
                    events |= libc::POLLOUT;
                }
                libc::pollfd {
                    fd: streams[i].as_raw_fd(),
                    events,
                    revents: 0,
                }
            })
            .collect();
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        // SAFETY: two pollfds we own; a timespec or null (wait without end).
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                2,
                ts.as_ref()
                    .map_or(std::ptr::null(), |t| t as *const libc::timespec),
                std::ptr::null(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for i in 0..2 {
            if dirs[i].ended || fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0
            {
                continue;
            }
            loop {
                match streams[i].read(&mut buf) {
                    Ok(0) => {
                        dirs[i].ended = true;
                        break;
                    }
                    Ok(n) => dirs[i]
                        .queue
                        .push_back((Instant::now() + delay, buf[..n].to_vec())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        dirs[i].ended = true;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_carries_bytes_both_ways_and_adds_its_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut b = [0u8; 64];
            while let Ok(n) = s.read(&mut b) {
                if n == 0 || s.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = front.local_addr().unwrap();
        std::thread::spawn(move || run(front, target, Duration::from_millis(20)));
        let mut c = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        // 20 ms added: far above loopback's own round trip, so the floor is the relay's.
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "{:?}",
            start.elapsed()
        );
    }
}
