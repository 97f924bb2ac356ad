//! The compute limiter: time slices of the device, drawn from a schedule the slices share.
//!
//! Kernels of different processes on one GPU do not run side by side: the device switches
//! between contexts and runs one at a time. A slice's share of the device is therefore a share of
//! *time*, and the limiter hands out time: every period (50 ms by default) is cut into one window
//! per active slice, as long as its share (plus, for a slice that may burst, its part of the time
//! no one claims). A process launches freely inside its slice's window. At the first launch after
//! the window, it waits for its queued work to finish and measures how far that ran past the
//! window's end (the overrun that the next slice lost), then sleeps until its next window. The
//! measured overrun shortens the following windows (an exponential average), so the time a slice
//! really holds the device converges on its share within a few periods, whatever its kernels,
//! graphs or queue depth. A slice alone on its device with bursting allowed is not throttled at
//! all. See docs/vgpu.md.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tessera_shm::Schedule;

/// A slice unheard of for this long is not competing for the device.
const ACTIVE_NS: u64 = 100_000_000;
/// A slice entry idle for this long may be reused by another slice.
const STALE_NS: u64 = 10_000_000_000;
/// How often a process refreshes its heartbeat and its view of the schedule.
const REFRESH_NS: u64 = 1_000_000;
/// The plan value meaning "no window: launch freely".
const FREE: u64 = u64::MAX;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime (a vDSO call, no syscall) writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The precise clock, for windows.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The same clock at tick resolution (1-4 ms) and a fraction of the cost: enough to know when
/// to refresh the plan.
fn coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

pub struct Limiter {
    schedule: Schedule,
    key: u64,
    index: AtomicUsize,
    share_milli: u64,
    burst: bool,
    period_ns: u64,
    /// (window start << 32) | window length, in ns within the period; or FREE.
    plan: AtomicU64,
    planned_at: AtomicU64,
    /// Work was launched in the current window (a drain is due when it ends).
    launched: AtomicBool,
    /// Exponential average of how far work ran past the window's end.
    overrun_ns: AtomicU64,
    /// Stream captures in progress: launches are being recorded, not run; never wait then.
    pub capturing: AtomicU64,
}

impl Limiter {
    pub fn new(
        schedule: Schedule,
        key: u64,
        share_milli: u64,
        burst: bool,
        period_ns: u64,
    ) -> Option<Limiter> {
        let now = monotonic_ns();
        let index = schedule.join(key, now, STALE_NS)?;
        let e = &schedule.entries()[index];
        e.share_milli.store(share_milli, Ordering::SeqCst);
        e.burst.store(u64::from(burst), Ordering::SeqCst);
        Some(Limiter {
            schedule,
            key,
            index: AtomicUsize::new(index),
            share_milli,
            burst,
            period_ns,
            plan: AtomicU64::new(FREE),
            planned_at: AtomicU64::new(0),
            launched: AtomicBool::new(false),
            overrun_ns: AtomicU64::new(0),
            capturing: AtomicU64::new(0),
        })
    }

    /// Marks this slice active and works out its window from every active slice's share.
    fn refresh(&self, now: u64) -> u64 {
        let entries = self.schedule.entries();
        let mut index = self.index.load(Ordering::Relaxed);
        if entries[index].key.load(Ordering::Relaxed) != self.key {
            // Our entry was taken over after a long idle spell: join again.
            if let Some(i) = self.schedule.join(self.key, now, STALE_NS) {
                entries[i]
                    .share_milli
                    .store(self.share_milli, Ordering::SeqCst);
                entries[i]
                    .burst
                    .store(u64::from(self.burst), Ordering::SeqCst);
                self.index.store(i, Ordering::Relaxed);
                index = i;
            }
        }
        entries[index].last_active.store(now, Ordering::Relaxed);
        let (mut total, mut bursting, mut active) = (0u64, 0u64, 0u32);
        for e in entries.iter() {
            if e.key.load(Ordering::Relaxed) != 0
                && now.saturating_sub(e.last_active.load(Ordering::Relaxed)) <= ACTIVE_NS
            {
                let share = e.share_milli.load(Ordering::Relaxed);
                total += share;
                active += 1;
                if e.burst.load(Ordering::Relaxed) == 1 {
                    bursting += share;
                }
            }
        }
        let plan = if active <= 1 && self.burst {
            FREE
        } else {
            let idle = 1000u64.saturating_sub(total);
            let window = |share: u64, burst: bool| -> u64 {
                if total > 1000 {
                    self.period_ns * share / total
                } else {
                    let extra = if burst && bursting > 0 {
                        self.period_ns * idle / 1000 * share / bursting
                    } else {
                        0
                    };
                    self.period_ns * share / 1000 + extra
                }
            };
            let mut start = 0;
            for e in entries.iter().take(index) {
                if e.key.load(Ordering::Relaxed) != 0
                    && now.saturating_sub(e.last_active.load(Ordering::Relaxed)) <= ACTIVE_NS
                {
                    start += window(
                        e.share_milli.load(Ordering::Relaxed),
                        e.burst.load(Ordering::Relaxed) == 1,
                    );
                }
            }
            let len = window(self.share_milli, self.burst)
                .min(self.period_ns - start.min(self.period_ns));
            (start << 32) | len
        };
        self.plan.store(plan, Ordering::Relaxed);
        self.planned_at.store(now, Ordering::Relaxed);
        plan
    }

    /// Called before every launch: returns at once inside the slice's window; otherwise drains
    /// this process's work (`drain`) once and sleeps until the next window. No allocation, no
    /// lock, no system call on the fast path (the clock is a vDSO read).
    #[inline]
    pub fn before_launch(&self, drain: impl Fn()) {
        if self.capturing.load(Ordering::Relaxed) > 0 {
            return;
        }
        loop {
            let coarse = coarse_ns();
            let plan =
                if coarse.saturating_sub(self.planned_at.load(Ordering::Relaxed)) > REFRESH_NS {
                    self.refresh(coarse)
                } else {
                    self.plan.load(Ordering::Relaxed)
                };
            if plan == FREE {
                return;
            }
            let now = monotonic_ns();
            let start = plan >> 32;
            let full = plan & 0xffff_ffff;
            let len = full - self.overrun_ns.load(Ordering::Relaxed).min(full * 9 / 10);
            let phase = now % self.period_ns;
            if phase >= start && phase < start + len {
                if !self.launched.load(Ordering::Relaxed) {
                    self.launched.store(true, Ordering::Relaxed);
                }
                return;
            }
            let cycle = now - phase;
            let window_end = if phase >= start + len {
                cycle + start + len
            } else {
                (cycle + start + len).saturating_sub(self.period_ns)
            };
            if self.launched.swap(false, Ordering::AcqRel) {
                drain();
                let over = monotonic_ns().saturating_sub(window_end);
                let avg = self.overrun_ns.load(Ordering::Relaxed);
                self.overrun_ns
                    .store((avg * 7 + over * 3) / 10, Ordering::Relaxed);
            }
            let next = if phase < start {
                cycle + start
            } else {
                cycle + self.period_ns + start
            };
            let now = monotonic_ns();
            if next > now {
                std::thread::sleep(Duration::from_nanos(next - now));
            }
        }
    }
}
