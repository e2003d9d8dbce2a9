//! Streaming, the fourth stage: the upstream's answer goes back to the agent frame by frame as it
//! arrives, with the root credential masked (across frame boundaries) and counted for the closing
//! audit record, which the service writes when the body ends or the agent goes away.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use valet_core::config::Upstream;
use valet_service::{CallDecision, CallOutcome, Valet};

use crate::forward::percent_encode;
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

/// The secret as an upstream could echo it: raw, and percent-encoded (a redirect's URL, an error
/// page quoting the query string), so an echo of either form is caught.
pub fn masker_for(_upstream: &Upstream, secret: &valet_core::Secret) -> Masker {
    let mut needles = vec![secret.expose().to_vec()];
    if let Some(text) = secret.expose_str() {
        let encoded = percent_encode(text);
        if encoded != text {
            needles.push(encoded.into_bytes());
        }
    }
    Masker::new(needles)
}

/// The upstream's body, streamed frame by frame as it arrives, with the root credential masked,
/// counted for the closing record.
pub fn masked<B>(body: B, masker: Masker, closing: Closing) -> Body
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let stream = futures::stream::unfold(
        (Some(body), masker, closing),
        |(body, mut masker, mut closing)| async move {
            let mut body = body?;
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            closing.bytes += data.len() as u64;
                            let ready = masker.push(&data);
                            if ready.is_empty() {
                                continue;
                            }
                            return Some((Ok(Frame::data(ready)), (Some(body), masker, closing)));
                        }
                        // Trailers pass through.
                        Err(frame) => return Some((Ok(frame), (Some(body), masker, closing))),
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
