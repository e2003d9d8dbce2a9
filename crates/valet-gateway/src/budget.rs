//! Who holds a listener's connections, and the share each may hold: a cap per source (an IPv4
//! address, an IPv6 /64) on open connections and on those that have not authenticated, room kept
//! for authenticated callers under the listener's cap, at most half of it for one principal, and,
//! when a new connection needs a place, one closed for it — the oldest that never authenticated
//! (a request in flight on it protects nothing), else an idle one of the principal holding the
//! most.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::time::Instant;
pub use valet_core::rate::Source;

/// The share of `max_connections` that connections which have not authenticated may fill; the
/// rest is kept for authenticated callers.
const UNAUTHENTICATED_SHARE_PERCENT: usize = 75;
/// Throttled answers waiting out their pause at once on one listener, from one source and from
/// all, besides one on each open connection (those are bounded by the connection caps): each
/// counted until its pause is over, whether or not its request is still there — a connection's
/// own pause joins its source's count when the connection closes before it is over.
const MAX_PAUSED_PER_SOURCE: usize = 64;
const MAX_PAUSED: usize = 1024;
/// A connection refused a place, or closed to make room, is held open (unread, unwritten) this
/// long before it is closed, at most [`MAX_HELD`] at once per listener (past that, closed at
/// once): a client that reconnects as soon as it is refused or closed does so at this pace, not
/// at the pace of accepting. Holding one costs a file descriptor and a timer.
pub const HOLD_BEFORE_CLOSE: Duration = Duration::from_secs(1);
pub const MAX_HELD: usize = 1024;

/// The caps one listener keeps.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionCaps {
    /// Connections open at once, all sources.
    pub max_connections: usize,
    /// Connections open at once from one source.
    pub per_source: usize,
    /// Connections from one source that have not (yet) authenticated.
    pub unauthenticated_per_source: usize,
}

impl ConnectionCaps {
    /// How many connections that have not authenticated the listener holds at most.
    fn unauthenticated_total(&self) -> usize {
        (self.max_connections * UNAUTHENTICATED_SHARE_PERCENT / 100).max(1)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source holds `per_source` connections already.
    SourceFull,
    /// Every place is taken by a connection with a request in flight.
    ListenerBusy,
}

impl Refusal {
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::SourceFull => {
                "its source address holds server.max_connections_per_source connections already"
            }
            Refusal::ListenerBusy => {
                "every connection place is taken by a connection with a request in flight"
            }
        }
    }
}

/// What a connection and its budget share: whether it has been told to close, its requests in
/// flight and when the last one began or ended.
#[derive(Debug)]
pub struct Shared {
    evicted: AtomicBool,
    /// Set once a request on it carried a credential valetd accepted.
    authenticated: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
    in_flight: AtomicU32,
    /// Milliseconds since the budget's epoch.
    last_request_ms: AtomicU64,
    epoch: Instant,
}

impl Shared {
    /// Whether the budget closed this connection to make room.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Whether a request on it carried a credential valetd accepted.
    pub fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    pub(crate) fn register(&self, reader: bool, waker: &std::task::Waker) {
        if reader {
            self.reader.register(waker);
        } else {
            self.writer.register(waker);
        }
    }

    /// When a connection with no request in flight has been without one for `idle`, the
    /// instant it became idle plus `idle`; `None` while a request is in flight on an
    /// authenticated connection. A connection that never authenticated gets `idle` from its last
    /// request's start or end, in flight or not: a request nobody authenticated (a health check
    /// whose answer the client never lets through) holds nothing open.
    pub(crate) fn request_idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 && self.authenticated.load(Ordering::Acquire)
        {
            return None;
        }
        let last = Duration::from_millis(self.last_request_ms.load(Ordering::Acquire));
        Some(self.epoch + last + idle)
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_request_ms.store(elapsed, Ordering::Release);
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.reader.wake();
        self.writer.wake();
    }
}

#[derive(Debug)]
struct Entry {
    source: Source,
    /// The principal it authenticated as, once it has.
    holder: Option<String>,
    /// When the throttled answer waiting on it (its own, outside its source's count) ends.
    paused_until: Option<Instant>,
    shared: Arc<Shared>,
}

impl Entry {
    fn idle(&self) -> bool {
        self.shared.in_flight.load(Ordering::Acquire) == 0
    }
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    unauthenticated: usize,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// By id, so oldest first.
    entries: BTreeMap<u64, Entry>,
    by_source: HashMap<Source, Counts>,
    by_holder: HashMap<String, usize>,
    unauthenticated: usize,
    /// Throttled answers' pauses, by when each ends (all pauses are equally long, so in order).
    paused: std::collections::VecDeque<(Instant, Source)>,
    paused_by_source: HashMap<Source, usize>,
}

impl State {
    /// Forgets the pauses that are over.
    fn prune_paused(&mut self, now: Instant) {
        while let Some((ends, source)) = self.paused.front().copied()
            && ends <= now
        {
            self.paused.pop_front();
            if let Some(count) = self.paused_by_source.get_mut(&source) {
                *count -= 1;
                if *count == 0 {
                    self.paused_by_source.remove(&source);
                }
            }
        }
    }

    /// Counts a pause ending at `ends` against `source` until it is over.
    fn count_pause(&mut self, ends: Instant, source: Source) {
        // Pauses are equally long, so this is the back unless a closed connection's own pause
        // joins the count.
        let at = self.paused.partition_point(|(other, _)| *other <= ends);
        self.paused.insert(at, (ends, source));
        *self.paused_by_source.entry(source).or_default() += 1;
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(ends) = entry.paused_until
            && ends > Instant::now()
        {
            self.count_pause(ends, entry.source);
        }
        if let Some(counts) = self.by_source.get_mut(&entry.source) {
            counts.open -= 1;
            if entry.holder.is_none() {
                counts.unauthenticated -= 1;
            }
            if counts.open == 0 {
                self.by_source.remove(&entry.source);
            }
        }
        match &entry.holder {
            None => self.unauthenticated -= 1,
            Some(holder) => {
                if let Some(count) = self.by_holder.get_mut(holder) {
                    *count -= 1;
                    if *count == 0 {
                        self.by_holder.remove(holder);
                    }
                }
            }
        }
        Some(entry)
    }

    /// The oldest idle connection that has not authenticated (from `source`, if given). Oldest,
    /// not from whoever holds the most: a client that authenticates does so within moments of
    /// connecting, so the connections that stay unauthenticated longest are the ones held
    /// without purpose, and a fresh connection is never the one to give way.
    fn unauthenticated_victim(&self, source: Option<Source>) -> Option<u64> {
        // In flight or not: a request on a connection that never authenticated (one that needs
        // no credential, a health check) protects nothing.
        self.entries
            .iter()
            .find(|(_, entry)| {
                source.is_none_or(|source| entry.source == source) && entry.holder.is_none()
            })
            .map(|(id, _)| *id)
    }

    /// The oldest connection of `principal` other than `except`, in flight or not.
    fn oldest_of(&self, principal: &str, except: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|(id, entry)| **id != except && entry.holder.as_deref() == Some(principal))
            .map(|(id, _)| *id)
    }

    /// The oldest idle authenticated connection of the principal holding the most connections.
    fn authenticated_victim(&self) -> Option<u64> {
        let mut by_holder: HashMap<&str, usize> = HashMap::new();
        for entry in self.entries.values() {
            if let Some(holder) = &entry.holder
                && entry.idle()
            {
                *by_holder.entry(holder.as_str()).or_default() += 1;
            }
        }
        let (holder, _) = by_holder
            .into_iter()
            .max_by_key(|(holder, count)| (*count, std::cmp::Reverse(*holder)))?;
        let holder = holder.to_string();
        self.entries
            .iter()
            .find(|(_, entry)| entry.holder.as_deref() == Some(holder.as_str()) && entry.idle())
            .map(|(id, _)| *id)
    }
}

/// The budget of one listener's connections.
#[derive(Debug)]
pub struct Budget {
    caps: ConnectionCaps,
    epoch: Instant,
    state: std::sync::Mutex<State>,
    /// Connections closed to make room, for the log.
    n_evicted: AtomicU64,
    /// Places for connections held open before they are closed ([`HOLD_BEFORE_CLOSE`]).
    held: Arc<tokio::sync::Semaphore>,
}

/// A connection's place in the budget: released when dropped.
#[derive(Debug)]
pub struct Place {
    budget: Arc<Budget>,
    id: u64,
    shared: Arc<Shared>,
}

impl Budget {
    pub fn new(caps: ConnectionCaps) -> Arc<Budget> {
        Arc::new(Budget {
            caps,
            epoch: Instant::now(),
            state: std::sync::Mutex::new(State::default()),
            n_evicted: AtomicU64::new(0),
            held: Arc::new(tokio::sync::Semaphore::new(MAX_HELD)),
        })
    }

    /// A place to hold a connection open for [`HOLD_BEFORE_CLOSE`] before it is closed, if one
    /// is free.
    pub fn hold_before_close(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.held.clone().try_acquire_owned().ok()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Connections closed so far to make room for others.
    pub fn n_evicted(&self) -> u64 {
        self.n_evicted.load(Ordering::Relaxed)
    }

    /// A place for a new connection from `address`, closing an idle one if that is what it
    /// takes; refused when its source holds its share, or when every place is busy.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Place, Refusal> {
        let source = Source::of(address);
        let caps = self.caps;
        let mut state = self.state();
        // (A source with throttled answers waiting still gets new connections: a neighbour
        // behind the same address with a valid credential must not be shut out by them.)
        let mut victims = Vec::new();
        let (open, unauthenticated) = state
            .by_source
            .get(&source)
            .map_or((0, 0), |counts| (counts.open, counts.unauthenticated));
        if open >= caps.per_source.max(1) {
            // Its own idle connection that has not authenticated makes room, if there is one.
            let Some(victim) = state.unauthenticated_victim(Some(source)) else {
                return Err(Refusal::SourceFull);
            };
            victims.push(victim);
        } else if unauthenticated >= caps.unauthenticated_per_source.max(1) {
            if let Some(victim) = state.unauthenticated_victim(Some(source)) {
                victims.push(victim);
            } else {
                return Err(Refusal::SourceFull);
            }
        }
        for victim in &victims {
            if let Some(entry) = state.remove(*victim) {
                entry.shared.evict();
            }
        }
        victims.clear();
        if state.unauthenticated >= caps.unauthenticated_total() {
            // Past the unauthenticated share: the largest such holder gives way.
            match state.unauthenticated_victim(None) {
                Some(victim) => victims.push(victim),
                None => return Err(Refusal::ListenerBusy),
            }
        } else if state.entries.len() >= caps.max_connections.max(1) {
            match state
                .unauthenticated_victim(None)
                .or_else(|| state.authenticated_victim())
            {
                Some(victim) => victims.push(victim),
                None => return Err(Refusal::ListenerBusy),
            }
        }
        for victim in victims {
            if let Some(entry) = state.remove(victim) {
                entry.shared.evict();
                self.n_evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let shared = Arc::new(Shared {
            evicted: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
            in_flight: AtomicU32::new(0),
            last_request_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        shared.touch();
        let id = state.next_id;
        state.next_id += 1;
        state.entries.insert(
            id,
            Entry {
                source,
                holder: None,
                paused_until: None,
                shared: shared.clone(),
            },
        );
        let counts = state.by_source.entry(source).or_default();
        counts.open += 1;
        counts.unauthenticated += 1;
        state.unauthenticated += 1;
        Ok(Place {
            budget: self.clone(),
            id,
            shared,
        })
    }

    /// How many connections are open, and how many of them have not authenticated.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.entries.len(), state.unauthenticated)
    }
}

impl Place {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The listener's budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// What requests on this connection hold to mark themselves in flight and authenticated.
    pub fn handle(&self) -> ConnectionHandle {
        ConnectionHandle {
            budget: self.budget.clone(),
            id: self.id,
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.budget.state().remove(self.id);
    }
}

/// A request's view of its connection (in its extensions): marks the connection authenticated
/// once a credential was accepted on it, and the request in flight while it runs.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    budget: Arc<Budget>,
    id: u64,
    shared: Arc<Shared>,
}

/// What a request on a connection being closed is answered, unread and unauthenticated.
pub const CLOSING: &str = "this connection is being closed (it was chosen to make room for another, or its source has more throttled answers waiting than its budget); the request was not read: connect again";

impl ConnectionHandle {
    /// Whether the budget closed this connection: a request still arriving on it (an HTTP/2
    /// stream sent before the close) is answered [`CLOSING`] without being authenticated or
    /// read, so streams sent in a burst cost nothing once their connection is closed.
    pub fn closing(&self) -> bool {
        self.shared.evicted()
    }

    /// The connection carried a credential valetd accepted, for `principal`: from now on it
    /// counts against that principal, not against its source's unauthenticated share.
    pub fn authenticated(&self, principal: &str) {
        let mut state = self.budget.state();
        let State {
            entries,
            by_source,
            by_holder,
            unauthenticated,
            ..
        } = &mut *state;
        let Some(entry) = entries.get_mut(&self.id) else {
            return;
        };
        if entry.holder.as_deref() == Some(principal) {
            return;
        }
        match entry.holder.replace(principal.to_string()) {
            None => {
                *unauthenticated -= 1;
                if let Some(counts) = by_source.get_mut(&entry.source) {
                    counts.unauthenticated -= 1;
                }
            }
            Some(previous) => {
                if let Some(count) = by_holder.get_mut(&previous) {
                    *count -= 1;
                    if *count == 0 {
                        by_holder.remove(&previous);
                    }
                }
            }
        }
        *by_holder.entry(principal.to_string()).or_default() += 1;
        self.shared.authenticated.store(true, Ordering::Release);
        // One principal holds at most half the places: past it, its oldest connection goes,
        // busy or not.
        let share = (self.budget.caps.max_connections / 2).max(1);
        if by_holder.get(principal).copied().unwrap_or(0) > share
            && let Some(victim) = state.oldest_of(principal, self.id)
            && let Some(entry) = state.remove(victim)
        {
            entry.shared.evict();
            self.budget.n_evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a throttled answer on this connection may wait out its `pause`: the first one
    /// waiting on a connection may (a client waiting for its answers is held to one a pause per
    /// connection), others while its source and the listener have room among the answers
    /// waiting; if not, the connection is closed. An answer counts until its pause is over even
    /// if its request is cancelled, so resetting streams or closing connections skips no pause.
    pub fn pause_admitted(&self, pause: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.budget.state();
        state.prune_paused(now);
        let Some((source, waiting)) = state.entries.get(&self.id).map(|entry| {
            (
                entry.source,
                entry.paused_until.is_some_and(|ends| ends > now),
            )
        }) else {
            return false;
        };
        // Its own pause first: whatever others on its source do, a connection waiting for one
        // answer at a time is never closed for it.
        if !waiting {
            if let Some(entry) = state.entries.get_mut(&self.id) {
                entry.paused_until = Some(now + pause);
            }
            return true;
        }
        let from_source = state.paused_by_source.get(&source).copied().unwrap_or(0);
        if from_source >= MAX_PAUSED_PER_SOURCE || state.paused.len() >= MAX_PAUSED {
            if let Some(entry) = state.remove(self.id) {
                entry.shared.evict();
            }
            return false;
        }
        state.count_pause(now + pause, source);
        true
    }

    /// Marks a request in flight until the returned guard is dropped: a connection with a
    /// request in flight is never closed to make room, nor for idleness.
    pub fn request(&self) -> RequestGuard {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        self.shared.touch();
        RequestGuard {
            shared: self.shared.clone(),
        }
    }
}

/// Waits out a throttled answer's `pause` (zero: none) before it is sent, on every listener: the
/// request stops counting as in flight (a paused answer keeps no connection from being closed
/// to make room), and past the answers its source and listener may have waiting the connection
/// is closed instead.
pub async fn wait_out_pause(
    connection: Option<&ConnectionHandle>,
    guard: &mut Option<RequestGuard>,
    pause: Duration,
) {
    if pause.is_zero() {
        return;
    }
    *guard = None;
    if connection.is_none_or(|connection| connection.pause_admitted(pause)) {
        tokio::time::sleep(pause).await;
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub struct RequestGuard {
    shared: Arc<Shared>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.shared.touch();
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request in flight until it has been sent (or dropped).
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    _guard: Option<RequestGuard>,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, guard: Option<RequestGuard>) -> GuardedBody<B> {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Default> Default for GuardedBody<B> {
    fn default() -> Self {
        GuardedBody::new(B::default(), None)
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(max_connections: usize, per_source: usize, unauthenticated: usize) -> ConnectionCaps {
        ConnectionCaps {
            max_connections,
            per_source,
            unauthenticated_per_source: unauthenticated,
        }
    }

    fn address(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_bit_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            Source::of(address("2001:db8::1")),
            Source::of(address("2001:db8::ffff:1234"))
        );
        assert_ne!(
            Source::of(address("2001:db8::1")),
            Source::of(address("2001:db8:0:1::1"))
        );
        assert_eq!(
            Source::of(address("::ffff:10.0.0.1")),
            Source::of(address("10.0.0.1"))
        );
        assert_eq!(
            Source::of(address("2001:db8::1")).to_string(),
            "2001:db8::/64"
        );
    }

    #[tokio::test]
    async fn a_source_over_its_share_gives_way_with_its_own_connections_that_never_authenticated() {
        let budget = Budget::new(caps(100, 3, 2));
        let first = budget.admit(address("10.0.0.1")).unwrap();
        let second = budget.admit(address("10.0.0.1")).unwrap();
        // A third unauthenticated connection from the same source closes the oldest one, even
        // with a request in flight (one nobody authenticated protects nothing).
        let _first_busy = first.handle().request();
        let third = budget.admit(address("10.0.0.1")).unwrap();
        assert!(first.shared().evicted());
        assert!(!second.shared().evicted());
        // An authenticated one is not closed for it.
        second.handle().authenticated("agent");
        third.handle().authenticated("agent");
        let fourth = budget.admit(address("10.0.0.1")).unwrap();
        assert_eq!(
            budget.admit(address("10.0.0.1")).map(|_| ()),
            Ok(()),
            "the source's own unauthenticated fourth gives way"
        );
        assert!(fourth.shared().evicted());
        assert!(!second.shared().evicted() && !third.shared().evicted());
        // Another source is not affected.
        let other = budget.admit(address("10.0.0.2")).unwrap();
        assert!(!other.shared().evicted());
    }

    #[tokio::test]
    async fn busy_connections_that_never_authenticated_cannot_hold_the_listener() {
        let budget = Budget::new(caps(8, 8, 8));
        // Attackers keep a request in flight on each (an answer they never let through).
        let attackers: Vec<(Place, RequestGuard)> = (0..6)
            .map(|n| {
                let place = budget.admit(address(&format!("10.0.1.{n}"))).unwrap();
                let guard = place.handle().request();
                (place, guard)
            })
            .collect();
        // A legitimate newcomer still gets a place, and authenticates.
        let newcomer = budget.admit(address("10.0.0.3")).unwrap();
        assert!(
            attackers[0].0.shared().evicted(),
            "the oldest attacker gave way"
        );
        newcomer.handle().authenticated("agent");
        assert!(!newcomer.shared().evicted());
        // And their requests do not keep them past the idle timeout either.
        let idle = Duration::from_secs(60);
        assert!(
            attackers[1]
                .0
                .shared()
                .request_idle_deadline(idle)
                .is_some()
        );
        let _busy = newcomer.handle().request();
        assert!(newcomer.shared().request_idle_deadline(idle).is_none());
    }

    #[tokio::test]
    async fn one_principal_holds_at_most_half_the_places() {
        let budget = Budget::new(caps(8, 8, 8));
        let places: Vec<(Place, RequestGuard)> = (0..6)
            .map(|n| {
                let place = budget.admit(address(&format!("10.0.2.{n}"))).unwrap();
                let guard = place.handle().request();
                place.handle().authenticated("hog");
                (place, guard)
            })
            .collect();
        // Its fifth and sixth, busy or not, each closed its oldest.
        let evicted = places
            .iter()
            .filter(|(place, _)| place.shared().evicted())
            .count();
        assert_eq!(evicted, 2);
        assert!(places[0].0.shared().evicted() && places[1].0.shared().evicted());
        let (open, _) = budget.counts();
        assert_eq!(open, 4);
    }

    #[tokio::test]
    async fn at_the_cap_an_idle_connection_of_the_principal_holding_the_most_gives_way() {
        let budget = Budget::new(caps(6, 6, 6));
        let mut places = Vec::new();
        for (n, principal) in ["many", "many", "many", "few"].iter().enumerate() {
            let place = budget.admit(address(&format!("10.0.3.{n}"))).unwrap();
            place.handle().authenticated(principal);
            places.push(place);
        }
        let busy = places[3].handle().request();
        let _others: Vec<Place> = (0..2)
            .map(|n| {
                let place = budget.admit(address(&format!("10.0.4.{n}"))).unwrap();
                place.handle().authenticated(&format!("one-{n}"));
                place
            })
            .collect();
        // Full: a newcomer takes the oldest idle place of the principal holding the most.
        let newcomer = budget.admit(address("10.0.5.1")).unwrap();
        assert!(places[0].shared().evicted());
        assert!(!places[3].shared().evicted() && !newcomer.shared().evicted());
        drop(busy);
    }

    #[tokio::test]
    async fn a_dropped_place_is_released_once() {
        let budget = Budget::new(caps(4, 2, 2));
        let first = budget.admit(address("10.0.0.1")).unwrap();
        let second = budget.admit(address("10.0.0.1")).unwrap();
        let third = budget.admit(address("10.0.0.1")).unwrap();
        assert!(first.shared().evicted());
        drop(first);
        assert_eq!(budget.counts(), (2, 2));
        drop(second);
        drop(third);
        assert_eq!(budget.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn paused_answers_are_counted_until_their_pause_ends_and_protect_no_connection() {
        let budget = Budget::new(caps(1000, 1000, 1000));
        let pause = Duration::from_secs(1);
        let first = budget.admit(address("10.0.0.1")).unwrap();
        // A paused answer's request no longer counts as in flight.
        let mut guard = Some(first.handle().request());
        wait_out_pause(Some(&first.handle()), &mut guard, pause).await;
        assert!(guard.is_none());
        assert_eq!(first.shared().in_flight.load(Ordering::Acquire), 0);
        // Its source may have MAX_PAUSED_PER_SOURCE waiting, counted until each pause is over
        // (the first one's is: the clock moved on while it waited).
        let connections: Vec<Place> = (0..MAX_PAUSED_PER_SOURCE)
            .map(|_| budget.admit(address("10.0.0.2")).unwrap())
            .collect();
        let over = budget.admit(address("10.0.0.2")).unwrap();
        for connection in &connections {
            assert!(connection.handle().pause_admitted(pause));
        }
        // Cancelled requests included (these were never answered, their connections closed):
        // a connection of the source may wait its own answer's pause, but a second at once is
        // refused and its connection closed.
        drop(connections);
        assert!(over.handle().pause_admitted(pause));
        assert!(!over.handle().pause_admitted(pause));
        assert!(over.shared().evicted());
        // Another source is not affected; once the pauses are over, the source may wait again.
        let other = budget.admit(address("10.0.0.3")).unwrap();
        assert!(other.handle().pause_admitted(pause));
        // Meanwhile the source still gets new connections (a neighbour with a valid credential
        // may be behind it), each of which may wait one answer's pause, not two.
        let neighbour = budget.admit(address("10.0.0.2")).unwrap();
        assert!(neighbour.handle().pause_admitted(pause));
        assert!(!neighbour.handle().pause_admitted(pause));
        assert!(neighbour.shared().evicted());
        tokio::time::advance(pause).await;
        let again = budget.admit(address("10.0.0.2")).unwrap();
        assert!(again.handle().pause_admitted(pause));
        assert!(again.handle().pause_admitted(pause));
    }

    #[tokio::test(start_paused = true)]
    async fn clients_waiting_for_their_answers_wait_one_pause_per_connection_and_no_more() {
        let budget = Budget::new(caps(1000, 1000, 1000));
        let pause = Duration::from_secs(1);
        // Twice as many connections as the source may have counted, each waiting for its one
        // throttled answer: none is closed.
        let connections: Vec<Place> = (0..2 * MAX_PAUSED_PER_SOURCE)
            .map(|_| budget.admit(address("10.0.0.1")).unwrap())
            .collect();
        for connection in &connections {
            assert!(connection.handle().pause_admitted(pause));
        }
        assert!(connections.iter().all(|place| !place.shared().evicted()));
        // A second answer waiting on one connection at once (HTTP/2 streams, or a request
        // reset and sent again) counts against the source.
        for _ in 0..MAX_PAUSED_PER_SOURCE {
            assert!(connections[0].handle().pause_admitted(pause));
        }
        assert!(!connections[1].handle().pause_admitted(pause));
        assert!(connections[1].shared().evicted());
        // Once the pauses are over, each connection waits one again.
        tokio::time::advance(pause).await;
        assert!(connections[2].handle().pause_admitted(pause));
        assert!(connections[2].handle().pause_admitted(pause));
    }
}
