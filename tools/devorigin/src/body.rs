//! The response body type: either s3s's body passed through (optionally
//! metered and damaged), or a fixed body written by this crate.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::faults::Stall;
use crate::stats::Stats;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every response the server sends.
pub(crate) struct OriginBody {
    source: Source,
    meter: Option<Meter>,
}

enum Source {
    S3(s3s::Body),
    Fixed(Option<Bytes>),
}

/// Counts GetObject body bytes as frames are handed to hyper, and applies
/// body faults at exact byte offsets.
struct Meter {
    stats: Arc<Stats>,
    sent: u64,
    /// Abort the body once this many bytes were sent.
    cut_at: Option<u64>,
    stall: Option<StallState>,
    /// Part of a frame held back because it crossed a fault offset.
    held: Option<Bytes>,
}

struct StallState {
    stall: Stall,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

/// The body faults to apply to one GetObject response.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BodyFaults {
    /// Abort after this many bytes.
    pub cut_at: Option<u64>,
    pub stall: Option<Stall>,
}

impl OriginBody {
    /// s3s's body, untouched and uncounted.
    pub(crate) fn passthrough(body: s3s::Body) -> Self {
        OriginBody {
            source: Source::S3(body),
            meter: None,
        }
    }

    /// A body written by this crate (not counted).
    pub(crate) fn fixed(bytes: Bytes) -> Self {
        OriginBody {
            source: Source::Fixed(Some(bytes).filter(|b| !b.is_empty())),
            meter: None,
        }
    }

    /// s3s's GetObject body, counted into `stats.get_bytes` and damaged as
    /// `faults` says.
    pub(crate) fn metered(body: s3s::Body, stats: Arc<Stats>, faults: BodyFaults) -> Self {
        let stall = faults.stall.map(|stall| StallState {
            stall,
            sleep: None,
            done: false,
        });
        OriginBody {
            source: Source::S3(body),
            meter: Some(Meter {
                stats,
                sent: 0,
                cut_at: faults.cut_at,
                stall,
                held: None,
            }),
        }
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.meter {
            None => this.source.poll_frame(cx),
            Some(meter) => meter.poll_frame(&mut this.source, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        let held = self.meter.as_ref().is_some_and(|m| m.held.is_some());
        !held && self.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.meter {
            Some(m) if m.held.is_some() || m.sent > 0 => SizeHint::default(),
            _ => self.source.size_hint(),
        }
    }
}

impl Source {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Source::S3(body) => Pin::new(body).poll_frame(cx),
            Source::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::S3(body) => body.is_end_stream(),
            Source::Fixed(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::S3(body) => body.size_hint(),
            Source::Fixed(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl Meter {
    fn poll_frame(
        &mut self,
        source: &mut Source,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cut_at.is_some_and(|at| self.sent >= at) {
            return Poll::Ready(Some(Err(injected_cut(self.sent))));
        }
        ready!(self.poll_stall(cx));
        let mut data = match self.held.take() {
            Some(data) => data,
            None => match ready!(source.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                end_or_error => return Poll::Ready(end_or_error),
            },
        };
        if let Some(limit) = self.next_fault_offset() {
            let room = usize::try_from(limit - self.sent).unwrap_or(usize::MAX);
            if data.len() > room {
                self.held = Some(data.split_off(room));
            }
        }
        let n = data.len() as u64;
        self.sent += n;
        self.stats.add_get_bytes(n);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// Sleeps once the stall offset is reached, until the pause is over.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(state) = &mut self.stall else {
            return Poll::Ready(());
        };
        if state.done || self.sent < state.stall.after_bytes {
            return Poll::Ready(());
        }
        let sleep = state
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(state.stall.pause)));
        ready!(sleep.as_mut().poll(cx));
        state.done = true;
        state.sleep = None;
        Poll::Ready(())
    }

    /// The nearest byte offset ahead at which a fault must fire.
    fn next_fault_offset(&self) -> Option<u64> {
        let stall_at = self
            .stall
            .as_ref()
            .filter(|s| !s.done)
            .map(|s| s.stall.after_bytes);
        [self.cut_at, stall_at]
            .into_iter()
            .flatten()
            .filter(|&at| at > self.sent)
            .min()
    }
}

fn injected_cut(sent: u64) -> BoxError {
    let msg = format!("orcafs-devorigin: injected body cut after {sent} bytes");
    Box::new(io::Error::new(io::ErrorKind::ConnectionAborted, msg))
}
