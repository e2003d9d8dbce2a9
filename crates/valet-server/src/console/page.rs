//! The console's HTML: every page and fragment, rendered on the server from service records.
//! Every value is escaped; no token, credential or secret is ever among what is rendered (grants
//! and approvals hold none).

use valet_core::UnixTime;
use valet_core::approval::{ApprovalRequest, ApprovalStatus};
use valet_core::clock::format_time;
use valet_core::grant::Grant;
use valet_service::{ChainCheck, WrittenRecord};

use super::form::encode;

/// Text made safe for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    // First as every place an operator reads agent text shows it (disguising characters written
    // out), then for HTML.
    let text = valet_core::approval::escape_for_people(text);
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Text of several lines (a rendered approval), each line escaped as [`escape`] escapes.
pub fn escape_lines(text: &str) -> String {
    text.lines().map(escape).collect::<Vec<_>>().join("\n")
}

/// Who is logged in, for the page header and every form.
pub struct Session<'a> {
    pub principal: &'a str,
    pub csrf: &'a str,
    pub expires_at: UnixTime,
}

/// The sections of the console, for the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Approvals,
    Grants,
    Audit,
    Sessions,
    None,
}

/// A whole page.
pub fn layout(title: &str, section: Section, session: Option<&Session>, body: &str) -> String {
    let nav = match session {
        None => String::new(),
        Some(session) => {
            let link = |target: Section, href: &str, label: &str| {
                let current = if target == section {
                    " aria-current=\"page\""
                } else {
                    ""
                };
                format!("<a href=\"{href}\"{current}>{label}</a>")
            };
            format!(
                "<nav>{}{}{}{}<span class=\"who\">{} · session until {}</span>{}</nav>",
                link(Section::Approvals, "/approvals", "Approvals"),
                link(Section::Grants, "/grants", "Grants"),
                link(Section::Audit, "/audit", "Audit"),
                link(Section::Sessions, "/sessions", "Sessions"),
                escape(session.principal),
                format_time(session.expires_at),
                form(
                    "/logout",
                    session.csrf,
                    "",
                    "<button type=\"submit\">Log out</button>"
                ),
            )
        }
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Valet</title>\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<link rel=\"stylesheet\" href=\"/assets/console.css\"><script src=\"/assets/console.js\" defer></script></head>\
<body><header><strong>Valet</strong>{nav}</header><main>{body}</main></body></html>",
        escape(title)
    )
}

/// A POST form with the session's CSRF token.
pub fn form(action: &str, csrf: &str, class: &str, inner: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"{class}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">{inner}</form>",
        escape(action),
        escape(csrf)
    )
}

fn time_left(at: UnixTime, now: UnixTime) -> String {
    let seconds = at - now;
    if seconds <= 0 {
        return format!("{} (passed)", format_time(at));
    }
    format!("{} (in {}s)", format_time(at), seconds)
}

/// The approvals inbox: pending requests first, then the latest decided ones.
pub fn approvals(
    session: &Session,
    pending: &[ApprovalRequest],
    decided: &[ApprovalRequest],
    now: UnixTime,
) -> String {
    let body = format!(
        "<h1>Approvals</h1><p class=\"live\" data-live=\"approvals\">Pending requests appear here as they arrive.</p>{}<h2>Decided</h2>{}",
        pending_list(session, pending, now),
        decided_table(decided),
    );
    layout("Approvals", Section::Approvals, Some(session), &body)
}

/// The pending requests, as the live inbox replaces them.
pub fn pending_list(session: &Session, pending: &[ApprovalRequest], now: UnixTime) -> String {
    let cards: String = pending
        .iter()
        .map(|approval| approval_card(session, approval, now))
        .collect();
    let empty = if pending.is_empty() {
        "<p class=\"empty\">Nothing waits for a decision.</p>"
    } else {
        ""
    };
    format!("<section id=\"pending\">{empty}{cards}</section>")
}

/// One pending request: exactly what will run (the canonical rendering the CLI and the webhook
/// show), who asked and why, and the approve and deny forms.
pub fn approval_card(session: &Session, approval: &ApprovalRequest, now: UnixTime) -> String {
    let id = escape(&approval.id);
    let confirm = match &approval.confirm {
        Some((what, expected)) => format!(
            "<label>Type the {what} <code>{expected}</code> to approve <input name=\"confirm\" autocomplete=\"off\" required data-expected=\"{expected}\"></label>",
            what = escape(what),
            expected = escape(expected),
        ),
        None => String::new(),
    };
    let decisions: String = approval
        .approvals
        .iter()
        .map(|decision| {
            format!(
                "<li>approved by {} at {}{}</li>",
                escape(&decision.by),
                format_time(decision.at),
                reason_suffix(&decision.reason)
            )
        })
        .collect();
    let decisions = if decisions.is_empty() {
        String::new()
    } else {
        format!("<ul class=\"decisions\">{decisions}</ul>")
    };
    let decide = if approval.status == ApprovalStatus::Pending {
        format!(
            "<div class=\"decide\">{}{}</div>",
            form(
                &format!("/approvals/{}/approve", approval.id),
                session.csrf,
                "approve",
                &format!(
                    "{confirm}<label>Reason <input name=\"reason\" autocomplete=\"off\"></label><button type=\"submit\">Approve</button>"
                ),
            ),
            form(
                &format!("/approvals/{}/deny", approval.id),
                session.csrf,
                "deny",
                "<label>Reason <input name=\"reason\" autocomplete=\"off\" required></label><button type=\"submit\">Deny</button>",
            ),
        )
    } else {
        format!(
            "<p class=\"status\">{}{}</p>",
            approval.status,
            approval
                .status_reason
                .as_deref()
                .map(reason_suffix)
                .unwrap_or_default()
        )
    };
    format!(
        "<article class=\"approval\" data-approval-id=\"{id}\" id=\"approval-{id}\">\
<h3><a href=\"/approvals/{id}\">{id}</a> · {kind} · {environment}</h3>\
<pre class=\"rendered\">{rendered}</pre>\
<dl><dt>Requester</dt><dd>{requester}</dd><dt>Task</dt><dd>{task}</dd><dt>Purpose</dt><dd>{purpose}</dd>\
<dt>Scope</dt><dd>{scope}</dd><dt>Environment</dt><dd>{environment}</dd><dt>Expires</dt><dd>{expires}</dd>\
<dt>Approvals needed</dt><dd>{required}</dd></dl>{decisions}{decide}</article>",
        kind = match approval.kind {
            valet_core::approval::ApprovalKind::Token => "token",
            valet_core::approval::ApprovalKind::Call => "call",
        },
        environment = escape(&approval.environment),
        rendered = escape_lines(&approval.render()),
        requester = escape(&approval.requester),
        task = escape(&approval.task_id),
        purpose = escape(&approval.purpose),
        scope = escape(&approval.scope),
        expires = time_left(approval.expires_at, now),
        required = approval.required,
    )
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {}", escape(reason))
    }
}

fn decided_table(decided: &[ApprovalRequest]) -> String {
    if decided.is_empty() {
        return "<p class=\"empty\">No decided requests are kept.</p>".into();
    }
    let rows: String = decided
        .iter()
        .map(|approval| {
            let who = approval
                .approvals
                .iter()
                .map(|decision| decision.by.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "<tr data-approval-id=\"{id}\"><td><a href=\"/approvals/{id}\">{id}</a></td><td>{requester}</td><td>{summary}</td><td>{status}</td><td>{who}</td><td>{why}</td><td>{at}</td></tr>",
                id = escape(&approval.id),
                requester = escape(&approval.requester),
                summary = escape(&approval.summary()),
                status = approval.status,
                who = escape(&who),
                why = escape(&approval.status_reason.clone().unwrap_or_else(|| {
                    approval
                        .approvals
                        .iter()
                        .filter(|decision| !decision.reason.is_empty())
                        .map(|decision| format!("{}: {}", decision.by, decision.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                })),
                at = format_time(approval.updated_at),
            )
        })
        .collect();
    format!(
        "<table class=\"decided\"><thead><tr><th>Request</th><th>Requester</th><th>What</th><th>Decision</th><th>By</th><th>Why</th><th>At</th></tr></thead><tbody>{rows}</tbody></table>"
    )
}

/// One approval request on its own page (the webhook's link).
pub fn approval(session: &Session, approval: &ApprovalRequest, now: UnixTime) -> String {
    let body = format!(
        "<h1>Approval {}</h1>{}",
        escape(&approval.id),
        approval_card(session, approval, now)
    );
    layout("Approval", Section::Approvals, Some(session), &body)
}

/// The statuses the grants table filters on: `any`, or one grant status.
pub const STATUS_CHOICES: [&str; 6] = ["active", "pending", "revoked", "expired", "denied", "any"];

/// The grant filters the table and its live updates use.
#[derive(Default, Clone)]
pub struct GrantFilterFields {
    pub environment: String,
    pub principal: String,
    pub scope: String,
    pub task: String,
    /// One of [`STATUS_CHOICES`].
    pub status: String,
}

impl GrantFilterFields {
    pub fn query(&self) -> String {
        format!(
            "environment={}&principal={}&scope={}&task={}&status={}",
            encode(&self.environment),
            encode(&self.principal),
            encode(&self.scope),
            encode(&self.task),
            encode(&self.status)
        )
    }
}

/// The live grants table, its filters, and the panic button.
pub fn grants(
    session: &Session,
    grants: &[Grant],
    more: bool,
    filter: &GrantFilterFields,
    now: UnixTime,
    notice: Option<&str>,
) -> String {
    let notice = notice
        .map(|text| format!("<p class=\"notice\" role=\"status\">{}</p>", escape(text)))
        .unwrap_or_default();
    let input = |name: &str, value: &str| {
        format!(
            "<label>{name} <input name=\"{name}\" value=\"{}\"></label>",
            escape(value)
        )
    };
    let statuses: String = STATUS_CHOICES
        .iter()
        .map(|choice| {
            let selected = if *choice == filter.status {
                " selected"
            } else {
                ""
            };
            format!("<option value=\"{choice}\"{selected}>{choice}</option>")
        })
        .collect();
    let filters = format!(
        "<form method=\"get\" action=\"/grants\" class=\"filters\">{}{}{}{}<label>status <select name=\"status\">{statuses}</select></label><button type=\"submit\">Filter</button></form>",
        input("environment", &filter.environment),
        input("principal", &filter.principal),
        input("scope", &filter.scope),
        input("task", &filter.task),
    );
    let panic = form(
        "/revoke-all",
        session.csrf,
        "panic",
        "<h2>Revoke all</h2><p>Ends every live grant of one principal, scope or environment at once.</p>\
<label>Of <select name=\"target\"><option value=\"environment\">environment</option><option value=\"principal\">principal</option><option value=\"scope\">scope</option></select></label>\
<label>Named <input name=\"name\" required autocomplete=\"off\"></label>\
<label>Reason <input name=\"reason\" required autocomplete=\"off\"></label>\
<label>Type <code>revoke all</code> to confirm <input name=\"confirm\" required autocomplete=\"off\"></label>\
<button type=\"submit\" class=\"danger\">Revoke all</button>",
    );
    let body = format!(
        "{notice}<h1>Grants</h1>{filters}<p class=\"live\" data-live=\"grants\" data-query=\"{}\">Rows change as grants are issued, used, renewed and revoked.</p>{}{panic}",
        escape(&filter.query()),
        grants_table(session, grants, more, now),
    );
    layout("Grants", Section::Grants, Some(session), &body)
}

/// The grants table, as the live view replaces it; says so when more grants match than it shows.
pub fn grants_table(session: &Session, grants: &[Grant], more: bool, now: UnixTime) -> String {
    let rows: String = grants
        .iter()
        .rev()
        .map(|grant| grant_row(session, grant, now))
        .collect();
    let more = if more {
        format!(
            "<p class=\"more\">More grants match than the {} shown (the oldest of them); narrow the filters to see the rest. New grants are added as they are issued.</p>",
            grants.len()
        )
    } else {
        String::new()
    };
    format!(
        "<div id=\"grants\">{more}<table><thead><tr><th>Grant</th><th>Principal</th><th>Scope</th><th>Environment</th><th>Task</th><th>Status</th><th>Uses</th><th>Expires</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"
    )
}

/// One row of the grants table, as the live view adds or replaces it.
pub fn grant_row(session: &Session, grant: &Grant, now: UnixTime) -> String {
    let status = grant.status_at(now);
    let revoke = revoke_form(
        session,
        grant,
        now,
        "<input name=\"reason\" placeholder=\"reason\" autocomplete=\"off\" aria-label=\"reason\"><button type=\"submit\">Revoke</button>",
    );
    format!(
        "<tr data-grant-id=\"{id}\" data-status=\"{status}\"><td><a href=\"/grants/{id}\">{id}</a></td><td>{principal}</td><td>{scope}</td><td>{environment}</td><td>{task}</td><td class=\"status\">{status}</td><td>{uses}</td><td>{expires}</td><td>{revoke}</td></tr>",
        id = escape(&grant.id),
        principal = escape(&grant.principal),
        scope = escape(&grant.scope),
        environment = escape(&grant.environment),
        task = escape(&grant.task_id),
        uses = match grant.max_uses {
            Some(max) => format!("{}/{max}", grant.uses),
            None => grant.uses.to_string(),
        },
        expires = format_time(grant.expires_at),
    )
}

/// The form that revokes `grant` (with `fields`), when it is still live.
fn revoke_form(session: &Session, grant: &Grant, now: UnixTime, fields: &str) -> String {
    if grant.is_live(now) {
        form(
            &format!("/grants/{}/revoke", grant.id),
            session.csrf,
            "revoke",
            fields,
        )
    } else {
        String::new()
    }
}

/// One grant, its audit trail, and the revoke forms for it and its task.
pub fn grant(session: &Session, grant: &Grant, trail: &[WrittenRecord], now: UnixTime) -> String {
    let params: String = grant
        .params
        .iter()
        .map(|(name, value)| format!("<li>{} = {}</li>", escape(name), escape(value)))
        .collect();
    let trail_rows: String = trail.iter().map(record_item).collect();
    let revoke = revoke_form(
        session,
        grant,
        now,
        "<label>Reason <input name=\"reason\" autocomplete=\"off\"></label><button type=\"submit\">Revoke this grant</button>",
    );
    let revoke_task = form(
        "/tasks/revoke",
        session.csrf,
        "revoke-task",
        &format!(
            "<input type=\"hidden\" name=\"task\" value=\"{}\"><label>Reason <input name=\"reason\" autocomplete=\"off\"></label><button type=\"submit\">Revoke every grant of task {}</button>",
            escape(&grant.task_id),
            escape(&grant.task_id)
        ),
    );
    let body = format!(
        "<h1>Grant {id}</h1><dl><dt>Principal</dt><dd>{principal}</dd><dt>Scope</dt><dd>{scope}</dd>\
<dt>Environment</dt><dd>{environment}</dd><dt>Task</dt><dd>{task}</dd><dt>Purpose</dt><dd>{purpose}</dd>\
<dt>Status</dt><dd class=\"status\">{status}{why}</dd><dt>Issued</dt><dd>{issued}</dd><dt>Expires</dt><dd>{expires}</dd>\
<dt>Uses</dt><dd>{uses}</dd><dt>Parameters</dt><dd><ul>{params}</ul></dd></dl>{revoke}{revoke_task}\
<h2>Audit trail</h2><p>Records naming this grant among the latest {window}.</p><ul class=\"trail\">{trail_rows}</ul>",
        id = escape(&grant.id),
        principal = escape(&grant.principal),
        scope = escape(&grant.scope),
        environment = escape(&grant.environment),
        task = escape(&grant.task_id),
        purpose = escape(&grant.purpose),
        status = grant.status_at(now),
        why = grant
            .status_reason
            .as_deref()
            .map(reason_suffix)
            .unwrap_or_default(),
        issued = format_time(grant.issued_at),
        expires = format_time(grant.expires_at),
        uses = grant.uses,
        window = valet_service::TRAIL_WINDOW,
    );
    layout("Grant", Section::Grants, Some(session), &body)
}

/// The audit chain's status and its latest records.
pub fn audit(
    session: &Session,
    head: &valet_core::audit::ChainHead,
    check: Option<&ChainCheck>,
    tail: &[WrittenRecord],
) -> String {
    let check = match check {
        None => "<p class=\"check\">Not verified since valetd started.</p>".to_string(),
        Some(check) => match &check.outcome {
            Ok(summary) => format!(
                "<p class=\"check ok\">Verified at {}: {} records up to #{} (head {}), every MAC checked{}.</p>",
                format_time(check.at),
                summary.n_records,
                summary.head.sequence,
                escape(&summary.head.hash),
                match summary.attested_through {
                    Some(through) => format!(", signed checkpoints attest through #{through}"),
                    None => String::new(),
                }
            ),
            Err(broken) => format!(
                "<p class=\"check broken\" role=\"alert\">BROKEN at {}: {}</p>",
                format_time(check.at),
                escape(broken)
            ),
        },
    };
    let records: String = tail.iter().rev().map(record_item).collect();
    let body = format!(
        "<h1>Audit</h1><dl><dt>Head valetd recorded</dt><dd>#{} <code>{}</code></dd></dl>{check}{}<h2>Latest records</h2><ul class=\"trail\">{records}</ul>",
        head.sequence,
        escape(&head.hash),
        form(
            "/audit/verify",
            session.csrf,
            "",
            "<button type=\"submit\">Verify the chain now</button>"
        ),
    );
    layout("Audit", Section::Audit, Some(session), &body)
}

/// One audit record: its time, action, outcome, who and why on one line, the record itself (as
/// written, root credentials already redacted by the writer) under it.
fn record_item(record: &WrittenRecord) -> String {
    let value: serde_json::Value = serde_json::from_str(&record.line).unwrap_or_default();
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|field| field.as_str())
            .unwrap_or("")
    };
    let who = match (field("principal"), field("auth_method")) {
        ("", _) => String::new(),
        (principal, "") => format!(" · {principal}"),
        (principal, method) => format!(" · {principal} ({method})"),
    };
    let why = match field("reason") {
        "" => String::new(),
        reason => format!(" · {reason}"),
    };
    format!(
        "<li><span class=\"record\">#{} {} <strong>{}</strong> {}{}{}</span><details><summary>record</summary><code>{}</code></details></li>",
        record.sequence,
        escape(field("time")),
        escape(field("action")),
        escape(field("outcome")),
        escape(&who),
        escape(&why),
        escape(&record.line)
    )
}

/// The login link's landing page: a button, so a link unfurled by a chat tool is not spent.
pub fn login(link: &str) -> String {
    let body = format!(
        "<h1>Log in to the Valet console</h1><p>This single-use link opens one console session in this browser, with the code <code>valet console</code> showed where it ran. The link alone opens nothing: if you did not just run <code>valet console</code>, do not type a code here.</p>\
<form method=\"post\" action=\"/login\"><input type=\"hidden\" name=\"link\" value=\"{}\"><label>Code <input name=\"code\" id=\"code\" autocomplete=\"one-time-code\" placeholder=\"XXXX-XXXX\" required></label> <button type=\"submit\" id=\"login\">Open the console</button></form>",
        escape(link)
    );
    layout("Log in", Section::None, None, &body)
}

/// The console sessions open now, each with its credential and an end button.
pub fn sessions(
    session: &Session,
    own_id: &str,
    open: &[valet_service::OpenSession],
    now: UnixTime,
) -> String {
    let rows: String = open
        .iter()
        .map(|open| {
            let pass = &open.pass;
            let standing = match &open.credential_accepted {
                Ok(()) => "in force".to_string(),
                Err(reason) => format!("ends at its next request: {reason}"),
            };
            let end = if pass.id == own_id {
                "this session (log out to end it)".to_string()
            } else {
                form(
                    &format!("/sessions/{}/end", pass.id),
                    session.csrf,
                    "",
                    "<button type=\"submit\">End</button>",
                )
            };
            format!(
                "<tr data-session-id=\"{id}\"><td><code>{id}</code></td><td>{principal}</td><td>{credential}</td><td>{opened}</td><td>{expires}</td><td>{standing}</td><td>{end}</td></tr>",
                id = escape(&pass.id),
                principal = escape(&pass.principal),
                credential = escape(&pass.credential.describe()),
                opened = format_time(pass.issued_at),
                expires = time_left(pass.expires_at, now),
                standing = escape(&standing),
            )
        })
        .collect();
    let body = format!(
        "<h1>Console sessions</h1><p>Every console session open on any replica, with the credential that opened it: a session ends when that credential is no longer accepted (a rotated key, a removed certificate CA or identity binding), when it expires, when its operator logs out, or when an operator ends it here.</p>\
<table><thead><tr><th>Session</th><th>Principal</th><th>Opened with</th><th>Opened</th><th>Expires</th><th>Credential</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    );
    layout("Sessions", Section::Sessions, Some(session), &body)
}

/// After login: a same-site navigation to the inbox, so the new SameSite=Strict cookie is sent
/// even when the link was opened from another site.
pub fn logged_in(principal: &str) -> String {
    let body = format!(
        "<h1>Logged in as {}</h1><p><a href=\"/approvals\" id=\"continue\">Continue to the console</a></p>",
        escape(principal)
    );
    layout("Logged in", Section::None, None, &body).replace(
        "<meta charset=\"utf-8\">",
        "<meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url=/approvals\">",
    )
}

/// A refusal or failure, with what was wrong and what to do.
pub fn error(status: http::StatusCode, message: &str, session: Option<&Session>) -> String {
    let advice = if status == http::StatusCode::UNAUTHORIZED {
        "<p>Run <code>valet console</code> to get a login link.</p>"
    } else {
        "<p><a href=\"/approvals\">Back to the console</a></p>"
    };
    let body = format!(
        "<h1>{} {}</h1><p class=\"error\" role=\"alert\">{}</p>{advice}",
        status.as_u16(),
        escape(status.canonical_reason().unwrap_or("")),
        escape(message)
    );
    layout("Refused", Section::None, session, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }
}
