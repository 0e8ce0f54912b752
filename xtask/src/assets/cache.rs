//! Content keys, key files and small filesystem helpers for the asset cache.
//!
//! Every asset `<dir>/<file>` has a key file `<dir>/<file>.key` (JSON, [`KeyRecord`]) that
//! records the sha256 of every input the asset was built from, the sha256 and size of the
//! output, and a human-readable description of the inputs (which the manifest repeats).
//! When the key computed from the current inputs matches the recorded one and the output is
//! still there with the recorded size, the asset is fresh and nothing is rebuilt.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Builds a content key: a sha256 over labelled, length-prefixed fields, so that moving
/// bytes from one field to the next always changes the key.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    hasher: Sha256,
}

impl KeyBuilder {
    /// Starts a key for one kind of asset (the kind is hashed too).
    pub fn new(kind: &str) -> Self {
        let mut k = Self {
            hasher: Sha256::new(),
        };
        k.field("kind", kind.as_bytes());
        k
    }

    /// Adds one labelled field.
    pub fn field(&mut self, label: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let value = value.as_ref();
        for part in [label.as_bytes(), value] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// Adds a file's contents, labelled with `label`.
    pub fn file(&mut self, label: &str, path: &Path) -> Result<&mut Self> {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(self.field(label, data))
    }

    /// Adds every file below `dir` (sorted, see [`list_files`]), each labelled with its path
    /// relative to `base`.
    pub fn tree(&mut self, base: &Path, dir: &Path) -> Result<&mut Self> {
        for file in list_files(dir)? {
            let rel = file.strip_prefix(base).unwrap_or(&file);
            self.file(&format!("file:{}", rel.display()), &file)?;
        }
        Ok(self)
    }

    /// The key as lowercase hex.
    pub fn finish(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// Lists regular files below `dir`, recursively, sorted by path. Skips `target/` and
/// dot-directories (build outputs and VCS data are not inputs).
pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ty = entry
                .file_type()
                .with_context(|| format!("stat {}", path.display()))?;
            if ty.is_dir() {
                if name == "target" || name.starts_with('.') {
                    continue;
                }
                stack.push(path);
            } else if ty.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// sha256 of a file, streamed, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of a byte string, as lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// What a key file records about one built asset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Asset name (`kernel`, `agent`, `initramfs`, `image:raw`, ...).
    pub asset: String,
    /// The content key of all inputs.
    pub key: String,
    /// File name of the output, relative to the cache directory.
    pub file: String,
    /// sha256 of the output file.
    pub sha256: String,
    /// Size of the output file in bytes.
    pub size: u64,
    /// Wall time the build took, in seconds.
    pub build_seconds: f64,
    /// Description of the inputs (hashes, versions, revisions).
    pub inputs: BTreeMap<String, serde_json::Value>,
}

/// Path of the key file that belongs to `output`.
pub fn key_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".key");
    PathBuf::from(s)
}

/// Reads the key record of `output`, if there is a readable one.
pub fn read_record(output: &Path) -> Option<KeyRecord> {
    let text = fs::read_to_string(key_path(output)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Returns the record of `output` when it was built from `key` and is still intact
/// (present with the recorded size); `None` means the asset must be (re)built.
pub fn fresh(output: &Path, key: &str) -> Option<KeyRecord> {
    let rec = read_record(output)?;
    let meta = fs::metadata(output).ok()?;
    (rec.key == key && meta.is_file() && meta.len() == rec.size).then_some(rec)
}

/// Hashes `output` and writes its key file.
pub fn write_record(
    asset: &str,
    output: &Path,
    key: &str,
    build_seconds: f64,
    inputs: BTreeMap<String, serde_json::Value>,
) -> Result<KeyRecord> {
    let size = fs::metadata(output)
        .with_context(|| format!("stat {}", output.display()))?
        .len();
    let file = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rec = KeyRecord {
        asset: asset.to_owned(),
        key: key.to_owned(),
        file,
        sha256: sha256_file(output)?,
        size,
        build_seconds: (build_seconds * 10.0).round() / 10.0,
        inputs,
    };
    let json = serde_json::to_vec_pretty(&rec).context("serialising key record")?;
    write_atomic(&key_path(output), &json)?;
    Ok(rec)
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The temporary sibling used while `path` is being produced.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Removes a file or directory tree if it exists.
pub fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_field_boundaries_and_order() {
        let a = KeyBuilder::new("t")
            .field("a", "xy")
            .field("b", "z")
            .finish();
        let b = KeyBuilder::new("t")
            .field("a", "x")
            .field("b", "yz")
            .finish();
        let c = KeyBuilder::new("t")
            .field("b", "z")
            .field("a", "xy")
            .finish();
        let d = KeyBuilder::new("u")
            .field("a", "xy")
            .field("b", "z")
            .finish();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(
            a,
            KeyBuilder::new("t")
                .field("a", "xy")
                .field("b", "z")
                .finish()
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn tree_key_is_sorted_and_ignores_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/sub")).unwrap();
        fs::create_dir_all(root.join("target/debug")).unwrap();
        fs::write(root.join("src/b.rs"), "b").unwrap();
        fs::write(root.join("src/sub/a.rs"), "a").unwrap();
        fs::write(root.join("target/debug/junk"), "junk").unwrap();
        let files = list_files(root).unwrap();
        let rel: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(rel, ["src/b.rs", "src/sub/a.rs"]);

        let k1 = KeyBuilder::new("t").tree(root, root).unwrap().finish();
        fs::write(root.join("target/debug/junk"), "other").unwrap();
        let k2 = KeyBuilder::new("t").tree(root, root).unwrap().finish();
        assert_eq!(k1, k2, "target/ is not an input");
        fs::write(root.join("src/sub/a.rs"), "changed").unwrap();
        let k3 = KeyBuilder::new("t").tree(root, root).unwrap().finish();
        assert_ne!(k1, k3);
    }

    #[test]
    fn record_round_trip_and_freshness() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("thing.bin");
        fs::write(&out, b"hello").unwrap();
        assert!(fresh(&out, "k1").is_none(), "no key file yet");
        let rec = write_record("thing", &out, "k1", 1.23, BTreeMap::new()).unwrap();
        assert_eq!(rec.size, 5);
        assert_eq!(rec.sha256, sha256_bytes(b"hello"));
        assert_eq!(rec.file, "thing.bin");
        assert_eq!(fresh(&out, "k1"), Some(rec));
        assert!(fresh(&out, "k2").is_none(), "different inputs");
        fs::write(&out, b"truncated!").unwrap();
        assert!(fresh(&out, "k1").is_none(), "output changed size");
        fs::remove_file(&out).unwrap();
        assert!(fresh(&out, "k1").is_none(), "output missing");
    }
}
