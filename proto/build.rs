//! Compiles `proto/longhaul.proto` with protox (a protobuf compiler in Rust: no `protoc` to
//! install, the same output on every machine) and generates prost messages and tonic services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/longhaul.proto");
    let fds = protox::compile(["proto/longhaul.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
