//! The supervised child's output, kept on disk beside its state so previewd can say why a
//! daemon died: bounded (two rotated files of [`OUTPUT_FILE_BYTES`]) however much it writes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::agent::protocol::{OUTPUT_FILE, OUTPUT_FILE_BYTES, ROTATED_OUTPUT_FILE};

/// The output file being appended to; [`OutputLog::append`] rotates it when full.
#[derive(Debug)]
pub struct OutputLog {
    dir: PathBuf,
    file: File,
    len: u64,
    limit: u64,
}

impl OutputLog {
    /// Starts an empty log in `dir` (a previous run's output is dropped).
    pub fn create(dir: &Path) -> io::Result<OutputLog> {
        OutputLog::with_limit(dir, OUTPUT_FILE_BYTES)
    }

    fn with_limit(dir: &Path, limit: u64) -> io::Result<OutputLog> {
        match std::fs::remove_file(dir.join(ROTATED_OUTPUT_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(OutputLog {
            dir: dir.to_owned(),
            file: create_private(&dir.join(OUTPUT_FILE))?,
            len: 0,
            limit: limit.max(1),
        })
    }

    /// Appends `data`, rotating the file each time it reaches its limit, so the two files
    /// together never hold more than twice the limit.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.len >= self.limit {
                self.rotate()?;
            }
            let room = usize::try_from(self.limit - self.len).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(room.min(data.len()));
            self.file.write_all(now)?;
            self.len += now.len() as u64;
            data = rest;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let current = self.dir.join(OUTPUT_FILE);
        std::fs::rename(&current, self.dir.join(ROTATED_OUTPUT_FILE))?;
        self.file = create_private(&current)?;
        self.len = 0;
        Ok(())
    }
}

/// Creates (or truncates) `path` readable by its owner only: a daemon's output may hold
/// secrets. Never through a symlink, since the directory may be writable by others.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The last `lines` lines of the output kept in `dir`, at most `max_bytes` of them (the
/// end), invalid UTF-8 replaced. Missing files are no output.
pub fn tail(dir: &Path, lines: usize, max_bytes: usize) -> io::Result<String> {
    let mut all = Vec::new();
    // Oldest first; each file is bounded by the writer's limit, and reading is bounded too,
    // in case something else wrote there.
    for name in [ROTATED_OUTPUT_FILE, OUTPUT_FILE] {
        match File::open(dir.join(name)) {
            Ok(f) => {
                f.take(OUTPUT_FILE_BYTES.saturating_mul(2))
                    .read_to_end(&mut all)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(last_lines(&all, lines, max_bytes)).into_owned())
}

/// The suffix of `output` holding its last `lines` lines (a final newline ends the last
/// line rather than starting an empty one), cut to its last `max_bytes` bytes.
pub fn last_lines(output: &[u8], lines: usize, max_bytes: usize) -> &[u8] {
    let body = output.strip_suffix(b"\n").unwrap_or(output);
    let start = if lines == 0 {
        output.len()
    } else {
        body.iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(lines - 1)
            .map_or(0, |(i, _)| i + 1)
    };
    let start = start.max(output.len().saturating_sub(max_bytes));
    output.get(start..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_counts_lines_and_bytes() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2, 100), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2, 100), b"b\nc");
        assert_eq!(last_lines(b"a\nb\nc\n", 10, 100), b"a\nb\nc\n");
        assert_eq!(last_lines(b"a\nb\nc\n", 0, 100), b"");
        assert_eq!(last_lines(b"", 3, 100), b"");
        assert_eq!(last_lines(b"\n\n\n", 2, 100), b"\n\n");
        assert_eq!(last_lines(b"one long line\n", 5, 5), b"line\n");
        assert_eq!(last_lines(b"x\nabcdef", 1, 3), b"def");
    }

    #[test]
    fn the_log_rotates_and_never_holds_more_than_twice_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OutputLog::with_limit(dir.path(), 100).unwrap();
        let mut written = Vec::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            log.append(line.as_bytes()).unwrap();
            written.extend_from_slice(line.as_bytes());
            let size = |n| std::fs::metadata(dir.path().join(n)).map_or(0, |m| m.len());
            assert!(size(OUTPUT_FILE) <= 100);
            assert!(size(ROTATED_OUTPUT_FILE) <= 100);
        }
        // One chunk larger than both files keeps only its end.
        let big: Vec<u8> = (0..1000u32)
            .flat_map(|i| format!("{i:04}\n").into_bytes())
            .collect();
        log.append(&big).unwrap();
        let kept = [ROTATED_OUTPUT_FILE, OUTPUT_FILE]
            .iter()
            .flat_map(|n| std::fs::read(dir.path().join(n)).unwrap())
            .collect::<Vec<_>>();
        assert!(kept.len() <= 200 && kept.len() > 100, "{}", kept.len());
        assert!(big.ends_with(&kept), "the newest bytes are kept, in order");
        assert_eq!(tail(dir.path(), 2, 2048).unwrap(), "0998\n0999\n");
    }

    #[test]
    fn the_tail_spans_the_rotated_file_and_a_new_log_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = OutputLog::with_limit(dir.path(), 8).unwrap();
        log.append(b"first\nsecond\n").unwrap();
        assert_eq!(tail(dir.path(), 2, 2048).unwrap(), "first\nsecond\n");
        drop(log);
        OutputLog::with_limit(dir.path(), 8).unwrap();
        assert_eq!(tail(dir.path(), 2, 2048).unwrap(), "");
        assert!(!dir.path().join(ROTATED_OUTPUT_FILE).exists());
    }

    #[test]
    fn the_log_is_private_and_never_written_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        OutputLog::create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(OUTPUT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let elsewhere = dir.path().join("victim");
        std::fs::write(&elsewhere, b"keep").unwrap();
        std::fs::remove_file(dir.path().join(OUTPUT_FILE)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(OUTPUT_FILE)).unwrap();
        assert!(OutputLog::create(dir.path()).is_err());
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
    }
}
