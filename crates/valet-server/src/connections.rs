//! The gRPC listener's connections: the shared acceptor (connection cap, idle timeout, accept
//! backoff, concurrent TLS handshakes) made into the stream of connections tonic serves, each
//! carrying who is at the other end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tonic::transport::server::Connected;
use valet_gateway::listener::{Acceptor, Connection, Limits, Peer};
use valet_gateway::tls::{Listener, TlsMaterial};

/// One accepted gRPC connection, and who is at the other end (in every request's extensions).
pub struct GrpcConnection(Connection, Peer);

impl Connected for GrpcConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.1.clone()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(context, buffer)
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(context, data)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The connections of `listener`, within `limits` and over TLS when `tls` is set, for tonic's
/// `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<std::sync::Arc<TlsMaterial>>,
) -> impl Stream<Item = io::Result<GrpcConnection>> {
    let acceptor = Acceptor::start(
        listener,
        limits,
        "gRPC",
        tls.map(|material| (material, Listener::Grpc)),
    );
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let (connection, peer) = acceptor.accept().await?;
        Some((Ok(GrpcConnection(connection, peer)), acceptor))
    })
}
