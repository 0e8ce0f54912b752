//! `manifest.json`: every asset in the cache directory with its sha256, size and inputs,
//! assembled from the key files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::cache::{self, KeyRecord};

/// File name of the manifest in the cache directory.
pub const FILE: &str = "manifest.json";
/// Version of the manifest's layout.
pub const SCHEMA: u32 = 1;

/// The manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version ([`SCHEMA`]).
    pub schema: u32,
    /// Assets by name (`kernel`, `agent`, `initramfs`, `image:raw`, ...).
    pub assets: BTreeMap<String, KeyRecord>,
}

impl Manifest {
    /// Builds the manifest from the key files of `files` (cache-relative names) that exist
    /// in `dir`; assets never built are left out.
    pub fn collect(dir: &Path, files: &[String]) -> Self {
        let assets = files
            .iter()
            .filter_map(|f| cache::read_record(&dir.join(f)))
            .map(|r| (r.asset.clone(), r))
            .collect();
        Self {
            schema: SCHEMA,
            assets,
        }
    }

    /// Writes `manifest.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialising manifest")?;
        cache::write_atomic(&dir.join(FILE), &json)
    }

    /// Reads `manifest.json` from `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collects_built_assets_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("vmlinux"), b"kernel").unwrap();
        cache::write_record(
            "kernel",
            &d.join("vmlinux"),
            "k",
            3.0,
            BTreeMap::from([("fragment_sha256".to_owned(), json!("ab"))]),
        )
        .unwrap();
        let m = Manifest::collect(d, &["vmlinux".into(), "sbx-agent".into()]);
        assert_eq!(m.assets.len(), 1);
        let k = &m.assets["kernel"];
        assert_eq!(k.file, "vmlinux");
        assert_eq!(k.size, 6);
        assert_eq!(k.sha256, cache::sha256_bytes(b"kernel"));
        assert_eq!(k.inputs["fragment_sha256"], json!("ab"));
        m.write(d).unwrap();
        assert_eq!(Manifest::read(d).unwrap(), m);
    }
}
