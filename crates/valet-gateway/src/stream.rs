//! Streaming, the fourth stage: the upstream's answer goes back to the agent frame by frame as it
//! arrives, with the root credential masked (across frame boundaries) and counted for the closing
//! audit record, which the service writes when the body ends or the agent goes away.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use valet_service::{CallDecision, CallOutcome, Valet};

use crate::mask::Masker;
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
        let Some(decision) = self.decision.take() else {
            return;
        };
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

/// The masker for a call's answer: every form an upstream may write the root credential in (see
/// [`crate::mask::needles_of`]).
pub fn masker_for(secret: &valet_core::Secret) -> Result<Masker, crate::mask::TooLong> {
    Masker::new(crate::mask::needles_of(secret.expose()))
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
    let stream = futures::stream::unfold(
        (Some(body), masker, closing),
        move |(body, mut masker, mut closing)| async move {
            let mut body = body?;
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            closing.bytes += data.len() as u64;
                            let ready = match framing {
                                Framing::Stream => masker.push(&data),
                                Framing::Whole => Bytes::from(masker.mask_whole(&data)),
                            };
                            if ready.is_empty() {
                                continue;
                            }
                            return Some((Ok(Frame::data(ready)), (Some(body), masker, closing)));
                        }
                        // Trailers are not passed on: a value of theirs would be a channel the
                        // masker does not see (an HTTP/2 upstream could put the credential in one).
                        Err(_) => continue,
                    },
                    Some(Err(error)) => {
                        return Some((Err(error.into()), (Some(body), masker, closing)));
                    }
                    None => {
                        closing.finish(true);
                        let rest = masker.finish();
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((Ok(Frame::data(rest)), (None, masker, closing)));
                    }
                }
            }
        },
    );
    BodyExt::boxed(StreamBody::new(stream))
}
