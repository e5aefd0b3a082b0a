//! Native tests of the PostgreSQL schema tooling against a real, throwaway cluster.

#[cfg(not(target_arch = "wasm32"))]
#[path = "../support/mod.rs"]
mod support;

#[cfg(not(target_arch = "wasm32"))]
mod migrations;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    use std::sync::{Arc, OnceLock};
    use support::{Postgres, Prerequisite};

    let args = libtest_mimic::Arguments::from_args();
    support::require(&[Prerequisite::PostgresBinaries]);
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio"),
    );
    let pg: Arc<OnceLock<Postgres>> = Arc::new(OnceLock::new());
    let trials = migrations::TESTS
        .iter()
        .map(|&(name, test)| {
            let (rt, pg) = (Arc::clone(&rt), Arc::clone(&pg));
            libtest_mimic::Trial::test(name, move || {
                let pg = pg.get_or_init(Postgres::start);
                rt.block_on(test(pg))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Connection tasks of the tests' clients may still be closing; stop them
    // before the cluster, which would otherwise end them with an error.
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown_timeout(std::time::Duration::from_secs(5));
    }
    drop(pg);
    conclusion.exit_code()
}

#[cfg(target_arch = "wasm32")]
fn main() {}
