//! End-to-end tests: the real worker under `wrangler dev` (workerd, local KV and
//! Durable Objects), real PostgreSQL behind the Hyperdrive bindings, driven over HTTP.
//!
//! A custom harness (libtest-mimic) so that one stack is started lazily for all
//! tests that share it and is stopped when they finish, pass or fail. Tests that
//! break a component start a stack of their own.

#[cfg(not(target_arch = "wasm32"))]
#[path = "../support/mod.rs"]
mod support;

#[cfg(not(target_arch = "wasm32"))]
mod auth;
#[cfg(not(target_arch = "wasm32"))]
mod billing;
#[cfg(not(target_arch = "wasm32"))]
mod common;
#[cfg(not(target_arch = "wasm32"))]
mod connect;
#[cfg(not(target_arch = "wasm32"))]
mod contract;
#[cfg(not(target_arch = "wasm32"))]
mod cron;
#[cfg(not(target_arch = "wasm32"))]
mod devices;
#[cfg(not(target_arch = "wasm32"))]
mod faults;
#[cfg(not(target_arch = "wasm32"))]
mod health;
#[cfg(not(target_arch = "wasm32"))]
mod logs;

#[cfg(not(target_arch = "wasm32"))]
mod harness {
    use crate::support::{self, Prerequisite, Stack};
    use std::sync::{Arc, OnceLock};

    /// What every test gets: a runtime, an HTTP client and the shared stack.
    pub struct Ctx {
        pub rt: tokio::runtime::Runtime,
        pub http: reqwest::Client,
        /// Tests that change regions (health, admission rate) hold it for
        /// writing; tests whose expectations depend on them, for reading.
        pub regions: tokio::sync::RwLock<()>,
        shared: OnceLock<Stack>,
    }

    impl Ctx {
        /// The stack shared by non-destructive tests, started on first use.
        pub fn stack(&self) -> &Stack {
            self.shared.get_or_init(Stack::start)
        }

        pub fn url(&self, path: &str) -> String {
            self.stack().url(path)
        }
    }

    pub type Test = fn(&Ctx) -> Result<(), libtest_mimic::Failed>;

    pub fn main() -> std::process::ExitCode {
        let mut args = libtest_mimic::Arguments::from_args();
        // The tests spend their time waiting on the worker (some sleep through a
        // lock or a grace window), not on the CPU: run more of them at once.
        args.test_threads.get_or_insert(8);
        support::require(&[
            Prerequisite::PostgresBinaries,
            Prerequisite::Wrangler,
            Prerequisite::WorkerBuild,
        ]);
        let ctx = Arc::new(Ctx {
            rt: tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime"),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("http client"),
            shared: OnceLock::new(),
            regions: tokio::sync::RwLock::new(()),
        });
        let trials = [
            crate::health::TESTS,
            crate::cron::TESTS,
            crate::auth::TESTS,
            crate::devices::TESTS,
            crate::billing::TESTS,
            crate::connect::TESTS,
            crate::contract::TESTS,
            crate::faults::TESTS,
        ]
        .concat()
        .into_iter()
        .map(|(name, test)| {
            let ctx = Arc::clone(&ctx);
            libtest_mimic::Trial::test(name, move || test(&ctx))
        })
        .collect();
        let conclusion = libtest_mimic::run(&args, trials);
        // Stops the shared stack (if one was started) before reporting; keeps
        // its logs when something failed.
        let mut ctx = Arc::into_inner(ctx).expect("every test has finished");
        if conclusion.has_failed()
            && let Some(stack) = ctx.shared.get_mut()
        {
            stack.wrangler.keep = true;
            stack.pg.keep = true;
        }
        drop(ctx);
        // Every stack is stopped now: search all their logs for the secrets
        // the run used.
        if !args.list
            && !(crate::logs::no_secrets_in_logs()
                & crate::logs::webcrypto_in_use()
                & crate::logs::no_cross_request_io())
        {
            return std::process::ExitCode::FAILURE;
        }
        conclusion.exit_code()
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    harness::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
