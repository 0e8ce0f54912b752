//! A cgroup v2 emulation on an ordinary directory tree, for tests.
//!
//! It reproduces the semantics the limiter relies on: `mkdir` populates interface files
//! (controllers inherited from the parent's `subtree_control`), writes never create files,
//! writing a pid to `cgroup.procs` moves it out of every other cgroup, the "no internal
//! processes" rule (EBUSY), `rmdir` refused while processes or children remain (EBUSY),
//! and injectable permission errors.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::fs::CgroupFs;

#[derive(Debug)]
pub(crate) struct FakeCgroupFs {
    root: PathBuf,
    /// Path suffixes (relative to the root, or a file name) for which every operation
    /// fails with EACCES.
    denied: Mutex<Vec<String>>,
    /// The next N `rmdir`s fail with EBUSY.
    pub busy_rmdirs: AtomicU32,
}

fn os_err(code: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(code)
}

impl FakeCgroupFs {
    /// A v2 root offering `controllers`.
    pub(crate) fn new(root: &Path, controllers: &str) -> Self {
        std::fs::create_dir_all(root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "\n").unwrap();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        std::fs::write(root.join("cpu.stat"), "usage_usec 0\n").unwrap();
        Self {
            root: root.to_path_buf(),
            denied: Mutex::new(Vec::new()),
            busy_rmdirs: AtomicU32::new(0),
        }
    }

    pub(crate) fn deny(&self, suffix: &str) {
        self.denied.lock().unwrap().push(suffix.to_owned());
    }

    fn check(&self, path: &Path) -> std::io::Result<()> {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let denied = self.denied.lock().unwrap();
        if denied.iter().any(|d| rel.ends_with(d)) {
            return Err(os_err(libc::EACCES));
        }
        Ok(())
    }

    fn is_root(&self, dir: &Path) -> bool {
        dir == self.root
    }

    fn all_procs_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let p = entry.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.file_name().is_some_and(|n| n == "cgroup.procs") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    fn has_procs(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    }

    fn subtree_enabled(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join("cgroup.subtree_control"))
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    }
}

impl CgroupFs for FakeCgroupFs {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.check(path)?;
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        self.check(path)?;
        if !path.is_file() {
            return Err(if path.is_dir() {
                os_err(libc::EISDIR)
            } else {
                os_err(libc::ENOENT)
            });
        }
        let dir = path.parent().unwrap();
        match path.file_name().and_then(|n| n.to_str()) {
            Some("cgroup.procs") => {
                let pid: u32 = value.trim().parse().map_err(|_| os_err(libc::EINVAL))?;
                if !self.is_root(dir) && Self::subtree_enabled(dir) {
                    return Err(os_err(libc::EBUSY));
                }
                for procs in self.all_procs_files() {
                    let kept: Vec<String> = std::fs::read_to_string(&procs)?
                        .split_whitespace()
                        .filter(|p| *p != pid.to_string())
                        .map(|p| format!("{p}\n"))
                        .collect();
                    std::fs::write(&procs, kept.concat())?;
                }
                let mut current = std::fs::read_to_string(path)?;
                current.push_str(&format!("{pid}\n"));
                std::fs::write(path, current)
            }
            Some("cgroup.subtree_control") => {
                let available = std::fs::read_to_string(dir.join("cgroup.controllers"))?;
                let mut enabled: Vec<String> = std::fs::read_to_string(path)?
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                for token in value.split_whitespace() {
                    if let Some(c) = token.strip_prefix('+') {
                        if !available.split_whitespace().any(|a| a == c) {
                            return Err(os_err(libc::ENOENT));
                        }
                        if !self.is_root(dir) && Self::has_procs(dir) {
                            return Err(os_err(libc::EBUSY));
                        }
                        if !enabled.iter().any(|e| e == c) {
                            enabled.push(c.to_owned());
                        }
                    } else if let Some(c) = token.strip_prefix('-') {
                        enabled.retain(|e| e != c);
                    } else {
                        return Err(os_err(libc::EINVAL));
                    }
                }
                std::fs::write(path, format!("{}\n", enabled.join(" ")))
            }
            _ => std::fs::write(path, value),
        }
    }

    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        self.check(path)?;
        std::fs::create_dir(path)?;
        let parent = path.parent().unwrap();
        let controllers = std::fs::read_to_string(parent.join("cgroup.subtree_control"))?;
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        let mut files = vec![
            ("cgroup.controllers", controllers.clone()),
            ("cgroup.subtree_control", "\n".to_owned()),
            ("cgroup.procs", String::new()),
            (
                "cpu.stat",
                "usage_usec 0\nuser_usec 0\nsystem_usec 0\n".to_owned(),
            ),
        ];
        if has("memory") {
            files.extend([
                ("memory.max", "max\n".to_owned()),
                ("memory.high", "max\n".to_owned()),
                ("memory.peak", "0\n".to_owned()),
                ("memory.oom.group", "0\n".to_owned()),
            ]);
        }
        if has("cpu") {
            files.push(("cpu.max", "max 100000\n".to_owned()));
        }
        if has("pids") {
            files.push(("pids.max", "max\n".to_owned()));
        }
        for (name, content) in files {
            std::fs::write(path.join(name), content)?;
        }
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        self.check(path)?;
        if !path.exists() {
            return Err(os_err(libc::ENOENT));
        }
        if self
            .busy_rmdirs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(os_err(libc::EBUSY));
        }
        if Self::has_procs(path) {
            return Err(os_err(libc::EBUSY));
        }
        for entry in std::fs::read_dir(path)?.flatten() {
            if entry.path().is_dir() {
                return Err(os_err(libc::EBUSY));
            }
        }
        std::fs::remove_dir_all(path)
    }
}
