//! ramp: how many chunks a sequential reader's readahead keeps ahead of it (its window).
//!
//! The window starts at `readahead_chunks` and doubles each time the reader catches up with its
//! fills (enters a chunk still being filled), up to `readahead_max_chunks`: a remote origin gives
//! each connection a share of its bandwidth, so a long read from it needs many GETs in flight.
//! More GETs pay only while the origin's connections are the limit, though. When the limit is
//! elsewhere (the host's CPU, its link, an origin at its own ceiling), more fills in flight add
//! nothing but memory and CPU: on two cores beside a local Garage, 8 or 16 chunks in flight cost
//! half again the CPU per GiB of 4, and read slower. So each doubling is a probe: once the reader
//! has gone through a whole window at the new size, its rate is compared with the rate at the
//! old size, and a doubling that did not raise it by a quarter is undone; the window then stays
//! for the rest of the run (a random read starts a new one).
//!
//! Owns only this arithmetic, over offsets and instants it is given: the caller keeps a ramp per
//! open file and says when the reader caught up.

use std::time::Instant;

/// The rate a doubling must add to be kept (a doubling where connections are the limit about
/// doubles it; where something else is, it stays within noise of the old one).
const GAIN: f64 = 1.25;

#[derive(Debug, Clone)]
pub struct Ramp {
    window: u64,
    /// The smallest window, where a run starts.
    first: u64,
    /// Offset and instant where the reader started reading at this window.
    from: u64,
    since: Instant,
    /// The rate (bytes per second) the reader got at the previous window, once measured.
    before: Option<f64>,
    /// A doubling did not pay: the window no longer moves.
    settled: bool,
}

impl Ramp {
    /// A run of sequential reads starting at `offset` with the smallest window.
    pub fn new(first: u64, offset: u64, now: Instant) -> Ramp {
        Ramp {
            window: first,
            first,
            from: offset,
            since: now,
            before: None,
            settled: false,
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// The window after the reader, now at `offset`, caught up with its fills: doubled (up to
    /// `max`) when the last doubling paid, halved back and settled when it did not, unchanged
    /// while the reader has not yet read a whole window at this size (before that, its rate is
    /// mostly the previous window's fills arriving).
    pub fn caught_up(&mut self, offset: u64, now: Instant, max: u64, chunk_size: u64) -> u64 {
        if self.settled || self.window >= max {
            return self.window;
        }
        let read = offset.saturating_sub(self.from);
        if read < self.window.saturating_mul(chunk_size) {
            return self.window;
        }
        let secs = now.saturating_duration_since(self.since).as_secs_f64();
        let rate = read as f64 / secs.max(1e-6);
        match self.before {
            Some(before) if rate < before * GAIN => {
                self.settled = true;
                self.window = (self.window / 2).max(self.first);
            }
            _ => {
                self.before = Some(rate);
                self.window = self.window.saturating_mul(2).min(max);
            }
        }
        self.from = offset;
        self.since = now;
        self.window
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1 << 20;
    const CHUNK: u64 = 8 * MIB;

    /// Drives a reader through `chunks` chunks, catching up at every chunk boundary, where each
    /// chunk takes `per_chunk(window)`; the windows it had, deduplicated.
    fn run(first: u64, max: u64, chunks: u64, per_chunk: impl Fn(u64) -> Duration) -> Vec<u64> {
        let t0 = Instant::now();
        let mut now = t0;
        let mut ramp = Ramp::new(first, 0, t0);
        let mut seen = vec![ramp.window()];
        for i in 1..=chunks {
            now += per_chunk(ramp.window());
            let w = ramp.caught_up(i * CHUNK, now, max, CHUNK);
            if seen.last() != Some(&w) {
                seen.push(w);
            }
        }
        seen
    }

    #[test]
    fn where_each_connection_is_the_limit_the_window_doubles_up_to_its_bound() {
        // 25 MiB/s per GET: w GETs in flight read w x 25 MiB/s.
        let paced = |w: u64| Duration::from_secs_f64(8.0 / (25.0 * w as f64));
        assert_eq!(run(4, 16, 64, paced), [4, 8, 16]);
        assert_eq!(run(3, 20, 64, paced), [3, 6, 12, 20]);
    }

    #[test]
    fn where_more_gets_add_nothing_the_window_goes_back_and_stays() {
        // 470 MiB/s whatever the window (an origin or host at its ceiling).
        let flat = |_: u64| Duration::from_secs_f64(8.0 / 470.0);
        assert_eq!(run(4, 16, 64, flat), [4, 8, 4]);
    }

    #[test]
    fn a_doubling_that_pays_is_kept_and_the_first_that_does_not_is_undone() {
        // Doubles up to 8 GETs, then a link of 8 x 25 MiB/s is full.
        let link = |w: u64| Duration::from_secs_f64(8.0 / (25.0 * w.min(8) as f64));
        assert_eq!(run(2, 32, 128, link), [2, 4, 8, 16, 8]);
    }

    #[test]
    fn a_window_is_judged_only_after_the_reader_went_through_it() {
        let t0 = Instant::now();
        let mut ramp = Ramp::new(4, 0, t0);
        // Catching up early in a window (the fills of the last one still arriving) keeps it.
        assert_eq!(
            ramp.caught_up(CHUNK, t0 + Duration::from_millis(10), 16, CHUNK),
            4
        );
        assert_eq!(
            ramp.caught_up(4 * CHUNK, t0 + Duration::from_millis(80), 16, CHUNK),
            8
        );
        assert_eq!(
            ramp.caught_up(11 * CHUNK, t0 + Duration::from_secs(1), 16, CHUNK),
            8
        );
        // Read a whole window of 8 far slower than the 4 before: back to 4, for good.
        assert_eq!(
            ramp.caught_up(12 * CHUNK, t0 + Duration::from_secs(2), 16, CHUNK),
            4
        );
        assert_eq!(
            ramp.caught_up(100 * CHUNK, t0 + Duration::from_secs(3), 16, CHUNK),
            4
        );
    }
}
