//! End-to-end tests of the control plane's gRPC API through real tonic clients, each run
//! against both stores: the embedded one and a real etcd.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::control_plane::ControlPlane;

const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The next snapshot or changes of `stream`, skipping progress messages (neither snapshot nor
/// changes, sent every few seconds while the control plane is current); fails (does not hang)
/// when none comes within READ_TIMEOUT.
async fn next_msg(
    stream: &mut tonic::Streaming<pb::WatchConfigResponse>,
) -> anyhow::Result<pb::WatchConfigResponse> {
    loop {
        let msg = tokio::time::timeout(READ_TIMEOUT, stream.next())
            .await?
            .context("stream ended")??;
        if msg.snapshot.is_some() || !msg.changes.is_empty() {
            return Ok(msg);
        }
    }
}

async fn create(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    i: pb::Integration,
) -> anyhow::Result<pb::Integration> {
    Ok(cp.admin().await?.create_integration(account, id, i).await?)
}

fn scope(
    integration: &str,
    level: pb::PushScopeLevel,
    target: &str,
    action: pb::PushAction,
) -> pb::PushScope {
    pb::PushScope {
        integration: integration.into(),
        level: level.into(),
        target_id: target.into(),
        action: action.into(),
        ..Default::default()
    }
}

async fn create_scope(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    s: pb::PushScope,
) -> anyhow::Result<pb::PushScope> {
    Ok(cp.admin().await?.create_scope(account, id, s).await?)
}

/// Runs `body` against a fresh control plane on each backend.
macro_rules! on_both_backends {
    ($body:ident) => {{
        let backends = Backends::start()?;
        for backend in backends.all() {
            let cp = ControlPlane::on(&backend).await?;
            $body(&cp)
                .await
                .with_context(|| format!("on {backend:?}"))?;
            cp.stop().await?;
        }
        Ok(())
    }};
}

mod import;
mod resources;
mod stores;
mod validation;
mod watch;
