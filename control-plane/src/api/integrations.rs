//! `pushwire.v1.IntegrationService`.

use std::collections::HashMap;
use std::time::SystemTime;

use pb::integration_service_server::IntegrationService;
use prost::bytes::Bytes;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::domain::convert;
use pushwire_common::domain::{Integration, Secret};
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::client::{AttemptError, HttpResponse, WebhookClient};
use pushwire_common::webhook::request::{self, SAMPLE_PARTICIPATION, SAMPLE_PARTICIPATION_ID};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

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
    "payload_variables",
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
    if wanted("payload_variables", i.payload_variables != 0) {
        patch.payload_variables = Some(
            convert::payload_variables("integration.payload_variables", i.payload_variables)
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

/// Whether an update only disables: a mask of `enabled` (and `disabled_reason`), with
/// `enabled: false`. That is all a worker may do, after `410 Gone`; since a mask limits the
/// change to the fields it names, nothing else can ride along.
fn only_disables(req: &pb::UpdateIntegrationRequest) -> bool {
    let (Some(mask), Some(i)) = (&req.update_mask, &req.integration) else {
        return false;
    };
    mask.paths.iter().any(|p| p == "enabled")
        && mask
            .paths
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
        Ok(Response::new((&created).into()))
    }

    async fn get_integration(
        &self,
        request: Request<pb::GetIntegrationRequest>,
    ) -> Result<Response<pb::Integration>, Status> {
        let who = authorize(&request, Action::Read)?;
        let name = integration_name("name", &request.get_ref().name)?;
        who.account(name.account())?;
        Ok(Response::new(
            (&self.catalog.get_integration(&name).await?).into(),
        ))
    }

    async fn list_integrations(
        &self,
        request: Request<pb::ListIntegrationsRequest>,
    ) -> Result<Response<pb::ListIntegrationsResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        who.account(&account)?;
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
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let name = integration_name("name", &req.name)?;
        who.account(name.account())?;
        let etag = convert::etag("etag", &req.etag)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
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
        // Disabled integrations too: checking an endpoint before enabling it is the point.
        let integration = self.catalog.get_integration(&name).await?;
        let span = tracing::info_span!("test_integration", integration = %name);
        let response = async {
            let req = request::build(
                &integration,
                SAMPLE_PARTICIPATION_ID,
                Bytes::from_static(SAMPLE_PARTICIPATION.as_bytes()),
                SystemTime::now(),
                None,
            );
            let outcome = self.client.post(&req).await;
            match &outcome {
                Ok(r) => tracing::info!(
                    status = r.status,
                    latency_ms = r.latency.as_millis(),
                    "test webhook answered"
                ),
                Err(e) => tracing::info!(error.type = e.kind(), "test webhook got no answer"),
            }
            test_response(&integration, outcome)
        }
        .instrument(span)
        .await;
        Ok(Response::new(response))
    }
}

/// Bytes of the response body `TestIntegration` returns.
const BODY_PREFIX_BYTES: usize = 4 * 1024;

/// Secret values shorter than this are not searched for in answers (a one-letter secret would
/// blank out every occurrence of that letter); validation allows them, they are weak anyway.
const MIN_REDACTED_LEN: usize = 8;

/// What replaces a secret value an endpoint echoed back.
const REDACTED: &str = "<redacted>";

/// The `TestIntegration` answer for `outcome`. An HTTP error status is an answer, not an
/// error. Secret values of `integration` echoed by the endpoint (an echo service reflecting
/// the auth header, say) are replaced by [`REDACTED`] in headers and body: they are write-only.
fn test_response(
    integration: &Integration,
    outcome: Result<HttpResponse, AttemptError>,
) -> pb::TestIntegrationResponse {
    let resp = match outcome {
        Ok(resp) => resp,
        // AttemptError messages hold no header value, body or URL query/userinfo.
        Err(e) => {
            return pb::TestIntegrationResponse {
                error: e.to_string(),
                ..Default::default()
            };
        }
    };
    let secrets: Vec<&str> = integration
        .auth_header
        .iter()
        .map(|h| h.value.expose())
        .chain(integration.secrets.iter().map(|s| s.secret.expose()))
        .filter(|s| s.len() >= MIN_REDACTED_LEN)
        .collect();
    let mut headers: HashMap<String, String> = HashMap::with_capacity(resp.headers.len());
    for (name, value) in resp.headers {
        let value = redact_str(value, &secrets);
        headers
            .entry(name)
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    let body = redact_bytes(resp.body_prefix, &secrets);
    pb::TestIntegrationResponse {
        status_code: i32::from(resp.status),
        latency_ms: i64::try_from(resp.latency.as_millis()).unwrap_or(i64::MAX),
        response_headers: headers,
        response_body_prefix: body_prefix(&body),
        error: String::new(),
    }
}

/// The first [`BODY_PREFIX_BYTES`] of `body` as text (invalid UTF-8 replaced). A character
/// the cut goes through is left out rather than turned into a replacement character.
fn body_prefix(body: &[u8]) -> String {
    let mut prefix = &body[..body.len().min(BODY_PREFIX_BYTES)];
    if prefix.len() < body.len() {
        // Only a lead byte with too few continuation bytes after it, within the last 3 bytes,
        // is a character cut in two.
        for back in 1..=prefix.len().min(3) {
            let tail = &prefix[prefix.len() - back..];
            if let Err(e) = std::str::from_utf8(tail)
                && e.valid_up_to() == 0
                && e.error_len().is_none()
            {
                prefix = &prefix[..prefix.len() - back];
                break;
            }
        }
    }
    String::from_utf8_lossy(prefix).into_owned()
}

fn redact_str(value: String, secrets: &[&str]) -> String {
    if !secrets.iter().any(|s| value.contains(s)) {
        return value;
    }
    secrets
        .iter()
        .fold(value, |v, secret| v.replace(secret, REDACTED))
}

fn redact_bytes(mut body: Vec<u8>, secrets: &[&str]) -> Vec<u8> {
    for secret in secrets {
        let needle = secret.as_bytes();
        if !body.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest = body.as_slice();
        while !rest.is_empty() {
            if rest.starts_with(needle) {
                out.extend_from_slice(REDACTED.as_bytes());
                rest = &rest[needle.len()..];
            } else {
                out.push(rest[0]);
                rest = &rest[1..];
            }
        }
        body = out;
    }
    body
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use pushwire_common::domain::{
        AccountName, AuthHeader, IncompletePolicy, IntegrationName, PayloadVariables,
        SignatureScheme, SigningSecret,
    };

    use super::*;

    fn integration() -> Integration {
        let account = AccountName::from_id("acme").unwrap();
        Integration {
            name: IntegrationName::new(&account, "crm").unwrap(),
            display_name: "CRM".into(),
            url: "https://hooks.example.com/in".into(),
            enabled: false,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Skip,
            payload_variables: PayloadVariables::AsPublished,
            auth_header: Some(AuthHeader {
                name: "Authorization".into(),
                value: Secret::new("Bearer auth-s3cret"),
            }),
            secrets: vec![
                SigningSecret {
                    secret: Secret::new("signing-s3cret"),
                    expire_time: None,
                },
                SigningSecret {
                    secret: Secret::new("short"),
                    expire_time: Some(UNIX_EPOCH),
                },
            ],
            signature_schemes: vec![SignatureScheme::Qualifio],
            create_time: UNIX_EPOCH,
            update_time: UNIX_EPOCH,
            revision: 1,
        }
    }

    fn answer(headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        HttpResponse {
            status: 410,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body_prefix: body.to_vec(),
            latency: Duration::from_micros(12_345),
        }
    }

    #[test]
    fn answers_are_reported_whatever_the_status() {
        let resp = test_response(
            &integration(),
            Ok(answer(
                &[("set-cookie", "a=1"), ("x-one", "1"), ("set-cookie", "b=2")],
                b"gone",
            )),
        );
        assert_eq!(resp.status_code, 410);
        assert_eq!(resp.latency_ms, 12);
        assert_eq!(resp.response_body_prefix, "gone");
        assert_eq!(resp.error, "");
        assert_eq!(resp.response_headers.len(), 2);
        assert_eq!(resp.response_headers["set-cookie"], "a=1, b=2");
        assert_eq!(resp.response_headers["x-one"], "1");
    }

    #[test]
    fn no_answer_is_an_error_with_status_0() {
        let resp = test_response(&integration(), Err(AttemptError::Timeout));
        assert_eq!(
            resp,
            pb::TestIntegrationResponse {
                error: "timed out".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn body_is_cut_at_4_kib_without_splitting_a_character() {
        let ascii = vec![b'a'; 10 * 1024];
        assert_eq!(body_prefix(&ascii), "a".repeat(4096));
        assert_eq!(body_prefix(b"short"), "short");
        // "é" is 2 bytes, "€" 3, "😀" 4: each straddling the cut in every possible place.
        for ch in ["é", "€", "😀"] {
            for before in 4096 - ch.len() + 1..4096 {
                let body = format!("{}{ch}tail", "a".repeat(before));
                let prefix = body_prefix(body.as_bytes());
                assert_eq!(prefix, "a".repeat(before), "{ch} at {before}");
            }
            let fits = format!("{}{ch}tail", "a".repeat(4096 - ch.len()));
            assert!(body_prefix(fits.as_bytes()).ends_with(ch));
        }
        // Invalid bytes are replaced, not dropped, and an uncut body is shown as it is.
        assert_eq!(body_prefix(b"a\xffb\xc3"), "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn echoed_secrets_are_redacted() {
        let resp = test_response(
            &integration(),
            Ok(answer(
                &[
                    ("x-echo-auth", "Bearer auth-s3cret"),
                    ("x-echo-auth", "signing-s3cret"),
                ],
                b"got Bearer auth-s3cret and signing-s3cret; short stays",
            )),
        );
        assert_eq!(
            resp.response_headers["x-echo-auth"],
            "<redacted>, <redacted>"
        );
        assert_eq!(
            resp.response_body_prefix,
            "got <redacted> and <redacted>; short stays"
        );
    }
}
