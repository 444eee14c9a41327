//! A small persistent thread pool for the quantized kernels.
//!
//! Decoding calls a matrix-vector product about a hundred times per token, each a few hundred
//! microseconds long, so a fork/join must cost a few microseconds at most. Workers therefore spin
//! on the job word for a short while after each job (the next product usually follows within
//! microseconds) and only then park on a condition variable; the calling thread takes part as
//! participant 0 instead of sleeping.
//!
//! Jobs share their work dynamically (the closures claim chunks from an atomic counter), which
//! allows the join not to wait for workers that never started: when the caller runs out of work
//! it *closes* the job, and a worker that was descheduled (the cores are shared with other
//! processes) and wakes up late finds the job closed and skips it. The caller then only waits for
//! workers already inside the job, each finishing its current chunk. Without this, one
//! preempted worker turns a 300 µs product into a multi-millisecond one. Waiting for a worker
//! inside, the caller spins briefly and then blocks, so that its core is free for the worker
//! when the machine is busy; a waiting worker likewise yields its core every few hundred polls.
//!
//! The pool also owns the scratch buffer for quantized activations, so the hot path allocates
//! nothing once it has seen the largest shape.

use super::kernels::Kernel;
use super::layout::AlignedBuf;
use crate::{Error, Result};
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: called on each participant that joins it, with the participant's index.
type Job = dyn Fn(usize) + Sync;

/// How long an idle worker spins before parking, unless changed with [`Threads::set_spin`].
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// How long a caller whose own share of a job is done spins for the workers still inside it
/// before it blocks. The last decode claims of a job are short (a share of what is left, down
/// to 64 KiB of weights), so on an idle machine the caller rarely blocks; when another process
/// has taken a worker's core in the middle of a claim, the blocked caller leaves its own core
/// idle, and the scheduler moves the worker there instead of letting it wait for a time slice
/// behind the other process.
const JOIN_SPIN: Duration = Duration::from_micros(100);

/// Bit 0 of the job word: the job is closed (no more workers may join).
const CLOSED: u64 = 1;
/// One worker inside the job (bits 1..32 count them).
const ONE_INSIDE: u64 = 2;
const INSIDE_MASK: u64 = 0xFFFF_FFFE;
/// The job number lives in the upper 32 bits.
const EPOCH_SHIFT: u32 = 32;

struct Shared {
    /// `epoch << 32 | workers_inside << 1 | closed`. A new job stores a new epoch with zero
    /// workers and not closed; workers join with a CAS that requires the same epoch and not
    /// closed, so a late worker can never join a finished job.
    state: AtomicU64,
    /// The current job. Written by the dispatcher only while the previous job is closed with
    /// nobody inside, before the release store that opens the new one.
    job: UnsafeCell<Option<*const Job>>,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    spin_ns: AtomicU64,
    /// The caller is blocked on `done` until the last worker leaves the job.
    caller_waiting: AtomicBool,
    done: Condvar,
}

// SAFETY: all fields but `job` are thread-safe. `job` is written by the dispatcher only while no
// worker is inside a job (state closed with zero inside, observed with acquire) and before the
// release store that opens the next job; workers read it only after joining that job with an
// acquiring CAS on `state`, and the dispatcher does not return (nor rewrite the slot) before
// every joined worker has left. The pointee is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer inside is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// Per-pool scratch memory, guarded by the pool's lock.
pub(crate) struct Scratch {
    /// Quantized activations of the current call.
    pub act: AlignedBuf,
}

/// A persistent pool of `n` participants (the calling thread and `n - 1` workers) that the
/// quantized products split their rows across. One job runs at a time: concurrent callers wait
/// for each other. The pool also fixes which [`Kernel`] the products use.
pub struct Threads {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    kernel: Kernel,
    scratch: Mutex<Scratch>,
}

/// Most threads a pool may have.
pub const MAX_THREADS: usize = 1024;

impl Threads {
    /// A pool of `n` threads (including the caller) using the best kernel of this CPU.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_kernel(n, Kernel::best())
    }

    /// A pool with one thread per available core.
    pub fn all_cores() -> Result<Self> {
        Self::new(Self::available())
    }

    /// The number of cores this process may use.
    pub fn available() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// A pool of `n` threads forcing a particular kernel (errors if this CPU lacks it).
    pub fn with_kernel(n: usize, kernel: Kernel) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid(
                "thread pool: need at least one thread".into(),
            ));
        }
        if n > MAX_THREADS {
            return Err(Error::Invalid(format!(
                "thread pool: {n} threads is too many (at most {MAX_THREADS})"
            )));
        }
        if !kernel.is_supported() {
            return Err(Error::Invalid(format!(
                "thread pool: kernel {kernel} is not supported by this CPU"
            )));
        }
        let shared = Arc::new(Shared {
            // Job 0, closed: workers wait for job 1.
            state: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(None),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            spin_ns: AtomicU64::new(DEFAULT_SPIN.as_nanos() as u64),
            caller_waiting: AtomicBool::new(false),
            done: Condvar::new(),
        });
        let mut pool = Threads {
            shared,
            workers: Vec::with_capacity(n - 1),
            kernel,
            scratch: Mutex::new(Scratch {
                act: AlignedBuf::zeroed(0),
            }),
        };
        for idx in 1..n {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("lfm2-quant-{idx}"))
                .spawn(move || worker(&shared, idx))
                .map_err(|e| Error::Invalid(format!("thread pool: cannot spawn a thread: {e}")))?;
            // On error the pool built so far is dropped, which stops the spawned workers.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Number of participants (at least 1).
    pub fn len(&self) -> usize {
        self.workers.len() + 1
    }

    /// Always false: a pool has at least the calling thread.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The kernel the quantized products use with this pool.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// How long idle workers spin before parking. Longer keeps back-to-back calls cheap; shorter
    /// gives the cores back sooner to other work between calls.
    pub fn set_spin(&self, spin: Duration) {
        let ns = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
        self.shared.spin_ns.store(ns, Ordering::Relaxed);
    }

    /// Runs `f(i)` once for every index `i` in `0..len()` and returns when all calls have
    /// finished. The indices are handed out dynamically: a participant that starts late (or not
    /// at all) leaves its indices to the others, so several may run on the same thread. Must not
    /// be called from inside another job of the same pool (it would wait for itself).
    pub fn run(&self, f: impl Fn(usize) + Sync) {
        let n = self.len();
        let next = AtomicUsize::new(0);
        let _guard = self.lock();
        self.dispatch(&|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        });
    }

    /// Takes the pool's lock and its scratch memory.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Scratch> {
        // A poisoned lock only means an earlier job panicked; the scratch holds no invariant.
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a job on the calling thread and on every worker that joins before the caller has
    /// finished its own call of `f`. `f` must therefore share its work dynamically (claim
    /// chunks until none are left), so that whoever participates completes all of it. The
    /// caller must hold the guard from [`Threads::lock`], which keeps jobs from overlapping.
    pub(crate) fn dispatch(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: `Close` below
        // (also while unwinding) closes the job and waits until every worker that joined it has
        // left, and no worker can join a closed job, so nobody calls `f` after it goes away.
        let job: *const Job = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(f as *const _)
        };
        // SAFETY: the previous job was closed with nobody inside (see `Close`), so no worker
        // reads the slot now.
        unsafe { *s.job.get() = Some(job) };
        let epoch = (s.state.load(Ordering::Relaxed) >> EPOCH_SHIFT).wrapping_add(1) & 0xFFFF_FFFF;
        s.state.store(epoch << EPOCH_SHIFT, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }

        struct Close<'a>(&'a Shared);
        impl Drop for Close<'_> {
            fn drop(&mut self) {
                self.0.state.fetch_or(CLOSED, Ordering::AcqRel);
                let start = Instant::now();
                let mut n = 0u32;
                while self.0.state.load(Ordering::Acquire) & INSIDE_MASK != 0 {
                    n = n.wrapping_add(1);
                    if !n.is_multiple_of(64) || start.elapsed() < JOIN_SPIN {
                        std::hint::spin_loop();
                        continue;
                    }
                    // A worker inside was descheduled: block instead of burning the core.
                    let mut g = self.0.park.lock().unwrap_or_else(|e| e.into_inner());
                    // Announce the wait before the final check (both SeqCst): the worker
                    // leaves the job before reading `caller_waiting`, so either it sees the
                    // flag and notifies under the lock, or this check sees it gone.
                    self.0.caller_waiting.store(true, Ordering::SeqCst);
                    while self.0.state.load(Ordering::SeqCst) & INSIDE_MASK != 0 {
                        // The timeout only guards against a lost wake-up.
                        g = self
                            .0
                            .done
                            .wait_timeout(g, Duration::from_millis(1))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    self.0.caller_waiting.store(false, Ordering::SeqCst);
                    break;
                }
                // SAFETY: the job is closed and empty: no worker holds or can take the pointer.
                unsafe { *self.0.job.get() = None };
            }
        }
        let close = Close(s);
        f(0);
        drop(close);
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a quantized-kernel worker thread panicked");
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        // A new, closed epoch wakes every worker without letting any of them join a job.
        let epoch = (s.state.load(Ordering::Relaxed) >> EPOCH_SHIFT).wrapping_add(1) & 0xFFFF_FFFF;
        s.state
            .store(epoch << EPOCH_SHIFT | CLOSED, Ordering::SeqCst);
        {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads")
            .field("threads", &self.len())
            .field("kernel", &self.kernel)
            .finish()
    }
}

fn worker(s: &Shared, idx: usize) {
    let mut seen = 0u64;
    loop {
        seen = wait_for_epoch(s, seen);
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        if !join(s, seen) {
            continue; // the job was already finished without us
        }
        // SAFETY: joining (an acquiring CAS on the open job) orders this read after the
        // dispatcher's write, and the dispatcher keeps the job alive until we leave.
        if let Some(job) = unsafe { *s.job.get() } {
            // SAFETY: see above; the pointee outlives this call.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(idx) }));
            if result.is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        let before = s.state.fetch_sub(ONE_INSIDE, Ordering::SeqCst);
        if before & INSIDE_MASK == ONE_INSIDE && s.caller_waiting.load(Ordering::SeqCst) {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.done.notify_one();
        }
    }
}

/// Enters job `epoch` if it is still open.
fn join(s: &Shared, epoch: u64) -> bool {
    let mut cur = s.state.load(Ordering::Acquire);
    loop {
        if cur >> EPOCH_SHIFT != epoch || cur & CLOSED != 0 {
            return false;
        }
        match s.state.compare_exchange_weak(
            cur,
            cur + ONE_INSIDE,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// Waits until the job number differs from `seen` and returns it: spinning first, then parked.
fn wait_for_epoch(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let spin = Duration::from_nanos(s.spin_ns.load(Ordering::Relaxed));
    let epoch = || s.state.load(Ordering::SeqCst) >> EPOCH_SHIFT;
    let mut n = 0u32;
    loop {
        let e = epoch();
        if e != seen {
            return e;
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(256) {
            // Let other runnable threads have the core while waiting (returns at once when
            // nothing else wants it), so that an idle worker does not take the core from the
            // calling thread or other processes when the machine is busy.
            std::thread::yield_now();
        }
        if n.is_multiple_of(64) && start.elapsed() >= spin {
            let mut g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            // Announce the sleep before the final check (both SeqCst): the dispatcher stores the
            // new job before reading `sleepers`, so either it sees us and notifies under the
            // lock, or we see its new job here.
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            loop {
                let e = epoch();
                if e != seen {
                    s.sleepers.fetch_sub(1, Ordering::SeqCst);
                    return e;
                }
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        std::hint::spin_loop();
    }
}
