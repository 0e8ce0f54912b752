//! The file operations the limiter performs on cgroupfs, behind a trait so that tests can
//! emulate cgroupfs semantics (and its failures) on an ordinary directory tree.

use std::fmt;
use std::io::Write;
use std::path::Path;

/// File operations on a cgroup v2 file system.
pub trait CgroupFs: Send + Sync + fmt::Debug {
    /// Reads a whole interface file.
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Writes `value` to an existing interface file in one `write(2)`.
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
    /// Creates a cgroup directory (its parent must exist).
    fn create_dir(&self, path: &Path) -> std::io::Result<()>;
    /// Removes an empty cgroup directory (`rmdir(2)`).
    fn remove_dir(&self, path: &Path) -> std::io::Result<()>;
}

/// The real file system. Writes never create files: cgroupfs interface files exist or the
/// controller is not enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl CgroupFs for RealFs {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(value.as_bytes())
    }

    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
}
