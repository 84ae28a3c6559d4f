//! `pushwire.v1.IntegrationService`.

use pb::integration_service_server::IntegrationService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::domain::convert;
use pushwire_common::domain::{Integration, Secret};
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::client::WebhookClient;
use tonic::{Request, Response, Status};

use super::{account, answer, bad_request, integration_name, invalid, mask_paths, snake_case};
use crate::service::{AuthHeaderInput, Catalog, IntegrationPatch, PageRequest, TestReport};

/// Serves `IntegrationService` from the [`Catalog`]; `TestIntegration` sends with `client`,
/// built from the same flags as the workers' (same signing, headers and SSRF guard).
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

    /// What a read shows of `i`: no secret, and the keyed fingerprint of the current one.
    fn read(&self, i: &Integration) -> pb::Integration {
        let mut read = pb::Integration::from(i);
        read.secret_fingerprint = self.catalog.secret_fingerprint(i).unwrap_or_default();
        read
    }
}

const UPDATABLE: &[&str] = &[
    "display_name",
    "url",
    "enabled",
    "disabled_reason",
    "incomplete_participations",
    "payload_variables",
    "auth_header",
    "secret",
    "signature_schemes",
];

/// What `CreateIntegration` makes of `i` before the service sees it: the patch of every
/// populated field (for [`Catalog::import_account`], so that an import reads its input as the
/// API does).
pub fn create_patch(i: pb::Integration) -> Result<IntegrationPatch, Status> {
    patch(i, None)
}

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
            .map_err(|e| bad_request(&e))?
            .unwrap_or_default(),
        );
    }
    if wanted("payload_variables", i.payload_variables != 0) {
        patch.payload_variables = Some(
            convert::payload_variables("integration.payload_variables", i.payload_variables)
                .map_err(|e| bad_request(&e))?
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
                .map_err(|e| bad_request(&e))?,
        );
    }
    Ok(patch)
}

/// Whether an update only disables: a mask of `enabled` (and `disabled_reason`), with
/// `enabled: false`. That is all a worker may do, after `410 Gone`; since a mask limits the
/// change to the fields it names, nothing else can ride along.
fn only_disables(req: &pb::UpdateIntegrationRequest) -> bool {
    let (Some(mask), Some(i)) = (&req.update_mask, &req.integration) else {
        return false;
    };
    let paths: Vec<String> = mask.paths.iter().map(|p| snake_case(p)).collect();
    paths.iter().any(|p| p == "enabled")
        && paths
            .iter()
            .all(|p| p == "enabled" || p == "disabled_reason")
        && i.enabled == Some(false)
}

#[tonic::async_trait]
impl IntegrationService for IntegrationApi {
    async fn create_integration(
        &self,
        request: Request<pb::CreateIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        who.account(&account)?;
        let integration = req
            .integration
            .ok_or_else(|| invalid("integration", "required"))?;
        let id = (!req.integration_id.is_empty()).then_some(req.integration_id.as_str());
        let created = self
            .catalog
            .create_integration(&account, id, patch(integration, None)?)
            .await?;
        Ok(Response::new(self.read(&created)))
    }

    async fn get_integration(
        &self,
        request: Request<pb::GetIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let who = authorize(&request, Action::Read)?;
        let name = integration_name("name", &request.get_ref().name)?;
        who.account(name.account())?;
        let read = self.catalog.get_integration(&name).await?;
        Ok(answer(read, |i| self.read(&i)))
    }

    async fn list_integrations(
        &self,
        request: Request<pb::ListIntegrationsRequest>,
    ) -> Result<Response<pb::ListIntegrationsResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        who.account(&account)?;
        let read = self
            .catalog
            .list_integrations(
                &account,
                &PageRequest {
                    size: req.page_size,
                    token: req.page_token,
                },
            )
            .await?;
        Ok(answer(read, |page| pb::ListIntegrationsResponse {
            integrations: page.items.iter().map(|i| self.read(i)).collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn update_integration(
        &self,
        request: Request<pb::UpdateIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        // A worker may only disable (after 410 Gone); anything else is managing.
        let action = match only_disables(request.get_ref()) {
            true => Action::Disable,
            false => Action::Manage,
        };
        let who = authorize(&request, action)?;
        let req = request.into_inner();
        let integration = req
            .integration
            .ok_or_else(|| invalid("integration", "required"))?;
        let name = integration_name("integration.name", &integration.name)?;
        who.account(name.account())?;
        let etag =
            convert::etag("integration.etag", &integration.etag).map_err(|e| bad_request(&e))?;
        let paths = mask_paths(req.update_mask, UPDATABLE)?;
        let patch = patch(integration, paths.as_deref())?;
        let updated = self.catalog.update_integration(&name, etag, patch).await?;
        Ok(Response::new(self.read(&updated)))
    }

    async fn delete_integration(
        &self,
        request: Request<pb::DeleteIntegrationRequest>,
    ) -> Result<Response<()>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let name = integration_name("name", &req.name)?;
        who.account(name.account())?;
        let etag = convert::etag("etag", &req.etag).map_err(|e| bad_request(&e))?;
        self.catalog
            .delete_integration(&name, etag, req.force)
            .await?;
        Ok(Response::new(()))
    }

    async fn test_integration(
        &self,
        request: Request<pb::TestIntegrationRequest>,
    ) -> Result<Response<pb::TestIntegrationResponse>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let name = integration_name("name", &request.get_ref().name)?;
        who.account(name.account())?;
        let report = self.catalog.test_integration(&name, &self.client).await?;
        Ok(Response::new(test_response(report)))
    }
}

/// The `TestIntegration` answer for `report`: the status and what came with it, or only the
/// error (status 0) when the endpoint did not answer.
fn test_response(report: TestReport) -> pb::TestIntegrationResponse {
    match report {
        TestReport::Answered(a) => pb::TestIntegrationResponse {
            status_code: i32::from(a.status),
            latency_ms: i64::try_from(a.latency.as_millis()).unwrap_or(i64::MAX),
            response_headers: a.headers,
            response_body_prefix: a.body_prefix,
            error: String::new(),
        },
        TestReport::NoAnswer(error) => pb::TestIntegrationResponse {
            error,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::service::TestAnswer;

    #[test]
    fn answers_are_reported_whatever_the_status() {
        let resp = test_response(TestReport::Answered(TestAnswer {
            status: 410,
            latency: Duration::from_micros(12_345),
            headers: HashMap::from([("x-one".to_owned(), "1".to_owned())]),
            body_prefix: "gone".into(),
        }));
        assert_eq!(resp.status_code, 410);
        assert_eq!(resp.latency_ms, 12);
        assert_eq!(resp.response_body_prefix, "gone");
        assert_eq!(resp.error, "");
        assert_eq!(resp.response_headers["x-one"], "1");
    }

    #[test]
    fn no_answer_is_an_error_with_status_0() {
        let resp = test_response(TestReport::NoAnswer("timed out".into()));
        assert_eq!(
            resp,
            pb::TestIntegrationResponse {
                error: "timed out".into(),
                ..Default::default()
            }
        );
    }
}
