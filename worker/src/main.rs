//! `worker` binary: flags → telemetry → [`pushwire_worker::run`] until SIGTERM or SIGINT.

use clap::Parser as _;
use pushwire_common::server::shutdown::serve_until_signal;
use pushwire_worker::{Config, Listeners, run};

/// jemalloc: no header on each allocation (the routing table is millions of small ones), and
/// freed pages go back to the system within seconds (its options: `.cargo/config.toml`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
