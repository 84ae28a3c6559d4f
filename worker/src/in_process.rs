//! An in-memory gRPC connection, for the worker that `control-plane --with-worker` embeds: its
//! channel to the control plane is a pair of in-memory pipes served by a gRPC server of the
//! same process, so it needs no socket, no TLS and no client certificate, and never leaves the
//! process. Calls on it still carry a token and pass the same authentication and role checks.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::Service;
use tonic::codegen::http::Uri;
use tonic::transport::Channel;

/// Bytes buffered in each direction of a connection.
const PIPE_BYTES: usize = 256 * 1024;

/// The server side: one item per connection the channel opens; give it to
/// `serve_with_incoming`.
pub type Incoming = ReceiverStream<Result<DuplexStream, io::Error>>;

/// A channel whose connections arrive on the returned [`Incoming`]. It connects lazily, and
/// again after a connection ends, like a TCP channel.
pub fn channel() -> (Channel, Incoming) {
    let (tx, rx) = mpsc::channel(4);
    let channel = tonic::transport::Endpoint::from_static("http://in-process.invalid")
        .connect_with_connector_lazy(Connector(tx));
    (channel, ReceiverStream::new(rx))
}

#[derive(Clone, Debug)]
struct Connector(mpsc::Sender<Result<DuplexStream, io::Error>>);

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TokioIo<DuplexStream>>> + Send>>;

impl Service<Uri> for Connector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let tx = self.0.clone();
        Box::pin(async move {
            let (client, server) = tokio::io::duplex(PIPE_BYTES);
            tx.send(Ok(server)).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "in-process server stopped",
                )
            })?;
            Ok(TokioIo::new(client))
        })
    }
}
