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
    share_target_dir(metadata.target_directory.as_std_path(), ebpf.name.as_str())?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// aya-build compiles the programs in a cargo target directory inside this build's OUT_DIR
/// (`aya-build/target/<package>`), and every way of building the agent has its own OUT_DIR
/// (clippy, the tests, the image, a release build): each compiled core for the BPF target and
/// the programs from scratch, ~40 s of CPU apiece, four times in a CI run. The programs do not
/// depend on how the agent is built, so that directory is made a link to one shared
/// `target/bpfel`, where cargo rebuilds only what changed and locks out concurrent builds. If
/// aya-build ever moves it, the link is simply not used and each build compiles its own again.
fn share_target_dir(target: &Path, package: &str) -> anyhow::Result<()> {
    let out = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
    let own = Path::new(&out).join("aya-build").join("target");
    let link = own.join(package);
    if link.symlink_metadata().is_ok() {
        return Ok(());
    }
    let shared = target.join("bpfel");
    std::fs::create_dir_all(&shared).with_context(|| format!("create {}", shared.display()))?;
    std::fs::create_dir_all(&own).with_context(|| format!("create {}", own.display()))?;
    std::os::unix::fs::symlink(&shared, &link)
        .with_context(|| format!("link {} to {}", link.display(), shared.display()))
}
