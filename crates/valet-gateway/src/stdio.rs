//! MCP servers valetd runs: one process per grant in use (or, for a server whose config says it
//! keeps no per-grant state, one shared by every grant), per upstream config, started on demand
//! with the root credential in its environment only, initialized by valetd, spoken to over stdio
//! with request ids of valetd's own (so concurrent callers never see each other's replies), kept
//! warm up to the upstream's `max_processes` (and `max_processes_per_principal` for each
//! principal: a principal within its share may take the idle place of the principal holding the
//! most, one over it only its own) and `idle_timeout`, and restarted after a crash with backoff.
//! A changed upstream config never reuses a process of the old one.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, oneshot};
use valet_core::Secret;
use valet_core::config::{StdioServer, Target, Upstream};
use valet_core::rate::Bucket;

/// The protocol revision valetd initializes stdio servers with.
pub const STDIO_PROTOCOL_VERSION: &str = "2025-11-25";
/// Revisions reached through the initialize handshake, oldest first.
pub const HANDSHAKE_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The revision without a handshake, where every request carries its own envelope.
pub const MODERN_VERSIONS: [&str; 1] = ["2026-07-28"];
/// How long a server has to answer valetd's `initialize`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line a server may write on stdout.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Backoff after the first crash, doubled per further crash up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A process that ran this long before exiting resets the crash count.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How much lower than valetd's own the CPU priority (niceness) of the servers it runs is: a
/// server's start, often a second of CPU or more, yields to answering calls.
const SERVER_NICENESS: i32 = 10;

/// Starts `command` at valetd's niceness plus [`SERVER_NICENESS`] (at most 19). Niceness is per
/// thread on Linux and children inherit their thread's: the command is started from a thread
/// of its own whose niceness was raised first, so the server runs at it from its first
/// instruction, with every thread it starts. If the niceness cannot be raised the server runs
/// at valetd's (and the log says so).
async fn spawn_lowered(mut command: Command) -> std::io::Result<Child> {
    let runtime = tokio::runtime::Handle::current();
    let (sender, receiver) = oneshot::channel();
    std::thread::Builder::new()
        .name("valet-stdio-start".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            let lowered = rustix::process::getpriority_process(None).and_then(|niceness| {
                rustix::process::setpriority_process(None, (niceness + SERVER_NICENESS).min(19))
            });
            if let Err(error) = lowered {
                tracing::warn!(%error, "could not lower the CPU priority of an MCP server valetd starts; it runs at valetd's");
            }
            let _ = sender.send(command.spawn());
        })?;
    receiver.await.unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the thread starting it ended without an answer",
        ))
    })
}

/// Why a message could not be answered by a stdio server.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("{0}")]
    Unavailable(String),
    #[error("the server did not answer within {0} s")]
    Timeout(u64),
    /// The caller is at its share: of processes held, or of processes started.
    #[error("{reason}")]
    Busy {
        reason: String,
        retry_after: Duration,
    },
}

/// Every stdio upstream's processes. Each upstream has its own lock, so a slow start of one
/// server holds up only calls to that upstream.
#[derive(Default)]
pub struct Processes {
    pools: std::sync::Mutex<HashMap<String, Arc<Mutex<Pool>>>>,
}

/// One upstream config's processes, by grant.
struct Pool {
    /// The config and credential the processes were started with: any change starts a new pool.
    identity: (StdioServer, [u8; 32]),
    /// By grant id (or [`SHARED`]), with the principal whose grant started it.
    processes: HashMap<String, (String, Slot)>,
    /// Each principal's restart backoff: a server that keeps exiting under one principal's calls
    /// holds back that principal's starts, not everyone's.
    backoff: HashMap<String, Backoff>,
    /// Each principal's process starts (`starts_per_principal`), in milliseconds since `epoch`.
    starts: HashMap<String, Bucket>,
    epoch: Instant,
}

/// A place in the pool: a process running, or one starting (outside the pool's lock, so a slow
/// start holds up no call to a process already running; callers of the same grant share it).
#[derive(Clone)]
enum Slot {
    Ready(Arc<Process>),
    Starting(Arc<Starting>),
}

/// A process being started: its outcome, once known, for every caller waiting on it.
type Starting = tokio::sync::OnceCell<Result<Arc<Process>, String>>;

impl Slot {
    /// The running process, if it is one.
    fn ready(&self) -> Option<&Arc<Process>> {
        match self {
            Slot::Ready(process) => Some(process),
            Slot::Starting(_) => None,
        }
    }

    /// Whether it may be stopped to make room: running, with no call in flight.
    fn idle(&self) -> bool {
        self.ready()
            .is_some_and(|process| process.in_flight.load(Ordering::Acquire) == 0)
    }
}

/// How a principal's starts are held back after its processes crashed.
#[derive(Debug, Default)]
struct Backoff {
    crashes: u32,
    not_before: Option<Instant>,
}

/// One running server.
pub struct Process {
    stdin: Mutex<ChildStdin>,
    child: std::sync::Mutex<Option<Child>>,
    pending: std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    in_flight: AtomicUsize,
    /// When it was last used, and by which principal's call: a process that exits soon after
    /// it started counts against the principal whose call went to it last (on a shared server,
    /// not the one whose call happened to start it).
    last_used: std::sync::Mutex<(Instant, String)>,
    started: Instant,
    /// The server's answer to valetd's `initialize`.
    initialized: std::sync::OnceLock<Value>,
}

/// The key of the one process every grant shares, on an upstream whose server keeps no
/// per-grant state.
const SHARED: &str = "(shared)";
/// Principals whose starts are counted at once; past it, those with a full budget are forgotten.
const MAX_PRINCIPALS_COUNTED: usize = 10_000;

impl Processes {
    /// The process serving `grant_id` (of `principal`) on `upstream`, started (and initialized)
    /// if there is none.
    pub async fn process_for(
        &self,
        upstream: &Upstream,
        grant_id: &str,
        principal: &str,
        secret: &Secret,
        log: Arc<dyn Fn(&str) -> String + Send + Sync>,
    ) -> Result<Arc<Process>, StdioError> {
        let Target::Process(server) = &upstream.target else {
            return Err(StdioError::Unavailable(
                "the upstream is not a server valetd runs".into(),
            ));
        };
        let identity = (server.clone(), secret.sha256());
        let pool = {
            let mut pools = self
                .pools
                .lock()
                .map_err(|_| StdioError::Unavailable("its process table is poisoned".into()))?;
            pools
                .entry(upstream.name.clone())
                .or_insert_with(|| Arc::new(Mutex::new(Pool::new(identity.clone()))))
                .clone()
        };
        let key = if server.shared { SHARED } else { grant_id };
        let starting = {
            let mut pool = pool.lock().await;
            if pool.identity != identity {
                // A changed config or credential: the old processes end, none is reused.
                tracing::info!(
                    upstream = upstream.name,
                    "stdio MCP server config changed; stopping its processes"
                );
                *pool = Pool::new(identity);
            }
            let now = Instant::now();
            pool.reap(server.idle_timeout, now);
            // On a shared server, a principal whose calls keep making it exit is held back from
            // the running process too (its next call would end it for everyone), not only from
            // starting one.
            if key == SHARED {
                pool.check_backoff(principal, now)?;
            }
            match pool.processes.get(key) {
                Some((_, Slot::Ready(process))) => {
                    process.touch(Some(principal));
                    return Ok(process.clone());
                }
                Some((_, Slot::Starting(starting))) => starting.clone(),
                None => pool.admit_start(key, principal, server, now)?,
            }
        };
        // Started outside the pool's lock; whoever of the grant's callers comes first starts it
        // (another takes over if it gives up), the others wait for it.
        let started = starting
            .get_or_init(|| async {
                Process::start(&upstream.name, server, secret, log)
                    .await
                    .map_err(|error| error.to_string())
            })
            .await
            .clone();
        let mut pool = pool.lock().await;
        let current = matches!(
            pool.processes.get(key),
            Some((_, Slot::Starting(slot))) if Arc::ptr_eq(slot, &starting)
        );
        match started {
            Ok(process) => {
                if current {
                    pool.processes.insert(
                        key.to_string(),
                        (principal.to_string(), Slot::Ready(process.clone())),
                    );
                } else if !pool.processes.values().any(|(_, slot)| {
                    slot.ready()
                        .is_some_and(|ready| Arc::ptr_eq(ready, &process))
                }) {
                    // Its place went while it started (its grant ended, the config changed).
                    return Err(StdioError::Unavailable(
                        "its place was given up while the server started (the grant ended or the upstream's config changed); retry".into(),
                    ));
                }
                process.touch(Some(principal));
                Ok(process)
            }
            Err(error) => {
                if current {
                    pool.processes.remove(key);
                    pool.crashed(principal, Instant::now());
                }
                Err(StdioError::Unavailable(error))
            }
        }
    }
}

impl Pool {
    /// Refused while `principal` is in its crash backoff.
    fn check_backoff(&self, principal: &str, now: Instant) -> Result<(), StdioError> {
        if let Some(backoff) = self.backoff.get(principal)
            && let Some(not_before) = backoff.not_before
            && now < not_before
        {
            return Err(StdioError::Busy {
                reason: format!(
                    "its server exited {} times in a row under principal {principal:?}'s calls; their next call to it is in {} ms",
                    backoff.crashes,
                    (not_before - now).as_millis()
                ),
                retry_after: (not_before - now).max(Duration::from_secs(1)),
            });
        }
        Ok(())
    }

    /// A new process's place for `key`, reserved while it starts: within `principal`'s restart
    /// backoff and starts, and with room made for it.
    fn admit_start(
        &mut self,
        key: &str,
        principal: &str,
        server: &StdioServer,
        now: Instant,
    ) -> Result<Arc<Starting>, StdioError> {
        self.check_backoff(principal, now)?;
        // Counted before room is made, so a refused start stops no one's process.
        self.start_admitted(principal, server, now)?;
        if key != SHARED {
            self.make_room(principal, server)?;
        }
        let starting = Arc::new(tokio::sync::OnceCell::new());
        self.processes.insert(
            key.to_string(),
            (principal.to_string(), Slot::Starting(starting.clone())),
        );
        Ok(starting)
    }
}

impl Processes {
    /// Stops processes unused for their upstream's idle timeout.
    pub async fn reap(&self, idle_timeouts: &HashMap<String, Duration>) {
        if let Ok(mut pools) = self.pools.lock() {
            // The upstream is gone from the config: so are its processes.
            pools.retain(|name, _| idle_timeouts.contains_key(name));
        }
        let now = Instant::now();
        for (name, pool) in self.snapshot() {
            if let Some(idle_timeout) = idle_timeouts.get(&name) {
                pool.lock().await.reap(*idle_timeout, now);
            }
        }
    }

    /// The grants that have a process, by upstream.
    pub async fn grants(&self) -> Vec<(String, String)> {
        let mut grants = Vec::new();
        for (name, pool) in self.snapshot() {
            for grant in pool.lock().await.processes.keys() {
                // The shared process serves no one grant: it ends when idle.
                if grant != SHARED {
                    grants.push((name.clone(), grant.clone()));
                }
            }
        }
        grants
    }

    /// Stops the process of `grant` on `upstream` (its grant ended).
    pub async fn stop(&self, upstream: &str, grant: &str) {
        let pool = match self.pools.lock() {
            Ok(pools) => pools.get(upstream).cloned(),
            Err(_) => None,
        };
        if let Some(pool) = pool {
            pool.lock().await.processes.remove(grant);
        }
    }

    /// The pools as they are now, to work on one at a time without holding the table.
    fn snapshot(&self) -> Vec<(String, Arc<Mutex<Pool>>)> {
        self.pools
            .lock()
            .map(|pools| {
                pools
                    .iter()
                    .map(|(name, pool)| (name.clone(), pool.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops every process (valetd is shutting down).
    pub async fn stop_all(&self) {
        let pools: Vec<Arc<Mutex<Pool>>> = match self.pools.lock() {
            Ok(mut pools) => pools.drain().map(|(_, pool)| pool).collect(),
            Err(_) => return,
        };
        for pool in pools {
            pool.lock().await.processes.clear();
        }
    }
}

impl Pool {
    fn new(identity: (StdioServer, [u8; 32])) -> Pool {
        Pool {
            identity,
            processes: HashMap::new(),
            backoff: HashMap::new(),
            starts: HashMap::new(),
            epoch: Instant::now(),
        }
    }

    /// Takes one of `principal`'s process starts: a start costs the machine far more than a
    /// call (a runtime and its imports), so fresh grants in a loop are refused past the
    /// upstream's `starts_per_principal`, not served by a process each.
    fn start_admitted(
        &mut self,
        principal: &str,
        server: &StdioServer,
        now: Instant,
    ) -> Result<(), StdioError> {
        let rate = server.starts_per_principal;
        let now_ms = u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        // Full buckets are forgotten: the table holds only principals that started lately.
        if self.starts.len() >= MAX_PRINCIPALS_COUNTED {
            self.starts
                .retain(|_, bucket| !bucket.is_full(rate, now_ms));
        }
        let bucket = self
            .starts
            .entry(principal.to_string())
            .or_insert_with(|| Bucket::full(rate, now_ms));
        bucket.take(rate, now_ms).map_err(|retry_after| StdioError::Busy {
            reason: format!(
                "principal {principal:?} started {} server processes in {} s, the most starts_per_principal allows; retry in {} s",
                rate.count,
                rate.per.as_secs(),
                retry_after.as_millis().div_ceil(1000).max(1)
            ),
            retry_after,
        })
    }

    /// Makes room for one more process of `principal`: past its share it gives way with its own
    /// least recently used idle process; past the upstream's `max_processes`, the principal
    /// holding the most processes does (only one that holds more than `principal` will after
    /// this start). A process with a call in flight is never stopped; without a place, refused.
    fn make_room(&mut self, principal: &str, server: &StdioServer) -> Result<(), StdioError> {
        let held_by = |pool: &Pool, who: &str| {
            pool.processes
                .values()
                .filter(|(owner, _)| owner == who)
                .count()
        };
        let least_recent_idle = |pool: &Pool, who: Option<&str>| {
            pool.processes
                .iter()
                .filter(|(key, (owner, slot))| {
                    key.as_str() != SHARED && who.is_none_or(|who| owner == who) && slot.idle()
                })
                .filter_map(|(key, (_, slot))| Some((key, slot.ready()?.last_used())))
                .min_by_key(|(_, last_used)| *last_used)
                .map(|(key, _)| key.clone())
        };
        let own = held_by(self, principal);
        if own >= server.max_processes_per_principal {
            let Some(victim) = least_recent_idle(self, Some(principal)) else {
                return Err(StdioError::Busy {
                    reason: format!(
                        "principal {principal:?} has {own} server processes, all busy (max_processes_per_principal is {}); retry shortly",
                        server.max_processes_per_principal
                    ),
                    retry_after: Duration::from_secs(1),
                });
            };
            self.processes.remove(&victim);
            return Ok(());
        }
        if self.processes.len() < server.max_processes {
            return Ok(());
        }
        // The principal holding the most (more than the newcomer will) gives way.
        let mut holders: HashMap<&str, usize> = HashMap::new();
        for (owner, _) in self.processes.values() {
            *holders.entry(owner.as_str()).or_default() += 1;
        }
        let mut by_most: Vec<(&str, usize)> = holders.into_iter().collect();
        by_most.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let victim = by_most
            .into_iter()
            .filter(|(owner, count)| *owner == principal || *count > own + 1)
            .find_map(|(owner, _)| least_recent_idle(self, Some(owner)));
        match victim {
            Some(victim) => {
                self.processes.remove(&victim);
                Ok(())
            }
            None => Err(StdioError::Busy {
                reason: format!(
                    "all {} of its server processes (max_processes) are busy or held by principals within their share; retry shortly",
                    server.max_processes
                ),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Drops dead processes (counting crashes) and idle ones; those starting stay.
    fn reap(&mut self, idle_timeout: Duration, now: Instant) {
        let mut crashed = Vec::new();
        self.processes.retain(|_, (owner, slot)| {
            let Some(process) = slot.ready() else {
                return true;
            };
            if !process.alive.load(Ordering::Acquire) {
                if process.started.elapsed() < STABLE_AFTER {
                    let caller = process.last_caller();
                    crashed.push(if caller.is_empty() {
                        owner.clone()
                    } else {
                        caller
                    });
                }
                return false;
            }
            process.in_flight.load(Ordering::Acquire) > 0
                || now.duration_since(process.last_used()) < idle_timeout
        });
        // A principal whose processes stayed up long enough starts afresh.
        self.backoff.retain(|principal, backoff| {
            crashed.contains(principal)
                || backoff
                    .not_before
                    .is_some_and(|not_before| now < not_before + STABLE_AFTER)
        });
        for principal in crashed {
            self.crashed(&principal, now);
        }
    }

    /// A process of `principal`'s exited soon after it started (or would not start): its next
    /// start waits, twice as long each time in a row.
    fn crashed(&mut self, principal: &str, now: Instant) {
        let backoff = self.backoff.entry(principal.to_string()).or_default();
        backoff.crashes = backoff.crashes.saturating_add(1);
        let wait = FIRST_BACKOFF
            .saturating_mul(1u32 << backoff.crashes.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        backoff.not_before = Some(now + wait);
    }
}

impl Process {
    async fn start(
        name: &str,
        server: &StdioServer,
        secret: &Secret,
        log: Arc<dyn Fn(&str) -> String + Send + Sync>,
    ) -> Result<Arc<Process>, StdioError> {
        let secret_text = secret.expose_str().ok_or_else(|| {
            StdioError::Unavailable(
                "its credential is not text, so it cannot go in an environment variable".into(),
            )
        })?;
        let mut command = Command::new(&server.command);
        command
            .args(&server.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for inherited in ["PATH", "HOME", "LANG"] {
            if let Some(value) = std::env::var_os(inherited) {
                command.env(inherited, value);
            }
        }
        for (variable, template) in &server.env {
            command.env(variable, template.replace("{secret}", secret_text));
        }
        if let Some(directory) = &server.working_dir {
            command.current_dir(directory);
        }
        let mut child = spawn_lowered(command).await.map_err(|error| {
            StdioError::Unavailable(format!(
                "its server {:?} could not be started: {error}",
                server.command
            ))
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(StdioError::Unavailable(
                "its server's pipes could not be opened".into(),
            ));
        };
        let alive = Arc::new(AtomicBool::new(true));
        let process = Process {
            stdin: Mutex::new(stdin),
            child: std::sync::Mutex::new(Some(child)),
            pending: std::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: alive.clone(),
            in_flight: AtomicUsize::new(0),
            last_used: std::sync::Mutex::new((Instant::now(), String::new())),
            started: Instant::now(),
            initialized: std::sync::OnceLock::new(),
        };
        let process = Arc::new(process);
        // stderr goes to valetd's log (debug), through the redactor.
        let upstream = name.to_string();
        let stderr_log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(upstream, line = %stderr_log(&line), "stdio MCP server stderr");
            }
        });
        let reader = Arc::downgrade(&process);
        let upstream = name.to_string();
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line(&mut stdout, &mut line).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => break,
                }
                let Some(process) = reader.upgrade() else {
                    break;
                };
                process.received(&line, &upstream).await;
            }
            alive.store(false, Ordering::Release);
            if let Some(process) = reader.upgrade() {
                // Every caller still waiting learns the server is gone.
                process
                    .pending
                    .lock()
                    .map(|mut pending| pending.clear())
                    .ok();
            }
            tracing::warn!(upstream, "stdio MCP server exited");
        });
        let initialize = json!({
            "protocolVersion": STDIO_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "valetd", "version": env!("CARGO_PKG_VERSION")},
        });
        let initialized = process
            .request("initialize", Some(initialize), START_TIMEOUT)
            .await
            .map_err(|error| {
                StdioError::Unavailable(format!("its server did not initialize: {error}"))
            })?;
        let Some(result) = initialized.get("result").cloned() else {
            // The server's own words stay in valetd's log: what reaches the agent is valetd's.
            let error = initialized
                .get("error")
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::warn!(upstream = name, error = %log(&error), "stdio MCP server refused initialize");
            return Err(StdioError::Unavailable(
                "its server refused initialize (its answer is in valetd's log)".into(),
            ));
        };
        process
            .write(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        let _ = process.initialized.set(result);
        Ok(process)
    }

    /// The server's answer to valetd's `initialize` (capabilities, serverInfo, instructions).
    pub fn initialized(&self) -> &Value {
        static NONE: Value = Value::Null;
        self.initialized.get().unwrap_or(&NONE)
    }

    /// Marks it used now, by `principal`'s call when given.
    fn touch(&self, principal: Option<&str>) {
        if let Ok(mut last_used) = self.last_used.lock() {
            last_used.0 = Instant::now();
            if let Some(principal) = principal
                && last_used.1 != principal
            {
                last_used.1 = principal.to_string();
            }
        }
    }

    /// The principal whose call went to it last (none yet: empty).
    fn last_caller(&self) -> String {
        self.last_used
            .lock()
            .map(|last_used| last_used.1.clone())
            .unwrap_or_default()
    }

    fn last_used(&self) -> Instant {
        self.last_used
            .lock()
            .map(|last| last.0)
            .unwrap_or_else(|_| Instant::now())
    }

    async fn write(&self, message: &Value) -> Result<(), StdioError> {
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        stdin
            .write_all(&line)
            .await
            .and(stdin.flush().await)
            .map_err(|error| {
                StdioError::Unavailable(format!("its server's stdin is closed: {error}"))
            })
    }

    /// Sends one request with an id of valetd's own and waits for its answer (the whole
    /// JSON-RPC response, id still valetd's).
    pub async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, StdioError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(StdioError::Unavailable("its server exited".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(id, reply);
        }
        let mut message = Map::new();
        message.insert("jsonrpc".into(), Value::from("2.0"));
        message.insert("id".into(), Value::from(id));
        message.insert("method".into(), Value::from(method));
        if let Some(params) = params {
            message.insert("params".into(), params);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let outcome = async {
            self.write(&Value::Object(message)).await?;
            match tokio::time::timeout(timeout, answer).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(_)) => Err(StdioError::Unavailable(
                    "its server exited before answering".into(),
                )),
                Err(_) => Err(StdioError::Timeout(timeout.as_secs())),
            }
        }
        .await;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.touch(None);
        if outcome.is_err()
            && let Ok(mut pending) = self.pending.lock()
        {
            pending.remove(&id);
        }
        outcome
    }

    /// One line from the server: a response goes to its caller; a request of the server is
    /// answered here (valetd declared no client capabilities, so none is relayed); a
    /// notification is dropped.
    async fn received(&self, line: &[u8], upstream: &str) {
        let Ok(message) = serde_json::from_slice::<Value>(line) else {
            tracing::debug!(upstream, "stdio MCP server wrote a line that is not JSON");
            return;
        };
        let id = message.get("id").cloned();
        match (message.get("method").and_then(Value::as_str), id) {
            (None, Some(id)) => {
                let caller = id.as_u64().and_then(|id| {
                    self.pending
                        .lock()
                        .ok()
                        .and_then(|mut pending| pending.remove(&id))
                });
                if let Some(caller) = caller {
                    let _ = caller.send(message);
                }
            }
            (Some(method), Some(id)) => {
                let answer = if method == "ping" {
                    json!({"jsonrpc": "2.0", "id": id, "result": {}})
                } else {
                    json!({"jsonrpc": "2.0", "id": id, "error": {
                        "code": -32601,
                        "message": format!("valetd relays no {method} requests from servers it runs"),
                    }})
                };
                if self.write(&answer).await.is_err() {
                    tracing::debug!(upstream, "cannot answer a stdio MCP server's request");
                }
            }
            _ => {}
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut child) = child.take()
        {
            let _ = child.start_kill();
        }
    }
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes; false at the end of the stream.
async fn read_line(
    reader: &mut BufReader<tokio::process::ChildStdout>,
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(!line.is_empty());
        }
        match buffer.iter().position(|byte| *byte == b'\n') {
            Some(end) => {
                line.extend_from_slice(&buffer[..end]);
                reader.consume(end + 1);
                return Ok(true);
            }
            None => {
                let n = buffer.len();
                line.extend_from_slice(buffer);
                reader.consume(n);
                if line.len() > MAX_LINE {
                    return Err(std::io::Error::other("a line longer than 16 MiB"));
                }
            }
        }
    }
}
