//! A small pool of spinning worker threads for work too short for rayon: a decode step runs
//! ~200 matrix-vector products of 20–200 µs each, and waking a sleeping rayon thread for each
//! cost more than the second core gained (docs/performance.md). The workers of this pool spin
//! on an atomic counter between jobs (yielding the core after the first few µs) and only sleep
//! after [`SPIN`] without work, so a job posted during a decode step starts on every core
//! within a microsecond or so.
//!
//! The parts of a job are claimed from a shared counter, by the caller too: a worker that the
//! system has not scheduled (a busy machine) leaves its parts to the others instead of holding
//! the caller up. The caller returns once every part has run; a worker that looks at a job
//! after that finds no part left to claim, so it never calls the job's closure late.
//!
//! One caller at a time: [`run`] splits a job over the pool when it is free and runs it inline
//! when another thread holds it, so concurrent models never wait on each other here.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins (yielding the core after the first few µs) before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// One job: `f(p)` for every part `p < parts`.
struct Job {
    /// The caller's closure. Valid until `done` reaches `parts`: only a claimed part calls it,
    /// and no part can be claimed after the last one was.
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
    /// The next part to claim.
    next: AtomicUsize,
    /// Parts finished.
    done: AtomicUsize,
    /// Set when a part panicked; the caller panics in turn.
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure, called only while the caller waits for it (above).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs parts until none is left.
    fn work(&self) {
        loop {
            let p = self.next.fetch_add(1, AcqRel);
            if p >= self.parts {
                return;
            }
            // SAFETY: part `p` was claimed, so the caller is still waiting (see `f`).
            let f = unsafe { &*self.f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(p))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, Release);
        }
    }
}

struct Shared {
    /// Bumped by the caller to post a job.
    epoch: AtomicU64,
    /// The job of the latest epoch.
    job: Mutex<Option<Arc<Job>>>,
    /// Workers about to sleep or sleeping, and the lock and condition they sleep on.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: Arc<Shared>,
    workers: usize,
}

impl Pool {
    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for w in 0..workers {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vlmc-spin-{w}"))
                .spawn(move || worker(&s));
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

    /// Runs `f(p)` for every `p < parts` on the caller and the workers; returns when every
    /// part has run.
    fn run<'a>(&self, parts: usize, f: &'a (dyn Fn(usize) + Sync + 'a)) {
        let s = &*self.shared;
        if self.workers == 0 || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        // SAFETY (of the lifetime erased here): the closure is called only for claimed parts,
        // and this function returns only after every part has been claimed and has finished.
        let f: *const (dyn Fn(usize) + Sync + 'a) = f;
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job {
            f,
            parts,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.clone());
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock();
            s.wake.notify_all();
        }
        job.work();
        // parts still running on workers: spin a little, then give them the core
        let mut spins = 0u32;
        while job.done.load(Acquire) < parts {
            spins = spins.saturating_add(1);
            if spins > 1024 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if job.panicked.load(SeqCst) {
            panic!("a part of a job on the spinning pool panicked");
        }
    }
}

fn worker(s: &Shared) {
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
        let job = s.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
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
        // a part panicked in an earlier job: the pool itself is sound
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().run(parts, f),
        Err(std::sync::TryLockError::WouldBlock) => (0..parts).for_each(f),
    }
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
        // after the workers have gone to sleep, a job still runs every part once
        std::thread::sleep(SPIN * 3);
        let hits: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        run(3, 5, &|p| {
            hits[p].fetch_add(1, SeqCst);
        });
        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
    }

    #[test]
    fn a_panicking_part_panics_the_caller() {
        let r = std::panic::catch_unwind(|| {
            run(2, 4, &|p| {
                if p == 2 {
                    panic!("part 2");
                }
            })
        });
        assert!(r.is_err());
        // and the pool still works
        let n = AtomicUsize::new(0);
        run(2, 4, &|_| {
            n.fetch_add(1, SeqCst);
        });
        assert_eq!(n.load(SeqCst), 4);
    }
}
