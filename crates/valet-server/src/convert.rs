//! Conversions between valet-core's records and the wire types.

use valet_core::UnixTime;
use valet_core::approval::{ApprovalKind, ApprovalRequest, ApprovalStatus};
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

/// The wire form of an approval request.
pub fn approval_to_wire(approval: &ApprovalRequest, now: UnixTime) -> v1::Approval {
    let status = match approval.status_at(now) {
        ApprovalStatus::Pending => v1::ApprovalStatus::Pending,
        ApprovalStatus::Approved => v1::ApprovalStatus::Approved,
        ApprovalStatus::Denied => v1::ApprovalStatus::Denied,
        ApprovalStatus::Expired => v1::ApprovalStatus::Expired,
        ApprovalStatus::Consumed => v1::ApprovalStatus::Consumed,
    };
    v1::Approval {
        id: approval.id.clone(),
        kind: match approval.kind {
            ApprovalKind::Token => "token".into(),
            ApprovalKind::Call => "call".into(),
        },
        grant_id: approval.grant_id.clone(),
        requester: approval.requester.clone(),
        scope: approval.scope.clone(),
        environment: approval.environment.clone(),
        task_id: approval.task_id.clone(),
        purpose: approval.purpose.clone(),
        params: approval.params.clone().into_iter().collect(),
        call: approval.call.as_ref().map(|call| v1::ApprovalCall {
            method: call.method.clone(),
            target: call.target.clone(),
            body_sha256: call.body_sha256.clone(),
            graphql: call.graphql.clone(),
            content_type: call.content_type.clone(),
            rendering: call.rendering.clone(),
            calls: call.calls.clone(),
        }),
        created_at: Some(timestamp(approval.created_at)),
        expires_at: Some(timestamp(approval.expires_at)),
        required: approval.required,
        approvers: approval.approvers.clone(),
        confirm: approval
            .confirm
            .as_ref()
            .map(|(what, _)| what.clone())
            .unwrap_or_default(),
        approve_command: approval.approve_command(),
        approvals: approval
            .approvals
            .iter()
            .map(|decision| v1::ApprovalDecision {
                by: decision.by.clone(),
                at: Some(timestamp(decision.at)),
                reason: decision.reason.clone(),
            })
            .collect(),
        status: status as i32,
        status_reason: approval.status_reason.clone().unwrap_or_default(),
        summary: approval.summary(),
        rendered: approval.render(),
    }
}

/// STS credentials as the requester receives them. The only place their secret parts leave
/// their `Secret` wrappers: into the reply to the grant's own principal.
pub fn aws_to_wire(aws: &valet_service::AwsGrant) -> v1::AwsCredentials {
    let credentials = &aws.credentials;
    v1::AwsCredentials {
        access_key_id: credentials.access_key_id.clone(),
        secret_access_key: credentials
            .secret_access_key
            .expose_str()
            .unwrap_or_default()
            .to_string(),
        session_token: credentials
            .session_token
            .expose_str()
            .unwrap_or_default()
            .to_string(),
        expires_at: Some(timestamp(credentials.expires_at)),
        region: credentials.region.clone(),
        assumed_role_arn: credentials.assumed_role_arn.clone(),
        notice: aws.notice.clone(),
    }
}
