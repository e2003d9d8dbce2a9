//! The audit log writer: appends chained records to the audit file, synced to disk before anyone
//! is answered. Like the store, it commits in groups: one sync for every record waiting at once.
//! Every record carries a MAC under the chain key (derived from the key-encryption key), a signed
//! checkpoint attests the head every [`CHECKPOINT_EVERY`] records and opens every rotated file,
//! and the file is locked by its writer: one valetd per audit log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use valet_core::Clock;
use valet_core::audit::{self, AuditEvent, ChainHead, ChainKey};
use valet_store::Store;

use crate::redactor::Redactor;

/// What a record keeps of one text value at most (bytes): longer ones, such as a 64 KB query
/// string a refused caller sent, keep an excerpt, their length and their SHA-256.
pub const MAX_RECORD_VALUE: usize = 512;
/// Fields valetd writes from its own config, kept whole however long.
const VALETD_AUTHORED_FIELDS: &[&str] = &["rules", "aws_session_policy"];

/// Why a record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log {path} cannot be written: {detail}")]
    Unwritable { path: String, detail: String },
    #[error(
        "the audit log {path} ends at record {file_sequence} but the store's chain head is record {store_sequence}: the log was cut or replaced; restore it (to rotate the log, move the whole file aside: a new file continues the chain)"
    )]
    TailMissing {
        path: String,
        file_sequence: u64,
        store_sequence: u64,
    },
    #[error(
        "the audit log {path} does not end with the chain head the store recorded ({expected}); it was rewritten"
    )]
    HeadMismatch { path: String, expected: String },
    #[error("the audit writer has stopped")]
    Stopped,
    #[error(
        "the audit log {path} runs past the chain head the store recorded (record {store_sequence}): {detail}; valetd does not adopt records it cannot prove it wrote — restore the log, or move it aside to start a new file that continues the chain"
    )]
    UnprovenRecords {
        path: String,
        store_sequence: u64,
        detail: String,
    },
    #[error(
        "the audit log {path} is in use by another valetd ({holder}); each valetd needs its own audit log"
    )]
    Locked { path: String, holder: String },
    #[error(
        "valetd did not stop cleanly last time, and the audit log {path} it was writing is not there (moved aside for rotation?): its records after record {sequence} are needed to restore the grants issued since the store's last checkpoint; put the file back, start valetd once and stop it, then rotate"
    )]
    NeededForRestore { path: String, sequence: u64 },
}

/// A signed checkpoint attests the chain's head after this many records.
pub const CHECKPOINT_EVERY: u64 = 1000;

/// How a caller hears about its record.
enum Reply {
    /// Once the record is on disk.
    Durable(oneshot::Sender<Result<ChainHead, AuditError>>),
    /// Once the record is written (handed to the kernel), and again once it is on disk.
    Written {
        written: oneshot::Sender<Result<ChainHead, AuditError>>,
        durable: oneshot::Sender<Result<(), AuditError>>,
    },
}

/// A record that was written and is being made durable: wait on it before anything that
/// depends on its durability is released.
#[derive(Debug)]
pub struct DurableRecord(oneshot::Receiver<Result<(), AuditError>>);

impl DurableRecord {
    /// Returns once the record is on disk; an error when its sync failed.
    pub async fn wait(self) -> Result<(), AuditError> {
        self.0.await.map_err(|_| AuditError::Stopped)?
    }
}

/// A handle for appending records. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    sender: mpsc::Sender<(AuditEvent, Reply)>,
    written: broadcast::Sender<Arc<WrittenRecord>>,
    /// The sequence of the last record on disk.
    durable: watch::Receiver<u64>,
    path: PathBuf,
    /// Set when several replicas share the state: every record says which one wrote it.
    replica: Option<String>,
    /// Whether this valetd started a new file (none was there) continuing the chain.
    started_new_file: bool,
}

/// A record as it was written, for followers of the log.
#[derive(Debug, Clone)]
pub struct WrittenRecord {
    pub sequence: u64,
    pub line: String,
}

impl AuditSink {
    /// Opens the audit file, checks its tail against the head the store kept, and starts the
    /// writer task.
    pub(crate) async fn open(
        path: &Path,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        redactor: Arc<Redactor>,
        chain_key: ChainKey,
        keys: Arc<crate::keys::Keys>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<AuditSink, AuditError> {
        let display = path.display().to_string();
        let unwritable = |detail: String| AuditError::Unwritable {
            path: display.clone(),
            detail,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| unwritable(error.to_string()))?;
        }
        // A log that is absent (moved aside for rotation) or not a regular file starts a new file
        // that continues the chain from the store's head; an existing regular file must end there.
        let continues_elsewhere = std::fs::metadata(path)
            .map(|metadata| !metadata.is_file())
            .unwrap_or(true);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|error| unwritable(error.to_string()))?;
        lock(&file, path)?;
        let file_head =
            last_record_head(&mut file).map_err(|error| unwritable(error.to_string()))?;
        let store_head = store
            .audit_head()
            .await
            .map_err(|error| unwritable(error.to_string()))?;
        let head = match (file_head, store_head) {
            (Some(file_head), Some(store_head)) if file_head.sequence < store_head.sequence => {
                return Err(AuditError::TailMissing {
                    path: display,
                    file_sequence: file_head.sequence,
                    store_sequence: store_head.sequence,
                });
            }
            (None, Some(store_head)) if continues_elsewhere => {
                tracing::warn!(path = %path.display(), head = %store_head, "the audit log starts a new file, continuing the chain from the store's head");
                store_head
            }
            (None, Some(store_head)) if store_head.sequence > 0 => {
                return Err(AuditError::TailMissing {
                    path: display,
                    file_sequence: 0,
                    store_sequence: store_head.sequence,
                });
            }
            (Some(file_head), Some(store_head))
                if file_head.sequence == store_head.sequence && file_head != store_head =>
            {
                return Err(AuditError::HeadMismatch {
                    path: display,
                    expected: store_head.to_string(),
                });
            }
            (Some(file_head), Some(store_head)) if file_head.sequence > store_head.sequence => {
                // Records past the recorded head: the last batch before a crash (its head not yet
                // recorded) — or records appended by someone else. Only records that follow the
                // recorded head and carry valetd's MAC are adopted.
                prove_records_past(&mut file, &store_head, &chain_key).map_err(|detail| {
                    AuditError::UnprovenRecords {
                        path: display.clone(),
                        store_sequence: store_head.sequence,
                        detail,
                    }
                })?;
                file_head
            }
            (Some(file_head), None) => {
                // No head recorded at all: a new or wiped store. The file is taken as it is; its
                // MACs and checkpoints are still checked by `valet audit verify`.
                tracing::warn!(path = %path.display(), head = %file_head, "the store records no audit chain head; continuing the audit log from its own last record, which valetd has not proved it wrote (run valet audit verify)");
                file_head
            }
            (Some(file_head), Some(_)) => file_head,
            (None, _) => ChainHead::genesis(),
        };
        let opens_rotated_file = continues_elsewhere && head.sequence > 0;
        let (sender, receiver) = mpsc::channel(4096);
        let (durable_sender, durable) = watch::channel(head.sequence);
        let writer = Writer {
            metrics,
            durable: durable_sender,
            path: path.to_path_buf(),
            file: Some(file),
            last_checkpoint: if opens_rotated_file {
                None
            } else {
                Some(head.sequence)
            },
            head,
            store,
            clock,
            redactor,
            chain_key,
            keys,
            written: broadcast::channel(1024).0,
        };
        let written = writer.written.clone();
        tokio::spawn(writer.run(receiver));
        Ok(AuditSink {
            started_new_file: continues_elsewhere,
            replica: None,
            sender,
            written,
            durable,
            path: path.to_path_buf(),
        })
    }

    /// Marks every record from now on with this replica's name.
    pub fn for_replica(self, replica: String) -> AuditSink {
        AuditSink {
            replica: Some(replica),
            ..self
        }
    }

    /// `event` as this replica writes it (naming the replica when several share the state).
    fn stamped(&self, event: AuditEvent) -> AuditEvent {
        match &self.replica {
            Some(replica) => event.with("replica", replica),
            None => event,
        }
    }

    /// Appends `event`; returns once it is on disk, with the new chain head.
    pub async fn record(&self, event: AuditEvent) -> Result<ChainHead, AuditError> {
        let event = self.stamped(event);
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((event, Reply::Durable(reply)))
            .await
            .map_err(|_| AuditError::Stopped)?;
        answer.await.map_err(|_| AuditError::Stopped)?
    }

    /// Appends `event`; returns once it is written (in the kernel's hands: a crash of valetd no
    /// longer loses it), with a [`DurableRecord`] that completes once it is on disk. For work
    /// that may start before the sync but must not be released before it.
    pub async fn record_written(
        &self,
        event: AuditEvent,
    ) -> Result<(ChainHead, DurableRecord), AuditError> {
        let event = self.stamped(event);
        let (written, written_answer) = oneshot::channel();
        let (durable, durable_answer) = oneshot::channel();
        self.sender
            .send((event, Reply::Written { written, durable }))
            .await
            .map_err(|_| AuditError::Stopped)?;
        let head = written_answer.await.map_err(|_| AuditError::Stopped)??;
        Ok((head, DurableRecord(durable_answer)))
    }

    /// Whether this valetd found no log at its path and started a new file continuing the chain.
    pub fn started_new_file(&self) -> bool {
        self.started_new_file
    }

    /// The path of the log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence of the last record known to be on disk: every record up to it is durable.
    pub fn durable_sequence(&self) -> u64 {
        *self.durable.borrow()
    }

    /// The records after `sequence` up to [`AuditSink::durable_sequence`], read back from the
    /// file and checked: they must continue the chain from record `sequence` and carry valetd's
    /// MAC. An error says why they cannot be trusted or read (the file was rotated past
    /// `sequence`, say).
    pub async fn durable_records_after(
        &self,
        sequence: u64,
        chain_key: Arc<ChainKey>,
    ) -> Result<Vec<serde_json::Value>, AuditError> {
        let path = self.path.clone();
        let until = self.durable_sequence();
        let display = path.display().to_string();
        let unreadable = |detail: String| AuditError::Unwritable {
            path: display.clone(),
            detail,
        };
        if until <= sequence {
            return Ok(Vec::new());
        }
        tokio::task::spawn_blocking(move || records_between(&path, sequence, until, &chain_key))
            .await
            .map_err(|error| unreadable(error.to_string()))?
            .map_err(unreadable)
    }

    /// Records written from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<WrittenRecord>> {
        self.written.subscribe()
    }

    /// The last `n` records in the file, oldest first.
    pub async fn last_records(&self, n: usize) -> Result<Vec<WrittenRecord>, AuditError> {
        let path = self.path.clone();
        let display = path.display().to_string();
        tokio::task::spawn_blocking(move || last_lines(&path, n))
            .await
            .map_err(|error| AuditError::Unwritable {
                path: display.clone(),
                detail: error.to_string(),
            })?
            .map_err(|error| AuditError::Unwritable {
                path: display,
                detail: error.to_string(),
            })
    }
}

struct Writer {
    path: PathBuf,
    file: Option<File>,
    head: ChainHead,
    /// The head the last checkpoint attested; `None` when the file needs one first (a rotated
    /// file opens with a checkpoint of the head it continues).
    last_checkpoint: Option<u64>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    redactor: Arc<Redactor>,
    chain_key: ChainKey,
    keys: Arc<crate::keys::Keys>,
    written: broadcast::Sender<Arc<WrittenRecord>>,
    durable: watch::Sender<u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Writer {
    async fn run(mut self, mut receiver: mpsc::Receiver<(AuditEvent, Reply)>) {
        const MAX_BATCH: usize = 1024;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let now = self.clock.now();
            let mut text = String::new();
            let mut heads = Vec::with_capacity(batch.len());
            let mut lines = Vec::with_capacity(batch.len());
            let mut head = self.head.clone();
            let mut checkpoint_at = self.last_checkpoint;
            let mut observed = Vec::with_capacity(batch.len());
            let started = std::time::Instant::now();
            let mut push = |line: String, next: &ChainHead, text: &mut String| {
                text.push_str(&line);
                text.push('\n');
                lines.push(WrittenRecord {
                    sequence: next.sequence,
                    line,
                });
            };
            if checkpoint_at.is_none()
                && let Some((line, next)) = self.checkpoint_line(&head, now)
            {
                push(line, &next, &mut text);
                checkpoint_at = Some(next.sequence);
                head = next;
            }
            for (event, _) in &batch {
                let event = event
                    .clone()
                    .redacted(|text| self.redactor.redact(text))
                    .bounded(MAX_RECORD_VALUE, VALETD_AUTHORED_FIELDS);
                let (line, next) = audit::chain(&head, &event, now, Some(&self.chain_key));
                observed.push(event);
                push(line, &next, &mut text);
                heads.push(next.clone());
                head = next;
                if head.sequence - checkpoint_at.unwrap_or(0) >= CHECKPOINT_EVERY
                    && let Some((line, next)) = self.checkpoint_line(&head, now)
                {
                    push(line, &next, &mut text);
                    checkpoint_at = Some(next.sequence);
                    head = next;
                }
            }
            let two_phase = batch
                .iter()
                .any(|(_, reply)| matches!(reply, Reply::Written { .. }));
            let outcome = if two_phase {
                // Those who asked hear "written" as soon as the bytes are in the kernel's hands,
                // and start their work while the sync runs.
                let written = self.append(text, false).await;
                let mut durable_replies = Vec::with_capacity(batch.len());
                for ((_, reply), head) in batch.drain(..).zip(heads.iter()) {
                    match reply {
                        Reply::Written {
                            written: sender,
                            durable,
                        } => {
                            let _ = sender.send(written.clone().map(|_| head.clone()));
                            durable_replies.push((None, Some(durable)));
                        }
                        Reply::Durable(sender) => durable_replies.push((Some(sender), None)),
                    }
                }
                let outcome = match written {
                    Ok(length_before) => self.sync(length_before).await,
                    Err(error) => Err(error),
                };
                self.measured(&outcome, started, &observed);
                if outcome.is_ok() {
                    self.committed(head, checkpoint_at, lines).await;
                }
                for ((durable_only, durable), head) in durable_replies.into_iter().zip(heads) {
                    if let Some(sender) = durable_only {
                        let _ = sender.send(outcome.clone().map(|_| head));
                    }
                    if let Some(sender) = durable {
                        let _ = sender.send(outcome.clone());
                    }
                }
                continue;
            } else {
                self.append(text, true).await.map(|_| ())
            };
            self.measured(&outcome, started, &observed);
            if outcome.is_ok() {
                self.committed(head, checkpoint_at, lines).await;
            }
            for ((_, reply), head) in batch.drain(..).zip(heads) {
                match reply {
                    Reply::Durable(sender) => {
                        let _ = sender.send(outcome.clone().map(|_| head));
                    }
                    Reply::Written { written, durable } => {
                        let _ = written.send(outcome.clone().map(|_| head));
                        let _ = durable.send(outcome.clone());
                    }
                }
            }
        }
    }

    /// Metrics of one commit group: its size and how long writing and syncing took; once on
    /// disk, what its records say.
    fn measured(
        &self,
        outcome: &Result<(), AuditError>,
        started: std::time::Instant,
        observed: &[AuditEvent],
    ) {
        metrics::histogram!("valet_audit_commit_records").record(observed.len() as f64);
        metrics::histogram!("valet_audit_commit_seconds").record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => observed
                .iter()
                .for_each(|event| self.metrics.observe(event)),
            Err(_) => metrics::counter!("valet_audit_write_errors_total").increment(1),
        }
    }

    /// A batch is on disk: the head moves, the store records it, followers hear the records.
    async fn committed(
        &mut self,
        head: ChainHead,
        checkpoint_at: Option<u64>,
        lines: Vec<WrittenRecord>,
    ) {
        self.head = head;
        self.last_checkpoint = checkpoint_at;
        self.durable.send_replace(self.head.sequence);
        if let Err(error) = self.store.record_audit_head(&self.head).await {
            tracing::error!(%error, "cannot record the audit chain head in the store");
        }
        for record in lines {
            // Nobody following is not an error.
            let _ = self.written.send(Arc::new(record));
        }
    }

    /// A checkpoint record attesting `head`, signed with the current signing key; none while the
    /// key ring cannot be trusted (the records themselves still carry their MACs).
    fn checkpoint_line(
        &self,
        head: &ChainHead,
        now: valet_core::UnixTime,
    ) -> Option<(String, ChainHead)> {
        let ring = self.keys.ring().ok()?;
        let event = audit::checkpoint(head, ring.current());
        Some(audit::chain(head, &event, now, Some(&self.chain_key)))
    }

    /// Writes `text` (and syncs it when `sync`); on failure, cuts the file back so the chain on
    /// disk never holds a record whose caller was told it failed. Returns the file's length
    /// before the write, for a later [`Writer::sync`] to cut back to.
    async fn append(&mut self, text: String, sync: bool) -> Result<Option<u64>, AuditError> {
        self.on_file(move |file| {
            let before = file.metadata().map(|metadata| metadata.len()).ok();
            let outcome = file
                .write_all(text.as_bytes())
                .and_then(|_| if sync { file.sync_data() } else { Ok(()) });
            (before, outcome)
        })
        .await
    }

    /// Syncs what [`Writer::append`] wrote; on failure, cuts the file back to `before`.
    async fn sync(&mut self, before: Option<u64>) -> Result<(), AuditError> {
        self.on_file(move |file| (before, file.sync_data()))
            .await
            .map(|_| ())
    }

    /// Runs `work` on the file on the blocking pool; when it fails, the file is cut back to the
    /// length `work` reports it had before.
    async fn on_file(
        &mut self,
        work: impl FnOnce(&mut File) -> (Option<u64>, std::io::Result<()>) + Send + 'static,
    ) -> Result<Option<u64>, AuditError> {
        let path = self.path.display().to_string();
        let Some(mut file) = self.file.take() else {
            return Err(AuditError::Unwritable {
                path,
                detail: "the file was lost after an earlier failure".into(),
            });
        };
        let (file, before, outcome) = tokio::task::spawn_blocking(move || {
            let (before, outcome) = work(&mut file);
            if outcome.is_err()
                && let Some(length) = before
                && file
                    .metadata()
                    .map(|metadata| metadata.is_file())
                    .unwrap_or(false)
            {
                let _ = file.set_len(length);
            }
            (file, before, outcome)
        })
        .await
        .map_err(|error| AuditError::Unwritable {
            path: path.clone(),
            detail: error.to_string(),
        })?;
        self.file = Some(file);
        outcome
            .map(|_| before)
            .map_err(|error| AuditError::Unwritable {
                path,
                detail: error.to_string(),
            })
    }
}

/// Locks the audit file for this process (released when it exits): a second valetd on the same
/// log refuses to start, naming the holder.
fn lock(file: &File, path: &Path) -> Result<(), AuditError> {
    let owner = path.with_extension("owner");
    match file.try_lock() {
        Ok(()) => {
            let holder = format!(
                "pid {} on {}",
                std::process::id(),
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|name| name.trim().to_string())
                    .unwrap_or_default()
            );
            // Best effort: the name only helps the message a second valetd prints.
            let _ = std::fs::write(&owner, holder);
            Ok(())
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::Locked {
            path: path.display().to_string(),
            holder: std::fs::read_to_string(&owner)
                .map(|holder| holder.trim().to_string())
                .unwrap_or_else(|_| "holder unknown".to_string()),
        }),
        Err(std::fs::TryLockError::Error(error)) => Err(AuditError::Unwritable {
            path: path.display().to_string(),
            detail: format!("cannot lock it: {error}"),
        }),
    }
}

/// Proves the records after `store_head` were written by this valetd: they follow it and carry
/// its MAC. Says which record fails otherwise.
fn prove_records_past(
    file: &mut File,
    store_head: &ChainHead,
    chain_key: &ChainKey,
) -> Result<(), String> {
    let lines = lines_from_sequence(file, store_head.sequence)
        .map_err(|error| format!("it cannot be read: {error}"))?;
    let Some(first) = lines.first() else {
        return Err(format!("record {} is not in it", store_head.sequence));
    };
    let anchor = audit::verify([first.as_str()], None)
        .map_err(|error| format!("record {}: {error}", store_head.sequence))?;
    if anchor.head != *store_head {
        return Err(format!(
            "record {} is not the one valetd recorded: the log diverges there",
            store_head.sequence
        ));
    }
    // The anchor is the record the store names; what follows must chain from it under the key.
    audit::verify(lines.iter().map(String::as_str), None)
        .and_then(|_| audit::verify_continuation(lines[1..].iter().map(String::as_str), chain_key))
        .map(|_| ())
        .map_err(|error| format!("after record {}, {error}", store_head.sequence))
}

/// The `seq` of one line of the log, if it has one.
pub(crate) fn sequence_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|value| value.get("seq").and_then(serde_json::Value::as_u64))
}

/// The records after `after` up to and including `until`, parsed, after checking that they follow
/// record `after` (or start the chain, when `after` is 0) and carry valetd's MAC.
fn records_between(
    path: &Path,
    after: u64,
    until: u64,
    chain_key: &ChainKey,
) -> Result<Vec<serde_json::Value>, String> {
    let mut file = File::open(path).map_err(|error| format!("cannot open it: {error}"))?;
    let mut lines = if after == 0 {
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|error| format!("cannot read it: {error}"))?;
        text.lines().map(str::to_string).collect()
    } else {
        lines_from_sequence(&mut file, after).map_err(|error| format!("cannot read it: {error}"))?
    };
    if lines.is_empty() {
        return Err(format!(
            "record {after} is not in it (was it rotated?); the records after it are needed to restore the grants issued since the store's last checkpoint"
        ));
    }
    // The writer may be appending past `until`: keep only the complete, durable records.
    let Some(last) = lines
        .iter()
        .position(|line| sequence_of(line) == Some(until))
    else {
        return Err(format!(
            "record {until}, the last one valetd synced, is not in it: the file was replaced or cut while valetd read it"
        ));
    };
    lines.truncate(last + 1);
    let checked = if after == 0 {
        let verification = audit::Verification {
            key: Some(chain_key),
            ..audit::Verification::default()
        };
        audit::verify_with(lines.iter().map(String::as_str), &verification)
    } else {
        audit::verify_continuation(lines.iter().map(String::as_str), chain_key)
    };
    checked.map_err(|error| format!("after record {after}, {error}"))?;
    let skip = usize::from(after > 0);
    lines[skip..]
        .iter()
        .map(|line| serde_json::from_str(line).map_err(|error| error.to_string()))
        .collect()
}

/// The lines of the file from the record with `sequence` to the end, reading only as much of its
/// tail as needed.
fn lines_from_sequence(file: &mut File, sequence: u64) -> std::io::Result<Vec<String>> {
    let length = file.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(file)
            .take(length - start)
            .read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        let position = lines
            .iter()
            .position(|line| sequence_of(line) == Some(sequence));
        if let Some(position) = position {
            return Ok(lines[position..]
                .iter()
                .map(|line| line.to_string())
                .collect());
        }
        if start == 0 {
            return Ok(Vec::new());
        }
        window *= 4;
    }
}

/// The chain head of the file's last record, reading only its tail.
fn last_record_head(file: &mut File) -> std::io::Result<Option<ChainHead>> {
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() == 0 {
        return Ok(None);
    }
    let length = metadata.len();
    let mut window = 4096u64;
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(file)
            .take(length - start)
            .read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        let trimmed = text.trim_end_matches('\n');
        if let Some(position) = trimmed.rfind('\n').or((start == 0).then_some(0)) {
            let line = trimmed[position..].trim_start_matches('\n');
            return match audit::verify([line], None) {
                Ok(summary) => Ok(Some(summary.head).filter(|head| head.sequence > 0)),
                Err(_) => Err(std::io::Error::other(
                    "its last line is not a complete audit record (a crash mid-write, or an edit); `valet audit verify` shows where",
                )),
            };
        }
        window *= 4;
    }
}

/// The last `n` complete lines of a file, with their sequence numbers, reading only its tail.
fn last_lines(path: &Path, n: usize) -> std::io::Result<Vec<WrittenRecord>> {
    let mut file = File::open(path)?;
    let length = file.metadata()?.len();
    if n == 0 || length == 0 || !file.metadata()?.is_file() {
        return Ok(Vec::new());
    }
    let mut window = 64 * 1024u64;
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(&mut file)
            .take(length - start)
            .read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 {
            // The first line may be cut in the middle.
            lines.remove(0);
        }
        if lines.len() >= n || start == 0 {
            let keep = lines.len().saturating_sub(n);
            return Ok(lines[keep..]
                .iter()
                .map(|line| WrittenRecord {
                    sequence: sequence_of(line).unwrap_or(0),
                    line: line.to_string(),
                })
                .collect());
        }
        window *= 4;
    }
}
