//! warm::report: what a warm tells its operator. Live counters the workers add to, a progress
//! bar on a terminal or a plain line every few seconds otherwise, and the plan and summary lines.

use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::control::human_bytes;

use super::plan::Totals;

/// How often the progress display is refreshed.
pub const TICK: Duration = Duration::from_millis(100);

/// Live counters of a run; workers add, the display reads.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub objects: AtomicU64,
    pub failed_chunks: AtomicU64,
    pub failed_bytes: AtomicU64,
}

/// A point-in-time copy of [`Progress`] with the run's time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub bytes: u64,
    pub chunks: u64,
    pub objects: u64,
    pub failed_chunks: u64,
    pub failed_bytes: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn snapshot(&self, started: Instant) -> Done {
        Done {
            bytes: self.bytes.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            objects: self.objects.load(Ordering::Relaxed),
            failed_chunks: self.failed_chunks.load(Ordering::Relaxed),
            failed_bytes: self.failed_bytes.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
        }
    }
}

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-3)
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The periodic progress line printed when stderr is not a terminal.
pub fn progress_line(t: &Totals, d: &Done) -> String {
    let r = rate(d.bytes, d.elapsed);
    let left = t.fetch_bytes.saturating_sub(d.bytes + d.failed_bytes);
    let eta = if d.bytes == 0 {
        "-".to_string()
    } else {
        seconds(Duration::from_secs_f64(left as f64 / r))
    };
    format!(
        "warm: {} of {} ({}%), {} of {} objects, {}/s, ETA {eta}",
        human_bytes(d.bytes),
        human_bytes(t.fetch_bytes),
        (d.bytes * 100).checked_div(t.fetch_bytes).unwrap_or(100),
        d.objects,
        t.fetch_objects,
        human_bytes(r as u64),
    )
}

/// The plan in one line, before anything is read.
pub fn plan_line(t: &Totals) -> String {
    format!(
        "warm: {} objects, {}: {} ({} chunks) of {} objects to fetch, {} already cached",
        t.objects,
        human_bytes(t.bytes),
        human_bytes(t.fetch_bytes),
        t.fetch_chunks,
        t.fetch_objects,
        human_bytes(t.cached_bytes)
    )
}

/// How a run ended, for its summary line and exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    Interrupted,
}

/// The last line of a run.
pub fn summary(t: &Totals, d: &Done, ending: Ending) -> String {
    let cached = format!(
        "{} ({} bytes) already cached",
        human_bytes(t.cached_bytes),
        t.cached_bytes
    );
    if t.fetch_chunks == 0 {
        return format!(
            "warm: nothing to fetch: {} objects, all cached: {cached}",
            t.objects
        );
    }
    let time = format!(
        "in {} ({}/s)",
        seconds(d.elapsed),
        human_bytes(rate(d.bytes, d.elapsed) as u64)
    );
    match (ending, d.failed_chunks) {
        (Ending::Interrupted, _) => format!(
            "warm: interrupted: fetched {} of {} ({} bytes, {} of {} chunks), {} of {} objects \
             complete, {cached}, {time}; run it again to resume",
            human_bytes(d.bytes),
            human_bytes(t.fetch_bytes),
            d.bytes,
            d.chunks,
            t.fetch_chunks,
            d.objects,
            t.fetch_objects
        ),
        (Ending::Complete, failed) => {
            let fetched = format!(
                "fetched {} ({} bytes, {} chunks) of {} objects",
                human_bytes(d.bytes),
                d.bytes,
                d.chunks,
                d.objects
            );
            if failed == 0 {
                format!("warm: done: {fetched}, {cached}, {time}")
            } else {
                format!(
                    "warm: incomplete: {fetched}, {failed} chunks ({}) failed, {cached}, \
                     {time}; run it again to retry them",
                    human_bytes(d.failed_bytes)
                )
            }
        }
    }
}

/// Where progress goes: a bar on a terminal, else a plain line every so often.
pub enum Display {
    Bar(ProgressBar),
    Lines { every: Duration },
}

impl Display {
    /// A spinner while scanning on a terminal (see [`Display::bar`]), else plain lines.
    pub fn for_stderr(every: Duration) -> Display {
        if !io::stderr().is_terminal() {
            return Display::Lines { every };
        }
        let style = ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        Display::Bar(ProgressBar::new_spinner().with_style(style))
    }

    /// Turns the scanning spinner into the progress bar of `len` bytes.
    pub fn bar(&self, len: u64) {
        let Display::Bar(pb) = self else {
            return;
        };
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed}] [{wide_bar}] {bytes}/{total_bytes} {msg} \
             {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb.set_length(len);
        pb.reset_elapsed();
        pb.reset_eta();
        pb.enable_steady_tick(TICK);
    }

    /// Shows scanning progress (on a terminal only: scanning is quick next to fetching).
    pub fn scanning(&self, files: usize) {
        if let Display::Bar(pb) = self {
            pb.set_message(format!("scanning: {files} files"));
            pb.enable_steady_tick(TICK);
        }
    }

    /// Removes the bar, if any, before plain output.
    pub fn clear(&self) {
        if let Display::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }

    /// A line for the operator, kept clear of the bar.
    pub fn note(&self, line: &str) {
        match self {
            Display::Bar(pb) => pb.suspend(|| eprintln!("{line}")),
            Display::Lines { .. } => eprintln!("{line}"),
        }
    }
}

/// Refreshes `display` from `progress` until `finished`.
pub fn show_progress(
    display: &Display,
    t: &Totals,
    progress: &Progress,
    started: Instant,
    finished: &AtomicBool,
) {
    display.bar(t.fetch_bytes);
    let mut last_line = Instant::now();
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let d = progress.snapshot(started);
        match display {
            Display::Bar(pb) => {
                pb.set_position(d.bytes);
                pb.set_message(format!("{}/{} objects", d.objects, t.fetch_objects));
            }
            Display::Lines { every } if last_line.elapsed() >= *every => {
                eprintln!("{}", progress_line(t, &d));
                last_line = Instant::now();
            }
            Display::Lines { .. } => {}
        }
    }
    display.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_and_summary_lines() {
        let t = Totals {
            objects: 4,
            bytes: 3 << 20,
            fetch_objects: 2,
            fetch_bytes: 2 << 20,
            fetch_chunks: 8,
            cached_bytes: 1 << 20,
        };
        let d = Done {
            bytes: 1 << 20,
            chunks: 4,
            objects: 1,
            elapsed: Duration::from_secs(2),
            ..Done::default()
        };
        assert_eq!(
            progress_line(&t, &d),
            "warm: 1.0 MiB of 2.0 MiB (50%), 1 of 2 objects, 512.0 KiB/s, ETA 2.0s"
        );
        assert!(plan_line(&t).contains("2.0 MiB (8 chunks) of 2 objects to fetch"));
        let s = summary(&t, &d, Ending::Interrupted);
        assert_eq!(
            s,
            "warm: interrupted: fetched 1.0 MiB of 2.0 MiB (1048576 bytes, 4 of 8 chunks), 1 of 2 \
             objects complete, 1.0 MiB (1048576 bytes) already cached, in 2.0s (512.0 KiB/s); run \
             it again to resume"
        );
        let all = Done {
            bytes: 2 << 20,
            chunks: 8,
            objects: 2,
            ..d
        };
        let s = summary(&t, &all, Ending::Complete);
        assert!(s.starts_with("warm: done: fetched 2.0 MiB (2097152 bytes, 8 chunks) of 2 objects, 1.0 MiB (1048576 bytes) already cached"), "{s}");
        let failed = Done {
            failed_chunks: 1,
            failed_bytes: 1 << 18,
            ..d
        };
        assert!(summary(&t, &failed, Ending::Complete).contains("1 chunks (256.0 KiB) failed"));
        let cached = Totals {
            fetch_objects: 0,
            fetch_bytes: 0,
            fetch_chunks: 0,
            cached_bytes: 3 << 20,
            ..t
        };
        assert_eq!(
            summary(&cached, &Done::default(), Ending::Complete),
            "warm: nothing to fetch: 4 objects, all cached: 3.0 MiB (3145728 bytes) already cached"
        );
    }
}
