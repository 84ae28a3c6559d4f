//! What the worker's routing table costs as the configuration grows: for each size, in a
//! process of its own (so each RSS figure starts clean), builds a realistic configuration (by
//! default 5 integrations and 10 push scopes per account), then measures
//!
//! - the snapshot apply (`RoutingTable::from_snapshot`): CPU and wall time;
//! - the worker memory it holds: RSS after the build minus RSS before the configuration was
//!   made, per integration (includes what the allocator keeps of the build's scratch space);
//! - one change at a time (`RoutingTable::apply` of one `UpsertIntegration`, then dropping the
//!   previous table, as the config watch does): CPU time per change over `--changes` changes.
//!
//! CPU times are the thread's (`/proc/thread-self/schedstat`, nanoseconds), so other processes
//! on the machine slow the wall times only.
//!
//! In the worker, changes come between other work that evicts the table from the caches:
//! `--evict-mib N` writes N MiB of other memory before each change, as that work would, and
//! then times each change alone (wall time, summed: the eviction is not counted). The
//! allocator is the worker's (jemalloc, same options).
//!
//! `cargo run --release -p pushwire-tests --bin router-bench`
//! `cargo run --release -p pushwire-tests --bin router-bench -- --integrations 10000 --changes 100`
//! `cargo run --release -p pushwire-tests --bin router-bench -- --per-account 100 --scopes-per-integration 10`
//! (accounts at the control plane's default limits: 100 integrations, 1,000 push scopes)
//! `cargo run --release -p pushwire-tests --bin router-bench -- --evict-mib 64` (cold caches)

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use pushwire_common::domain::matching::Placement;
use pushwire_common::domain::{
    AccountName, Audience, AuthHeader, Integration, IntegrationName, PushAction, PushScope,
    PushScopeName, ScopeTarget, Secret, SignatureScheme, SigningSecret,
};
use pushwire_worker::router::{Change, RoutingTable, Snapshot};

/// The worker's allocator, so the figures are the worker's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Sizes to measure, in integrations (each a multiple of `--per-account`),
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000, 1_000_000])]
    integrations: Vec<usize>,
    /// Integrations per account.
    #[arg(long, default_value_t = 5)]
    per_account: usize,
    /// Push scopes per integration: pushed on a website, then alternately not for a
    /// campaign and pushed on another website.
    #[arg(long, default_value_t = 2)]
    scopes_per_integration: usize,
    /// Single-integration changes applied one after the other, per size.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Before each change, write this many MiB of other memory (evicting the table from the
    /// caches, as the worker's other work does between changes), and time each change alone.
    #[arg(long, default_value_t = 0)]
    evict_mib: usize,
    /// Measure one size in this process (what the parent runs each child with).
    #[arg(long, hide = true)]
    child: bool,
}

/// The figures of one size.
#[derive(Debug)]
struct Figures {
    integrations: usize,
    build_cpu: Duration,
    build_wall: Duration,
    rss_bytes: u64,
    change_cpu: Duration,
    change_wall: Duration,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.integrations,
            self.build_cpu.as_nanos(),
            self.build_wall.as_nanos(),
            self.rss_bytes,
            self.change_cpu.as_nanos(),
            self.change_wall.as_nanos()
        )
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let n: Vec<u128> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("figures line {line:?}"))?;
        let [
            integrations,
            build_cpu,
            build_wall,
            rss,
            change_cpu,
            change_wall,
        ] = n[..]
        else {
            bail!("figures line {line:?}: expected 6 numbers");
        };
        let d = |ns: u128| Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        Ok(Self {
            integrations: integrations as usize,
            build_cpu: d(build_cpu),
            build_wall: d(build_wall),
            rss_bytes: rss as u64,
            change_cpu: d(change_cpu),
            change_wall: d(change_wall),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = Shape {
        per_account: args.per_account.max(1),
        scopes: args.scopes_per_integration.max(1),
    };
    if let Some(bad) = args
        .integrations
        .iter()
        .find(|n| **n % shape.per_account != 0 || **n == 0)
    {
        bail!(
            "--integrations {bad}: give multiples of {}",
            shape.per_account
        );
    }
    if args.child {
        let [size] = args.integrations[..] else {
            bail!("--child measures exactly one size");
        };
        println!(
            "{}",
            measure(size, shape, args.changes.max(1), args.evict_mib)?.line()
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut rows = Vec::new();
    for &size in &args.integrations {
        eprintln!("{size} integrations: building and measuring in a child process…");
        let out = Command::new(&exe)
            .args(["--child", "--integrations", &size.to_string()])
            .args(["--changes", &args.changes.to_string()])
            .args(["--evict-mib", &args.evict_mib.to_string()])
            .args(["--per-account", &shape.per_account.to_string()])
            .args(["--scopes-per-integration", &shape.scopes.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the child")?;
        if !out.status.success() {
            bail!("the child for {size} integrations failed: {}", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        rows.push(Figures::parse(text.trim())?);
    }
    println!(
        "\n| integrations (accounts, push scopes) | snapshot apply: CPU (wall) | RSS per integration | CPU per change (wall) |"
    );
    println!("|---|---|---|---|");
    for f in &rows {
        let per_change = |d: Duration| d.as_secs_f64() * 1e6 / args.changes.max(1) as f64;
        println!(
            "| {} ({}, {}) | {:.2} s ({:.2} s) | {:.0} B ({:.2} KiB) | {:.1} µs ({:.1} µs) |",
            f.integrations,
            f.integrations / shape.per_account,
            f.integrations * shape.scopes,
            f.build_cpu.as_secs_f64(),
            f.build_wall.as_secs_f64(),
            f.rss_bytes as f64 / f.integrations as f64,
            f.rss_bytes as f64 / f.integrations as f64 / 1024.0,
            per_change(f.change_cpu),
            per_change(f.change_wall),
        );
    }
    Ok(())
}

/// How the integrations are spread.
#[derive(Clone, Copy, Debug)]
struct Shape {
    per_account: usize,
    scopes: usize,
}

/// Builds a table of `size` integrations and measures it (in the child process).
fn measure(size: usize, shape: Shape, changes: usize, evict_mib: usize) -> anyhow::Result<Figures> {
    let rss_before = rss_bytes()?;
    let accounts = size / shape.per_account;
    let mut snapshot = Snapshot {
        integrations: Vec::with_capacity(size),
        push_scopes: Vec::with_capacity(size * shape.scopes),
    };
    for a in 0..accounts {
        let account = account(a);
        for i in 0..shape.per_account {
            snapshot.integrations.push(integration(&account, i, 1));
            snapshot
                .push_scopes
                .extend((0..shape.scopes).map(|k| scope(&account, i, k)));
        }
    }
    eprintln!("  configuration made; applying the snapshot");

    let (cpu, wall) = (thread_cpu()?, Instant::now());
    let table = RoutingTable::from_snapshot(1, snapshot);
    let (build_cpu, build_wall) = (thread_cpu()? - cpu, wall.elapsed());
    let rss_bytes = rss_bytes()?.saturating_sub(rss_before);
    if table.integration_count() != size || table.push_scope_count() != shape.scopes * size {
        bail!("the table holds {table:?}, not {size} integrations");
    }
    eprintln!(
        "  snapshot applied in {:.2} s of CPU; {} changes next",
        build_cpu.as_secs_f64(),
        changes
    );

    // The changes, decoded ahead (decoding is the config watch's work, not the table's):
    // each updates one integration of an account spread over the whole table.
    let mut pending: Vec<Change> = (0..changes)
        .map(|n| {
            let a = (n * 7919) % accounts;
            let revision = 2 + n as i64;
            Change::UpsertIntegration(integration(&account(a), n % shape.per_account, revision))
        })
        .collect();
    pending.reverse();
    let mut table = Arc::new(table);
    let mut other = vec![0u8; evict_mib << 20];
    let mut timed = Duration::ZERO;
    let (cpu, wall) = (thread_cpu()?, Instant::now());
    while let Some(change) = pending.pop() {
        let started = (!other.is_empty()).then(|| {
            evict(&mut other);
            Instant::now()
        });
        let next = Arc::new(table.apply(table.revision() + 1, vec![change]));
        // The previous table goes when the last reader lets go of it: here, at once.
        table = next;
        if let Some(started) = started {
            timed += started.elapsed();
        }
    }
    let (change_cpu, change_wall) = if other.is_empty() {
        (thread_cpu()? - cpu, wall.elapsed())
    } else {
        // Each change timed alone: its wall time is its CPU time on an idle core.
        (timed, timed)
    };

    // The table still routes: the first account's integration 0 has a scope on website 1.
    let placement = Placement {
        website_id: Some("1"),
        master_form_id: None,
        campaign_id: "1",
        identified: false,
    };
    if table.route(&account(0), &placement).is_empty() {
        bail!("the table routes nothing on account 0's website 1");
    }
    Ok(Figures {
        integrations: size,
        build_cpu,
        build_wall,
        rss_bytes,
        change_cpu,
        change_wall,
    })
}

fn account(n: usize) -> AccountName {
    AccountName::from_id(&format!("acc-{n:06}")).expect("a valid account id")
}

/// A realistic integration: a display name, an https URL of about 60 characters, an
/// `Authorization` header, one signing secret, both signature schemes.
fn integration(account: &AccountName, n: usize, revision: i64) -> Integration {
    let name = IntegrationName::new(account, &format!("crm-{n}")).expect("a valid id");
    let now = SystemTime::now();
    Integration {
        display_name: format!("CRM {n} of {}", account.id()),
        url: format!(
            "https://hooks.crm-vendor.example.com/qualifio/{}/{n}",
            account.id()
        ),
        auth_header: Some(AuthHeader {
            name: "Authorization".into(),
            value: Secret::new(format!("Bearer tok-{}-{n}-{revision:0>24}", account.id())),
        }),
        secrets: vec![SigningSecret {
            secret: Secret::new(format!("whsec_{:0>32}", revision * 1000 + n as i64)),
            expire_time: None,
        }],
        signature_schemes: vec![SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
        revision,
        ..Integration::new(name, now)
    }
}

/// Integration `n`'s scope `k`: pushed on a website, then alternately not for a campaign and
/// pushed on another website.
fn scope(account: &AccountName, n: usize, k: usize) -> PushScope {
    let (id, target, action) = match k {
        0 => (
            format!("crm-{n}-web"),
            ScopeTarget::Website((n + 1).to_string()),
            PushAction::Push,
        ),
        k if k % 2 == 1 => (
            format!("crm-{n}-not-{k}"),
            ScopeTarget::Campaign(format!("{}", 9000 + 100 * n + k)),
            PushAction::DoNotPush,
        ),
        k => (
            format!("crm-{n}-web-{k}"),
            ScopeTarget::Website(format!("{}", 1000 + 100 * n + k)),
            PushAction::Push,
        ),
    };
    PushScope {
        name: PushScopeName::new(account, &id).expect("a valid id"),
        integration: IntegrationName::new(account, &format!("crm-{n}")).expect("a valid id"),
        target,
        audience: Audience::All,
        action,
        create_time: SystemTime::UNIX_EPOCH,
        update_time: SystemTime::UNIX_EPOCH,
        revision: 1,
    }
}

/// Writes every cache line of `other`, a different value each time.
fn evict(other: &mut [u8]) {
    for line in other.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(other);
}

/// This process's resident set size, from `/proc/self/status`.
fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

/// CPU time of this thread so far (the first field of `/proc/thread-self/schedstat`, in ns).
fn thread_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("/proc/thread-self/schedstat")?;
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<u64>().ok())
        .context("unexpected /proc/thread-self/schedstat")?;
    Ok(Duration::from_nanos(ns))
}
