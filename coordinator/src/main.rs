//! The `moeshard` binary: see `moeshard --help` and the crate docs of [`moeshard::cli`].

fn main() -> std::process::ExitCode {
    moeshard_kernels::allocator::limit_malloc_arenas();
    moeshard::cli::main()
}
