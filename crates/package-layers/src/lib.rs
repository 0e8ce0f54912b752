//! Package layers (L2): the [`PackageLayers`] port of sandbox-core, on the local disk.
//!
//! A layer is a read-only EROFS image holding pinned packages for one guest image, built
//! on the host with the host's own package clients, so the host's index and mirror
//! configuration applies and the guest never touches the network for packages:
//!
//! - **Python**: `pip download --only-binary=:all:` for the guest's interpreter (CPython
//!   version and ABI) and platform (manylinux for the guest's glibc, x86_64), then
//!   `pip install --no-index --no-deps --target` of exactly the downloaded wheels; a
//!   package with no matching wheel is an input error naming it. The image holds
//!   `sbx-packages/python/`.
//! - **JavaScript**: `npm install` with install scripts disabled; the image holds
//!   `sbx-packages/node_modules/`.
//!
//! Every downloaded artifact's SHA-256 is recorded in the layer's manifest (npm tarballs
//! also keep the registry's `integrity`, which npm verified). The image is made with
//! `mkfs.erofs --all-root --preserve-mtime` (so compiled `.pyc` files stay valid).
//!
//! **Keys**: SHA-256 over labelled, length-prefixed fields: format version, language,
//! architecture, guest interpreter version, guest glibc, base image digest, installer
//! version (pip or npm, and the host Python that runs pip), mkfs.erofs version, and the
//! sorted normalized specs.
//!
//! **Cache** (`<root>/`): `<key>/layer.erofs` and `<key>/manifest.json` (mode 0444, dirs
//! 0755). A build happens in `.draft-<key>-<pid>-<rand>/` and is published by rename after
//! its image was hashed; a failed or timed-out build (a full disk included) leaves nothing.
//! One build per key: an in-process lock plus a `flock` on `.locks/<key>.lock` across
//! processes; whoever waited finds the published layer. The first use of a layer in a
//! process hashes its image against the manifest (later uses re-check size, inode and
//! times); a mismatch removes the entry and builds it again. Builds are bounded in time
//! ([`LayerConfig::build_timeout`]) and installed size ([`LayerConfig::max_layer_bytes`]);
//! the cache is bounded ([`LayerConfig::max_cache_bytes`], least recently used evicted
//! after each build).

mod build;
mod error;
mod store;
mod target;

pub use error::LayerError;
pub use store::{CacheEntry, FsPackageLayers, LayerConfig, LayerManifest};
pub use target::GuestTarget;

/// Directory at the root of every layer image; the guest mounts the image on `/opt`, so
/// packages live below `/opt/sbx-packages` (see `guest_proto::PACKAGE_DIR`).
pub const LAYER_TOP: &str = "sbx-packages";

/// Default cache directory: `$SBX_PACKAGE_DIR`, else `~/.cache/sbx/packages` (beside the
/// guest assets, where `sbx setup` lets the QEMU user reach).
pub fn default_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("SBX_PACKAGE_DIR").filter(|v| !v.is_empty()) {
        return dir.into();
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/sbx/packages")
}

pub use sandbox_core::packages::{PackageLayer, PackageLayers, PackageSpec};

#[cfg(test)]
mod tests;
