//! The web console's passes: the single-use login link `valet console` obtains and the session
//! cookie it opens, each a MAC'd record under a key derived from the key-encryption key (so any
//! replica checks them, and nobody without that key can make one), and the CSRF token bound to a
//! session. The rules only: valetd's store records that a link was used or a session ended.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::clock::UnixTime;
use crate::config::{Principal, Role};
use crate::identity::Credential;
use crate::keyring::SealKey;

/// The longest pass text valetd reads or makes (a browser keeps a cookie of up to 4096 bytes,
/// its name included); anything longer is refused before it is decoded.
pub const MAX_PASS_BYTES: usize = 3800;
/// How many codes a login link compares before it is used up.
pub const MAX_CODE_ATTEMPTS: usize = 5;
/// How long a login link stays usable.
pub const LOGIN_LINK_SECONDS: i64 = 60;

/// What a pass is for: the MAC covers it, so a login link never works as a session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    LoginLink,
    Session,
}

impl PassKind {
    fn label(self) -> &'static [u8] {
        match self {
            PassKind::LoginLink => b"valet console login link v1\0",
            PassKind::Session => b"valet console session v1\0",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PassKind::LoginLink => "login link",
            PassKind::Session => "console session",
        }
    }
}

/// Who a login link or session is for, and until when. Holds no secret: its strength is the MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolePass {
    /// 128 random bits, hex: names the link or session in the audit log and the store.
    pub id: String,
    pub principal: String,
    /// The principal's roles when the pass was made; a session whose principal's roles changed
    /// since ends.
    pub roles: Vec<String>,
    /// The credential the principal proved who it is with to obtain the link: the session
    /// ends when valetd would no longer accept it.
    pub credential: Credential,
    pub issued_at: UnixTime,
    pub expires_at: UnixTime,
}

impl ConsolePass {
    /// A new pass for `principal`, who authenticated with `credential`: valid `seconds` from
    /// `now`, and no longer than the credential itself.
    pub fn new(
        principal: &Principal,
        credential: &Credential,
        now: UnixTime,
        seconds: i64,
    ) -> Result<ConsolePass, crate::random::RandomnessUnavailable> {
        let mut expires_at = now.saturating_add(seconds);
        if let Some(until) = credential.valid_until() {
            expires_at = expires_at.min(until.saturating_add(1));
        }
        Ok(ConsolePass {
            id: hex::encode(crate::random::bytes::<16>()?),
            principal: principal.name.clone(),
            roles: role_names(principal),
            credential: credential.clone(),
            issued_at: now,
            expires_at,
        })
    }

    /// Whether `principal` (as the config now has it) is still the one this pass was made for.
    pub fn still_fits(&self, principal: &Principal) -> Result<(), ConsoleError> {
        let now = role_names(principal);
        if now == self.roles {
            Ok(())
        } else {
            Err(ConsoleError::RolesChanged {
                principal: self.principal.clone(),
                then: self.roles.join(", "),
                now: now.join(", "),
            })
        }
    }
}

fn role_names(principal: &Principal) -> Vec<String> {
    Role::ALL
        .iter()
        .filter(|role| principal.roles.contains(role))
        .map(|role| role.as_str().to_string())
        .collect()
}

/// Why a pass is refused. Never quotes the pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    #[error("the {what} is longer than {MAX_PASS_BYTES} bytes; valetd never makes one that long")]
    TooLong { what: &'static str },
    #[error(
        "the {what} is not one valetd made (malformed, altered, or made under another key-encryption key); get a new one with `valet console`"
    )]
    NotValetd { what: &'static str },
    #[error("the {what} expired at {at}; get a new one with `valet console`")]
    Expired { what: &'static str, at: String },
    #[error(
        "the roles of principal {principal:?} changed since the session opened (then: [{then}], now: [{now}]); log in again with `valet console`"
    )]
    RolesChanged {
        principal: String,
        then: String,
        now: String,
    },
}

/// The key console passes and CSRF tokens are MAC'd under.
pub struct ConsoleKey(ring::hmac::Key);

impl ConsoleKey {
    pub fn from_seal_key(seal_key: &SealKey) -> ConsoleKey {
        ConsoleKey(seal_key.derive_mac_key("valet console passes"))
    }

    /// `pass` as text: `BODY.MAC`, both base64url; the body is the pass's JSON. Refused when
    /// longer than [`MAX_PASS_BYTES`] (a credential with many names or claims).
    pub fn seal(&self, kind: PassKind, pass: &ConsolePass) -> Result<String, ConsoleError> {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(pass).unwrap_or_default());
        let mac = self.mac(kind, body.as_bytes());
        let text = format!("{body}.{}", URL_SAFE_NO_PAD.encode(mac));
        if text.len() > MAX_PASS_BYTES {
            return Err(ConsoleError::TooLong {
                what: kind.describe(),
            });
        }
        Ok(text)
    }

    /// The code that goes with login link `link_id`: shown only where `valet console` runs, and
    /// needed with the link to open a session, so a link seen elsewhere (a process list, a shell
    /// history, a log) opens nothing. Eight characters of Crockford base32 (40 bits), `XXXX-XXXX`.
    pub fn login_code(&self, link_id: &str) -> String {
        const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let mut message = b"valet console login code v1\0".to_vec();
        message.extend_from_slice(link_id.as_bytes());
        let tag = ring::hmac::sign(&self.0, &message);
        let bits = u64::from_be_bytes(tag.as_ref()[..8].try_into().unwrap_or([0; 8]));
        let characters: String = (0..8)
            .map(|index| char::from(ALPHABET[((bits >> (59 - 5 * index)) & 0x1F) as usize]))
            .collect();
        format!("{}-{}", &characters[..4], &characters[4..])
    }

    /// Whether `presented` is link `link_id`'s code, as people type it: any case, with or
    /// without the dash and spaces, `O` for `0` and `I`/`L` for `1` (compared in constant time).
    pub fn login_code_matches(&self, link_id: &str, presented: &str) -> bool {
        let normalise = |text: &str| -> Vec<u8> {
            text.bytes()
                .filter(|byte| !matches!(byte, b'-' | b' '))
                .take(64)
                .map(|byte| match byte.to_ascii_uppercase() {
                    b'O' => b'0',
                    b'I' | b'L' => b'1',
                    other => other,
                })
                .collect()
        };
        crate::secret::constant_time_eq(
            &normalise(&self.login_code(link_id)),
            &normalise(presented),
        )
    }

    /// The pass `text` carries, when valetd made it for `kind` and it has not expired at `now`.
    pub fn open(
        &self,
        kind: PassKind,
        text: &str,
        now: UnixTime,
    ) -> Result<ConsolePass, ConsoleError> {
        let what = kind.describe();
        if text.len() > MAX_PASS_BYTES {
            return Err(ConsoleError::TooLong { what });
        }
        let not_valetd = ConsoleError::NotValetd { what };
        let (body, mac) = text.split_once('.').ok_or(not_valetd.clone())?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| not_valetd.clone())?;
        let mut message = kind.label().to_vec();
        message.extend_from_slice(body.as_bytes());
        ring::hmac::verify(&self.0, &message, &mac).map_err(|_| not_valetd.clone())?;
        let pass: ConsolePass = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(not_valetd)?;
        if now >= pass.expires_at {
            return Err(ConsoleError::Expired {
                what,
                at: crate::clock::format_time(pass.expires_at),
            });
        }
        Ok(pass)
    }

    /// The CSRF token of session `session_id`: every form and action of that session carries it.
    pub fn csrf_token(&self, session_id: &str) -> String {
        let mut message = b"valet console csrf v1\0".to_vec();
        message.extend_from_slice(session_id.as_bytes());
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&self.0, &message))
    }

    /// Whether `presented` is session `session_id`'s CSRF token (compared in constant time).
    pub fn csrf_matches(&self, session_id: &str, presented: &str) -> bool {
        crate::secret::constant_time_eq(
            self.csrf_token(session_id).as_bytes(),
            presented.as_bytes(),
        )
    }

    fn mac(&self, kind: PassKind, body: &[u8]) -> ring::hmac::Tag {
        let mut message = kind.label().to_vec();
        message.extend_from_slice(body);
        ring::hmac::sign(&self.0, &message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(byte: u8) -> ConsoleKey {
        let text = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        ConsoleKey::from_seal_key(&SealKey::from_base64(&crate::Secret::from(text)).unwrap())
    }

    fn operator() -> Principal {
        crate::config::principal_for_tests("alice", &[Role::Operator])
    }

    fn key_credential() -> Credential {
        Credential::PrincipalKey {
            fingerprint: "0123456789abcdef".into(),
        }
    }

    fn pass(now: UnixTime) -> ConsolePass {
        ConsolePass::new(&operator(), &key_credential(), now, 60).expect("randomness")
    }

    #[test]
    fn a_pass_lasts_no_longer_than_the_credential_that_opened_it() {
        let certificate = Credential::ClientCertificate {
            certificate: crate::identity::PresentedCertificate {
                not_after: 1_030,
                ..Default::default()
            },
        };
        let pass = ConsolePass::new(&operator(), &certificate, 1_000, 3_600).unwrap();
        assert_eq!(pass.expires_at, 1_031);
        let pass = ConsolePass::new(&operator(), &key_credential(), 1_000, 3_600).unwrap();
        assert_eq!(pass.expires_at, 4_600);
    }

    #[test]
    fn a_login_code_belongs_to_one_link_and_reads_as_people_type_it() {
        let key = key_of(1);
        let code = key.login_code("link-a");
        assert_eq!(code.len(), 9);
        assert_eq!(&code[4..5], "-");
        assert!(key.login_code_matches("link-a", &code));
        assert!(key.login_code_matches("link-a", &code.to_lowercase().replace('-', " ")));
        let typed: String = code.replace('0', "O").replace('1', "l");
        assert!(key.login_code_matches("link-a", &typed));
        assert!(!key.login_code_matches("link-b", &code));
        assert!(!key_of(2).login_code_matches("link-a", &code));
        assert!(!key.login_code_matches("link-a", ""));
    }

    #[test]
    fn a_pass_opens_until_it_expires_and_not_a_second_after() {
        let key = key_of(1);
        let pass = pass(1_000);
        let text = key.seal(PassKind::Session, &pass).unwrap();
        assert_eq!(key.open(PassKind::Session, &text, 1_059), Ok(pass.clone()));
        let expired = key.open(PassKind::Session, &text, 1_060).unwrap_err();
        assert!(matches!(expired, ConsoleError::Expired { .. }), "{expired}");
        assert!(expired.to_string().contains("valet console"), "{expired}");
    }

    #[test]
    fn a_login_link_is_not_a_session_and_a_session_is_not_a_login_link() {
        let key = key_of(1);
        let link = key.seal(PassKind::LoginLink, &pass(1_000)).unwrap();
        assert!(matches!(
            key.open(PassKind::Session, &link, 1_001),
            Err(ConsoleError::NotValetd { .. })
        ));
        let session = key.seal(PassKind::Session, &pass(1_000)).unwrap();
        assert!(matches!(
            key.open(PassKind::LoginLink, &session, 1_001),
            Err(ConsoleError::NotValetd { .. })
        ));
    }

    #[test]
    fn an_altered_pass_or_one_under_another_key_is_refused_without_being_quoted() {
        let key = key_of(1);
        let original = pass(1_000);
        let text = key.seal(PassKind::Session, &original).unwrap();
        // The body says admin and a later expiry; the MAC is the original's.
        let forged = ConsolePass {
            roles: vec!["admin".into()],
            expires_at: 9_999_999,
            ..original.clone()
        };
        let forged_body = key.seal(PassKind::Session, &forged).unwrap();
        let spliced = format!(
            "{}.{}",
            forged_body.split_once('.').unwrap().0,
            text.split_once('.').unwrap().1
        );
        for bad in [
            spliced.as_str(),
            "",
            "no-dot",
            "a.b",
            &key_of(2).seal(PassKind::Session, &original).unwrap(),
        ] {
            let error = key.open(PassKind::Session, bad, 1_001).unwrap_err();
            assert!(matches!(error, ConsoleError::NotValetd { .. }), "{error}");
            assert!(bad.is_empty() || !error.to_string().contains(bad));
        }
        let long = "a".repeat(MAX_PASS_BYTES + 1);
        assert!(matches!(
            key.open(PassKind::Session, &long, 1_001),
            Err(ConsoleError::TooLong { .. })
        ));
    }

    #[test]
    fn the_csrf_token_belongs_to_one_session() {
        let key = key_of(1);
        let token = key.csrf_token("session-a");
        assert!(key.csrf_matches("session-a", &token));
        assert!(!key.csrf_matches("session-b", &token));
        assert!(!key.csrf_matches("session-a", ""));
        assert!(!key_of(2).csrf_matches("session-a", &token));
    }

    #[test]
    fn a_session_ends_when_its_principal_gains_or_loses_a_role() {
        let pass = pass(1_000);
        assert_eq!(pass.still_fits(&operator()), Ok(()));
        let promoted = crate::config::principal_for_tests("alice", &[Role::Operator, Role::Admin]);
        let error = pass.still_fits(&promoted).unwrap_err();
        assert!(error.to_string().contains("[operator]"), "{error}");
        assert!(error.to_string().contains("[operator, admin]"), "{error}");
    }
}
