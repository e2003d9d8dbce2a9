//! Outbound HTTP, as the service needs it (approval webhooks, AWS's Query API, identity issuers'
//! JWKS): one request, one bounded answer. The process that runs the service provides the client, so this crate carries
//! no HTTP stack of its own.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// A complete answer: status and body.
#[derive(Debug, Clone)]
pub struct OutboundAnswer {
    pub status: u16,
    pub body: Bytes,
}

/// Sends requests to the outside world (http or https, public web roots).
#[async_trait]
pub trait Outbound: Send + Sync + 'static {
    /// Sends `request` and reads its answer, at most `max_answer_bytes` of body, all within
    /// `timeout`. The error says what went wrong in words (unreachable, timed out, unreadable).
    async fn send(
        &self,
        request: http::Request<Bytes>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String>;

    /// As [`Outbound::send`], over https verified against the CA certificates in `ca_pem` only
    /// (a private issuer's JWKS endpoint, say).
    async fn send_trusting(
        &self,
        ca_pem: &[u8],
        request: http::Request<Bytes>,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<OutboundAnswer, String>;
}
