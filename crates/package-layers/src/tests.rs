//! Store tests against fake package clients and a fake mkfs.erofs (shell scripts), so
//! they need no network: build once, publication, verification, bounds and failures.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sandbox_core::packages::parse_specs;
use sandbox_core::{ErrorKind, Language};

use crate::build::sha256_file;
use crate::{FsPackageLayers, GuestTarget, LayerConfig, LayerError};

const FAKE_PYTHON: &str = r##"#!/bin/bash
here=$(dirname "$0")
if [ "$1" = "-c" ]; then echo "pip 23.0.1 / python 3.11.2"; exit 0; fi
cmd=$3; shift 3
echo "$cmd" >> "$here/log"
dest=; target=; reqs=(); after=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest=$2; shift;;
    --target) target=$2; shift;;
    --) after=1;;
    *) [ $after = 1 ] && reqs+=("$1");;
  esac
  shift
done
if [ "$cmd" = download ]; then
  [ -f "$here/sleep" ] && sleep "$(cat "$here/sleep")"
  for r in "${reqs[@]}"; do
    case "$r" in nosuch*) echo "ERROR: No matching distribution found for $r" >&2; exit 1;; esac
    n=${r%%==*}; v=${r##*==}
    echo "wheel $r" > "$dest/$n-$v-py3-none-any.whl"
  done
else
  for w in "${reqs[@]}"; do b=$(basename "$w"); n=${b%%-*}; echo "# $b" > "$target/$n.py"; done
  [ -f "$here/big" ] && head -c 3000000 /dev/zero > "$target/big.bin"
fi
exit 0
"##;

const FAKE_MKFS: &str = r#"#!/bin/bash
here=$(dirname "$0")
if [ "$1" = "--version" ]; then echo "mkfs.erofs 1.5"; echo "mkfs.erofs: unrecognized option" >&2; exit 1; fi
[ -f "$here/mkfs-fail" ] && { echo "write: No space left on device" >&2; exit 1; }
out=${@: -2:1}; dir=${@: -1}
tar -C "$dir" -cf "$out" .
"#;

struct H {
    dir: tempfile::TempDir,
    tools: PathBuf,
}

impl H {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        fs::create_dir(&tools).unwrap();
        for (name, text) in [("python3", FAKE_PYTHON), ("mkfs.erofs", FAKE_MKFS)] {
            let p = tools.join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir, tools }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn cfg(&self) -> LayerConfig {
        let mut c = LayerConfig::new(self.root());
        c.python = self.tools.join("python3");
        c.mkfs_erofs = self.tools.join("mkfs.erofs");
        c.npm = self.tools.join("no-npm");
        c
    }

    fn store(&self, cfg: LayerConfig) -> FsPackageLayers {
        FsPackageLayers::open(cfg, vec![target()]).unwrap()
    }

    fn downloads(&self) -> usize {
        fs::read_to_string(self.tools.join("log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "download")
            .count()
    }

    /// Names in the cache root other than `.locks`.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".locks")
            .collect();
        v.sort();
        v
    }
}

fn target() -> GuestTarget {
    GuestTarget {
        language: Language::Python,
        interpreter: "3.11.2".into(),
        glibc: (2, 36),
        base_digest: "ab".repeat(32),
        arch: "x86_64".into(),
    }
}

fn specs(s: &[&str]) -> Vec<sandbox_core::PackageSpec> {
    parse_specs(
        Language::Python,
        &s.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
    )
    .unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_build_once_and_publish_a_verified_read_only_layer() {
    let h = H::new();
    fs::write(h.tools.join("sleep"), "0.3").unwrap();
    let store = Arc::new(h.store(h.cfg()));
    let want = specs(&["six==1.16.0", "attrs==23.1.0"]);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = store.clone();
            let w = want.clone();
            tokio::spawn(async move { s.get(Language::Python, &w).await })
        })
        .collect();
    let mut layers = Vec::new();
    for t in tasks {
        layers.push(t.await.unwrap().unwrap());
    }
    assert!(layers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(h.downloads(), 1, "one build for four concurrent requests");
    assert_eq!(store.builds(), 1);
    let layer = &layers[0];
    assert_eq!(layer.image, h.root().join(&layer.key).join("layer.erofs"));
    assert_eq!(mode(&layer.image), 0o444);
    assert_eq!(sha256_file(&layer.image).unwrap().0, layer.digest);
    let m = &store.list()[0].manifest;
    assert_eq!(m.specs, ["attrs==23.1.0", "six==1.16.0"]);
    assert_eq!(m.artifacts.len(), 2);
    let wheel = m
        .artifacts
        .iter()
        .find(|a| a.name.starts_with("six-"))
        .unwrap();
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"wheel six==1.16.0\n"))
    };
    assert_eq!(wheel.sha256.as_deref(), Some(expected.as_str()));
    assert_eq!(
        h.entries(),
        std::slice::from_ref(&layer.key),
        "no draft left behind"
    );

    // Another process (a fresh store) finds it, verifies it and builds nothing.
    let other = h.store(h.cfg());
    let again = other
        .get(Language::Python, &specs(&["attrs==23.1.0", "SIX==1.16.0"]))
        .await
        .unwrap();
    assert_eq!(&again, layer);
    assert_eq!(h.downloads(), 1);
    // Another version is another key.
    let v2 = other
        .get(Language::Python, &specs(&["six==1.15.0"]))
        .await
        .unwrap();
    assert_ne!(v2.key, layer.key);
    assert_eq!(h.downloads(), 2);
}

#[tokio::test]
async fn the_key_covers_the_guest_the_tools_and_the_specs() {
    let t = target();
    let s = specs(&["six==1.16.0"]);
    let k = FsPackageLayers::key(&t, &s, &["pip 1", "mkfs 1"]);
    assert_eq!(k.len(), 64);
    assert_eq!(k, FsPackageLayers::key(&t, &s, &["pip 1", "mkfs 1"]));
    assert_ne!(k, FsPackageLayers::key(&t, &s, &["pip 2", "mkfs 1"]));
    let mut base = t.clone();
    base.base_digest = "cd".repeat(32);
    assert_ne!(k, FsPackageLayers::key(&base, &s, &["pip 1", "mkfs 1"]));
    let mut interp = t.clone();
    interp.interpreter = "3.12.1".into();
    assert_ne!(k, FsPackageLayers::key(&interp, &s, &["pip 1", "mkfs 1"]));
    let extras = specs(&["six[x]==1.16.0"]);
    assert_ne!(k, FsPackageLayers::key(&t, &extras, &["pip 1", "mkfs 1"]));
}

#[tokio::test]
async fn an_unknown_package_is_an_input_error_naming_it_and_nothing_is_published() {
    let h = H::new();
    let store = h.store(h.cfg());
    let err = store
        .get(
            Language::Python,
            &specs(&["six==1.16.0", "nosuch-pkg==9.9"]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Input(_)), "{err}");
    assert!(err.to_string().contains("nosuch-pkg==9.9"), "{err}");
    let core: sandbox_core::Error = err.into();
    assert_eq!(core.kind(), ErrorKind::Input);
    assert!(h.entries().is_empty(), "{:?}", h.entries());
    let err = store.get(Language::Javascript, &[]).await.unwrap_err();
    assert!(matches!(err, LayerError::Input(_)));
}

#[tokio::test]
async fn a_corrupted_layer_is_detected_and_rebuilt() {
    let h = H::new();
    let layer = h
        .store(h.cfg())
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap();
    fs::set_permissions(&layer.image, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&layer.image).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&layer.image, &bytes).unwrap();
    fs::set_permissions(&layer.image, fs::Permissions::from_mode(0o444)).unwrap();
    let fresh = h.store(h.cfg());
    assert!(
        fresh.lookup(&layer.key).is_none(),
        "a corrupted image is refused"
    );
    assert!(!h.root().join(&layer.key).exists(), "and removed");
    let rebuilt = fresh
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap();
    assert_eq!(rebuilt.key, layer.key);
    // Rebuilt, not the damaged bytes (a rebuild need not be byte-identical: the files it
    // installs carry new mtimes), and it verifies against its manifest.
    assert_ne!(fs::read(&rebuilt.image).unwrap(), bytes);
    assert!(h.store(h.cfg()).lookup(&rebuilt.key).is_some());
    assert_eq!(h.downloads(), 2);
    // A writable image is refused too (someone could change it under a running VM).
    fs::set_permissions(&rebuilt.image, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(h.store(h.cfg()).lookup(&rebuilt.key).is_none());
}

#[tokio::test]
async fn a_failed_image_build_leaves_nothing() {
    let h = H::new();
    fs::write(h.tools.join("mkfs-fail"), "").unwrap();
    let err = h
        .store(h.cfg())
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(h.entries().is_empty(), "{:?}", h.entries());
}

#[tokio::test]
async fn builds_are_bounded_in_time_and_size() {
    let h = H::new();
    fs::write(h.tools.join("sleep"), "5").unwrap();
    let mut cfg = h.cfg();
    cfg.build_timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = h
        .store(cfg)
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(h.entries().is_empty(), "{:?}", h.entries());

    fs::remove_file(h.tools.join("sleep")).unwrap();
    fs::write(h.tools.join("big"), "").unwrap();
    let mut cfg = h.cfg();
    cfg.max_layer_bytes = 1 << 20;
    let err = h
        .store(cfg)
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Input(_)), "{err}");
    assert!(err.to_string().contains("limit of 1 MB"), "{err}");
    assert!(h.entries().is_empty(), "{:?}", h.entries());
}

#[tokio::test]
async fn the_cache_evicts_the_least_recently_used_layers() {
    let h = H::new();
    let store = h.store(h.cfg());
    let a = store
        .get(Language::Python, &specs(&["a==1"]))
        .await
        .unwrap();
    let b = store
        .get(Language::Python, &specs(&["b==1"]))
        .await
        .unwrap();
    let size = fs::metadata(&a.image).unwrap().len();
    // Make `a` older than `b`, then use `a`: `b` is now the least recently used.
    for (l, secs) in [(&a, 100), (&b, 50)] {
        fs::File::open(h.root().join(&l.key))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }
    assert!(store.lookup(&a.key).is_some());
    let mut cfg = h.cfg();
    cfg.max_cache_bytes = size * 2;
    let store = h.store(cfg);
    let c = store
        .get(Language::Python, &specs(&["c==1"]))
        .await
        .unwrap();
    let keys: Vec<String> = store.list().into_iter().map(|e| e.manifest.key).collect();
    assert!(keys.contains(&a.key) && keys.contains(&c.key), "{keys:?}");
    assert!(!keys.contains(&b.key), "the least recently used layer goes");
    assert_eq!(store.gc(0, None).len(), 2);
    assert!(store.list().is_empty());
}

#[test]
fn drafts_of_dead_writers_are_swept_on_open() {
    let h = H::new();
    fs::create_dir_all(
        h.root()
            .join(format!(".draft-{}-999999999-x/dl", "a".repeat(64))),
    )
    .unwrap();
    let live = format!(".draft-{}-{}-y", "b".repeat(64), std::process::id());
    fs::create_dir_all(h.root().join(&live)).unwrap();
    let _ = h.store(h.cfg());
    assert_eq!(h.entries(), [live]);
}

/// The real host clients against the real registries (network): a tiny pure-Python wheel
/// and a tiny npm package. Run by hand or by `cargo xtask itest` hosts:
/// `cargo test -p package-layers -- --ignored`.
#[tokio::test]
#[ignore = "needs pip, npm, mkfs.erofs and the package registries"]
async fn real_clients_build_python_and_javascript_layers() {
    let dir = tempfile::tempdir().unwrap();
    let mut js = target();
    js.language = Language::Javascript;
    js.interpreter = "18.20.4".into();
    let store = FsPackageLayers::open(LayerConfig::new(dir.path()), vec![target(), js]).unwrap();
    let l = store
        .get(Language::Python, &specs(&["six==1.16.0"]))
        .await
        .unwrap();
    let m = &store.list()[0].manifest;
    assert_eq!(m.artifacts.len(), 1, "{m:?}");
    assert_eq!(
        m.artifacts[0].sha256.as_deref(),
        Some("8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"),
        "six 1.16.0's published wheel hash"
    );
    assert!(l.image.is_file());
    let err = store
        .get(Language::Python, &specs(&["six==0.0.999"]))
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Input(_)), "{err}");
    assert!(err.to_string().contains("six==0.0.999"), "{err}");
    let jspecs = parse_specs(Language::Javascript, &["is-number@7.0.0".into()]).unwrap();
    let jl = store.get(Language::Javascript, &jspecs).await.unwrap();
    assert!(jl.image.is_file());
    let jm = store
        .list()
        .into_iter()
        .find(|e| e.manifest.key == jl.key)
        .unwrap()
        .manifest;
    assert!(
        jm.artifacts
            .iter()
            .any(|a| a.name == "is-number@7.0.0" && a.integrity.is_some()),
        "{jm:?}"
    );
    let jerr = store
        .get(
            Language::Javascript,
            &parse_specs(Language::Javascript, &["is-number@99.0.0".into()]).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(jerr, LayerError::Input(_)), "{jerr}");
}
