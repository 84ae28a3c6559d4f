//! The `worker` binary, for the fault-injection suite (`tests/tests/it/faults.rs`), which runs
//! workers as processes so as to SIGKILL and SIGTERM them: Cargo builds only the tests
//! package's own binaries for its tests (`CARGO_BIN_EXE_*`). It is `worker/src/main.rs` plus [`exit_with_parent`], so that a test run that dies leaves no
//! worker behind.

use clap::Parser as _;
use pushwire_common::server::shutdown::serve_until_signal;
use pushwire_tests::process::exit_with_parent;
use pushwire_worker::{Config, Listeners, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    exit_with_parent();
    let config = Config::parse();
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
