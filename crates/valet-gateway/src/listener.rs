//! Accepting connections for valetd's listeners (gRPC, gateway, console, metrics) under abuse
//! limits: each connection takes a place in the listener's [`budget`](crate::budget) (caps per
//! source and for connections that have not authenticated; an idle connection of whoever holds
//! the most gives way to a newcomer), a connection that neither reads nor writes for
//! `idle_timeout`, or carries no request for that long (whatever pings it answers), is closed,
//! accept errors (such as running out of file descriptors) back off instead of spinning, with a
//! bounded log, and TLS handshakes run concurrently, each within a deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use valet_core::identity::PresentedCertificate;

use crate::budget::{Budget, ConnectionCaps, ConnectionHandle, HOLD_BEFORE_CLOSE, Place};
use crate::tls::TlsMaterial;

/// The first pause after a failed accept; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause between accept attempts while accepting fails.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one warning per this long about failing accepts (with the count since the last).
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The limits a listener keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub caps: ConnectionCaps,
    pub idle_timeout: Duration,
}

/// A listener that hands out connections within its [`Limits`].
pub struct LimitedListener {
    listener: TcpListener,
    budget: Arc<Budget>,
    limits: Limits,
    name: &'static str,
    /// When the last accept warning was logged, and the failures since.
    warned: std::sync::Mutex<(Option<Instant>, u64)>,
    /// When the last refused-connection warning was logged, and the refusals since.
    refused: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl LimitedListener {
    pub fn new(listener: TcpListener, limits: Limits, name: &'static str) -> LimitedListener {
        LimitedListener {
            listener,
            budget: Budget::new(limits.caps),
            limits,
            name,
            warned: std::sync::Mutex::new((None, 0)),
            refused: std::sync::Mutex::new((None, 0)),
        }
    }

    /// The next connection that has a place in the budget (a connection refused one is held
    /// unread for [`HOLD_BEFORE_CLOSE`] then closed, and counted in a bounded log); while
    /// accepting fails it backs off.
    pub async fn accept(&self) -> (LimitedStream, SocketAddr) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => match self.budget.admit(peer.ip()) {
                    Ok(place) => {
                        let _ = stream.set_nodelay(true);
                        return (
                            LimitedStream::new(stream, Some(place), self.limits.idle_timeout),
                            peer,
                        );
                    }
                    Err(refusal) => {
                        if let Some(held) = self.budget.hold_before_close() {
                            tokio::spawn(async move {
                                tokio::time::sleep(HOLD_BEFORE_CLOSE).await;
                                drop((stream, held));
                            });
                        }
                        self.note_refusal(peer, refusal);
                    }
                },
                Err(error) => {
                    self.warn(&error);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Logs a refused connection, at most once per [`WARNING_INTERVAL`], with the count since.
    fn note_refusal(&self, peer: SocketAddr, refusal: crate::budget::Refusal) {
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, n_refused) = &mut *refused;
        *n_refused += 1;
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARNING_INTERVAL) {
            let (open, unauthenticated) = self.budget.counts();
            tracing::warn!(
                listener = self.name,
                source = %crate::budget::Source::of(peer.ip()),
                reason = refusal.describe(),
                refused = *n_refused,
                open,
                unauthenticated,
                closed_to_make_room = self.budget.n_evicted(),
                "connection refused (at most one such warning every 10 s)"
            );
            *last = Some(now);
            *n_refused = 0;
        }
    }

    /// Logs a failed accept, at most once per [`WARNING_INTERVAL`], with the count since.
    fn warn(&self, error: &io::Error) {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, failures) = &mut *warned;
        *failures += 1;
        let now = Instant::now();
        if last.is_none_or(|at| now.duration_since(at) >= WARNING_INTERVAL) {
            tracing::warn!(listener = self.name, %error, failures = *failures, "accepting a connection failed; backing off (at most one such warning every 10 s)");
            *last = Some(now);
            *failures = 0;
        }
    }
}

/// An accepted connection: holds its place under the connection limit until dropped, and fails
/// with `TimedOut` once it has neither read nor written for the idle timeout.
pub struct LimitedStream {
    stream: TcpStream,
    place: Option<Place>,
    idle_timeout: Duration,
    /// When bytes last moved; the timer below is re-armed from it only when it fires, so
    /// activity costs a clock read, not a timer update.
    last_active: Instant,
    idle: Pin<Box<Sleep>>,
    /// Once closed to make room: held open until this fires, then closed.
    closing: Option<(Pin<Box<Sleep>>, tokio::sync::OwnedSemaphorePermit)>,
}

impl LimitedStream {
    fn new(stream: TcpStream, place: Option<Place>, idle_timeout: Duration) -> Self {
        LimitedStream {
            stream,
            place,
            idle_timeout,
            last_active: Instant::now(),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            closing: None,
        }
    }

    /// The TCP connection underneath (for its addresses).
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }

    /// What requests on this connection use to mark themselves in flight and authenticated.
    pub fn handle(&self) -> Option<ConnectionHandle> {
        self.place.as_ref().map(Place::handle)
    }

    fn active(&mut self) {
        self.last_active = Instant::now();
    }

    /// Before a read or write: was this connection closed to make room for another? Then one
    /// that never authenticated is held (nothing read or written) for [`HOLD_BEFORE_CLOSE`] if
    /// the listener has room for that, and fails after; an authenticated one fails at once, so
    /// its client learns it is closed before it sends a request nobody will read.
    fn check_evicted(
        &mut self,
        reader: bool,
        context: &mut Context<'_>,
    ) -> Poll<Option<io::Error>> {
        let Some(place) = self.place.as_ref() else {
            return Poll::Ready(None);
        };
        let shared = place.shared();
        shared.register(reader, context.waker());
        if !shared.evicted() {
            return Poll::Ready(None);
        }
        if self.closing.is_none()
            && !shared.authenticated()
            && let Some(held) = place.budget().hold_before_close()
        {
            self.closing = Some((Box::pin(tokio::time::sleep(HOLD_BEFORE_CLOSE)), held));
        }
        if let Some((hold, _)) = self.closing.as_mut()
            && hold.as_mut().poll(context).is_pending()
        {
            return Poll::Pending;
        }
        Poll::Ready(Some(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the connection was closed to make room for another (connection budget)",
        )))
    }

    /// After a pending read or write: has the connection been idle too long, moving no bytes or
    /// carrying no request (pings do not count)?
    fn check_idle(&mut self, context: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            match self.idle.as_mut().poll(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let now = Instant::now();
                    let bytes_deadline = self.last_active + self.idle_timeout;
                    if bytes_deadline <= now {
                        return Poll::Ready(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the connection was idle for longer than the listener's idle timeout",
                        ));
                    }
                    let requests_deadline = self
                        .place
                        .as_ref()
                        .and_then(|place| place.shared().request_idle_deadline(self.idle_timeout));
                    if requests_deadline.is_some_and(|deadline| deadline <= now) {
                        return Poll::Ready(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the connection carried no request for longer than the listener's idle timeout",
                        ));
                    }
                    let deadline = requests_deadline
                        .map_or(bytes_deadline, |deadline| deadline.min(bytes_deadline));
                    self.idle.as_mut().reset(deadline);
                }
            }
        }
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.check_evicted(true, context) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(error)) => return Poll::Ready(Err(error)),
            Poll::Ready(None) => {}
        }
        match Pin::new(&mut this.stream).poll_read(context, buffer) {
            Poll::Ready(result) => {
                this.active();
                Poll::Ready(result)
            }
            Poll::Pending => this.check_idle(context).map(Err),
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.check_evicted(false, context) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(error)) => return Poll::Ready(Err(error)),
            Poll::Ready(None) => {}
        }
        match Pin::new(&mut this.stream).poll_write(context, data) {
            Poll::Ready(result) => {
                this.active();
                Poll::Ready(result)
            }
            Poll::Pending => this.check_idle(context).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.check_evicted(false, context) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(error)) => return Poll::Ready(Err(error)),
            Poll::Ready(None) => {}
        }
        match Pin::new(&mut this.stream).poll_write_vectored(context, buffers) {
            Poll::Ready(result) => {
                this.active();
                Poll::Ready(result)
            }
            Poll::Pending => this.check_idle(context).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How long a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = crate::HEADER_READ_TIMEOUT;
/// Connections handed over but not yet taken by the server.
const HANDED_OVER: usize = 64;

/// After a refused handshake: closes the sending side (the alert saying why is already written)
/// and reads what the client still sends for a moment, so the kernel does not answer it with a
/// reset that would discard the alert before the client reads it.
async fn linger(mut stream: LimitedStream) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::copy(&mut stream, &mut tokio::io::sink()),
    )
    .await;
}

/// An accepted connection, after its TLS handshake when the listener serves TLS.
pub enum Connection {
    Plain(LimitedStream),
    Tls(Box<tokio_rustls::server::TlsStream<LimitedStream>>),
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub local_address: Option<SocketAddr>,
    /// The client certificate verified against the client CA, when one was presented.
    pub certificate: Option<Arc<PresentedCertificate>>,
    /// The connection's place in the listener's budget, for requests to mark themselves in
    /// flight and the connection authenticated.
    pub connection: Option<ConnectionHandle>,
}

/// Accepts connections within [`Limits`] and completes their TLS handshakes concurrently (a
/// slow or silent client holds up only itself), handing over those that are ready.
pub struct Acceptor {
    ready: tokio::sync::mpsc::Receiver<(Connection, Peer)>,
}

impl Acceptor {
    /// Starts accepting on `listener`; `tls` makes every connection a TLS one.
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        name: &'static str,
        tls: Option<(Arc<TlsMaterial>, crate::tls::Listener)>,
    ) -> Acceptor {
        let (sender, ready) = tokio::sync::mpsc::channel(HANDED_OVER);
        let listener = LimitedListener::new(listener, limits, name);
        tokio::spawn(async move {
            loop {
                let (stream, address) = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = sender.closed() => return,
                };
                let local_address = stream.tcp().local_addr().ok();
                let connection = stream.handle();
                let Some((material, which)) = &tls else {
                    let peer = Peer {
                        address,
                        local_address,
                        certificate: None,
                        connection,
                    };
                    if sender
                        .send((Connection::Plain(stream), peer))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                };
                let (server_config, authorities) = material.for_handshake(*which);
                let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
                let sender = sender.clone();
                tokio::spawn(async move {
                    let handshake = acceptor.accept(stream).into_fallible();
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err((error, stream))) => {
                            tracing::debug!(listener = name, %address, %error, "TLS handshake failed");
                            linger(stream).await;
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %address, "TLS handshake not completed in time");
                            return;
                        }
                    };
                    let certificate = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| crate::tls::presented_certificate(chain, &authorities))
                        .map(Arc::new);
                    let peer = Peer {
                        address,
                        local_address,
                        certificate,
                        connection,
                    };
                    let _ = sender.send((Connection::Tls(Box::new(stream)), peer)).await;
                });
            }
        });
        Acceptor { ready }
    }

    /// The next ready connection; `None` only if the accepting task ended.
    pub async fn accept(&mut self) -> Option<(Connection, Peer)> {
        self.ready.recv().await
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_write(context, data),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_flush(context),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            Connection::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(stream) => Pin::new(stream).poll_write_vectored(context, buffers),
            Connection::Tls(stream) => {
                Pin::new(stream.as_mut()).poll_write_vectored(context, buffers)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(stream) => stream.is_write_vectored(),
            Connection::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
