//! Keeping the root credential out of what the agent receives, without the response path itself
//! telling anything about it. An upstream that echoes the request (an error page quoting the URL
//! with an `api_key`, a debug endpoint reflecting headers, CI logs the agent can write into) would
//! otherwise hand the agent the very secret the gateway exists to keep from it.
//!
//! Every complete occurrence of the secret becomes one fixed [`MARKER`], whatever the secret's
//! length, in every form an upstream writes it: byte by byte raw, percent-encoded, JSON-escaped
//! (at up to two levels of nesting) or HTML-escaped, in any mixture, as decoders accept them; and
//! base64 (standard and URL-safe) at each alignment, the characters it shares with its neighbours
//! included. Nothing else the masker does depends on the secret: a streamed body is held back by a
//! fixed [`WINDOW`] — every position is decided once the window has passed it, whatever its bytes —
//! and released in blocks of exactly [`BLOCK`] bytes, so neither where a chunk ends nor how long it
//! is tells an agent anything (holding back "a tail that could start the secret" told an agent
//! choosing the bytes whether its guess was a prefix; releasing what each upstream frame freed told
//! it the secret's length).

use bytes::{Bytes, BytesMut};

/// What every complete occurrence of the secret becomes.
pub const MARKER: &[u8] = b"[masked by valet]";

/// How many bytes of a streamed body are held back before a position is decided: more than the
/// longest form of the longest secret the gateway masks (each byte escaped: nine bytes a byte),
/// and the same whatever the secret is.
pub const WINDOW: usize = 8192;

/// The size of every chunk a streamed body is released in (the last one aside).
pub const BLOCK: usize = 4096;

/// The longest root credential the gateway masks (valetd refuses a longer one for an upstream at
/// start).
pub const MAX_SECRET_BYTES: usize = valet_core::config::MAX_MASKED_CREDENTIAL_BYTES;

/// Longest form one secret byte takes: four backslashes (two levels of JSON) and `u00XX`, or the
/// eight backslashes of a backslash at three levels.
const MAX_BYTE_FORM: usize = 9;

/// A secret the gateway cannot mask within its window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the root credential is {0} bytes; the gateway masks credentials of at most {MAX_SECRET_BYTES} bytes"
)]
pub struct TooLong(pub usize);

/// Replaces the secret in a stream of chunks (see the module's description).
pub struct Masker {
    secret: Vec<u8>,
    base64: Vec<Base64Form>,
    held: BytesMut,
    /// Positions of `held` before this one are decided (masked or clean).
    decided: usize,
    /// After a base64 occurrence, the rest of its text goes too (see [`Base64Form`]): which
    /// alphabet, and how many more characters at most.
    absorbing: Option<(usize, usize)>,
}

/// What is at one position, as far as the bytes there tell.
enum Found {
    /// An occurrence ends here (exclusive); a base64 one names its form.
    Occurrence(usize, Option<usize>),
    /// No occurrence starts here.
    Nothing,
    /// The bytes run out before it can be told.
    Undecided,
}

impl Masker {
    /// A masker for `secret`; a secret too long to mask within the window is refused.
    pub fn new(secret: &[u8]) -> Result<Masker, TooLong> {
        if secret.len() > MAX_SECRET_BYTES {
            return Err(TooLong(secret.len()));
        }
        debug_assert!(secret.len() * MAX_BYTE_FORM + BASE64_TAIL < WINDOW);
        Ok(Masker {
            base64: if secret.is_empty() {
                Vec::new()
            } else {
                base64_forms(secret)
            },
            secret: secret.to_vec(),
            held: BytesMut::new(),
            decided: 0,
            absorbing: None,
        })
    }

    /// Takes the next chunk; returns what can be released now: the whole blocks of bytes that lie
    /// at least [`WINDOW`] behind the end, every complete occurrence replaced. An occurrence is
    /// replaced the moment it is complete, so what is held is the same whatever the secret was;
    /// how much leaves depends on that, never on whether what is held could begin the secret.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        self.scan(false);
        let release = self.held.len().saturating_sub(WINDOW) / BLOCK * BLOCK;
        // A position a window behind the end is always decided: every form fits in the window.
        debug_assert!(self.decided >= release);
        self.decided = self.decided.saturating_sub(release);
        self.held.split_to(release).freeze()
    }

    /// What is left at the end of the stream, masked.
    pub fn finish(&mut self) -> Bytes {
        self.scan(true);
        self.decided = 0;
        self.absorbing = None;
        std::mem::take(&mut self.held).freeze()
    }

    /// Masks a complete value (a header, a whole body, one event).
    pub fn mask_whole(&self, value: &[u8]) -> Vec<u8> {
        let mut whole = Masker {
            secret: self.secret.clone(),
            base64: Vec::new(),
            held: BytesMut::from(value),
            decided: 0,
            absorbing: None,
        };
        whole.base64 = base64_forms_of(&self.base64);
        whole.scan(true);
        whole.held.to_vec()
    }

    /// Replaces every complete occurrence from the first undecided position on, and decides
    /// what can be; with `at_end`, the bytes end here and everything is decided.
    fn scan(&mut self, at_end: bool) {
        let mut at = self.decided;
        let mut first_undecided = None;
        while at < self.held.len() {
            if let Some((form, remaining)) = self.absorbing {
                match self.absorbable(at, form, remaining, at_end) {
                    Some(0) => self.absorbing = None,
                    Some(taken) => {
                        let rest = self.held.split_off(at);
                        self.held.extend_from_slice(&rest[taken..]);
                        self.absorbing = Some((form, remaining - taken));
                        continue;
                    }
                    // Whether the secret begins here, where the text would end, cannot be told
                    // yet: wait for more.
                    None => {
                        first_undecided.get_or_insert(at);
                        break;
                    }
                }
            }
            match self.find_at(&self.held, at, at_end) {
                Found::Occurrence(end, base64) => {
                    let rest = self.held.split_off(at);
                    self.held.extend_from_slice(MARKER);
                    self.held.extend_from_slice(&rest[end - at..]);
                    at += MARKER.len();
                    self.absorbing = base64.map(|form| (form, BASE64_TAIL));
                }
                Found::Nothing => at += 1,
                Found::Undecided => {
                    first_undecided.get_or_insert(at);
                    at += 1;
                }
            }
        }
        self.decided = first_undecided.unwrap_or(self.held.len());
    }

    /// How many characters at `at` belong to the base64 text an occurrence was found in: its
    /// alphabet and padding, up to `remaining`, stopping where the secret begins in another form.
    /// `None` when that cannot be told yet.
    fn absorbable(&self, at: usize, form: usize, remaining: usize, at_end: bool) -> Option<usize> {
        let mut taken = 0;
        while taken < remaining {
            let Some(character) = self.held.get(at + taken) else {
                return if at_end { Some(taken) } else { None };
            };
            if !(self.base64[form].alphabet[usize::from(*character)] || *character == b'=') {
                break;
            }
            match escaped_match(&self.held, at + taken, &self.secret) {
                Found::Occurrence(..) => break,
                Found::Undecided if !at_end => return None,
                _ => taken += 1,
            }
        }
        Some(taken)
    }

    /// Whether an occurrence of the secret, in any form, starts at `at` of `haystack`.
    fn find_at(&self, haystack: &[u8], at: usize, at_end: bool) -> Found {
        if self.secret.is_empty() {
            return Found::Nothing;
        }
        let mut undecided = false;
        let first = haystack[at];
        // Every form of a byte starts with the byte itself or one of these.
        if first == self.secret[0] || matches!(first, b'%' | b'\\' | b'&') {
            match escaped_match(haystack, at, &self.secret) {
                Found::Occurrence(end, _) => return Found::Occurrence(end, None),
                Found::Undecided => undecided = true,
                Found::Nothing => {}
            }
        }
        for (index, form) in self.base64.iter().enumerate() {
            match form.match_at(haystack, at) {
                Found::Occurrence(end, _) => return Found::Occurrence(end, Some(index)),
                Found::Undecided => undecided = true,
                Found::Nothing => {}
            }
        }
        if undecided && !at_end {
            Found::Undecided
        } else {
            Found::Nothing
        }
    }
}

/// Every way one byte may be written, as decoders read it: itself; percent-encoded (either case
/// of hex); JSON-escaped (`\uXXXX` in either case, the short escapes, `\/`), with the escape's
/// backslash itself escaped once or twice (JSON inside JSON); HTML character references
/// (decimal, hex, the named five).
fn byte_forms(byte: u8, haystack: &[u8], at: usize, ends: &mut Vec<usize>, short: &mut bool) {
    let rest = &haystack[at..];
    let mut take = |length: usize| ends.push(at + length);
    if rest.first() == Some(&byte) {
        take(1);
    }
    // Percent-encoded.
    match rest {
        [b'%', high, low, ..] if hex_value(*high, *low) == Some(byte) => take(3),
        [b'%'] | [b'%', _] => *short = true,
        _ => {}
    }
    // JSON escapes, at any of the first levels of nesting (JSON in a JSON string escapes the
    // backslash again): `\"` at level one is `\\\"` at level two.
    let backslashes = rest
        .iter()
        .take(9)
        .take_while(|character| **character == b'\\')
        .count();
    if backslashes > 0 {
        if backslashes == rest.len() {
            *short = true;
        } else if byte == b'\\' {
            for run in [2usize, 4, 8] {
                if backslashes >= run {
                    take(run);
                }
            }
        } else {
            let short_escape = match byte {
                b'"' => Some(b'"'),
                b'/' => Some(b'/'),
                0x08 => Some(b'b'),
                0x0c => Some(b'f'),
                b'\n' => Some(b'n'),
                b'\r' => Some(b'r'),
                b'\t' => Some(b't'),
                _ => None,
            };
            let after = &rest[backslashes..];
            match after[0] {
                escape if Some(escape) == short_escape && backslashes <= 7 => take(backslashes + 1),
                b'u' if byte < 0x80 && backslashes <= 4 => match &after[1..] {
                    [a, b, c, d, ..]
                        if hex_value(*a, *b) == Some(0) && hex_value(*c, *d) == Some(byte) =>
                    {
                        take(backslashes + 5)
                    }
                    partial if partial.len() < 4 => *short = true,
                    _ => {}
                },
                _ => {}
            }
        }
    }
    // HTML character references.
    if rest.first() == Some(&b'&') {
        let named: &[u8] = match byte {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            b'\'' => b"&apos;",
            _ => b"",
        };
        if !named.is_empty() {
            if rest.starts_with(named) {
                take(named.len());
            } else if named.starts_with(rest) {
                *short = true;
            }
        }
        if let Some(length) = numeric_reference(rest, byte, short) {
            take(length);
        }
    }
}

/// `&#NN;` or `&#xHH;` (up to three leading zeros) naming `byte`: its length.
fn numeric_reference(rest: &[u8], byte: u8, short: &mut bool) -> Option<usize> {
    if rest == b"&" {
        *short = true;
        return None;
    }
    let body = rest.strip_prefix(b"&#")?;
    let (digits, radix, prefix) = match body.first() {
        Some(b'x' | b'X') => (&body[1..], 16, 3),
        _ => (body, 10, 2),
    };
    let count = digits
        .iter()
        .take(6)
        .take_while(|digit| char::from(**digit).is_digit(radix))
        .count();
    if count == digits.len() {
        *short = true;
        return None;
    }
    if count == 0 || count > 6 || digits[count] != b';' {
        return None;
    }
    let text = std::str::from_utf8(&digits[..count]).ok()?;
    (u32::from_str_radix(text, radix).ok()? == u32::from(byte)).then_some(prefix + count + 1)
}

fn hex_value(high: u8, low: u8) -> Option<u8> {
    let digit = |character: u8| (character as char).to_digit(16);
    Some((digit(high)? * 16 + digit(low)?) as u8)
}

/// The secret written byte by byte in any mixture of its forms, starting at `at`: the shortest
/// occurrence's end.
fn escaped_match(haystack: &[u8], at: usize, secret: &[u8]) -> Found {
    let mut positions = vec![at];
    let mut short = false;
    for &byte in secret {
        let mut next = Vec::new();
        for &position in &positions {
            if position >= haystack.len() {
                short = true;
                continue;
            }
            byte_forms(byte, haystack, position, &mut next, &mut short);
        }
        next.sort_unstable();
        next.dedup();
        if next.is_empty() {
            return if short {
                Found::Undecided
            } else {
                Found::Nothing
            };
        }
        positions = next;
    }
    Found::Occurrence(positions[0], None)
}

/// The secret in base64 at one alignment: the characters only it determines, and the classes of
/// the characters it shares with what comes before and after (each shows some bits of the
/// secret's first or last byte, so they are masked with it), then any padding.
struct Base64Form {
    lead: Option<[bool; 256]>,
    core: Vec<u8>,
    /// The alphabet's characters: what follows the secret in its text (the shared trailing
    /// character, the rest encoded at an alignment the secret's length decides, the padding that
    /// tells that length) is absorbed with it.
    alphabet: [bool; 256],
}

/// How much of a base64 text after the secret is masked with it.
const BASE64_TAIL: usize = 2048;

fn base64_forms(secret: &[u8]) -> Vec<Base64Form> {
    use base64::Engine;
    let mut forms = Vec::new();
    for (engine, alphabet) in [
        (
            base64::engine::general_purpose::STANDARD_NO_PAD,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        ),
        (
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        ),
    ] {
        for offset in 0..3usize {
            let mut shifted = vec![0u8; offset];
            shifted.extend_from_slice(secret);
            shifted.push(0);
            let encoded = engine.encode(&shifted);
            let encoded = encoded.as_bytes();
            let (start_bit, end_bit) = (offset * 8, (offset + secret.len()) * 8);
            let first_whole = start_bit.div_ceil(6);
            let last_whole = end_bit / 6;
            if last_whole <= first_whole + 3 {
                continue;
            }
            let class = |index: usize, mask: u8| {
                let value = alphabet
                    .iter()
                    .position(|c| *c == encoded[index])
                    .unwrap_or(0) as u8;
                let mut members = [false; 256];
                for (candidate, character) in alphabet.iter().enumerate() {
                    if candidate as u8 & mask == value & mask {
                        members[usize::from(*character)] = true;
                    }
                }
                members
            };
            // The leading shared character shows the secret's first bits in its low ones.
            let lead = (start_bit % 6 != 0)
                .then(|| class(start_bit / 6, (1u8 << (6 - start_bit % 6)) - 1));
            let mut members = [false; 256];
            for character in alphabet {
                members[usize::from(*character)] = true;
            }
            forms.push(Base64Form {
                lead,
                core: encoded[first_whole..last_whole].to_vec(),
                alphabet: members,
            });
        }
    }
    forms
}

impl Base64Form {
    /// An occurrence starting at `at`: the shared leading character (when the alignment has one)
    /// and the characters only the secret determines. The rest of the text is absorbed after it.
    fn match_at(&self, haystack: &[u8], at: usize) -> Found {
        let mut position = at;
        if let Some(lead) = &self.lead {
            if !lead[usize::from(haystack[position])] {
                return Found::Nothing;
            }
            position += 1;
        } else if self.core.first() != haystack.get(at) {
            return Found::Nothing;
        }
        let rest = &haystack[position.min(haystack.len())..];
        if rest.starts_with(&self.core) {
            Found::Occurrence(position + self.core.len(), None)
        } else if self.core.starts_with(rest) {
            Found::Undecided
        } else {
            Found::Nothing
        }
    }
}

/// Copies of base64 forms (for masking a whole value with the same forms).
fn base64_forms_of(forms: &[Base64Form]) -> Vec<Base64Form> {
    forms
        .iter()
        .map(|form| Base64Form {
            lead: form.lead,
            core: form.core.clone(),
            alphabet: form.alphabet,
        })
        .collect()
}

#[cfg(test)]
mod tests;
