//! Build steps Cargo cannot see on its own:
//! - `src/db.rs` embeds `migrations/` at compile time (refinery's
//!   `embed_migrations!`): the crate is rebuilt when a migration is added or
//!   changed;
//! - the Worker serves `openapi.json` without its indentation: the committed
//!   document (pretty, for review) is written to `OUT_DIR` in compact form,
//!   which `src/api/mod.rs` embeds. The indentation was about half of the
//!   document's 160 KB, in every isolate's memory.
use std::{env, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=openapi.json");
    let text = fs::read_to_string("openapi.json").expect("openapi.json is readable");
    let document: serde_json::Value =
        serde_json::from_str(&text).expect("openapi.json is JSON (run `cargo run --bin openapi`)");
    let compact = serde_json::to_string(&document).expect("a JSON value serialises");
    let out = env::var("OUT_DIR").expect("Cargo sets OUT_DIR");
    fs::write(Path::new(&out).join("openapi.compact.json"), compact).expect("OUT_DIR is writable");
}
