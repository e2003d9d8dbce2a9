//! The grant record and its lifecycle: `pending → active → revoked | expired`, `pending → denied`.
//! Every transition is a function from one record to the next, so the store can compare-and-swap.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{UnixTime, add_duration, format_time};

/// The durable record of one issued token. Holds no secret: the token itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The token's `jti`.
    pub id: String,
    pub principal: String,
    pub task_id: String,
    pub purpose: String,
    pub scope: String,
    pub environment: String,
    pub audience: String,
    pub params: BTreeMap<String, String>,
    pub issued_at: UnixTime,
    pub expires_at: UnixTime,
    /// Renewals never push `expires_at` past this: issue time plus the scope's max TTL.
    pub max_expires_at: UnixTime,
    pub uses: u64,
    pub max_uses: Option<u64>,
    pub status: GrantStatus,
    /// Who ended the grant and why, once it is no longer active.
    pub status_reason: Option<String>,
    /// The key that signed the grant's latest token.
    pub key_id: String,
    pub updated_at: UnixTime,
    /// Gateway calls made per allow rule (by rule index), for rules with `max_calls`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rule_calls: BTreeMap<String, u64>,
    /// For a grant of an aws-sts scope: what its STS sessions were issued on, so a revocation
    /// lands where they are even after the config changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsIssue>,
    /// How the requester proved who it was when it asked for the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated_by: Option<crate::identity::AuthenticatedBy>,
    /// A MAC over every other field under a key derived from the key-encryption key, set when
    /// the record is written and checked when it is read: a grant altered or planted in the
    /// store by someone without the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What an aws-sts grant's STS sessions were issued on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsIssue {
    /// The role its sessions assumed.
    pub role_arn: String,
    /// The root credential that assumed it (and writes its deny).
    pub credential: String,
    /// `role-policy` or `expiry`, as the scope said when the sessions were issued.
    pub revoke: String,
    /// The last moment any of its sessions is valid at AWS.
    pub sessions_until: UnixTime,
    /// The latest session's credentials, sealed under the key-encryption key (bound to the
    /// grant's id): handed again to the requester who waits for the grant, instead of a new
    /// session each time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_session: Option<String>,
}

/// The key grant records are authenticated with.
pub struct GrantKey(ring::hmac::Key);

impl GrantKey {
    pub fn from_seal_key(seal_key: &crate::keyring::SealKey) -> GrantKey {
        GrantKey(seal_key.derive_mac_key("valet grant records"))
    }

    /// `grant` with its MAC set, computed over every other field.
    pub fn sealed(&self, grant: &Grant) -> Grant {
        let mut sealed = Grant {
            mac: None,
            ..grant.clone()
        };
        let tag = ring::hmac::sign(&self.0, &mac_input(&sealed));
        sealed.mac = Some(hex::encode(tag.as_ref()));
        sealed
    }

    /// Whether `grant` carries the MAC valetd writes.
    pub fn verifies(&self, grant: &Grant) -> bool {
        let Some(tag) = grant.mac.as_deref().and_then(|mac| hex::decode(mac).ok()) else {
            return false;
        };
        let unsealed = Grant {
            mac: None,
            ..grant.clone()
        };
        ring::hmac::verify(&self.0, &mac_input(&unsealed), &tag).is_ok()
    }
}

fn mac_input(grant: &Grant) -> Vec<u8> {
    // Serializing a plain record cannot fail; the field order is the struct's, fixed.
    serde_json::to_vec(grant).unwrap_or_default()
}

/// The stored status. `Expired` is never stored: it is derived from `expires_at` and the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    Pending,
    Active,
    Revoked,
    Expired,
    Denied,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "pending",
            GrantStatus::Active => "active",
            GrantStatus::Revoked => "revoked",
            GrantStatus::Expired => "expired",
            GrantStatus::Denied => "denied",
        }
    }
}

impl fmt::Display for GrantStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Why a grant cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InactiveReason {
    #[error("grant {grant_id} was revoked: {reason}")]
    Revoked { grant_id: String, reason: String },
    #[error("grant {grant_id} expired at {}", format_time(*at))]
    Expired { grant_id: String, at: UnixTime },
    #[error("grant {grant_id} has used all {max_uses} of its uses")]
    UsesExhausted { grant_id: String, max_uses: u64 },
    #[error("grant {grant_id} is waiting for approval")]
    Pending { grant_id: String },
    #[error("grant {grant_id} was denied: {reason}")]
    Denied { grant_id: String, reason: String },
}

/// Why a gateway call may not count against a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallRefused {
    #[error(transparent)]
    Inactive(InactiveReason),
    #[error("grant {grant_id} has made all {max_calls} calls {rule} allows")]
    RuleExhausted {
        grant_id: String,
        rule: String,
        max_calls: u64,
    },
    #[error(
        "this request makes {asked} calls of {rule} (each field it executes counts, aliases included), and grant {grant_id} has {left} of its {max} left"
    )]
    TooManyAtOnce {
        grant_id: String,
        rule: String,
        asked: u64,
        left: u64,
        max: u64,
    },
}

/// A transition the grant's current status does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("grant {grant_id} cannot be {action}: it is {status}")]
    NotActive {
        grant_id: String,
        action: &'static str,
        status: GrantStatus,
    },
    #[error("grant {grant_id} cannot be renewed: it already runs until its scope's max lifetime ({})", format_time(*max_expires_at))]
    AtMaxLifetime {
        grant_id: String,
        max_expires_at: UnixTime,
    },
    #[error(
        "grant {grant_id} already runs until {}; renewing for the asked TTL would not extend it",
        format_time(*expires_at)
    )]
    NotExtended {
        grant_id: String,
        expires_at: UnixTime,
    },
}

impl Grant {
    /// The claims of this grant's token, issued at `now` by `issuer`.
    pub fn claims(&self, issuer: &str, now: UnixTime) -> crate::token::Claims {
        crate::token::Claims {
            iss: issuer.to_string(),
            sub: self.principal.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: self.expires_at,
            jti: self.id.clone(),
            task: self.task_id.clone(),
            scope: self.scope.clone(),
            env: self.environment.clone(),
            params: self.params.clone(),
        }
    }

    /// The status as a reader should see it at `now`: an active grant past its expiry is expired.
    pub fn status_at(&self, now: UnixTime) -> GrantStatus {
        match self.status {
            GrantStatus::Active | GrantStatus::Pending if now >= self.expires_at => {
                GrantStatus::Expired
            }
            status => status,
        }
    }

    /// `None` when the grant may be used at `now`, otherwise why not.
    pub fn inactive_reason(&self, now: UnixTime) -> Option<InactiveReason> {
        let grant_id = self.id.clone();
        let reason = || {
            self.status_reason
                .clone()
                .unwrap_or_else(|| "no reason given".to_string())
        };
        match self.status_at(now) {
            GrantStatus::Active => match self.max_uses {
                Some(max_uses) if self.uses >= max_uses => {
                    Some(InactiveReason::UsesExhausted { grant_id, max_uses })
                }
                _ => None,
            },
            GrantStatus::Expired => Some(InactiveReason::Expired {
                grant_id,
                at: self.expires_at,
            }),
            GrantStatus::Revoked => Some(InactiveReason::Revoked {
                grant_id,
                reason: reason(),
            }),
            GrantStatus::Pending => Some(InactiveReason::Pending { grant_id }),
            GrantStatus::Denied => Some(InactiveReason::Denied {
                grant_id,
                reason: reason(),
            }),
        }
    }

    /// The record after revocation by `by` for `reason`. Only an active grant can be revoked.
    pub fn revoked(&self, by: &str, reason: &str, now: UnixTime) -> Result<Grant, TransitionError> {
        // A grant waiting for approval is revoked too: a later approval must find nothing to
        // turn into a token.
        if self.status_at(now) != GrantStatus::Pending {
            self.require_status(GrantStatus::Active, "revoked", now)?;
        }
        Ok(Grant {
            status: GrantStatus::Revoked,
            status_reason: Some(format!("revoked by {by}: {reason}")),
            updated_at: now,
            ..self.clone()
        })
    }

    /// The record with its lifetime cut to end no later than `latest` (a config reload lowered a
    /// cap below it).
    pub fn clamped(&self, latest: UnixTime, now: UnixTime) -> Grant {
        Grant {
            expires_at: self.expires_at.min(latest),
            max_expires_at: self.max_expires_at.min(latest),
            updated_at: now,
            ..self.clone()
        }
    }

    /// Whether the grant is still live: active, or waiting for approval.
    pub fn is_live(&self, now: UnixTime) -> bool {
        matches!(
            self.status_at(now),
            GrantStatus::Active | GrantStatus::Pending
        )
    }

    /// The record after one more successful use.
    pub fn used(&self, now: UnixTime) -> Result<Grant, InactiveReason> {
        if let Some(reason) = self.inactive_reason(now) {
            return Err(reason);
        }
        Ok(Grant {
            uses: self.uses.saturating_add(1),
            updated_at: now,
            ..self.clone()
        })
    }

    /// The record of a pending grant once approved at `now`: active for `ttl`, its max lifetime
    /// counted from now.
    pub fn activated(
        &self,
        ttl: Duration,
        max_lifetime: Duration,
        key_id: &str,
        now: UnixTime,
    ) -> Result<Grant, TransitionError> {
        self.require_status(GrantStatus::Pending, "activated", now)?;
        Ok(Grant {
            status: GrantStatus::Active,
            issued_at: now,
            expires_at: add_duration(now, ttl),
            max_expires_at: add_duration(now, max_lifetime),
            key_id: key_id.to_string(),
            updated_at: now,
            ..self.clone()
        })
    }

    /// The record of a pending grant whose approval was denied or timed out.
    pub fn denied(&self, reason: &str, now: UnixTime) -> Grant {
        Grant {
            status: GrantStatus::Denied,
            status_reason: Some(reason.to_string()),
            updated_at: now,
            ..self.clone()
        }
    }

    /// The record after one gateway call through `rule`, counting it against the grant's
    /// `max_uses` and the rule's `max_calls`.
    /// The record after `executed` calls through `rule` (one request may execute several: each
    /// top-level field of a GraphQL document), counted against the rule's `max_calls` and the
    /// grant's `max_uses`; refused whole when they do not all fit.
    pub fn called(
        &self,
        rule: &RuleCounter,
        executed: u64,
        now: UnixTime,
    ) -> Result<Grant, CallRefused> {
        if let Some(reason) = self.inactive_reason(now) {
            return Err(CallRefused::Inactive(reason));
        }
        let executed = executed.max(1);
        let calls = self.rule_calls.get(&rule.key).copied().unwrap_or(0);
        if let Some(max_calls) = rule.max_calls {
            if calls >= max_calls {
                return Err(CallRefused::RuleExhausted {
                    grant_id: self.id.clone(),
                    rule: rule.label.clone(),
                    max_calls,
                });
            }
            if calls.saturating_add(executed) > max_calls {
                return Err(CallRefused::TooManyAtOnce {
                    grant_id: self.id.clone(),
                    rule: rule.label.clone(),
                    asked: executed,
                    left: max_calls - calls,
                    max: max_calls,
                });
            }
        }
        if let Some(max_uses) = self.max_uses
            && self.uses.saturating_add(executed) > max_uses
        {
            return Err(CallRefused::TooManyAtOnce {
                grant_id: self.id.clone(),
                rule: "the grant (max_uses)".into(),
                asked: executed,
                left: max_uses.saturating_sub(self.uses),
                max: max_uses,
            });
        }
        let mut next = Grant {
            uses: self.uses.saturating_add(executed),
            updated_at: now,
            ..self.clone()
        };
        if rule.max_calls.is_some() {
            next.rule_calls.insert(rule.key.clone(), calls + executed);
        }
        Ok(next)
    }

    /// The record after every one of `calls` (a rule and how many times it is called), as one
    /// change: refused whole when any does not fit, so a request refused in part counts nothing.
    pub fn called_all(
        &self,
        calls: &[(RuleCounter, u64)],
        now: UnixTime,
    ) -> Result<Grant, CallRefused> {
        let mut next = self.clone();
        for (rule, executed) in calls {
            next = next.called(rule, *executed, now)?;
        }
        Ok(next)
    }

    /// The record after renewal for `ttl` from `now`, signed by `key_id`. The new expiry is capped
    /// at `max_expires_at`; a renewal that cannot extend at all is refused.
    pub fn renewed(
        &self,
        ttl: Duration,
        key_id: &str,
        now: UnixTime,
    ) -> Result<Grant, TransitionError> {
        self.require_status(GrantStatus::Active, "renewed", now)?;
        if self.expires_at >= self.max_expires_at {
            return Err(TransitionError::AtMaxLifetime {
                grant_id: self.id.clone(),
                max_expires_at: self.max_expires_at,
            });
        }
        let expires_at = add_duration(now, ttl).min(self.max_expires_at);
        if expires_at <= self.expires_at {
            return Err(TransitionError::NotExtended {
                grant_id: self.id.clone(),
                expires_at: self.expires_at,
            });
        }
        Ok(Grant {
            expires_at,
            key_id: key_id.to_string(),
            updated_at: now,
            ..self.clone()
        })
    }

    /// Whether the record may be deleted: it can no longer be used and has been kept for
    /// `retention` past the moment it stopped being usable.
    pub fn sweepable(&self, now: UnixTime, retention: Duration) -> bool {
        let ended_at = match self.status_at(now) {
            GrantStatus::Active | GrantStatus::Pending => return false,
            GrantStatus::Expired => self.expires_at,
            // A revoked grant's token stays cryptographically valid until `expires_at`; keep the
            // record (and so the revocation) at least that long.
            GrantStatus::Revoked | GrantStatus::Denied => self.expires_at.max(self.updated_at),
        };
        now >= add_duration(ended_at, retention)
    }

    fn require_status(
        &self,
        wanted: GrantStatus,
        action: &'static str,
        now: UnixTime,
    ) -> Result<(), TransitionError> {
        let status = self.status_at(now);
        if status == wanted {
            Ok(())
        } else {
            Err(TransitionError::NotActive {
                grant_id: self.id.clone(),
                action,
                status,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn active_grant(now: UnixTime) -> Grant {
        Grant {
            id: "g1".into(),
            principal: "ci-agent".into(),
            task_id: "t1".into(),
            purpose: "test".into(),
            scope: "s".into(),
            environment: "staging".into(),
            audience: "railway".into(),
            params: BTreeMap::new(),
            issued_at: now,
            expires_at: now + 300,
            max_expires_at: now + 900,
            uses: 0,
            max_uses: Some(2),
            status: GrantStatus::Active,
            status_reason: None,
            key_id: "k1".into(),
            updated_at: now,
            rule_calls: BTreeMap::new(),
            authenticated_by: None,
            aws: None,
            mac: None,
        }
    }

    #[test]
    fn an_active_grant_expires_by_the_clock() {
        let grant = active_grant(1_000);
        assert_eq!(grant.status_at(1_299), GrantStatus::Active);
        assert_eq!(grant.status_at(1_300), GrantStatus::Expired);
        assert_eq!(
            grant.inactive_reason(1_300),
            Some(InactiveReason::Expired {
                grant_id: "g1".into(),
                at: 1_300
            })
        );
    }

    #[test]
    fn uses_count_up_to_the_maximum() {
        let grant = active_grant(1_000);
        let once = grant.used(1_001).unwrap();
        let twice = once.used(1_002).unwrap();
        assert_eq!(twice.uses, 2);
        assert_eq!(
            twice.used(1_003),
            Err(InactiveReason::UsesExhausted {
                grant_id: "g1".into(),
                max_uses: 2
            })
        );
    }

    #[test]
    fn revocation_is_final_and_says_who_and_why() {
        let revoked = active_grant(1_000)
            .revoked("ops", "leaked in a log", 1_010)
            .unwrap();
        assert_eq!(revoked.status, GrantStatus::Revoked);
        assert!(
            matches!(revoked.inactive_reason(1_011), Some(InactiveReason::Revoked { reason, .. }) if reason.contains("ops") && reason.contains("leaked"))
        );
        assert!(revoked.revoked("ops", "again", 1_012).is_err());
        assert!(
            revoked
                .renewed(Duration::from_secs(60), "k1", 1_012)
                .is_err()
        );
        assert!(revoked.used(1_012).is_err());
    }

    #[test]
    fn renewal_extends_up_to_the_max_lifetime_and_then_refuses() {
        let grant = active_grant(1_000);
        let renewed = grant
            .renewed(Duration::from_secs(600), "k2", 1_100)
            .unwrap();
        assert_eq!(renewed.expires_at, 1_700);
        assert_eq!(renewed.key_id, "k2");
        let capped = renewed
            .renewed(Duration::from_secs(600), "k2", 1_600)
            .unwrap();
        assert_eq!(capped.expires_at, 1_900);
        assert!(matches!(
            capped.renewed(Duration::from_secs(600), "k2", 1_800),
            Err(TransitionError::AtMaxLifetime { .. })
        ));
        assert!(matches!(
            renewed.renewed(Duration::from_secs(60), "k2", 1_100),
            Err(TransitionError::NotExtended { .. })
        ));
    }

    #[test]
    fn gateway_calls_count_against_uses_and_each_rule_s_own_limit() {
        let rule = crate::rules::AllowRule {
            index: 1,
            methods: ["POST".to_string()].into_iter().collect(),
            path: crate::rules::PathPattern::parse("/deploys").unwrap(),
            graphql: None,
            max_body: 64,
            max_calls: Some(1),
            approval: None,
            query: BTreeMap::new(),
        };
        let grant = active_grant(1_000);
        let once = grant.called(&rule.counter(), 1, 1_001).unwrap();
        assert_eq!((once.uses, once.rule_calls.get("1").copied()), (1, Some(1)));
        assert!(matches!(
            once.called(&rule.counter(), 1, 1_002),
            Err(CallRefused::RuleExhausted { max_calls: 1, .. })
        ));
        let unlimited_rule = crate::rules::AllowRule {
            max_calls: None,
            index: 0,
            ..rule
        };
        let twice = once.called(&unlimited_rule.counter(), 1, 1_002).unwrap();
        assert!(matches!(
            twice.called(&unlimited_rule.counter(), 1, 1_003),
            Err(CallRefused::Inactive(InactiveReason::UsesExhausted { .. }))
        ));
    }

    #[test]
    fn a_request_executing_several_calls_counts_each_and_is_refused_whole_past_the_limit() {
        let rule = crate::rules::AllowRule {
            index: 0,
            methods: ["POST".to_string()].into_iter().collect(),
            path: crate::rules::PathPattern::parse("/graphql").unwrap(),
            graphql: None,
            max_body: 64,
            max_calls: Some(3),
            approval: None,
            query: BTreeMap::new(),
        };
        let mut grant = active_grant(1_000);
        grant.max_uses = None;
        // Twenty-five aliased mutations in one request do not fit in three calls.
        assert!(matches!(
            grant.called(&rule.counter(), 25, 1_001),
            Err(CallRefused::TooManyAtOnce {
                asked: 25,
                left: 3,
                max: 3,
                ..
            })
        ));
        let two = grant.called(&rule.counter(), 2, 1_001).unwrap();
        assert_eq!(two.rule_calls.get("0").copied(), Some(2));
        assert!(matches!(
            two.called(&rule.counter(), 2, 1_002),
            Err(CallRefused::TooManyAtOnce {
                asked: 2,
                left: 1,
                ..
            })
        ));
        let three = two.called(&rule.counter(), 1, 1_002).unwrap();
        assert_eq!(three.uses, 3);
    }

    #[test]
    fn records_are_swept_only_after_retention() {
        let grant = active_grant(1_000);
        let retention = Duration::from_secs(100);
        assert!(!grant.sweepable(1_200, retention));
        assert!(!grant.sweepable(1_399, retention));
        assert!(grant.sweepable(1_400, retention));
        let revoked = grant.revoked("ops", "r", 1_010).unwrap();
        assert!(
            !revoked.sweepable(1_200, retention),
            "a revocation must outlive the token it revokes"
        );
        assert!(revoked.sweepable(1_400, retention));
    }
}

/// A rule whose calls a grant counts: its key in `rule_calls`, its name for refusals, its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCounter {
    /// `"2"` for `allow[2]` (as grants have always recorded it), `"tool[1]"` for an MCP tool.
    pub key: String,
    pub label: String,
    pub max_calls: Option<u64>,
}
