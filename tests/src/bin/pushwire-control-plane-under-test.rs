//! The `control-plane` binary (serving only), for the fault-injection suite
//! (`tests/tests/faults.rs`), which runs control planes as processes so as to SIGKILL them:
//! Cargo builds only the tests package's own binaries for its tests (`CARGO_BIN_EXE_*`). Its
//! body is the serving path of `control-plane/src/main.rs` (keep the two alike) plus
//! [`exit_with_parent`], so that a test run that dies leaves no control plane behind.

use clap::Parser as _;
use pushwire_common::telemetry;
use pushwire_control_plane::{Config, Listeners, run};
use pushwire_tests::process::exit_with_parent;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    exit_with_parent();
    let config = Config::parse();
    let telemetry = telemetry::Settings::from_env("pushwire-control-plane", config.log_format)
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
