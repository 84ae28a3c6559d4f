//! The `worker` binary, for the fault-injection suite (`tests/tests/faults.rs`), which runs
//! workers as processes so as to SIGKILL and SIGTERM them: Cargo builds only the tests
//! package's own binaries for its tests (`CARGO_BIN_EXE_*`). Its body is `worker/src/main.rs`
//! (keep the two alike) plus [`exit_with_parent`], so that a test run that dies leaves no
//! worker behind.

use clap::Parser as _;
use pushwire_common::telemetry;
use pushwire_tests::process::exit_with_parent;
use pushwire_worker::{Config, Listeners, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    exit_with_parent();
    let config = Config::parse();
    let telemetry = telemetry::Settings::from_env("pushwire-worker", config.log_format)
        .and_then(telemetry::init)
        .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        pushwire_common::shutdown::signal().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });
    let result = run(config, listeners, shutdown).await;
    telemetry.shutdown().await;
    Ok(result?)
}
