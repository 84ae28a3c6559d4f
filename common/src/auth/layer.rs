//! The server side: a tower layer that authenticates every call before any handler runs,
//! the principal a handler reads back ([`caller`], [`authorize`]), and the one mapping of a
//! policy refusal ([`Denied`]) to a gRPC `Status`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{Service, http};
use tonic::{Request, Status};

use super::authenticator::Authenticator;
use super::bearer::AUTHORIZATION;
use super::policy::{Action, Denied, Principal};

/// Calls open without a token: health checks and server reflection (the API's schema only).
const OPEN_PREFIXES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// A refusal of the policy is `PERMISSION_DENIED`, with its text.
impl From<Denied> for Status {
    fn from(denied: Denied) -> Self {
        Status::permission_denied(denied.to_string())
    }
}

/// The caller of `request`, as the [`AuthLayer`] found it; `UNAUTHENTICATED` when there is
/// none (a server without the layer).
pub fn caller<T>(request: &Request<T>) -> Result<Arc<Principal>, Status> {
    request
        .extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no credentials"))
}

/// The caller of `request` if its role allows `action`; `PERMISSION_DENIED` otherwise. The
/// account, once the request is read, goes to [`Principal::account`].
pub fn authorize<T>(request: &Request<T>, action: Action) -> Result<Arc<Principal>, Status> {
    let who = caller(request)?;
    who.allow(action)?;
    Ok(who)
}

impl Authenticator {
    /// The layer that authenticates every call to a server.
    pub fn layer(&self) -> AuthLayer {
        AuthLayer { auth: self.clone() }
    }
}

/// Tower layer: authenticates every call except health and reflection (see the module).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// A service whose calls carry a known token.
#[derive(Clone, Debug)]
pub struct Authenticated<S> {
    inner: S,
    auth: Authenticator,
}

/// Why a call is not authenticated (the message of `UNAUTHENTICATED`).
fn authenticate<B>(auth: &Authenticator, req: &http::Request<B>) -> Result<Arc<Principal>, Status> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "missing credentials: send the metadata \"authorization: Bearer <token>\"",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated("malformed credentials: expected \"Bearer <token>\"")
        })?;
    auth.authenticate(token)
        .ok_or_else(|| Status::unauthenticated("unknown token"))
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            req.headers_mut().remove(AUTHORIZATION);
            return Box::pin(self.inner.call(req));
        }
        match authenticate(&self.auth, &req) {
            Ok(principal) => {
                // The token goes no further than this layer.
                req.headers_mut().remove(AUTHORIZATION);
                req.extensions_mut().insert(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                tracing::debug!(path, reason = status.message(), "call not authenticated");
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::policy::{Accounts, Role};
    use crate::domain::{AccountName, Secret};

    /// The inner service: answers 200 with the name of the principal it was handed.
    #[derive(Clone)]
    struct Echo;

    impl Service<http::Request<()>> for Echo {
        type Response = http::Response<String>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            assert!(
                req.headers().get(AUTHORIZATION).is_none(),
                "token passed on"
            );
            let who = req
                .extensions()
                .get::<Arc<Principal>>()
                .map(|p| p.name.clone())
                .unwrap_or_default();
            std::future::ready(Ok(http::Response::new(who)))
        }
    }

    fn call(service: &mut Authenticated<Echo>, path: &str, auth: Option<&str>) -> (String, String) {
        let mut req = http::Request::builder().uri(path);
        if let Some(v) = auth {
            req = req.header(AUTHORIZATION, v);
        }
        let response = futures_now(service.call(req.body(()).unwrap())).unwrap();
        let code = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (code, response.into_body())
    }

    /// Polls a future that is ready at once (the layer and `Echo` never wait).
    fn futures_now<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the layer waited"),
        }
    }

    #[test]
    fn the_layer_lets_known_tokens_and_open_calls_through_only() {
        use tower_layer::Layer as _;
        let auth = Authenticator::builder()
            .token(
                &Secret::new("pwt_known"),
                Principal::everywhere("ops", Role::Admin),
            )
            .build()
            .unwrap();
        let mut service = auth.layer().layer(Echo);
        let unauthenticated = (tonic::Code::Unauthenticated as i32).to_string();
        let method = "/pushwire.v1.IntegrationService/ListIntegrations";
        assert_eq!(
            call(&mut service, method, Some("Bearer pwt_known")),
            (String::new(), "ops".to_owned())
        );
        for bad in [
            None,
            Some("pwt_known"),
            Some("Bearer "),
            Some("Bearer pwt_other"),
        ] {
            assert_eq!(
                call(&mut service, method, bad).0,
                unauthenticated,
                "{bad:?}"
            );
        }
        assert_eq!(
            call(
                &mut service,
                "/grpc.health.v1.Health/Check",
                Some("Bearer x")
            ),
            (String::new(), String::new())
        );
    }

    #[test]
    fn refusals_become_permission_denied_with_their_text() {
        let p = Principal {
            name: "acme".into(),
            role: Role::Viewer,
            accounts: Accounts::Only(vec![AccountName::parse("accounts/1").unwrap()]),
        };
        let denied: Status = p
            .account(&AccountName::parse("accounts/2").unwrap())
            .unwrap_err()
            .into();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "this token may not use accounts/2");
        let mut request = Request::new(());
        assert_eq!(
            authorize(&request, Action::Read).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        request.extensions_mut().insert(Arc::new(p));
        assert!(authorize(&request, Action::Read).is_ok());
        assert_eq!(
            authorize(&request, Action::Manage).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
