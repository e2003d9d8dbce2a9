//! The gateway: an HTTP reverse proxy inside valetd. An agent calls
//! `http://GATEWAY/u/<upstream>/<path>` with its valet token; the gateway verifies the token,
//! checks the call against the grant's scope (method, path, GraphQL fields), counts it, audits it,
//! strips the agent's credentials, injects the root credential on the upstream leg only, and
//! streams the answer back. The same listener serves the JWKS and OpenID discovery documents.

mod graphql;
mod mask;
mod proxy;
mod response;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use valet_core::audit::AuditEvent;
use valet_core::config::Config;
use valet_core::grant::Grant;
use valet_core::keyring::KeyRing;
use valet_core::{Secret, UnixTime};

pub use graphql::{AskedField, GraphqlDenial, check as check_graphql};

/// What the gateway needs from the broker it runs in.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    fn config(&self) -> Arc<Config>;
    fn key_ring(&self) -> Arc<KeyRing>;
    fn now(&self) -> UnixTime;
    /// A root credential by name.
    fn credential(&self, name: &str) -> Option<Secret>;
    async fn grant(&self, id: &str) -> Result<Option<Grant>, BrokerError>;
    /// Compare-and-swap, durable on return.
    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), BrokerError>;
    /// Appends an audit record, durable on return.
    async fn audit(&self, event: AuditEvent) -> Result<(), BrokerError>;
    /// Removes any root credential from text about to leave valetd.
    fn redact(&self, text: &str) -> String;
    /// Records a pending approval for one exact call; returns its id.
    async fn request_call_approval(
        &self,
        grant: &Grant,
        policy: &valet_core::approval::ApprovalPolicy,
        call: valet_core::approval::CallFingerprint,
        request_id: &str,
    ) -> Result<String, BrokerError>;
    /// Uses the approval `id` for this exact call of this grant, once; `Refused` says why not.
    async fn consume_call_approval(
        &self,
        id: &str,
        grant: &Grant,
        call: &valet_core::approval::CallFingerprint,
        request_id: &str,
    ) -> Result<(), BrokerError>;
}

/// A broker failure, as the gateway needs to tell them apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the grant changed concurrently")]
    Conflict,
    #[error("{0}")]
    Unavailable(String),
    /// The approval cannot be used for this call; the text says why.
    #[error("{reason}")]
    Refused { reason: String, pending: bool },
}

/// The gateway: serves one listener until `shutdown` completes.
pub struct Gateway {
    broker: Arc<dyn Broker>,
    upstreams: upstream::Clients,
}

impl Gateway {
    pub fn new(broker: Arc<dyn Broker>) -> Arc<Gateway> {
        Arc::new(Gateway {
            broker,
            upstreams: upstream::Clients::default(),
        })
    }

    /// Accepts connections (HTTP/1.1 and HTTP/2) until `shutdown` resolves, then lets in-flight
    /// calls finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::warn!(%error, "gateway accept failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let gateway = self.clone();
                    let service = hyper::service::service_fn(move |request| {
                        let gateway = gateway.clone();
                        async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, peer).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "gateway connection ended with an error");
                        }
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => tracing::warn!("gateway connections still open after 5 s; stopping anyway"),
        }
    }

    async fn handle(
        &self,
        request: http::Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> http::Response<response::Body> {
        proxy::handle(self, request, peer).await
    }
}
