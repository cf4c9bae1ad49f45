//! Where compute threads run: CPU lists in taskset(1)'s form and pinning to them.
//!
//! Two uses. A worker keeps all of its threads on a set of CPUs (taskset(1), llama.cpp's
//! `--cpu-range`), so that several workers on one machine do not share cores. A coordinator may
//! put each thread of its compute pool on its own CPU ([`pin_pool`], llama.cpp's
//! `--cpu-strict 1`). Unpinned, its pool threads sleep while the workers compute a layer's
//! experts, and when the next parallel region wakes them Linux may queue a helper on the CPU of
//! the thread that woke it, behind that thread, while another CPU is idle (the wake-up's search
//! for an idle CPU is cut short when the last-level cache looks busy, as it does with workers
//! computing on every core). Measured on two vCPUs with two loopback workers, Q4_K_M decode
//! (`perf sched timehist`): the coordinator's second thread waited 0.5-0.9 ms to run in 153 of
//! 896 layers unpinned, in 18 pinned; the decode speed did not change beyond the run-to-run
//! spread (three interleaved pairs of tg128: 0.906x local pinned, 0.905x unpinned).

use std::fmt;
use std::str::FromStr;

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

    /// The CPU that thread `index` of a pool pinned one thread per CPU runs on: the list's
    /// CPUs in order, starting again from the first when the pool has more threads than CPUs.
    pub fn cpu_of_thread(&self, index: usize) -> CpuList {
        CpuList(vec![self.0[index % self.0.len()]])
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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
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
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = cpus;
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "CPU pinning is only supported on Linux"))
    }
}

/// Puts thread `i` of `pool` on CPU [`CpuList::cpu_of_thread`]`(i)` of `cpus`, one CPU each
/// while the list has enough (llama.cpp's `--cpu-strict 1`). Errors: the first thread's error of
/// [`pin`] (a CPU this process may not use, named; pinning unsupported outside Linux).
pub fn pin_pool(pool: &rayon::ThreadPool, cpus: &CpuList) -> std::io::Result<()> {
    pool.broadcast(|ctx| pin(&cpus.cpu_of_thread(ctx.index()))).into_iter().collect()
}

/// The CPUs the calling thread may run on now (`sched_getaffinity(2)`), ascending.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
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
mod tests {
    use super::*;

    #[test]
    fn threads_take_the_listed_cpus_in_turn() {
        let list: CpuList = "2,5-6".parse().unwrap();
        let cpus: Vec<String> = (0..4).map(|i| list.cpu_of_thread(i).to_string()).collect();
        assert_eq!(cpus, ["2", "5", "6", "2"]);
    }

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

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod pinning_tests {
    use super::*;

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
    fn a_pinned_pool_has_one_cpu_per_thread_in_list_order() {
        let allowed = allowed_cpus().unwrap();
        let list = CpuList(allowed.clone());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(allowed.len() + 1).build().unwrap();
        pin_pool(&pool, &list).unwrap();
        let seen = pool.broadcast(|ctx| (ctx.index(), allowed_cpus().unwrap()));
        for (i, cpus) in seen {
            assert_eq!(cpus, vec![allowed[i % allowed.len()]], "thread {i}");
        }
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
