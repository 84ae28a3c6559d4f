//! A real PostgreSQL for tests and benchmarks. [`PostgresServer`] creates a throw-away cluster
//! (`initdb`) in a temp dir and runs `postgres` on a free loopback port, with password
//! authentication over TCP, and stops it and deletes the cluster when dropped. PostgreSQL refuses
//! to run as root: as root, the cluster belongs to the `postgres` system user and the server runs
//! as that user.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// Environment variable naming the directory of PostgreSQL's server binaries (`initdb`,
/// `postgres`, `pg_ctl`, `pg_isready`, `createdb`) instead of Debian's
/// `/usr/lib/postgresql/<newest>/bin`.
pub const POSTGRES_BIN_DIR_ENV: &str = "PUSHWIRE_POSTGRES_BIN_DIR";

/// The superuser the cluster is created with.
pub const USER: &str = "pushwire";

/// Where Debian installs each major version's server binaries.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// The system user the server runs as when the tests run as root.
const SYSTEM_USER: &str = "postgres";
/// How long the server may take to accept connections after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between readiness checks.
const READY_POLL: Duration = Duration::from_millis(50);
/// Fresh ports tried when another process grabs one between probing and the server binding it.
const PORT_ATTEMPTS: usize = 3;
/// Bytes of the server log quoted in a start-up error.
const LOG_TAIL_BYTES: u64 = 4096;

/// How the cluster trades durability for speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` and full page writes off: for tests. Survives killing and restarting the server
    /// (commits are written to the operating system before they are acknowledged), not a crash
    /// of the machine, which the cluster would not outlive anyway.
    Fast,
    /// PostgreSQL's defaults: every commit is flushed, as in production. For benchmarks.
    Durable,
}

/// A running throw-away PostgreSQL cluster, stopped and deleted on drop.
///
/// Start-up blocks (initdb plus the server start, a few seconds); from async code that is
/// acceptable in a test, or wrap it in `tokio::task::spawn_blocking`.
#[derive(Debug)]
pub struct PostgresServer {
    bin_dir: PathBuf,
    /// The cluster (`data/`), the server log, the password file and the socket; deleted on
    /// drop.
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    durability: Durability,
    /// `(uid, gid)` of the system user the server runs as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PostgresServer {
    /// A fast (non-durable) cluster for tests.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Durability::Fast)
    }

    /// A cluster with the given durability.
    pub fn start_with(durability: Durability) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("pushwire-pg-")
            .tempdir()
            .context("creating PostgreSQL temp dir")?;
        let run_as = if is_root() {
            let ids = system_user_ids(SYSTEM_USER)?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .context("giving the PostgreSQL temp dir to the postgres user")?;
            Some(ids)
        } else {
            None
        };
        let password = random_password();
        let mut server = Self {
            bin_dir,
            dir,
            port: free_port()?,
            password,
            durability,
            run_as,
            child: None,
        };
        server.init_cluster()?;
        let mut attempt = 1;
        loop {
            match server.resume() {
                Ok(()) => return Ok(server),
                Err(_)
                    if attempt < PORT_ATTEMPTS && server.log_tail().contains("could not bind") =>
                {
                    attempt += 1;
                    server.port = free_port()?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The URL of database `postgres` as the superuser, password included.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of `database` as the superuser, password included.
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The superuser's password (random per cluster).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin_dir.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                name,
            ])
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null())
            .output()
            .context("running createdb")?;
        if !output.status.success() {
            bail!(
                "createdb {name} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(self.url_for(name))
    }

    /// Runs `sql` in `database` with psql (stops at the first error).
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin_dir.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                database,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !output.status.success() {
            bail!(
                "psql failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the server (immediate shutdown: no checkpoint, as a crash would leave it) and
    /// waits for it to exit; the cluster stays.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let stopped = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !stopped {
            // Killing an already exited process fails harmlessly; `wait` reaps it either way.
            let _ = child.kill();
        }
        child.wait().context("waiting for postgres to exit")?;
        Ok(())
    }

    /// Starts the server again on the same port and cluster after [`PostgresServer::stop`] and
    /// waits until it accepts connections. Does nothing if it is running.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let child = self.spawn()?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// [`PostgresServer::stop`] then [`PostgresServer::resume`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.resume()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for one of PostgreSQL's binaries, run as the cluster's owner.
    fn command(&self, binary: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(binary));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn init_cluster(&self) -> anyhow::Result<()> {
        let pwfile = self.dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).context("writing pwfile")?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).context("chown pwfile")?;
        }
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", USER, "-E", "UTF8", "--no-locale", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening postgres log")?;
        writeln!(log, "--- pushwire test harness: starting postgres ---")
            .context("writing postgres log")?;
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=100", "-c", "shared_buffers=64MB"]);
        if self.durability == Durability::Fast {
            // Commits still reach the operating system before they are acknowledged, so a
            // killed or restarted server loses nothing; only a crash of the machine would.
            command.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().context("opening postgres log")?,
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.bin_dir.join("postgres").display()))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("postgres is not running"))?;
            if let Some(status) = child.try_wait().context("checking postgres")? {
                self.child = None;
                bail!(
                    "postgres exited during start-up ({status}); log tail:\n{}",
                    self.log_tail()
                );
            }
            let ready = Command::new(self.bin_dir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", USER, "-d", "postgres"])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail();
                self.stop()?;
                bail!(
                    "postgres did not accept connections within {READY_TIMEOUT:?}; log tail:\n{tail}"
                );
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn log_tail(&self) -> String {
        read_tail(&self.log_path()).unwrap_or_else(|err| format!("(no postgres log: {err})"))
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // The temp dir is removed after this, once the server no longer writes to it.
        let _ = self.stop();
    }
}

/// `$PUSHWIRE_POSTGRES_BIN_DIR`, else the newest `/usr/lib/postgresql/<major>/bin`.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(POSTGRES_BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            bail!("{POSTGRES_BIN_DIR_ENV}={} holds no initdb", dir.display());
        }
        return Ok(dir);
    }
    let newest = std::fs::read_dir(DEBIAN_ROOT)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!(
            "no PostgreSQL server binaries under {DEBIAN_ROOT}/*/bin and {POSTGRES_BIN_DIR_ENV} \
             is not set; the delivery store tests need a real PostgreSQL: install Debian's \
             `postgresql` package (apt-get install postgresql) or point {POSTGRES_BIN_DIR_ENV} \
             at a directory holding initdb and postgres"
        )
    })
}

fn is_root() -> bool {
    // Without a libc call: /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false)
}

/// `(uid, gid)` of a system user, from `/etc/passwd`.
fn system_user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&user) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| {
            anyhow!(
                "running as root, and PostgreSQL refuses to: the `{user}` system user (created \
                 by Debian's postgresql package) is needed to run the test cluster"
            )
        })
}

/// A password unique to the cluster, so a test can look for it in error messages.
fn random_password() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("pw{:x}{:x}", std::process::id(), nanos)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail).into_owned())
}
