//! `surge`: a regional outage, replayed against the local stack.
//!
//! N VPN clients are all connected to one region; the region is marked down;
//! every client reconnects at once. The tool measures how long the fleet takes
//! to come back, what it cost (429/503 answers, retries, PostgreSQL
//! transactions) and how a client that follows the recommended retry policy
//! compares with a naive one that hammers the service.
//!
//! ```text
//! make dev                                    # in another terminal
//! cargo run --release --bin surge -- --clients 10000        # the reference run
//! cargo run --release --bin surge -- --clients 500 --mode policy --deadline-secs 120
//! ```
//!
//! Provisioning is done in bulk and is not measured: users and their `plus`
//! subscriptions are inserted into PostgreSQL directly (one real argon2id hash
//! shared by all of them), access tokens are minted with the development
//! signing key from `.dev.vars`, devices are registered through `POST
//! /v1/devices`, and every client connects once to the region. The surge
//! itself goes only through the real endpoints with real tokens: nothing is
//! weakened for the test. Everything is loopback-only.
//!
//! The surge: the region is marked down through the admin API, the clock
//! starts, and one task per client, all released together, asks `POST
//! /v1/connect` for the dead region (the server must steer it). On 429/503/5xx
//! or a transport error a `policy` client waits `domain::backoff::delay_ms`
//! (full jitter, never sooner than `Retry-After`), a `naive` one 50 ms; so it
//! does after a 200 that places it in the dead region (a catalogue not yet
//! updated), whose tunnel would never come up. The
//! tasks share one HTTP client, and at most `--pool` requests are in flight
//! at once (the connection pool's bound); a request's latency is measured
//! from when it gets its connection, its success time from the surge's start.
//!
//! PostgreSQL's cost is read from its cumulative statistics before and after
//! the surge (see `PgStats`: on PostgreSQL 15 and later each snapshot waits
//! 11 s so that every backend has published its counters), less the tool's
//! own transactions. The delta is everything the database did meanwhile: the
//! admin call that marks the region down, and any autovacuum or cron work
//! that happened to run.
//!
//! Afterwards the region is set back to up and the users are deleted (devices
//! and subscriptions cascade), also after an error or Ctrl-C. Each run takes
//! N tunnel addresses from `device_address_seq` for good (addresses are never
//! reused; the sequence holds about 4.2 million).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use futures::channel::{mpsc, oneshot};
    use futures::{FutureExt as _, StreamExt as _};
    use indicatif::{ProgressBar, ProgressStyle};
    use serde::Serialize;
    use serde_json::{Value, json};

    use keenvpn_edge::domain::backoff::{self, RECOMMENDED};
    use keenvpn_edge::domain::catalogue::Tier;
    use keenvpn_edge::domain::entitlement::Entitlement;
    use keenvpn_edge::domain::password;
    use keenvpn_edge::domain::token::{ACCESS_TTL_SECS, KeySet, MAX_JITTER_SECS};

    const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8787";
    const DEFAULT_DATABASE_URL: &str = "postgres://keenvpn:keenvpn-dev@127.0.0.1:54329/keenvpn";
    const DEFAULT_REGION: &str = "eu-central";
    const DEFAULT_CLIENTS: usize = 1000;
    const MAX_CLIENTS: usize = 200_000;
    const DEFAULT_CONCURRENCY: usize = 64;
    const DEFAULT_POOL: usize = 256;
    const DEFAULT_DEADLINE_SECS: u64 = 600;
    const DEFAULT_OUT: &str = "bench/surge";

    /// Retries a naive client makes before it gives up.
    const NAIVE_MAX_RETRIES: u32 = 200;
    /// The naive client's pause between attempts: "retry at once", with just
    /// enough of a pause that it does not spin.
    const NAIVE_PAUSE_MS: u64 = 50;
    /// Attempts per request while provisioning (device registration and the
    /// initial connect), which honours 429/503 with the recommended policy.
    const SETUP_MAX_ATTEMPTS: u32 = 30;
    /// Users inserted per statement.
    const INSERT_CHUNK: usize = 2000;
    /// How long to wait before reading PostgreSQL's statistics so that every
    /// other backend has published its counters (see [`PgStats`]). From
    /// PostgreSQL 15 a backend publishes at most once a second, and one that
    /// goes idle within a second of its last publication holds the rest back
    /// for up to 10 s (`PGSTAT_IDLE_INTERVAL`).
    const STATS_SETTLE_PG15: Duration = Duration::from_millis(11_000);
    /// The same before PostgreSQL 15 (the statistics collector, every 500 ms).
    const STATS_SETTLE_OLD: Duration = Duration::from_millis(1500);
    /// Asks this backend to publish its pending statistics as soon as it is
    /// idle. It reads a table on purpose: a backend with no table counters
    /// pending does not publish its transaction count at all.
    const FORCE_FLUSH: &str = "SELECT pg_stat_force_next_flush() FROM pg_catalog.pg_class LIMIT 1";
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Points kept in the JSON curve and drawn in the chart, per series.
    const CURVE_POINTS: usize = 1000;
    const EMAIL_DOMAIN: &str = "example.test";
    const PLAN: &str = "plus";

    const USAGE: &str = "\
usage: surge [--clients N] [--region ID] [--mode policy|naive|both]
             [--deadline-secs S] [--out DIR] [--keep]
             [--base-url URL] [--database-url URL] [--admin-token T]
             [--concurrency N] [--pool N]

Replays a regional outage against the local stack (`make dev`): N VPN clients
connected to one region, the region marked down, every client reconnecting at
once. Reports the time until all are back, connect latencies, 429/503 counts,
retries, where clients landed and the PostgreSQL transactions it cost.

  --clients N        clients (users, each with one device) (default: 1000;
                     10000 is the reference run)
  --region ID        the region that goes down (default: eu-central)
  --mode M           the clients' retry behaviour: policy (the recommended
                     backoff: capped exponential, full jitter, never sooner than
                     Retry-After), naive (retry after 50 ms, ignore Retry-After)
                     or both, each on a fresh set of users (default: both)
  --deadline-secs S  give up on clients not back after S seconds (default: 600)
  --out DIR          where to write <mode>-<N>.json and <mode>-<N>.svg, and
                     both-<N>.svg with --mode both (default: bench/surge)
  --keep             keep the provisioned users and devices (default: delete them)
  --admission-rate R set every region's admission rate to R clients/s for the
                     surge and restore the previous rates after (default: leave
                     them): scales the outage down to what one machine serves
  --base-url URL     the Worker, loopback only (default: http://127.0.0.1:8787)
  --database-url URL PostgreSQL, loopback only
                     (default: postgres://keenvpn:keenvpn-dev@127.0.0.1:54329/keenvpn)
  --admin-token T    the admin API token (default: ADMIN_TOKEN from .dev.vars)
  --concurrency N    requests in flight while provisioning (default: 64)
  --pool N           requests in flight during the surge: the shared HTTP
                     client's connection bound (default: 256)
  -h, --help         this text

Signing keys (JWT_SIGNING_KEYS) and the admin token come from .dev.vars, looked
up in the current directory, its parents, then the crate root.";

    // ----------------------------------------------------------------------
    // Command line
    // ----------------------------------------------------------------------

    /// How the simulated clients retry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Policy,
        Naive,
    }

    impl Mode {
        fn name(self) -> &'static str {
            match self {
                Mode::Policy => "policy",
                Mode::Naive => "naive",
            }
        }

        /// Retries (requests after the first) before a client gives up; the
        /// policy's `max_attempts` counts retries.
        fn max_retries(self) -> u32 {
            match self {
                Mode::Policy => RECOMMENDED.max_attempts,
                Mode::Naive => NAIVE_MAX_RETRIES,
            }
        }

        fn color(self) -> &'static str {
            match self {
                Mode::Policy => "#1f77b4",
                Mode::Naive => "#d62728",
            }
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum ModeArg {
        Policy,
        Naive,
        Both,
    }

    impl ModeArg {
        fn modes(self) -> Vec<Mode> {
            match self {
                ModeArg::Policy => vec![Mode::Policy],
                ModeArg::Naive => vec![Mode::Naive],
                ModeArg::Both => vec![Mode::Policy, Mode::Naive],
            }
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Args {
        clients: usize,
        region: String,
        /// Normalised: no trailing slash.
        base_url: String,
        database_url: String,
        admin_token: Option<String>,
        concurrency: usize,
        pool: usize,
        mode: ModeArg,
        deadline_secs: u64,
        out: PathBuf,
        keep: bool,
        /// Every region's admission rate for the run (restored afterwards).
        admission_rate: Option<u32>,
    }

    impl Default for Args {
        fn default() -> Args {
            Args {
                clients: DEFAULT_CLIENTS,
                region: DEFAULT_REGION.to_owned(),
                base_url: DEFAULT_BASE_URL.to_owned(),
                database_url: DEFAULT_DATABASE_URL.to_owned(),
                admin_token: None,
                concurrency: DEFAULT_CONCURRENCY,
                pool: DEFAULT_POOL,
                mode: ModeArg::Both,
                deadline_secs: DEFAULT_DEADLINE_SECS,
                out: PathBuf::from(DEFAULT_OUT),
                keep: false,
                admission_rate: None,
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Command {
        Run(Args),
        Help,
    }

    fn parse_count(flag: &str, value: &str, min: usize, max: usize) -> Result<usize, String> {
        match value.parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "{flag} takes a whole number from {min} to {max}, not {value:?}"
            )),
        }
    }

    /// Parses the arguments after the program name. `--flag value` and
    /// `--flag=value` are both accepted.
    fn parse_args<I>(args: I) -> Result<Command, String>
    where
        I: IntoIterator<Item = String>,
    {
        let mut a = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let takes_value = !matches!(flag.as_str(), "--keep" | "-h" | "--help");
            if !takes_value && inline.is_some() {
                return Err(format!("{flag} takes no value"));
            }
            let mut value = || -> Result<String, String> {
                match inline.clone().or_else(|| args.next()) {
                    Some(v) => Ok(v),
                    None => Err(format!("{flag} needs a value")),
                }
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "--keep" => a.keep = true,
                "--admission-rate" => {
                    a.admission_rate = Some(parse_count(&flag, &value()?, 1, 100_000)? as u32)
                }
                "--clients" => a.clients = parse_count(&flag, &value()?, 1, MAX_CLIENTS)?,
                "--concurrency" => a.concurrency = parse_count(&flag, &value()?, 1, 4096)?,
                "--pool" => a.pool = parse_count(&flag, &value()?, 1, 16_384)?,
                "--deadline-secs" => {
                    a.deadline_secs = parse_count(&flag, &value()?, 1, 86_400)? as u64;
                }
                "--region" => {
                    let v = value()?;
                    if !is_region_id(&v) {
                        return Err(format!("--region: {v:?} is not a region id"));
                    }
                    a.region = v;
                }
                "--mode" => {
                    a.mode = match value()?.as_str() {
                        "policy" => ModeArg::Policy,
                        "naive" => ModeArg::Naive,
                        "both" => ModeArg::Both,
                        other => {
                            return Err(format!("--mode is policy, naive or both, not {other:?}"));
                        }
                    };
                }
                "--base-url" => a.base_url = loopback_base_url(&value()?)?,
                "--database-url" => {
                    let v = value()?;
                    check_loopback_database(&v)?;
                    a.database_url = v;
                }
                "--admin-token" => {
                    let v = value()?;
                    if v.is_empty() {
                        return Err("--admin-token is empty".to_owned());
                    }
                    a.admin_token = Some(v);
                }
                "--out" => {
                    let v = value()?;
                    if v.is_empty() {
                        return Err("--out is empty".to_owned());
                    }
                    a.out = PathBuf::from(v);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Command::Run(a))
    }

    /// The shape of a region id (as in the `regions` table's CHECK).
    fn is_region_id(s: &str) -> bool {
        keenvpn_edge::api::is_catalogue_id(s, 32)
    }

    fn is_loopback_host(host: &str) -> bool {
        if host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Checks that `url` is a plain `http://` URL of a loopback host (this tool
    /// generates load: it must never be pointed at a shared deployment) and
    /// returns it without a trailing slash.
    fn loopback_base_url(url: &str) -> Result<String, String> {
        let bad = |why: &str| format!("--base-url {url:?}: {why}");
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !(path.is_empty() || path == "/") {
            return Err(bad("must be a base URL without a path"));
        }
        if authority.contains('@') {
            return Err(bad("must not carry credentials"));
        }
        let (host, port) = if authority.starts_with('[') {
            match authority.find(']') {
                Some(i) => (&authority[..=i], &authority[i + 1..]),
                None => return Err(bad("unterminated IPv6 address")),
            }
        } else {
            match authority.find(':') {
                Some(i) => authority.split_at(i),
                None => (authority, ""),
            }
        };
        if !port.is_empty() {
            let digits = port
                .strip_prefix(':')
                .ok_or_else(|| bad("malformed port"))?;
            if digits.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad("malformed port"));
            }
        }
        if !is_loopback_host(host) {
            return Err(bad(
                "must be a loopback address (127.0.0.1, ::1 or localhost)",
            ));
        }
        Ok(format!("http://{authority}"))
    }

    /// Checks that every TCP host of a PostgreSQL URL is loopback (Unix
    /// sockets are local by nature).
    fn check_loopback_database(url: &str) -> Result<(), String> {
        use tokio_postgres::config::Host;
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("--database-url is not a PostgreSQL URL: {e}"))?;
        for host in config.get_hosts() {
            if let Host::Tcp(name) = host
                && !is_loopback_host(name)
            {
                return Err(format!(
                    "--database-url: host {name:?} is not a loopback address"
                ));
            }
        }
        if config.get_hostaddrs().iter().any(|ip| !ip.is_loopback()) {
            return Err("--database-url: hostaddr is not a loopback address".to_owned());
        }
        Ok(())
    }

    /// The URL with its password replaced, fit to print or to save.
    fn redact_url(url: &str) -> String {
        let Some(scheme_end) = url.find("://") else {
            return url.to_owned();
        };
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return url.to_owned();
        };
        match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        }
    }

    fn shell_quote(s: &str) -> String {
        let plain = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
        if plain {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    }

    fn is_secret_flag(flag: &str) -> bool {
        flag == "--admin-token" || flag == "--database-url"
    }

    fn redact_value(flag: &str, value: &str) -> String {
        if flag == "--admin-token" {
            "***".to_owned()
        } else {
            redact_url(value)
        }
    }

    /// The command line as typed (shell-quoted), with the admin token and the
    /// database password redacted: it is printed and saved with the results.
    fn display_command_line(argv: &[String]) -> String {
        let mut out = Vec::with_capacity(argv.len());
        let mut pending: Option<&str> = None;
        for arg in argv {
            let shown = if let Some(flag) = pending.take() {
                redact_value(flag, arg)
            } else if let Some((flag, value)) =
                arg.split_once('=').filter(|(f, _)| is_secret_flag(f))
            {
                format!("{flag}={}", redact_value(flag, value))
            } else {
                if is_secret_flag(arg) {
                    pending = Some(arg);
                }
                arg.clone()
            };
            out.push(shell_quote(&shown));
        }
        out.join(" ")
    }

    // ----------------------------------------------------------------------
    // .dev.vars
    // ----------------------------------------------------------------------

    /// The value of `name` in a dotenv-style file: `NAME=value`,
    /// `NAME="value"` or `NAME='value'`, optionally after `export `. Comments
    /// and blank lines are skipped; the last definition wins.
    fn dev_var(contents: &str, name: &str) -> Option<String> {
        let mut found = None;
        for line in contents.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if key.trim() != name {
                continue;
            }
            let value = value.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| {
                    value
                        .strip_prefix(*q)
                        .and_then(|v| v.strip_suffix(*q))
                        .filter(|_| value.len() >= 2)
                })
                .unwrap_or(value);
            found = Some(unquoted.to_owned());
        }
        found
    }

    /// `.dev.vars` in the current directory or one of its parents, else at the
    /// crate root this tool was built from.
    fn find_dev_vars() -> Result<PathBuf, String> {
        let mut looked = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            for dir in cwd.ancestors() {
                let p = dir.join(".dev.vars");
                if p.is_file() {
                    return Ok(p);
                }
                looked.push(dir.display().to_string());
            }
        }
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev.vars");
        if p.is_file() {
            return Ok(p);
        }
        Err(format!(
            "no .dev.vars found (looked in the current directory, its parents and {}): \
             run `make setup` (it copies .dev.vars.example) or start the stack with `make dev`",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    // ----------------------------------------------------------------------
    // Statistics
    // ----------------------------------------------------------------------

    /// Nearest-rank percentile of sorted values: the smallest value with at
    /// least `p`% of the values at or below it.
    fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
        if sorted.is_empty() {
            return None;
        }
        let n = sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, n) - 1])
    }

    #[derive(Debug, Clone, PartialEq, Serialize)]
    struct Summary {
        count: usize,
        mean: f64,
        p50: f64,
        p90: f64,
        p99: f64,
        max: f64,
    }

    /// Three decimals: microseconds for milliseconds, milliseconds for seconds.
    fn round3(x: f64) -> f64 {
        (x * 1000.0).round() / 1000.0
    }

    /// Count, mean, p50/p90/p99 and max, rounded to three decimals.
    fn summarize(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Some(Summary {
            count: sorted.len(),
            mean: round3(mean),
            p50: round3(percentile(&sorted, 50.0)?),
            p90: round3(percentile(&sorted, 90.0)?),
            p99: round3(percentile(&sorted, 99.0)?),
            max: round3(*sorted.last()?),
        })
    }

    /// When `fraction` of `total` clients had reconnected, from the sorted
    /// success times; `None` if that many never did.
    fn time_to_reach(sorted_times: &[f64], total: usize, fraction: f64) -> Option<f64> {
        if total == 0 {
            return None;
        }
        let needed = ((fraction * total as f64).ceil() as usize).clamp(1, total);
        sorted_times.get(needed - 1).copied()
    }

    /// `(seconds, reconnected so far)` after each success, thinned to about
    /// `max_points` points; the first and last successes are always kept.
    fn reconnect_curve(sorted_times: &[f64], max_points: usize) -> Vec<(f64, u64)> {
        let n = sorted_times.len();
        let step = n.div_ceil(max_points.max(1)).max(1);
        (0..n)
            .filter(|i| i % step == step - 1 || *i == 0 || *i + 1 == n)
            .map(|i| (round3(sorted_times[i]), i as u64 + 1))
            .collect()
    }

    // ----------------------------------------------------------------------
    // The client's retry decision
    // ----------------------------------------------------------------------

    /// What a client makes of an HTTP status from `POST /v1/connect`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Class {
        Connected,
        /// 429: retry later.
        Throttled,
        /// 503: retry later.
        Unavailable,
        /// Any other 5xx: retry later.
        ServerError,
        /// Any other status: the request itself is wrong; retrying will not help.
        Rejected,
    }

    fn classify(status: u16) -> Class {
        match status {
            200..=299 => Class::Connected,
            429 => Class::Throttled,
            503 => Class::Unavailable,
            500..=599 => Class::ServerError,
            _ => Class::Rejected,
        }
    }

    /// `Retry-After` in its delta-seconds form (the only one the API sends);
    /// an HTTP date or garbage counts as absent.
    fn parse_retry_after(value: &str) -> Option<u32> {
        let v = value.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(
            v.parse::<u64>()
                .map_or(u32::MAX, |s| s.min(u64::from(u32::MAX)) as u32),
        )
    }

    /// How long a client of `mode` waits before retry number `retry` (0 for
    /// the first retry, as in `backoff::delay_ms`).
    fn retry_delay_ms(mode: Mode, retry: u32, retry_after_secs: Option<u32>, random: u64) -> u64 {
        match mode {
            Mode::Policy => backoff::delay_ms(&RECOMMENDED, retry, retry_after_secs, random),
            Mode::Naive => NAIVE_PAUSE_MS,
        }
    }

    // ----------------------------------------------------------------------
    // Tokens and random values
    // ----------------------------------------------------------------------

    fn random_bytes<const N: usize>() -> [u8; N] {
        let mut b = [0_u8; N];
        getrandom::fill(&mut b).expect("the operating system's random source");
        b
    }

    fn random_u64() -> u64 {
        u64::from_le_bytes(random_bytes::<8>())
    }

    /// What a `plus` subscriber is entitled to, until `now` + 30 days.
    fn plus_entitlement(now: i64) -> Entitlement {
        Entitlement {
            plan: PLAN.into(),
            max_devices: 5,
            region_tiers: vec![Tier::Free, Tier::Premium],
            until: Some(now + 30 * 24 * 3600),
        }
    }

    /// A real access token, exactly as the Worker would issue at login.
    fn mint_token(keys: &KeySet, user_id: &str, sid: &str, now: i64, jitter: u32) -> String {
        keys.issue(user_id, sid, &plus_entitlement(now), now, jitter)
            .0
    }

    fn unix_now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    fn rfc3339(t: SystemTime) -> String {
        chrono::DateTime::<chrono::Utc>::from(t)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    // ----------------------------------------------------------------------
    // The report
    // ----------------------------------------------------------------------

    /// How one client's reconnect ended.
    #[derive(Debug, Clone, PartialEq)]
    enum Ending {
        Reconnected {
            /// Seconds from the surge's start to the successful response.
            at_secs: f64,
            /// Latency of the successful request.
            latency_ms: f64,
            region: String,
        },
        /// Still not back at the global deadline.
        Deadline,
        /// Used up its retries.
        OutOfRetries,
        /// Refused with a status that retrying cannot fix.
        Rejected(u16),
        /// Its task died (a bug): counted as not reconnected.
        Crashed,
    }

    #[derive(Debug, Clone, PartialEq)]
    struct ClientOutcome {
        /// Requests sent.
        attempts: u32,
        ending: Ending,
    }

    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
    struct Responses {
        /// 2xx placing the client outside the dead region: reconnected.
        ok: u64,
        /// 2xx placing the client in the dead region (the server did not know
        /// yet): its tunnel would fail, so the client retries.
        ok_in_dead_region: u64,
        status_429: u64,
        status_503: u64,
        status_5xx_other: u64,
        status_4xx_other: u64,
        transport_errors: u64,
        /// 2xx whose body was not a connect answer.
        bad_bodies: u64,
    }

    #[derive(Debug, Default)]
    struct Counters {
        ok: AtomicU64,
        ok_dead: AtomicU64,
        s429: AtomicU64,
        s503: AtomicU64,
        s5xx: AtomicU64,
        s4xx: AtomicU64,
        transport: AtomicU64,
        bad_bodies: AtomicU64,
    }

    impl Counters {
        fn snapshot(&self) -> Responses {
            let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
            Responses {
                ok: g(&self.ok),
                ok_in_dead_region: g(&self.ok_dead),
                status_429: g(&self.s429),
                status_503: g(&self.s503),
                status_5xx_other: g(&self.s5xx),
                status_4xx_other: g(&self.s4xx),
                transport_errors: g(&self.transport),
                bad_bodies: g(&self.bad_bodies),
            }
        }

        fn errors(&self) -> u64 {
            let r = self.snapshot();
            r.status_5xx_other + r.status_4xx_other + r.transport_errors + r.bad_bodies
        }
    }

    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
    struct GaveUp {
        deadline: u64,
        out_of_retries: u64,
        rejected: u64,
        crashed: u64,
    }

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
    struct TableStats {
        scans: i64,
        inserted: i64,
        updated: i64,
        deleted: i64,
    }

    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    struct PgSnapshot {
        transactions: i64,
        /// Autovacuum and autoanalyze runs so far, on every table.
        maintenance: i64,
        tables: BTreeMap<String, TableStats>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    struct PgDelta {
        /// Committed plus rolled-back transactions in the database, less the
        /// tool's own.
        transactions: i64,
        own_transactions_subtracted: i64,
        /// Autovacuum and autoanalyze runs in the window: their transactions
        /// are in `transactions` too.
        autovacuum_runs: i64,
        /// Tables whose counters moved.
        tables: BTreeMap<String, TableStats>,
    }

    /// What changed between two snapshots; `own` is the number of the tool's
    /// own transactions that fell in between.
    fn pg_delta(before: &PgSnapshot, after: &PgSnapshot, own: i64) -> PgDelta {
        let mut tables = BTreeMap::new();
        for (name, a) in &after.tables {
            let b = before.tables.get(name).copied().unwrap_or_default();
            let d = TableStats {
                scans: a.scans - b.scans,
                inserted: a.inserted - b.inserted,
                updated: a.updated - b.updated,
                deleted: a.deleted - b.deleted,
            };
            if d != TableStats::default() {
                tables.insert(name.clone(), d);
            }
        }
        PgDelta {
            transactions: (after.transactions - before.transactions - own).max(0),
            own_transactions_subtracted: own,
            autovacuum_runs: after.maintenance - before.maintenance,
            tables,
        }
    }

    #[derive(Debug, Clone, Serialize)]
    struct SurgeReport {
        mode: Mode,
        /// The provisioned users are `surge-<run_id>-<i>@example.test`.
        run_id: String,
        clients: usize,
        region: String,
        deadline_secs: u64,
        max_retries_per_client: u32,
        pool: usize,
        reconnected: usize,
        reconnected_percent: f64,
        complete: bool,
        /// Seconds until every client was back (only when all were).
        time_to_all_secs: Option<f64>,
        /// Seconds until 50, 90, 99 and 100% were back.
        time_to_percent_secs: BTreeMap<String, Option<f64>>,
        /// Seconds from the surge's start until its last client finished.
        surge_duration_secs: f64,
        /// Latency of the successful connect requests.
        latency_ms: Option<Summary>,
        responses: Responses,
        gave_up: GaveUp,
        /// Retries (requests beyond the first) per client, all clients.
        retries_per_client: Option<Summary>,
        landing_regions: BTreeMap<String, u64>,
        postgres: Option<PgDelta>,
        surge_started_at: String,
        surge_ended_at: String,
        /// `(seconds, clients reconnected)`, thinned.
        curve: Vec<(f64, u64)>,
    }

    struct ReportInput<'a> {
        mode: Mode,
        run_id: &'a str,
        region: &'a str,
        deadline_secs: u64,
        pool: usize,
        outcomes: &'a [ClientOutcome],
        responses: Responses,
        surge_duration_secs: f64,
        postgres: Option<PgDelta>,
        started: SystemTime,
        ended: SystemTime,
    }

    fn build_report(input: ReportInput<'_>) -> SurgeReport {
        let n = input.outcomes.len();
        let mut times = Vec::new();
        let mut latencies = Vec::new();
        let mut retries = Vec::with_capacity(n);
        let mut landing: BTreeMap<String, u64> = BTreeMap::new();
        let mut gave_up = GaveUp::default();
        for o in input.outcomes {
            retries.push(f64::from(o.attempts.saturating_sub(1)));
            match &o.ending {
                Ending::Reconnected {
                    at_secs,
                    latency_ms,
                    region,
                } => {
                    times.push(*at_secs);
                    latencies.push(*latency_ms);
                    *landing.entry(region.clone()).or_default() += 1;
                }
                Ending::Deadline => gave_up.deadline += 1,
                Ending::OutOfRetries => gave_up.out_of_retries += 1,
                Ending::Rejected(_) => gave_up.rejected += 1,
                Ending::Crashed => gave_up.crashed += 1,
            }
        }
        times.sort_by(f64::total_cmp);
        let reconnected = times.len();
        let complete = n > 0 && reconnected == n;
        let time_to_percent_secs = [50_u32, 90, 99, 100]
            .iter()
            .map(|p| {
                (
                    p.to_string(),
                    time_to_reach(&times, n, f64::from(*p) / 100.0).map(round3),
                )
            })
            .collect();
        SurgeReport {
            mode: input.mode,
            run_id: input.run_id.to_owned(),
            clients: n,
            region: input.region.to_owned(),
            deadline_secs: input.deadline_secs,
            max_retries_per_client: input.mode.max_retries(),
            pool: input.pool,
            reconnected,
            reconnected_percent: if n == 0 {
                0.0
            } else {
                100.0 * reconnected as f64 / n as f64
            },
            complete,
            time_to_all_secs: if complete {
                times.last().copied().map(round3)
            } else {
                None
            },
            time_to_percent_secs,
            surge_duration_secs: round3(input.surge_duration_secs),
            latency_ms: summarize(&latencies),
            responses: input.responses,
            gave_up,
            retries_per_client: summarize(&retries),
            landing_regions: landing,
            postgres: input.postgres,
            surge_started_at: rfc3339(input.started),
            surge_ended_at: rfc3339(input.ended),
            curve: reconnect_curve(&times, CURVE_POINTS),
        }
    }

    fn secs(v: Option<f64>) -> String {
        v.map_or_else(|| "never".to_owned(), |s| format!("{s:.3} s"))
    }

    /// The human-readable report.
    fn render_report(r: &SurgeReport, command_line: &str, files: &[String]) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\nKeenVPN Edge reconnect surge: mode {}, {} clients, region {} marked down",
            r.mode.name(),
            r.clients,
            r.region
        );
        if let Some(t) = r.time_to_all_secs {
            let _ = writeln!(
                o,
                "  reconnected          {} / {} (100%) in {t:.3} s",
                r.reconnected, r.clients
            );
        } else {
            let _ = writeln!(
                o,
                "  reconnected          {} / {} ({:.2}%) by the end ({:.1} s; deadline {} s)",
                r.reconnected,
                r.clients,
                r.reconnected_percent,
                r.surge_duration_secs,
                r.deadline_secs
            );
        }
        let p = |k: &str| secs(r.time_to_percent_secs.get(k).copied().flatten());
        let _ = writeln!(
            o,
            "  time to reconnect    50%: {}   90%: {}   99%: {}   100%: {}",
            p("50"),
            p("90"),
            p("99"),
            p("100")
        );
        match &r.latency_ms {
            Some(l) => {
                let _ = writeln!(
                    o,
                    "  connect latency      p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (successful requests)",
                    l.p50, l.p90, l.p99, l.max
                );
            }
            None => {
                let _ = writeln!(o, "  connect latency      no successful request");
            }
        }
        let s = &r.responses;
        let _ = writeln!(
            o,
            "  responses            2xx {}   429 {}   503 {}   other 5xx {}   other 4xx {}   transport errors {}   bad bodies {}",
            s.ok + s.ok_in_dead_region,
            s.status_429,
            s.status_503,
            s.status_5xx_other,
            s.status_4xx_other,
            s.transport_errors,
            s.bad_bodies
        );
        if let Some(rt) = &r.retries_per_client {
            let _ = writeln!(
                o,
                "  retries per client   mean {:.2}   p99 {}   max {}   (at most {} retries each)",
                rt.mean, rt.p99, rt.max, r.max_retries_per_client
            );
        }
        let g = &r.gave_up;
        if g.deadline + g.out_of_retries + g.rejected + g.crashed > 0 {
            let _ = writeln!(
                o,
                "  not reconnected      deadline {}   out of retries {}   rejected {}   crashed {}",
                g.deadline, g.out_of_retries, g.rejected, g.crashed
            );
        }
        let landing = r
            .landing_regions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "  landing regions      {}",
            if landing.is_empty() { "none" } else { &landing }
        );
        if s.ok_in_dead_region > 0 {
            let _ = writeln!(
                o,
                "  NOTE                 {} of the 2xx placed the client in the dead region {} (retried as failures)",
                s.ok_in_dead_region, r.region
            );
        }
        match &r.postgres {
            Some(pg) => {
                let _ = writeln!(
                    o,
                    "  PostgreSQL           {} transactions during the surge (the tool's own {} subtracted; includes the admin call that marks the region down)",
                    pg.transactions, pg.own_transactions_subtracted
                );
                if pg.autovacuum_runs > 0 {
                    let _ = writeln!(
                        o,
                        "                       including {} autovacuum/autoanalyze runs that fell in the window",
                        pg.autovacuum_runs
                    );
                }
                if pg.tables.is_empty() {
                    let _ = writeln!(o, "                       no table counters moved");
                } else {
                    let _ = writeln!(
                        o,
                        "                       {:<28} {:>10} {:>10} {:>10} {:>10}",
                        "table", "scans", "inserted", "updated", "deleted"
                    );
                    for (name, t) in &pg.tables {
                        let _ = writeln!(
                            o,
                            "                       {name:<28} {:>10} {:>10} {:>10} {:>10}",
                            t.scans, t.inserted, t.updated, t.deleted
                        );
                    }
                }
            }
            None => {
                let _ = writeln!(o, "  PostgreSQL           statistics unavailable");
            }
        }
        let _ = writeln!(
            o,
            "  surge                {} to {}",
            r.surge_started_at, r.surge_ended_at
        );
        let _ = writeln!(
            o,
            "  users                surge-{}-<i>@{EMAIL_DOMAIN}",
            r.run_id
        );
        let _ = writeln!(o, "  command              {command_line}");
        if !files.is_empty() {
            let _ = writeln!(o, "  files                {}", files.join(", "));
        }
        o
    }

    // ----------------------------------------------------------------------
    // The chart
    // ----------------------------------------------------------------------

    struct ChartSeries {
        label: String,
        color: String,
        /// `(seconds, reconnected)`, increasing.
        points: Vec<(f64, u64)>,
        /// Where the curve ends (the surge's end).
        end_secs: f64,
        reconnected: u64,
        time_to_all_secs: Option<f64>,
    }

    impl ChartSeries {
        fn of(r: &SurgeReport) -> ChartSeries {
            ChartSeries {
                label: r.mode.name().to_owned(),
                color: r.mode.color().to_owned(),
                points: r.curve.clone(),
                end_secs: r.surge_duration_secs,
                reconnected: r.reconnected as u64,
                time_to_all_secs: r.time_to_all_secs,
            }
        }
    }

    /// A "nice" tick step (1, 2 or 5 times a power of ten) giving about
    /// `target` intervals up to `max`, and never below `min_step`.
    fn nice_step(max: f64, target: usize, min_step: f64) -> f64 {
        let raw = if max.is_finite() && max > 0.0 {
            max / target.max(1) as f64
        } else {
            1.0
        };
        let mag = 10_f64.powf(raw.log10().floor());
        let r = raw / mag;
        let nice = if r <= 1.0 {
            1.0
        } else if r <= 2.0 {
            2.0
        } else if r <= 5.0 {
            5.0
        } else {
            10.0
        };
        (nice * mag).max(min_step)
    }

    /// Ticks 0, step, 2·step, ... up to the first at or above `max`.
    fn nice_ticks(max: f64, target: usize, min_step: f64) -> (f64, Vec<f64>) {
        let step = nice_step(max, target, min_step);
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            step
        };
        let count = (max / step - 1e-9).ceil().max(1.0) as usize;
        (step, (0..=count).map(|i| i as f64 * step).collect())
    }

    /// A tick label with as many decimals as the step needs.
    fn fmt_tick(v: f64, step: f64) -> String {
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10().floor()) as usize
        };
        format!("{v:.decimals$}")
    }

    fn xml_escape(s: &str) -> String {
        let mut o = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '&' => o.push_str("&amp;"),
                '<' => o.push_str("&lt;"),
                '>' => o.push_str("&gt;"),
                '"' => o.push_str("&quot;"),
                '\'' => o.push_str("&apos;"),
                _ => o.push(c),
            }
        }
        o
    }

    /// Reconnected clients over time, one curve per series: a self-contained
    /// SVG document.
    fn render_chart(title: &str, subtitle: &str, total: u64, series: &[ChartSeries]) -> String {
        const W: f64 = 960.0;
        const H: f64 = 560.0;
        const LEFT: f64 = 90.0;
        const RIGHT: f64 = 40.0;
        const TOP: f64 = 100.0;
        const BOTTOM: f64 = 70.0;
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;

        let x_data = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0).chain([s.end_secs]))
            .filter(|v| v.is_finite())
            .fold(0.0_f64, f64::max);
        let (x_step, x_ticks) = nice_ticks(x_data.max(0.001), 10, 0.0);
        let x_max = x_ticks.last().copied().unwrap_or(1.0);
        let (y_step, y_ticks) = nice_ticks(total.max(1) as f64, 5, 1.0);
        let y_max = y_ticks.last().copied().unwrap_or(1.0);
        let sx = |t: f64| LEFT + t.clamp(0.0, x_max) / x_max * pw;
        let sy = |c: f64| TOP + ph - c.clamp(0.0, y_max) / y_max * ph;

        let mut o = String::new();
        let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(o, "  <title>{}</title>", xml_escape(title));
        let _ = writeln!(
            o,
            r##"  <rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            o,
            r##"  <text x="{}" y="32" text-anchor="middle" font-size="20" font-weight="bold" fill="#222222">{}</text>"##,
            W / 2.0,
            xml_escape(title)
        );
        let _ = writeln!(
            o,
            r##"  <text x="{}" y="54" text-anchor="middle" font-size="13" fill="#555555">{}</text>"##,
            W / 2.0,
            xml_escape(subtitle)
        );

        // Grid and tick labels.
        let _ = writeln!(o, r##"  <g stroke="#e6e6e6" stroke-width="1">"##);
        for t in &x_ticks {
            let x = sx(*t);
            let _ = writeln!(
                o,
                r#"    <line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}"/>"#,
                TOP + ph
            );
        }
        for c in &y_ticks {
            let y = sy(*c);
            let _ = writeln!(
                o,
                r#"    <line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
                LEFT + pw
            );
        }
        let _ = writeln!(o, "  </g>");
        let _ = writeln!(o, r##"  <g font-size="12" fill="#333333">"##);
        for t in &x_ticks {
            let _ = writeln!(
                o,
                r#"    <text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                sx(*t),
                TOP + ph + 20.0,
                fmt_tick(*t, x_step)
            );
        }
        for c in &y_ticks {
            let _ = writeln!(
                o,
                r#"    <text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 10.0,
                sy(*c) + 4.0,
                fmt_tick(*c, y_step)
            );
        }
        let _ = writeln!(o, "  </g>");

        // Axes and their labels.
        let _ = writeln!(
            o,
            r##"  <path d="M {LEFT:.1} {TOP:.1} V {:.1} H {:.1}" fill="none" stroke="#222222" stroke-width="1.5"/>"##,
            TOP + ph,
            LEFT + pw
        );
        let _ = writeln!(
            o,
            r##"  <text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" fill="#222222">seconds since the region was marked down</text>"##,
            LEFT + pw / 2.0,
            H - 20.0
        );
        let _ = writeln!(
            o,
            r##"  <text x="22" y="{:.1}" text-anchor="middle" font-size="14" fill="#222222" transform="rotate(-90 22 {:.1})">clients reconnected</text>"##,
            TOP + ph / 2.0,
            TOP + ph / 2.0
        );

        // Everyone back.
        let y_all = sy(total as f64);
        let _ = writeln!(
            o,
            r##"  <line x1="{LEFT:.1}" y1="{y_all:.1}" x2="{:.1}" y2="{y_all:.1}" stroke="#888888" stroke-width="1" stroke-dasharray="6 4"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            o,
            r##"  <text x="{:.1}" y="{:.1}" text-anchor="end" font-size="12" fill="#666666">all {total} clients</text>"##,
            LEFT + pw - 4.0,
            y_all - 6.0
        );

        // The curves: steps up at each reconnect, flat to the surge's end.
        for s in series {
            let mut d = format!("M {:.2} {:.2}", sx(0.0), sy(0.0));
            let mut prev = 0_u64;
            for (t, c) in &s.points {
                let _ = write!(
                    d,
                    " L {:.2} {:.2} L {:.2} {:.2}",
                    sx(*t),
                    sy(prev as f64),
                    sx(*t),
                    sy(*c as f64)
                );
                prev = *c;
            }
            let last_t = s.points.last().map_or(0.0, |p| p.0);
            let _ = write!(
                d,
                " L {:.2} {:.2}",
                sx(s.end_secs.max(last_t)),
                sy(prev as f64)
            );
            let _ = writeln!(
                o,
                r#"  <path d="{d}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"/>"#,
                xml_escape(&s.color)
            );
        }

        // Legend, above the plot.
        let mut lx = LEFT;
        for s in series {
            let text = match s.time_to_all_secs {
                Some(t) => format!("{}: all {total} back in {t:.1} s", s.label),
                None => format!(
                    "{}: {:.1}% back by {:.0} s",
                    s.label,
                    if total == 0 {
                        0.0
                    } else {
                        100.0 * s.reconnected as f64 / total as f64
                    },
                    s.end_secs
                ),
            };
            let ly = TOP - 22.0;
            let _ = writeln!(
                o,
                r#"  <line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/>"#,
                lx + 24.0,
                xml_escape(&s.color)
            );
            let _ = writeln!(
                o,
                r##"  <text x="{:.1}" y="{:.1}" font-size="13" fill="#222222">{}</text>"##,
                lx + 30.0,
                ly + 4.0,
                xml_escape(&text)
            );
            lx += 40.0 + 7.5 * text.chars().count() as f64;
        }
        let _ = writeln!(o, "</svg>");
        o
    }

    // ----------------------------------------------------------------------
    // Machine description, for the JSON
    // ----------------------------------------------------------------------

    fn proc_field(path: &str, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    }

    fn machine() -> Value {
        let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
        let git = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        json!({
            "hostname": read("/proc/sys/kernel/hostname"),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "kernel": read("/proc/sys/kernel/osrelease"),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "cpu_model": proc_field("/proc/cpuinfo", "model name"),
            "memory_total": proc_field("/proc/meminfo", "MemTotal"),
            "git_commit": git,
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "tool_version": env!("CARGO_PKG_VERSION"),
        })
    }

    // ----------------------------------------------------------------------
    // Talking to the stack
    // ----------------------------------------------------------------------

    type Fail = String;

    /// The context every phase needs.
    struct Stack {
        base: String,
        http: reqwest::Client,
        admin_token: String,
        keys: KeySet,
    }

    fn http_error(base: &str, e: &reqwest::Error) -> String {
        if e.is_connect() {
            format!(
                "cannot reach the KeenVPN stack at {base} ({e}): start it with `make dev` (or pass --base-url)"
            )
        } else if e.is_timeout() {
            format!("the stack at {base} did not answer in time ({e})")
        } else {
            format!("request to {base} failed: {e}")
        }
    }

    fn http_client(in_flight: usize) -> Result<reqwest::Client, Fail> {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(in_flight)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("keenvpn-surge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// First bytes of a body, for error messages.
    fn excerpt(body: &[u8]) -> String {
        let s = String::from_utf8_lossy(body);
        let s = s.trim();
        if s.chars().count() > 300 {
            format!("{}...", s.chars().take(300).collect::<String>())
        } else {
            s.to_owned()
        }
    }

    impl Stack {
        async fn preflight(&self, region: &str) -> Result<Vec<Value>, Fail> {
            let url = format!("{}/healthz", self.base);
            let r = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| http_error(&self.base, &e))?;
            if !r.status().is_success() {
                return Err(format!(
                    "{url} answered {}: is the stack healthy? (`make dev`)",
                    r.status()
                ));
            }
            let url = format!("{}/v1/regions", self.base);
            let r = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| http_error(&self.base, &e))?;
            let status = r.status();
            let body = r.bytes().await.map_err(|e| http_error(&self.base, &e))?;
            if !status.is_success() {
                return Err(format!(
                    "GET {url} answered {status}: {} (does this build serve the regions API?)",
                    excerpt(&body)
                ));
            }
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| format!("GET {url}: not the expected JSON ({e})"))?;
            let regions = v["regions"]
                .as_array()
                .cloned()
                .ok_or_else(|| format!("GET {url}: no `regions` array"))?;
            if !regions.iter().any(|r| r["id"] == region) {
                let ids: Vec<&str> = regions.iter().filter_map(|r| r["id"].as_str()).collect();
                return Err(format!(
                    "there is no region {region:?}; the catalogue has: {}",
                    ids.join(", ")
                ));
            }
            Ok(regions)
        }

        /// `PUT /v1/admin/regions/{id}` with `{health}`.
        async fn set_health(&self, region: &str, health: &str) -> Result<(), Fail> {
            self.put_region(region, json!({ "health": health })).await
        }

        /// `PUT /v1/admin/regions/{id}` with `{admission_rate}`.
        async fn set_rate(&self, region: &str, rate: u32) -> Result<(), Fail> {
            self.put_region(region, json!({ "admission_rate": rate }))
                .await
        }

        async fn put_region(&self, region: &str, change: Value) -> Result<(), Fail> {
            let url = format!("{}/v1/admin/regions/{region}", self.base);
            let r = self
                .http
                .put(&url)
                .bearer_auth(&self.admin_token)
                .json(&change)
                .send()
                .await
                .map_err(|e| http_error(&self.base, &e))?;
            let status = r.status();
            if status.is_success() {
                return Ok(());
            }
            let body = r.bytes().await.unwrap_or_default();
            let hint = match status.as_u16() {
                401 | 403 => {
                    " (the admin token was refused: check ADMIN_TOKEN in .dev.vars or --admin-token)"
                }
                404 => " (unknown region, or this build has no admin API yet)",
                _ => "",
            };
            Err(format!(
                "PUT {url} {change} answered {status}{hint}: {}",
                excerpt(&body)
            ))
        }

        /// A POST that honours 429/503/5xx and transport errors with the
        /// recommended backoff; returns the status and body of the first other
        /// answer. With an `Idempotency-Key`, a retry of a request whose answer
        /// was lost gets that answer instead of a conflict, and "still in
        /// flight" (409 `idempotency_key_in_flight`) is retried too.
        async fn post_patiently(
            &self,
            url: &str,
            token: &str,
            body: &Value,
            idempotency_key: Option<&str>,
        ) -> Result<(u16, Vec<u8>), Fail> {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut request = self.http.post(url).bearer_auth(token).json(body);
                if let Some(key) = idempotency_key {
                    request = request.header("idempotency-key", key);
                }
                let (retry_after, last) = match request.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let retry_after = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_retry_after);
                        let bytes = r.bytes().await.unwrap_or_default();
                        let in_flight = status == 409
                            && serde_json::from_slice::<Value>(&bytes)
                                .is_ok_and(|v| v["code"] == "idempotency_key_in_flight");
                        match classify(status) {
                            Class::Connected | Class::Rejected if !in_flight => {
                                return Ok((status, bytes.to_vec()));
                            }
                            _ => (
                                retry_after,
                                format!("answered {status}: {}", excerpt(&bytes)),
                            ),
                        }
                    }
                    Err(e) if e.is_connect() && attempt == 1 => {
                        return Err(http_error(&self.base, &e));
                    }
                    Err(e) => (None, http_error(&self.base, &e)),
                };
                if attempt >= SETUP_MAX_ATTEMPTS {
                    return Err(format!("POST {url}: {last} ({attempt} attempts)"));
                }
                let delay = backoff::delay_ms(&RECOMMENDED, attempt - 1, retry_after, random_u64());
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
        }
    }

    // ----------------------------------------------------------------------
    // Provisioning
    // ----------------------------------------------------------------------

    struct SurgeUser {
        id: String,
        sid: String,
        token: String,
        device_id: String,
    }

    fn phase(msg: &str) {
        eprintln!("surge: {msg}");
    }

    fn bar(len: usize, what: &str) -> ProgressBar {
        let pb = ProgressBar::new(len as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "  {prefix:<30} [{bar:40.cyan/blue}] {pos}/{len} {rate:>10} {elapsed:>5} {msg}",
            )
            .expect("a valid progress template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}/s", state.per_sec());
                },
            )
            .progress_chars("=> "),
        );
        pb.set_prefix(what.to_owned());
        pb
    }

    /// Inserts `n` users with an active `plus` subscription each, in a few
    /// multi-row statements; every inserted id is pushed to `created` at once
    /// so that a failure half way still cleans up.
    async fn insert_users(
        db: &tokio_postgres::Client,
        run_id: &str,
        n: usize,
        phc: &str,
        created: &mut Vec<String>,
    ) -> Result<(), Fail> {
        let pb = bar(n, "users + subscriptions");
        let mut next = 0;
        while next < n {
            let end = (next + INSERT_CHUNK).min(n);
            let emails: Vec<String> = (next..end)
                .map(|i| format!("surge-{run_id}-{i}@{EMAIL_DOMAIN}"))
                .collect();
            let rows = db
                .query(
                    "WITH u AS (
                         INSERT INTO users (email, password_hash)
                         SELECT e, $2 FROM unnest($1::text[]) AS e
                         RETURNING id
                     ), s AS (
                         INSERT INTO subscriptions (user_id, plan_id, status, current_period_end)
                         SELECT id, $3, 'active', now() + interval '30 days' FROM u
                     )
                     SELECT id::text FROM u",
                    &[&emails, &phc, &PLAN],
                )
                .await
                .map_err(|e| format!("inserting users: {}", pg_error(&e)))?;
            for row in rows {
                created.push(row.get(0));
            }
            pb.inc((end - next) as u64);
            next = end;
        }
        pb.finish();
        Ok(())
    }

    async fn delete_users(db: &tokio_postgres::Client, ids: &[String]) -> Result<u64, Fail> {
        let mut deleted = 0;
        for chunk in ids.chunks(INSERT_CHUNK) {
            let chunk = chunk.to_vec();
            deleted += db
                .execute(
                    "DELETE FROM users WHERE id = ANY($1::text[]::uuid[])",
                    &[&chunk],
                )
                .await
                .map_err(|e| pg_error(&e))?;
        }
        Ok(deleted)
    }

    fn pg_error(e: &tokio_postgres::Error) -> String {
        match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(cause) = src {
                    let _ = write!(s, ": {cause}");
                    src = cause.source();
                }
                s
            }
        }
    }

    /// Registers one device per user through the API.
    async fn register_devices(
        stack: &Stack,
        users: &mut [SurgeUser],
        run_id: &str,
        concurrency: usize,
    ) -> Result<(), Fail> {
        let pb = bar(users.len(), "devices (POST /v1/devices)");
        let url = format!("{}/v1/devices", stack.base);
        let results: Vec<(usize, Result<String, Fail>)> =
            futures::stream::iter(users.iter().enumerate())
                .map(|(i, u)| {
                    let (url, pb) = (&url, &pb);
                    async move {
                        // A WireGuard public key: the top bit is clear.
                        let mut key = random_bytes::<32>();
                        key[31] &= 0x7f;
                        let key = STANDARD.encode(key);
                        let body =
                            json!({ "name": format!("surge {run_id} {i}"), "public_key": key });
                        let idempotency_key = format!("surge-{run_id}-{i}");
                        let r = match stack
                            .post_patiently(url, &u.token, &body, Some(&idempotency_key))
                            .await
                        {
                            Ok((201 | 200, bytes)) => serde_json::from_slice::<Value>(&bytes)
                                .ok()
                                .and_then(|v| v["id"].as_str().map(str::to_owned))
                                .ok_or_else(|| {
                                    format!("POST {url}: no device id in {}", excerpt(&bytes))
                                }),
                            Ok((status, bytes)) => {
                                Err(format!("POST {url} answered {status}: {}", excerpt(&bytes)))
                            }
                            Err(e) => Err(e),
                        };
                        pb.inc(1);
                        (i, r)
                    }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await;
        pb.finish();
        let mut failures = 0;
        let mut first = None;
        for (i, r) in results {
            match r {
                Ok(id) => users[i].device_id = id,
                Err(e) => {
                    failures += 1;
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(format!(
                "{failures} of {} device registrations failed; the first: {e}",
                users.len()
            )),
        }
    }

    /// Connects every client once to `region`, so that all start there.
    async fn connect_all(
        stack: &Stack,
        users: &[SurgeUser],
        region: &str,
        concurrency: usize,
    ) -> Result<(), Fail> {
        let pb = bar(users.len(), &format!("initial connect ({region})"));
        let url = format!("{}/v1/connect", stack.base);
        let results: Vec<Result<String, Fail>> = futures::stream::iter(users)
            .map(|u| {
                let (url, pb) = (&url, &pb);
                async move {
                    let body = json!({ "device_id": u.device_id, "region": region });
                    let r = match stack.post_patiently(url, &u.token, &body, None).await {
                        Ok((200, bytes)) => serde_json::from_slice::<Value>(&bytes)
                            .ok()
                            .and_then(|v| v["region"].as_str().map(str::to_owned))
                            .ok_or_else(|| format!("POST {url}: no region in {}", excerpt(&bytes))),
                        Ok((status, bytes)) => {
                            Err(format!("POST {url} answered {status}: {}", excerpt(&bytes)))
                        }
                        Err(e) => Err(e),
                    };
                    pb.inc(1);
                    r
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        pb.finish();
        let mut elsewhere = 0;
        let mut failures = 0;
        let mut first = None;
        for r in results {
            match r {
                Ok(landed) if landed == region => {}
                Ok(_) => elsewhere += 1,
                Err(e) => {
                    failures += 1;
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(format!(
                "{failures} of {} initial connects failed; the first: {e}",
                users.len()
            ));
        }
        if elsewhere > 0 {
            phase(&format!(
                "note: the server placed {elsewhere} clients outside {region} although it is up; \
                 in the surge they too ask for {region}"
            ));
        }
        Ok(())
    }

    /// How to read PostgreSQL's cumulative statistics reliably.
    ///
    /// A backend counts locally and publishes now and then; a snapshot must
    /// wait until every backend has published, and must know exactly how many
    /// of the transactions it sees are the tool's own. With PostgreSQL 15 or
    /// later each snapshot first makes this backend publish everything it has
    /// pending (`pg_stat_force_next_flush`, effective before the statement's
    /// answer arrives), then waits out the other backends' idle timer, then
    /// reads everything in one transaction. Between two reads the tool's own
    /// transactions are then exactly two: the first snapshot's read and the
    /// second's flush request.
    struct PgStats {
        force_flush: bool,
        settle: Duration,
    }

    impl PgStats {
        async fn detect(db: &tokio_postgres::Client) -> PgStats {
            let version = db
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_or(0, |r| r.get::<_, i32>(0));
            if version >= 150_000 {
                PgStats {
                    force_flush: true,
                    settle: STATS_SETTLE_PG15,
                }
            } else {
                PgStats {
                    force_flush: false,
                    settle: STATS_SETTLE_OLD,
                }
            }
        }

        /// The tool's own transactions between two snapshots' reads.
        fn own_between(&self) -> i64 {
            if self.force_flush { 2 } else { 1 }
        }

        /// Database-wide transactions and per-table counters.
        async fn snapshot(&self, db: &mut tokio_postgres::Client) -> Result<PgSnapshot, Fail> {
            if self.force_flush {
                db.batch_execute(FORCE_FLUSH)
                    .await
                    .map_err(|e| pg_error(&e))?;
            }
            tokio::time::sleep(self.settle).await;
            read_pg_stats(db).await
        }
    }

    /// Reads the counters in one transaction.
    async fn read_pg_stats(db: &mut tokio_postgres::Client) -> Result<PgSnapshot, Fail> {
        let tx = db.transaction().await.map_err(|e| pg_error(&e))?;
        let row = tx
            .query_one(
                "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
                 WHERE datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        let transactions: i64 = row.get(0);
        let maintenance: i64 = tx
            .query_one(
                "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::bigint
                 FROM pg_stat_all_tables",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?
            .get(0);
        let rows = tx
            .query(
                "SELECT CASE WHEN schemaname = 'public' THEN relname::text
                             ELSE schemaname || '.' || relname END,
                        (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::bigint,
                        n_tup_ins::bigint, n_tup_upd::bigint, n_tup_del::bigint
                 FROM pg_stat_user_tables",
                &[],
            )
            .await
            .map_err(|e| pg_error(&e))?;
        tx.commit().await.map_err(|e| pg_error(&e))?;
        let tables = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    TableStats {
                        scans: r.get(1),
                        inserted: r.get(2),
                        updated: r.get(3),
                        deleted: r.get(4),
                    },
                )
            })
            .collect();
        Ok(PgSnapshot {
            transactions,
            maintenance,
            tables,
        })
    }

    // ----------------------------------------------------------------------
    // The surge
    // ----------------------------------------------------------------------

    /// Bounds the requests in flight (the shared client's connection pool).
    struct Pool {
        permits: futures::lock::Mutex<mpsc::UnboundedReceiver<()>>,
        giver: mpsc::UnboundedSender<()>,
    }

    struct Permit<'a>(&'a mpsc::UnboundedSender<()>);

    impl Drop for Permit<'_> {
        fn drop(&mut self) {
            let _ = self.0.unbounded_send(());
        }
    }

    impl Pool {
        fn new(size: usize) -> Pool {
            let (giver, permits) = mpsc::unbounded();
            for _ in 0..size {
                let _ = giver.unbounded_send(());
            }
            Pool {
                permits: futures::lock::Mutex::new(permits),
                giver,
            }
        }

        async fn acquire(&self) -> Permit<'_> {
            let mut permits = self.permits.lock().await;
            // Never `None`: `self.giver` keeps the channel open.
            let _ = permits.next().await;
            Permit(&self.giver)
        }
    }

    struct Shared {
        http: reqwest::Client,
        url: String,
        region: String,
        /// The dead region's coordinates: its clients are around it.
        origin: (f64, f64),
        mode: Mode,
        deadline: Duration,
        pool: Pool,
        counters: Counters,
        reconnected: ProgressBar,
    }

    /// Aborts its tasks if the surge is abandoned (Ctrl-C, an error).
    struct Tasks<T>(Vec<tokio::task::JoinHandle<T>>);

    impl<T> Drop for Tasks<T> {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }

    enum Answer {
        Connected(String),
        /// Retry after at least this many seconds, perhaps in one of these regions.
        Retry(Option<u32>, Vec<String>),
        Rejected(u16),
    }

    /// Where a client is: within about 3 degrees of the dead region, spread
    /// deterministically by its device id (clients of a region live near it).
    /// Sent as the development-only location header the worker honours locally.
    fn client_location(origin: (f64, f64), device_id: &str) -> String {
        let h = keenvpn_edge::domain::placement::stable_hash(device_id, "surge-location");
        let offset = |bits: u64| (bits % 601) as f64 / 100.0 - 3.0;
        let lat = (origin.0 + offset(h)).clamp(-89.0, 89.0);
        let lon = (origin.1 + offset(h >> 32) + 180.0).rem_euclid(360.0) - 180.0;
        format!("{lat:.4},{lon:.4}")
    }

    async fn one_attempt(
        sh: &Shared,
        user: &SurgeUser,
        target: &str,
        deadline_at: Instant,
    ) -> Answer {
        let c = &sh.counters;
        let timeout = deadline_at
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), REQUEST_TIMEOUT);
        let sent = sh
            .http
            .post(&sh.url)
            .bearer_auth(&user.token)
            .timeout(timeout)
            .header(
                "x-keenvpn-client-location",
                client_location(sh.origin, &user.device_id),
            )
            .json(&json!({ "device_id": user.device_id, "region": target }))
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(_) => {
                c.transport.fetch_add(1, Ordering::Relaxed);
                return Answer::Retry(None, Vec::new());
            }
        };
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match r.bytes().await {
            Ok(b) => b,
            Err(_) => {
                c.transport.fetch_add(1, Ordering::Relaxed);
                return Answer::Retry(None, Vec::new());
            }
        };
        match classify(status) {
            Class::Connected => {
                let region = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["region"].as_str().map(str::to_owned));
                match region {
                    // Steered into the dead region: the tunnel would fail.
                    Some(region) if region == sh.region => {
                        c.ok_dead.fetch_add(1, Ordering::Relaxed);
                        Answer::Retry(None, Vec::new())
                    }
                    Some(region) => {
                        c.ok.fetch_add(1, Ordering::Relaxed);
                        Answer::Connected(region)
                    }
                    None => {
                        c.bad_bodies.fetch_add(1, Ordering::Relaxed);
                        Answer::Retry(None, Vec::new())
                    }
                }
            }
            Class::Throttled => {
                c.s429.fetch_add(1, Ordering::Relaxed);
                Answer::Retry(retry_after, failover(&body))
            }
            Class::Unavailable => {
                c.s503.fetch_add(1, Ordering::Relaxed);
                Answer::Retry(retry_after, failover(&body))
            }
            Class::ServerError => {
                c.s5xx.fetch_add(1, Ordering::Relaxed);
                Answer::Retry(retry_after, Vec::new())
            }
            Class::Rejected => {
                c.s4xx.fetch_add(1, Ordering::Relaxed);
                Answer::Rejected(status)
            }
        }
    }

    /// The `failover` regions of a 429/503 problem body.
    fn failover(body: &[u8]) -> Vec<String> {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v["failover"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// One client: reconnect to the dead region (the server steers it), and
    /// retry as its mode says until it is back, out of retries or past the
    /// deadline. Under the policy, a client refused twice in a row moves on to
    /// the failover regions the server offered, one after another; a naive
    /// client keeps asking for the same thing.
    async fn reconnect(
        sh: Arc<Shared>,
        users: Arc<Vec<SurgeUser>>,
        i: usize,
        start: Instant,
    ) -> ClientOutcome {
        let user = &users[i];
        let deadline_at = start + sh.deadline;
        let max_retries = sh.mode.max_retries();
        let mut attempts = 0_u32;
        let mut target = sh.region.clone();
        let (mut refused_in_a_row, mut switches) = (0_u32, 0_usize);
        loop {
            let permit = match tokio::time::timeout_at(deadline_at.into(), sh.pool.acquire()).await
            {
                Ok(p) => p,
                Err(_) => {
                    return ClientOutcome {
                        attempts,
                        ending: Ending::Deadline,
                    };
                }
            };
            attempts += 1;
            let sent = Instant::now();
            let answer = one_attempt(&sh, user, &target, deadline_at).await;
            let latency = sent.elapsed();
            drop(permit);
            let retry_after = match answer {
                Answer::Connected(region) => {
                    sh.reconnected.inc(1);
                    return ClientOutcome {
                        attempts,
                        ending: Ending::Reconnected {
                            at_secs: start.elapsed().as_secs_f64(),
                            latency_ms: latency.as_secs_f64() * 1000.0,
                            region,
                        },
                    };
                }
                Answer::Rejected(status) => {
                    return ClientOutcome {
                        attempts,
                        ending: Ending::Rejected(status),
                    };
                }
                Answer::Retry(retry_after, failover) => {
                    refused_in_a_row += 1;
                    if sh.mode == Mode::Policy && refused_in_a_row >= 2 && !failover.is_empty() {
                        target = failover[switches % failover.len()].clone();
                        switches += 1;
                        refused_in_a_row = 0;
                    }
                    retry_after
                }
            };
            // Retries made so far, which is also the 0-based index of the next.
            let retries = attempts - 1;
            if retries >= max_retries {
                return ClientOutcome {
                    attempts,
                    ending: Ending::OutOfRetries,
                };
            }
            let delay = retry_delay_ms(sh.mode, retries, retry_after, random_u64());
            let wake = Instant::now().checked_add(Duration::from_millis(delay));
            let Some(wake) = wake.filter(|w| *w < deadline_at) else {
                return ClientOutcome {
                    attempts,
                    ending: Ending::Deadline,
                };
            };
            tokio::time::sleep_until(wake.into()).await;
        }
    }

    struct SurgeRun {
        outcomes: Vec<ClientOutcome>,
        responses: Responses,
        duration_secs: f64,
        started: SystemTime,
        ended: SystemTime,
    }

    /// The coordinates of `region`, from the public catalogue.
    async fn region_origin(stack: &Stack, region: &str) -> Result<(f64, f64), Fail> {
        let url = format!("{}/v1/regions", stack.base);
        let body: Value = async { stack.http.get(&url).send().await?.json().await }
            .await
            .map_err(|e| format!("cannot read the region catalogue: {e}"))?;
        body["regions"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["id"] == region))
            .and_then(|r| Some((r["latitude"].as_f64()?, r["longitude"].as_f64()?)))
            .ok_or_else(|| format!("region {region} has no coordinates in the catalogue"))
    }

    async fn surge(
        stack: &Stack,
        args: &Args,
        mode: Mode,
        users: Arc<Vec<SurgeUser>>,
    ) -> Result<SurgeRun, Fail> {
        let n = users.len();
        let http = http_client(args.pool)?;
        let pb = bar(n, &format!("surge ({})", mode.name()));
        let origin = region_origin(stack, &args.region).await?;
        let sh = Arc::new(Shared {
            http,
            url: format!("{}/v1/connect", stack.base),
            region: args.region.clone(),
            origin,
            mode,
            deadline: Duration::from_secs(args.deadline_secs),
            pool: Pool::new(args.pool),
            counters: Counters::default(),
            reconnected: pb.clone(),
        });

        // Every client waits for the same signal, so they all go at once.
        let (go, ready) = oneshot::channel::<Instant>();
        let ready = ready.shared();
        let mut tasks = Tasks(Vec::with_capacity(n));
        for i in 0..n {
            let (sh, users, ready) = (sh.clone(), users.clone(), ready.clone());
            tasks.0.push(tokio::spawn(async move {
                match ready.await {
                    Ok(start) => reconnect(sh, users, i, start).await,
                    Err(_) => ClientOutcome {
                        attempts: 0,
                        ending: Ending::Crashed,
                    },
                }
            }));
        }

        stack.set_health(&args.region, "down").await?;
        let start = Instant::now();
        let started = SystemTime::now();
        pb.reset_elapsed();
        let _ = go.send(start);

        // Progress: errors in the bar's message; plain lines when stderr is no terminal.
        let done = Arc::new(AtomicBool::new(false));
        let mut ticker = Tasks(Vec::with_capacity(1));
        {
            let (sh, done, pb) = (sh.clone(), done.clone(), pb.clone());
            ticker.0.push(tokio::spawn(async move {
                let mut last_line = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    let r = sh.counters.snapshot();
                    let msg = format!(
                        "429 {}  503 {}  errors {}",
                        r.status_429,
                        r.status_503,
                        sh.counters.errors()
                    );
                    if pb.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
                        eprintln!(
                            "  surge ({}) {:.0} s: {}/{} reconnected, {msg}",
                            sh.mode.name(),
                            start.elapsed().as_secs_f64(),
                            pb.position(),
                            pb.length().unwrap_or(0)
                        );
                        last_line = Instant::now();
                    }
                    pb.set_message(msg);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }

        let joined = futures::future::join_all(tasks.0.iter_mut()).await;
        let duration_secs = start.elapsed().as_secs_f64();
        let ended = SystemTime::now();
        done.store(true, Ordering::Relaxed);
        futures::future::join_all(ticker.0.iter_mut()).await;
        let responses = sh.counters.snapshot();
        pb.set_message(format!(
            "429 {}  503 {}  errors {}",
            responses.status_429,
            responses.status_503,
            sh.counters.errors()
        ));
        pb.finish();
        let outcomes = joined
            .into_iter()
            .map(|r| {
                r.unwrap_or(ClientOutcome {
                    attempts: 0,
                    ending: Ending::Crashed,
                })
            })
            .collect();
        Ok(SurgeRun {
            outcomes,
            responses,
            duration_secs,
            started,
            ended,
        })
    }

    /// One mode from start to end: provision, surge, measure. Cleanup is the
    /// caller's (it must happen even when this is interrupted).
    /// Sets every region's admission rate to `rate`; returns the previous rates.
    /// Sets every region's admission rate to `rate`, having first put the
    /// rates it had in `lowered`, so that the caller can put them back
    /// whatever happens next ([`restore_rates`]), an interruption included.
    async fn set_all_rates(
        stack: &Stack,
        db: &tokio_postgres::Client,
        rate: u32,
        lowered: &mut Vec<(String, i32)>,
    ) -> Result<(), Fail> {
        let rows = db
            .query("SELECT id, admission_rate FROM regions ORDER BY id", &[])
            .await
            .map_err(|e| format!("cannot read the regions' admission rates: {e}"))?;
        *lowered = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        phase(&format!(
            "setting every region's admission rate to {rate}/s for the surge"
        ));
        for (id, _) in lowered.iter() {
            stack.set_rate(id, rate).await?;
        }
        Ok(())
    }

    /// Puts back the admission rates [`set_all_rates`] saved in `lowered`,
    /// emptying it. A rate it cannot put back is named, with the command
    /// that does it by hand.
    async fn restore_rates(stack: &Stack, mode: Mode, lowered: &mut Vec<(String, i32)>) {
        if lowered.is_empty() {
            return;
        }
        phase(&format!(
            "[{}] restoring every region's admission rate",
            mode.name()
        ));
        for (id, rate) in lowered.drain(..) {
            let rate = rate.max(0) as u32;
            if let Err(e) = stack.set_rate(&id, rate).await {
                phase(&format!(
                    "WARNING: could not restore {id}'s admission rate to {rate}: {e}\n  \
                     restore it by hand: curl -X PUT {}/v1/admin/regions/{id} \
                     -H 'authorization: Bearer <ADMIN_TOKEN>' \
                     -H 'content-type: application/json' -d '{{\"admission_rate\":{rate}}}'",
                    stack.base
                ));
            }
        }
    }

    /// Resolves when the process is asked to stop: Ctrl-C (SIGINT) or, on
    /// Unix, SIGTERM (what `timeout` and most supervisors send), so that a
    /// run cut short still cleans up after itself.
    async fn stop_requested() -> &'static str {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                return tokio::select! {
                    _ = tokio::signal::ctrl_c() => "interrupted",
                    _ = term.recv() => "terminated",
                };
            }
        }
        let _ = tokio::signal::ctrl_c().await;
        "interrupted"
    }

    async fn run_mode(
        stack: &Stack,
        db: &mut tokio_postgres::Client,
        args: &Args,
        mode: Mode,
        (phc, stats): (&str, &PgStats),
        created: &mut Vec<String>,
        lowered: &mut Vec<(String, i32)>,
    ) -> Result<SurgeReport, Fail> {
        let run_id = format!("{}-{}", hex::encode(random_bytes::<4>()), mode.name());
        phase(&format!(
            "[{}] provisioning {} clients (emails surge-{run_id}-<i>@{EMAIL_DOMAIN})",
            mode.name(),
            args.clients
        ));
        insert_users(db, &run_id, args.clients, phc, created).await?;

        phase(&format!("[{}] minting access tokens", mode.name()));
        let now = unix_now();
        let mut users: Vec<SurgeUser> = created
            .iter()
            .map(|id| {
                let sid = hex::encode(random_bytes::<16>());
                let jitter = u32::from_le_bytes(random_bytes::<4>());
                SurgeUser {
                    token: mint_token(&stack.keys, id, &sid, now, jitter),
                    id: id.clone(),
                    sid,
                    device_id: String::new(),
                }
            })
            .collect();

        phase(&format!("[{}] registering devices", mode.name()));
        register_devices(stack, &mut users, &run_id, args.concurrency).await?;

        phase(&format!(
            "[{}] marking {} up and connecting every client to it",
            mode.name(),
            args.region
        ));
        stack.set_health(&args.region, "up").await?;
        connect_all(stack, &users, &args.region, args.concurrency).await?;

        // Fresh tokens for the surge: the full lifetime from here on.
        let now = unix_now();
        for u in &mut users {
            let jitter = u32::from_le_bytes(random_bytes::<4>());
            u.token = mint_token(&stack.keys, &u.id, &u.sid, now, jitter);
        }

        phase(&format!(
            "[{}] PostgreSQL statistics before (waiting {:.1} s for every backend to publish them)",
            mode.name(),
            stats.settle.as_secs_f64()
        ));
        let before = stats.snapshot(db).await;
        if let Err(e) = &before {
            phase(&format!("warning: cannot read PostgreSQL statistics: {e}"));
        }

        phase(&format!(
            "[{}] {} goes down: {} clients reconnect at once",
            mode.name(),
            args.region,
            args.clients
        ));
        let users = Arc::new(users);
        // Scale admission down to what this machine serves, if asked: for the
        // surge only (the clients connected above at the regions' own rates).
        if let Some(rate) = args.admission_rate {
            set_all_rates(stack, db, rate, lowered).await?;
        }
        let run = surge(stack, args, mode, users).await;
        restore_rates(stack, mode, lowered).await;
        let run = run?;

        phase(&format!(
            "[{}] PostgreSQL statistics after (waiting {:.1} s)",
            mode.name(),
            stats.settle.as_secs_f64()
        ));
        let postgres = match (before, stats.snapshot(db).await) {
            (Ok(b), Ok(a)) => Some(pg_delta(&b, &a, stats.own_between())),
            (_, Err(e)) => {
                phase(&format!("warning: cannot read PostgreSQL statistics: {e}"));
                None
            }
            _ => None,
        };

        Ok(build_report(ReportInput {
            mode,
            run_id: &run_id,
            region: &args.region,
            deadline_secs: args.deadline_secs,
            pool: args.pool,
            outcomes: &run.outcomes,
            responses: run.responses,
            surge_duration_secs: run.duration_secs,
            postgres,
            started: run.started,
            ended: run.ended,
        }))
    }

    fn write_outputs(
        args: &Args,
        report: &SurgeReport,
        command_line: &str,
        started_at: SystemTime,
    ) -> Result<Vec<String>, Fail> {
        std::fs::create_dir_all(&args.out)
            .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
        let stem = format!("{}-{}", report.mode.name(), args.clients);
        let json_path = args.out.join(format!("{stem}.json"));
        let svg_path = args.out.join(format!("{stem}.svg"));
        let doc = json!({
            "tool": "surge",
            "command_line": command_line,
            "started_at": rfc3339(started_at),
            "finished_at": rfc3339(SystemTime::now()),
            "machine": machine(),
            "settings": {
                "clients": args.clients,
                "region": args.region,
                "mode": report.mode,
                "base_url": args.base_url,
                "database_url": redact_url(&args.database_url),
                "deadline_secs": args.deadline_secs,
                "pool": args.pool,
                "provisioning_concurrency": args.concurrency,
                "policy": {
                    "base_ms": RECOMMENDED.base_ms,
                    "cap_ms": RECOMMENDED.cap_ms,
                    "max_retries": RECOMMENDED.max_attempts,
                },
                "naive": { "pause_ms": NAIVE_PAUSE_MS, "max_retries": NAIVE_MAX_RETRIES },
            },
            "report": report,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(&json_path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", json_path.display()))?;
        let svg = render_chart(
            &chart_title(&[report.mode], args.clients),
            &chart_subtitle(args),
            args.clients as u64,
            &[ChartSeries::of(report)],
        );
        std::fs::write(&svg_path, svg)
            .map_err(|e| format!("cannot write {}: {e}", svg_path.display()))?;
        Ok(vec![
            json_path.display().to_string(),
            svg_path.display().to_string(),
        ])
    }

    fn chart_title(modes: &[Mode], n: usize) -> String {
        let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
        format!(
            "Reconnect surge after a regional outage: {}, N = {n}",
            names.join(" vs ")
        )
    }

    fn chart_subtitle(args: &Args) -> String {
        let rate = args
            .admission_rate
            .map(|r| format!("; every region admits {r} clients/s"))
            .unwrap_or_default();
        format!(
            "{} marked down at t = 0; every client reconnects at once{rate}; deadline {} s",
            args.region, args.deadline_secs
        )
    }

    fn comparison(reports: &[SurgeReport]) -> String {
        let mut o = String::from("\nComparison\n");
        let _ = writeln!(
            o,
            "  {:<8} {:>12} {:>12} {:>10} {:>10} {:>10} {:>12} {:>12}",
            "mode",
            "reconnected",
            "time to 100%",
            "p99 ms",
            "429",
            "503",
            "retries p99",
            "pg xacts"
        );
        for r in reports {
            let _ = writeln!(
                o,
                "  {:<8} {:>11.2}% {:>12} {:>10} {:>10} {:>10} {:>12} {:>12}",
                r.mode.name(),
                r.reconnected_percent,
                r.time_to_all_secs
                    .map_or_else(|| "never".to_owned(), |t| format!("{t:.1} s")),
                r.latency_ms
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |l| format!("{:.1}", l.p99)),
                r.responses.status_429,
                r.responses.status_503,
                r.retries_per_client
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |s| format!("{}", s.p99)),
                r.postgres
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |p| p.transactions.to_string()),
            );
        }
        o
    }

    // ----------------------------------------------------------------------
    // main
    // ----------------------------------------------------------------------

    pub fn main() -> ExitCode {
        let argv: Vec<String> = std::env::args().collect();
        let args = match parse_args(argv.iter().skip(1).cloned()) {
            Ok(Command::Help) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Ok(Command::Run(a)) => a,
            Err(e) => {
                eprintln!("surge: {e} (try --help)");
                return ExitCode::from(2);
            }
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("surge: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(run(args, display_command_line(&argv))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("surge: {e}");
                ExitCode::FAILURE
            }
        }
    }

    async fn run(args: Args, command_line: String) -> Result<(), Fail> {
        let started_at = SystemTime::now();

        // Secrets of the development stack.
        let vars_path = find_dev_vars()?;
        let vars = std::fs::read_to_string(&vars_path)
            .map_err(|e| format!("cannot read {}: {e}", vars_path.display()))?;
        let keys_json = dev_var(&vars, "JWT_SIGNING_KEYS")
            .ok_or_else(|| format!("{} has no JWT_SIGNING_KEYS line", vars_path.display()))?;
        let keys = KeySet::parse(&keys_json).map_err(|e| {
            format!(
                "JWT_SIGNING_KEYS in {} is not usable: {e}",
                vars_path.display()
            )
        })?;
        let admin_token = match args.admin_token.clone() {
            Some(t) => t,
            None => dev_var(&vars, "ADMIN_TOKEN")
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    format!(
                        "no admin token: {} has no ADMIN_TOKEN line (pass --admin-token, or \
                         refresh .dev.vars from .dev.vars.example)",
                        vars_path.display()
                    )
                })?,
        };
        let token_life = ACCESS_TTL_SECS - MAX_JITTER_SECS;
        if args.deadline_secs as i64 > token_life - 30 {
            phase(&format!(
                "warning: access tokens live {token_life} s at least; clients still retrying \
                 after that are refused with 401 and counted as rejected"
            ));
        }

        let stack = Stack {
            base: args.base_url.clone(),
            http: http_client(args.concurrency)?,
            admin_token,
            keys,
        };
        phase(&format!("checking the stack at {}", stack.base));
        let regions = stack.preflight(&args.region).await?;
        let summary: Vec<String> = regions
            .iter()
            .map(|r| {
                format!(
                    "{} ({})",
                    r["id"].as_str().unwrap_or("?"),
                    r["health"].as_str().unwrap_or("?")
                )
            })
            .collect();
        phase(&format!("regions: {}", summary.join(", ")));

        let mut db = keenvpn_edge::db::connect(&args.database_url)
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to PostgreSQL at {} ({}): start the stack with `make dev` \
                     (or pass --database-url)",
                    redact_url(&args.database_url),
                    match e.downcast_ref::<tokio_postgres::Error>() {
                        Some(e) => pg_error(e),
                        None => e.to_string(),
                    }
                )
            })?;

        let stats = PgStats::detect(&db).await;

        phase("hashing one password with argon2id for every provisioned user");
        let password = hex::encode(random_bytes::<16>());
        let phc = password::hash(password.as_bytes(), random_bytes::<16>());

        let mut reports = Vec::new();
        let mut failure = None;
        for mode in args.mode.modes() {
            let (mut created, mut lowered) = (Vec::new(), Vec::new());
            let outcome = tokio::select! {
                r = run_mode(&stack, &mut db, &args, mode, (&phc, &stats), &mut created, &mut lowered) => r,
                why = stop_requested() => Err(why.to_owned()),
            };

            // Cleanup, whatever happened: a run cut short (an error, Ctrl-C,
            // SIGTERM) may have left the rates lowered.
            restore_rates(&stack, mode, &mut lowered).await;
            phase(&format!(
                "[{}] restoring {} to up",
                mode.name(),
                args.region
            ));
            if let Err(e) = stack.set_health(&args.region, "up").await {
                phase(&format!(
                    "WARNING: could not restore {} to up: {e}\n  restore it by hand: \
                     curl -X PUT {}/v1/admin/regions/{} -H 'authorization: Bearer <ADMIN_TOKEN>' \
                     -H 'content-type: application/json' -d '{{\"health\":\"up\"}}'",
                    args.region, stack.base, args.region
                ));
            }
            if args.keep {
                phase(&format!(
                    "[{}] keeping {} users (--keep)",
                    mode.name(),
                    created.len()
                ));
            } else if !created.is_empty() {
                match delete_users(&db, &created).await {
                    Ok(n) => phase(&format!(
                        "[{}] deleted {n} provisioned users (devices and subscriptions cascade)",
                        mode.name()
                    )),
                    Err(e) => phase(&format!(
                        "WARNING: could not delete the provisioned users: {e}; \
                         they are the users with emails like 'surge-%@{EMAIL_DOMAIN}'"
                    )),
                }
            }

            match outcome {
                Ok(report) => {
                    let files = write_outputs(&args, &report, &command_line, started_at)?;
                    print!("{}", render_report(&report, &command_line, &files));
                    reports.push(report);
                }
                Err(e) => {
                    failure = Some(format!("[{}] {e}", mode.name()));
                    break;
                }
            }
        }

        if reports.len() > 1 {
            let series: Vec<ChartSeries> = reports.iter().map(ChartSeries::of).collect();
            let modes: Vec<Mode> = reports.iter().map(|r| r.mode).collect();
            let svg = render_chart(
                &chart_title(&modes, args.clients),
                &chart_subtitle(&args),
                args.clients as u64,
                &series,
            );
            let path = args.out.join(format!("both-{}.svg", args.clients));
            std::fs::write(&path, svg)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            print!("{}", comparison(&reports));
            println!("  chart: {}", path.display());
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    // ----------------------------------------------------------------------
    // Tests
    // ----------------------------------------------------------------------

    #[cfg(test)]
    mod tests {
        use super::*;

        fn args(list: &[&str]) -> Result<Command, String> {
            parse_args(list.iter().map(|s| s.to_string()))
        }

        fn run_args(list: &[&str]) -> Args {
            match args(list) {
                Ok(Command::Run(a)) => a,
                other => panic!("{list:?} gave {other:?}"),
            }
        }

        #[test]
        fn defaults() {
            let a = run_args(&[]);
            assert_eq!(a, Args::default());
            assert_eq!(a.clients, 1000);
            assert_eq!(a.region, "eu-central");
            assert_eq!(a.base_url, "http://127.0.0.1:8787");
            assert_eq!(a.mode, ModeArg::Both);
            assert_eq!(a.deadline_secs, 600);
            assert_eq!(a.out, PathBuf::from("bench/surge"));
            assert!(!a.keep);
            assert_eq!(a.admin_token, None);
        }

        #[test]
        fn every_flag() {
            let a = run_args(&[
                "--clients",
                "10000",
                "--region=us-east",
                "--base-url",
                "http://localhost:9999/",
                "--database-url",
                "postgres://u:p@[::1]:5432/db",
                "--admin-token",
                "tok",
                "--concurrency",
                "8",
                "--pool=32",
                "--mode",
                "naive",
                "--deadline-secs",
                "30",
                "--out",
                "/tmp/x",
                "--keep",
            ]);
            assert_eq!(a.clients, 10000);
            assert_eq!(a.region, "us-east");
            assert_eq!(a.base_url, "http://localhost:9999");
            assert_eq!(a.database_url, "postgres://u:p@[::1]:5432/db");
            assert_eq!(a.admin_token.as_deref(), Some("tok"));
            assert_eq!((a.concurrency, a.pool), (8, 32));
            assert_eq!(a.mode, ModeArg::Naive);
            assert_eq!(a.mode.modes(), vec![Mode::Naive]);
            assert_eq!(ModeArg::Both.modes(), vec![Mode::Policy, Mode::Naive]);
            assert_eq!(a.deadline_secs, 30);
            assert_eq!(a.out, PathBuf::from("/tmp/x"));
            assert!(a.keep);
        }

        #[test]
        fn help_and_errors() {
            assert_eq!(args(&["--help"]), Ok(Command::Help));
            assert_eq!(args(&["--clients", "5", "-h"]), Ok(Command::Help));
            for bad in [
                &["--clients"][..],
                &["--clients", "0"],
                &["--clients", "ten"],
                &["--clients", "-3"],
                &["--mode", "fast"],
                &["--region", "EU"],
                &["--region", "eu central"],
                &["--deadline-secs", "0"],
                &["--keep=yes"],
                &["--frobnicate"],
                &["extra"],
                &["--base-url", "http://10.0.0.1:8787"],
                &["--base-url", "https://127.0.0.1:8787"],
                &["--base-url", "http://example.com"],
                &["--base-url", "http://127.0.0.1:8787/v1"],
                &["--base-url", "http://127.0.0.1:0"],
                &["--base-url", "http://user@127.0.0.1"],
                &["--database-url", "postgres://u:p@db.example.com/x"],
                &["--database-url", "not a url at all ::"],
                &["--admin-token", ""],
            ] {
                assert!(args(bad).is_err(), "{bad:?} should be refused");
            }
        }

        #[test]
        fn loopback_urls() {
            for ok in [
                "http://127.0.0.1:8787",
                "http://127.0.0.2",
                "http://localhost",
                "http://[::1]:8787/",
            ] {
                assert!(loopback_base_url(ok).is_ok(), "{ok}");
            }
            assert_eq!(
                loopback_base_url("http://[::1]:8787/").unwrap(),
                "http://[::1]:8787"
            );
            assert!(check_loopback_database(DEFAULT_DATABASE_URL).is_ok());
            assert!(check_loopback_database("host=/var/run/postgresql dbname=x").is_ok());
            assert!(check_loopback_database("postgres://u@localhost/x").is_ok());
            assert!(check_loopback_database("host=10.1.2.3 dbname=x").is_err());
            assert!(check_loopback_database("postgres://u@127.0.0.1,db.example.com/x").is_err());
        }

        #[test]
        fn command_line_redacts_secrets() {
            let argv: Vec<String> = [
                "target/release/surge",
                "--clients",
                "10",
                "--admin-token",
                "s3cret",
                "--database-url",
                "postgres://keenvpn:pw@127.0.0.1:54329/keenvpn",
                "--admin-token=other",
                "--database-url=postgres://a:b@localhost/x",
                "--out",
                "dir with space",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let shown = display_command_line(&argv);
            assert_eq!(
                shown,
                "target/release/surge --clients 10 --admin-token '***' --database-url \
                 'postgres://keenvpn:***@127.0.0.1:54329/keenvpn' '--admin-token=***' \
                 '--database-url=postgres://a:***@localhost/x' --out 'dir with space'"
            );
            assert!(!shown.contains("s3cret") && !shown.contains("pw@") && !shown.contains(":b@"));
            assert_eq!(redact_url("postgres://u@h/x"), "postgres://u@h/x");
            assert_eq!(redact_url("host=h"), "host=h");
            assert_eq!(shell_quote("it's"), r"'it'\''s'");
        }

        #[test]
        fn dev_vars_lines() {
            let text = "# comment\n\
                JWT_SIGNING_KEYS='[{\"kid\":\"dev-1\",\"seed\":\"abc\"}]'\n\
                REFRESH_TOKEN_PEPPER=\"pepper\"\n\
                export ADMIN_TOKEN=plain-value\n\
                EMPTY=\n\
                QUOTE='\n\
                #ADMIN_TOKEN=commented\n";
            assert_eq!(
                dev_var(text, "JWT_SIGNING_KEYS").as_deref(),
                Some("[{\"kid\":\"dev-1\",\"seed\":\"abc\"}]")
            );
            assert_eq!(
                dev_var(text, "REFRESH_TOKEN_PEPPER").as_deref(),
                Some("pepper")
            );
            assert_eq!(dev_var(text, "ADMIN_TOKEN").as_deref(), Some("plain-value"));
            assert_eq!(dev_var(text, "EMPTY").as_deref(), Some(""));
            assert_eq!(dev_var(text, "QUOTE").as_deref(), Some("'"));
            assert_eq!(dev_var(text, "MISSING"), None);
            assert_eq!(dev_var("A=1\nA=\"2\"\n", "A").as_deref(), Some("2"));
        }

        #[test]
        fn the_repository_dev_vars_example_parses() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev.vars.example");
            let text = std::fs::read_to_string(path).expect(".dev.vars.example");
            let keys = dev_var(&text, "JWT_SIGNING_KEYS").expect("JWT_SIGNING_KEYS");
            KeySet::parse(&keys).expect("the development key set parses");
        }

        #[test]
        fn percentiles_nearest_rank() {
            let v: Vec<f64> = (1..=100).map(f64::from).collect();
            assert_eq!(percentile(&v, 50.0), Some(50.0));
            assert_eq!(percentile(&v, 90.0), Some(90.0));
            assert_eq!(percentile(&v, 99.0), Some(99.0));
            assert_eq!(percentile(&v, 100.0), Some(100.0));
            assert_eq!(percentile(&v, 0.0), Some(1.0));
            assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
            assert_eq!(percentile(&[], 50.0), None);
            let three = [1.0, 2.0, 3.0];
            assert_eq!(percentile(&three, 50.0), Some(2.0));
            assert_eq!(percentile(&three, 34.0), Some(2.0));
            assert_eq!(percentile(&three, 33.0), Some(1.0));
        }

        #[test]
        fn summaries() {
            let s = summarize(&[5.0, 1.0, 3.0, f64::NAN, 2.0, 4.0]).unwrap();
            assert_eq!(s.count, 5);
            assert_eq!(s.mean, 3.0);
            assert_eq!((s.p50, s.p90, s.p99, s.max), (3.0, 5.0, 5.0, 5.0));
            assert_eq!(summarize(&[]), None);
        }

        #[test]
        fn time_to_fractions() {
            let t = [0.5, 1.0, 2.0, 4.0];
            assert_eq!(time_to_reach(&t, 4, 0.5), Some(1.0));
            assert_eq!(time_to_reach(&t, 4, 1.0), Some(4.0));
            assert_eq!(time_to_reach(&t, 4, 0.99), Some(4.0));
            assert_eq!(time_to_reach(&t, 8, 0.5), Some(4.0));
            assert_eq!(time_to_reach(&t, 8, 0.9), None);
            assert_eq!(time_to_reach(&[], 0, 0.5), None);
        }

        #[test]
        fn curves_are_thinned_but_keep_both_ends() {
            let t: Vec<f64> = (0..10_000).map(|i| f64::from(i) / 100.0).collect();
            let c = reconnect_curve(&t, 1000);
            assert!(c.len() <= 1002, "{}", c.len());
            assert_eq!(c.first(), Some(&(0.0, 1)));
            assert_eq!(c.last(), Some(&(99.99, 10_000)));
            assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
            assert_eq!(reconnect_curve(&[1.0, 2.0], 1000), vec![(1.0, 1), (2.0, 2)]);
            assert!(reconnect_curve(&[], 1000).is_empty());
        }

        #[test]
        fn the_pool_bounds_requests_in_flight() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let pool = Arc::new(Pool::new(3));
                let (now, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
                let tasks: Vec<_> = (0..40)
                    .map(|_| {
                        let (pool, now, peak) = (pool.clone(), now.clone(), peak.clone());
                        tokio::spawn(async move {
                            let _permit = pool.acquire().await;
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(n, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            now.fetch_sub(1, Ordering::SeqCst);
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                assert_eq!(peak.load(Ordering::SeqCst), 3);
                // Every permit came back.
                let permits: Vec<_> =
                    futures::future::join_all((0..3).map(|_| pool.acquire())).await;
                assert_eq!(permits.len(), 3);
            });
        }

        #[test]
        fn statuses() {
            assert_eq!(classify(200), Class::Connected);
            assert_eq!(classify(429), Class::Throttled);
            assert_eq!(classify(503), Class::Unavailable);
            assert_eq!(classify(500), Class::ServerError);
            assert_eq!(classify(502), Class::ServerError);
            assert_eq!(classify(401), Class::Rejected);
            assert_eq!(classify(404), Class::Rejected);
            assert_eq!(classify(422), Class::Rejected);
            assert_eq!(parse_retry_after("3"), Some(3));
            assert_eq!(parse_retry_after(" 12 "), Some(12));
            assert_eq!(parse_retry_after("0"), Some(0));
            assert_eq!(parse_retry_after("99999999999"), Some(u32::MAX));
            assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
            assert_eq!(parse_retry_after("-1"), None);
            assert_eq!(parse_retry_after(""), None);
        }

        #[test]
        fn policy_never_retries_before_retry_after() {
            for attempt in 0..RECOMMENDED.max_attempts {
                for random in [0, 1, u64::MAX / 3, u64::MAX] {
                    for ra in [1_u32, 2, 5] {
                        let d = retry_delay_ms(Mode::Policy, attempt, Some(ra), random);
                        assert!(
                            d >= u64::from(ra) * 1000,
                            "attempt {attempt}: {d} ms < {ra} s"
                        );
                    }
                    let d = retry_delay_ms(Mode::Policy, attempt, None, random);
                    assert!(
                        d <= RECOMMENDED.cap_ms,
                        "attempt {attempt}: {d} ms above the cap"
                    );
                }
            }
        }

        #[test]
        fn policy_spreads_clients_out() {
            // Full jitter: different random inputs give different delays.
            let attempt = RECOMMENDED.max_attempts.min(4);
            let delays: std::collections::BTreeSet<u64> = (0..64_u64)
                .map(|i| {
                    retry_delay_ms(
                        Mode::Policy,
                        attempt,
                        None,
                        i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    )
                })
                .collect();
            assert!(delays.len() > 8, "{delays:?}");
        }

        #[test]
        fn clients_are_placed_within_three_degrees_of_the_dead_region() {
            let mut seen = std::collections::HashSet::new();
            for i in 0..500 {
                let loc = client_location((50.11, 8.68), &format!("device-{i}"));
                let (lat, lon) = loc.split_once(',').unwrap();
                let (lat, lon): (f64, f64) = (lat.parse().unwrap(), lon.parse().unwrap());
                assert!(
                    (lat - 50.11).abs() <= 3.0001 && (lon - 8.68).abs() <= 3.0001,
                    "{loc}"
                );
                seen.insert(loc);
            }
            assert!(seen.len() > 400, "spread out, not one point");
            assert_eq!(
                client_location((1.0, 2.0), "d"),
                client_location((1.0, 2.0), "d")
            );
            // Near the date line, longitudes wrap instead of leaving the range.
            let loc = client_location((0.0, 179.5), "wrap");
            let lon: f64 = loc.split_once(',').unwrap().1.parse().unwrap();
            assert!((-180.0..=180.0).contains(&lon));
        }

        #[test]
        fn failover_regions_are_read_from_a_problem_body() {
            let body = br#"{"code":"region_busy","failover":["eu-west","us-east"]}"#;
            assert_eq!(failover(body), ["eu-west", "us-east"]);
            assert!(failover(b"{}").is_empty());
            assert!(failover(b"not json").is_empty());
        }

        #[test]
        fn naive_ignores_retry_after() {
            for attempt in [1, 2, 50, 199] {
                assert_eq!(retry_delay_ms(Mode::Naive, attempt, Some(30), 12345), 50);
                assert_eq!(retry_delay_ms(Mode::Naive, attempt, None, 0), 50);
            }
            assert_eq!(Mode::Naive.max_retries(), 200);
            assert_eq!(Mode::Policy.max_retries(), RECOMMENDED.max_attempts);
        }

        #[test]
        fn minted_tokens_verify_with_the_same_keys() {
            let seed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7_u8; 32]);
            let keys = KeySet::parse(&format!(r#"[{{"kid":"surge-test","seed":"{seed}"}}]"#))
                .expect("a valid key set");
            let now = 1_800_000_000;
            let user = "0b0e7a4e-2f3c-4d5e-8f90-123456789abc";
            let sid = hex::encode([0xab_u8; 16]);
            assert_eq!(sid.len(), 32);
            let token = mint_token(&keys, user, &sid, now, 17);
            let claims = keys.verify(&token, now + 60).expect("the token verifies");
            assert_eq!(claims.sub, user);
            assert_eq!(claims.sid, sid);
            assert_eq!(claims.ent, plus_entitlement(now));
            assert!(claims.ent.allows_tier(Tier::Premium));
            assert_eq!(claims.ent.until, Some(now + 30 * 24 * 3600));
            assert!(keys.verify(&token, now + ACCESS_TTL_SECS + 3600).is_err());
            let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([9_u8; 32]);
            let other =
                KeySet::parse(&format!(r#"[{{"kid":"surge-test","seed":"{other}"}}]"#)).unwrap();
            assert!(other.verify(&token, now + 60).is_err());
        }

        #[test]
        fn pg_deltas() {
            let t = |s, i, u, d| TableStats {
                scans: s,
                inserted: i,
                updated: u,
                deleted: d,
            };
            let before = PgSnapshot {
                transactions: 1000,
                maintenance: 7,
                tables: BTreeMap::from([
                    ("devices".to_owned(), t(10, 5, 0, 0)),
                    ("regions".to_owned(), t(3, 0, 1, 0)),
                ]),
            };
            let after = PgSnapshot {
                transactions: 1250,
                maintenance: 9,
                tables: BTreeMap::from([
                    ("devices".to_owned(), t(110, 5, 0, 0)),
                    ("regions".to_owned(), t(3, 0, 1, 0)),
                    ("connection_events".to_owned(), t(0, 40, 0, 0)),
                ]),
            };
            let d = pg_delta(&before, &after, 1);
            assert_eq!(d.transactions, 249);
            assert_eq!(d.own_transactions_subtracted, 1);
            assert_eq!(d.autovacuum_runs, 2);
            assert_eq!(
                d.tables,
                BTreeMap::from([
                    ("devices".to_owned(), t(100, 0, 0, 0)),
                    ("connection_events".to_owned(), t(0, 40, 0, 0)),
                ])
            );
            assert_eq!(pg_delta(&after, &after, 1).transactions, 0);
        }

        fn sample_report(mode: Mode, complete: bool) -> SurgeReport {
            let reconnected = |at: f64, lat: f64, retries: u32, region: &str| ClientOutcome {
                attempts: retries + 1,
                ending: Ending::Reconnected {
                    at_secs: at,
                    latency_ms: lat,
                    region: region.to_owned(),
                },
            };
            let mut outcomes = vec![
                reconnected(0.2, 10.0, 0, "eu-west"),
                reconnected(0.9, 30.0, 2, "eu-north"),
                reconnected(0.5, 20.0, 1, "eu-west"),
            ];
            outcomes.push(if complete {
                reconnected(2.5, 40.0, 5, "eu-west")
            } else {
                ClientOutcome {
                    attempts: 8,
                    ending: Ending::OutOfRetries,
                }
            });
            let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            build_report(ReportInput {
                mode,
                run_id: "0123abcd-policy",
                region: "eu-central",
                deadline_secs: 60,
                pool: 256,
                outcomes: &outcomes,
                responses: Responses {
                    ok: 4,
                    ok_in_dead_region: 2,
                    status_429: 7,
                    ..Responses::default()
                },
                surge_duration_secs: 3.0,
                postgres: Some(PgDelta {
                    transactions: 42,
                    own_transactions_subtracted: 1,
                    autovacuum_runs: 3,
                    tables: BTreeMap::from([(
                        "devices".to_owned(),
                        TableStats {
                            scans: 4,
                            ..TableStats::default()
                        },
                    )]),
                }),
                started: t0,
                ended: t0 + Duration::from_secs(3),
            })
        }

        #[test]
        fn reports() {
            let r = sample_report(Mode::Policy, true);
            assert!(r.complete);
            assert_eq!(r.reconnected, 4);
            assert_eq!(r.time_to_all_secs, Some(2.5));
            assert_eq!(r.time_to_percent_secs["50"], Some(0.5));
            assert_eq!(r.latency_ms.as_ref().unwrap().p99, 40.0);
            assert_eq!(r.retries_per_client.as_ref().unwrap().max, 5.0);
            assert_eq!(r.retries_per_client.as_ref().unwrap().mean, 2.0);
            assert_eq!(
                r.landing_regions,
                BTreeMap::from([("eu-north".to_owned(), 1), ("eu-west".to_owned(), 3)])
            );
            assert_eq!(r.surge_started_at, "2027-01-15T08:00:00.000Z");
            assert_eq!(r.curve, vec![(0.2, 1), (0.5, 2), (0.9, 3), (2.5, 4)]);
            let text = render_report(&r, "surge --clients 4", &["a.json".to_owned()]);
            assert!(text.contains("4 / 4 (100%) in 2.500 s"), "{text}");
            assert!(text.contains("eu-north 1, eu-west 3"), "{text}");
            assert!(text.contains("42 transactions"), "{text}");
            assert!(
                text.contains("including 3 autovacuum/autoanalyze runs"),
                "{text}"
            );
            assert!(text.contains("2xx 6   429 7"), "{text}");
            assert!(
                text.contains("2 of the 2xx placed the client in the dead region eu-central"),
                "{text}"
            );
            assert!(
                text.contains("surge-0123abcd-policy-<i>@example.test"),
                "{text}"
            );
            assert!(text.contains("surge --clients 4"), "{text}");

            let r = sample_report(Mode::Naive, false);
            assert!(!r.complete);
            assert_eq!(r.reconnected_percent, 75.0);
            assert_eq!(r.time_to_all_secs, None);
            assert_eq!(r.time_to_percent_secs["100"], None);
            assert_eq!(r.gave_up.out_of_retries, 1);
            assert_eq!(r.retries_per_client.as_ref().unwrap().max, 7.0);
            let text = render_report(&r, "surge", &[]);
            assert!(text.contains("3 / 4 (75.00%)"), "{text}");
            assert!(text.contains("out of retries 1"), "{text}");
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["mode"], "naive");
            assert_eq!(json["responses"]["status_429"], 7);
            assert!(comparison(&[r]).contains("naive"));
        }

        #[test]
        fn ticks() {
            assert_eq!(nice_step(1000.0, 5, 1.0), 200.0);
            assert_eq!(nice_step(10_000.0, 5, 1.0), 2000.0);
            assert_eq!(nice_step(3.0, 5, 1.0), 1.0);
            assert_eq!(nice_step(47.3, 10, 0.0), 5.0);
            assert_eq!(nice_step(0.35, 10, 0.0), 0.05);
            let (step, t) = nice_ticks(47.3, 10, 0.0);
            assert_eq!(step, 5.0);
            assert_eq!(t.first(), Some(&0.0));
            assert_eq!(t.last(), Some(&50.0));
            let (_, t) = nice_ticks(1000.0, 5, 1.0);
            assert_eq!(t, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
            let (_, t) = nice_ticks(0.0, 5, 1.0);
            assert_eq!(t, vec![0.0, 1.0]);
            assert_eq!(fmt_tick(0.30000000000000004, 0.05), "0.30");
            assert_eq!(fmt_tick(400.0, 200.0), "400");
            assert_eq!(fmt_tick(2.5, 0.5), "2.5");
        }

        /// A minimal well-formedness check: tags nest and close, entities are known.
        fn assert_well_formed(doc: &str) {
            let mut stack: Vec<String> = Vec::new();
            let mut rest = doc;
            while let Some(i) = rest.find('<') {
                let text = &rest[..i];
                for (j, _) in text.match_indices('&') {
                    let ent = &text[j..];
                    assert!(
                        ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                            .iter()
                            .any(|e| ent.starts_with(e)),
                        "bad entity near {ent:.20}"
                    );
                }
                rest = &rest[i..];
                let end = rest.find('>').expect("unterminated tag");
                let tag = &rest[1..end];
                rest = &rest[end + 1..];
                if tag.starts_with('?') || tag.starts_with('!') {
                    continue;
                }
                if let Some(name) = tag.strip_prefix('/') {
                    assert_eq!(
                        stack.pop().as_deref(),
                        Some(name.trim()),
                        "mismatched </{name}>"
                    );
                } else if !tag.ends_with('/') {
                    let name = tag.split_whitespace().next().unwrap().to_owned();
                    stack.push(name);
                }
            }
            assert!(stack.is_empty(), "unclosed: {stack:?}");
        }

        #[test]
        fn charts() {
            let a = sample_report(Mode::Policy, true);
            let b = sample_report(Mode::Naive, false);
            let svg = render_chart(
                &chart_title(&[Mode::Policy, Mode::Naive], 4),
                "eu-central marked down at t = 0 <&> \"quoted\"",
                4,
                &[ChartSeries::of(&a), ChartSeries::of(&b)],
            );
            assert!(svg.starts_with("<?xml"));
            assert!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
            assert!(svg.contains("policy vs naive, N = 4"));
            assert!(svg.contains("&lt;&amp;&gt; &quot;quoted&quot;"));
            assert!(svg.contains("policy: all 4 back in 2.5 s"));
            assert!(svg.contains("naive: 75.0% back by 3 s"));
            assert!(svg.contains("clients reconnected"));
            assert!(svg.contains("seconds since the region was marked down"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
            assert_well_formed(&svg);
            if let Ok(path) = std::env::var("SURGE_TEST_SVG") {
                std::fs::write(path, &svg).unwrap();
            }

            // Degenerate inputs still give a valid document.
            let empty = render_chart("empty", "", 0, &[]);
            assert_well_formed(&empty);
            assert!(!empty.contains("NaN"));
            let none_back = ChartSeries {
                label: "naive".to_owned(),
                color: "#d62728".to_owned(),
                points: vec![],
                end_secs: 0.0,
                reconnected: 0,
                time_to_all_secs: None,
            };
            let svg = render_chart("none", "", 10, &[none_back]);
            assert_well_formed(&svg);
            assert!(!svg.contains("NaN"));
        }

        #[test]
        fn bigger_chart_for_inspection() {
            // 10 000 clients, a policy-like S curve and a naive one that stalls.
            let mut policy: Vec<f64> = (0..10_000)
                .map(|i| 40.0 * (f64::from(i) / 10_000.0).powf(1.5))
                .collect();
            policy.sort_by(f64::total_cmp);
            let naive: Vec<f64> = (0..8_700)
                .map(|i| 120.0 * (f64::from(i) / 10_000.0).powi(3))
                .collect();
            let s = |label: &str, mode: Mode, t: &[f64], end: f64, all: bool| ChartSeries {
                label: label.to_owned(),
                color: mode.color().to_owned(),
                points: reconnect_curve(t, CURVE_POINTS),
                end_secs: end,
                reconnected: t.len() as u64,
                time_to_all_secs: all.then(|| *t.last().unwrap()),
            };
            let svg = render_chart(
                &chart_title(&[Mode::Policy, Mode::Naive], 10_000),
                "eu-central marked down at t = 0; every client reconnects at once; deadline 600 s",
                10_000,
                &[
                    s("policy", Mode::Policy, &policy, 40.0, true),
                    s("naive", Mode::Naive, &naive, 600.0, false),
                ],
            );
            assert_well_formed(&svg);
            if let Ok(path) = std::env::var("SURGE_TEST_SVG_BIG") {
                std::fs::write(path, &svg).unwrap();
            }
        }
    }
}
