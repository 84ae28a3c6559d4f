//! `pushwire.v1.ConfigService.WatchConfig`: each watcher is a task reading the shared
//! [`ConfigFeed`] and writing into a small bounded channel, so a slow watcher only slows
//! itself, and ends on client disconnect or shutdown.

use std::pin::Pin;

use futures_util::Stream;
use pb::config_change::Change as PbChange;
use pb::config_service_server::ConfigService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::domain::convert::integration_config;
use pushwire_common::pb::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::service::{Change, ConfigFeed, FeedUpdate};

/// Messages buffered per watcher before the feed waits for it.
const WATCHER_BUFFER: usize = 16;

/// Serves `ConfigService` from the [`ConfigFeed`].
#[derive(Clone, Debug)]
pub struct ConfigApi {
    feed: ConfigFeed,
    shutdown: CancellationToken,
}

impl ConfigApi {
    /// The service over `feed`; streams end with UNAVAILABLE on `shutdown`.
    pub fn new(feed: ConfigFeed, shutdown: CancellationToken) -> Self {
        Self { feed, shutdown }
    }
}

fn change_to_pb(c: &Change) -> pb::ConfigChange {
    let change = match c {
        Change::UpsertIntegration(i) => PbChange::UpsertIntegration(integration_config(i)),
        Change::DeleteIntegration(n) => PbChange::DeleteIntegration(n.to_string()),
        Change::UpsertPushScope(s) => PbChange::UpsertPushScope(s.as_ref().into()),
        Change::DeletePushScope(n) => PbChange::DeletePushScope(n.to_string()),
    };
    pb::ConfigChange {
        change: Some(change),
    }
}

/// The messages for one feed update, and the revision they bring the watcher to.
fn messages(update: FeedUpdate) -> Vec<pb::WatchConfigResponse> {
    match update {
        FeedUpdate::Snapshot {
            revision,
            integrations,
            push_scopes,
        } => vec![pb::WatchConfigResponse {
            revision,
            snapshot: Some(pb::ConfigSnapshot {
                integrations: integrations.iter().map(|i| integration_config(i)).collect(),
                push_scopes: push_scopes.iter().map(|s| s.as_ref().into()).collect(),
            }),
            changes: Vec::new(),
        }],
        FeedUpdate::Changes(revisions) => revisions
            .iter()
            .map(|r| pb::WatchConfigResponse {
                revision: r.revision,
                snapshot: None,
                changes: r.changes.iter().map(change_to_pb).collect(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    type WatchConfigStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchConfigResponse, Status>> + Send>>;

    async fn watch_config(
        &self,
        request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        // Every account's configuration, secrets included: worker tokens for all accounts.
        authorize(&request, Action::WatchConfig)?.all_accounts()?;
        let from = request.get_ref().from_revision;
        if from < 0 {
            return Err(super::invalid("from_revision", "must not be negative"));
        }
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let mut view = self.feed.subscribe();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last = from;
            loop {
                let update = tokio::select! {
                    u = view.next(last) => u,
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("control plane shutting down; reconnect"))).await;
                        return;
                    }
                };
                let Some(update) = update else { return };
                for msg in messages(update) {
                    let revision = msg.revision;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = revision;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
