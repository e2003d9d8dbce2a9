//! Approval settings in the config: `[scope.approval]`, a rule's `approval`, and `[approvals]`.

use std::collections::BTreeMap;

use super::raw::{RawApproval, RawRuleApproval};
use super::{ParamRule, Problems, invalid};
use crate::approval::{ApprovalPolicy, Approver, Confirm, DEFAULT_APPROVAL_TIMEOUT};

pub(super) fn build_policy(
    raw: RawApproval,
    at: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Option<ApprovalPolicy> {
    let mut approvers = Vec::new();
    for (index, text) in raw.approvers.iter().enumerate() {
        match Approver::parse(text) {
            Some(approver) => approvers.push(approver),
            None => problems.push(
                format!("{at}.approvers[{index}]"),
                invalid(
                    text,
                    "approver",
                    "a principal name, or role:operator / role:admin",
                ),
            ),
        }
    }
    let count = match raw.count {
        None => 1,
        Some(count) if (1..=16).contains(&count) => count as u32,
        Some(count) => {
            problems.push(
                format!("{at}.count"),
                invalid(
                    &count.to_string(),
                    "approver count",
                    "a whole number from 1 to 16",
                ),
            );
            return None;
        }
    };
    if !approvers.is_empty()
        && approvers
            .iter()
            .all(|approver| matches!(approver, Approver::Principal(_)))
        && approvers.len() < count as usize
    {
        problems.push(
            format!("{at}.count"),
            invalid(
                &count.to_string(),
                "approver count",
                &format!(
                    "at most the {} principals listed in approvers",
                    approvers.len()
                ),
            ),
        );
    }
    let timeout = match raw.timeout {
        Some(text) => problems.duration(Some(text), &format!("{at}.timeout"))?,
        None => DEFAULT_APPROVAL_TIMEOUT,
    };
    let confirm = match raw.confirm.as_deref() {
        None => None,
        Some("environment") => Some(Confirm::Environment),
        Some(name) if params.contains_key(name) => Some(Confirm::Param(name.to_string())),
        Some(name) => {
            let declared = params.keys().cloned().collect::<Vec<_>>().join(", ");
            problems.push(
                format!("{at}.confirm"),
                invalid(
                    name,
                    "confirmation",
                    &format!("\"environment\" or one of this scope's params [{declared}]"),
                ),
            );
            return None;
        }
    };
    Some(ApprovalPolicy {
        approvers,
        count,
        timeout,
        confirm,
    })
}

pub(super) fn build_rule_policy(
    raw: RawRuleApproval,
    at: &str,
    params: &BTreeMap<String, ParamRule>,
    problems: &mut Problems,
) -> Option<ApprovalPolicy> {
    match raw {
        RawRuleApproval::Flag(false) => None,
        RawRuleApproval::Flag(true) => build_policy(RawApproval::default(), at, params, problems),
        RawRuleApproval::Policy(policy) => build_policy(policy, at, params, problems),
    }
}

pub(super) fn build_webhook(url: String, problems: &mut Problems) -> Option<String> {
    let valid = (url.starts_with("http://") || url.starts_with("https://"))
        && !url.contains(char::is_whitespace);
    if !valid {
        problems.push(
            "approvals.webhook",
            invalid(&url, "webhook URL", "an http:// or https:// URL"),
        );
        return None;
    }
    Some(url)
}
