//! `shadowcache-node`: parse flags, load the config, start the node, wait for SIGTERM or SIGINT,
//! shut down leaving the cache warm.
//!
//! Architecture invariant: thin: flags, runtime and signals; no node logic (`cli.rs`).

fn main() -> std::process::ExitCode {
    shadowcache_node::cli::main_from(std::env::args_os())
}
