//! The admin API of a control plane (integrations and push scopes) over any channel with a
//! token that may manage them, and the literals the tests build requests from.

use std::collections::BTreeSet;

use anyhow::Context as _;
use prost_types::FieldMask;
use pushwire_common::pb::v1 as pb;
use tonic::Status;

use crate::control_plane::AuthChannel;

/// IntegrationService and PushScopeService over one channel.
#[derive(Clone, Debug)]
pub struct Admin {
    channel: AuthChannel,
}

impl Admin {
    /// Over `channel` (whose token decides what the calls may do).
    pub fn new(channel: AuthChannel) -> Self {
        Self { channel }
    }

    /// An IntegrationService client.
    pub fn integrations(
        &self,
    ) -> pb::integration_service_client::IntegrationServiceClient<AuthChannel> {
        pb::integration_service_client::IntegrationServiceClient::new(self.channel.clone())
    }

    /// A PushScopeService client.
    pub fn push_scopes(
        &self,
    ) -> pb::push_scope_service_client::PushScopeServiceClient<AuthChannel> {
        pb::push_scope_service_client::PushScopeServiceClient::new(self.channel.clone())
    }

    /// Creates integration `id` in `account`.
    pub async fn create_integration(
        &self,
        account: &str,
        id: &str,
        integration: pb::Integration,
    ) -> Result<pb::Integration, Status> {
        self.integrations()
            .create_integration(pb::CreateIntegrationRequest {
                parent: account.into(),
                integration_id: id.into(),
                integration: Some(integration),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates push scope `id` in `account`.
    pub async fn create_scope(
        &self,
        account: &str,
        id: &str,
        scope: pb::PushScope,
    ) -> Result<pb::PushScope, Status> {
        self.push_scopes()
            .create_push_scope(pb::CreatePushScopeRequest {
                parent: account.into(),
                push_scope_id: id.into(),
                push_scope: Some(scope),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates integration `id` in `account` with an ACCOUNT-level PUSH scope of the same id,
    /// so that it receives every participation of the account; returns its name.
    pub async fn create_routed(
        &self,
        account: &str,
        id: &str,
        integration: pb::Integration,
    ) -> anyhow::Result<String> {
        let name = self
            .create_integration(account, id, integration)
            .await
            .with_context(|| format!("creating {account}/integrations/{id}"))?
            .name;
        self.create_scope(account, id, scope(&name, pb::PushScopeLevel::Account, ""))
            .await
            .with_context(|| format!("creating {account}/pushScopes/{id}"))?;
        Ok(name)
    }

    /// Updates the fields of `integration` named in `paths`.
    pub async fn update_integration(
        &self,
        integration: pb::Integration,
        paths: &[&str],
    ) -> Result<pb::Integration, Status> {
        self.integrations()
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(integration),
                update_mask: Some(FieldMask {
                    paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Reads an integration.
    pub async fn get_integration(&self, name: &str) -> Result<pb::Integration, Status> {
        self.integrations()
            .get_integration(pb::GetIntegrationRequest { name: name.into() })
            .await
            .map(tonic::Response::into_inner)
    }

    /// What `ResolvePushes` answers: the names of the integrations that would fire.
    pub async fn resolve(&self, req: pb::ResolvePushesRequest) -> anyhow::Result<BTreeSet<String>> {
        Ok(self
            .push_scopes()
            .resolve_pushes(req)
            .await
            .context("ResolvePushes")?
            .into_inner()
            .pushes
            .into_iter()
            .map(|p| p.integration)
            .collect())
    }

    /// Every integration and push scope of `account` (one page of up to 1,000 each).
    pub async fn list_all(
        &self,
        account: &str,
    ) -> anyhow::Result<(Vec<pb::Integration>, Vec<pb::PushScope>)> {
        let integrations = self
            .integrations()
            .list_integrations(pb::ListIntegrationsRequest {
                parent: account.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .integrations;
        let scopes = self
            .push_scopes()
            .list_push_scopes(pb::ListPushScopesRequest {
                parent: account.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .push_scopes;
        Ok((integrations, scopes))
    }
}

/// An enabled integration posting to `url`; no secret, default policy and schemes.
pub fn integration(display_name: &str, url: &str) -> pb::Integration {
    pb::Integration {
        display_name: display_name.into(),
        url: url.into(),
        ..Default::default()
    }
}

/// A PUSH scope for every audience.
pub fn scope(integration: &str, level: pb::PushScopeLevel, target_id: &str) -> pb::PushScope {
    pb::PushScope {
        integration: integration.into(),
        level: level.into(),
        target_id: target_id.into(),
        audience: pb::Audience::All.into(),
        action: pb::PushAction::Push.into(),
        ..Default::default()
    }
}
