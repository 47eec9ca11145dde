//! Notices when the config file or a file it names (secrets, certificates) changes, so the proxy can
//! reload by itself: Kubernetes updates mounted Secrets and ConfigMaps in place, and cert-manager
//! rotates certificates the same way.
//!
//! It polls each file's metadata, following symlinks, rather than using inotify: Kubernetes swaps a
//! `..data` symlink to a new directory, so a watch on the file itself (or its directory) misses the
//! change or has to be re-armed, while a stat a second of a handful of files costs nothing and sees
//! every kind of replacement (rename, symlink swap, rewrite in place).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What identifies one version of a file; `None` while it cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    /// The inode change time: no program can set it back (`cp -p`, `rsync -t` and `tar x` restore the
    /// mtime of a same-size rewrite), and `chmod` moves it too (a file that becomes readable).
    changed: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
        changed: (m.ctime(), m.ctime_nsec()),
    })
}

/// The files being watched and how they looked when last seen.
#[derive(Debug, Default)]
pub struct FileWatch {
    seen: Vec<(PathBuf, Option<Stamp>)>,
    /// A change was seen and the files have not settled yet.
    pending: bool,
}

impl FileWatch {
    pub fn new(paths: Vec<PathBuf>) -> FileWatch {
        let mut watch = FileWatch::default();
        watch.watch(paths);
        watch
    }

    /// Also watches `paths`, taken as they are now; called before a reload reads them, so that a file
    /// written between that read and [`FileWatch::watch`] is a change (paths watched already keep the
    /// version last seen).
    pub fn add(&mut self, paths: Vec<PathBuf>) {
        let mut all: Vec<PathBuf> = self.seen.iter().map(|(p, _)| p.clone()).collect();
        all.extend(paths);
        self.watch(all);
    }

    /// Watches `paths` from now on. A path watched already keeps the version last seen, not the one now:
    /// a file written while a reload was loading is a change the next poll reports. New paths are taken
    /// as they are now.
    pub fn watch(&mut self, mut paths: Vec<PathBuf>) {
        paths.sort();
        paths.dedup();
        let old = std::mem::take(&mut self.seen);
        self.seen = paths
            .into_iter()
            .map(|path| {
                let seen = match old.iter().find(|(p, _)| *p == path) {
                    Some((_, seen)) => *seen,
                    None => stamp(&path),
                };
                (path, seen)
            })
            .collect();
    }

    /// Looks at every file once; true when a change seen earlier has settled: no file changed since the
    /// last look (so several files written one after another, or a file written in steps, reload once,
    /// after the last write). Call it at a steady pace; the debounce is one period.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        for (path, seen) in &mut self.seen {
            let now = stamp(path);
            if now != *seen {
                *seen = now;
                changed = true;
            }
        }
        if changed {
            self.pending = true;
            return false;
        }
        std::mem::replace(&mut self.pending, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once_the_files_settle_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        let mut watch = FileWatch::new(vec![a.clone(), b.clone(), a.clone()]);
        assert!(!watch.poll(), "nothing changed");
        std::fs::write(&a, "22").unwrap();
        assert!(!watch.poll(), "changed just now: wait one period");
        std::fs::write(&b, "appeared").unwrap();
        assert!(!watch.poll(), "still changing");
        assert!(watch.poll(), "settled");
        assert!(!watch.poll(), "reported once");
    }

    #[test]
    fn a_file_written_while_a_reload_loads_is_a_change_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, secret) = (dir.path().join("config"), dir.path().join("secret"));
        std::fs::write(&config, "v1").unwrap();
        let mut watch = FileWatch::new(vec![config.clone()]);
        // Before the reload: the secret the config now names is stamped as it is (missing).
        watch.add(vec![secret.clone()]);
        // The reload reads (and fails on) the missing file; the secret arrives before the watch is reset.
        std::fs::write(&secret, "s1").unwrap();
        watch.watch(vec![config, secret]);
        assert!(!watch.poll());
        assert!(watch.poll(), "the file that arrived during the reload reloads again");
    }

    #[test]
    fn a_symlink_swapped_to_a_new_target_is_a_change() {
        // How Kubernetes updates a mounted Secret: `key -> ..data/key`, and `..data` is swapped.
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("key"), "same").unwrap();
        std::fs::write(v2.join("key"), "same").unwrap();
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink(&v1, &data).unwrap();
        let key = dir.path().join("key");
        std::os::unix::fs::symlink(data.join("key"), &key).unwrap();
        let mut watch = FileWatch::new(vec![key]);
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&v2, &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        assert!(!watch.poll());
        assert!(watch.poll(), "the same bytes in a new file are a new version");
    }

    /// A rewrite in place that keeps the size, with the mtime put back (`cp -p`, `tar x`, `rsync -t
    /// --inplace`), is noticed: the ctime, which user space cannot set, changed. (The pause lets the
    /// kernel's coarse clock, which stamps ctime, move on.)
    #[test]
    fn a_same_size_rewrite_with_the_same_mtime_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api-key");
        std::fs::write(&file, "key-one-0001").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let mut watch = FileWatch::new(vec![file.clone()]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, "key-two-0002").unwrap();
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
        let reported = (0..3).any(|_| watch.poll());
        assert!(reported, "new content, same inode/len/mtime: the change is missed");
    }
}
