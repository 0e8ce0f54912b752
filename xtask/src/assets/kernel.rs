//! The guest kernel: Debian's linux-source-6.1, `tinyconfig` + the repo's fragment, PVH
//! `vmlinux`, with a check that the final `.config` is what the fragment asks for.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::cache::{self, KeyBuilder, KeyRecord};
use super::exec::{self, Step};
use super::{Ctx, tools};

/// The config fragment, relative to the workspace root.
pub const FRAGMENT: &str = "images/kernel/sbx.config";
/// Patches applied to the source, in file-name order (`*.patch`, `patch -p1`), relative
/// to the workspace root.
pub const PATCHES: &str = "images/kernel/patches";
/// Debian package that ships the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The source tarball that package installs.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bumped whenever the build recipe below changes in a way that changes the output.
pub const RECIPE_VERSION: &str = "kernel-recipe-2";
/// Output file name in the cache directory.
pub const OUTPUT: &str = "vmlinux";

/// What the fragment demands of one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// `CONFIG_X=value`: the final `.config` must have exactly this value.
    Value(String),
    /// `# CONFIG_X is not set`: the option must be off (absent, `is not set`, or `n`).
    Off,
}

/// One option the fragment pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Option name including the `CONFIG_` prefix.
    pub name: String,
    /// What it must be.
    pub want: Want,
}

/// An option whose final value differs from the fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Option name including the `CONFIG_` prefix.
    pub name: String,
    /// What the fragment asked for.
    pub wanted: String,
    /// What the final `.config` has (`(absent)` when the option is not there at all).
    pub got: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: wanted {}, got {}", self.name, self.wanted, self.got)
    }
}

fn is_option_name(s: &str) -> bool {
    s.starts_with("CONFIG_")
        && s.len() > "CONFIG_".len()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses one `.config`-style line into `(name, value)`; `is not set` becomes `n`.
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return is_option_name(name).then_some((name, "n"));
    }
    let (name, value) = line.split_once('=')?;
    is_option_name(name).then_some((name, value))
}

/// Parses the fragment's pinned options. Other comments and blank lines are ignored;
/// an option pinned twice with different values is an error.
pub fn parse_fragment(text: &str) -> Result<Vec<Requirement>> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut out = Vec::new();
    for (no, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        let Some((name, value)) = parse_line(trimmed) else {
            if trimmed.starts_with('#') {
                continue;
            }
            bail!("fragment line {}: cannot parse `{trimmed}`", no + 1);
        };
        if let Some(prev) = seen.insert(name, value) {
            if prev != value {
                bail!(
                    "fragment line {}: {name} pinned twice ({prev} and {value})",
                    no + 1
                );
            }
            continue;
        }
        let want = if value == "n" {
            Want::Off
        } else {
            Want::Value(value.to_owned())
        };
        out.push(Requirement {
            name: name.to_owned(),
            want,
        });
    }
    Ok(out)
}

/// Parses a `.config` into option → value (`n` for `is not set`).
pub fn parse_dotconfig(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(parse_line)
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Compares the fragment's requirements with a final `.config`.
pub fn check_config(reqs: &[Requirement], dotconfig: &str) -> Vec<Mismatch> {
    let cfg = parse_dotconfig(dotconfig);
    let mut out = Vec::new();
    for r in reqs {
        let got = cfg.get(&r.name).map(String::as_str);
        let ok = match (&r.want, got) {
            (Want::Off, None | Some("n")) => true,
            (Want::Off, Some(_)) => false,
            (Want::Value(v), Some(g)) => v == g,
            (Want::Value(_), None) => false,
        };
        if !ok {
            out.push(Mismatch {
                name: r.name.clone(),
                wanted: match &r.want {
                    Want::Off => "off".to_owned(),
                    Want::Value(v) => v.clone(),
                },
                got: match got {
                    None => "(absent)".to_owned(),
                    Some("n") => "off".to_owned(),
                    Some(g) => g.to_owned(),
                },
            });
        }
    }
    out
}

/// Fails with every mismatching option listed when the final `.config` does not honour
/// the fragment.
pub fn verify_config(fragment: &str, dotconfig: &str) -> Result<()> {
    let reqs = parse_fragment(fragment)?;
    let bad = check_config(&reqs, dotconfig);
    if bad.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = bad.iter().map(|m| format!("  {m}")).collect();
    bail!(
        "kernel config check failed: {} of {} pinned options differ after olddefconfig \
         (a dependency or menu is probably missing from {FRAGMENT}):\n{}",
        bad.len(),
        reqs.len(),
        list.join("\n")
    )
}

/// Whether `readelf -n` output shows the Xen PVH entry note (type 0x12), which QEMU needs
/// to boot the `vmlinux` directly.
pub fn has_pvh_note(readelf_notes: &str) -> bool {
    readelf_notes.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("Xen") && (l.contains("0x00000012") || l.contains("XEN_ELFNOTE_PHYS32_ENTRY"))
    })
}

/// One source patch: its file name and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// File name (sorts the application order).
    pub name: String,
    /// The unified diff, with any leading description.
    pub text: String,
}

/// The `*.patch` files of `dir`, sorted by name (none when the directory is missing).
pub fn read_patches(dir: &std::path::Path) -> Result<Vec<Patch>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut patches = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".patch") {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        patches.push(Patch {
            name: name.to_owned(),
            text,
        });
    }
    patches.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(patches)
}

/// What the unpacked tree must have been made from: the source version, then each patch
/// with its digest. A tree whose marker differs is unpacked afresh (patches cannot be
/// un-applied reliably).
pub fn tree_marker(source_version: &str, patches: &[Patch]) -> String {
    let mut marker = source_version.to_owned();
    for p in patches {
        marker.push('\n');
        marker.push_str(&p.name);
        marker.push(' ');
        marker.push_str(&cache::sha256_bytes(p.text.as_bytes()));
    }
    marker
}

/// Builds (or finds in the cache) the stripped PVH `vmlinux`.
pub fn build(ctx: &Ctx) -> Result<KeyRecord> {
    tools::ensure("kernel", tools::KERNEL, &ctx.log("apt"))?;
    let fragment_path = ctx.root.join(FRAGMENT);
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    parse_fragment(&fragment)?;
    let patches_dir = ctx.root.join(PATCHES);
    let patches = read_patches(&patches_dir)?;
    let source_version = exec::output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}"])
            .arg(SOURCE_PACKAGE),
    )?
    .trim()
    .to_owned();
    let gcc = exec::output(Command::new("gcc").arg("--version"))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut key = KeyBuilder::new("kernel");
    key.field("recipe", RECIPE_VERSION)
        .field("fragment", &fragment)
        .field("linux-source", &source_version)
        .field("gcc", &gcc);
    for p in &patches {
        key.field(&format!("patch {}", p.name), &p.text);
    }
    let key = key.finish();
    let out = ctx.dir.join(OUTPUT);
    if let Some(rec) = cache::fresh(&out, &key) {
        println!("==> kernel: cached ({OUTPUT}, key {})", &key[..12]);
        return Ok(rec);
    }

    let total = Step::start("kernel", "build");
    let log = ctx.log("kernel");
    let parent = ctx.build.join("kernel");
    let tree = parent.join(SOURCE_PACKAGE);
    let marker = tree.join(".sbx-source-version");
    let want_marker = tree_marker(&source_version, &patches);
    if fs::read_to_string(&marker).ok().as_deref() != Some(want_marker.as_str()) {
        let step = Step::start("kernel", &format!("unpack {SOURCE_TARBALL}"));
        cache::remove_any(&tree)?;
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        exec::run_logged(
            Command::new("tar")
                .arg("-xf")
                .arg(SOURCE_TARBALL)
                .arg("-C")
                .arg(&parent),
            &log,
        )?;
        if !tree.join("Makefile").is_file() {
            bail!(
                "{SOURCE_TARBALL} did not unpack to {} (no Makefile)",
                tree.display()
            );
        }
        for p in &patches {
            let path = patches_dir.join(&p.name);
            exec::run_logged(
                Command::new("patch")
                    .current_dir(&tree)
                    .args(["-p1", "--forward", "--batch", "--fuzz=0", "-i"])
                    .arg(&path),
                &log,
            )
            .with_context(|| {
                format!(
                    "kernel patch {} does not apply to {SOURCE_PACKAGE} {source_version}",
                    path.display()
                )
            })?;
        }
        fs::write(&marker, &want_marker)
            .with_context(|| format!("writing {}", marker.display()))?;
        step.done();
    } else {
        println!("==> kernel: reusing unpacked tree {}", tree.display());
    }

    let step = Step::start("kernel", "configure (tinyconfig + fragment + olddefconfig)");
    let make = |args: &[&str]| -> Result<()> {
        exec::run_logged(Command::new("make").current_dir(&tree).args(args), &log)
    };
    make(&["tinyconfig"])?;
    exec::run_logged(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&tree)
            .args(["-m", ".config"])
            .arg(&fragment_path),
        &log,
    )?;
    make(&["olddefconfig"])?;
    step.done();

    let step = Step::start("kernel", "check .config against the fragment");
    let dotconfig = fs::read_to_string(tree.join(".config")).context("reading .config")?;
    verify_config(&fragment, &dotconfig)?;
    step.done();

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let step = Step::start(
        "kernel",
        &format!(
            "make -j{jobs} vmlinux (≈10 min on 2 cores; log {})",
            log.display()
        ),
    );
    exec::run_logged(
        Command::new("nice").current_dir(&tree).args([
            "-n",
            "10",
            "make",
            &format!("-j{jobs}"),
            "vmlinux",
        ]),
        &log,
    )?;
    step.done();

    let step = Step::start("kernel", "strip and check the PVH note");
    let tmp = cache::tmp_path(&out);
    exec::run_logged(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&tmp)
            .arg(tree.join("vmlinux")),
        &log,
    )?;
    let notes = exec::output(Command::new("readelf").arg("-n").arg(&tmp))?;
    if !has_pvh_note(&notes) {
        bail!("stripped vmlinux has no Xen PVH entry note (CONFIG_PVH); QEMU cannot boot it");
    }
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    step.done();

    let secs = total.done();
    let inputs = BTreeMap::from([
        ("recipe".to_owned(), json!(RECIPE_VERSION)),
        ("fragment".to_owned(), json!(FRAGMENT)),
        (
            "fragment_sha256".to_owned(),
            json!(cache::sha256_bytes(fragment.as_bytes())),
        ),
        (
            "linux_source".to_owned(),
            json!(format!("{SOURCE_PACKAGE} {source_version}")),
        ),
        ("gcc".to_owned(), json!(gcc)),
        (
            "patches".to_owned(),
            json!(
                patches
                    .iter()
                    .map(|p| json!({
                        "file": format!("{PATCHES}/{}", p.name),
                        "sha256": cache::sha256_bytes(p.text.as_bytes()),
                    }))
                    .collect::<Vec<_>>()
            ),
        ),
        (
            "dotconfig_sha256".to_owned(),
            json!(cache::sha256_bytes(dotconfig.as_bytes())),
        ),
    ]);
    cache::write_record("kernel", &out, &key, secs, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const FRAGMENT_TEXT: &str = "\
# a comment
CONFIG_BLOCK=y
CONFIG_NR_CPUS=8
CONFIG_CMDLINE=\"quiet\"
# CONFIG_IO_URING is not set
# CONFIG_MODULES is not set

# CONFIG_PCI is not set
";

    const GOOD: &str = "\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_BLOCK=y
CONFIG_NR_CPUS=8
CONFIG_CMDLINE=\"quiet\"
# CONFIG_IO_URING is not set
CONFIG_OTHER=y
";

    #[test]
    fn parses_fragment() {
        let r = parse_fragment(FRAGMENT_TEXT).unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(
            r[0],
            Requirement {
                name: "CONFIG_BLOCK".into(),
                want: Want::Value("y".into())
            }
        );
        assert_eq!(r[2].want, Want::Value("\"quiet\"".into()));
        assert_eq!(r[3].want, Want::Off);
        assert_eq!(r[5].name, "CONFIG_PCI");
    }

    #[test]
    fn fragment_rejects_contradictions_and_garbage() {
        assert!(parse_fragment("CONFIG_A=y\n# CONFIG_A is not set\n").is_err());
        assert!(parse_fragment("CONFIG_A=y\nCONFIG_A=y\n").is_ok());
        assert!(parse_fragment("BLOCK=y\n").is_err());
    }

    #[test]
    fn good_config_passes() {
        // Options that are off may be absent entirely (their menu is off).
        verify_config(FRAGMENT_TEXT, GOOD).unwrap();
    }

    #[test]
    fn forbidden_option_turned_on_fails() {
        let bad = GOOD.replace("# CONFIG_IO_URING is not set", "CONFIG_IO_URING=y");
        let reqs = parse_fragment(FRAGMENT_TEXT).unwrap();
        let m = check_config(&reqs, &bad);
        assert_eq!(
            m,
            [Mismatch {
                name: "CONFIG_IO_URING".into(),
                wanted: "off".into(),
                got: "y".into()
            }]
        );
        let err = verify_config(FRAGMENT_TEXT, &bad).unwrap_err().to_string();
        assert!(err.contains("CONFIG_IO_URING: wanted off, got y"), "{err}");
    }

    #[test]
    fn wanted_option_dropped_by_olddefconfig_fails() {
        // What happens when a dependency is missing: olddefconfig silently drops the option.
        let bad = GOOD
            .replace("CONFIG_BLOCK=y", "# CONFIG_BLOCK is not set")
            .replace("CONFIG_NR_CPUS=8\n", "")
            .replace("CONFIG_CMDLINE=\"quiet\"", "CONFIG_CMDLINE=\"\"");
        let err = verify_config(FRAGMENT_TEXT, &bad).unwrap_err().to_string();
        assert!(err.contains("3 of 6"), "{err}");
        assert!(err.contains("CONFIG_BLOCK: wanted y, got off"), "{err}");
        assert!(
            err.contains("CONFIG_NR_CPUS: wanted 8, got (absent)"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_CMDLINE: wanted \"quiet\", got \"\""),
            "{err}"
        );
    }

    #[test]
    fn module_is_not_on() {
        let reqs = parse_fragment("CONFIG_VIRTIO_BLK=y\n").unwrap();
        let m = check_config(&reqs, "CONFIG_VIRTIO_BLK=m\n");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].got, "m");
    }

    #[test]
    fn repo_fragment_parses_and_pins_the_essentials() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(FRAGMENT);
        let text = fs::read_to_string(path).unwrap();
        let reqs = parse_fragment(&text).unwrap();
        let want = |n: &str| {
            reqs.iter()
                .find(|r| r.name == n)
                .map(|r| r.want.clone())
                .unwrap_or_else(|| panic!("{n} not pinned"))
        };
        for on in [
            "CONFIG_64BIT",
            "CONFIG_PVH",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_BLOCK",
            "CONFIG_EROFS_FS",
            "CONFIG_EROFS_FS_ZIP",
            "CONFIG_MISC_FILESYSTEMS",
            "CONFIG_RD_ZSTD",
            "CONFIG_ZRAM",
            "CONFIG_ZSMALLOC",
            "CONFIG_PSI",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_DEVTMPFS",
        ] {
            assert_eq!(want(on), Want::Value("y".into()), "{on}");
        }
        for off in [
            "CONFIG_MODULES",
            "CONFIG_IO_URING",
            "CONFIG_BPF_SYSCALL",
            "CONFIG_USERFAULTFD",
            "CONFIG_PCI",
            "CONFIG_ACPI",
        ] {
            assert_eq!(want(off), Want::Off, "{off}");
        }
    }

    #[test]
    fn pvh_note_detection() {
        let notes = "Displaying notes found in: .notes\n  Owner   Data size \tDescription\n  \
                     Xen                  0x00000008\tUnknown note type: (0x00000012)\n";
        assert!(has_pvh_note(notes));
        assert!(!has_pvh_note(
            "  GNU                  0x00000014\tNT_GNU_BUILD_ID\n"
        ));
    }

    #[test]
    fn patches_are_read_in_name_order_and_mark_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_patches(&dir.path().join("missing"))
                .unwrap()
                .is_empty()
        );
        std::fs::write(dir.path().join("0002-b.patch"), "second").unwrap();
        std::fs::write(dir.path().join("0001-a.patch"), "first").unwrap();
        std::fs::write(dir.path().join("README"), "not a patch").unwrap();
        let patches = read_patches(dir.path()).unwrap();
        let names: Vec<_> = patches.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch"]);
        assert_eq!(patches[0].text, "first");

        let marker = tree_marker("6.1.1", &patches);
        assert!(marker.starts_with("6.1.1\n0001-a.patch "));
        assert_eq!(tree_marker("6.1.1", &[]), "6.1.1");
        let mut changed = patches.clone();
        changed[1].text.push('!');
        assert_ne!(tree_marker("6.1.1", &changed), marker);
    }

    #[test]
    fn the_repo_patches_are_unified_diffs_against_the_source() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let patches = read_patches(&root.join(PATCHES)).unwrap();
        assert!(!patches.is_empty());
        for p in &patches {
            assert!(
                p.text.contains("\n--- a/") && p.text.contains("\n+++ b/"),
                "{} is not a -p1 unified diff",
                p.name
            );
        }
    }
}
