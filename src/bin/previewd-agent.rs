//! `previewd-agent`: the daemon previewd injects into containers (see `previewd::agent`).
//! Built static (`.cargo/config.toml`) and small (`cargo build --profile agent`), so it runs
//! in images with no libc and no shell.

use std::process::ExitCode;

fn main() -> ExitCode {
    previewd::agent::cli::run(std::env::args_os().skip(1))
}
