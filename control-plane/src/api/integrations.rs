//! `pushwire.v1.IntegrationService`.

use pb::integration_service_server::IntegrationService;
use pushwire_common::domain::Secret;
use pushwire_common::domain::convert;
use pushwire_common::pb::v1 as pb;
use pushwire_worker::deliver::client::WebhookClient;
use tonic::{Request, Response, Status};

use super::{account, integration_name, invalid, mask_paths};
use crate::service::{AuthHeaderInput, Catalog, IntegrationPatch, PageRequest};

/// Serves `IntegrationService` from the [`Catalog`]; `TestIntegration` sends with `client`,
/// the workers' own client (same signing, headers and SSRF guard).
#[derive(Clone, Debug)]
pub struct IntegrationApi {
    catalog: Catalog,
    client: WebhookClient,
}

impl IntegrationApi {
    /// The service over `catalog`.
    pub fn new(catalog: Catalog, client: WebhookClient) -> Self {
        Self { catalog, client }
    }
}

const UPDATABLE: &[&str] = &[
    "display_name",
    "url",
    "enabled",
    "disabled_reason",
    "incomplete_participations",
    "auth_header",
    "secret",
    "signature_schemes",
];

/// Reads the fields of `i` named by `paths` (every populated field when `None`) into a patch.
fn patch(i: pb::Integration, paths: Option<&[String]>) -> Result<IntegrationPatch, Status> {
    let wanted = |field: &str, populated: bool| match paths {
        Some(paths) => paths.iter().any(|p| p == field),
        None => populated,
    };
    let mut patch = IntegrationPatch::default();
    if wanted("display_name", !i.display_name.is_empty()) {
        patch.display_name = Some(i.display_name);
    }
    if wanted("url", !i.url.is_empty()) {
        patch.url = Some(i.url);
    }
    if wanted("enabled", i.enabled.is_some()) {
        patch.enabled = Some(i.enabled.unwrap_or(true));
    }
    if wanted("disabled_reason", !i.disabled_reason.is_empty()) {
        patch.disabled_reason = Some(i.disabled_reason);
    }
    if wanted(
        "incomplete_participations",
        i.incomplete_participations != 0,
    ) {
        patch.incomplete_participations = Some(
            convert::incomplete_policy(
                "integration.incomplete_participations",
                i.incomplete_participations,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .unwrap_or_default(),
        );
    }
    if wanted("auth_header", i.auth_header.is_some()) {
        patch.auth_header = Some(match i.auth_header {
            Some(h) if !h.name.is_empty() || !h.value.is_empty() => {
                if h.name.is_empty() {
                    return Err(invalid(
                        "integration.auth_header.name",
                        "required when a value is given",
                    ));
                }
                Some(AuthHeaderInput {
                    name: h.name,
                    value: Secret::new(h.value),
                })
            }
            _ => None,
        });
    }
    if wanted("secret", !i.secret.is_empty()) {
        patch.secret = Some((!i.secret.is_empty()).then(|| Secret::new(i.secret)));
    }
    if wanted("signature_schemes", !i.signature_schemes.is_empty()) {
        patch.signature_schemes = Some(
            convert::signature_schemes("integration.signature_schemes", &i.signature_schemes)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        );
    }
    Ok(patch)
}

#[tonic::async_trait]
impl IntegrationService for IntegrationApi {
    async fn create_integration(
        &self,
        request: Request<pb::CreateIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        let integration = req
            .integration
            .ok_or_else(|| invalid("integration", "required"))?;
        let id = (!req.integration_id.is_empty()).then_some(req.integration_id.as_str());
        let created = self
            .catalog
            .create_integration(&account, id, patch(integration, None)?)
            .await?;
        Ok(Response::new((&created).into()))
    }

    async fn get_integration(
        &self,
        request: Request<pb::GetIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let name = integration_name("name", &request.get_ref().name)?;
        Ok(Response::new(
            (&self.catalog.get_integration(&name).await?).into(),
        ))
    }

    async fn list_integrations(
        &self,
        request: Request<pb::ListIntegrationsRequest>,
    ) -> Result<Response<pb::ListIntegrationsResponse>, Status> {
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        let page = self
            .catalog
            .list_integrations(
                &account,
                &PageRequest {
                    size: req.page_size,
                    token: req.page_token,
                },
            )
            .await?;
        Ok(Response::new(pb::ListIntegrationsResponse {
            integrations: page.items.iter().map(Into::into).collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn update_integration(
        &self,
        request: Request<pb::UpdateIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let req = request.into_inner();
        let integration = req
            .integration
            .ok_or_else(|| invalid("integration", "required"))?;
        let name = integration_name("integration.name", &integration.name)?;
        let etag = convert::etag("integration.etag", &integration.etag)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let paths = mask_paths(req.update_mask, UPDATABLE)?;
        let patch = patch(integration, paths.as_deref())?;
        let updated = self.catalog.update_integration(&name, etag, patch).await?;
        Ok(Response::new((&updated).into()))
    }

    async fn delete_integration(
        &self,
        request: Request<pb::DeleteIntegrationRequest>,
    ) -> Result<Response<()>, Status> {
        let req = request.into_inner();
        let name = integration_name("name", &req.name)?;
        let etag = convert::etag("etag", &req.etag)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.catalog
            .delete_integration(&name, etag, req.force)
            .await?;
        Ok(Response::new(()))
    }

    async fn test_integration(
        &self,
        _request: Request<pb::TestIntegrationRequest>,
    ) -> Result<Response<pb::TestIntegrationResponse>, Status> {
        Err(Status::unimplemented(
            "TestIntegration arrives with the worker's delivery code",
        ))
    }
}
