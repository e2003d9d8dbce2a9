//! The gateway's view of the broker: keys, config, credentials, grants and the audit log of the
//! running valetd, behind the trait the gateway crate defines.

use std::sync::Arc;

use async_trait::async_trait;
use valet_core::audit::AuditEvent;
use valet_core::config::Config;
use valet_core::grant::Grant;
use valet_core::keyring::KeyRing;
use valet_core::{Secret, UnixTime};
use valet_gateway::{Broker, BrokerError};
use valet_store::StoreError;

use crate::error::ApiError;
use crate::valet::Valet;

pub struct GatewayBroker(pub Arc<Valet>);

#[async_trait]
impl Broker for GatewayBroker {
    fn config(&self) -> Arc<Config> {
        self.0.config()
    }

    fn key_ring(&self) -> Arc<KeyRing> {
        self.0.keys.ring()
    }

    fn now(&self) -> UnixTime {
        self.0.clock.now()
    }

    fn credential(&self, name: &str) -> Option<Secret> {
        self.0.redactor.credential(name)
    }

    async fn grant(&self, id: &str) -> Result<Option<Grant>, BrokerError> {
        self.0
            .store
            .get_grant(id)
            .await
            .map_err(|error| BrokerError::Unavailable(error.to_string()))
    }

    async fn update_grant(&self, expected: &Grant, new: &Grant) -> Result<(), BrokerError> {
        match self.0.store.update_grant(expected, new).await {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(BrokerError::Conflict),
            Err(error) => Err(BrokerError::Unavailable(error.to_string())),
        }
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), BrokerError> {
        self.0
            .audit
            .record(event)
            .await
            .map(|_| ())
            .map_err(|error| BrokerError::Unavailable(error.to_string()))
    }

    fn redact(&self, text: &str) -> String {
        self.0
            .redactor
            .redact(text)
            .unwrap_or_else(|| text.to_string())
    }

    async fn request_call_approval(
        &self,
        grant: &Grant,
        policy: &valet_core::approval::ApprovalPolicy,
        call: valet_core::approval::CallFingerprint,
        request_id: &str,
    ) -> Result<String, BrokerError> {
        self.0
            .request_call_approval(grant, policy, call, request_id)
            .await
            .map(|approval| approval.id)
            .map_err(|error| BrokerError::Unavailable(error.to_string()))
    }

    async fn consume_call_approval(
        &self,
        id: &str,
        grant: &Grant,
        call: &valet_core::approval::CallFingerprint,
        request_id: &str,
    ) -> Result<(), BrokerError> {
        use valet_core::approval::{ApprovalError, ApprovalStatus};
        match self
            .0
            .consume_call_approval(id, grant, call, request_id)
            .await
        {
            Ok(_) => Ok(()),
            Err(ApiError::Approval(error)) => {
                let pending = matches!(
                    error,
                    ApprovalError::NotUsable {
                        status: ApprovalStatus::Pending,
                        ..
                    }
                );
                Err(BrokerError::Refused {
                    reason: error.to_string(),
                    pending,
                })
            }
            Err(ApiError::Store(StoreError::ApprovalNotFound { id })) => {
                Err(BrokerError::Refused {
                    reason: format!("approval {id} does not exist"),
                    pending: false,
                })
            }
            Err(ApiError::InvalidField { problem, .. }) => Err(BrokerError::Refused {
                reason: format!("Valet-Approval: {problem}"),
                pending: false,
            }),
            Err(error) => Err(BrokerError::Unavailable(error.to_string())),
        }
    }
}
