//! The snapshot port: where L1 memory snapshots (RAM file + device state) are kept.
//!
//! A snapshot is found only by its [`SnapshotKey`], a SHA-256 over everything that must be
//! equal between the VM that was saved and the VM that restores it ([`SnapshotKeyInputs`]).
//! A key is 64 lowercase hex digits and nothing else parses, so a snapshot can never be
//! looked up by a name alone.
//!
//! Creating one goes through a [`SnapshotDraft`]: [`SnapshotStore::begin`] hands out at most
//! one draft per key across every process sharing the store, the hypervisor writes the two
//! files at the draft's paths, and [`SnapshotStore::publish`] makes them visible atomically
//! with a [`SnapshotManifest`] of their sizes and digests. A draft that is dropped without
//! being published or abandoned is abandoned by its guard, so a cancelled save leaves
//! nothing behind that could be loaded.
//!
//! [`SnapshotStore::lookup`] only returns snapshots whose files match their manifest; a
//! corrupted, truncated or mismatched one is discarded and reported as absent.

use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use async_trait::async_trait;
use guest_proto::Language;
pub use guest_proto::{Sha256Digest, hash_reader};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::ports::Accelerator;

/// The manifest format this version of sbx writes and accepts.
pub const SNAPSHOT_MANIFEST_FORMAT: u32 = 1;

/// The largest manifest a store reads from disk (it is parsed, so it is bounded).
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024;

/// The largest RAM or device-state file a manifest may describe (1 TiB).
pub const MAX_SNAPSHOT_FILE_BYTES: u64 = 1 << 40;

/// The longest `created_by` text a manifest may carry.
pub const MAX_CREATED_BY_CHARS: usize = 256;

/// The domain-separation tag hashed first into every key; bump the version when the set
/// or the encoding of the inputs changes.
const KEY_DOMAIN: &[u8] = b"sbx.snapshot-key.v1";

/// The content key of a snapshot: 32 bytes, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey([u8; 32]);

impl SnapshotKey {
    /// The key with these raw bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 lowercase hex digits; anything else (uppercase, other lengths, names,
    /// path separators) is an input error on field `snapshot_key`.
    pub fn parse(text: &str) -> Result<Self> {
        let digits = text.as_bytes();
        let invalid = || {
            Error::input(
                "snapshot_key",
                "a snapshot key is 64 lowercase hex digits (a SHA-256 of the key inputs)",
            )
        };
        if digits.len() != 64 {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = lower_hex_value(pair[0]).ok_or_else(invalid)?;
            let lo = lower_hex_value(pair[1]).ok_or_else(invalid)?;
            *byte = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn lower_hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotKey({self})")
    }
}

impl FromStr for SnapshotKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl serde::Serialize for SnapshotKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SnapshotKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Everything a restored VM must share with the VM that was saved. The key is a hash over
/// all of it: change any field and the snapshot is a different one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKeyInputs {
    /// SHA-256 of the guest kernel.
    pub kernel: Sha256Digest,
    /// SHA-256 of the initramfs.
    pub initramfs: Sha256Digest,
    /// SHA-256 of the base image.
    pub base_image: Sha256Digest,
    /// SHA-256 (or content key) of the package layer, when the VM has one.
    pub package_layer: Option<Sha256Digest>,
    /// The guest agent's version.
    pub agent_version: String,
    /// The QEMU version (e.g. `10.0.2`).
    pub qemu_version: String,
    /// KVM or TCG.
    pub accelerator: Accelerator,
    /// The guest CPU model as passed to `-cpu`.
    pub cpu_model: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// The device list, in order, as one canonical string (machine options and devices).
    pub devices: String,
    /// The language whose interpreter is warm in the snapshot.
    pub language: Language,
    /// The network the guest is attached to ([`crate::ports::NetworkProxy::restorable_shape`]),
    /// `None` for a VM without a network device.
    pub network: Option<String>,
}

impl SnapshotKeyInputs {
    /// The content key: SHA-256 over a domain tag and every field, each as a labelled,
    /// length-prefixed record, so no two different inputs hash the same bytes.
    pub fn key(&self) -> SnapshotKey {
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        let mut field = |label: &str, value: &[u8]| {
            hasher.update((label.len() as u64).to_le_bytes());
            hasher.update(label.as_bytes());
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value);
        };
        field("kernel", self.kernel.as_bytes());
        field("initramfs", self.initramfs.as_bytes());
        field("base_image", self.base_image.as_bytes());
        match &self.package_layer {
            Some(layer) => field("package_layer", layer.as_bytes()),
            None => field("package_layer", &[]),
        }
        field("agent_version", self.agent_version.as_bytes());
        field("qemu_version", self.qemu_version.as_bytes());
        field("accelerator", self.accelerator.to_string().as_bytes());
        field("cpu_model", self.cpu_model.as_bytes());
        field("memory_mib", &self.memory_mib.to_le_bytes());
        field("vcpus", &self.vcpus.to_le_bytes());
        field("devices", self.devices.as_bytes());
        field("language", self.language.as_str().as_bytes());
        match &self.network {
            Some(shape) => field("network", format!("attached {shape}").as_bytes()),
            None => field("network", b"none"),
        }
        SnapshotKey(hasher.finalize().into())
    }
}

/// Size and SHA-256 of one snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    #[serde(with = "lower_hex_digest")]
    pub sha256: Sha256Digest,
}

/// What a published snapshot is: written last, beside its two files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    /// The manifest format ([`SNAPSHOT_MANIFEST_FORMAT`]).
    pub format: u32,
    /// The key the snapshot was published under.
    pub key: SnapshotKey,
    /// The guest RAM file.
    pub ram: FileDigest,
    /// The device-state file (QEMU's migration stream).
    pub state: FileDigest,
    /// When it was published, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Who published it (program, version, pid), for diagnostics.
    pub created_by: String,
}

impl SnapshotManifest {
    /// Checks every field: the format, that it belongs to `expected`, non-empty bounded file
    /// sizes and a bounded printable `created_by`. The message says what is wrong.
    pub fn validate(&self, expected: &SnapshotKey) -> std::result::Result<(), String> {
        if self.format != SNAPSHOT_MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} (expected {SNAPSHOT_MANIFEST_FORMAT})",
                self.format
            ));
        }
        if &self.key != expected {
            return Err(format!("manifest is for key {}", self.key));
        }
        for (name, file) in [("ram", &self.ram), ("state", &self.state)] {
            if file.size == 0 || file.size > MAX_SNAPSHOT_FILE_BYTES {
                return Err(format!("{name} size {} out of range", file.size));
            }
        }
        if self.created_by.chars().count() > MAX_CREATED_BY_CHARS
            || self.created_by.chars().any(char::is_control)
        {
            return Err("created_by is too long or has control characters".to_owned());
        }
        Ok(())
    }
}

mod lower_hex_digest {
    use guest_proto::Sha256Digest;

    pub fn serialize<S: serde::Serializer>(d: &Sha256Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(d)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Sha256Digest, D::Error> {
        let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        // Same grammar as keys: 64 lowercase hex digits.
        super::SnapshotKey::parse(&text)
            .map(|k| Sha256Digest(*k.as_bytes()))
            .map_err(|_| serde::de::Error::custom("sha256 is 64 lowercase hex digits"))
    }
}

/// A published, verified snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its key.
    pub key: SnapshotKey,
    /// The guest RAM file (read-only; map it privately, never write it).
    pub ram: PathBuf,
    /// The device-state file (read-only).
    pub state: PathBuf,
    /// Its manifest.
    pub manifest: SnapshotManifest,
}

/// One published entry as [`SnapshotStore::list`] sees it (not verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Its key.
    pub key: SnapshotKey,
    /// Its manifest, or `None` when it is missing or invalid (the next lookup discards it).
    pub manifest: Option<SnapshotManifest>,
}

/// A snapshot being written: the only writer of its key until it is published or
/// abandoned. Dropping it abandons it (the guard removes the files and releases the key).
pub struct SnapshotDraft {
    key: SnapshotKey,
    ram: PathBuf,
    state: PathBuf,
    guard: Box<dyn Any + Send + Sync>,
}

impl SnapshotDraft {
    /// A draft of `key` whose files are at `ram` and `state`. `guard` is the adapter's
    /// state: it holds the key's exclusion and cleans up when dropped unless the adapter
    /// disarms it in `publish`/`abandon` (see [`SnapshotDraft::into_guard`]).
    pub fn new(
        key: SnapshotKey,
        ram: PathBuf,
        state: PathBuf,
        guard: impl Any + Send + Sync,
    ) -> Self {
        Self {
            key,
            ram,
            state,
            guard: Box::new(guard),
        }
    }

    /// The key being created.
    pub fn key(&self) -> &SnapshotKey {
        &self.key
    }

    /// Where the hypervisor writes the guest RAM (`mem-path` of a `share=on` backend).
    pub fn ram_path(&self) -> &std::path::Path {
        &self.ram
    }

    /// Where the hypervisor writes the device state (`migrate` to `file:`).
    pub fn state_path(&self) -> &std::path::Path {
        &self.state
    }

    /// The adapter's guard, for the adapter that made the draft to downcast.
    pub fn into_guard(self) -> Box<dyn Any + Send + Sync> {
        self.guard
    }
}

impl fmt::Debug for SnapshotDraft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotDraft")
            .field("key", &self.key)
            .field("ram", &self.ram)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Keeps L1 snapshots: verified lookup by key, one writer per key, atomic publication.
///
/// Errors: store I/O failures are transient `Infrastructure` errors (the caller did nothing
/// wrong; the snapshot is simply not there and a cold boot works), a bad store
/// configuration is permanent `Config`, a draft handed to a store that did not make it is
/// permanent `Internal`.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The verified snapshot of `key`, or `None`. A corrupted, truncated or mismatched
    /// entry is discarded (and logged), never returned.
    async fn lookup(&self, key: &SnapshotKey) -> Result<Option<Snapshot>>;

    /// A draft for `key`, or `None` when `key` is already published or another writer (in
    /// this process or another) holds it: concurrent creators make a snapshot once.
    async fn begin(&self, key: &SnapshotKey) -> Result<Option<SnapshotDraft>>;

    /// Publishes a draft's files atomically and returns the snapshot. When another writer
    /// published the key first, the draft is dropped and theirs is returned. On error
    /// nothing is published and the draft is removed.
    async fn publish(&self, draft: SnapshotDraft) -> Result<Snapshot>;

    /// Removes a draft's files and releases its key.
    async fn abandon(&self, draft: SnapshotDraft) -> Result<()>;

    /// Removes the published snapshot of `key`; `true` when there was one. VMs that
    /// already mapped its RAM file keep running.
    async fn remove(&self, key: &SnapshotKey) -> Result<bool>;

    /// Every published entry, unverified.
    async fn list(&self) -> Result<Vec<SnapshotEntry>>;

    /// Removes every published snapshot and every stale draft; returns how many snapshots
    /// were removed. Drafts of live writers are left to them.
    async fn clear(&self) -> Result<usize>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inputs() -> SnapshotKeyInputs {
        SnapshotKeyInputs {
            kernel: Sha256Digest([1; 32]),
            initramfs: Sha256Digest([2; 32]),
            base_image: Sha256Digest([3; 32]),
            package_layer: None,
            agent_version: "0.1.0".to_owned(),
            qemu_version: "10.0.2".to_owned(),
            accelerator: Accelerator::Tcg,
            cpu_model: "max,-erms,-fsrm".to_owned(),
            memory_mib: 192,
            vcpus: 1,
            devices: "microvm,virtio-serial,virtio-blk".to_owned(),
            language: Language::Python,
            network: None,
        }
    }

    /// Every way to change exactly one field.
    fn single_field_changes() -> Vec<(&'static str, SnapshotKeyInputs)> {
        let base = inputs();
        let with = |f: &dyn Fn(&mut SnapshotKeyInputs)| {
            let mut i = base.clone();
            f(&mut i);
            i
        };
        vec![
            ("kernel", with(&|i| i.kernel.0[31] ^= 1)),
            ("initramfs", with(&|i| i.initramfs.0[0] ^= 0x80)),
            ("base_image", with(&|i| i.base_image.0[7] ^= 1)),
            (
                "package_layer",
                with(&|i| i.package_layer = Some(Sha256Digest([0; 32]))),
            ),
            ("agent_version", with(&|i| i.agent_version.push('1'))),
            ("qemu_version", with(&|i| i.qemu_version = "10.0.3".into())),
            ("accelerator", with(&|i| i.accelerator = Accelerator::Kvm)),
            ("cpu_model", with(&|i| i.cpu_model = "max".into())),
            ("memory_mib", with(&|i| i.memory_mib = 193)),
            ("vcpus", with(&|i| i.vcpus = 2)),
            ("devices", with(&|i| i.devices.push_str(",virtio-net"))),
            ("language", with(&|i| i.language = Language::Raw)),
            ("network", with(&|i| i.network = Some(String::new()))),
            ("network shape", {
                let mut i = base.clone();
                i.network = Some("a".into());
                let mut j = base.clone();
                j.network = Some("b".into());
                assert_ne!(i.key(), j.key());
                i
            }),
        ]
    }

    #[test]
    fn key_is_stable_and_every_field_counts() {
        let base = inputs().key();
        assert_eq!(base, inputs().key());
        let mut seen = std::collections::HashSet::from([base]);
        for (field, changed) in single_field_changes() {
            assert!(
                seen.insert(changed.key()),
                "changing {field} did not change the key"
            );
        }
    }

    #[test]
    fn package_layer_none_differs_from_every_layer() {
        let mut with_layer = inputs();
        with_layer.package_layer = Some(Sha256Digest::default());
        assert_ne!(inputs().key(), with_layer.key());
    }

    #[test]
    fn key_text_round_trips_and_rejects_names() {
        let key = inputs().key();
        let text = key.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(SnapshotKey::parse(&text).ok(), Some(key));
        assert_eq!(text.parse::<SnapshotKey>().ok(), Some(key));
        for bad in [
            "",
            "python",
            &text[..63],
            &format!("{text}0"),
            &text.to_uppercase(),
            &format!("../{}", &text[3..]),
            &format!("{}g", &text[..63]),
            &format!(" {}", &text[1..]),
        ] {
            let err = SnapshotKey::parse(bad).err();
            assert!(err.is_some(), "{bad:?} parsed");
            let err = err.unwrap_or_else(|| Error::input("x", "x"));
            assert_eq!(err.kind(), crate::ErrorKind::Input);
            assert_eq!(err.context().field.as_deref(), Some("snapshot_key"));
        }
    }

    #[test]
    fn key_serde_is_the_hex_text_and_validates() {
        let key = inputs().key();
        let json = serde_json::to_string(&key).unwrap_or_default();
        assert_eq!(json, format!("\"{key}\""));
        let back: std::result::Result<SnapshotKey, _> = serde_json::from_str(&json);
        assert_eq!(back.ok(), Some(key));
        let bad: std::result::Result<SnapshotKey, _> = serde_json::from_str("\"python\"");
        assert!(bad.is_err());
    }

    fn manifest(key: SnapshotKey) -> SnapshotManifest {
        SnapshotManifest {
            format: SNAPSHOT_MANIFEST_FORMAT,
            key,
            ram: FileDigest {
                size: 4096,
                sha256: Sha256Digest([9; 32]),
            },
            state: FileDigest {
                size: 100,
                sha256: Sha256Digest([8; 32]),
            },
            created_unix_ms: 1,
            created_by: "sbx 0.1.0 pid 1".to_owned(),
        }
    }

    #[test]
    fn manifest_validation_checks_every_field() {
        let key = inputs().key();
        let good = manifest(key);
        assert_eq!(good.validate(&key), Ok(()));
        let other = SnapshotKey::from_bytes([0; 32]);
        assert!(good.validate(&other).is_err());
        let mut m = good.clone();
        m.format = 2;
        assert!(m.validate(&key).is_err());
        let mut m = good.clone();
        m.ram.size = 0;
        assert!(m.validate(&key).is_err());
        let mut m = good.clone();
        m.state.size = MAX_SNAPSHOT_FILE_BYTES + 1;
        assert!(m.validate(&key).is_err());
        let mut m = good.clone();
        m.created_by = "x\n".to_owned();
        assert!(m.validate(&key).is_err());
        let mut m = good;
        m.created_by = "x".repeat(MAX_CREATED_BY_CHARS + 1);
        assert!(m.validate(&key).is_err());
    }

    #[test]
    fn manifest_json_round_trips_and_is_strict() {
        let key = inputs().key();
        let m = manifest(key);
        let json = serde_json::to_string(&m).unwrap_or_default();
        assert!(json.contains(&key.to_string()), "{json}");
        let back: SnapshotManifest = serde_json::from_str(&json).unwrap_or_else(|_| manifest(key));
        assert_eq!(back, m);
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<SnapshotManifest>(&extra).is_err());
        let upper = json.replace(&"09".repeat(32), &"0A".repeat(32));
        let upper = upper.replace(&key.to_string(), &key.to_string().to_uppercase());
        assert!(serde_json::from_str::<SnapshotManifest>(&upper).is_err());
    }

    #[test]
    fn draft_exposes_paths_and_guard() {
        let key = inputs().key();
        let draft = SnapshotDraft::new(key, "/r".into(), "/s".into(), 7u32);
        assert_eq!(draft.key(), &key);
        assert_eq!(draft.ram_path(), std::path::Path::new("/r"));
        assert_eq!(draft.state_path(), std::path::Path::new("/s"));
        assert!(format!("{draft:?}").contains("SnapshotDraft"));
        assert_eq!(
            draft.into_guard().downcast::<u32>().ok().map(|b| *b),
            Some(7)
        );
    }

    #[tokio::test]
    async fn fake_store_keeps_the_port_rules() {
        use crate::testing::FakeSnapshotStore;
        let store = FakeSnapshotStore::new();
        let key = inputs().key();
        assert!(store.lookup(&key).await.unwrap().is_none());

        // One writer per key; a dropped draft is abandoned.
        let draft = store.begin(&key).await.unwrap().unwrap();
        assert!(store.begin(&key).await.unwrap().is_none());
        drop(draft);
        assert!(!store.is_drafting(&key));
        assert_eq!(store.counts().abandoned, 1);

        // A failed publish publishes nothing and frees the key.
        store.fail_next_publishes(1);
        let draft = store.begin(&key).await.unwrap().unwrap();
        let err = store.publish(draft).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(!store.is_published(&key) && !store.is_drafting(&key));

        let draft = store.begin(&key).await.unwrap().unwrap();
        let published = store.publish(draft).await.unwrap();
        assert_eq!(published.manifest.validate(&key), Ok(()));
        assert!(store.begin(&key).await.unwrap().is_none());
        assert_eq!(store.lookup(&key).await.unwrap(), Some(published));
        assert_eq!(store.list().await.unwrap().len(), 1);

        // A corrupted entry is discarded, never returned.
        store.corrupt(&key);
        assert!(store.lookup(&key).await.unwrap().is_none());
        assert_eq!(store.counts().discarded, 1);

        // A draft of another store is refused.
        let foreign = SnapshotDraft::new(key, "/r".into(), "/s".into(), ());
        let err = store.publish(foreign).await.unwrap_err();
        assert_eq!(
            err.kind(),
            crate::ErrorKind::Permanent(crate::PermanentCause::Internal)
        );

        store.insert(key);
        assert!(store.remove(&key).await.unwrap());
        assert!(!store.remove(&key).await.unwrap());
        store.insert(key);
        store.insert(SnapshotKey::from_bytes([0; 32]));
        assert_eq!(store.clear().await.unwrap(), 2);
        assert!(store.list().await.unwrap().is_empty());
    }

    fn arb_inputs() -> impl Strategy<Value = SnapshotKeyInputs> {
        (
            any::<[u8; 32]>(),
            any::<Option<[u8; 32]>>(),
            ".{0,12}",
            ".{0,12}",
            ".{0,12}",
            ".{0,24}",
            any::<(u32, u32, bool, u8)>(),
        )
            .prop_map(
                |(k, layer, agent, qemu, cpu, devices, (mem, vcpus, kvm, lang))| {
                    SnapshotKeyInputs {
                        kernel: Sha256Digest(k),
                        initramfs: Sha256Digest(k),
                        base_image: Sha256Digest(k),
                        package_layer: layer.map(Sha256Digest),
                        agent_version: agent,
                        qemu_version: qemu,
                        accelerator: if kvm {
                            Accelerator::Kvm
                        } else {
                            Accelerator::Tcg
                        },
                        cpu_model: cpu,
                        memory_mib: mem,
                        vcpus,
                        devices,
                        language: Language::ALL[usize::from(lang) % 3],
                        network: (lang >= 128).then(|| "sbx.net=shape".to_owned()),
                    }
                },
            )
    }

    proptest! {
        /// Moving bytes from the end of one text field to the start of the next keeps the
        /// concatenation equal but must change the key (length prefixes).
        #[test]
        fn moving_bytes_between_fields_changes_the_key(
            i in arb_inputs(),
            which in 0usize..3,
            n in 1usize..4,
        ) {
            let mut moved = i.clone();
            let (from, to) = match which {
                0 => (&mut moved.agent_version, &mut moved.qemu_version),
                1 => (&mut moved.qemu_version, &mut moved.cpu_model),
                _ => (&mut moved.cpu_model, &mut moved.devices),
            };
            let cut = from.char_indices().rev().nth(n - 1).map(|(at, _)| at);
            prop_assume!(cut.is_some());
            let tail = from.split_off(cut.unwrap_or(0));
            to.insert_str(0, &tail);
            prop_assert_ne!(i.key(), moved.key());
        }

        /// Any single changed field changes the key.
        #[test]
        fn any_field_change_changes_the_key(i in arb_inputs(), field in 0usize..12, bit in 0u8..8) {
            let mut c = i.clone();
            let flip = 1u8 << bit;
            match field {
                0 => c.kernel.0[0] ^= flip,
                1 => c.initramfs.0[31] ^= flip,
                2 => c.base_image.0[15] ^= flip,
                3 => c.package_layer = match c.package_layer {
                    None => Some(Sha256Digest::default()),
                    Some(_) => None,
                },
                4 => c.agent_version.push(char::from(b'a' + bit)),
                5 => c.qemu_version.push(char::from(b'a' + bit)),
                6 => c.accelerator = match c.accelerator {
                    Accelerator::Kvm => Accelerator::Tcg,
                    Accelerator::Tcg => Accelerator::Kvm,
                },
                7 => c.cpu_model.push(char::from(b'a' + bit)),
                8 => c.memory_mib ^= u32::from(flip),
                9 => c.vcpus ^= u32::from(flip),
                10 => c.devices.push(char::from(b'a' + bit)),
                _ => c.language = Language::ALL[(Language::ALL.iter().position(|l| *l == c.language).unwrap_or(0) + 1) % 3],
            }
            prop_assert_ne!(i.key(), c.key());
        }

        /// Parsing never panics and accepts exactly the lowercase hex text of a key.
        #[test]
        fn parse_accepts_only_lowercase_hex(s in "\\PC{0,70}") {
            let ok = s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let parsed = SnapshotKey::parse(&s);
            prop_assert_eq!(parsed.is_ok(), ok);
            if let Ok(k) = parsed {
                prop_assert_eq!(k.to_string(), s);
            }
        }
    }
}
