//! Waiting for an approval, the same way for `token request`, `token wait` and `exec`: what the
//! requester is told (the exact command an approver runs), how long it waits (until the request
//! expires, unless told otherwise), and what it prints when it stops waiting undecided.

use std::time::Duration;

use valet_client::{Client, ClientError, IssuedToken, v1};

use crate::output::{self, EXIT_DENIED};

/// How long valetd follows one wait; longer waits are made of several.
const LONGEST_ONE_WAIT: Duration = Duration::from_secs(3600);
/// How long `token wait` waits when told nothing and the request's expiry is not known.
const WAIT_WITHOUT_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// How long to wait: `None` until the request expires.
#[derive(Debug, Clone, Copy)]
pub struct WaitFor {
    pub limit: Option<Duration>,
    pub no_wait: bool,
}

/// Says what an approver must run for this request.
pub fn tell(approval: &v1::Approval) {
    eprintln!(
        "{} needs approval: request {}",
        approval.summary, approval.id
    );
    let approve = if approval.approve_command.is_empty() {
        format!("valet approve {}", approval.id)
    } else {
        approval.approve_command.clone()
    };
    eprintln!(
        "an approver reads it with `valet approvals show {}`, then runs `{approve}`",
        approval.id
    );
}

/// The issued token once the request is approved; `Err(code)` when it is still pending when the
/// wait ends (the pending grant and approval are printed as JSON with `json`).
pub async fn until_decided(
    client: &Client,
    issued: IssuedToken,
    wait: WaitFor,
    json: bool,
) -> anyhow::Result<Result<IssuedToken, i32>> {
    let Some(approval) = issued.approval.clone().filter(|_| issued.is_pending()) else {
        return Ok(Ok(issued));
    };
    tell(&approval);
    let pending = |approval: &v1::Approval| {
        if json {
            println!(
                "{}",
                serde_json::json!({"status": "pending", "approval": output::approval_json(approval), "grant": output::grant_json(&issued.grant)})
            );
        }
        eprintln!(
            "still waiting for a decision; resume with `valet token wait {}`",
            issued.grant.id
        );
        Ok(Err(EXIT_DENIED))
    };
    if wait.no_wait {
        return pending(&approval);
    }
    let until_expiry = approval
        .expires_at
        .as_ref()
        .map(|at| at.seconds - valet_core::Clock::now(&valet_core::SystemClock))
        .filter(|seconds| *seconds > 0)
        .map(|seconds| Duration::from_secs(seconds as u64 + 2));
    let limit = wait.limit.or(until_expiry).unwrap_or(WAIT_WITHOUT_EXPIRY);
    eprintln!(
        "waiting up to {} for a decision{}…",
        humantime::format_duration(limit),
        if wait.limit.is_none() && until_expiry.is_some() {
            " (until the request expires)"
        } else {
            ""
        }
    );
    match wait_in_turns(client, &issued.grant.id, limit).await {
        Ok(issued) => Ok(Ok(issued)),
        Err(ClientError::StillPending { .. }) => pending(&approval),
        Err(error) => Err(error.into()),
    }
}

/// Waits for `grant_id` for up to `limit`, in waits valetd accepts.
pub async fn wait_in_turns(
    client: &Client,
    grant_id: &str,
    limit: Duration,
) -> Result<IssuedToken, ClientError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let turn = left.min(LONGEST_ONE_WAIT).max(Duration::from_secs(1));
        match client.wait_for_grant(grant_id, turn).await {
            Err(ClientError::StillPending { .. })
                if tokio::time::Instant::now() + Duration::from_secs(1) < deadline =>
            {
                continue;
            }
            outcome => return outcome,
        }
    }
}
