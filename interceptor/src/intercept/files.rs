//! Reading the files policy points at: the YAML in `policyDir`, and the PEM files
//! DestinationRules name for TLS origination (`caCertificates`, `clientCertificate`,
//! `privateKey`).
//!
//! Whoever writes policy chooses those paths, and the agent runs as root on every node. So a
//! path is followed only inside a directory the node config trusts (`policyDir`,
//! `policy.certDirs`; see [`crate::sys::open_beneath`] for what that excludes), only a
//! regular file is read (a FIFO would block the reader forever, a device such as /dev/zero
//! would never end), and only up to a size cap. A [`Stamp`] (device, inode, size, change
//! times) tells whether a file changed without reading it again.

use std::{
    fs::File,
    io::Read as _,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use zeroize::Zeroizing;

use crate::sys;

/// The largest certificate, key or CA bundle file read (a full public CA bundle is ~220 KB).
pub const CERT_FILE_MAX: u64 = 1 << 20;

/// The largest policy file read (a ConfigMap holds at most 1 MiB).
pub const POLICY_FILE_MAX: u64 = 4 << 20;

/// How long after a change a [`Stamp`] is not trusted to show the next one: file times tick
/// in jiffies, so a same-size rewrite right after a read could keep every field of it.
const SETTLE: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file was last changed long enough ago that a later change must alter this
    /// stamp: only then may the stamp stand for the contents.
    pub fn settled(&self) -> bool {
        let at = |(s, ns): (i64, i64)| {
            let secs = u64::try_from(s).unwrap_or(0);
            let nanos = u32::try_from(ns).unwrap_or(0);
            SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
        };
        let newest = at(self.mtime).max(at(self.ctime));
        SystemTime::now()
            .duration_since(newest)
            .is_ok_and(|age| age >= SETTLE)
    }

    /// The stamp as bytes, for change detection.
    pub fn to_bytes(self) -> Vec<u8> {
        [
            self.dev,
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }
}

/// A regular file, open and within its size cap.
pub struct Opened {
    file: File,
    path: PathBuf,
    cap: u64,
    pub stamp: Stamp,
}

impl Opened {
    /// The contents (wiped from memory when dropped: this may be a private key).
    pub fn read(self) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(
            usize::try_from(self.stamp.size.min(self.cap)).unwrap_or(0),
        ));
        (&self.file)
            .take(self.cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read `{}`: {e}", self.path.display()))?;
        if bytes.len() as u64 > self.cap {
            return Err(too_large(&self.path, self.cap));
        }
        Ok(bytes)
    }

    /// The stamp, followed by a digest of the contents while the stamp alone cannot be
    /// trusted (see [`Stamp::settled`]): what change detection compares.
    pub fn fingerprint(self) -> Vec<u8> {
        use sha2::Digest as _;
        let mut out = self.stamp.to_bytes();
        if !self.stamp.settled() {
            match self.read() {
                Ok(bytes) => out.extend_from_slice(&sha2::Sha256::digest(&bytes[..])),
                Err(e) => out.extend_from_slice(e.as_bytes()),
            }
        }
        out
    }
}

/// Opens `path` (absolute) for reading if it lies inside one of `dirs` (`setting` names the
/// configuration that lists them, for the error) and is a regular file of at most `cap`
/// bytes.
pub fn open_in(path: &Path, dirs: &[PathBuf], setting: &str, cap: u64) -> Result<Opened, String> {
    if !path.is_absolute() {
        return Err(format!(
            "`{}` must be an absolute path inside {setting}",
            path.display()
        ));
    }
    let Some((dir, rel)) = dirs
        .iter()
        .find_map(|d| Some((d, path.strip_prefix(d).ok()?)))
    else {
        let listed = if dirs.is_empty() {
            "none configured".to_owned()
        } else {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "`{}` is not inside {setting} ({listed}): the agent reads such files only from \
             the directories the node config lists there",
            path.display()
        ));
    };
    open_beneath(dir, rel, cap).map_err(|e| format!("`{}` {e}", path.display()))
}

/// Opens `rel` inside `dir` (see the module documentation); the error says what is wrong
/// with the file, to be prefixed with its name.
pub fn open_beneath(dir: &Path, rel: &Path, cap: u64) -> Result<Opened, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if rel.as_os_str().is_empty() {
        return Err("is a directory, not a file".to_owned());
    }
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| format!("cannot be read: cannot open {}: {e}", dir.display()))?;
    let fd = sys::open_beneath(root.as_fd(), rel).map_err(|e| match e.raw_os_error() {
        Some(libc::EXDEV) => format!(
            "leaves {} (through `..` or a symlink pointing outside)",
            dir.display()
        ),
        Some(libc::ELOOP) => "is reached through a link the agent does not follow".to_owned(),
        Some(libc::ENOENT) => "does not exist".to_owned(),
        _ => format!("cannot be opened: {e}"),
    })?;
    check(File::from(fd), dir.join(rel), cap)
}

/// Opens `path` anywhere, following symlinks, with the same type and size checks: for files
/// the node itself provides (the system CA bundle), not policy.
pub fn open_trusted(path: &Path, cap: u64) -> Result<Opened, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("`{}` cannot be opened: {e}", path.display()))?;
    check(file, path.to_owned(), cap).map_err(|e| format!("`{}` {e}", path.display()))
}

fn check(file: File, path: PathBuf, cap: u64) -> Result<Opened, String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be examined: {e}"))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt as _;
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a plain file"
        };
        return Err(format!("is {what}; only regular files are read"));
    }
    if meta.size() > cap {
        return Err(too_large_rel(meta.size(), cap));
    }
    Ok(Opened {
        file,
        path,
        cap,
        stamp: Stamp::of(&meta),
    })
}

fn too_large(path: &Path, cap: u64) -> String {
    format!("`{}` is larger than {cap} bytes", path.display())
}

fn too_large_rel(size: u64, cap: u64) -> String {
    format!("is {size} bytes; at most {cap} are read")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("certs")).unwrap();
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        crate::sys::mkfifo(path, 0o600).unwrap();
    }

    #[test]
    fn only_regular_files_inside_the_listed_directories_are_read() {
        let s = Scratch::new("confine");
        let certs = s.0.join("certs");
        let dirs = [certs.clone()];
        let open = |p: &Path| open_in(p, &dirs, "policy.certDirs", 64).map(|o| o.read());
        std::fs::write(certs.join("ok.pem"), b"pem").unwrap();
        assert_eq!(&open(&certs.join("ok.pem")).unwrap().unwrap()[..], b"pem");

        // Outside the directories, or none configured.
        let e = open(Path::new("/dev/zero")).err().unwrap();
        assert!(e.contains("not inside policy.certDirs"), "{e}");
        let e = open_in(&certs.join("ok.pem"), &[], "policy.certDirs", 64)
            .err()
            .unwrap();
        assert!(e.contains("none configured"), "{e}");
        // `..` and symlinks out of the directory.
        std::fs::write(s.0.join("secret"), b"x").unwrap();
        let e = open(&certs.join("../secret")).err().unwrap();
        assert!(e.contains("leaves"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", certs.join("zero.pem")).unwrap();
        let e = open(&certs.join("zero.pem")).err().unwrap();
        assert!(e.contains("leaves"), "{e}");
        std::os::unix::fs::symlink("../secret", certs.join("up.pem")).unwrap();
        assert!(open(&certs.join("up.pem")).is_err());
        // A relative link that stays inside works (a mounted Secret's `..data` links).
        std::fs::create_dir(certs.join("..data")).unwrap();
        std::fs::write(certs.join("..data/tls.crt"), b"crt").unwrap();
        std::os::unix::fs::symlink("..data/tls.crt", certs.join("tls.crt")).unwrap();
        assert_eq!(&open(&certs.join("tls.crt")).unwrap().unwrap()[..], b"crt");
        // Not a regular file: a FIFO does not block, a directory is named.
        mkfifo(&certs.join("fifo.pem"));
        let e = open(&certs.join("fifo.pem")).err().unwrap();
        assert!(e.contains("a FIFO"), "{e}");
        let e = open(&certs.join("..data")).err().unwrap();
        assert!(e.contains("a directory"), "{e}");
        // Too large.
        std::fs::write(certs.join("big.pem"), vec![b'a'; 65]).unwrap();
        let e = open(&certs.join("big.pem")).err().unwrap();
        assert!(e.contains("65 bytes"), "{e}");
        // Relative paths are refused.
        let e = open(Path::new("certs/ok.pem")).err().unwrap();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn stamps_change_with_the_file_and_fingerprints_cover_fresh_rewrites() {
        let s = Scratch::new("stamp");
        let certs = s.0.join("certs");
        let f = certs.join("a.pem");
        std::fs::write(&f, b"one").unwrap();
        let open = || open_in(&f, std::slice::from_ref(&certs), "x", 64).unwrap();
        let first = open().stamp;
        assert_eq!(open().stamp, first);
        // A same-size rewrite within the same clock tick may keep the stamp; the fingerprint
        // of a fresh file includes the contents, so it still differs.
        let fp = open().fingerprint();
        std::fs::write(&f, b"two").unwrap();
        assert_ne!(open().fingerprint(), fp);
        assert!(!open().stamp.settled());
    }
}
