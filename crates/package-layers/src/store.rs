//! The local, content-keyed layer cache and the build-once logic.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use sandbox_core::packages::{PackageLayer, PackageLayers, PackageSpec};
use sandbox_core::{Error, Language, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::build::{self, Artifact, Tools};
use crate::error::LayerError;
use crate::target::GuestTarget;

const FORMAT: &str = "sbx-package-layer/1";
const IMAGE: &str = "layer.erofs";
const MANIFEST: &str = "manifest.json";

/// Settings of the layer store.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Cache directory (see [`crate::default_root`]).
    pub root: PathBuf,
    /// Python that runs pip (`python3`).
    pub python: PathBuf,
    /// `npm`.
    pub npm: PathBuf,
    /// `mkfs.erofs`.
    pub mkfs_erofs: PathBuf,
    /// Longest build (downloads, install, image), default 10 minutes.
    pub build_timeout: Duration,
    /// Largest installed tree, default 2 GiB.
    pub max_layer_bytes: u64,
    /// Largest cache (sum of images), default 20 GiB; least recently used layers are
    /// evicted after a build.
    pub max_cache_bytes: u64,
}

impl LayerConfig {
    /// Defaults with the cache at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            python: "python3".into(),
            npm: "npm".into(),
            mkfs_erofs: "mkfs.erofs".into(),
            build_timeout: Duration::from_secs(600),
            max_layer_bytes: 2 << 30,
            max_cache_bytes: 20 << 30,
        }
    }
}

/// What a published layer was built from and holds (its `manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerManifest {
    /// Format of this file and the key.
    pub format: String,
    /// The key (lowercase hex).
    pub key: String,
    /// Language.
    pub language: Language,
    /// The specs, normalized, as given to the package client.
    pub specs: Vec<String>,
    /// Guest interpreter version.
    pub interpreter: String,
    /// Base image digest.
    pub base_digest: String,
    /// Installer and mkfs versions.
    pub tools: Vec<String>,
    /// Every downloaded artifact with its SHA-256.
    pub artifacts: Vec<Artifact>,
    /// SHA-256 of `layer.erofs`.
    pub image_sha256: String,
    /// Size of `layer.erofs`.
    pub image_bytes: u64,
    /// Bytes of the installed tree.
    pub installed_bytes: u64,
    /// Seconds the build took.
    pub build_secs: f64,
    /// Unix time of publication.
    pub created_unix: u64,
}

/// One published layer, as `sbx cache ls` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    /// Its manifest.
    pub manifest: LayerManifest,
    /// Last use (the entry directory's mtime).
    pub last_used: SystemTime,
}

type Stamp = (u64, u64, u64, i64, i64);

fn stamp(m: &fs::Metadata) -> Stamp {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.ctime())
}

/// The layer store on the local disk.
#[derive(Debug)]
pub struct FsPackageLayers {
    cfg: LayerConfig,
    targets: BTreeMap<Language, GuestTarget>,
    tools: Tools,
    /// Per key: the in-process build lock.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per language: installer and mkfs versions (asked once).
    versions: tokio::sync::Mutex<HashMap<Language, (String, String, String)>>,
    /// Images verified in this process.
    verified: Mutex<HashMap<String, Stamp>>,
    /// Builds done by this process (for tests and metrics).
    builds: std::sync::atomic::AtomicU64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_key(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn field(h: &mut Sha256, label: &str, value: &str) {
    for part in [label, value] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Removes a draft directory when dropped (every failure path, cancellation included).
struct Draft(PathBuf);

impl Drop for Draft {
    fn drop(&mut self) {
        let _ = make_writable(&self.0);
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn make_writable(dir: &Path) -> std::io::Result<()> {
    // pip and npm leave read-only files; directories must be writable to delete them.
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
        for e in fs::read_dir(&d)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

fn remove_entry(dir: &Path) {
    let _ = make_writable(dir);
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), err = %e, "cannot remove package layer");
    }
}

impl FsPackageLayers {
    /// Opens (creating) the cache at `cfg.root` for the guests in `targets`, and removes
    /// drafts of writers that are gone.
    pub fn open(
        cfg: LayerConfig,
        targets: Vec<GuestTarget>,
    ) -> std::result::Result<Self, LayerError> {
        for d in [cfg.root.clone(), cfg.root.join(".locks")] {
            fs::create_dir_all(&d)
                .map_err(|e| LayerError::io(format!("create {}", d.display()), e))?;
            let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
        }
        if let Ok(rd) = fs::read_dir(&cfg.root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(".draft-") else {
                    continue;
                };
                let pid = rest.split('-').nth(1).and_then(|p| p.parse::<i32>().ok());
                if pid.is_none_or(|p| !pid_alive(p)) {
                    remove_entry(&e.path());
                }
            }
        }
        let tools = Tools {
            python: cfg.python.clone(),
            npm: cfg.npm.clone(),
            mkfs_erofs: cfg.mkfs_erofs.clone(),
        };
        Ok(Self {
            targets: targets.into_iter().map(|t| (t.language, t)).collect(),
            tools,
            cfg,
            inflight: Mutex::default(),
            versions: tokio::sync::Mutex::default(),
            verified: Mutex::default(),
            builds: Default::default(),
        })
    }

    /// Settings.
    pub fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// Layers built by this process.
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn versions(
        &self,
        language: Language,
    ) -> std::result::Result<(String, String, String), LayerError> {
        let mut v = self.versions.lock().await;
        if let Some(x) = v.get(&language) {
            return Ok(x.clone());
        }
        let (installer, mkfs) = self.tools.versions(language).await?;
        // "pip X / python 3.11.7" → host python minor for the .pyc decision.
        let host_minor = installer
            .rsplit_once("python ")
            .map(|(_, v)| v.split('.').take(2).collect::<Vec<_>>().join("."))
            .unwrap_or_default();
        let x = (installer, mkfs, host_minor);
        v.insert(language, x.clone());
        Ok(x)
    }

    /// The key of `specs` for `language`'s guest with these tool versions.
    pub fn key(target: &GuestTarget, specs: &[PackageSpec], tools: &[&str]) -> String {
        let mut h = Sha256::new();
        field(&mut h, "format", FORMAT);
        field(&mut h, "language", &target.language.to_string());
        field(&mut h, "arch", &target.arch);
        field(&mut h, "interpreter", &target.interpreter);
        field(
            &mut h,
            "glibc",
            &format!("{}.{}", target.glibc.0, target.glibc.1),
        );
        field(&mut h, "base", &target.base_digest);
        for t in tools {
            field(&mut h, "tool", t);
        }
        let mut args: Vec<String> = specs
            .iter()
            .map(|s| s.to_client_arg(target.language))
            .collect();
        args.sort();
        for a in &args {
            field(&mut h, "spec", a);
        }
        hex::encode(h.finalize())
    }

    fn target(&self, language: Language) -> std::result::Result<&GuestTarget, LayerError> {
        self.targets
            .get(&language)
            .ok_or_else(|| LayerError::Input(format!("packages are not available for {language}")))
    }

    /// The published, verified layer `key`, or `None` (a bad entry is removed).
    pub fn lookup(&self, key: &str) -> Option<PackageLayer> {
        if !is_key(key) {
            return None;
        }
        let dir = self.cfg.root.join(key);
        let image = dir.join(IMAGE);
        let meta = fs::metadata(&image).ok()?;
        let ok = self.check(key, &dir, &image, &meta);
        match ok {
            Ok(manifest) => {
                // Last use, for eviction: the entry directory's mtime.
                let _ = File::open(&dir).and_then(|d| d.set_modified(SystemTime::now()));
                Some(PackageLayer {
                    image,
                    digest: manifest.image_sha256,
                    key: key.to_owned(),
                })
            }
            Err(why) => {
                warn!(
                    key,
                    why, "package layer does not verify; removing it (it will be built again)"
                );
                locked(&self.verified).remove(key);
                remove_entry(&dir);
                None
            }
        }
    }

    fn check(
        &self,
        key: &str,
        dir: &Path,
        image: &Path,
        meta: &fs::Metadata,
    ) -> std::result::Result<LayerManifest, String> {
        let text = fs::read_to_string(dir.join(MANIFEST)).map_err(|e| format!("manifest: {e}"))?;
        let m: LayerManifest = serde_json::from_str(&text).map_err(|e| format!("manifest: {e}"))?;
        if m.key != key || m.format != FORMAT {
            return Err("manifest of another key or format".into());
        }
        if meta.permissions().mode() & 0o222 != 0 {
            return Err("image is writable".into());
        }
        if meta.len() != m.image_bytes {
            return Err(format!(
                "image is {} bytes, manifest says {}",
                meta.len(),
                m.image_bytes
            ));
        }
        let st = stamp(meta);
        if locked(&self.verified).get(key) == Some(&st) {
            return Ok(m);
        }
        let (sha, _) = build::sha256_file(image).map_err(|e| format!("hash: {e}"))?;
        if sha != m.image_sha256 {
            return Err("image SHA-256 does not match its manifest".into());
        }
        locked(&self.verified).insert(key.to_owned(), st);
        Ok(m)
    }

    /// Every published layer, newest use first.
    pub fn list(&self) -> Vec<CacheEntry> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.cfg.root) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_key(&name) {
                continue;
            }
            let Some(manifest) = fs::read_to_string(e.path().join(MANIFEST))
                .ok()
                .and_then(|t| serde_json::from_str::<LayerManifest>(&t).ok())
            else {
                continue;
            };
            let last_used = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(CacheEntry {
                manifest,
                last_used,
            });
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        out
    }

    /// Removes least recently used layers until the images take at most `max_bytes`,
    /// never `keep`. Returns the keys removed. Also removes entries that are not layers.
    pub fn gc(&self, max_bytes: u64, keep: Option<&str>) -> Vec<String> {
        let entries = self.list();
        let mut total: u64 = entries.iter().map(|e| e.manifest.image_bytes).sum();
        let mut removed = Vec::new();
        for e in entries.iter().rev() {
            if total <= max_bytes {
                break;
            }
            if Some(e.manifest.key.as_str()) == keep {
                continue;
            }
            remove_entry(&self.cfg.root.join(&e.manifest.key));
            locked(&self.verified).remove(&e.manifest.key);
            total = total.saturating_sub(e.manifest.image_bytes);
            removed.push(e.manifest.key.clone());
        }
        removed
    }

    async fn lock_file(&self, key: &str) -> std::result::Result<Flock<File>, LayerError> {
        let path = self.cfg.root.join(".locks").join(format!("{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LayerError::io(format!("open {}", path.display()), e))?;
        tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| LayerError::io("lock package layer", e.into()))
        })
        .await
        .map_err(|e| LayerError::io("lock package layer", std::io::Error::other(e)))?
    }

    /// Finds or builds the layer (the body of [`PackageLayers::layer`]).
    pub async fn get(
        &self,
        language: Language,
        specs: &[PackageSpec],
    ) -> std::result::Result<PackageLayer, LayerError> {
        if specs.is_empty() {
            return Err(LayerError::Input("no packages asked for".into()));
        }
        let target = self.target(language)?.clone();
        let (installer, mkfs, host_minor) = self.versions(language).await?;
        let key = Self::key(&target, specs, &[&installer, &mkfs]);
        if let Some(l) = self.lookup(&key) {
            return Ok(l);
        }
        let gate = locked(&self.inflight)
            .entry(key.clone())
            .or_default()
            .clone();
        let _in_process = gate.lock().await;
        if let Some(l) = self.lookup(&key) {
            return Ok(l);
        }
        let _across_processes = self.lock_file(&key).await?;
        if let Some(l) = self.lookup(&key) {
            return Ok(l);
        }
        let bound = self.cfg.build_timeout;
        let started = std::time::Instant::now();
        let built = tokio::time::timeout(
            bound,
            self.build(&target, specs, &key, vec![installer, mkfs], &host_minor),
        )
        .await
        .map_err(|_| LayerError::Timeout(bound.as_secs()))??;
        info!(
            key,
            %language,
            secs = started.elapsed().as_secs_f64(),
            "package layer built"
        );
        let removed = self.gc(self.cfg.max_cache_bytes, Some(&key));
        if !removed.is_empty() {
            info!(
                count = removed.len(),
                "package layers evicted (cache size bound)"
            );
        }
        locked(&self.inflight).remove(&key);
        Ok(built)
    }

    async fn build(
        &self,
        target: &GuestTarget,
        specs: &[PackageSpec],
        key: &str,
        tools: Vec<String>,
        host_minor: &str,
    ) -> std::result::Result<PackageLayer, LayerError> {
        let started = std::time::Instant::now();
        let draft = Draft(self.cfg.root.join(format!(
            ".draft-{key}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        )));
        let io = |what: &str| {
            let what = what.to_owned();
            move |e| LayerError::io(what, e)
        };
        let dl = draft.0.join("dl");
        let tree = draft.0.join("tree");
        let top = tree.join(crate::LAYER_TOP);
        let out = draft.0.join("out");
        for d in [&dl, &top, &out] {
            fs::create_dir_all(d).map_err(io("create build directory"))?;
        }
        let artifacts = match target.language {
            Language::Python => {
                let site = top.join("python");
                fs::create_dir_all(&site).map_err(io("create build directory"))?;
                build::python(&self.tools, target, host_minor, specs, &dl, &site).await?
            }
            Language::Javascript => build::javascript(&self.tools, specs, &top).await?,
            Language::Raw => return Err(LayerError::Input("raw code has no packages".into())),
        };
        let installed = build::tree_bytes(&tree).map_err(io("measure installed tree"))?;
        if installed > self.cfg.max_layer_bytes {
            return Err(LayerError::Input(format!(
                "the packages take {} MB installed, above this host's limit of {} MB",
                installed >> 20,
                self.cfg.max_layer_bytes >> 20
            )));
        }
        let image = out.join(IMAGE);
        build::mkfs(&self.tools, &tree, &image).await?;
        let f = File::open(&image).map_err(io("open layer image"))?;
        f.sync_all().map_err(io("sync layer image"))?;
        drop(f);
        let (image_sha256, image_bytes) =
            build::sha256_file(&image).map_err(io("hash layer image"))?;
        let manifest = LayerManifest {
            format: FORMAT.into(),
            key: key.to_owned(),
            language: target.language,
            specs: specs
                .iter()
                .map(|s| s.to_client_arg(target.language))
                .collect(),
            interpreter: target.interpreter.clone(),
            base_digest: target.base_digest.clone(),
            tools,
            artifacts,
            image_sha256: image_sha256.clone(),
            image_bytes,
            installed_bytes: installed,
            build_secs: started.elapsed().as_secs_f64(),
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| LayerError::io("write manifest", std::io::Error::other(e)))?;
        let mpath = out.join(MANIFEST);
        fs::write(&mpath, json).map_err(io("write manifest"))?;
        File::open(&mpath)
            .and_then(|f| f.sync_all())
            .map_err(io("sync manifest"))?;
        for p in [&image, &mpath] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o444))
                .map_err(io("make layer read-only"))?;
        }
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755))
            .map_err(io("layer directory mode"))?;
        let dest = self.cfg.root.join(key);
        remove_entry(&dest);
        fs::rename(&out, &dest).map_err(io("publish layer"))?;
        if let Ok(d) = File::open(&self.cfg.root) {
            let _ = d.sync_all();
        }
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(draft);
        self.lookup(key).ok_or_else(|| {
            LayerError::io(
                "verify published layer",
                std::io::Error::other("the published layer does not verify"),
            )
        })
    }
}

#[async_trait]
impl PackageLayers for FsPackageLayers {
    async fn layer(&self, language: Language, specs: &[PackageSpec]) -> Result<PackageLayer> {
        self.get(language, specs).await.map_err(Error::from)
    }
}
