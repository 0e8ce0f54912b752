//! L1 memory snapshots in the VM manager: which VMs have a snapshot key, restoring a VM
//! from its snapshot instead of booting it, and creating a snapshot from a warmed VM.
//!
//! A snapshot is keyed by everything a restored VM must share with the saved one: the
//! content of the kernel, the initramfs (which holds the agent) and the base image, the
//! hypervisor's profile (version, CPU model, machine and device list), the accelerator,
//! memory, vCPUs and the language whose REPL is warm. Only offline VMs without a boot log
//! or a home disk are saved or restored. The [`SnapshotStore`](crate::snapshot::SnapshotStore) verifies
//! what it hands out; a restore that fails anyway discards the snapshot and boots cold.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use crate::error::{Error, PermanentCause, Result, TransientCause};
use crate::manager::{VmManager, VmOptions};
use crate::ports::{MemoryBacking, NetworkPolicy};
use crate::snapshot::{Sha256Digest, Snapshot, SnapshotKey, SnapshotKeyInputs};

/// Content digests of files, each with the (size, mtime) it was taken at.
pub(crate) type DigestCache = Arc<Mutex<HashMap<PathBuf, ((u64, SystemTime), Sha256Digest)>>>;

/// Name of a saveable VM's RAM file in its work dir.
pub const RAM_FILE: &str = "ram";

/// How long a snapshot's REPL warm-up may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> std::io::Result<Sha256Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finalize().into()))
}

impl VmManager {
    /// The digest of `path`, from the cache while its size and mtime are unchanged.
    async fn digest(&self, path: &Path) -> Result<Sha256Digest> {
        let md = tokio::fs::metadata(path).await.map_err(|e| {
            Error::permanent(
                PermanentCause::MissingDependency,
                format!("cannot read {}", path.display()),
            )
            .with_source(e)
        })?;
        let stamp = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        if let Ok(cache) = self.digests.lock()
            && let Some((s, d)) = cache.get(path)
            && *s == stamp
        {
            return Ok(*d);
        }
        let owned = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&owned))
            .await
            .map_err(|e| Error::permanent(PermanentCause::Internal, e.to_string()))?
            .map_err(|e| {
                Error::permanent(
                    PermanentCause::MissingDependency,
                    format!("cannot hash {}", path.display()),
                )
                .with_source(e)
            })?;
        if let Ok(mut cache) = self.digests.lock() {
            cache.insert(path.to_path_buf(), (stamp, digest));
        }
        Ok(digest)
    }

    /// The L1 snapshot key of VMs made with `opts`, or `None` when such VMs are not
    /// snapshotted (no store, a hypervisor or network proxy that cannot, a boot log, a
    /// home disk, javascript). A networked VM's key names the network's shape, never its
    /// policy: one snapshot serves every allowlist and every port forward.
    pub async fn snapshot_key(&self, opts: &VmOptions) -> Option<SnapshotKey> {
        self.ports.snapshots.as_ref()?;
        // Not javascript: node's OpenSSL random generator lives in the node process and
        // cannot be reseeded from outside, so every clone would have to restart its REPL
        // (the agent does on resume); and a node started in a restored guest measured
        // slower than in a booted one (10.4 s against about 4 s under TCG here). A cold
        // boot is faster and shares nothing.
        if opts.boot_log.is_some()
            || opts.disk_mb.is_some()
            || opts.language == crate::Language::Javascript
        {
            return None;
        }
        let network = match opts.network {
            NetworkPolicy::None => None,
            _ => Some(self.ports.network.as_ref()?.restorable_shape()?),
        };
        let cfg = self.config();
        let profile = self
            .ports
            .hypervisor
            .snapshot_profile(cfg.accelerator, network.is_some())?;
        let base = cfg.assets.images.get(&opts.language)?;
        let digests = async {
            Ok::<_, Error>((
                self.digest(&cfg.assets.kernel).await?,
                self.digest(&cfg.assets.initramfs).await?,
                self.digest(base).await?,
            ))
        };
        let (kernel, initramfs, base_image) = match digests.await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "no snapshot key: the guest assets cannot be hashed");
                return None;
            }
        };
        Some(
            SnapshotKeyInputs {
                kernel,
                initramfs,
                base_image,
                package_layer: None,
                // The agent is inside the initramfs, whose content is in the key.
                agent_version: format!(
                    "sbx {} protocol {}",
                    env!("CARGO_PKG_VERSION"),
                    guest_proto::PROTOCOL_VERSION
                ),
                qemu_version: profile.version,
                accelerator: cfg.accelerator,
                cpu_model: profile.cpu_model,
                memory_mib: opts.memory_mb,
                vcpus: cfg.vcpus,
                devices: profile.devices,
                language: opts.language,
                network,
            }
            .key(),
        )
    }

    /// The verified snapshot VMs made with `opts` restore from, if one is published.
    pub(crate) async fn find_snapshot(&self, opts: &VmOptions) -> Option<Snapshot> {
        let store = self.ports.snapshots.clone()?;
        let key = self.snapshot_key(opts).await?;
        match store.lookup(&key).await {
            Ok(found) => found,
            Err(e) => {
                warn!(%key, error = %e, "looking up the L1 snapshot failed; booting cold");
                None
            }
        }
    }

    /// Removes the snapshot of `opts` (after it failed to restore).
    pub(crate) async fn discard_snapshot(&self, opts: &VmOptions) {
        let (Some(store), Some(key)) =
            (self.ports.snapshots.clone(), self.snapshot_key(opts).await)
        else {
            return;
        };
        if let Err(e) = store.remove(&key).await {
            warn!(%key, error = %e, "removing a snapshot that failed to restore");
        }
    }

    /// Creates the L1 snapshot of VMs made with `opts`: boots one with its RAM in a shared
    /// file, warms its REPL, saves it and publishes RAM and device state under its key.
    /// Returns `Ok(false)` when there is nothing to do: not snapshottable, already
    /// published, being made (here or by another process), or no VM slot free within
    /// `opts.slot_wait` (default: none). Never leaves a half-written snapshot behind.
    pub async fn create_snapshot(&self, opts: VmOptions) -> Result<bool> {
        let (Some(store), Some(key)) =
            (self.ports.snapshots.clone(), self.snapshot_key(&opts).await)
        else {
            return Ok(false);
        };
        // `None` when it is published already (the cold boot that called this looked it
        // up) or being made.
        let Some(draft) = store.begin(&key).await? else {
            return Ok(false);
        };
        let started = Instant::now();
        let slot = match self
            .reserve_slot(opts.slot_wait.unwrap_or(Duration::ZERO))
            .await
        {
            Ok(slot) => slot,
            Err(e) if e.kind() == crate::ErrorKind::Transient(TransientCause::Capacity) => {
                let _ = store.abandon(draft).await;
                return Ok(false);
            }
            Err(e) => {
                let _ = store.abandon(draft).await;
                return Err(e);
            }
        };
        let language = opts.language;
        // The saved VM never serves the request's policy: no host port is bound for it and
        // nothing leaves it. Clones get their own proxy with their own policy.
        let mut opts = opts;
        if !matches!(opts.network, NetworkPolicy::None) {
            opts.network = NetworkPolicy::PortsOnly { ports: Vec::new() };
        }
        let vm = self
            .build_vm(
                slot,
                opts,
                started,
                MemoryBacking::SharedFile {
                    path: PathBuf::from(RAM_FILE),
                },
            )
            .await?;
        let saved = async {
            tokio::time::timeout(WARM_UP_TIMEOUT, vm.warm_up(language))
                .await
                .map_err(|_| {
                    Error::transient(
                        TransientCause::BootTimeout,
                        "the REPL of the VM to snapshot did not warm up",
                    )
                })??;
            let (ram, state) = vm.save().await?;
            let ram_to = draft.ram_path().to_path_buf();
            let state_to = draft.state_path().to_path_buf();
            copy_published(&ram, &ram_to).await?;
            copy_published(&state, &state_to).await?;
            Ok::<_, Error>(())
        }
        .await;
        let vm_id = vm.id();
        vm.destroy().await;
        match saved {
            Ok(()) => {
                let snap = store.publish(draft).await?;
                info!(%key, %vm_id, %language, ram_bytes = snap.manifest.ram.size,
                    took_ms = crate::result::millis(started.elapsed()), "L1 snapshot published");
                Ok(true)
            }
            Err(e) => {
                let _ = store.abandon(draft).await;
                Err(e)
            }
        }
    }
}

/// Copies a file QEMU wrote into a snapshot draft: a fresh inode owned by the host
/// program (QEMU's user must never own a published file).
async fn copy_published(from: &Path, to: &Path) -> Result<()> {
    tokio::fs::copy(from, to).await.map(|_| ()).map_err(|e| {
        Error::transient(
            TransientCause::Infrastructure,
            format!(
                "copying {} into the snapshot draft {}",
                from.display(),
                to.display()
            ),
        )
        .with_source(e)
    })
}
