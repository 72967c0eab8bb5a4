use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use a vendored protoc so no system package is needed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("llamacluster_descriptor.bin"))
        .compile_protos(
            &[
                "llamacluster/v1/worker.proto",
                "llamacluster/v1/coordinator.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=llamacluster");
    Ok(())
}
