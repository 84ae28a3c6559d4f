//! `control-plane` binary: flags → telemetry → [`pushwire_control_plane::run`] until SIGTERM or
//! SIGINT (or, with `--reencrypt`, [`pushwire_control_plane::reencrypt`] once).

use clap::Parser as _;
use pushwire_common::telemetry;
use pushwire_control_plane::{Config, Listeners, run};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = telemetry::Settings::from_env("pushwire-control-plane", config.log_format)
        .and_then(telemetry::init)
        .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    if config.reencrypt {
        let result = pushwire_control_plane::reencrypt(&config).await;
        telemetry.shutdown().await;
        let done = result?;
        println!(
            "re-encrypted {} of {} records holding secrets; all are now under key \"{}\"",
            done.rewritten, done.records, done.key_id
        );
        return Ok(());
    }
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
