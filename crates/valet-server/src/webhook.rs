//! One JSON POST to a webhook (http or https, public web roots), bounded in time.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Posts `body` to `url`; `Ok(status)` for a 2xx answer, otherwise what went wrong.
pub async fn post_json(url: &str, body: &str) -> Result<u16, String> {
    let client = crate::https::client()?;
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "valetd")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|error| error.to_string())?;
    match tokio::time::timeout(TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(Ok(response)) => Err(format!("the webhook answered {}", response.status())),
        Ok(Err(error)) => Err(format!("the webhook could not be reached: {error}")),
        Err(_) => Err(format!(
            "the webhook did not answer within {} s",
            TIMEOUT.as_secs()
        )),
    }
}
