//! Compiles `shadowcache.proto` with protox (pure Rust), so that no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=shadowcache.proto");
    let fds = protox::compile(["shadowcache.proto"], ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
