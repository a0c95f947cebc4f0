//! Builds the eBPF object with the nightly toolchain (aya-build) and leaves it in OUT_DIR,
//! where `datapath` embeds it with `include_bytes_aligned!`.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds with `--cfg fuzzing`. The fuzz targets parse input and never load
    // programs, and building the object (core for the BPF target, aya-ebpf, the programs) was
    // a step of its own in every fuzz build: they get an empty object instead, which
    // `Ebpf::load` refuses.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(Path::new(&out).join("interceptor"), [])
            .context("write the empty eBPF object")?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "interceptor-ebpf")
        .ok_or_else(|| anyhow!("interceptor-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("interceptor-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
