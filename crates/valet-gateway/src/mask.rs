//! Keeping the root credential out of what the agent receives, without the response path itself
//! telling anything about it. An upstream that echoes the request (an error page quoting the URL
//! with an `api_key`, a debug endpoint reflecting headers, CI logs the agent can write into) would
//! otherwise hand the agent the very secret the gateway exists to keep from it.
//!
//! Every complete occurrence of the secret becomes one fixed [`MARKER`], whatever the secret's
//! length, in every form an upstream writes it: byte by byte raw, percent-encoded, JSON-escaped
//! or HTML-escaped, in any mixture, with the escape's own characters escaped once more the way
//! encoders stack (Go's `\u0026#43;`, `%252B`, `%5Cu0026`, `\&quot;`), JSON inside JSON up to
//! three levels; and base64 (standard and URL-safe, either percent-encoded) at each alignment, the
//! characters it shares with its neighbours and the rest of its text included.
//!
//! Nothing else the masker does depends on the secret. What it holds changes length only where a
//! complete occurrence is replaced and by rules that look at nothing but the bytes themselves (the
//! rest of a base64 text is absorbed character by character); a position whose fate is not yet
//! known — bytes that could begin the secret — stays held as it is. A streamed body is held back
//! by a fixed [`WINDOW`] and released in blocks of exactly [`BLOCK`] bytes, so neither where a
//! chunk ends, how long it is, nor when it leaves tells an agent anything about the secret
//! (holding back "a tail that could start the secret" told an agent choosing the bytes whether its
//! guess was a prefix; releasing what each upstream frame freed told it the secret's length; and
//! absorbing a base64 text's rest only once "the secret does not begin here" was known told it
//! again, through when a block left).

use bytes::{Bytes, BytesMut};

/// What every complete occurrence of the secret becomes.
pub const MARKER: &[u8] = b"[masked by valet]";

/// How many bytes of a streamed body are held back before a position is decided: more than the
/// longest form of the longest secret the gateway masks, and the same whatever the secret is.
pub const WINDOW: usize = 8192;

/// The size of every chunk a streamed body is released in (the last one aside).
pub const BLOCK: usize = 4096;

/// The longest root credential the gateway masks (valetd refuses a longer one for an upstream at
/// start).
pub const MAX_SECRET_BYTES: usize = valet_core::config::MAX_MASKED_CREDENTIAL_BYTES;

/// Longest form one secret byte takes: a numeric HTML reference with leading zeros whose `&` is
/// JSON-escaped (`\u0026#x00002b;`).
const MAX_BYTE_FORM: usize = 15;

/// How many absorbed bytes are kept to find an occurrence that began in them and runs on.
const SHADOW: usize = MAX_SECRET_BYTES * MAX_BYTE_FORM;

// Every form of the longest secret fits in the window, so a position a window behind the end is
// always decided.
const _: () = assert!(SHADOW < WINDOW);

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
    /// After a base64 occurrence, the rest of its text goes too: which form's alphabet, and the
    /// raw bytes taken so far (the last [`SHADOW`] of them).
    absorbing: Option<(usize, Vec<u8>)>,
    /// Where absorbing stopped, not yet decided (see [`Masker::at_stop`]).
    stops: Vec<Stop>,
}

/// Where the rest of a base64 text stopped being absorbed.
struct Stop {
    /// A position of `held`.
    position: usize,
    /// The base64 form whose text it was.
    form: usize,
    /// The raw bytes absorbed last (up to [`SHADOW`]).
    taken: Vec<u8>,
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
            stops: Vec::new(),
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
        for stop in &mut self.stops {
            stop.position = stop.position.saturating_sub(release);
        }
        self.held.split_to(release).freeze()
    }

    /// What is left at the end of the stream, masked.
    pub fn finish(&mut self) -> Bytes {
        self.scan(true);
        self.decided = 0;
        self.absorbing = None;
        self.stops.clear();
        std::mem::take(&mut self.held).freeze()
    }

    /// Masks a complete value (a header, a whole body, one event).
    pub fn mask_whole(&self, value: &[u8]) -> Vec<u8> {
        let mut whole = Masker {
            secret: self.secret.clone(),
            base64: base64_forms_of(&self.base64),
            held: BytesMut::from(value),
            decided: 0,
            absorbing: None,
            stops: Vec::new(),
        };
        whole.scan(true);
        whole.held.to_vec()
    }

    /// Replaces `held[at..end]` with `with`; pending straddles after it move with the bytes, any
    /// inside it go.
    fn replace(&mut self, at: usize, end: usize, with: &[u8]) -> Vec<u8> {
        let mut rest = self.held.split_off(at);
        let removed = rest.split_to(end - at).to_vec();
        self.held.extend_from_slice(with);
        self.held.unsplit(rest);
        self.stops.retain_mut(|stop| {
            if stop.position >= end && end > at {
                stop.position = stop.position - (end - at) + with.len();
                true
            } else {
                stop.position < at
            }
        });
        removed
    }

    /// Replaces every complete occurrence from the first undecided position on, and decides
    /// what can be; with `at_end`, the bytes end here and everything is decided.
    fn scan(&mut self, at_end: bool) {
        let mut at = self.decided;
        let mut first_undecided = None;
        while at < self.held.len() {
            if let Some((form, _)) = &self.absorbing {
                let form = *form;
                match base64_unit(&self.held, at) {
                    // The text goes on: taken, whatever the secret is, by what it is alone — a
                    // character of its alphabet, or padding; percent-encoded, only the ones URL
                    // encoders encode (`%2B`, `%2F`, `%3D`).
                    Unit::Character(character, end)
                        if (self.base64[form].alphabet[usize::from(character)]
                            || character == b'=')
                            && (end == at + 1 || matches!(character, b'+' | b'/' | b'=')) =>
                    {
                        let removed = self.replace(at, end, &[]);
                        if let Some((_, shadow)) = &mut self.absorbing {
                            shadow.extend_from_slice(&removed);
                            let excess = shadow.len().saturating_sub(SHADOW);
                            shadow.drain(..excess);
                        }
                        continue;
                    }
                    // A percent sign the bytes end in: whether it is text is told by the next.
                    Unit::Partial if !at_end => {
                        first_undecided.get_or_insert(at);
                        break;
                    }
                    _ => {
                        if let Some((form, shadow)) = self.absorbing.take() {
                            self.stops.push(Stop {
                                position: at,
                                form,
                                taken: shadow,
                            });
                        }
                    }
                }
            }
            // Where a base64 text's rest stopped, an occurrence in any form may begin (in what
            // was taken, or right here): it goes too, as if it were part of the text, and the
            // text goes on after it — an echo whose characters are all base64's would have been
            // taken whole, and the bytes after it with it.
            if let Some(index) = self.stops.iter().position(|stop| stop.position == at) {
                match self.at_stop(&self.stops[index], at, at_end) {
                    Found::Occurrence(end, _) => {
                        let stop = self.stops.remove(index);
                        let removed = self.replace(at, end, &[]);
                        let mut taken = stop.taken;
                        taken.extend_from_slice(&removed);
                        let excess = taken.len().saturating_sub(SHADOW);
                        taken.drain(..excess);
                        self.absorbing = Some((stop.form, taken));
                        continue;
                    }
                    Found::Nothing => {
                        self.stops.remove(index);
                    }
                    // Held as they are (the same length whatever the secret), decided later;
                    // the bytes after are scanned on meanwhile.
                    Found::Undecided => {
                        first_undecided.get_or_insert(at);
                        at += 1;
                        continue;
                    }
                }
            }
            match self.find_at(&self.held, at, at_end) {
                Found::Occurrence(end, base64) => {
                    self.replace(at, end, MARKER);
                    at += MARKER.len();
                    if let Some(form) = base64 {
                        self.absorbing = Some((form, Vec::new()));
                    }
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

    /// At a stop: an occurrence that began in what was taken and runs on here, or one that begins
    /// right here; where it ends.
    /// A percent sign that stopped the text counts with an occurrence beginning one or two bytes
    /// after it: had the occurrence's first characters been hex, sign and all would have been one
    /// encoded character of the text, and taken.
    fn at_stop(&self, stop: &Stop, at: usize, at_end: bool) -> Found {
        let straddle = straddling(&stop.taken, &self.held[at..], &self.secret, at_end);
        if let Found::Occurrence(length, _) = straddle {
            return Found::Occurrence(at + length, None);
        }
        let mut undecided = matches!(straddle, Found::Undecided);
        let starts = if self.held[at] == b'%' { 0..3 } else { 0..1 };
        for start in starts {
            if at + start >= self.held.len() {
                undecided |= !at_end;
                break;
            }
            match self.find_at(&self.held, at + start, at_end) {
                Found::Occurrence(end, _) => return Found::Occurrence(end, None),
                Found::Undecided => undecided = true,
                Found::Nothing => {}
            }
        }
        if undecided {
            Found::Undecided
        } else {
            Found::Nothing
        }
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

/// An occurrence that began in `taken` (what absorbing removed) and runs on into `rest`: how
/// many bytes of `rest` it takes. One wholly inside `taken` went with it.
fn straddling(taken: &[u8], rest: &[u8], secret: &[u8], at_end: bool) -> Found {
    if secret.is_empty() || taken.is_empty() {
        return Found::Nothing;
    }
    let mut joined = taken.to_vec();
    joined.extend_from_slice(&rest[..rest.len().min(SHADOW)]);
    let mut undecided = false;
    for start in 0..taken.len() {
        if !(joined[start] == secret[0] || matches!(joined[start], b'%' | b'\\' | b'&')) {
            continue;
        }
        match escaped_match(&joined, start, secret) {
            Found::Occurrence(end, _) if end > taken.len() => {
                return Found::Occurrence(end - taken.len(), None);
            }
            Found::Undecided => undecided = true,
            _ => {}
        }
    }
    if undecided && !at_end && rest.len() < SHADOW {
        Found::Undecided
    } else {
        Found::Nothing
    }
}

/// Appends to `ends` where `form` (ASCII, compared without regard to case) ends when it is
/// written at `at`; sets `short` when the bytes end inside it.
fn literal(form: &[u8], haystack: &[u8], at: usize, ends: &mut Vec<usize>, short: &mut bool) {
    let rest = &haystack[at..];
    if rest.len() >= form.len() {
        if rest[..form.len()].eq_ignore_ascii_case(form) {
            ends.push(at + form.len());
        }
    } else if form[..rest.len()].eq_ignore_ascii_case(rest) {
        *short = true;
    }
}

/// Where a character of an escape sequence (`%`, `&`, `\`, or a character JSON escapes with a
/// backslash) ends when written at `at`, one level of escaping deep, as encoders stack: itself;
/// percent-encoded (`%25` for `%`: percent-encoding applied twice; `%5C` for `\`: JSON in a URL);
/// `&` as `\u0026` (Go's JSON) or `&amp;` (HTML escaped twice); a quote as an HTML reference
/// (JSON in an HTML attribute).
fn escape_character(
    character: u8,
    haystack: &[u8],
    at: usize,
    ends: &mut Vec<usize>,
    short: &mut bool,
) {
    let Some(first) = haystack.get(at) else {
        *short = true;
        return;
    };
    if *first == character {
        ends.push(at + 1);
    }
    literal(
        format!("%{character:02X}").as_bytes(),
        haystack,
        at,
        ends,
        short,
    );
    let references: &[&[u8]] = match character {
        b'&' => &[b"\\u0026", b"&amp;"],
        b'"' => &[b"&quot;", b"&#34;", b"&#x22;"],
        b'\'' => &[b"&#39;", b"&#x27;", b"&apos;"],
        _ => &[],
    };
    for reference in references {
        literal(reference, haystack, at, ends, short);
    }
}

/// The character JSON writes `byte` as after a backslash, if any.
fn short_escape(byte: u8) -> Option<u8> {
    match byte {
        b'"' => Some(b'"'),
        b'/' => Some(b'/'),
        0x08 => Some(b'b'),
        0x0c => Some(b'f'),
        b'\n' => Some(b'n'),
        b'\r' => Some(b'r'),
        b'\t' => Some(b't'),
        _ => None,
    }
}

/// Every way one byte may be written, as decoders read it: itself; percent-encoded (either case
/// of hex); JSON-escaped (`\uXXXX` in either case, the short escapes, `\/`), with the escape's
/// backslash itself escaped once or twice (JSON inside JSON); HTML character references
/// (decimal, hex, the named five) — each escape's own characters escaped once more as
/// [`escape_character`] says.
fn byte_forms(byte: u8, haystack: &[u8], at: usize, ends: &mut Vec<usize>, short: &mut bool) {
    let rest = &haystack[at..];
    if rest.first() == Some(&byte) {
        ends.push(at + 1);
    }
    let mut starts = Vec::new();
    // Percent-encoded: a percent sign (itself perhaps encoded), then the hex.
    escape_character(b'%', haystack, at, &mut starts, short);
    for start in starts.drain(..) {
        match &haystack[start..] {
            [high, low, ..] if hex_value(*high, *low) == Some(byte) => ends.push(start + 2),
            [high] if hex_value(*high, b'0').is_some() => *short = true,
            [] => *short = true,
            _ => {}
        }
    }
    // JSON escapes: a run of backslashes (JSON in a JSON string escapes the backslash again:
    // `\"` at level one is `\\\"` at level two), or one written `%5C`.
    let run = rest
        .iter()
        .take(9)
        .take_while(|character| **character == b'\\')
        .count();
    if run > 0 && run == rest.len() {
        *short = true;
    }
    if byte == b'\\' {
        for length in [2usize, 4, 8] {
            if run >= length {
                ends.push(at + length);
            }
        }
    } else {
        let mut after = Vec::new();
        if run > 0 {
            after.push((at + run, run));
        }
        let mut percent = Vec::new();
        literal(b"%5C", haystack, at, &mut percent, short);
        after.extend(percent.into_iter().map(|end| (end, 1)));
        for (start, backslashes) in after {
            if let Some(escape) = short_escape(byte)
                && backslashes <= 7
            {
                escape_character(escape, haystack, start, ends, short);
            }
            if byte < 0x80 && backslashes <= 4 {
                match &haystack[start..] {
                    [b'u', a, b, c, d, ..]
                        if hex_value(*a, *b) == Some(0) && hex_value(*c, *d) == Some(byte) =>
                    {
                        ends.push(start + 5);
                    }
                    [b'u', partial @ ..] if partial.len() < 4 => *short = true,
                    [] => *short = true,
                    _ => {}
                }
            }
        }
    }
    // HTML character references: an ampersand (itself perhaps escaped), then the name or number.
    escape_character(b'&', haystack, at, &mut starts, short);
    let named: &[u8] = match byte {
        b'&' => b"amp;",
        b'<' => b"lt;",
        b'>' => b"gt;",
        b'"' => b"quot;",
        b'\'' => b"apos;",
        _ => b"",
    };
    for start in starts {
        if !named.is_empty() {
            literal(named, haystack, start, ends, short);
        }
        if let Some(length) = numeric_reference(&haystack[start..], byte, short) {
            ends.push(start + length);
        }
    }
}

/// `#NN;` or `#xHH;` (up to six digits, leading zeros too) naming `byte`, after an ampersand:
/// its length.
fn numeric_reference(rest: &[u8], byte: u8, short: &mut bool) -> Option<usize> {
    if rest.is_empty() {
        *short = true;
        return None;
    }
    let body = rest.strip_prefix(b"#")?;
    let (digits, radix, prefix) = match body.first() {
        Some(b'x' | b'X') => (&body[1..], 16, 2),
        Some(_) => (body, 10, 1),
        None => {
            *short = true;
            return None;
        }
    };
    let count = digits
        .iter()
        .take(7)
        .take_while(|digit| char::from(**digit).is_digit(radix))
        .count();
    if count == digits.len() {
        *short = count <= 6 || *short;
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

/// One character of a base64 text as decoders read it: itself, or percent-encoded (a base64
/// text inside a URL).
enum Unit {
    /// The character, and where its form ends.
    Character(u8, usize),
    /// The bytes end inside a percent-encoded character.
    Partial,
}

fn base64_unit(haystack: &[u8], at: usize) -> Unit {
    match &haystack[at..] {
        [] => Unit::Partial,
        [b'%', high, low, ..] if hex_value(*high, *low).is_some() => {
            Unit::Character(hex_value(*high, *low).unwrap_or(b'%'), at + 3)
        }
        [b'%'] => Unit::Partial,
        [b'%', high] if hex_value(*high, b'0').is_some() => Unit::Partial,
        [character, ..] => Unit::Character(*character, at + 1),
    }
}

/// The secret in base64 at one alignment: the characters only it determines, and the classes of
/// the characters it shares with what comes before and after (each shows some bits of the
/// secret's first or last byte, so they are masked with it), then any padding.
struct Base64Form {
    lead: Option<[bool; 256]>,
    core: Vec<u8>,
    /// Both alphabets' characters: what follows the secret in its text (the shared trailing
    /// character, the rest encoded at an alignment the secret's length decides, the padding that
    /// tells that length) is absorbed with it, to the text's end.
    alphabet: [bool; 256],
}

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
            // Both alphabets, whichever form matched: a standard form matches a secret whose
            // base64 has neither `+` nor `/` inside base64url text too, and absorbing that text
            // only up to its first `-` or `_` would show the rest (its alignment, the secret's
            // length modulo 3, and the character it shares with the secret's last byte).
            let mut members = [false; 256];
            for character in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_" {
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
    /// and the characters only the secret determines, each perhaps percent-encoded, with line
    /// breaks between them (MIME's 76 columns). The rest of the text is absorbed after it.
    fn match_at(&self, haystack: &[u8], at: usize) -> Found {
        let mut position = at;
        if let Some(lead) = &self.lead {
            match base64_unit(haystack, position) {
                Unit::Character(character, end) if lead[usize::from(character)] => position = end,
                Unit::Character(..) => return Found::Nothing,
                Unit::Partial => return Found::Undecided,
            }
        }
        for expected in &self.core {
            if position > at {
                match &haystack[position..] {
                    [b'\r', b'\n', ..] => position += 2,
                    [b'\n', ..] => position += 1,
                    [b'\r'] => return Found::Undecided,
                    _ => {}
                }
            }
            match base64_unit(haystack, position) {
                Unit::Character(character, end) if character == *expected => position = end,
                Unit::Character(..) => return Found::Nothing,
                Unit::Partial => return Found::Undecided,
            }
        }
        Found::Occurrence(position, None)
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
