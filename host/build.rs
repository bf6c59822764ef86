//! Rebuilds the host when a migration is added or changed: `sqlx::migrate!` embeds the files of
//! `migrations/` at compile time, and Cargo does not know they are inputs.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
