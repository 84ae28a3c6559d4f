//! `worker` binary: flags → telemetry → [`pushwire_worker::run`] until SIGTERM or SIGINT.

use clap::Parser as _;
use pushwire_common::server::shutdown::serve_until_signal;
use pushwire_worker::{Config, Listeners, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.ingest.check()?;
    serve_until_signal(
        "pushwire-worker",
        config.log_format,
        |shutdown| async move {
            let listeners = Listeners::bind(config.grpc_addr, config.http_addr).await?;
            Ok(run(config, listeners, shutdown).await?)
        },
    )
    .await
}
