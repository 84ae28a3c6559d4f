//! `control-plane` binary: flags → telemetry → [`pushwire_control_plane::run`] until SIGTERM or
//! SIGINT (or, with `--reencrypt`, [`pushwire_control_plane::reencrypt`] once).

use clap::Parser as _;
use pushwire_common::server::shutdown::serve_until_signal;
use pushwire_control_plane::{Config, Listeners, run};

/// The worker's allocator, for the same reasons: the feed holds every record decoded, each
/// snapshot sent is built anew, and `--with-worker` runs a worker here (options:
/// `.cargo/config.toml`; docs/performance.md, "Configuration at scale").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if config.with_worker {
        config.ingest.check()?;
    }
    serve_until_signal(
        "pushwire-control-plane",
        config.log_format,
        |shutdown| async move {
            if config.reencrypt {
                let done = pushwire_control_plane::reencrypt(&config).await?;
                println!(
                    "re-encrypted {} of {} records holding secrets; all are now under key \"{}\"",
                    done.rewritten, done.records, done.key_id
                );
                return Ok(());
            }
            let listeners = Listeners::bind(config.grpc_addr, config.http_addr).await?;
            Ok(run(config, listeners, shutdown).await?)
        },
    )
    .await
}
