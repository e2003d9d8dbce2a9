//! Following grants and approvals across valetd restarts: each watch reconnects with backoff when
//! its stream ends (saying so on stderr), catches up from a listing of what changed while it was
//! away, and prints each change once — a change seen in the listing and again on the stream is
//! not printed twice.

use std::collections::HashMap;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use valet_client::{Client, ClientError, v1};

/// The first pause before reconnecting; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// A stream of changes as the server sends them.
pub type Changes<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

/// What a watch follows: how to open its stream, list the current state, and say what changed.
pub trait Followed {
    type Item: Send;
    /// Opens the stream of changes.
    fn open(
        &self,
        client: &Client,
    ) -> impl Future<Output = Result<Changes<Self::Item>, ClientError>>;
    /// Everything there is now, to catch up from.
    fn list(&self, client: &Client) -> impl Future<Output = anyhow::Result<Vec<Self::Item>>>;
    /// The item's id, and what about it counts as a change.
    fn key(&self, item: &Self::Item) -> (String, String);
    /// Prints one change; `caught_up` when it was found in a listing after a reconnect.
    fn print(&self, item: &Self::Item, caught_up: bool);
    /// What is watched, for the messages on stderr.
    fn name(&self) -> &'static str;
}

/// Follows `followed` until the user stops it; reconnects whenever the stream ends.
pub async fn follow<F: Followed>(client: &Client, followed: &F) -> anyhow::Result<()> {
    let mut seen: HashMap<String, String> = HashMap::new();
    // The stream is opened before the listing is read, so nothing falls between them.
    let mut stream = followed.open(client).await?;
    for item in followed.list(client).await? {
        let (id, state) = followed.key(&item);
        seen.insert(id, state);
    }
    eprintln!("watching {} (Ctrl-C to stop)", followed.name());
    loop {
        let reason = loop {
            match stream.next().await {
                Some(Ok(item)) => {
                    let (id, state) = followed.key(&item);
                    if seen.get(&id) != Some(&state) {
                        followed.print(&item, false);
                        seen.insert(id, state);
                    }
                }
                Some(Err(status)) => break status.message().to_string(),
                None => break "valetd closed the stream".to_string(),
            }
        };
        let mut pause = FIRST_PAUSE;
        eprintln!(
            "valet: the watch of {} ended ({reason}); reconnecting",
            followed.name()
        );
        stream = loop {
            tokio::time::sleep(pause).await;
            match followed.open(client).await {
                Ok(stream) => break stream,
                Err(error) => {
                    pause = (pause * 2).min(LONGEST_PAUSE);
                    eprintln!(
                        "valet: cannot reconnect yet ({}); trying again in {}",
                        first_line(&error.to_string()),
                        humantime::format_duration(pause)
                    );
                }
            }
        };
        let mut n_caught_up = 0;
        for item in followed.list(client).await? {
            let (id, state) = followed.key(&item);
            if seen.get(&id) != Some(&state) {
                followed.print(&item, true);
                seen.insert(id, state);
                n_caught_up += 1;
            }
        }
        eprintln!(
            "valet: watching {} again ({n_caught_up} changes while away)",
            followed.name()
        );
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Grant changes matching a filter.
pub struct Grants {
    pub filter: v1::GrantFilter,
    pub json: bool,
}

impl Followed for Grants {
    type Item = v1::GrantEvent;

    async fn open(&self, client: &Client) -> Result<Changes<v1::GrantEvent>, ClientError> {
        let stream = client
            .admin()
            .watch_grants(v1::WatchGrantsRequest {
                filter: Some(self.filter.clone()),
            })
            .await?
            .into_inner();
        Ok(Box::pin(stream))
    }

    async fn list(&self, client: &Client) -> anyhow::Result<Vec<v1::GrantEvent>> {
        Ok(crate::commands::list_all(client, self.filter.clone())
            .await?
            .into_iter()
            .map(|grant| v1::GrantEvent {
                kind: v1::GrantEventKind::Unspecified as i32,
                grant: Some(grant),
            })
            .collect())
    }

    fn key(&self, event: &v1::GrantEvent) -> (String, String) {
        let Some(grant) = &event.grant else {
            return (String::new(), String::new());
        };
        (
            grant.id.clone(),
            format!(
                "{}/{}/{}",
                grant.status,
                grant.expires_at.as_ref().map(|at| at.seconds).unwrap_or(0),
                grant.uses
            ),
        )
    }

    fn print(&self, event: &v1::GrantEvent, caught_up: bool) {
        crate::commands::print_grant_event(event, self.json, caught_up);
    }

    fn name(&self) -> &'static str {
        "grant changes"
    }
}

/// Approval requests as they arrive and change.
pub struct Approvals {
    pub json: bool,
}

impl Followed for Approvals {
    type Item = v1::Approval;

    async fn open(&self, client: &Client) -> Result<Changes<v1::Approval>, ClientError> {
        let stream = client
            .admin()
            .watch_approvals(v1::WatchApprovalsRequest {})
            .await?
            .into_inner();
        Ok(Box::pin(stream))
    }

    async fn list(&self, client: &Client) -> anyhow::Result<Vec<v1::Approval>> {
        crate::commands::list_approvals(client, false).await
    }

    fn key(&self, approval: &v1::Approval) -> (String, String) {
        (
            approval.id.clone(),
            format!("{}/{}", approval.status, approval.approvals.len()),
        )
    }

    fn print(&self, approval: &v1::Approval, _caught_up: bool) {
        crate::commands::print_approval_event(approval, self.json);
    }

    fn name(&self) -> &'static str {
        "approval requests"
    }
}
