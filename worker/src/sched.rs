//! The scheduling policy and the CPUs of the worker's threads.
//!
//! An expert batch arrives as a UDP datagram, and Linux wakes the thread waiting for it with a
//! "sync" wake-up: often onto the sender's CPU, preempting the sender. When the coordinator
//! runs on the same machine (workers on loopback, or a worker beside the coordinator), that
//! preempted sender is the coordinator before it has sent the same layer's batch to the next
//! worker: that worker then starts up to a time slice (about 1 ms) late. Measured on two vCPUs
//! with two loopback workers (Q4_K_M, decode): the send of a layer's first batch took 940 µs
//! at p90 under `SCHED_OTHER`, 42 µs under `SCHED_BATCH`.
//!
//! `SCHED_BATCH` (sched(7)) is `SCHED_OTHER` with the same CPU share and nice level, except that
//! a waking task never preempts the running one: it runs when that task blocks (the
//! coordinator, a few µs later, when it waits for the answers) or uses up its slice, or on
//! another CPU that is idle. On a machine someone works at, the worker then also never
//! preempts their programs. Threads created after [`apply`] inherit the policy.
//!
//! [`moeshard_kernels::affinity::pin`] (`--cpus`) keeps the worker's threads on a set of CPUs (taskset(1), llama.cpp's
//! `--cpu-range`). Two workers on one machine need it: when a layer's batches wake both while
//! every CPU is busy (the coordinator still sending), Linux may queue both on one CPU, and the
//! CPU that then goes idle does not pull the second one (its recent idle periods were too short
//! for a new-idle balance): that worker starts after the other has finished its share. Measured
//! on two vCPUs, two loopback workers of one thread each, Q4_K_M decode: 3% of the batches
//! started 0.9-2.8 ms late, in runs of consecutive layers; none with each worker on its own CPU.

use clap::ValueEnum;

/// The Linux scheduling policy of every worker thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SchedPolicy {
    /// `SCHED_BATCH`: a waking worker thread never preempts the running task.
    Batch,
    /// `SCHED_OTHER`, the default of Linux processes.
    Normal,
}

/// Sets `policy` on the calling thread (priority 0, as both policies require); threads it
/// creates afterwards inherit it. Needs no privilege. Errors: the `sched_setscheduler(2)`
/// error. Outside Linux, [`SchedPolicy::Batch`] is not available and this does nothing.
pub fn apply(policy: SchedPolicy) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let code = match policy {
            SchedPolicy::Batch => libc::SCHED_BATCH,
            SchedPolicy::Normal => libc::SCHED_OTHER,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param`; pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, code, &param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn current_policy() -> i32 {
        // SAFETY: no arguments but the pid; 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn policy_is_set_and_inherited_by_new_threads() {
        let seen = std::thread::spawn(|| {
            apply(SchedPolicy::Batch).unwrap();
            let own = current_policy();
            let child = std::thread::spawn(current_policy).join().unwrap();
            apply(SchedPolicy::Normal).unwrap();
            (own, child, current_policy())
        })
        .join()
        .unwrap();
        assert_eq!(seen, (libc::SCHED_BATCH, libc::SCHED_BATCH, libc::SCHED_OTHER));
    }
}
