//! The state directory: one YAML file per object, written atomically, owned by one server.
//!
//! Layout: `objects/{plural.group}/{namespace}/{name}.yaml`, plus `revision` (the last
//! resourceVersion handed out, so versions keep increasing across restarts even after the
//! newest object was deleted) and `lock` (held with an OS file lock while a server runs).
//! Every write is temp file → fsync → rename → fsync of the directory, so after `kill -9`
//! a file holds either the old or the new object, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where one object lives: resource (`plural.group`), namespace ("" if cluster-scoped), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `plural.group` of the resource.
    pub resource: String,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

/// Directory name for cluster-scoped objects; cannot collide with a namespace (not DNS-1123).
const CLUSTER_SCOPE_DIR: &str = "_cluster";

/// A state file that could not be loaded. It is reported and left untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedFile {
    /// The file.
    pub path: PathBuf,
    /// The key the file's location claims, if the location itself is well formed.
    pub key: Option<ObjectKey>,
    /// Why it was skipped.
    pub reason: String,
}

/// What was found in the state directory at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every well-formed object, with its key.
    pub objects: Vec<(ObjectKey, Value)>,
    /// Files that were reported and skipped.
    pub skipped: Vec<SkippedFile>,
    /// The persisted revision counter (0 when absent).
    pub revision: u64,
}

/// Why the state directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another server holds the lock.
    #[error(
        "the state directory {dir} is in use by another previewd ({holder}); stop it or choose another --state-dir"
    )]
    Locked {
        /// The directory.
        dir: String,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The directory could not be created or read.
    #[error("cannot use the state directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A loaded object could not be encoded for keeping in memory.
    #[error("cannot keep a loaded object in memory: {0}")]
    Encode(String),
}

/// An opened, locked state directory.
#[derive(Debug)]
pub struct Disk {
    root: PathBuf,
    /// Held for the life of the server; the OS releases the lock when the process dies.
    _lock: File,
}

impl Disk {
    /// Opens (creating if needed) and locks `root`, then loads every object file.
    pub fn open(root: &Path) -> Result<(Disk, Loaded), OpenError> {
        let io_err = |source| OpenError::Io {
            dir: root.display().to_string(),
            source,
        };
        fs::create_dir_all(root.join("objects")).map_err(io_err)?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        let lock_path = root.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path)
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                let holder = if holder.is_empty() {
                    "unknown process".to_owned()
                } else {
                    holder
                };
                return Err(OpenError::Locked {
                    dir: root.display().to_string(),
                    holder,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        lock.set_len(0).map_err(io_err)?;
        writeln!(lock, "pid {}", std::process::id()).map_err(io_err)?;
        let disk = Disk {
            root: root.to_owned(),
            _lock: lock,
        };
        let loaded = disk.load().map_err(io_err)?;
        Ok((disk, loaded))
    }

    fn object_path(&self, key: &ObjectKey) -> PathBuf {
        let ns = if key.namespace.is_empty() {
            CLUSTER_SCOPE_DIR
        } else {
            &key.namespace
        };
        self.root
            .join("objects")
            .join(&key.resource)
            .join(ns)
            .join(format!("{}.yaml", key.name))
    }

    /// The file an object is (or would be) stored in, for messages.
    pub fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.object_path(key)
    }

    fn load(&self) -> io::Result<Loaded> {
        let mut loaded = Loaded {
            revision: self.read_revision(),
            ..Loaded::default()
        };
        let objects = self.root.join("objects");
        for resource in read_dir_sorted(&objects)? {
            for ns_dir in read_dir_sorted(&resource)? {
                for file in read_dir_sorted(&ns_dir)? {
                    let Some(key) = key_for(&resource, &ns_dir, &file) else {
                        // Our own temp files from an interrupted write, or foreign files.
                        if !is_temp_file(&file) {
                            loaded.skipped.push(SkippedFile {
                                path: file.clone(),
                                key: None,
                                reason: "not a .yaml object file".into(),
                            });
                        }
                        continue;
                    };
                    match read_object(&file, &key) {
                        Ok(obj) => loaded.objects.push((key, obj)),
                        Err(reason) => loaded.skipped.push(SkippedFile {
                            path: file.clone(),
                            key: Some(key),
                            reason,
                        }),
                    }
                }
            }
        }
        Ok(loaded)
    }

    fn read_revision(&self) -> u64 {
        fs::read_to_string(self.root.join("revision"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Durably records the revision counter (needed before deleting the newest object).
    pub fn write_revision(&self, revision: u64) -> io::Result<()> {
        atomic_write(
            &self.root.join("revision"),
            format!("{revision}\n").as_bytes(),
        )
    }

    /// Durably writes one object.
    pub fn write(&self, key: &ObjectKey, yaml: &[u8]) -> io::Result<()> {
        let path = self.object_path(key);
        if let Some(dir) = path.parent() {
            ensure_dir(dir)?;
        }
        atomic_write(&path, yaml)
    }

    /// Durably removes one object's file.
    pub fn remove(&self, key: &ObjectKey) -> io::Result<()> {
        let path = self.object_path(key);
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.contains(".tmp"))
}

fn key_for(resource: &Path, ns_dir: &Path, file: &Path) -> Option<ObjectKey> {
    let name = file.file_name()?.to_str()?.strip_suffix(".yaml")?;
    if name.starts_with('.') {
        return None;
    }
    let ns = ns_dir.file_name()?.to_str()?;
    Some(ObjectKey {
        resource: resource.file_name()?.to_str()?.to_owned(),
        namespace: if ns == CLUSTER_SCOPE_DIR {
            String::new()
        } else {
            ns.to_owned()
        },
        name: name.to_owned(),
    })
}

/// Reads and checks one object file (see [`parse_object`]).
fn read_object(path: &Path, key: &ObjectKey) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("unreadable: {e}"))?;
    parse_object(&text, key)
}

/// Checks one object file's text: YAML, a mapping, and metadata that agrees with where
/// the file lives (`key`).
pub(crate) fn parse_object(text: &str, key: &ObjectKey) -> Result<Value, String> {
    let obj: Value = serde_yaml::from_str(text).map_err(|e| format!("malformed YAML: {e}"))?;
    if !obj.is_object() {
        return Err("not a YAML mapping".into());
    }
    let field = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if field("/metadata/name") != key.name || field("/metadata/namespace") != key.namespace {
        return Err(format!(
            "metadata says {}/{}, but the file's location says {}/{}",
            field("/metadata/namespace"),
            field("/metadata/name"),
            key.namespace,
            key.name
        ));
    }
    if field("/metadata/resourceVersion").parse::<u64>().is_err() {
        return Err("metadata.resourceVersion is missing or not a number".into());
    }
    Ok(obj)
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    // Make the new directory entries themselves durable.
    let mut d = dir;
    while let Some(parent) = d.parent() {
        File::open(parent)?.sync_all()?;
        if parent.join("lock").exists() {
            break;
        }
        d = parent;
    }
    Ok(())
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// temp file in the same directory → write → fsync → rename over the target → fsync dir.
fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent directory"))?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            resource: "previewlinks.previewd.dev".into(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn yaml(name: &str, rv: u64) -> Vec<u8> {
        serde_yaml::to_string(&json!({"metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string()}}))
            .unwrap_or_default()
            .into_bytes()
    }

    #[test]
    fn objects_round_trip_and_malformed_files_are_skipped_untouched() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (disk, loaded) = Disk::open(dir.path()).map_err(io::Error::other)?;
            assert!(loaded.objects.is_empty());
            disk.write(&key("a"), &yaml("a", 3))?;
            disk.write(&key("b"), &yaml("b", 4))?;
            disk.write_revision(5)?;
        }
        let bad = dir
            .path()
            .join("objects/previewlinks.previewd.dev/default/broken.yaml");
        fs::write(&bad, "metadata: [unclosed")?;
        let misplaced = dir
            .path()
            .join("objects/previewlinks.previewd.dev/default/c.yaml");
        fs::write(&misplaced, yaml("not-c", 1))?;
        let (_disk, loaded) = Disk::open(dir.path()).map_err(io::Error::other)?;
        let names: Vec<_> = loaded
            .objects
            .iter()
            .map(|(k, _)| k.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(loaded.revision, 5);
        assert_eq!(loaded.skipped.len(), 2);
        assert!(
            loaded
                .skipped
                .iter()
                .any(|s| s.path == bad && s.reason.contains("malformed YAML"))
        );
        assert_eq!(fs::read_to_string(&bad)?, "metadata: [unclosed");
        Ok(())
    }

    #[test]
    fn a_second_opener_is_refused_with_the_holder() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let _first = Disk::open(dir.path()).map_err(io::Error::other)?;
        match Disk::open(dir.path()) {
            Err(OpenError::Locked { holder, .. }) => {
                assert!(holder.contains(&std::process::id().to_string()))
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn remove_is_idempotent() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (disk, _) = Disk::open(dir.path()).map_err(io::Error::other)?;
        disk.write(&key("a"), &yaml("a", 1))?;
        disk.remove(&key("a"))?;
        disk.remove(&key("a"))?;
        assert!(!disk.path_of(&key("a")).exists());
        Ok(())
    }
}
