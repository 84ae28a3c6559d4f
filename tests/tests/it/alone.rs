//! A test body that needs the process to itself: `telemetry::init` installs the process-wide
//! tracing subscriber (once per process; the second call fails) and an exporter bound to the
//! calling test's runtime, which would also collect the spans of every other test running
//! beside it. Such a test runs this binary again with only itself selected, and the child
//! runs the body.

use std::process::Command;

/// Set in the child: the full name of the one test it runs.
const ALONE: &str = "PUSHWIRE_TEST_ALONE";

/// Runs `body` in a child process of this test binary that runs only the test `name`
/// (`module::function`, as `cargo test` lists it), and fails when the child fails; in that
/// child, runs `body` on a multi-threaded runtime.
pub fn in_own_process(name: &str, body: impl std::future::Future<Output = anyhow::Result<()>>) {
    if std::env::var(ALONE).is_ok_and(|n| n == name) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime");
        if let Err(e) = runtime.block_on(body) {
            panic!("{name}: {e:?}");
        }
        return;
    }
    let exe = std::env::current_exe().expect("the path of this test binary");
    let out = Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, name)
        .output()
        .expect("running this test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed in its own process ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The child ran exactly this test: a filter that matched nothing would pass as well.
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in its own process:\n{stdout}"
    );
}
