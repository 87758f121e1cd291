//! A small pool of spinning worker threads for work too short for rayon: a decode step runs
//! ~200 matrix-vector products of 20–200 µs each, and waking a sleeping rayon thread for each
//! cost more than the second core gained (docs/performance.md). The workers of this pool spin
//! on an atomic counter between jobs and only sleep after [`SPIN`] without work, so a job
//! posted during a decode step starts on every core within a microsecond or so.
//!
//! One caller at a time: [`run`] splits a job over the pool when it is free and runs it inline
//! when another thread holds it, so concurrent models never wait on each other here.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins (yielding the core after the first few µs) before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A job: called once for every part index.
type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped by the caller to post a job.
    epoch: AtomicU64,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// The current job, its part count and the threads it is split over; written before `epoch` is bumped (release) and read
    /// after it is seen (acquire); valid until `pending` reaches 0.
    job: UnsafeCell<(*const Job, usize, usize)>,
    /// Workers about to sleep or sleeping, and the lock and condition they sleep on.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Set when a part panicked on a worker; the caller panics in turn.
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding the pool, while no worker reads it
// (between jobs), and read by workers only while the caller waits for them (see `Pool::run`).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Pool {
    shared: Arc<Shared>,
    workers: usize,
}

impl Pool {
    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new((std::ptr::null::<fn(usize)>() as *const Job, 0, 1)),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panicked: AtomicBool::new(false),
        });
        let mut started = 0;
        for w in 0..workers {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vlmc-spin-{w}"))
                .spawn(move || worker(&s, w + 1));
            if spawned.is_err() {
                // the system refused a thread: the pool works with those it has
                break;
            }
            started += 1;
        }
        Pool {
            shared,
            workers: started,
        }
    }

    /// Runs `f(p)` for every `p < parts`: part `p` on thread `p % (workers + 1)`, thread 0
    /// being the caller. Returns when every part has run.
    fn run<'a>(&self, parts: usize, f: &'a (dyn Fn(usize) + Sync + 'a)) {
        let s = &*self.shared;
        if self.workers == 0 || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        // SAFETY: no worker reads `job` now: the last job's `pending` reached 0 before the
        // previous `run` returned, and the new epoch is not yet posted. The lifetime of `f` is
        // erased, but workers use it only until `pending` reaches 0, which this call waits for.
        unsafe {
            let f: *const Job =
                std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Job>(f);
            *s.job.get() = (f, parts, self.workers + 1);
        }
        s.pending.store(self.workers, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock();
            s.wake.notify_all();
        }
        let threads = self.workers + 1;
        // The workers use `f` until they are done: a panic here waits for them first.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (0..parts).step_by(threads).for_each(f)
        }));
        while s.pending.load(Acquire) != 0 {
            std::hint::spin_loop();
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a part of a job on the spinning pool panicked");
        }
        if let Err(e) = mine {
            std::panic::resume_unwind(e);
        }
    }
}

fn worker(s: &Shared, me: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                // Sleep until the next job; the count is raised before the last look at the
                // epoch, so a caller bumping it after that look sees the count and wakes us.
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                drop(g);
                seen = s.epoch.load(Acquire);
                break;
            }
            if spins > 4096 {
                // past the first few µs, let a runnable thread (rayon's, say) have the core
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the caller posted this job before bumping the epoch and keeps it alive
        // until `pending` reaches 0, which happens only after this read and these calls.
        let (f, parts, threads) = unsafe { *s.job.get() };
        let f = unsafe { &*f };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (me..parts).step_by(threads).for_each(f)
        }));
        if ran.is_err() {
            s.panicked.store(true, SeqCst);
        }
        s.pending.fetch_sub(1, Release);
    }
}

static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();

/// Runs `f(p)` for every `p < parts`, split over `threads` threads (the caller's one of them)
/// of the spinning pool, or all inline when the pool is busy with another caller or `threads`
/// is 1. The pool is made on first use with `threads - 1` workers.
pub fn run(threads: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if threads <= 1 || parts <= 1 {
        (0..parts).for_each(f);
        return;
    }
    let pool = POOL.get_or_init(|| Mutex::new(Pool::new(threads - 1)));
    match pool.try_lock() {
        Ok(p) => p.run(parts, f),
        Err(_) => (0..parts).for_each(f),
    }
}

/// The threads a job given to [`run`] is split over once the pool exists (1 before).
pub fn threads() -> usize {
    POOL.get()
        .and_then(|p| p.try_lock().ok().map(|p| p.workers + 1))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        for parts in [0, 1, 2, 3, 7, 64] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                run(3, parts, &|p| {
                    hits[p].fetch_add(1, SeqCst);
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "parts {parts}");
            }
        }
        // after the workers have gone to sleep, a job still runs on all of them
        std::thread::sleep(SPIN * 3);
        let hits: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        run(3, 5, &|p| {
            hits[p].fetch_add(1, SeqCst);
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
    }
}
