fn main() {
    tune_malloc();
    std::process::exit(orcafs::cli::main());
}

/// Two glibc defaults cost memory under many readers (`scripts/bench --only rss`, row 7: eight
/// cold readers of different objects). It gives each thread that contends an arena of its own,
/// up to 8 per core, and memory freed in one is not reused by the others: peak RSS 259-264 MiB,
/// 214-232 with two arenas at the same speed. And once a large block has been freed it raises
/// its mmap threshold, so half-megabyte and larger buffers (HTTP bodies, replies) come from the
/// heap, which they fragment: ~300 MiB, 150-160 with the threshold fixed at 512 KiB. The
/// megabyte buffers that come and go hundreds of times a second are recycled (`pagebuf`), so
/// the fixed threshold costs no page faults on the data path. An operator's `MALLOC_ARENA_MAX`
/// or `MALLOC_MMAP_THRESHOLD_` wins.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: before any other thread exists; mallopt only sets an allocator parameter.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10) };
        }
    }
}
