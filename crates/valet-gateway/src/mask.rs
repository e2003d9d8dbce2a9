//! Keeping the root credential out of what the agent receives, without the response path itself
//! telling anything about it. An upstream that echoes the request (an error page quoting the URL
//! with an `api_key`, a debug endpoint reflecting headers, CI logs the agent can write into) would
//! otherwise hand the agent the very secret the gateway exists to keep from it.
//!
//! Every complete occurrence of the secret, in each encoding an upstream may write it in, becomes
//! one fixed [`MARKER`] — whatever the secret's length. And nothing else the masker does depends on
//! the secret: a streamed body is held back by a fixed [`WINDOW`] of bytes, the same for every
//! secret, and released exactly as the upstream's chunks arrive; it never holds back "a tail that
//! could start the secret", which would tell an agent choosing the bytes whether its guess is a
//! prefix of the secret. Two runs that differ only in the secret (its length too) produce the same
//! bytes in the same chunks, but where a complete occurrence was replaced by the marker.

use bytes::{Bytes, BytesMut};

/// What every complete occurrence of the secret becomes.
pub const MARKER: &[u8] = b"[masked by valet]";

/// How many bytes of a streamed body are held back until more arrive or the body ends: enough
/// for the longest form of the longest secret the gateway masks ([`MAX_SECRET_BYTES`]), and the
/// same whatever the secret is.
pub const WINDOW: usize = 4096;

/// The longest root credential the gateway masks (valetd refuses a longer one for an upstream at
/// start): its longest encoding (every byte percent-encoded, three bytes a byte) fits in
/// [`WINDOW`].
pub const MAX_SECRET_BYTES: usize = valet_core::config::MAX_MASKED_CREDENTIAL_BYTES;

/// A needle longer than the window could straddle what was released and what is held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the root credential is {0} bytes in one of its encodings; the gateway masks credentials of at most {MAX_SECRET_BYTES} bytes"
)]
pub struct TooLong(pub usize);

/// Replaces the secret in a stream of chunks (see the module's description).
pub struct Masker {
    needles: Vec<memchr::memmem::Finder<'static>>,
    held: BytesMut,
    /// Where in `held` an occurrence not yet replaced may begin: before it, every occurrence is
    /// already the marker.
    scan_from: usize,
}

impl Masker {
    /// Masks each of `needles` (empty ones are ignored); a needle longer than [`WINDOW`] is refused.
    pub fn new(needles: Vec<Vec<u8>>) -> Result<Masker, TooLong> {
        let mut finders = Vec::new();
        for needle in needles.into_iter().filter(|needle| !needle.is_empty()) {
            if needle.len() > WINDOW {
                return Err(TooLong(needle.len()));
            }
            finders.push(memchr::memmem::Finder::new(&needle).into_owned());
        }
        Ok(Masker {
            needles: finders,
            held: BytesMut::new(),
            scan_from: 0,
        })
    }

    /// Takes the next chunk; returns what can be released now: everything but the last
    /// [`WINDOW`] bytes, with every complete occurrence replaced. How much is released depends on
    /// the chunk's size only.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        self.replace_complete();
        let release = self.held.len().saturating_sub(WINDOW);
        self.scan_from = self.scan_from.saturating_sub(release);
        self.held.split_to(release).freeze()
    }

    /// What is left at the end of the stream, masked.
    pub fn finish(&mut self) -> Bytes {
        self.replace_complete();
        self.scan_from = 0;
        std::mem::take(&mut self.held).freeze()
    }

    /// Masks a complete value (a header, a whole body, one event).
    pub fn mask_whole(&self, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len());
        let mut at = 0;
        while let Some((start, length)) = self.first_occurrence(&value[at..]) {
            out.extend_from_slice(&value[at..at + start]);
            out.extend_from_slice(MARKER);
            at += start + length;
        }
        out.extend_from_slice(&value[at..]);
        out
    }

    /// Replaces every complete occurrence in `held` from `scan_from` on.
    fn replace_complete(&mut self) {
        let mut at = self.scan_from;
        let mut masked = BytesMut::with_capacity(0);
        let mut changed = false;
        while let Some((start, length)) = self.first_occurrence(&self.held[at..]) {
            if !changed {
                masked = BytesMut::from(&self.held[..at]);
                changed = true;
            }
            masked.extend_from_slice(&self.held[at..at + start]);
            masked.extend_from_slice(MARKER);
            at += start + length;
        }
        if changed {
            masked.extend_from_slice(&self.held[at..]);
            let tail = self.held.len() - at;
            self.held = masked;
            // Past the last marker, an occurrence may still be completed by the next chunk.
            self.scan_from = self.held.len() - tail;
        }
    }

    /// The leftmost occurrence of any needle in `haystack` (the longest where two start at once).
    fn first_occurrence(&self, haystack: &[u8]) -> Option<(usize, usize)> {
        self.needles
            .iter()
            .filter_map(|finder| {
                finder
                    .find(haystack)
                    .map(|start| (start, finder.needle().len()))
            })
            .min_by_key(|(start, length)| (*start, std::cmp::Reverse(*length)))
    }
}

/// Every form an upstream may write `secret` in: raw; percent-encoded (upper- and lower-case
/// hex; unreserved characters as they are, or every byte encoded); JSON-escaped (also with `/` as `\/`, as PHP writes it); HTML-escaped; and base64 (the
/// standard and URL-safe alphabets, at each of the three alignments a secret can have inside a
/// longer encoded text — so a reflected `Authorization: Basic …` is caught too).
pub fn needles_of(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut needles = vec![secret.to_vec()];
    let percent = |upper: bool| {
        let mut out = String::new();
        for &byte in secret {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(byte));
            } else if upper {
                out.push_str(&format!("%{byte:02X}"));
            } else {
                out.push_str(&format!("%{byte:02x}"));
            }
        }
        out.into_bytes()
    };
    needles.push(percent(true));
    needles.push(percent(false));
    // Some encoders write every byte as %XX.
    for upper in [true, false] {
        let every: String = secret
            .iter()
            .map(|byte| {
                if upper {
                    format!("%{byte:02X}")
                } else {
                    format!("%{byte:02x}")
                }
            })
            .collect();
        needles.push(every.into_bytes());
    }
    if let Ok(text) = std::str::from_utf8(secret) {
        let json = serde_json::to_string(text).unwrap_or_default();
        let json = json.trim_matches('"').to_string();
        needles.push(json.replace('/', "\\/").into_bytes());
        needles.push(json.into_bytes());
        let html = text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;");
        needles.push(html.into_bytes());
    }
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ] {
        for offset in 0..3usize {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(secret);
            let encoded = engine.encode(&shifted);
            let unpadded = encoded.trim_end_matches('=');
            // The characters every bit of which comes from the secret; and, for a secret that
            // ends the encoded text (`user:secret`), those up to the end, with and without the
            // padding (whose length would tell the secret's length).
            let first = (offset * 8).div_ceil(6);
            let last = ((offset + secret.len()) * 8) / 6;
            if last > first + 3 {
                needles.push(encoded.as_bytes()[first..last].to_vec());
                needles.push(unpadded.as_bytes()[first..].to_vec());
                needles.push(encoded.as_bytes()[first..].to_vec());
            }
        }
    }
    needles.sort();
    needles.dedup();
    needles
}

#[cfg(test)]
mod tests;
