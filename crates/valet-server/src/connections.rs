//! The gRPC listener's connections: the shared acceptor (connection cap, idle timeout, accept
//! backoff, concurrent TLS handshakes) made into the stream of connections tonic serves, each
//! carrying who is at the other end, and each cut off when its HTTP/2 preface does not arrive
//! within the header-read timeout (a client trickling it a byte at a time would otherwise hold
//! a connection for as long as it keeps the idle timer from firing).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tonic::transport::server::Connected;
use valet_gateway::listener::{Acceptor, Connection, Limits, Peer};
use valet_gateway::tls::{Listener, TlsMaterial};

/// The HTTP/2 client connection preface (`PRI * HTTP/2.0…`) every gRPC client opens with.
const PREFACE_BYTES: usize = 24;

/// One accepted gRPC connection, and who is at the other end (in every request's extensions).
pub struct GrpcConnection {
    connection: Connection,
    peer: Peer,
    /// Preface bytes still to arrive; the deadline applies only while some do.
    preface_remaining: usize,
    preface_deadline: Pin<Box<tokio::time::Sleep>>,
}

impl GrpcConnection {
    fn new(connection: Connection, peer: Peer) -> GrpcConnection {
        GrpcConnection {
            connection,
            peer,
            preface_remaining: PREFACE_BYTES,
            preface_deadline: Box::pin(tokio::time::sleep(valet_gateway::HEADER_READ_TIMEOUT)),
        }
    }
}

impl Connected for GrpcConnection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buffer.filled().len();
        let polled = Pin::new(&mut this.connection).poll_read(context, buffer);
        if this.preface_remaining > 0 {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let n_read = buffer.filled().len() - before;
                    this.preface_remaining = this.preface_remaining.saturating_sub(n_read);
                }
                Poll::Pending if this.preface_deadline.as_mut().poll(context).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not send its HTTP/2 preface within the header-read timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().connection).poll_write(context, data)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().connection).poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().connection).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.connection.is_write_vectored()
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
        Some((Ok(GrpcConnection::new(connection, peer)), acceptor))
    })
}
