//! `pushwire.v1.IngestService` on the control plane: participations are published to workers,
//! so both calls answer UNIMPLEMENTED here until a worker runs in this process.

use std::pin::Pin;

use futures_util::Stream;
use pb::ingest_service_server::IngestService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::pb::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

/// Refuses publishing with a clear message.
#[derive(Clone, Copy, Debug, Default)]
pub struct IngestApi;

fn unimplemented() -> Status {
    Status::unimplemented(
        "publish participations to a worker (IngestService on the worker's gRPC address)",
    )
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    type PublishStream = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        authorize(&request, Action::Publish)?;
        Err(unimplemented())
    }

    async fn publish_one(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        authorize(&request, Action::Publish)?;
        Err(unimplemented())
    }
}
