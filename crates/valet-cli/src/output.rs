//! How the command line shows things: grant tables (aligned and coloured on a terminal, stable
//! tab-separated text when piped), relative times, JSON records, and errors as one sentence with a
//! hint where one helps.

use std::collections::BTreeMap;

use valet_client::{ClientError, v1};
use valet_core::UnixTime;
use valet_core::clock::format_time;

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_DENIED: i32 = 3;
pub const EXIT_UNREACHABLE: i32 = 4;

/// A usage mistake the argument parser could not catch (exit 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Where output goes: a person at a terminal, or a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Aligned columns and relative times, for a person; coloured unless `NO_COLOR` is set.
    Terminal {
        colour: bool,
    },
    Plain,
}

impl Style {
    /// The layout follows where stdout goes (a terminal, or a pipe); `NO_COLOR` turns colour off
    /// and changes nothing else.
    pub fn of_stdout() -> Style {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Style::Terminal {
                colour: std::env::var_os("NO_COLOR").is_none(),
            }
        } else {
            Style::Plain
        }
    }
}

/// Whether a grant can still be used: only active and pending grants have an expiry ahead.
fn is_live(grant: &v1::Grant) -> bool {
    matches!(
        v1::GrantStatus::try_from(grant.status),
        Ok(v1::GrantStatus::Active | v1::GrantStatus::Pending)
    )
}

pub fn status_name(status: i32) -> &'static str {
    match v1::GrantStatus::try_from(status).unwrap_or(v1::GrantStatus::Unspecified) {
        v1::GrantStatus::Pending => "pending",
        v1::GrantStatus::Active => "active",
        v1::GrantStatus::Revoked => "revoked",
        v1::GrantStatus::Expired => "expired",
        v1::GrantStatus::Denied => "denied",
        v1::GrantStatus::Unspecified => "unknown",
    }
}

fn seconds(at: &Option<prost_types::Timestamp>) -> Option<UnixTime> {
    at.as_ref().map(|at| at.seconds)
}

/// A wire time as RFC 3339 text; `unknown` when absent.
pub fn time_of(at: &Option<prost_types::Timestamp>) -> String {
    seconds(at).map_or_else(|| "unknown".to_string(), format_time)
}

/// A span of time in the largest two units: "42s", "4m 12s", "3h 5m", "2d 1h".
pub fn span(seconds: u64) -> String {
    let (days, hours, minutes, rest) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{rest}s"),
        (0, 0, _) if rest == 0 => format!("{minutes}m"),
        (0, 0, _) => format!("{minutes}m {rest}s"),
        (0, _, 0) => format!("{hours}h"),
        (0, _, _) => format!("{hours}h {minutes}m"),
        (_, 0, _) => format!("{days}d"),
        _ => format!("{days}d {hours}h"),
    }
}

/// "3m ago" or "in 3m" relative to `now`.
pub fn relative(at: UnixTime, now: UnixTime) -> String {
    if at <= now {
        format!("{} ago", span((now - at) as u64))
    } else {
        format!("in {}", span((at - now) as u64))
    }
}

/// The grant as a JSON object: the full record, times in RFC 3339.
pub fn grant_json(grant: &v1::Grant) -> serde_json::Value {
    let time = |at: &Option<prost_types::Timestamp>| seconds(at).map(format_time);
    serde_json::json!({
        "id": grant.id,
        "principal": grant.principal,
        "task": grant.task_id,
        "purpose": grant.purpose,
        "scope": grant.scope,
        "environment": grant.environment,
        "audience": grant.audience,
        "params": grant.params.iter().collect::<BTreeMap<_, _>>(),
        "issued_at": time(&grant.issued_at),
        "expires_at": time(&grant.expires_at),
        "max_expires_at": time(&grant.max_expires_at),
        "uses": grant.uses,
        "max_uses": (grant.max_uses > 0).then_some(grant.max_uses),
        "status": status_name(grant.status),
        "status_reason": (!grant.status_reason.is_empty()).then_some(&grant.status_reason),
        "key_id": grant.key_id,
    })
}

/// One line about a grant, for stderr after a request and for `grants watch`.
pub fn grant_summary(grant: &v1::Grant, now: UnixTime) -> String {
    let expires = seconds(&grant.expires_at)
        .map(|at| {
            if is_live(grant) {
                format!("expires {} ({})", format_time(at), relative(at, now))
            } else if at > now {
                // Ended before its time: no "expires in" as if it were live.
                format!("ended early; it was to expire {}", format_time(at))
            } else {
                format!("ended {}", format_time(at))
            }
        })
        .unwrap_or_default();
    format!(
        "grant {} for {} task {} (scope {}, environment {}), {}, {}",
        grant.id,
        grant.principal,
        grant.task_id,
        grant.scope,
        grant.environment,
        status_name(grant.status),
        expires
    )
}

const PLAIN_COLUMNS: [&str; 9] = [
    "ID",
    "PRINCIPAL",
    "TASK",
    "SCOPE",
    "ENV",
    "ISSUED_AT",
    "EXPIRES_AT",
    "USES",
    "STATUS",
];
const COLUMNS: [&str; 9] = [
    "ID",
    "PRINCIPAL",
    "TASK",
    "SCOPE",
    "ENV",
    "ISSUED",
    "EXPIRES IN",
    "USES",
    "STATUS",
];

/// The grant table. On a terminal: aligned columns, times relative to `now`, status coloured.
/// Piped: one tab-separated line per grant under a header, times in RFC 3339 — stable for scripts.
pub fn grant_table(grants: &[v1::Grant], now: UnixTime, style: Style) -> String {
    let rows: Vec<[String; 9]> = grants
        .iter()
        .map(|grant| {
            let issued = seconds(&grant.issued_at).unwrap_or(0);
            let expires = seconds(&grant.expires_at).unwrap_or(0);
            let (issued, expires) = match style {
                Style::Terminal { .. } => (
                    relative(issued, now),
                    if expires > now && is_live(grant) {
                        span((expires - now) as u64)
                    } else if expires > now {
                        // Revoked or denied before its time: it ends with its status, not later.
                        "—".to_string()
                    } else {
                        format!("ended {}", relative(expires, now))
                    },
                ),
                Style::Plain => (format_time(issued), format_time(expires)),
            };
            let uses = if grant.max_uses > 0 {
                format!("{}/{}", grant.uses, grant.max_uses)
            } else {
                grant.uses.to_string()
            };
            [
                grant.id.clone(),
                grant.principal.clone(),
                grant.task_id.clone(),
                grant.scope.clone(),
                grant.environment.clone(),
                issued,
                expires,
                uses,
                status_name(grant.status).to_string(),
            ]
        })
        .collect();
    let mut out = String::new();
    match style {
        Style::Plain => {
            // Absolute times here, so the headers say so.
            out.push_str(&PLAIN_COLUMNS.join("\t"));
            out.push('\n');
            for row in rows {
                out.push_str(&row.join("\t"));
                out.push('\n');
            }
        }
        Style::Terminal { colour } => {
            let mut widths = COLUMNS.map(str::len);
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                let mut text = String::new();
                for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
                    let visible = cell.chars().count();
                    let cell = if index == 8 && colour {
                        colour_status(cell)
                    } else {
                        cell.clone()
                    };
                    text.push_str(&cell);
                    if index < 8 {
                        text.push_str(&" ".repeat(width - visible + 2));
                    }
                }
                text.trim_end().to_string() + "\n"
            };
            out.push_str(&line(
                COLUMNS.iter().map(|column| column.to_string()).collect(),
            ));
            for row in rows {
                out.push_str(&line(row.to_vec()));
            }
            if grants.is_empty() {
                out.push_str("(no grants)\n");
            }
        }
    }
    out
}

fn colour_status(status: &str) -> String {
    let code = match status {
        "active" => "32",
        "revoked" | "denied" => "31",
        "expired" => "33",
        "pending" => "36",
        _ => return status.to_string(),
    };
    format!("\x1b[{code}m{status}\x1b[0m")
}

pub fn approval_status_name(status: i32) -> &'static str {
    match v1::ApprovalStatus::try_from(status).unwrap_or(v1::ApprovalStatus::Unspecified) {
        v1::ApprovalStatus::Pending => "pending",
        v1::ApprovalStatus::Approved => "approved",
        v1::ApprovalStatus::Denied => "denied",
        v1::ApprovalStatus::Expired => "expired",
        v1::ApprovalStatus::Consumed => "used",
        v1::ApprovalStatus::Unspecified => "unknown",
    }
}

/// The approval as a JSON object.
pub fn approval_json(approval: &v1::Approval) -> serde_json::Value {
    let time = |at: &Option<prost_types::Timestamp>| seconds(at).map(format_time);
    serde_json::json!({
        "id": approval.id,
        "kind": approval.kind,
        "summary": approval.summary,
        "rendered": approval.rendered,
        "grant_id": approval.grant_id,
        "requester": approval.requester,
        "scope": approval.scope,
        "environment": approval.environment,
        "task": approval.task_id,
        "purpose": approval.purpose,
        "params": approval.params.iter().collect::<BTreeMap<_, _>>(),
        "call": approval.call.as_ref().map(|call| serde_json::json!({
            "method": call.method, "target": call.target, "body_sha256": call.body_sha256,
            "graphql": call.graphql, "content_type": call.content_type, "rendering": call.rendering,
            "calls": call.calls,
        })),
        "created_at": time(&approval.created_at),
        "expires_at": time(&approval.expires_at),
        "required": approval.required,
        "approvers": approval.approvers,
        "confirm": (!approval.confirm.is_empty()).then_some(&approval.confirm),
        "approvals": approval.approvals.iter().map(|decision| serde_json::json!({"by": decision.by, "at": time(&decision.at), "reason": decision.reason})).collect::<Vec<_>>(),
        "status": approval_status_name(approval.status),
        "status_reason": (!approval.status_reason.is_empty()).then_some(&approval.status_reason),
    })
}

/// Pending (or all) approvals: one line each.
pub fn approval_table(approvals: &[v1::Approval], now: UnixTime, style: Style) -> String {
    let mut out = String::new();
    let header = ["ID", "STATUS", "APPROVALS", "EXPIRES", "SUMMARY"];
    if style == Style::Plain {
        out.push_str(&header.join("\t"));
        out.push('\n');
    } else {
        out.push_str(&format!(
            "{:<32}  {:<9}  {:<9}  {:<10}  {}\n",
            header[0], header[1], header[2], header[3], header[4]
        ));
    }
    for approval in approvals {
        let count = format!("{}/{}", approval.approvals.len(), approval.required);
        let expires = seconds(&approval.expires_at)
            .map(|at| {
                if style == Style::Plain {
                    format_time(at)
                } else {
                    relative(at, now)
                }
            })
            .unwrap_or_default();
        let status = approval_status_name(approval.status);
        if style == Style::Plain {
            out.push_str(
                &[
                    approval.id.as_str(),
                    status,
                    &count,
                    &expires,
                    &approval.summary,
                ]
                .join("\t"),
            );
            out.push('\n');
        } else {
            out.push_str(&format!(
                "{:<32}  {:<9}  {:<9}  {:<10}  {}\n",
                approval.id, status, count, expires, approval.summary
            ));
        }
    }
    if approvals.is_empty() && matches!(style, Style::Terminal { .. }) {
        out.push_str("(no approval requests)\n");
    }
    out
}

/// Agent- and operator-written text as every place an operator reads it shows it.
pub use valet_core::approval::escape_for_people;

/// Everything an approver should read before deciding.
pub fn approval_details(approval: &v1::Approval, now: UnixTime) -> String {
    // What is asked, as valetd renders it for every approver (CLI, webhook, console alike).
    let mut out = format!("approval {}\n", approval.id);
    for line in approval.rendered.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str(&format!(
        "  status:      {}{}\n",
        approval_status_name(approval.status),
        if approval.status_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", escape_for_people(&approval.status_reason))
        }
    ));
    if let Some(call) = &approval.call {
        out.push_str(&format!("  body sha256: {}\n", call.body_sha256));
    }
    if let Some(expires) = seconds(&approval.expires_at) {
        out.push_str(&format!(
            "  expires:     {} ({})\n",
            format_time(expires),
            relative(expires, now)
        ));
    }
    let approvers = if approval.approvers.is_empty() {
        "any operator or admin".to_string()
    } else {
        approval.approvers.join(", ")
    };
    out.push_str(&format!(
        "  needs:       {} approval(s) from {approvers}\n",
        approval.required
    ));
    for decision in &approval.approvals {
        out.push_str(&format!(
            "  approved by: {}{}\n",
            decision.by,
            if decision.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", escape_for_people(&decision.reason))
            }
        ));
    }
    if !approval.confirm.is_empty() {
        out.push_str(&format!(
            "  to approve, type the {}: valet approve {} --confirm VALUE\n",
            approval.confirm, approval.id
        ));
    }
    out
}

/// The status a shell gives a command killed by SIGPIPE (128 + 13): what `valet … | head` ends
/// with once `head` has read enough.
pub const EXIT_CLOSED_STDOUT: i32 = 141;

/// Whether an error is stdout having been closed by its reader.
pub fn is_closed_stdout(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Rust ignores SIGPIPE, so a write to a closed pipe fails, and `println!` panics on that
/// failure. This makes that one case end the process quietly with [`EXIT_CLOSED_STDOUT`]; every
/// other panic reports as before.
pub fn end_quietly_on_a_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("Broken pipe") || message.contains("BrokenPipe") {
            std::process::exit(EXIT_CLOSED_STDOUT);
        }
        report(info);
    }));
}

/// A command that failed at something other than a refusal (a config reload valetd could not
/// apply, say): exit 1.
#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

/// The exit code for an error: usage, denied and unreachable have their own.
pub fn exit_code_of(error: &anyhow::Error) -> i32 {
    if error.downcast_ref::<UsageError>().is_some() {
        return EXIT_USAGE;
    }
    if error.downcast_ref::<Failed>().is_some() {
        return EXIT_FAILURE;
    }
    match error.downcast_ref::<ClientError>() {
        Some(
            ClientError::Unreachable { .. }
            | ClientError::BadServerUrl { .. }
            | ClientError::Transport { .. },
        ) => EXIT_UNREACHABLE,
        Some(
            ClientError::NoKey | ClientError::TlsFile { .. } | ClientError::IdentityToken { .. },
        ) => EXIT_USAGE,
        Some(
            ClientError::Verify(_)
            | ClientError::NotApproved { .. }
            | ClientError::StillPending { .. },
        ) => EXIT_DENIED,
        Some(client_error) => match client_error.code() {
            Some(
                tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::FailedPrecondition
                | tonic::Code::InvalidArgument,
            ) => EXIT_DENIED,
            Some(tonic::Code::Unavailable) => EXIT_UNREACHABLE,
            _ => EXIT_FAILURE,
        },
        None => EXIT_FAILURE,
    }
}

/// An error as the user sees it: `valet: <what was wrong and what is allowed>`, then a hint.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut text = format!("valet: {error}");
    for cause in error.chain().skip(1) {
        text.push_str(&format!(": {cause}"));
    }
    text.push('\n');
    let hint = match error.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) => Some("is valetd running at that address?"),
        Some(ClientError::NoKey) => Some(
            "a key comes from `valet keygen`; a workload identity token or client certificate from your platform (docs/identity.md).",
        ),
        Some(ClientError::BadServerUrl { .. }) => {
            Some("write the server as https://HOST:PORT (or http://127.0.0.1:PORT on loopback).")
        }
        Some(client_error) => {
            let message = client_error.to_string();
            match client_error.code() {
                Some(tonic::Code::Unauthenticated) if message.contains("principal key") => Some(
                    "check VALET_KEY or --key-file: valetd knows a principal by the SHA-256 of its key (`valet keygen` prints both).",
                ),
                Some(tonic::Code::Unauthenticated) => Some(
                    "check the credential (VALET_KEY, VALET_IDENTITY_TOKEN_FILE or the client certificate) against the principal's entry in valetd's config (docs/identity.md).",
                ),
                Some(tonic::Code::PermissionDenied)
                    if message.contains("may not request scope") =>
                {
                    Some(
                        "the scopes a principal may request are its [[principal]] scopes in valetd's config; `valet whoami` lists them.",
                    )
                }
                Some(tonic::Code::PermissionDenied) if message.contains("role") => Some(
                    "roles are set in the principal's [[principal]] roles in valetd's config; `valet whoami` shows yours.",
                ),
                Some(tonic::Code::ResourceExhausted) => {
                    Some("wait as long as the message says, then retry.")
                }
                Some(tonic::Code::Unavailable) if message.contains("fail closed") => Some(
                    "valetd refused to act without a durable record; its log has the request id.",
                ),
                _ => None,
            }
        }
        None => None,
    };
    if let Some(hint) = hint {
        text.push_str(&format!("hint: {hint}\n"));
    }
    text
}

#[cfg(test)]
mod tests;
