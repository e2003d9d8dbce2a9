//! Streaming, the fourth stage: the upstream's answer goes back to the agent frame by frame as it
//! arrives, with the root credential masked (across frame boundaries) and counted for the closing
//! audit record, which the service writes when the body ends or the agent goes away.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use valet_service::{CallDecision, CallOutcome, Valet};

use crate::mask::{BLOCK, Masker};

/// How often a streaming answer checks that its grant is still active.
const GRANT_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
use crate::response::{Body, BoxError};

/// Writes the closing record (status, bytes, latency) when the response body ends — or is
/// dropped half-way because the agent went away.
pub struct Closing {
    valet: Arc<Valet>,
    decision: Option<CallDecision>,
    status: u16,
    bytes: u64,
    started: Instant,
}

impl Closing {
    pub fn new(
        valet: Arc<Valet>,
        decision: CallDecision,
        status: u16,
        started: Instant,
    ) -> Closing {
        Closing {
            valet,
            decision: Some(decision),
            status,
            bytes: 0,
            started,
        }
    }

    fn finish(&mut self, complete: bool) {
        let Some(mut decision) = self.decision.take() else {
            return;
        };
        decision.answered();
        let outcome = CallOutcome::Answered {
            status: self.status,
            bytes: self.bytes,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            complete,
        };
        let valet = self.valet.clone();
        tokio::spawn(async move {
            if let Err(error) = valet.record_call_outcome(&decision, outcome).await {
                tracing::error!(%error, "cannot write the closing audit record of a gateway call");
            }
        });
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl std::fmt::Debug for Closing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Closing")
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// The masker for a call's answer (see [`crate::mask`]).
pub fn masker_for(secret: &valet_core::Secret) -> Result<Masker, crate::mask::TooLong> {
    Masker::new(secret.expose())
}

/// The upstream's body, streamed frame by frame as it arrives, with the root credential masked,
/// counted for the closing record.
pub fn masked<B>(body: B, masker: Masker, closing: Closing) -> Body
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    masked_as(body, masker, closing, Framing::Stream)
}

/// How a body's frames relate to what is masked in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Bytes as an upstream streams them: masked through the fixed window.
    Stream,
    /// Each frame is whole units the gateway built (a re-serialised JSON body, complete SSE
    /// events): masked frame by frame, released at once.
    Whole,
}

/// The body masked as its framing says, counted for the closing record.
pub fn masked_as<B>(body: B, masker: Masker, closing: Closing, framing: Framing) -> Body
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    // Masked bytes are handed on one block at a time, each its own frame (an HTTP/1.1 chunk, an
    // HTTP/2 DATA frame): how many blocks a single upstream frame released depends on where the
    // credential's occurrences fall, and one frame of several blocks would show that in its size.
    // While the answer streams, its grant is checked every couple of seconds: a revoked,
    // expired or used-up grant ends it there (the agent's stream is cut, not completed).
    let grant = closing
        .decision
        .as_ref()
        .map(|decision| decision.grant.id.clone());
    let mut next_check = tokio::time::Instant::now() + GRANT_CHECK;
    let stream = futures::stream::unfold(
        (Some(body), masker, closing, Bytes::new()),
        move |(mut body, mut masker, mut closing, mut pending)| {
            let grant = grant.clone();
            async move {
                loop {
                    if !pending.is_empty() {
                        let frame = pending.split_to(pending.len().min(BLOCK));
                        return Some((Ok(Frame::data(frame)), (body, masker, closing, pending)));
                    }
                    let upstream = body.as_mut()?;
                    let next = tokio::select! {
                        next = upstream.frame() => Some(next.map(|frame| frame.map_err(Into::<BoxError>::into))),
                        () = tokio::time::sleep_until(next_check) => None,
                    };
                    let Some(next) = next else {
                        next_check = tokio::time::Instant::now() + GRANT_CHECK;
                        let Some(grant) = grant.clone() else { continue };
                        let valet = closing.valet.clone();
                        let active =
                            tokio::spawn(async move { valet.grant_is_active(&grant).await });
                        if !active.await.unwrap_or(false) {
                            tracing::info!(
                                "a gateway answer was cut off: its grant ended while it streamed"
                            );
                            let error: BoxError = "the grant ended (revoked, expired or used up) while its answer streamed; the rest is not passed on".into();
                            return Some((Err(error), (None, masker, closing, Bytes::new())));
                        }
                        continue;
                    };
                    match next {
                        // Trailers are not passed on: a value of theirs would be a channel the
                        // masker does not see (an HTTP/2 upstream could put the credential in one).
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            closing.bytes += data.len() as u64;
                            match framing {
                                Framing::Stream => pending = masker.push(&data),
                                Framing::Whole => {
                                    let whole = Bytes::from(masker.mask_whole(&data));
                                    if !whole.is_empty() {
                                        let state = (body, masker, closing, pending);
                                        return Some((Ok(Frame::data(whole)), state));
                                    }
                                }
                            }
                        }
                        Some(Err(error)) => {
                            return Some((Err(error), (body, masker, closing, pending)));
                        }
                        None => {
                            closing.finish(true);
                            body = None;
                            pending = masker.finish();
                        }
                    }
                }
            }
        },
    );
    BodyExt::boxed(StreamBody::new(stream))
}
