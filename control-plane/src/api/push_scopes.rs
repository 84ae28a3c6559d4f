//! `pushwire.v1.PushScopeService`.

use pb::push_scope_service_server::PushScopeService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::domain::convert;
use pushwire_common::domain::matching::Placement;
use pushwire_common::pb::v1 as pb;
use tonic::{Request, Response, Status};

use super::{account, answer, integration_name, invalid, mask_paths, push_scope_name};
use crate::service::{Catalog, PageRequest, PushScopePatch};

/// Serves `PushScopeService` from the [`Catalog`].
#[derive(Clone, Debug)]
pub struct PushScopeApi {
    catalog: Catalog,
}

impl PushScopeApi {
    /// The service over `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        Self { catalog }
    }
}

const UPDATABLE: &[&str] = &["integration", "level", "target_id", "audience", "action"];

fn bad(e: convert::InvalidField) -> Status {
    super::bad_request(&e)
}

/// What `CreatePushScope` makes of `s` before the service sees it (see
/// [`super::integration_create_patch`]).
pub fn create_patch(s: pb::PushScope) -> Result<PushScopePatch, Status> {
    patch(s, None)
}

/// Reads the fields of `s` named by `paths` (every populated field when `None`) into a patch.
fn patch(s: pb::PushScope, paths: Option<&[String]>) -> Result<PushScopePatch, Status> {
    let wanted = |field: &str, populated: bool| match paths {
        Some(paths) => paths.iter().any(|p| p == field),
        None => populated,
    };
    let mut patch = PushScopePatch::default();
    if wanted("integration", !s.integration.is_empty()) {
        patch.integration = Some(s.integration);
    }
    if wanted("level", s.level != 0) {
        patch.level = Some(
            convert::level("push_scope.level", s.level)
                .map_err(bad)?
                .ok_or_else(|| invalid("push_scope.level", "required"))?,
        );
    }
    if wanted("target_id", !s.target_id.is_empty()) {
        patch.target_id = Some(s.target_id);
    }
    if wanted("audience", s.audience != 0) {
        patch.audience = Some(
            convert::audience("push_scope.audience", s.audience)
                .map_err(bad)?
                .unwrap_or_default(),
        );
    }
    if wanted("action", s.action != 0) {
        patch.action = Some(
            convert::action("push_scope.action", s.action)
                .map_err(bad)?
                .unwrap_or_default(),
        );
    }
    Ok(patch)
}

/// An optional id of the resolve request, in canonical form: empty means unknown.
fn optional_id(field: &str, id: &str) -> Result<Option<String>, Status> {
    if id.is_empty() {
        return Ok(None);
    }
    convert::validate_target_id(field, id).map_err(bad)?;
    Ok(Some(convert::canonical_target_id(id)))
}

#[tonic::async_trait]
impl PushScopeService for PushScopeApi {
    async fn create_push_scope(
        &self,
        request: Request<pb::CreatePushScopeRequest>,
    ) -> Result<Response<pb::PushScope>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        who.account(&account)?;
        let scope = req
            .push_scope
            .ok_or_else(|| invalid("push_scope", "required"))?;
        let id = (!req.push_scope_id.is_empty()).then_some(req.push_scope_id.as_str());
        let created = self
            .catalog
            .create_push_scope(&account, id, patch(scope, None)?)
            .await?;
        Ok(Response::new((&created).into()))
    }

    async fn get_push_scope(
        &self,
        request: Request<pb::GetPushScopeRequest>,
    ) -> Result<Response<pb::PushScope>, Status> {
        let who = authorize(&request, Action::Read)?;
        let name = push_scope_name("name", &request.get_ref().name)?;
        who.account(name.account())?;
        let read = self.catalog.get_push_scope(&name).await?;
        Ok(answer(read, |s| (&s).into()))
    }

    async fn list_push_scopes(
        &self,
        request: Request<pb::ListPushScopesRequest>,
    ) -> Result<Response<pb::ListPushScopesResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let account = account("parent", &req.parent)?;
        who.account(&account)?;
        let integration = match req.integration.as_str() {
            "" => None,
            raw => {
                let name = integration_name("integration", raw)?;
                if name.account() != &account {
                    return Err(invalid(
                        "integration",
                        format!("must be an integration of {account}"),
                    ));
                }
                Some(name)
            }
        };
        let read = self
            .catalog
            .list_push_scopes(
                &account,
                integration.as_ref(),
                &PageRequest {
                    size: req.page_size,
                    token: req.page_token,
                },
            )
            .await?;
        Ok(answer(read, |page| pb::ListPushScopesResponse {
            push_scopes: page.items.iter().map(Into::into).collect(),
            next_page_token: page.next_token,
        }))
    }

    async fn update_push_scope(
        &self,
        request: Request<pb::UpdatePushScopeRequest>,
    ) -> Result<Response<pb::PushScope>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let scope = req
            .push_scope
            .ok_or_else(|| invalid("push_scope", "required"))?;
        let name = push_scope_name("push_scope.name", &scope.name)?;
        who.account(name.account())?;
        let etag = convert::etag("push_scope.etag", &scope.etag).map_err(bad)?;
        let paths = mask_paths(req.update_mask, UPDATABLE)?;
        let updated = self
            .catalog
            .update_push_scope(&name, etag, patch(scope, paths.as_deref())?)
            .await?;
        Ok(Response::new((&updated).into()))
    }

    async fn delete_push_scope(
        &self,
        request: Request<pb::DeletePushScopeRequest>,
    ) -> Result<Response<()>, Status> {
        let who = authorize(&request, Action::Manage)?;
        let req = request.into_inner();
        let name = push_scope_name("name", &req.name)?;
        who.account(name.account())?;
        let etag = convert::etag("etag", &req.etag).map_err(bad)?;
        self.catalog.delete_push_scope(&name, etag).await?;
        Ok(Response::new(()))
    }

    async fn resolve_pushes(
        &self,
        request: Request<pb::ResolvePushesRequest>,
    ) -> Result<Response<pb::ResolvePushesResponse>, Status> {
        let who = authorize(&request, Action::Read)?;
        let req = request.into_inner();
        let account = account("account", &req.account)?;
        who.account(&account)?;
        let campaign_id = optional_id("campaign_id", &req.campaign_id)?
            .ok_or_else(|| invalid("campaign_id", "required"))?;
        let identified = req.identified.ok_or_else(|| {
            invalid("identified", "required: true for a participant who gave their identity, false for an anonymous one")
        })?;
        let website_id = optional_id("website_id", &req.website_id)?;
        let master_form_id = optional_id("master_form_id", &req.master_form_id)?;
        let placement = Placement {
            website_id: website_id.as_deref(),
            master_form_id: master_form_id.as_deref(),
            campaign_id: &campaign_id,
            identified,
        };
        let read = self.catalog.resolve_pushes(&account, &placement).await?;
        Ok(answer(read, |pushes| pb::ResolvePushesResponse {
            pushes: pushes
                .into_iter()
                .map(|p| pb::ResolvedPush {
                    integration: p.integration.to_string(),
                    decided_by: p.decided_by.to_string(),
                })
                .collect(),
        }))
    }
}
