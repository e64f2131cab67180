//! What a node left on disk: every directory and file under its data directory.

use std::path::{Path, PathBuf};

/// Every directory (`dir` included) and every file under `dir`; unreadable entries are skipped.
pub fn walk(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut files) = (vec![dir.to_path_buf()], Vec::new());
    let mut i = 0;
    while let Some(d) = dirs.get(i).cloned() {
        i += 1;
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(_) => files.push(entry.path()),
                Err(_) => {}
            }
        }
    }
    (dirs, files)
}

/// The files under `dir` (other than `except`) holding any of `needles`, with the needle.
pub fn containing(dir: &Path, needles: &[String], except: &[&str]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    for path in walk(dir).1 {
        if path
            .file_name()
            .is_some_and(|n| except.iter().any(|e| n == *e))
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push((path.clone(), n.clone()));
            }
        }
    }
    found
}
