//! A hostile client's tools, for the end-to-end tests and `valet-bench hostile`: connections from
//! any loopback address (127.0.0.0/8 gives many), and raw HTTP/2 clients that hold a connection
//! without doing what a real client would — only pinging, or sending a request whose body never
//! ends and whose answer they never let through.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The `n`th attacker address of `block`: 127.`block`.x.y, never 127.0.0.1 (the legitimate
/// client's).
pub fn address(block: u8, n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        block,
        ((n / 250) % 250) as u8 + 1,
        (n % 250) as u8 + 2,
    ))
}

/// A TCP connection to `target` from the loopback address `source`, within 2 s.
pub async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
fn preface() -> Vec<u8> {
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    opening
}

/// An HTTP/2 client that sends no request: it answers the server's SETTINGS and PINGs and pings
/// on its own every `every` (so bytes always move). Returns once the server closes the
/// connection.
pub async fn ping_only(stream: TcpStream, every: Duration) {
    speak(stream, preface(), Some(every)).await;
}

/// An HTTP/2 client that sends one gRPC request to `path` (with `key` as its bearer, if any)
/// whose body never ends, and would never let an answer through (its receive window is zero),
/// answering the server's pings so bytes keep moving. Returns once the server closes the
/// connection.
pub async fn hold_request(stream: TcpStream, path: &str, key: Option<&str>) {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "valet"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.extend(literal(name, value));
    }
    if let Some(key) = key {
        block.extend(literal("authorization", &format!("Bearer {key}")));
    }
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: INITIAL_WINDOW_SIZE (4) = 0.
    opening.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
    // HEADERS on stream 1, END_HEADERS, no END_STREAM: the body never ends.
    let length = block.len();
    opening.extend_from_slice(&[0, (length >> 8) as u8, length as u8, 1, 4, 0, 0, 0, 1]);
    opening.extend_from_slice(&block);
    speak(stream, opening, None).await;
}

/// One HPACK header field, literal and not indexed (lengths under 127).
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut field = vec![0, name.len() as u8];
    field.extend_from_slice(name.as_bytes());
    field.push(value.len() as u8);
    field.extend_from_slice(value.as_bytes());
    field
}

/// Writes `opening`, then acknowledges the server's SETTINGS and PINGs (and pings every
/// `ping_every`, if set) until either side closes.
async fn speak(mut stream: TcpStream, opening: Vec<u8>, ping_every: Option<Duration>) {
    if stream.write_all(&opening).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut to_send) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let read = async move {
        let mut header = [0u8; 9];
        while reader.read_exact(&mut header).await.is_ok() {
            let length = (usize::from(header[0]) << 16)
                | (usize::from(header[1]) << 8)
                | usize::from(header[2]);
            let mut payload = vec![0u8; length];
            if reader.read_exact(&mut payload).await.is_err() {
                return;
            }
            let reply = match (header[3], header[4] & 1) {
                (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                (6, 0) => [vec![0, 0, 8, 6, 1, 0, 0, 0, 0], payload].concat(),
                _ => continue,
            };
            if replies.send(reply).await.is_err() {
                return;
            }
        }
    };
    let write = async move {
        let mut ticks = tokio::time::interval(ping_every.unwrap_or(Duration::from_secs(3600)));
        ticks.tick().await;
        loop {
            let frame = tokio::select! {
                _ = ticks.tick(), if ping_every.is_some() => {
                    vec![0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
                }
                reply = to_send.recv() => match reply { Some(reply) => reply, None => return },
            };
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = read => {}
        () = write => {}
    }
}
