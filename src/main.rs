fn main() {
    limit_malloc_arenas();
    std::process::exit(orcafs::cli::main());
}

/// glibc gives each thread that contends an arena of its own, up to 8 per core, and memory freed
/// in one is not reused by the others: with eight cold readers of different objects the mount's
/// peak RSS was 259-264 MiB, and 214-232 MiB with two arenas, at the same speed (`scripts/bench
/// --only rss`, row 7). An operator's `MALLOC_ARENA_MAX` wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: before any other thread exists; mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}
