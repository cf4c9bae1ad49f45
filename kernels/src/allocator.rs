//! Process-wide allocator settings, applied first thing by the `moeshard` and `moeshard-worker`
//! binaries.

/// glibc malloc arenas a process may use (glibc's default is eight per core).
///
/// Under steady serving load, threads that allocate and free request-sized buffers (HTTP bodies,
/// expert batches, partial sums) spread them over per-thread arenas, and each arena keeps its own
/// freed memory resident: in a 30-minute `scripts/soak.py` run with the default, the server grew
/// by 6.8% and a worker by 12.5% while one arena kept both within 0.3% and 1.5% over six minutes.
/// The price is one lock for every allocation above glibc's per-thread cache sizes (about 1 KB):
/// the compute paths therefore allocate per call, never per work item (`matmul::dot_rows` keeps
/// its results on the stack, the Q8_0 several-rows kernels a per-thread buffer); with an
/// allocation per work item, decoding lost a third of its speed to threads queued on that lock.
pub const MALLOC_ARENAS: i32 = 1;

/// Caps glibc malloc at [`MALLOC_ARENAS`] arenas (`mallopt(M_ARENA_MAX)`, the setting behind the
/// `MALLOC_ARENA_MAX` environment variable); call it before spawning threads. A no-op on other C
/// libraries, whose allocators do not keep per-thread arenas this way.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; any value is accepted or rejected by it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}
