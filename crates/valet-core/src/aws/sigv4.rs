//! AWS Signature Version 4: the `Authorization` header for one request, computed with ring's
//! HMAC-SHA256. Valet signs only its own calls to STS and IAM, so the request shape is fixed
//! (a path, an optional query already in canonical form, a few headers and a body).

use ring::{digest, hmac};

use crate::Secret;
use crate::UnixTime;

/// The parts of a request that are signed.
pub struct Request<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// URI-encoded path, `/` for the Query API.
    pub path: &'a str,
    /// Canonical query string (`a=1&b=2`, names sorted, RFC 3986 encoded); empty for none.
    pub query: &'a str,
    /// Extra headers to sign besides `host` and `x-amz-date` (and the session token).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Who signs, and for which region and service.
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a Secret,
    /// Set when signing with temporary credentials.
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub service: &'a str,
}

/// The headers to add to the request: `x-amz-date`, `authorization`, and `x-amz-security-token`
/// when signing with a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub headers: Vec<(&'static str, String)>,
}

/// Signs `request` at time `at`.
pub fn sign(request: &Request<'_>, signer: &Signer<'_>, at: UnixTime) -> Signed {
    let amz_date = amz_date(at);
    let date = &amz_date[..8];
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), canonical_value(value)))
        .collect();
    headers.push(("host".into(), request.host.to_string()));
    headers.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(token) = signer.session_token {
        headers.push(("x-amz-security-token".into(), token.to_string()));
    }
    headers.sort();
    let canonical_headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();
    let signed_headers = headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        request.method,
        request.path,
        request.query,
        sha256_hex(request.body)
    );
    let credential_scope = format!("{date}/{}/{}/aws4_request", signer.region, signer.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{credential_scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let key = signing_key(
        signer.secret_access_key,
        date,
        signer.region,
        signer.service,
    );
    let signature = hex::encode(hmac::sign(&key, string_to_sign.as_bytes()));
    let mut out = vec![
        ("x-amz-date", amz_date),
        (
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
                signer.access_key_id
            ),
        ),
    ];
    if let Some(token) = signer.session_token {
        out.push(("x-amz-security-token", token.to_string()));
    }
    Signed { headers: out }
}

/// `YYYYMMDD'T'HHMMSS'Z'` in UTC.
pub fn amz_date(at: UnixTime) -> String {
    // format_time gives "YYYY-MM-DDTHH:MM:SSZ"; drop the separators.
    crate::clock::format_time(at)
        .chars()
        .filter(|character| *character != '-' && *character != ':')
        .collect()
}

fn signing_key(secret: &Secret, date: &str, region: &str, service: &str) -> hmac::Key {
    let mut first = b"AWS4".to_vec();
    first.extend_from_slice(secret.expose());
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let date_key = step(&first, date);
    first.iter_mut().for_each(|byte| *byte = 0);
    let region_key = step(date_key.as_ref(), region);
    let service_key = step(region_key.as_ref(), service);
    let signing = step(service_key.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, signing.as_ref())
}

/// Trims a header value and folds runs of spaces into one, as SigV4 canonicalisation asks.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published example (IAM ListUsers, 2015-08-30T12:36:00Z).
    #[test]
    fn matches_the_example_in_the_aws_documentation() {
        let secret = Secret::from("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_string());
        let request = Request {
            method: "GET",
            host: "iam.amazonaws.com",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &[(
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            body: b"",
        };
        let signer = Signer {
            access_key_id: "AKIDEXAMPLE",
            secret_access_key: &secret,
            session_token: None,
            region: "us-east-1",
            service: "iam",
        };
        let signed = sign(&request, &signer, 1_440_938_160);
        assert_eq!(
            signed.headers[0],
            ("x-amz-date", "20150830T123600Z".to_string())
        );
        assert_eq!(
            signed.headers[1].1,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn a_session_token_is_signed_and_sent() {
        let secret = Secret::from("secret".to_string());
        let signer = Signer {
            access_key_id: "ASIAEXAMPLE",
            secret_access_key: &secret,
            session_token: Some("token-value"),
            region: "eu-west-1",
            service: "sts",
        };
        let request = Request {
            method: "POST",
            host: "sts.eu-west-1.amazonaws.com",
            path: "/",
            query: "",
            headers: &[],
            body: b"Action=GetCallerIdentity&Version=2011-06-15",
        };
        let signed = sign(&request, &signer, 1_700_000_000);
        assert!(
            signed.headers[1]
                .1
                .contains("SignedHeaders=host;x-amz-date;x-amz-security-token,")
        );
        assert_eq!(
            signed.headers[2],
            ("x-amz-security-token", "token-value".to_string())
        );
    }

    #[test]
    fn header_values_are_trimmed_and_folded() {
        assert_eq!(canonical_value("  a   b  c "), "a b c");
    }
}
