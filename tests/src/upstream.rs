//! A real HTTP upstream for gateway tests: records every request it receives, answers REST and
//! GraphQL calls, streams on request, and can be slow on purpose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{Notify, mpsc};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, exactly as received.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// The upstream; stops when dropped.
pub struct Upstream {
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Releases the second chunk of `/stream`.
    pub release_stream: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let address = listener.local_addr().expect("upstream address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let release_stream = Arc::new(Notify::new());
        let (task_seen, task_release) = (seen.clone(), release_stream.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, release) = (task_seen.clone(), task_release.clone());
                let service = hyper::service::service_fn(move |request| {
                    answer(request, seen.clone(), release.clone())
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            address,
            seen,
            release_stream,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn answer(
    request: http::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<Notify>,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(ToString::to_string)
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    seen.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(Seen {
            method: parts.method.to_string(),
            target: target.clone(),
            headers,
            body,
        });
    let path = parts.uri.path();
    let n_hooks = seen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .filter(|seen| seen.target.starts_with("/hook-flaky"))
        .count();
    let response = if path == "/hook-flaky" && n_hooks == 1 {
        // A webhook receiver that fails its first delivery, to prove retries.
        let mut response = text("not yet\n");
        *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        response
    } else if path.ends_with("/stream") {
        let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            let _ = sender
                .send(Ok(Frame::data(Bytes::from(stream_first()))))
                .await;
            release.notified().await;
            let _ = sender
                .send(Ok(Frame::data(Bytes::from_static(b"second\n"))))
                .await;
        });
        http::Response::new(BodyExt::boxed(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    } else if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(10)).await;
        text("slow\n")
    } else if path.ends_with("/graphql/v2") {
        let mut response = text(r#"{"data":{"ok":true}}"#);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    } else {
        let mut response = text(
            &serde_json::json!({"method": parts.method.as_str(), "target": target}).to_string(),
        );
        response.headers_mut().insert(
            http::header::SET_COOKIE,
            http::HeaderValue::from_static("session=upstream"),
        );
        response
    };
    Ok(response)
}

/// The first chunk `/stream` sends: longer than the gateway's masking window (4 KiB), so part of
/// it reaches the agent before the second chunk is released.
pub fn stream_first() -> Vec<u8> {
    let mut first = b"first ".to_vec();
    first.extend(std::iter::repeat_n(b'x', 14_000));
    first.push(b'\n');
    first
}

fn text(body: &str) -> http::Response<Body> {
    http::Response::new(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
}

/// A minimal HTTP/1.1 client that sends the request target byte for byte (no normalisation),
/// for tests that smuggle paths.
pub async fn raw_request(
    address: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = raw_exchange(address, method, target, headers, body).await;
    (status, body)
}

/// [`raw_request`], with the answer's header lines (`name: value`, as sent).
pub async fn raw_exchange(
    address: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect to the gateway");
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    stream.write_all(body).await.expect("send body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    (status, head.to_string(), body.to_string())
}

/// A gateway answer, read whole.
pub struct Call {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Call {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// One HTTP call with a bearer token, answered in full. A body is sent as JSON unless `extra`
/// names another content type.
pub async fn call(
    gateway: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> Call {
    let client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    > = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{gateway}{path}"))
        .header("authorization", format!("Bearer {token}"));
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let typed = extra
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    if !body.is_empty() && !typed {
        request = request.header("content-type", "application/json");
    }
    let response = client
        .request(
            request
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
    Call {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}
