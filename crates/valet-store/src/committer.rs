//! Group commit: one thread flushes sled for every writer waiting at that moment, so durable
//! writes cost one flush per batch instead of one per request. It is also the only caller of
//! flush, which keeps clear of sled 0.34's deadlock between concurrent `flush_async` calls.

use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// A handle to the committer thread; dropping it stops the thread and waits for it, so the
/// database is closed (and its lock released) when the store is.
#[derive(Debug)]
pub struct Committer {
    requests: Option<std_mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer thread for `db`. It ends when every handle is dropped.
    pub fn start(db: sled::Db) -> std::io::Result<Committer> {
        let (requests, incoming) = std_mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("valet-store-commit".into())
            .spawn(move || {
                while let Ok(first) = incoming.recv() {
                    let mut batch = vec![first];
                    batch.extend(incoming.try_iter());
                    let started = std::time::Instant::now();
                    let outcome = db.flush().map(|_| ()).map_err(|error| error.to_string());
                    metrics::histogram!("valet_store_commit_writers").record(batch.len() as f64);
                    metrics::histogram!("valet_store_flush_seconds")
                        .record(started.elapsed().as_secs_f64());
                    if let Err(error) = &outcome {
                        metrics::counter!("valet_store_errors_total", "engine" => "sled")
                            .increment(1);
                        tracing::error!(%error, n_waiting = batch.len(), "store flush failed; failing the waiting writes");
                    }
                    for waiter in batch {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })?;
        Ok(Committer {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Waits until everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), String> {
        let (waiter, done) = oneshot::channel();
        let requests = self
            .requests
            .as_ref()
            .ok_or_else(|| "the store is closing".to_string())?;
        requests
            .send(waiter)
            .map_err(|_| "the store's commit thread has stopped".to_string())?;
        done.await
            .map_err(|_| "the store's commit thread has stopped".to_string())?
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
