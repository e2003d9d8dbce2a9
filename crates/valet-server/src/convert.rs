//! Conversions between valet-core's records and the wire types.

use valet_core::UnixTime;
use valet_core::grant::{Grant, GrantStatus};
use valet_proto::v1;

pub fn timestamp(at: UnixTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at,
        nanos: 0,
    }
}

pub fn status_to_wire(status: GrantStatus) -> v1::GrantStatus {
    match status {
        GrantStatus::Pending => v1::GrantStatus::Pending,
        GrantStatus::Active => v1::GrantStatus::Active,
        GrantStatus::Revoked => v1::GrantStatus::Revoked,
        GrantStatus::Expired => v1::GrantStatus::Expired,
        GrantStatus::Denied => v1::GrantStatus::Denied,
    }
}

pub fn status_from_wire(status: v1::GrantStatus) -> Option<GrantStatus> {
    match status {
        v1::GrantStatus::Unspecified => None,
        v1::GrantStatus::Pending => Some(GrantStatus::Pending),
        v1::GrantStatus::Active => Some(GrantStatus::Active),
        v1::GrantStatus::Revoked => Some(GrantStatus::Revoked),
        v1::GrantStatus::Expired => Some(GrantStatus::Expired),
        v1::GrantStatus::Denied => Some(GrantStatus::Denied),
    }
}

/// The wire form of a grant, with its status as of `now`.
pub fn grant_to_wire(grant: &Grant, now: UnixTime) -> v1::Grant {
    v1::Grant {
        id: grant.id.clone(),
        principal: grant.principal.clone(),
        task_id: grant.task_id.clone(),
        purpose: grant.purpose.clone(),
        scope: grant.scope.clone(),
        environment: grant.environment.clone(),
        audience: grant.audience.clone(),
        params: grant.params.clone().into_iter().collect(),
        issued_at: Some(timestamp(grant.issued_at)),
        expires_at: Some(timestamp(grant.expires_at)),
        uses: grant.uses,
        max_uses: grant.max_uses.unwrap_or(0),
        status: status_to_wire(grant.status_at(now)) as i32,
        status_reason: grant.status_reason.clone().unwrap_or_default(),
        key_id: grant.key_id.clone(),
        max_expires_at: Some(timestamp(grant.max_expires_at)),
    }
}
