//! Which host files a DaemonInjection may name as its daemon (`spec.daemon.source.hostPath`).
//!
//! The file is read by previewd and copied into a container, so whoever may create a
//! DaemonInjection could otherwise copy any file previewd can read (a private key, a mode-0600
//! config, previewd's own service-account token) into a container they control. Only regular
//! executable files inside directories the operator names (`--daemon-source-dir`) are
//! accepted, after symlinks are resolved; none by default, and never when previewd runs in a
//! cluster. The embedded API admits objects with this policy, and the controller checks it
//! again when it reads the file (which may have changed since).

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The flag that names the allowed directories, for messages.
pub const FLAG: &str = "--daemon-source-dir";

/// Where daemon binaries may come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonSourcePolicy {
    /// From these directories (canonical paths); none when empty.
    Directories(Vec<PathBuf>),
    /// From nowhere: previewd runs in a cluster, where the host is previewd's own pod.
    InCluster,
}

/// The largest daemon binary read (it is sent to the container in one upload).
pub const MAX_BYTES: u64 = 512 * 1024 * 1024;

impl DaemonSourcePolicy {
    /// The operator's directories, each resolved to its canonical path (a directory that
    /// does not exist is an error at start-up, not a silent hole).
    pub fn directories(dirs: &[PathBuf]) -> Result<Self, String> {
        dirs.iter()
            .map(|d| {
                let canonical =
                    std::fs::canonicalize(d).map_err(|e| format!("{FLAG} {}: {e}", d.display()))?;
                if !canonical.is_dir() {
                    return Err(format!("{FLAG} {}: not a directory", d.display()));
                }
                Ok(canonical)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(DaemonSourcePolicy::Directories)
    }

    /// The canonical path of `path` if a daemon may be read from it, or why not.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        let dirs = match self {
            DaemonSourcePolicy::InCluster => {
                return Err(
                    "host-path daemon sources are refused when previewd runs in a cluster: the host is previewd's own pod, and its files (the service-account token) are not for tenants".into(),
                );
            }
            DaemonSourcePolicy::Directories(dirs) => dirs,
        };
        if dirs.is_empty() {
            return Err(format!(
                "{path} is not allowed: previewd serve accepts host-path daemons only from directories named with {FLAG} (none is)"
            ));
        }
        let canonical = std::fs::canonicalize(path).map_err(|e| format!("{path}: {e}"))?;
        if !dirs.iter().any(|d| canonical.starts_with(d)) {
            return Err(format!(
                "{path} (resolved to {}) is not inside a directory allowed with {FLAG}",
                canonical.display()
            ));
        }
        let meta = std::fs::metadata(&canonical).map_err(|e| format!("{path}: {e}"))?;
        check_file(path, &meta)?;
        Ok(canonical)
    }

    /// The daemon binary at `path`, read only if [`resolve`](Self::resolve) allows it, from
    /// the file the resolved path names when opened (not following a symlink swapped in
    /// since), and checked again once open.
    pub fn read(&self, path: &str) -> Result<bytes::Bytes, String> {
        let canonical = self.resolve(path)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&canonical)
            .map_err(|e| format!("cannot read the daemon binary {path}: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read the daemon binary {path}: {e}"))?;
        check_file(path, &meta)?;
        // What was opened is still where it was resolved to (no directory was swapped).
        let opened = opened_path(&file);
        if opened.as_deref() != Some(canonical.as_path()) {
            return Err(format!("{path} changed while it was being read"));
        }
        let mut contents = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.by_ref()
            .take(MAX_BYTES + 1)
            .read_to_end(&mut contents)
            .map_err(|e| format!("cannot read the daemon binary {path}: {e}"))?;
        if contents.len() as u64 > MAX_BYTES {
            return Err(format!(
                "the daemon binary {path} is larger than {MAX_BYTES} bytes"
            ));
        }
        Ok(contents.into())
    }
}

/// A regular file, executable by someone, of at most [`MAX_BYTES`].
fn check_file(path: &str, meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{path} is not executable"));
    }
    if meta.len() > MAX_BYTES {
        return Err(format!(
            "the daemon binary {path} is larger than {MAX_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The path an open file descriptor names, as the kernel sees it.
fn opened_path(file: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(Path::new("/proc/self/fd").join(file.as_raw_fd().to_string())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(path: &Path, mode: u32) {
        std::fs::write(path, b"\x7fELF binary").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn only_executables_inside_allowed_directories_are_read() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let allowed = root.path().join("daemons");
        let outside = root.path().join("secrets");
        std::fs::create_dir_all(&allowed).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(&outside).unwrap_or_else(|e| panic!("{e}"));
        executable(&allowed.join("ok"), 0o755);
        executable(&allowed.join("plain"), 0o644);
        executable(&outside.join("key"), 0o700);
        std::os::unix::fs::symlink(outside.join("key"), allowed.join("link"))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(allowed.join("dir")).unwrap_or_else(|e| panic!("{e}"));
        let policy = DaemonSourcePolicy::directories(std::slice::from_ref(&allowed))
            .unwrap_or_else(|e| panic!("{e}"));
        let p = |name: &Path| name.to_string_lossy().into_owned();

        assert!(policy.read(&p(&allowed.join("ok"))).is_ok());
        for (bad, why) in [
            (p(&outside.join("key")), "not inside"),
            (p(&allowed.join("link")), "not inside"),
            (
                format!("{}/../secrets/key", allowed.display()),
                "not inside",
            ),
            (p(&allowed.join("plain")), "not executable"),
            (p(&allowed.join("dir")), "not a regular file"),
            ("/etc/shadow".into(), "not inside"),
        ] {
            let err = policy.read(&bad).err().unwrap_or_default();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let none = DaemonSourcePolicy::directories(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            none.read(&p(&allowed.join("ok")))
                .err()
                .is_some_and(|e| e.contains(FLAG))
        );
        assert!(
            DaemonSourcePolicy::InCluster
                .read(&p(&allowed.join("ok")))
                .is_err()
        );
        assert!(DaemonSourcePolicy::directories(&[root.path().join("missing")]).is_err());
    }
}
