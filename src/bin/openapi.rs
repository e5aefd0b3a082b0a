//! Writes the OpenAPI document generated from the wire types.
//!
//! `cargo run --bin openapi` rewrites `openapi.json` (commit it with the change
//! that moved the contract); `cargo run --bin openapi -- --check` exits 1 when
//! the committed file is stale.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    use keenvpn_edge::api::{OPENAPI_JSON, openapi};
    use std::process::ExitCode;

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let text = openapi::render();
    if std::env::args().any(|a| a == "--check") {
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return ExitCode::SUCCESS;
        }
        eprintln!("openapi.json is stale: run `cargo run --bin openapi`");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::write(path, &text) {
        eprintln!("openapi: cannot write {path}: {e}");
        return ExitCode::FAILURE;
    }
    if text != OPENAPI_JSON {
        println!("openapi.json updated; rebuild so the worker serves it");
    }
    println!("wrote {path} ({} bytes)", text.len());
    ExitCode::SUCCESS
}
