//! Debian kernel packages: pick the newest one apt knows for a series, download and unpack it
//! once into the cache, and index its modules so the initramfs can take just what it needs.
//!
//! Debian's `-unsigned` image packages carry the bzImage and every module but no
//! `modules.dep`, so the cache runs `depmod` over the unpacked tree once.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// A kernel series the project supports; each maps to one family of Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Series {
    /// Debian 12's own kernel (`linux-image-6.1.0-<abi>-amd64-unsigned`).
    V6_1,
    /// The bookworm-backports/security 6.12 kernel (`linux-image-6.12.<n>+deb<r>-amd64-unsigned`).
    V6_12,
}

impl Series {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The `apt-cache search --names-only` pattern; `-cloud` and `-rt` flavours are excluded
    /// because they lack drivers and change scheduling, so results would not be comparable.
    fn apt_pattern(self) -> &'static str {
        match self {
            Self::V6_1 => r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
            Self::V6_12 => r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$",
        }
    }

    /// Re-checks apt's answer (and cache directory names) without trusting its regex dialect.
    fn matches(self, package: &str) -> bool {
        let Some(rest) = package
            .strip_prefix("linux-image-")
            .and_then(|r| r.strip_suffix("-amd64-unsigned"))
        else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match self {
            Self::V6_1 => rest.strip_prefix("6.1.0-").is_some_and(digits),
            Self::V6_12 => rest
                .strip_prefix("6.12.")
                .and_then(|r| r.split_once("+deb"))
                .is_some_and(|(patch, release)| digits(patch) && digits(release)),
        }
    }
}

/// An unpacked, depmod-indexed kernel package in the cache.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) package: String,
    /// `uname -r` of the kernel, also the name of its `lib/modules` directory.
    pub(crate) release: String,
    pub(crate) vmlinuz: PathBuf,
    pub(crate) modules_dir: PathBuf,
}

/// Marks a fully unpacked and indexed cache entry; an interrupted run leaves none behind.
const COMPLETE_MARKER: &str = ".complete";

/// Returns the newest kernel of `series`, downloading it into `cache` only when it is not
/// there yet.
pub(crate) fn fetch(cache: &Path, series: Series) -> Result<Kernel> {
    fs::create_dir_all(cache).with_context(|| format!("failed to create {}", cache.display()))?;
    let mut candidates = apt_search(series)?;
    if candidates.is_empty() {
        println!(
            "vm-test: apt knows no {} kernel; running apt-get update",
            series.label()
        );
        apt_update()?;
        candidates = apt_search(series)?;
    }
    let Some(package) = newest(candidates) else {
        return newest_cached(cache, series)?.with_context(|| {
            format!(
                "no Debian {} kernel package found (apt-cache search {:?}) and none cached in {}",
                series.label(),
                series.apt_pattern(),
                cache.display()
            )
        });
    };

    let dir = cache.join(&package);
    if !dir.join(COMPLETE_MARKER).exists()
        && let Err(error) = download_and_unpack(cache, &package)
    {
        let Some(kernel) = newest_cached(cache, series)? else {
            return Err(error);
        };
        println!(
            "vm-test: warning: {error:#}; falling back to cached {}",
            kernel.package
        );
        return Ok(kernel);
    }
    load(&dir, &package)
}

fn apt_search(series: Series) -> Result<Vec<String>> {
    let output = Command::new("apt-cache")
        .args(["search", "--names-only", series.apt_pattern()])
        .output()
        .context("failed to run apt-cache search")?;
    ensure!(
        output.status.success(),
        "apt-cache search failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| series.matches(name))
        .map(str::to_owned)
        .collect())
}

fn apt_update() -> Result<()> {
    let status = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("failed to run apt-get update")?;
    ensure!(status.success(), "apt-get update failed: {status}");
    Ok(())
}

/// Orders package names by their numeric fields (`6.1.0-56` > `6.1.0-9`), which is how
/// Debian bumps both the ABI number and the 6.12 patch level.
fn newest(packages: impl IntoIterator<Item = String>) -> Option<String> {
    packages
        .into_iter()
        .max_by_key(|name| (version_key(name), name.clone()))
}

fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|field| field.parse().ok())
        .collect()
}

fn newest_cached(cache: &Path, series: Series) -> Result<Option<Kernel>> {
    let mut cached = Vec::new();
    let entries =
        fs::read_dir(cache).with_context(|| format!("failed to list {}", cache.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to list {}", cache.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if series.matches(&name) && entry.path().join(COMPLETE_MARKER).exists() {
            cached.push(name);
        }
    }
    newest(cached)
        .map(|package| load(&cache.join(&package), &package))
        .transpose()
}

fn download_and_unpack(cache: &Path, package: &str) -> Result<()> {
    let deb = match find_deb(cache, package)? {
        Some(deb) => deb,
        None => {
            println!("vm-test: downloading {package}");
            if apt_download(cache, package).is_err() {
                // Usually stale or missing package lists after a point release; one refresh.
                apt_update()?;
                apt_download(cache, package)?;
            }
            find_deb(cache, package)?
                .with_context(|| format!("apt-get download left no .deb for {package}"))?
        }
    };

    let staging = cache.join(format!("{package}.partial"));
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("failed to remove {}", staging.display()))?;
    }
    println!("vm-test: unpacking {}", deb.display());
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
    let release = single_release(&staging)?;
    run(Command::new("depmod").arg("-b").arg(&staging).arg(&release))?;
    fs::write(staging.join(COMPLETE_MARKER), format!("{release}\n"))
        .context("failed to write the cache marker")?;

    let dir = cache.join(package);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    }
    fs::rename(&staging, &dir)
        .with_context(|| format!("failed to move {} into place", staging.display()))?;
    // The unpacked tree is all later runs need; the .deb would only double the cache size.
    fs::remove_file(&deb).with_context(|| format!("failed to remove {}", deb.display()))?;
    Ok(())
}

fn apt_download(cache: &Path, package: &str) -> Result<()> {
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(cache))
}

/// Finds `<package>_<version>_amd64.deb` as `apt-get download` names it.
fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    let entries =
        fs::read_dir(cache).with_context(|| format!("failed to list {}", cache.display()))?;
    let mut debs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to list {}", cache.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            debs.push(entry.path());
        }
    }
    debs.sort();
    Ok(debs.pop())
}

fn single_release(tree: &Path) -> Result<String> {
    let modules = tree.join("lib/modules");
    let mut releases = Vec::new();
    for entry in
        fs::read_dir(&modules).with_context(|| format!("failed to list {}", modules.display()))?
    {
        let entry = entry.with_context(|| format!("failed to list {}", modules.display()))?;
        releases.push(entry.file_name().to_string_lossy().into_owned());
    }
    match releases.as_slice() {
        [release] => Ok(release.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {releases:?}",
            modules.display()
        ),
    }
}

fn load(dir: &Path, package: &str) -> Result<Kernel> {
    let release = single_release(dir)?;
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    ensure!(vmlinuz.is_file(), "{} is missing", vmlinuz.display());
    Ok(Kernel {
        package: package.to_owned(),
        modules_dir: dir.join("lib/modules").join(&release),
        release,
        vmlinuz,
    })
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to run {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_only_generic_amd64_images() {
        assert!(Series::V6_1.matches("linux-image-6.1.0-56-amd64-unsigned"));
        assert!(!Series::V6_1.matches("linux-image-6.1.0-56-cloud-amd64-unsigned"));
        assert!(Series::V6_12.matches("linux-image-6.12.117+deb12-amd64-unsigned"));
        assert!(!Series::V6_12.matches("linux-image-6.12.117+deb12-rt-amd64-unsigned"));
        assert!(!Series::V6_12.matches("linux-image-6.1.0-56-amd64-unsigned"));
    }

    #[test]
    fn newest_compares_numerically() {
        let pick = newest([
            "linux-image-6.12.99+deb12-amd64-unsigned".to_owned(),
            "linux-image-6.12.117+deb12-amd64-unsigned".to_owned(),
            "linux-image-6.12.111+deb12-amd64-unsigned".to_owned(),
        ]);
        assert_eq!(
            pick.as_deref(),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
        let pick = newest([
            "linux-image-6.1.0-9-amd64-unsigned".to_owned(),
            "linux-image-6.1.0-56-amd64-unsigned".to_owned(),
        ]);
        assert_eq!(pick.as_deref(), Some("linux-image-6.1.0-56-amd64-unsigned"));
    }
}
