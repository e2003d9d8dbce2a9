//! Gateway and MCP calls in flight — forwarded and not yet answered in full — per grant and per
//! principal: past a quarter of `server.max_connections` for one grant, or half for one
//! principal's grants (the connections a principal may hold), a call is refused before it is
//! counted or forwarded, so one token cannot hold the gateway open on a slow upstream. The same
//! counting, with caps of their own, bounds the waits for a pending grant.

use std::collections::HashMap;
use std::sync::Arc;

/// How many calls may be in flight at once.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_grant: usize,
    pub per_principal: usize,
}

impl Caps {
    /// The caps for a listener that keeps `max_connections` open.
    pub fn for_connections(max_connections: usize) -> Caps {
        Caps {
            per_grant: (max_connections / 4).max(1),
            per_principal: (max_connections / 2).max(1),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    by_grant: HashMap<String, usize>,
    by_principal: HashMap<String, usize>,
}

/// The calls in flight, on this replica.
#[derive(Debug, Default)]
pub struct InFlight {
    counts: std::sync::Mutex<Counts>,
}

/// Which share a new place would exceed, with how many places are held there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Grant(usize),
    Principal(usize),
}

/// One call's place: released when the last holder of its decision drops it (once the answer
/// has been streamed, or the call failed).
#[derive(Debug)]
pub struct InFlightPlace {
    calls: Arc<InFlight>,
    grant: String,
    principal: String,
}

impl InFlight {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more call of `grant` (of `principal`), or why not.
    pub fn take(
        self: &Arc<Self>,
        caps: Caps,
        grant: &str,
        principal: &str,
    ) -> Result<InFlightPlace, String> {
        self.take_counted(caps, grant, principal)
            .map_err(|over| match over {
                Over::Grant(held) => format!(
                    "{held} calls of this grant are in flight already (at most {}, a quarter of server.max_connections); send it again once one has been answered",
                    caps.per_grant
                ),
                Over::Principal(held) => format!(
                    "{held} calls of principal {principal:?} are in flight already (at most {}, half of server.max_connections); send it again once one has been answered",
                    caps.per_principal
                ),
            })
    }

    /// A place for one more of `grant` (of `principal`) within `caps`, or which share it would
    /// exceed: the counting every per-grant and per-principal budget of places shares (calls in
    /// flight, waits for a grant), each wording its own refusal.
    pub fn take_counted(
        self: &Arc<Self>,
        caps: Caps,
        grant: &str,
        principal: &str,
    ) -> Result<InFlightPlace, Over> {
        let mut counts = self.counts();
        let of_grant = counts.by_grant.get(grant).copied().unwrap_or(0);
        if of_grant >= caps.per_grant {
            return Err(Over::Grant(of_grant));
        }
        let of_principal = counts.by_principal.get(principal).copied().unwrap_or(0);
        if of_principal >= caps.per_principal {
            return Err(Over::Principal(of_principal));
        }
        *counts.by_grant.entry(grant.to_string()).or_default() += 1;
        *counts
            .by_principal
            .entry(principal.to_string())
            .or_default() += 1;
        Ok(InFlightPlace {
            calls: self.clone(),
            grant: grant.to_string(),
            principal: principal.to_string(),
        })
    }
}

impl Drop for InFlightPlace {
    fn drop(&mut self) {
        let mut counts = self.calls.counts();
        let Counts {
            by_grant,
            by_principal,
        } = &mut *counts;
        for (map, key) in [(by_grant, &self.grant), (by_principal, &self.principal)] {
            if let Some(count) = map.get_mut(key.as_str()) {
                *count -= 1;
                if *count == 0 {
                    map.remove(key.as_str());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_or_principal_past_its_share_is_refused_until_a_call_ends() {
        let calls = Arc::new(InFlight::default());
        // Sixteen connections: four per grant, eight per principal.
        let caps = Caps::for_connections(16);
        let mut places: Vec<InFlightPlace> = (0..4)
            .map(|_| calls.take(caps, "g1", "agent").unwrap())
            .collect();
        let refused = calls.take(caps, "g1", "agent").unwrap_err();
        assert!(refused.contains("in flight already"), "{refused}");
        let others: Vec<InFlightPlace> = (0..4)
            .map(|_| calls.take(caps, "g2", "agent").unwrap())
            .collect();
        let refused = calls.take(caps, "g3", "agent").unwrap_err();
        assert!(refused.contains("principal"), "{refused}");
        assert!(
            calls.take(caps, "g4", "other").is_ok(),
            "another principal is not affected"
        );
        drop(others);
        places.pop();
        assert!(calls.take(caps, "g1", "agent").is_ok());
    }
}
