//! A TCP relay that adds latency, for tests and benchmarks: these machines have `tc` but no
//! `netem`, so a round trip's extra microseconds are added here, in user space.
//!
//! Each direction of each connection has a reader, which stamps what it reads, and a writer,
//! which sends each piece when its stamp plus half the added round trip has passed; pieces keep
//! their order and do not wait on each other, so the added delay is latency, not a cap on rate.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Relays every connection to `listener` on to `target`, adding `rtt` to each round trip.
pub fn run(listener: TcpListener, target: SocketAddr, rtt: Duration) -> io::Result<()> {
    set_timer_slack();
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tessera-remote relay: {target}: {e}");
                continue;
            }
        };
        for s in [&client, &server] {
            let _ = s.set_nodelay(true);
        }
        let one_way = rtt / 2;
        pipe(client.try_clone()?, server.try_clone()?, one_way);
        pipe(server, client, one_way);
    }
    Ok(())
}

/// Sleeps as precisely as the kernel allows (the default slack is 50 µs, as much as the latency
/// being added).
fn set_timer_slack() {
    // SAFETY: prctl with an integer argument; affects only timers of this process's threads.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

type Queue = Arc<(Mutex<(VecDeque<(Instant, Vec<u8>)>, bool)>, Condvar)>;

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let queue: Queue = Arc::default();
    let q = queue.clone();
    std::thread::spawn(move || {
        set_timer_slack();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let (lock, wake) = &*q;
            let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                g.1 = true;
                wake.notify_one();
                return;
            }
            g.0.push_back((Instant::now() + delay, buf[..n].to_vec()));
            wake.notify_one();
        }
    });
    std::thread::spawn(move || {
        set_timer_slack();
        loop {
            let (due, data) = {
                let (lock, wake) = &*queue;
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(item) = g.0.pop_front() {
                        break item;
                    }
                    if g.1 {
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    g = wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            wait_until(due);
            if to.write_all(&data).is_err() {
                return;
            }
        }
    });
}

/// Sleeps until a little before `due`, then spins the rest: a sleep alone wakes tens of
/// microseconds late.
fn wait_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(15);
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
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
