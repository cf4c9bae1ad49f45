//! [`NetRuntime`]: the cluster's async runtime, driven by the thread that waits on it.
//!
//! Every QUIC connection of the cluster lives on one current-thread tokio runtime. Whoever
//! calls [`NetRuntime::block_on`] drives it for that call: the forward-pass thread encrypts and
//! sends its batches itself and sleeps in the runtime's `epoll_wait` until the answers arrive,
//! so a round trip costs no wake-up of another thread on the coordinator (a multi-threaded
//! runtime costs two: its I/O thread to send, the waiting thread when the answer is in).
//! Between layers nobody drives it; packets wait in the socket's buffer for the next layer
//! (a few ms at most: far inside QUIC's timers).
//!
//! When no layer has waited on the runtime for [`IDLE_AFTER`] (the engine is idle, or a long
//! prefill layer is in attention), a background thread drives it, so pings, reconnections and
//! the QUIC timers keep running. The next `block_on` takes it back: it asks the background
//! thread to let go and drives from then on (two wake-ups, once per idle period).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// How long the runtime goes without a `block_on` before the background thread drives it.
/// Longer than the gap between two decode steps' MoE layers (the LM head, sampling and one
/// layer's attention: ~5 ms at Mellum2's size on two cores), so a decoding engine keeps it.
pub const IDLE_AFTER: Duration = Duration::from_millis(20);

/// The cluster's current-thread runtime plus the background thread that drives it while no
/// one else does. Dropping it stops that thread, then the runtime.
pub struct NetRuntime {
    runtime: Arc<Runtime>,
    shared: Arc<Shared>,
    idle_driver: Option<JoinHandle<()>>,
}

struct Shared {
    /// Time of the last `block_on` entry, in µs since `epoch`.
    last_use_us: AtomicU64,
    epoch: Instant,
    /// The background thread holds the runtime (is inside its `block_on`).
    idle_driving: AtomicBool,
    /// Asks the background thread to leave its `block_on`.
    let_go: Notify,
    stop: AtomicBool,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn idle_for(&self) -> Duration {
        Duration::from_micros(self.now_us().saturating_sub(self.last_use_us.load(Ordering::SeqCst)))
    }
}

impl NetRuntime {
    /// Starts the runtime (I/O and timers enabled) and its background driver thread.
    ///
    /// Errors: the runtime or the thread could not be created.
    pub fn start() -> anyhow::Result<NetRuntime> {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the network runtime")?,
        );
        let shared = Arc::new(Shared {
            last_use_us: AtomicU64::new(0),
            epoch: Instant::now(),
            idle_driving: AtomicBool::new(false),
            let_go: Notify::new(),
            stop: AtomicBool::new(false),
        });
        let idle_driver = std::thread::Builder::new()
            .name("moeshard-net".into())
            .spawn({
                let (runtime, shared) = (runtime.clone(), shared.clone());
                move || drive_while_idle(&runtime, &shared)
            })
            .context("starting the network thread")?;
        Ok(NetRuntime { runtime, shared, idle_driver: Some(idle_driver) })
    }

    /// Runs `future` to completion on the calling thread, which drives the runtime (all of the
    /// cluster's connections) meanwhile, then runs the tasks it woke before returning: a batch
    /// written to a stream is on the wire when `block_on` returns, not at the next call (quinn
    /// transmits from the connection's driver task). Must not be called from inside an async
    /// context.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let s = &self.shared;
        s.last_use_us.store(s.now_us(), Ordering::SeqCst);
        // Pairs with the background thread's store-then-check: at least one of the two sees
        // the other, so it never keeps the runtime from a waiting caller.
        if s.idle_driving.load(Ordering::SeqCst) {
            s.let_go.notify_one();
        }
        self.runtime.block_on(async {
            let output = future.await;
            // Deferred wake: the scheduler runs every task that is ready first.
            tokio::task::yield_now().await;
            output
        })
    }

    /// Spawns a task onto the runtime; it runs whenever some thread drives the runtime.
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(future);
    }
}

impl Drop for NetRuntime {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.let_go.notify_one();
        if let Some(thread) = self.idle_driver.take() {
            let _ = thread.join();
        }
    }
}

/// The background thread: drives the runtime whenever it has gone [`IDLE_AFTER`] without a
/// `block_on`, until asked to let go.
fn drive_while_idle(runtime: &Runtime, s: &Shared) {
    while !s.stop.load(Ordering::SeqCst) {
        let idle_for = s.idle_for();
        if idle_for < IDLE_AFTER {
            std::thread::sleep(IDLE_AFTER - idle_for);
            continue;
        }
        s.idle_driving.store(true, Ordering::SeqCst);
        if s.idle_for() >= IDLE_AFTER && !s.stop.load(Ordering::SeqCst) {
            runtime.block_on(s.let_go.notified());
        }
        s.idle_driving.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_tasks_run_while_no_caller_drives() {
        let net = NetRuntime::start().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        net.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("the idle driver ran the task");
    }

    #[test]
    fn block_on_takes_the_runtime_back_from_the_idle_driver() {
        let net = NetRuntime::start().unwrap();
        let s = net.shared.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.idle_driving.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the idle driver never took the runtime");
            std::thread::sleep(Duration::from_millis(1));
        }
        let let_go = net.block_on(async {
            while s.idle_driving.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            !s.idle_driving.load(Ordering::SeqCst)
        });
        assert!(let_go, "the idle driver kept the runtime from a caller");
    }

    #[test]
    fn tasks_the_future_wakes_have_run_when_block_on_returns() {
        let net = NetRuntime::start().unwrap();
        for _ in 0..20 {
            let wake = Arc::new(Notify::new());
            let ran = Arc::new(AtomicBool::new(false));
            net.spawn({
                let (wake, ran) = (wake.clone(), ran.clone());
                async move {
                    wake.notified().await;
                    ran.store(true, Ordering::SeqCst);
                }
            });
            // Let the task start waiting, then wake it from a future that is ready at once.
            net.block_on(tokio::task::yield_now());
            net.block_on(async { wake.notify_one() });
            assert!(ran.load(Ordering::SeqCst), "the woken task had not run");
        }
    }

    #[test]
    fn callers_on_several_threads_share_it() {
        let net = Arc::new(NetRuntime::start().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let net = net.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| {
                            net.block_on(async {
                                tokio::task::yield_now().await;
                                i
                            })
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        let sums: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(sums, vec![0, 20, 40, 60]);
    }
}
