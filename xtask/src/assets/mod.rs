//! `cargo xtask assets`: everything a VM boots from, built from packages this machine
//! reaches, into a content-keyed cache directory.
//!
//! Layout of the cache directory (default `~/.cache/sbx/assets`, override `SBX_ASSETS_DIR`):
//!
//! | file | what |
//! |---|---|
//! | `vmlinux` | stripped PVH guest kernel ([`kernel`]) |
//! | `sbx-agent` | static guest agent ([`agent`]) |
//! | `initramfs.cpio.zst` | agent as `/init` ([`initramfs`]) |
//! | `<image>-base-x86_64.qcow2` | EROFS root in compressed qcow2 ([`rootfs`]) |
//! | `<file>.key` | content key and inputs of `<file>` ([`cache`]) |
//! | `manifest.json` | every asset with sha256, size, inputs ([`manifest`]) |
//! | `build/` | unpacked kernel tree, rootfs work dirs, shared `.deb`s, logs |
//!
//! Other commands (boot-smoke, itest, bench) find the assets with [`locate`].

pub mod agent;
pub mod cache;
pub mod exec;
pub mod initramfs;
pub mod kernel;
pub mod manifest;
pub mod npm;
pub mod rootfs;
pub mod tools;
pub mod wheels;

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub use rootfs::Image;

/// Environment variable that overrides the cache directory.
pub const DIR_ENV: &str = "SBX_ASSETS_DIR";

/// Where assets are built and looked up: `$SBX_ASSETS_DIR`, else
/// `$XDG_CACHE_HOME/sbx/assets`, else `$HOME/.cache/sbx/assets`.
pub fn default_dir() -> Result<PathBuf> {
    if let Some(d) = env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("sbx/assets"));
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither SBX_ASSETS_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/sbx/assets"))
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Paths every build step shares.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Workspace root (sources, kernel fragment).
    pub root: PathBuf,
    /// Cache directory (outputs).
    pub dir: PathBuf,
    /// Work directory below the cache (`build/`).
    pub build: PathBuf,
}

impl Ctx {
    /// A context for `dir`, creating it.
    pub fn new(root: PathBuf, dir: PathBuf) -> Result<Self> {
        let build = dir.join("build");
        fs::create_dir_all(build.join("logs"))
            .with_context(|| format!("creating {}", build.display()))?;
        Ok(Self { root, dir, build })
    }

    /// Log file for one asset.
    pub fn log(&self, name: &str) -> PathBuf {
        self.build.join("logs").join(format!("{name}.log"))
    }
}

/// Which asset to build (`--only`); dependencies (the agent for initramfs and images) are
/// built or taken from the cache as needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The guest kernel.
    Kernel,
    /// The static guest agent.
    Agent,
    /// The initramfs (and the agent it contains).
    Initramfs,
    /// The base images (and the agent they contain).
    Images,
}

/// Which base images to build (`--image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageChoice {
    /// bash + common tools.
    Raw,
    /// python3.
    Python,
    /// Bun (JavaScript, TypeScript).
    Javascript,
    /// All three.
    All,
    /// Debian's node 18 (bench comparison only; not part of `all`).
    JavascriptNode18,
    /// Node.js 24 LTS from npm (bench comparison only; not part of `all`).
    JavascriptNode24,
}

impl ImageChoice {
    /// The images this choice stands for.
    pub fn images(self) -> Vec<Image> {
        match self {
            ImageChoice::Raw => vec![Image::Raw],
            ImageChoice::Python => vec![Image::Python],
            ImageChoice::Javascript => vec![Image::Javascript],
            ImageChoice::All => Image::ALL.to_vec(),
            ImageChoice::JavascriptNode18 => vec![Image::JavascriptNode18],
            ImageChoice::JavascriptNode24 => vec![Image::JavascriptNode24],
        }
    }
}

/// What `cargo xtask assets` builds.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Cache directory.
    pub dir: PathBuf,
    /// Only this asset (with its dependencies); everything when `None`.
    pub only: Option<Only>,
    /// Base images to build.
    pub images: Vec<Image>,
}

fn all_files() -> Vec<String> {
    let mut f = vec![
        kernel::OUTPUT.to_owned(),
        agent::OUTPUT.to_owned(),
        initramfs::OUTPUT.to_owned(),
    ];
    f.extend(
        Image::ALL
            .iter()
            .chain(Image::BENCH.iter())
            .map(|i| i.file_name()),
    );
    f
}

/// Builds what `opts` asks for (each asset only when its inputs changed), then rewrites
/// `manifest.json`.
pub fn build(opts: &BuildOptions) -> Result<()> {
    let start = Instant::now();
    let ctx = Ctx::new(workspace_root(), opts.dir.clone())?;
    println!("assets: cache {}", ctx.dir.display());
    let want = |o: Only| opts.only.is_none() || opts.only == Some(o);

    if want(Only::Kernel) {
        kernel::build(&ctx)?;
    }
    let needs_agent = want(Only::Agent) || want(Only::Initramfs) || want(Only::Images);
    if needs_agent {
        let agent = agent::build(&ctx)?;
        let agent_path = ctx.dir.join(&agent.file);
        if want(Only::Initramfs) {
            initramfs::build(&ctx, &agent_path)?;
        }
        if want(Only::Images) {
            for image in &opts.images {
                rootfs::build(&ctx, *image, &agent_path)?;
            }
        }
    }

    let manifest = manifest::Manifest::collect(&ctx.dir, &all_files());
    manifest.write(&ctx.dir)?;
    println!("assets: {}", ctx.dir.join(manifest::FILE).display());
    for rec in manifest.assets.values() {
        println!(
            "    {:<18} {:<30} {:>8.1} MB  sha256 {}",
            rec.asset,
            rec.file,
            rec.size as f64 / 1e6,
            &rec.sha256[..16]
        );
    }
    println!(
        "assets: done in {}",
        exec::fmt_secs(start.elapsed().as_secs_f64())
    );
    Ok(())
}

/// Paths of the built assets, for the commands that boot VMs.
#[derive(Debug, Clone)]
pub struct Assets {
    /// The cache directory.
    pub dir: PathBuf,
    /// The PVH guest kernel.
    pub vmlinux: PathBuf,
    /// The compressed initramfs (agent as `/init`).
    pub initramfs: PathBuf,
    /// The static agent binary.
    pub agent: PathBuf,
    /// Base images that have been built.
    pub images: BTreeMap<Image, PathBuf>,
}

impl Assets {
    /// The base image for `image`, or an error naming the command that builds it.
    pub fn image(&self, image: Image) -> Result<&Path> {
        self.images.get(&image).map(PathBuf::as_path).with_context(|| {
            format!(
                "base image {} not found in {}; build it with `cargo xtask assets --only images --image {image}`",
                image.file_name(),
                self.dir.display()
            )
        })
    }
}

/// Finds the assets in `dir`: the kernel, initramfs and agent must be there; base images
/// are reported if present (see [`Assets::image`]). Errors name `cargo xtask assets`.
pub fn locate(dir: &Path) -> Result<Assets> {
    let path = |f: &str| dir.join(f);
    let required = [kernel::OUTPUT, initramfs::OUTPUT, agent::OUTPUT];
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|f| !path(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "guest assets missing in {}: {}; build them with `cargo xtask assets` \
             (set {DIR_ENV} to use another directory)",
            dir.display(),
            missing.join(", ")
        );
    }
    let images = Image::ALL
        .iter()
        .chain(Image::BENCH.iter())
        .map(|i| (*i, path(&i.file_name())))
        .filter(|(_, p)| p.is_file())
        .collect();
    Ok(Assets {
        dir: dir.to_path_buf(),
        vmlinux: path(kernel::OUTPUT),
        initramfs: path(initramfs::OUTPUT),
        agent: path(agent::OUTPUT),
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_names_the_build_command_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", locate(dir.path()).unwrap_err());
        assert!(err.contains("cargo xtask assets"), "{err}");
        assert!(err.contains("vmlinux"), "{err}");

        for f in [kernel::OUTPUT, initramfs::OUTPUT, agent::OUTPUT] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        fs::write(dir.path().join(Image::Raw.file_name()), b"x").unwrap();
        let a = locate(dir.path()).unwrap();
        assert_eq!(a.vmlinux, dir.path().join("vmlinux"));
        assert!(a.image(Image::Raw).is_ok());
        let err = format!("{:#}", a.image(Image::Python).unwrap_err());
        assert!(
            err.contains("cargo xtask assets --only images --image python"),
            "{err}"
        );
    }

    #[test]
    fn image_choice_expands() {
        assert_eq!(ImageChoice::All.images(), Image::ALL);
        assert_eq!(ImageChoice::Python.images(), [Image::Python]);
    }
}
