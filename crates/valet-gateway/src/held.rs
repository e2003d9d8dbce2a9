//! MCP calls held open while people decide on their approval: at most [`MAX_HELD_PER_GRANT`] per
//! grant and [`MAX_HELD_PER_PRINCIPAL`] per principal (past either a call is answered at once,
//! not held), and one wait per approval, shared by every call held on it.

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use valet_service::{ServiceError, Valet};

/// Calls of one grant held at once.
pub const MAX_HELD_PER_GRANT: usize = 8;
/// Calls of one principal's grants held at once.
pub const MAX_HELD_PER_PRINCIPAL: usize = 32;

/// How a wait ended: the approval was decided (or is gone), or reading it failed.
pub type Decided = Result<(), Arc<ServiceError>>;

#[derive(Default)]
struct State {
    by_grant: HashMap<String, usize>,
    by_principal: HashMap<String, usize>,
    /// Each approval's shared wait, and how many calls hold it.
    waits: HashMap<String, (Shared<BoxFuture<'static, Decided>>, usize)>,
}

/// The calls held by one gateway.
#[derive(Default)]
pub struct HeldCalls {
    state: std::sync::Mutex<State>,
}

/// Why a call is not held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHeld(pub String);

/// A held call's place: released when dropped.
pub struct HeldPlace {
    calls: Arc<HeldCalls>,
    grant: String,
    principal: String,
    approval: String,
}

impl HeldCalls {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more call of `grant` (of `principal`) waiting on `approval`, and the wait
    /// it shares with the others on that approval; refused past either cap.
    pub fn hold(
        self: &Arc<Self>,
        valet: &Arc<Valet>,
        grant: &str,
        principal: &str,
        approval: &str,
    ) -> Result<(HeldPlace, Shared<BoxFuture<'static, Decided>>), NotHeld> {
        let mut state = self.state();
        let of_grant = state.by_grant.get(grant).copied().unwrap_or(0);
        if of_grant >= MAX_HELD_PER_GRANT {
            return Err(NotHeld(format!(
                "{of_grant} calls of this grant are already held waiting for approval (at most {MAX_HELD_PER_GRANT}); this one is not held: send it again once approval {approval} is decided"
            )));
        }
        let of_principal = state.by_principal.get(principal).copied().unwrap_or(0);
        if of_principal >= MAX_HELD_PER_PRINCIPAL {
            return Err(NotHeld(format!(
                "{of_principal} calls of principal {principal:?} are already held waiting for approval (at most {MAX_HELD_PER_PRINCIPAL}); this one is not held: send it again once approval {approval} is decided"
            )));
        }
        *state.by_grant.entry(grant.to_string()).or_default() += 1;
        *state.by_principal.entry(principal.to_string()).or_default() += 1;
        let (wait, holders) = state
            .waits
            .entry(approval.to_string())
            .or_insert_with(|| (wait_for(valet.clone(), approval.to_string()), 0));
        *holders += 1;
        let wait = wait.clone();
        Ok((
            HeldPlace {
                calls: self.clone(),
                grant: grant.to_string(),
                principal: principal.to_string(),
                approval: approval.to_string(),
            },
            wait,
        ))
    }
}

/// Waits until `approval` is no longer pending (approved, denied, expired or gone): the
/// service's wait on the store's changes, the one `WaitForGrant` uses.
fn wait_for(valet: Arc<Valet>, approval: String) -> Shared<BoxFuture<'static, Decided>> {
    async move { valet.wait_for_approval(&approval).await.map_err(Arc::new) }
        .boxed()
        .shared()
}

impl Drop for HeldPlace {
    fn drop(&mut self) {
        let mut state = self.calls.state();
        let release = |counts: &mut HashMap<String, usize>, key: &str| {
            if let Some(count) = counts.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(key);
                }
            }
        };
        release(&mut state.by_grant, &self.grant);
        release(&mut state.by_principal, &self.principal);
        if let Some((_, holders)) = state.waits.get_mut(&self.approval) {
            *holders -= 1;
            if *holders == 0 {
                state.waits.remove(&self.approval);
            }
        }
    }
}
