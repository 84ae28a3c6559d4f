//! A real etcd for tests. [`EtcdServer`] runs a single-member etcd process on free loopback ports
//! with a throw-away data directory and removes both when dropped; fault tests take it down and
//! bring it back on the same ports and data with [`EtcdServer::stop`], [`EtcdServer::resume`]
//! and [`EtcdServer::restart`], or freeze it ([`EtcdServer::freeze`]). [`EtcdCluster`] runs
//! three such members as one cluster, for the high-availability tests.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// Environment variable naming the etcd binary to use instead of `etcd` on `PATH`.
pub const ETCD_BIN_ENV: &str = "PUSHWIRE_ETCD_BIN";

/// How long etcd may take to answer its health check after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between health checks while etcd starts.
const READY_POLL: Duration = Duration::from_millis(50);
/// Fresh port pairs tried when another process grabs a port between probing and etcd binding it.
const PORT_ATTEMPTS: usize = 3;
/// Bytes of etcd's log quoted in a start-up error.
const LOG_TAIL_BYTES: u64 = 4096;
const MEMBER_NAME: &str = "pushwire-test";
/// Raft timers of a single member: it elects itself, so short timers make that take
/// milliseconds.
const SINGLE_TIMERS: [&str; 4] = ["--heartbeat-interval", "20", "--election-timeout", "200"];
/// Raft timers of a cluster member: short enough for quick elections, long enough that a
/// loaded test machine does not cause spurious ones.
const CLUSTER_TIMERS: [&str; 4] = ["--heartbeat-interval", "50", "--election-timeout", "750"];

/// A running single-member etcd, killed and deleted on drop.
///
/// Start-up and the lifecycle methods block (for up to 20 s while etcd comes up); from async code
/// that is acceptable in a test, or wrap the call in `tokio::task::spawn_blocking`.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    /// Holds the data directory (`data/`) and etcd's log (`etcd.log`); deleted on drop.
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `--name` and `--initial-cluster` of this member.
    name: String,
    initial_cluster: String,
    timers: [&'static str; 4],
    child: Option<Child>,
    frozen: bool,
}

impl EtcdServer {
    /// Starts etcd (`$PUSHWIRE_ETCD_BIN`, else `etcd` on `PATH`) with automatic compaction off
    /// and waits until it serves requests.
    pub fn start() -> anyhow::Result<Self> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("pushwire-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let (client_port, peer_port) = free_ports()?;
        let mut server = Self::member(binary, dir, client_port, peer_port, MEMBER_NAME, None);
        let mut attempt = 1;
        loop {
            match server.resume() {
                Ok(()) => return Ok(server),
                // Another process took a port between probing and etcd binding it: new ports.
                Err(_)
                    if attempt < PORT_ATTEMPTS
                        && server.log_tail().contains("address already in use") =>
                {
                    attempt += 1;
                    let data = server.data_dir();
                    if data.exists() {
                        std::fs::remove_dir_all(&data)
                            .with_context(|| format!("removing {}", data.display()))?;
                    }
                    (server.client_port, server.peer_port) = free_ports()?;
                    server.initial_cluster =
                        format!("{MEMBER_NAME}=http://127.0.0.1:{}", server.peer_port);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A member named `name` on these ports, not started; `cluster` is the `--initial-cluster`
    /// of a cluster it belongs to (else it is a cluster of one, with short raft timers).
    fn member(
        binary: PathBuf,
        dir: tempfile::TempDir,
        client_port: u16,
        peer_port: u16,
        name: &str,
        cluster: Option<&str>,
    ) -> Self {
        Self {
            binary,
            dir,
            client_port,
            peer_port,
            name: name.to_owned(),
            initial_cluster: cluster.map_or_else(
                || format!("{name}=http://127.0.0.1:{peer_port}"),
                str::to_owned,
            ),
            timers: if cluster.is_some() {
                CLUSTER_TIMERS
            } else {
                SINGLE_TIMERS
            },
            child: None,
            frozen: false,
        }
    }

    /// Stops the process with SIGSTOP, as a hung node: connections stay open, nothing answers.
    /// Returns once every thread of it is stopped (a signal is delivered to each thread
    /// asynchronously, after `kill` returns).
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        self.signal("STOP")?;
        self.frozen = true;
        let pid = self.child.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_stopped(pid) {
            if Instant::now() > deadline {
                bail!("etcd {pid} still running 5 s after SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        self.signal("CONT")?;
        self.frozen = false;
        Ok(())
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("etcd is not running"))?
            .id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed: {status}");
        }
        Ok(())
    }

    /// The client URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Whether the etcd process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills etcd (SIGKILL, as a crash would) and waits for it to exit; the data stays.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.frozen {
            // A stopped process dies of SIGKILL all the same; continue it for tidiness.
            let _ = self.thaw();
        }
        if let Some(mut child) = self.child.take() {
            // Killing an already exited process fails harmlessly; `wait` reaps it either way.
            let _ = child.kill();
            child.wait().context("waiting for etcd to exit")?;
        }
        Ok(())
    }

    /// Starts etcd again on the same ports and data after [`EtcdServer::stop`], and waits until it
    /// serves requests. Does nothing if it is running.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let child = self.spawn()?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// [`EtcdServer::stop`] then [`EtcdServer::resume`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.resume()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening etcd log")?;
        writeln!(
            log,
            "--- pushwire test harness: starting etcd {} ---",
            self.name
        )
        .context("writing etcd log")?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", MEMBER_NAME])
            // The tests compact explicitly and count revisions exactly.
            .args(["--auto-compaction-retention", "0"])
            .args(self.timers)
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().context("opening etcd log")?))
            .stderr(Stdio::from(log));
        // etcd refuses to start on architectures it does not officially support unless told.
        let arch = match std::env::consts::ARCH {
            "x86_64" => None,
            "aarch64" => Some("arm64"),
            other => Some(other),
        };
        if let Some(arch) = arch {
            command.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        command
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("etcd is not running"))?;
            if let Some(status) = child.try_wait().context("checking etcd")? {
                self.child = None;
                bail!(
                    "etcd exited during start-up ({status}); log tail:\n{}",
                    self.log_tail()
                );
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.stop()?;
                bail!("etcd did not become healthy within {READY_TIMEOUT:?}; log tail:\n{tail}");
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn log_tail(&self) -> String {
        read_tail(&self.log_path()).unwrap_or_else(|err| format!("(no etcd log: {err})"))
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/PID/task/*/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // The temp dir is removed after this, once the process no longer writes to it.
        let _ = self.stop();
    }
}

/// A three-member etcd cluster on loopback, each member killed and deleted on drop. Members are
/// indexed 0..3; kill, restart, freeze and thaw them through [`EtcdCluster::member`].
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Members of the cluster.
    pub const SIZE: usize = 3;

    /// Starts three members and waits until each serves requests (the cluster has a leader).
    pub fn start() -> anyhow::Result<Self> {
        let binary = find_binary()?;
        // Every port is held until all are known, so none is handed out twice.
        let listeners = (0..2 * Self::SIZE)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ports = listeners
            .iter()
            .map(|l| Ok(l.local_addr()?.port()))
            .collect::<anyhow::Result<Vec<u16>>>()?;
        drop(listeners);
        let names: Vec<String> = (0..Self::SIZE).map(|i| format!("member-{i}")).collect();
        let cluster = (0..Self::SIZE)
            .map(|i| format!("{}=http://127.0.0.1:{}", names[i], ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(Self::SIZE);
        for (i, name) in names.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("pushwire-etcd-")
                .tempdir()
                .context("creating etcd temp dir")?;
            let mut member = EtcdServer::member(
                binary.clone(),
                dir,
                ports[2 * i],
                ports[2 * i + 1],
                name,
                Some(&cluster),
            );
            member.child = Some(member.spawn()?);
            members.push(member);
        }
        // A member is healthy once the cluster has a leader, which takes a quorum: wait after
        // starting them all.
        for member in &mut members {
            member.wait_ready()?;
        }
        Ok(Self { members })
    }

    /// Every member's client URL, comma-separated (`--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(EtcdServer::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// The index of the member that leads the cluster, as the running members report it;
    /// `None` while there is none.
    pub fn leader(&mut self) -> Option<usize> {
        let ids: Vec<Option<(String, String)>> = self
            .members
            .iter_mut()
            .map(|m| {
                if m.frozen || !m.is_running() {
                    return None;
                }
                member_status(m.client_port).ok()
            })
            .collect();
        let leader = ids
            .iter()
            .flatten()
            .map(|(_, leader)| leader)
            .next()?
            .clone();
        ids.iter()
            .position(|s| s.as_ref().is_some_and(|(id, _)| *id == leader))
    }
}

/// `(member id, leader id)` from a member's status (etcd's JSON gateway).
fn member_status(port: u16) -> anyhow::Result<(String, String)> {
    let body = "{}";
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = http_exchange(port, request.as_bytes())?;
    let json = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow!("etcd status: no body in {response:?}"))?;
    let value: serde_json::Value = serde_json::from_str(json).context("etcd status JSON")?;
    let id = value["header"]["member_id"].as_str().unwrap_or_default();
    let leader = value["leader"].as_str().unwrap_or_default();
    if id.is_empty() || leader.is_empty() || leader == "0" {
        bail!("etcd status without member or leader: {json}");
    }
    Ok((id.to_owned(), leader.to_owned()))
}

fn http_exchange(port: u16, request: &[u8]) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(request)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(ETCD_BIN_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{ETCD_BIN_ENV}={} is not a file", path.display());
        }
        return Ok(path);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "the etcd binary was not found on PATH and {ETCD_BIN_ENV} is not set; \
                 the store tests need a real etcd: install Debian's `etcd-server` package \
                 (apt-get install etcd-server) or point {ETCD_BIN_ENV} at an etcd 3.4+ binary"
            )
        })
}

/// Two distinct free loopback ports. Both listeners are held until both ports are known so the
/// kernel cannot hand out the same port twice.
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port");
    let (client, peer) = (bind()?, bind()?);
    Ok((client.local_addr()?.port(), peer.local_addr()?.port()))
}

/// etcd's `/health` answers `"health":"true"` once it has a leader and serves requests.
fn healthy(port: u16) -> bool {
    http_exchange(port, b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok_and(|response| response.contains(r#""health":"true""#))
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail).into_owned())
}
