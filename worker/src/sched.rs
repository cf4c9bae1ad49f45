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
//! [`pin`] (`--cpus`) keeps the worker's threads on a set of CPUs (taskset(1), llama.cpp's
//! `--cpu-range`). Two workers on one machine need it: when a layer's batches wake both while
//! every CPU is busy (the coordinator still sending), Linux may queue both on one CPU, and the
//! CPU that then goes idle does not pull the second one (its recent idle periods were too short
//! for a new-idle balance): that worker starts after the other has finished its share. Measured
//! on two vCPUs, two loopback workers of one thread each, Q4_K_M decode: 3% of the batches
//! started 0.9-2.8 ms late, in runs of consecutive layers; none with each worker on its own CPU.

use std::fmt;
use std::str::FromStr;

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

/// The highest CPU index a [`CpuList`] may name plus one (glibc's `CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

/// A set of CPUs by index, parsed from taskset(1)'s list form: `0`, `0-3`, `0,2,4-7`.
/// Ascending, without repeats, never empty, every index below [`MAX_CPUS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// The CPU indices, ascending.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }
}

impl FromStr for CpuList {
    type Err = String;

    /// Errors: an empty list or item, a part that is not a number, a range whose end is below
    /// its start, an index of [`MAX_CPUS`] or more.
    fn from_str(s: &str) -> Result<Self, String> {
        let index = |part: &str| -> Result<usize, String> {
            let cpu: usize = part.trim().parse().map_err(|_| format!("`{part}` is not a CPU index"))?;
            if cpu >= MAX_CPUS {
                return Err(format!("CPU {cpu} is out of range (at most {})", MAX_CPUS - 1));
            }
            Ok(cpu)
        };
        let mut cpus = Vec::new();
        for item in s.split(',') {
            match item.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (index(first)?, index(last)?);
                    if last < first {
                        return Err(format!("the CPU range `{item}` ends before it starts"));
                    }
                    cpus.extend(first..=last);
                }
                None if item.trim().is_empty() => return Err(format!("`{s}` has an empty item (expected e.g. 0-3,6)")),
                None => cpus.push(index(item)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }
}

impl fmt::Display for CpuList {
    /// The list form, with runs of consecutive CPUs as ranges: `0-3,6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &cpu in &self.0 {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == cpu => *last = cpu,
                _ => runs.push((cpu, cpu)),
            }
        }
        let items: Vec<String> =
            runs.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        f.write_str(&items.join(","))
    }
}

/// Restricts the calling thread to `cpus`; threads it creates afterwards inherit the set.
/// Needs no privilege. Errors ([`std::io::ErrorKind::InvalidInput`]): a listed CPU this process
/// may not run on (offline, absent, or outside its cgroup cpuset), naming those and the CPUs it
/// may use; else the `sched_setaffinity(2)` error; outside Linux, that CPU pinning is not
/// supported.
pub fn pin(cpus: &CpuList) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let allowed = allowed_cpus()?;
        let missing: Vec<usize> = cpus.cpus().iter().copied().filter(|cpu| !allowed.contains(cpu)).collect();
        if !missing.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("this process may not run on CPU {} (it may use {})", CpuList(missing), CpuList(allowed)),
            ));
        }
        // SAFETY: a zeroed `cpu_set_t` is the empty set; CPU_SET is given indices below
        // CPU_SETSIZE (checked at parse); pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus.cpus() {
                libc::CPU_SET(cpu, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpus;
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "CPU pinning is only supported on Linux"))
    }
}

/// The CPUs the calling thread may run on now (`sched_getaffinity(2)`), ascending.
#[cfg(target_os = "linux")]
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: `set` is a valid, writable `cpu_set_t` of the size passed; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..MAX_CPUS).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect())
    }
}

#[cfg(test)]
mod cpu_list_tests {
    use super::*;

    #[test]
    fn lists_parse_sorted_without_repeats_and_print_as_ranges() {
        let list: CpuList = "6,0-3,2".parse().unwrap();
        assert_eq!(list.cpus(), &[0, 1, 2, 3, 6]);
        assert_eq!(list.to_string(), "0-3,6");
        assert_eq!("5".parse::<CpuList>().unwrap().cpus(), &[5]);
        assert_eq!("1-1, 3".parse::<CpuList>().unwrap().to_string(), "1,3");
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        for (input, says) in [
            ("", "empty item"),
            ("1,,2", "empty item"),
            ("a", "not a CPU index"),
            ("3-1", "ends before it starts"),
            ("0-x", "not a CPU index"),
            ("1024", "out of range"),
        ] {
            let err = input.parse::<CpuList>().expect_err(input);
            assert!(err.contains(says), "{input:?}: {err}");
        }
    }
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

    #[test]
    fn pinning_holds_for_the_thread_and_its_children() {
        let seen = std::thread::spawn(|| {
            let first = *allowed_cpus().unwrap().first().expect("some CPU is allowed");
            let list: CpuList = first.to_string().parse().unwrap();
            pin(&list).unwrap();
            (first, allowed_cpus().unwrap(), std::thread::spawn(allowed_cpus).join().unwrap().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(seen.1, vec![seen.0]);
        assert_eq!(seen.2, vec![seen.0]);
    }

    #[test]
    fn pinning_to_cpus_that_do_not_exist_is_an_error_naming_them() {
        let (err, before, after) = std::thread::spawn(|| {
            let before = allowed_cpus().unwrap();
            let list: CpuList = format!("{},1000-1023", before[0]).parse().unwrap();
            (pin(&list).expect_err("no such CPUs"), before, allowed_cpus().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let allowed = CpuList(before.clone()).to_string();
        assert_eq!(err.to_string(), format!("this process may not run on CPU 1000-1023 (it may use {allowed})"));
        assert_eq!(after, before, "nothing was changed");
    }
}
