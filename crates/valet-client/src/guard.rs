//! The task guard: the tokens of one task live exactly as long as the task.

use std::time::Duration;

use crate::{Client, ClientError, IssuedToken, TokenRequest};

/// Requests tokens for one task and revokes all of them when the task ends: explicitly with
/// [`TaskGuard::end`], or when the guard is dropped (on the current Tokio runtime, as a spawned
/// task — call `end` when you need to know the revocation happened).
pub struct TaskGuard {
    client: Client,
    task_id: String,
    ended: bool,
}

impl TaskGuard {
    pub(crate) fn new(client: Client, task_id: String) -> TaskGuard {
        TaskGuard {
            client,
            task_id,
            ended: false,
        }
    }

    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Requests a token for `scope` within this task.
    pub async fn request(
        &self,
        scope: &str,
        params: &[(&str, &str)],
        ttl: Option<Duration>,
    ) -> Result<IssuedToken, ClientError> {
        let mut request = TokenRequest::new(scope, &self.task_id);
        for (name, value) in params {
            request = request.with_param(*name, *value);
        }
        request.ttl = ttl;
        self.client.request_token(request).await
    }

    /// Ends the task: revokes every grant it holds and returns their ids.
    pub async fn end(mut self) -> Result<Vec<String>, ClientError> {
        self.ended = true;
        self.client.revoke_task(&self.task_id, "task ended").await
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let client = self.client.clone();
        let task_id = std::mem::take(&mut self.task_id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = client.revoke_task(&task_id, "task guard dropped").await {
                        tracing::error!(task_id, %error, "could not revoke the task's grants on drop");
                    }
                });
            }
            Err(_) => tracing::error!(
                task_id,
                "task guard dropped outside a Tokio runtime: its grants were not revoked"
            ),
        }
    }
}
