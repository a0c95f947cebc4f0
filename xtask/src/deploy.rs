//! What a cluster admin gets: the dependency policy (`cargo deny`), the Kubernetes manifests in
//! `deploy/` (validated against the API schemas), and the container image the DaemonSet names
//! (`cargo xtask image`). Each installs its own tool once and reuses it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// cargo-deny 0.20 builds with the workspace's rustc (it needs 1.88) and no longer needs gix.
const CARGO_DENY_SERIES: &str = "0.20";

/// `kubernetes-validate` ships the API schemas of every Kubernetes release in the wheel, so it
/// validates offline. Pinned, so a new release cannot turn CI red by itself.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The oldest Kubernetes the manifests support (`securityContext.appArmorProfile` is 1.30),
/// and the newest schema the pinned validator ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.30", "1.37"];

/// Files under `deploy/` that are YAML but not Kubernetes objects.
const NOT_MANIFESTS: &[&str] = &["kustomization.yaml"];

/// `cargo deny check` without the advisories: the RustSec database is a git repository that
/// cannot be fetched here, and no registry this project can reach ships a copy (README.md,
/// "Dependency policy").
pub(crate) fn deny(root: &Path) -> Result<()> {
    let started = Instant::now();
    ensure_cargo_deny(root)?;
    run(
        root,
        // deny.toml at the workspace root is read by default.
        Command::new("cargo").args(["deny", "--locked", "check", "bans", "licenses", "sources"]),
    )?;
    eprintln!(
        "cargo deny (bans, licenses, sources) in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

fn ensure_cargo_deny(root: &Path) -> Result<()> {
    if let Ok(out) = Command::new("cargo").args(["deny", "--version"]).output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .contains(&format!("cargo-deny {CARGO_DENY_SERIES}."))
    {
        return Ok(());
    }
    // Into ~/.cargo/bin like the other cargo tools: built once per machine. Its release
    // profile asks for fat LTO with one codegen unit, which costs many minutes on two cores
    // for a tool that runs for seconds: overridden.
    run(
        root,
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "cargo-deny",
                "--version",
                &format!("~{CARGO_DENY_SERIES}"),
            ])
            .env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"),
    )
}

/// Validates every manifest in `deploy/` against the API schemas of the oldest and newest
/// supported Kubernetes, then checks that the validator refuses the broken fixtures (a
/// validator that passes everything would make the first step worthless).
pub(crate) fn validate_manifests(root: &Path) -> Result<()> {
    let started = Instant::now();
    let validator = ensure_kubernetes_validate(root)?;
    let manifests = manifest_files(&root.join("deploy"))?;
    if manifests.is_empty() {
        bail!("no manifests found under deploy/");
    }
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&manifests)
            .current_dir(root)
            .output()
            .with_context(|| format!("cannot run {}", validator.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{text}");
        // An unknown kind is only a warning to the validator, and would pass unchecked.
        if !out.status.success() || text.contains("Couldn't find schema") {
            bail!(
                "deploy/ manifests do not validate against Kubernetes {version} (see above; \
                 YAML under deploy/ that is not a Kubernetes object belongs in NOT_MANIFESTS)"
            );
        }
    }
    let fixtures = invalid_fixtures(root)?;
    eprintln!("the validator must refuse each of these (errors below are expected):");
    for fixture in &fixtures {
        let status = Command::new(&validator)
            .args(["--strict", "--quiet"])
            .arg(fixture)
            .status()
            .with_context(|| format!("cannot run {}", validator.display()))?;
        if status.success() {
            bail!(
                "the manifest validator accepted {}, which is invalid on purpose",
                fixture.display()
            );
        }
    }
    eprintln!(
        "{} manifests valid for Kubernetes {}, {} broken fixtures refused, in {:.0?}",
        manifests.len(),
        KUBERNETES_VERSIONS.join(" and "),
        fixtures.len(),
        started.elapsed()
    );
    Ok(())
}

/// A virtualenv under `target/tools`, made once.
fn ensure_kubernetes_validate(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/tools/kubernetes-validate");
    let bin = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("installed");
    if bin.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == KUBERNETES_VALIDATE) {
        return Ok(bin);
    }
    run(
        root,
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    )?;
    run(
        root,
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]),
    )?;
    fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(bin)
}

/// Every `*.yaml`/`*.yml` below `dir`, sorted, except [`NOT_MANIFESTS`].
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                stack.push(path);
            } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
                && !NOT_MANIFESTS.contains(&name)
            {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn invalid_fixtures(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("xtask/fixtures");
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("invalid-") && n.ends_with(".yaml"))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        bail!("no invalid-*.yaml fixtures in {}", dir.display());
    }
    Ok(found)
}

#[derive(Debug, clap::Args)]
pub(crate) struct ImageArgs {
    /// `release` (default): the image for a cluster, from a release build. `dev`: the debug
    /// binaries as `cargo build` left them (no release build, plugin linked dynamically), tagged
    /// `<version>-dev`, for the container e2e test and quick local runs.
    #[arg(long, value_enum, default_value_t = ImageProfile::Release)]
    pub(crate) profile: ImageProfile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ImageProfile {
    Release,
    Dev,
}

/// The image name the DaemonSet uses; `cargo xtask image` tags exactly this.
pub(crate) fn image_name() -> String {
    format!("localhost/interceptor:{}", env!("CARGO_PKG_VERSION"))
}

/// The label holding the SHA-256 of the agent binary an image was built from: the container
/// e2e test refuses an image older than the binary next to it.
const AGENT_SHA256_LABEL: &str = "io.interceptor.agent-sha256";

/// `cargo xtask image`: builds the agent and the CNI plugin, stages them with exactly the
/// shared libraries they link and the dynamic loader, and builds `deploy/Containerfile`
/// (`FROM scratch`) with podman. Prints the image size.
pub(crate) fn image(root: &Path, args: &ImageArgs) -> Result<()> {
    let started = Instant::now();
    let dev = args.profile == ImageProfile::Dev;
    ensure_podman(root)?;
    let (agent, cni) = if dev {
        // The test build's own binaries: nothing is compiled that CI has not built already.
        // The plugin links the host's C library dynamically, which is fine on the node it was
        // built on, and only there.
        run(
            root,
            Command::new("cargo").args([
                "build",
                "-p",
                "interceptor",
                "--bin",
                "interceptor",
                "-p",
                "interceptor-cni",
                "--bin",
                "interceptor-cni",
            ]),
        )?;
        let dir = root.join("target/debug");
        (dir.join("interceptor"), Some(dir.join("interceptor-cni")))
    } else {
        run(
            root,
            Command::new("cargo").args([
                "build",
                "--release",
                "-p",
                "interceptor",
                "--bin",
                "interceptor",
            ]),
        )?;
        (
            root.join("target/release/interceptor"),
            build_static_cni(root)?,
        )
    };

    let context = root.join(if dev {
        "target/image-dev"
    } else {
        "target/image"
    });
    let rootfs = context.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).with_context(|| format!("remove {}", rootfs.display()))?;
    }
    let mut staged = Vec::new();
    for (bin, name) in
        std::iter::once((&agent, "interceptor")).chain(cni.as_ref().map(|c| (c, "interceptor-cni")))
    {
        let dest = rootfs.join("usr/local/bin").join(name);
        copy_file(bin, &dest)?;
        staged.push(format!("/usr/local/bin/{name}"));
        for lib in shared_libraries(bin)? {
            let in_image = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            if !in_image.exists() {
                // The library's content under the path the loader asks for (symlinks resolved).
                copy_file(&lib, &in_image)?;
                staged.push(lib.display().to_string());
            }
        }
    }
    // CNI_NETNS paths are /var/run/netns/...; the DaemonSet mounts the node's /run/netns.
    fs::create_dir_all(rootfs.join("run"))?;
    fs::create_dir_all(rootfs.join("var"))?;
    std::os::unix::fs::symlink("../run", rootfs.join("var/run")).context("var/run symlink")?;
    fs::create_dir_all(rootfs.join("tmp"))?;

    let name = if dev {
        format!("{}-dev", image_name())
    } else {
        image_name()
    };
    let previous = image_id(&name);
    run(
        root,
        Command::new("podman")
            .args(["build", "--quiet", "--file"])
            .arg(root.join("deploy/Containerfile"))
            .args(["--tag", &name, "--label"])
            .arg(format!("{AGENT_SHA256_LABEL}={}", sha256_of(&agent)?))
            .arg(&context),
    )?;
    // A rebuild leaves the old image untagged: removed, or every test run would add one.
    if let Some(old) = previous.filter(|old| image_id(&name).as_ref() != Some(old)) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &old])
            .output();
    }
    // The image can start its binaries: the loader and every library are in it.
    for bin in staged.iter().filter(|p| p.starts_with("/usr/local/bin/")) {
        run(
            root,
            // runc: crun refuses this machine's hybrid cgroup layout.
            Command::new("podman").args([
                "--runtime",
                "runc",
                "run",
                "--rm",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                "--entrypoint",
                bin,
                &name,
                "--help",
            ]),
        )?;
    }
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", &name])
        .output()
        .context("podman image inspect")?;
    let size: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("image size")?;
    eprintln!(
        "image {name}: {:.1} MiB, built in {:.1?}, holding:",
        size as f64 / 1048576.0,
        started.elapsed()
    );
    for path in &staged {
        eprintln!("  {path}");
    }
    Ok(())
}

/// The ID of the image tagged `name`, if there is one.
fn image_id(name: &str) -> Option<String> {
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Id}}", name])
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !id.is_empty()).then_some(id)
}

fn sha256_of(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .with_context(|| format!("sha256sum {}", file.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .filter(|h| out.status.success() && h.len() == 64)
        .map(str::to_owned)
        .with_context(|| format!("sha256sum {} failed", file.display()))
}

/// `interceptor-cni` linked statically: the installer copies it onto the node, where the
/// container runtime runs it against the node's own C library, which may be older than ours.
/// `None` while the workspace has no such package.
fn build_static_cni(root: &Path) -> Result<Option<PathBuf>> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .current_dir(root)
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    if !metadata
        .packages
        .iter()
        .any(|p| p.name.as_str() == "interceptor-cni")
    {
        eprintln!("no interceptor-cni package in the workspace: the image holds the agent only");
        return Ok(None);
    }
    let host = host_triple()?;
    // Its own target directory, so these flags do not rebuild anything else.
    let target_dir = root.join("target/image-cni");
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "-p", "interceptor-cni", "--bin", "interceptor-cni"])
        .args(["--target", &host])
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--release")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    run(root, &mut cmd)?;
    let bin = target_dir.join(&host).join("release/interceptor-cni");
    if !shared_libraries(&bin)?.is_empty() {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(Some(bin))
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("no host line in rustc -vV")
}

/// The files `ldd` says `bin` loads: libraries and the dynamic loader (the vDSO is the
/// kernel's). Empty for a static binary.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // glibc's ldd exits 1 for a static executable.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {text}", bin.display());
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the loader itself:
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn ensure_podman(root: &Path) -> Result<()> {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found("podman") && found("runc") {
        return Ok(());
    }
    run(root, Command::new("apt-get").args(["update", "-qq"]))?;
    run(
        root,
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "podman",
                "runc",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5f3f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0a1c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0a1be00000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0a1c400000)
";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.to_string().contains("libfoo"), "{e}");
    }

    /// The DaemonSet runs the image `cargo xtask image` tags, for both containers.
    #[test]
    fn the_daemonset_names_the_image_xtask_builds() {
        let ds = include_str!("../../deploy/base/daemonset.yaml");
        let images: Vec<&str> = ds
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert_eq!(images, [image_name(), image_name()]);
    }

    /// The value of the first `key: value` line under the line containing `after`.
    fn value_after<'a>(text: &'a str, after: &str, key: &str) -> &'a str {
        let from = text.find(after).unwrap_or_else(|| panic!("no `{after}`"));
        text[from..]
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
            .map(|v| v.split('#').next().unwrap_or_default().trim())
            .unwrap_or_else(|| panic!("no `{key}` after `{after}`"))
    }

    /// Upgrades as issue 15 asks: on each node the new pod starts before the old one stops
    /// (surge, never a node without an agent), runs `--takeover`, and reaches the old one's
    /// handover socket on a host directory both pods mount; the old pod drains within its
    /// grace period.
    #[test]
    fn the_daemonset_lets_the_new_agent_take_over_from_the_old_one() {
        let ds = include_str!("../../deploy/base/daemonset.yaml");
        let cm = include_str!("../../deploy/base/configmap.yaml");
        assert_eq!(value_after(ds, "updateStrategy:", "type"), "RollingUpdate");
        assert_eq!(value_after(ds, "rollingUpdate:", "maxSurge"), "1");
        assert_eq!(value_after(ds, "rollingUpdate:", "maxUnavailable"), "0");
        let args = value_after(ds, "- name: agent", "args");
        assert!(args.contains("--takeover"), "agent args {args}");
        // The socket's directory is the host's /run/interceptor in every agent pod (the
        // image links /var/run to /run).
        let socket = value_after(cm, "handover:", "socket");
        let file = socket
            .strip_prefix("/var/run/interceptor/")
            .or_else(|| socket.strip_prefix("/run/interceptor/"));
        assert!(file.is_some_and(|f| !f.contains('/')), "socket {socket}");
        assert!(ds.contains("{name: run, mountPath: /run/interceptor}"));
        assert!(ds.contains("hostPath: {path: /run/interceptor, type: DirectoryOrCreate}"));
        let grace: u64 = value_after(ds, "priorityClassName", "terminationGracePeriodSeconds")
            .parse()
            .unwrap();
        let drain: u64 = value_after(cm, "handover:", "drainWindow")
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(drain < grace, "drainWindow {drain}s, grace period {grace}s");
    }

    #[test]
    fn kustomization_lists_every_manifest_of_the_base() {
        let root = crate::workspace_root().unwrap();
        let base = root.join("deploy/base");
        let text = fs::read_to_string(base.join("kustomization.yaml")).unwrap();
        let mut listed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- "))
            .collect();
        listed.sort_unstable();
        let files = manifest_files(&base).unwrap();
        let mut present: Vec<&str> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        present.sort_unstable();
        assert_eq!(listed, present);
    }
}
