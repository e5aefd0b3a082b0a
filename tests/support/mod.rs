//! Test harness shared by the `db` and `e2e` test binaries.
//!
//! It owns the real components a test needs and stops them when dropped:
//! - [`Postgres`]: a throwaway PostgreSQL cluster (initdb + postgres) in a
//!   directory of its own under `target/test-stacks/` (or the temporary
//!   directory, see [`pg_stack_dir`]), on a free port, with
//!   password (SCRAM) authentication like a real deployment.
//! - [`Wrangler`]: `wrangler dev` (workerd, with local KV and Durable Objects) on
//!   a free port, its Hyperdrive bindings pointed at that cluster.
//!
//! Children are started with a parent-death signal, so even a harness killed
//! outright does not leave them behind; on a normal exit or a failed test they
//! are stopped by `Drop`.
//!
//! Without the prerequisites (`make test` installs them) a test binary says so
//! and exits at once instead of hanging.

#![allow(dead_code)] // each test binary uses part of this module

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const DB_USER: &str = "keenvpn";
/// The test cluster's password. SASLprep (RFC 4013) maps its full-width
/// letters to `keenvpn-test`, and the server keeps the SCRAM verifier of that
/// form; so every connection the tests make proves that its client prepares a
/// non-ASCII password as PostgreSQL does: the Worker's (wasm, the runtime's
/// NFKC) and the harness's and migration tool's (native, ICU4X's). See
/// `patches/unicode-normalization`.
pub const DB_PASSWORD: &str = "keenvpn-\u{FF54}\u{FF45}\u{FF53}\u{FF54}";
pub const DB_NAME: &str = "keenvpn";

/// [`DB_PASSWORD`] as the URLs the Worker is given carry it: percent-encoded,
/// since a URL's userinfo is ASCII.
pub fn db_password_in_url() -> String {
    DB_PASSWORD
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// [`DB_PASSWORD`] as SASLprep maps it (NFKC): what the server checks.
pub const DB_PASSWORD_PREPARED: &str = "keenvpn-test";

/// The repository root (where Cargo.toml is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails fast, naming `make test`, when something the tests need is missing.
pub fn require(what: &[Prerequisite]) {
    let missing: Vec<String> = what.iter().filter_map(|p| p.missing()).collect();
    if !missing.is_empty() {
        eprintln!(
            "\nThese tests need the local toolchain and stack, which are missing:\n  - {}\n\n\
             Run `make test` from the repository root: it installs everything and runs all tests.\n",
            missing.join("\n  - ")
        );
        std::process::exit(2);
    }
}

#[derive(Clone, Copy)]
pub enum Prerequisite {
    PostgresBinaries,
    Wrangler,
    WorkerBuild,
}

impl Prerequisite {
    fn missing(self) -> Option<String> {
        match self {
            Prerequisite::PostgresBinaries => postgres_bindir()
                .is_none()
                .then(|| "PostgreSQL server binaries (initdb, postgres)".into()),
            Prerequisite::Wrangler => {
                if !root().join("node_modules/.bin/wrangler").exists() {
                    Some("wrangler (npm packages: node_modules/)".into())
                } else if !root().join(".dev.vars").exists() {
                    Some("development secrets (.dev.vars, copied from .dev.vars.example)".into())
                } else {
                    None
                }
            }
            Prerequisite::WorkerBuild => ["worker-build", "wasm-bindgen"]
                .iter()
                .find(|t| which(t).is_none())
                .map(|t| format!("{t} (a cargo-installed tool)")),
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|p| p.join("bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Where initdb/postgres live: $PG_BINDIR, else the newest /usr/lib/postgresql/*/bin.
pub fn postgres_bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        return dir.join("initdb").is_file().then_some(dir);
    }
    let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

/// A free TCP port on the loopback interface, for a server started next.
///
/// A port is free when it is picked and taken only when the server binds it,
/// seconds later. Ports the kernel hands out itself (the ephemeral range:
/// every outgoing connection's local port, and every bind to port 0) can be
/// taken in between, and were: a `wrangler dev` once failed with "Address
/// already in use". So ports come from below that range, each at most once
/// per process, from a start that differs between processes, and only if a
/// bind to them succeeds now.
pub fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST) as usize;
    if span < 1_000 {
        // An unusual kernel setting: leave the choice to the kernel.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
    }
    let start = std::process::id() as usize * 7_919;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port left below {ephemeral}");
        let port = (LOWEST as usize + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A fresh directory for one stack, removed when the stack is dropped.
fn stack_dir(kind: &str) -> PathBuf {
    stack_dir_in(&root().join("target/test-stacks"), kind)
}

fn stack_dir_in(base: &Path, kind: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = base.join(format!(
        "{kind}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create stack dir");
    dir
}

/// A PostgreSQL cluster's directory, owned by the account the server runs as.
/// As root that is `postgres`, which cannot reach a checkout under a directory
/// of mode 0700 (as root's home is); the cluster then lives under the system's
/// temporary directory instead.
fn pg_stack_dir(account: Option<(u32, u32)>) -> PathBuf {
    let dir = stack_dir("pg");
    let Some((uid, gid)) = account else {
        return dir;
    };
    chown_tree(&dir, uid, gid);
    let reachable = Command::new("test")
        .arg("-w")
        .arg(&dir)
        .uid(uid)
        .gid(gid)
        .status()
        .is_ok_and(|s| s.success());
    if reachable {
        return dir;
    }
    let _ = fs::remove_dir(&dir);
    let base = std::env::temp_dir().join("keenvpn-edge-test-stacks");
    fs::create_dir_all(&base).expect("create stack dir");
    // Whatever the umask: 'postgres' must pass through it.
    fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).expect("chmod stack dir");
    let dir = stack_dir_in(&base, "pg");
    chown_tree(&dir, uid, gid);
    dir
}

/// Arranges for `signal` to reach the child if this process (thread) dies.
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from one long-lived thread. Linux delivers the parent-death signal
/// when the *thread* that forked the child exits, and test threads are short-lived;
/// this thread lives as long as the process.
fn spawn_owned(cmd: Command) -> Child {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so this loop never ends.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    spawner
        .lock()
        .expect("spawner")
        .send((cmd, reply_tx))
        .expect("spawner alive");
    reply_rx
        .recv()
        .expect("spawner replied")
        .expect("spawn child process")
}

/// PostgreSQL refuses to run as root; when we are root, run it as `postgres`.
fn postgres_account() -> Option<(u32, u32)> {
    // SAFETY: getuid and getpwnam are called on this thread only, before any fork.
    unsafe {
        if libc::getuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(
            !pw.is_null(),
            "running as root needs a 'postgres' user to run PostgreSQL as"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "chown {}",
        path.display()
    );
}

/// A throwaway PostgreSQL cluster.
pub struct Postgres {
    /// Keep the data directory and log after stopping (set when a test failed).
    pub keep: bool,
    pub port: u16,
    dir: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    account: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    /// initdb + start, on a free port; the database `keenvpn` exists, empty.
    pub fn start() -> Postgres {
        let bindir = postgres_bindir().expect("PostgreSQL binaries (see `make test`)");
        let account = postgres_account();
        let dir = pg_stack_dir(account);
        let data = dir.join("data");
        let pwfile = dir.join("pwfile");
        fs::write(&pwfile, DB_PASSWORD).expect("write pwfile");
        if let Some((uid, gid)) = account {
            chown_tree(&pwfile, uid, gid);
        }
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                DB_USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                // Not the caller's locale, which may not exist here (a
                // session's LANG passed on by ssh) or not be UTF-8.
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = account {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut pg = Postgres {
            keep: false,
            port: free_port(),
            dir,
            data,
            bindir,
            account,
            child: None,
        };
        // The port was free when chosen; another process may take it before
        // the server binds it. Then the server exits, and another port is tried.
        let mut attempts = 1;
        while let Err(log) = pg.try_start_server() {
            let clash = log.contains("could not bind") || log.contains("already in use");
            assert!(
                clash && attempts < 5,
                "postgres did not start (port {}):\n{log}",
                pg.port
            );
            attempts += 1;
            pg.port = free_port();
        }
        pg.psql_admin(&format!("CREATE DATABASE {DB_NAME}"));
        pg
    }

    /// The URL the application uses (password auth over TCP).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{DB_USER}:{}@127.0.0.1:{}/{db}",
            db_password_in_url(),
            self.port
        )
    }

    /// (Re)starts the server on the same port and data directory; waits until it accepts connections.
    pub fn start_server(&mut self) {
        if let Err(log) = self.try_start_server() {
            panic!("postgres did not start (port {}):\n{log}", self.port);
        }
    }

    /// Starts the server and waits until it accepts queries; when it exits
    /// first, its log is the error.
    fn try_start_server(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "postgres already running");
        let log = fs::File::create(self.dir.join("postgres.log")).expect("postgres log");
        if let Some((uid, gid)) = self.account {
            chown_tree(&self.dir.join("postgres.log"), uid, gid);
        }
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            // TCP only: a Unix socket's path must fit in 107 bytes, which a
            // checkout deep in a build agent's directories overran.
            .args(["-c", "unix_socket_directories="])
            // Test clusters trade crash safety of the OS for speed; a killed
            // postgres process still loses nothing it acknowledged.
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some((uid, gid)) = self.account {
            cmd.uid(uid).gid(gid);
        }
        // SIGINT is PostgreSQL's "fast shutdown".
        die_with_parent(&mut cmd, libc::SIGINT);
        self.child = Some(spawn_owned(cmd));
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ready once it answers a query.
        while !self.psql_ok("SELECT 1") {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited {
                self.child = None;
                return Err(fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not become ready; see {}",
                self.dir.join("postgres.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the server (fast shutdown, then kill); the data directory is kept.
    pub fn stop_server(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGINT, Duration::from_secs(15), false);
        }
    }

    /// Kills the server outright, as a crash of its machine would: SIGKILL to
    /// the postmaster and to every backend at once, so no backend finishes
    /// (or commits) anything after the moment of the kill.
    pub fn kill_server(&mut self) {
        if let Some(child) = self.child.take() {
            // Listed first: once the postmaster is gone they are reparented.
            // Killed after it, so it forks nothing (no crash recovery, no
            // new backend) in between.
            let backends = children_of(child.id());
            // SAFETY: kill(2) on the postmaster we spawned, then its backends.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
                for pid in &backends {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
            stop_child(child, libc::SIGKILL, Duration::from_secs(15), false);
            // Wait for the backends too: a restart needs their shared memory gone.
            let deadline = Instant::now() + Duration::from_secs(15);
            while backends.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn psql_cmd(&self, sql: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .env("PGPASSWORD", DB_PASSWORD)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                DB_USER,
                "-d",
                "postgres",
                "-c",
                sql,
            ]);
        if let Some((uid, gid)) = self.account {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn psql_ok(&self, sql: &str) -> bool {
        self.psql_cmd(sql)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs SQL as the cluster owner on the `postgres` database (for CREATE DATABASE).
    pub fn psql_admin(&self, sql: &str) {
        let out = self.psql_cmd(sql).output().expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates an empty database with a unique name and returns its name.
    pub fn create_database(&self, prefix: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}_{}", N.fetch_add(1, Ordering::SeqCst));
        self.psql_admin(&format!("CREATE DATABASE {name}"));
        name
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_server();
        if self.keep || std::thread::panicking() {
            eprintln!("postgres data and log kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat[stat.rfind(')')? + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// The pids whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            // The 4th field of /proc/<pid>/stat, after the parenthesised name.
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Sends `signal` (to the process group when `group`), waits up to `grace`, then SIGKILLs.
fn stop_child(mut child: Child, signal: libc::c_int, grace: Duration, group: bool) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a pid (or process group) we spawned.
    unsafe {
        libc::kill(if group { -pid } else { pid }, signal);
    }
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                // SAFETY: as above.
                unsafe {
                    libc::kill(if group { -pid } else { pid }, libc::SIGKILL);
                }
                let _ = child.wait();
                break;
            }
        }
    }
    if group {
        // Anything left in the group (workerd) goes too.
        // SAFETY: as above.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// Builds the worker once per test process (worker-build skips when up to date).
pub fn build_worker() {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let out = Command::new("sh")
            .arg(root().join("scripts/build-worker.sh"))
            .output()
            .expect("run build-worker.sh");
        assert!(
            out.status.success(),
            "building the worker failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A private copy of what `wrangler dev` serves: `wrangler.toml` without its
/// `[build]` table and with fault injection enabled (`FAULT_INJECTION`, which
/// the worker honours only in development), the built `build/` output and
/// `.dev.vars`. wrangler watches
/// the source tree and rebuilds and reloads the worker on any change, dropping
/// requests in flight; serving a snapshot keeps a test run independent of edits
/// made while it runs, and it serves exactly the artifact `build_worker` made.
fn snapshot_app(
    dir: &Path,
    without: &[&str],
    set: &[(&str, &str)],
    vars: &[(&str, &str)],
) -> PathBuf {
    let app = dir.join("app");
    fs::create_dir_all(&app).expect("app dir");
    let config = fs::read_to_string(root().join("wrangler.toml")).expect("wrangler.toml");
    let mut in_build = false;
    let filtered: String = config
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            if t.starts_with('[') {
                in_build = t.starts_with("[build]");
            }
            !in_build
        })
        .map(|l| format!("{l}\n"))
        .collect();
    // The first `ENVIRONMENT` line is the top-level (development) [vars].
    let dev_vars = "ENVIRONMENT = \"development\"\n";
    assert!(
        filtered.contains(dev_vars),
        "wrangler.toml has no development [vars]"
    );
    let extra: String = vars
        .iter()
        .map(|(name, value)| format!("{name} = {value}\n"))
        .collect();
    let filtered = filtered.replacen(
        dev_vars,
        &format!("{dev_vars}FAULT_INJECTION = \"enabled\"\n{extra}"),
        1,
    );
    fs::write(app.join("wrangler.toml"), filtered).expect("write wrangler.toml");
    // `.dev.vars`, less the secrets named in `without`, with those in `set`
    // given the values there.
    let secrets = fs::read_to_string(root().join(".dev.vars")).expect("read .dev.vars");
    let mut kept: String = secrets
        .lines()
        .filter(|line| {
            !without
                .iter()
                .chain(set.iter().map(|(name, _)| name))
                .any(|name| line.starts_with(&format!("{name}=")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for (name, value) in set {
        kept.push_str(&format!("{name}={value}\n"));
    }
    fs::write(app.join(".dev.vars"), kept).expect("write .dev.vars");
    let status = Command::new("cp")
        .arg("-R")
        .arg(root().join("build"))
        .arg(&app)
        .status();
    assert!(status.is_ok_and(|s| s.success()), "copy build/");
    app
}

/// What wrangler prints when a port it was given is in use.
const PORT_TAKEN: &str = "Address already in use";

/// The `cf` properties every request to the test stack carries: Cloudflare's
/// geolocation of a client in Tokyo (`tests/e2e/connect.rs` counts on it).
pub const CF_STAND_IN: &str = r#"{"colo":"NRT","country":"JP","city":"Tokyo","continent":"AS",
"latitude":"35.68950","longitude":"139.69171","timezone":"Asia/Tokyo","asn":2516}"#;

/// `wrangler dev` serving the worker, with its Hyperdrive bindings pointed at `db_url`.
pub struct Wrangler {
    pub port: u16,
    pub base_url: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Keep the logs and state after stopping (set when a test failed).
    pub keep: bool,
}

impl Wrangler {
    pub fn start(db_url: &str) -> Wrangler {
        Wrangler::start_with(db_url, &[], &[], &[])
    }

    /// [`Wrangler::start`] with the secrets named in `without` left out of
    /// its `.dev.vars`, those in `set` set to the values there, and the
    /// development `[vars]` of its `wrangler.toml` given `vars` (name and
    /// TOML value, written as is: `30` is a number, `"30"` text).
    pub fn start_with(
        db_url: &str,
        without: &[&str],
        set: &[(&str, &str)],
        vars: &[(&str, &str)],
    ) -> Wrangler {
        build_worker();
        let dir = stack_dir("wrangler");
        let app = snapshot_app(&dir, without, set, vars);
        let mut w = Wrangler {
            keep: false,
            port: 0,
            base_url: String::new(),
            dir,
            child: None,
        };
        // A port taken between its choice and wrangler's bind (see
        // `free_port`) is a fault of the harness, not of the worker: start
        // again on other ports.
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            w.port = free_port();
            w.base_url = format!("http://127.0.0.1:{}", w.port);
            let from = w.log().len();
            w.child = Some(w.spawn(&app, db_url));
            match w.wait_healthy(from, Duration::from_secs(120)) {
                Ok(()) => return w,
                Err(why) if attempt < ATTEMPTS && why.contains(PORT_TAKEN) => {
                    if let Some(child) = w.child.take() {
                        stop_child(child, libc::SIGTERM, Duration::from_secs(10), true);
                    }
                    eprintln!("wrangler dev: port {} taken; starting again", w.port);
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts `wrangler dev` on `self.port`, appending to its log.
    fn spawn(&self, app: &Path, db_url: &str) -> Child {
        let port = self.port;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("wrangler.log"))
            .expect("wrangler log");
        let bin = root().join("node_modules/.bin");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // The request's `cf` geolocation, which wrangler dev otherwise
        // fetches (or, offline, replaces with a placeholder): a fixed stand-in,
        // so that a connect with no location header is placed from a known
        // place on any machine. Written at each start: wrangler takes the file
        // only while it is less than 30 days old.
        let cf = self.dir.join("cf.json");
        fs::write(&cf, CF_STAND_IN).expect("write cf.json");
        let mut cmd = Command::new(bin.join("wrangler"));
        cmd.current_dir(app)
            .args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
            .args(["--inspector-port", &free_port().to_string()])
            .arg("--persist-to")
            .arg(self.dir.join("state"))
            .args([
                "--show-interactive-dev-session=false",
                "--log-level",
                "log",
                "--test-scheduled",
            ])
            .env("PATH", path)
            .env(
                "CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE",
                db_url,
            )
            .env("CLOUDFLARE_CF_FETCH_PATH", &cf)
            .env("WRANGLER_SEND_METRICS", "false")
            .env("WRANGLER_LOG_PATH", self.dir.join("wrangler-logs"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            // Own process group: stopping it stops node and its workerd children.
            .process_group(0);
        die_with_parent(&mut cmd, libc::SIGTERM);
        spawn_owned(cmd)
    }

    /// Waits until `/healthz` answers 200; the reason, with the log's tail,
    /// when it does not within `within`, or when wrangler reports its port
    /// taken (it then keeps running, serving nothing) in the log after byte
    /// `from` (what this start wrote).
    fn wait_healthy(&self, from: usize, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let url = format!("{}/healthz", self.base_url);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut buf = [0u8; 16];
                    if std::io::Read::read(&mut s, &mut buf).is_ok_and(|n| n >= 12)
                        && &buf[9..12] == b"200"
                    {
                        return Ok(());
                    }
                }
            }
            let taken = self
                .log()
                .get(from..)
                .is_some_and(|l| l.contains(PORT_TAKEN));
            if taken || Instant::now() > deadline {
                let why = if taken {
                    format!("reported its port taken ({PORT_TAKEN})")
                } else {
                    format!("did not serve {url} in {within:?}")
                };
                return Err(format!("wrangler dev {why}:\n{}", self.log_tail(4000)));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `wrangler kv key <verb> <key> ...` against the worker's local KV
    /// namespace (binding `KV`), as an operator would. The CLI and the running
    /// worker share the local store, and the CLI can lose a race for it (the
    /// command then fails with a 500): a failed command is run again, up to
    /// five times. Both verbs used here (get, delete) are safe to repeat.
    fn kv(&self, verb: &str, key: &str, extra: &[&str]) -> std::process::Output {
        let bin = root().join("node_modules/.bin");
        let run = || {
            Command::new(bin.join("wrangler"))
                .current_dir(self.dir.join("app"))
                .args(["kv", "key", verb, key, "--binding", "KV", "--local"])
                .args(extra)
                .arg("--persist-to")
                .arg(self.dir.join("state"))
                .env(
                    "PATH",
                    format!(
                        "{}:{}",
                        bin.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                )
                .env("WRANGLER_SEND_METRICS", "false")
                .output()
                .unwrap_or_else(|e| panic!("run wrangler kv key {verb}: {e}"))
        };
        let mut attempt = 1;
        loop {
            let out = run();
            if out.status.success() || attempt == 5 {
                return out;
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads a key from the worker's local KV namespace; `None` when it is
    /// absent. A failed read is never mistaken for an absent key.
    pub fn kv_get(&self, key: &str) -> Option<String> {
        let out = self.kv("get", key, &["--text"]);
        assert!(
            out.status.success(),
            "wrangler kv key get {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!text.is_empty() && text != "Value not found").then_some(text)
    }

    /// The names of the keys in the worker's local KV namespace that start
    /// with `prefix`.
    pub fn kv_list(&self, prefix: &str) -> Vec<String> {
        self.kv_list_expiring(prefix)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// The keys that start with `prefix`, each with when KV drops it (unix
    /// seconds; `None` for a key without a TTL).
    pub fn kv_list_expiring(&self, prefix: &str) -> Vec<(String, Option<i64>)> {
        let out = self.kv("list", &format!("--prefix={prefix}"), &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "wrangler kv key list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = stdout.find('[').map_or("", |at| &stdout[at..]);
        let keys: Vec<serde_json::Value> = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("wrangler kv key list: {e}: {stdout}"));
        keys.iter()
            .filter_map(|k| Some((k["name"].as_str()?.to_owned(), k["expiration"].as_i64())))
            .collect()
    }

    /// Stores `value` under `key` in the worker's local KV namespace.
    pub fn kv_put(&self, key: &str, value: &str) {
        let out = self.kv("put", key, &[value]);
        assert!(
            out.status.success(),
            "wrangler kv key put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes a key from the worker's local KV namespace.
    pub fn kv_delete(&self, key: &str) {
        let out = self.kv("delete", key, &[]);
        assert!(
            out.status.success(),
            "wrangler kv key delete {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Everything wrangler and the worker printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("wrangler.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, bytes: usize) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(bytes);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }
}

/// The logs of every `wrangler dev` stopped so far in this process, for
/// checks over a whole run (see [`finished_logs`]).
static FINISHED_LOGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// What every stopped `wrangler dev` of this process printed, one entry each.
pub fn finished_logs() -> Vec<String> {
    FINISHED_LOGS.lock().map(|l| l.clone()).unwrap_or_default()
}

impl Drop for Wrangler {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, libc::SIGTERM, Duration::from_secs(10), true);
        }
        if let Ok(mut logs) = FINISHED_LOGS.lock() {
            logs.push(self.log());
        }
        if self.keep || std::thread::panicking() {
            eprintln!("wrangler logs and state kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Applies the migrations and the dev seed to `url`.
pub async fn migrate_and_seed(url: &str) {
    let mut client = keenvpn_edge::db::connect(url)
        .await
        .expect("connect for migrations");
    keenvpn_edge::db::migrate(&mut client)
        .await
        .expect("migrations apply");
    keenvpn_edge::db::seed_dev(&mut client)
        .await
        .expect("dev seed applies");
}

/// A database plus the worker in front of it: what an end-to-end test talks to.
pub struct Stack {
    // Field order is drop order: stop the worker before its database.
    pub wrangler: Wrangler,
    pub pg: Postgres,
}

impl Stack {
    /// Starts PostgreSQL (migrated and seeded) and the worker. Safe to call from
    /// inside or outside an async context: it blocks on a runtime of its own.
    pub fn start() -> Stack {
        Stack::start_with(&[], &[], &[])
    }

    /// [`Stack::start`] with the worker's secrets named in `without` unset,
    /// those in `set` set to the values there, and its development `[vars]`
    /// given `vars` (see [`Wrangler::start_with`]).
    pub fn start_with(without: &[&str], set: &[(&str, &str)], vars: &[(&str, &str)]) -> Stack {
        let pg = Postgres::start();
        let url = pg.url(DB_NAME);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(migrate_and_seed(&url))
        })
        .join()
        .expect("migrations and seed");
        let wrangler = Wrangler::start_with(&pg.url(DB_NAME), without, set, vars);
        Stack { wrangler, pg }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.wrangler.base_url)
    }
}

/// Polls `check` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
