//! Who may call the control plane: the tokens it accepts (see [`pushwire_common::auth`]),
//! the admin token a standalone control plane makes for itself, and the in-process gRPC
//! server its own worker (`--with-worker`) talks to.

use std::io::Write as _;
use std::path::Path;

use pushwire_common::auth::{self, Authenticator, Principal, Role};
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::server::grpc_metrics::GrpcMetrics;
use pushwire_common::server::stack::ServerStack;
use pushwire_worker::in_process::Incoming;
use tokio_util::sync::CancellationToken;

use crate::{Config, RunError};

/// File in `--data-dir` holding the SHA-256 of the generated admin token.
pub const ADMIN_TOKEN_HASH_FILE: &str = "admin-token.sha256";

/// Name of the generated admin token in logs.
const GENERATED_ADMIN: &str = "generated admin token";

/// The tokens the control plane accepts: `--token-file`, `PUSHWIRE_ADMIN_TOKEN`, the token of
/// its in-process worker, and on the embedded store the admin token of
/// [`ADMIN_TOKEN_HASH_FILE`] — created, and printed once, on the first start with no other
/// token source.
pub fn authenticator(
    config: &Config,
    in_process_worker: Option<&Secret>,
) -> Result<Authenticator, RunError> {
    let generated = match config.etcd_endpoints.is_empty() {
        true => {
            let none_given =
                config.access.token_file.is_none() && config.access.admin_token.is_none();
            standalone_admin(&config.data_dir, none_given).map_err(RunError::Serve)?
        }
        false => None,
    };
    if config.access.token_file.is_none()
        && config.access.admin_token.is_none()
        && generated.is_none()
    {
        tracing::warn!(
            "no token configured (--token-file, PUSHWIRE_ADMIN_TOKEN): every call but health \
             and reflection will be refused with UNAUTHENTICATED"
        );
    }
    config
        .access
        .authenticator(|mut b| {
            if let Some(hash) = generated {
                b = b.hash(hash, Principal::everywhere(GENERATED_ADMIN, Role::Admin));
            }
            if let Some(token) = in_process_worker {
                b = b.token(
                    token,
                    Principal::everywhere("in-process worker", Role::Worker),
                );
            }
            b
        })
        .map_err(RunError::Access)
}

/// The hash of the standalone admin token: read from `<data_dir>/admin-token.sha256`, or,
/// when the file is absent and `create` (no other token source), made: a random token whose
/// hash is written there (mode 0600) and which is printed once on stderr.
fn standalone_admin(
    data_dir: &Path,
    create: bool,
) -> Result<Option<auth::TokenHash>, Box<dyn std::error::Error + Send + Sync>> {
    let path = data_dir.join(ADMIN_TOKEN_HASH_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hash = auth::parse_hash(&text).ok_or_else(|| {
                format!(
                    "{}: expected the 64 hex digits of a SHA-256; delete the file to get a new \
                     admin token",
                    path.display()
                )
            })?;
            tracing::info!(path = %path.display(), "accepting the admin token whose hash is in this file");
            return Ok(Some(hash));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display()).into()),
    }
    if !create {
        return Ok(None);
    }
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let token = auth::generate_token();
    let hash = auth::hash_token(token.expose());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(format!("{}\n", to_hex(&hash)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Shown once, on the terminal of whoever started the first run; never logged.
    eprintln!(
        "\nPushwire: no token was configured, so here is an admin token for every account. It \
         is shown only now\n(its SHA-256 is in {}; delete that file and restart for a new one):\n\n    \
         export TOKEN={}\n\nSend it with each call: grpcurl -H \"authorization: Bearer $TOKEN\" ...\n",
        path.display(),
        token.expose()
    );
    Ok(Some(hash))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves what the in-process worker calls (WatchConfig, UpdateIntegration) on `incoming`,
/// behind the same authentication as the public server, until `shutdown`.
pub async fn serve_in_process(
    integrations: pb::integration_service_server::IntegrationServiceServer<
        crate::api::IntegrationApi,
    >,
    config: pb::config_service_server::ConfigServiceServer<crate::api::ConfigApi>,
    auth: Authenticator,
    metrics: GrpcMetrics,
    incoming: Incoming,
    shutdown: CancellationToken,
) {
    let mut server = match ServerStack::new(&auth, metrics).server() {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(error = %e, "in-process gRPC server not started");
            return;
        }
    };
    let served = server
        .add_service(integrations)
        .add_service(config)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "in-process gRPC server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standalone_admin_token_is_made_once_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(standalone_admin(&data, false).unwrap(), None);
        let made = standalone_admin(&data, true).unwrap().unwrap();
        let path = data.join(ADMIN_TOKEN_HASH_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim(), to_hex(&made));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Later starts accept the same token, whatever the other sources.
        assert_eq!(standalone_admin(&data, true).unwrap(), Some(made));
        assert_eq!(standalone_admin(&data, false).unwrap(), Some(made));
        std::fs::write(&path, "garbage").unwrap();
        assert!(standalone_admin(&data, true).is_err());
    }
}
