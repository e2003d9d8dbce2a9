//! Keeping the root credential out of what the agent receives: an upstream that echoes the
//! request (an error page quoting the URL with an `api_key`, a debug endpoint reflecting headers)
//! would otherwise hand the agent the very secret the gateway exists to keep from it. Every
//! occurrence is overwritten with `*` of the same length, so lengths and framing stay valid, in
//! headers and across the chunks of a streamed body.

use bytes::{Bytes, BytesMut};

/// Replaces the secret in a stream of chunks, holding back only a tail that could be the start
/// of a secret split across two chunks.
pub struct Masker {
    needles: Vec<Vec<u8>>,
    held: BytesMut,
}

impl Masker {
    /// Masks each of `needles` (empty ones are ignored).
    pub fn new(needles: Vec<Vec<u8>>) -> Masker {
        Masker {
            needles: needles
                .into_iter()
                .filter(|needle| !needle.is_empty())
                .collect(),
            held: BytesMut::new(),
        }
    }

    /// Takes the next chunk; returns what can be sent now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.needles.is_empty() {
            return Bytes::copy_from_slice(chunk);
        }
        self.held.extend_from_slice(chunk);
        for needle in &self.needles {
            mask_all(&mut self.held, needle);
        }
        let keep = self
            .needles
            .iter()
            .map(|needle| partial_suffix(&self.held, needle))
            .max()
            .unwrap_or(0);
        let ready = self.held.len() - keep;
        self.held.split_to(ready).freeze()
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }

    /// Masks a complete value (a header).
    pub fn mask_once(&self, value: &[u8]) -> Option<Vec<u8>> {
        let mut buffer = BytesMut::from(value);
        let mut changed = false;
        for needle in &self.needles {
            changed |= mask_all(&mut buffer, needle);
        }
        changed.then(|| buffer.to_vec())
    }
}

fn mask_all(buffer: &mut BytesMut, needle: &[u8]) -> bool {
    let mut changed = false;
    let mut start = 0;
    while let Some(position) = find(&buffer[start..], needle) {
        let at = start + position;
        buffer[at..at + needle.len()].fill(b'*');
        start = at + needle.len();
        changed = true;
    }
    changed
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The length of the longest suffix of `data` that is a proper prefix of `needle`.
fn partial_suffix(data: &[u8], needle: &[u8]) -> usize {
    let longest = (needle.len() - 1).min(data.len());
    (1..=longest)
        .rev()
        .find(|&length| data[data.len() - length..] == needle[..length])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunks: &[&str]) -> String {
        let mut masker = Masker::new(vec![b"SECRET42".to_vec()]);
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&masker.push(chunk.as_bytes()));
        }
        out.extend_from_slice(&masker.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn secrets_are_masked_whole_and_across_chunk_boundaries_keeping_the_length() {
        assert_eq!(stream(&["key=SECRET42&x=1"]), "key=********&x=1");
        assert_eq!(stream(&["key=SEC", "RET42", "!"]), "key=********!");
        assert_eq!(
            stream(&["S", "E", "C", "R", "E", "T", "4", "2"]),
            "********"
        );
        assert_eq!(stream(&["SECRET4", "3 is not it"]), "SECRET43 is not it");
        assert_eq!(stream(&["SECRET42SECRET42"]), "****************");
    }

    #[test]
    fn text_that_cannot_start_a_secret_is_not_held_back() {
        let mut masker = Masker::new(vec![b"SECRET42".to_vec()]);
        assert_eq!(&masker.push(b"first\n")[..], b"first\n");
        assert_eq!(&masker.push(b"ends with SE")[..], b"ends with ");
        assert_eq!(&masker.finish()[..], b"SE");
    }

    #[test]
    fn header_values_are_masked() {
        let masker = Masker::new(vec![b"SECRET42".to_vec()]);
        assert_eq!(
            masker.mask_once(b"https://x/?k=SECRET42"),
            Some(b"https://x/?k=********".to_vec())
        );
        assert_eq!(masker.mask_once(b"clean"), None);
    }
}
