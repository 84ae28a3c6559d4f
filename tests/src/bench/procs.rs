//! Child processes of the benchmark: the release `control-plane` and `worker` binaries (built
//! on demand), free loopback ports, readiness waits, `/metrics` and `/proc` readings.
//!
//! Every child is registered in one process-wide list. A [`Proc`] kills its child when
//! dropped (panics included), and [`kill_all`] is what the watchdog, Ctrl-C and the end of
//! `main` call, so the benchmark never leaves a process behind.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Every child still running, with its pid.
static CHILDREN: Mutex<Vec<(u32, Child)>> = Mutex::new(Vec::new());

/// Kills (SIGKILL) and reaps every registered child.
pub fn kill_all() {
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(PoisonError::into_inner));
    for (_, mut child) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn kill(pid: u32) {
    let child = {
        let mut children = CHILDREN.lock().unwrap_or_else(PoisonError::into_inner);
        children
            .iter()
            .position(|(p, _)| *p == pid)
            .map(|i| children.swap_remove(i).1)
    };
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether child `pid` is still running (false once it exited or was killed).
pub fn running(pid: u32) -> bool {
    let mut children = CHILDREN.lock().unwrap_or_else(PoisonError::into_inner);
    children
        .iter_mut()
        .find(|(p, _)| *p == pid)
        .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
}

/// A running child process; killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// What it is, for messages.
    pub name: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, output to `log`, in this environment (so with the
    /// binaries' own default log level unless `RUST_LOG` is set) less `OTEL_*`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // Children get no OTLP exporter from the environment the benchmark was started in.
        for (key, _) in std::env::vars() {
            if key.starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        CHILDREN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((pid, child));
        Ok(Self {
            pid,
            name: name.to_owned(),
            log,
        })
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Resident set size and its peak, in KiB, from `/proc/PID/status`.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("reading /proc/{}/status", self.pid))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc/{}/status", self.pid))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// CPU time used so far, in nanoseconds: the sum of its threads' run time from
    /// `/proc/PID/task/*/schedstat` (`/proc/PID/stat` counts in 10 ms ticks, too coarse for a
    /// cost per change). Threads that already exited are not counted.
    pub fn cpu_time(&self) -> Option<Duration> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid)).ok()?;
        Some(
            tasks
                .flatten()
                .filter_map(|task| run_time(&task.path().join("schedstat")))
                .sum(),
        )
    }
}

/// A thread's run time so far from its `schedstat` file (`/proc/PID/task/TID/schedstat`,
/// `/proc/thread-self/schedstat`): its first field, nanoseconds. `None` if it cannot be read.
pub fn run_time(schedstat: &std::path::Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(schedstat).ok()?;
    let ns = stat.split_whitespace().next()?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ns))
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill(self.pid);
    }
}

/// A loopback port nothing listens on right now (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A free loopback address.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
}

/// The release binaries the benchmark runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `control-plane`.
    pub control_plane: PathBuf,
    /// `worker`.
    pub worker: PathBuf,
}

/// Finds the release `control-plane` and `worker` binaries, building them first (quietly,
/// with the cargo that runs this benchmark) unless `no_build`.
///
/// They live in the `release` directory of the target directory this benchmark was built in,
/// or in `bin_dir` when given.
pub fn binaries(no_build: bool, bin_dir: Option<PathBuf>) -> anyhow::Result<Binaries> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let profile_dir = exe.parent().context("bench binary without a directory")?;
    let target_dir = profile_dir
        .parent()
        .context("bench binary outside a target directory")?
        .to_path_buf();
    let dir = bin_dir
        .clone()
        .unwrap_or_else(|| target_dir.join("release"));
    if !no_build && bin_dir.is_none() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("bench: building control-plane and worker (cargo build --release) ...");
        let started = Instant::now();
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "pushwire-control-plane",
                "-p",
                "pushwire-worker",
                "--bins",
            ])
            .current_dir(workspace)
            .env("CARGO_TARGET_DIR", &target_dir)
            .stdin(Stdio::null())
            .status()
            .context("running cargo build")?;
        anyhow::ensure!(status.success(), "cargo build failed ({status})");
        eprintln!("bench: binaries ready in {:.1?}", started.elapsed());
    }
    let found = Binaries {
        control_plane: dir.join("control-plane"),
        worker: dir.join("worker"),
    };
    for bin in [&found.control_plane, &found.worker] {
        anyhow::ensure!(
            bin.is_file(),
            "{} not found; build it with `cargo build --release -p pushwire-control-plane -p pushwire-worker --bins`",
            bin.display()
        );
    }
    Ok(found)
}

/// A keep-alive HTTP/1.1 connection for GET requests to an operations endpoint.
#[derive(Debug)]
pub struct HttpConn {
    addr: SocketAddr,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpConn {
    /// A connection to `addr`, opened on first use (and again after an error).
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// GETs `path`: its status and body.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        let result = self.try_get(path).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_get(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        if self.sender.is_none() {
            self.sender = Some(Self::connect(self.addr).await?);
        }
        let sender = self.sender.as_mut().expect("set above");
        sender.ready().await?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Polls `GET /readyz` on `http` until it answers 200, at most `limit`; fails early if `proc`
/// exits.
pub async fn wait_ready(proc: &Proc, http: SocketAddr, limit: Duration) -> anyhow::Result<String> {
    let mut conn = HttpConn::new(http);
    let deadline = Instant::now() + limit;
    loop {
        if let Ok((200, body)) = conn.get("/readyz").await {
            return Ok(body);
        }
        if !running(proc.pid) {
            anyhow::bail!("{} exited:\n{}", proc.name, proc.log_tail());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} not ready on http://{http}/readyz after {limit:?}:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The revision in a worker's `/readyz` answer (`ready: configuration revision N`).
pub fn ready_revision(body: &str) -> Option<i64> {
    body.lines()
        .next()?
        .trim()
        .strip_prefix("ready: configuration revision ")?
        .parse()
        .ok()
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The value of a series with one label, `name{label="value"}`, in a Prometheus text
/// exposition.
pub fn labelled_metric(exposition: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    metric(exposition, &format!("{name}{{{label}=\"{value}\"}}"))
}
