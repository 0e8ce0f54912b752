//! The initramfs: a cpio "newc" archive written here (no root needed) holding the agent as
//! `/init`, the boot mount points and `/dev/console`, compressed with zstd
//! (`CONFIG_RD_ZSTD` in the kernel fragment).
//!
//! Boot contract (implemented by the agent): the agent is `/init`; it mounts devtmpfs, proc
//! and sysfs, mounts the root image `/dev/vda` (EROFS, read-only) on `/newroot` and switches
//! root into it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::cache::{self, KeyBuilder, KeyRecord};
use super::exec::{self, Step};
use super::{Ctx, tools};

/// Output file name in the cache directory.
pub const OUTPUT: &str = "initramfs.cpio.zst";
/// Bumped whenever the archive layout or compression changes.
pub const RECIPE_VERSION: &str = "initramfs-recipe-1";
/// zstd level used for the archive.
pub const ZSTD_LEVEL: &str = "-19";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Writes a cpio archive in the "newc" format the kernel unpacks (see
/// `Documentation/driver-api/early-userspace/buffer-format.rst`). All entries are owned by
/// root with mtime 0, so the archive is reproducible.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

/// Fields of one newc header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Inode number.
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time.
    pub mtime: u32,
    /// Size of the data that follows the name.
    pub filesize: u32,
    /// Major number of the device the file lives on.
    pub devmajor: u32,
    /// Minor number of the device the file lives on.
    pub devminor: u32,
    /// Major number, for device nodes.
    pub rdevmajor: u32,
    /// Minor number, for device nodes.
    pub rdevminor: u32,
    /// Length of the name including its NUL.
    pub namesize: u32,
}

impl Header {
    /// The 110-byte ASCII header: magic then 13 eight-digit hex fields (the last, `check`,
    /// is always 0 in newc).
    pub fn encode(&self) -> String {
        let fields = [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.devmajor,
            self.devminor,
            self.rdevmajor,
            self.rdevminor,
            self.namesize,
            0,
        ];
        let mut s = String::with_capacity(110);
        s.push_str(MAGIC);
        for f in fields {
            s.push_str(&format!("{f:08X}"));
        }
        s
    }
}

fn pad4(n: u64) -> usize {
    ((4 - n % 4) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    fn write_padded(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        let pad = pad4(self.offset);
        self.out.write_all(&[0u8; 3][..pad])?;
        self.offset += pad as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, mut h: Header, data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        if name.len() >= u32::MAX as usize || data.len() > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio entry too large",
            ));
        }
        h.namesize = name.len() as u32 + 1;
        h.filesize = data.len() as u32;
        if name != TRAILER {
            h.ino = self.next_ino;
            self.next_ino += 1;
        }
        let mut head = h.encode().into_bytes();
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        self.write_padded(&head)?;
        self.write_padded(data)
    }

    /// Adds a directory (`mode` is the permission bits).
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let h = Header {
            mode: S_IFDIR | (mode & 0o7777),
            nlink: 2,
            ..Header::default()
        };
        self.entry(path, h, &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let h = Header {
            mode: S_IFREG | (mode & 0o7777),
            nlink: 1,
            ..Header::default()
        };
        self.entry(path, h, data)
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let h = Header {
            mode: S_IFCHR | (mode & 0o7777),
            nlink: 1,
            rdevmajor: major,
            rdevminor: minor,
            ..Header::default()
        };
        self.entry(path, h, &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let h = Header {
            nlink: 1,
            ..Header::default()
        };
        self.entry(TRAILER, h, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The uncompressed archive: `/init` = `agent`, the boot mount points and `/dev/console`.
pub fn archive(agent: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::new());
    for d in ["dev", "proc", "sys", "newroot", "tmp", "run"] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, agent)?;
    w.finish()
}

/// Builds (or finds in the cache) the compressed initramfs around the agent at `agent`.
pub fn build(ctx: &Ctx, agent: &Path) -> Result<KeyRecord> {
    tools::ensure("initramfs", tools::INITRAMFS, &ctx.log("apt"))?;
    let agent_sha = cache::sha256_file(agent)?;
    let key = KeyBuilder::new("initramfs")
        .field("recipe", RECIPE_VERSION)
        .field("zstd-level", ZSTD_LEVEL)
        .field("agent", &agent_sha)
        .finish();
    let out = ctx.dir.join(OUTPUT);
    if let Some(rec) = cache::fresh(&out, &key) {
        println!("==> initramfs: cached ({OUTPUT}, key {})", &key[..12]);
        return Ok(rec);
    }
    let step = Step::start("initramfs", "write cpio (newc) and compress with zstd");
    let data = fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let cpio = archive(&data).context("writing cpio archive")?;
    let raw = ctx.build.join("initramfs.cpio");
    fs::create_dir_all(&ctx.build).with_context(|| format!("creating {}", ctx.build.display()))?;
    fs::write(&raw, &cpio).with_context(|| format!("writing {}", raw.display()))?;
    let tmp = cache::tmp_path(&out);
    exec::run_logged(
        Command::new("zstd")
            .args(["-q", "-f", ZSTD_LEVEL, "-T0"])
            .arg(&raw)
            .arg("-o")
            .arg(&tmp),
        &ctx.log("initramfs"),
    )?;
    if fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("zstd produced an empty {}", tmp.display());
    }
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    let secs = step.done();
    let inputs = BTreeMap::from([
        ("recipe".to_owned(), json!(RECIPE_VERSION)),
        ("agent_sha256".to_owned(), json!(agent_sha)),
        (
            "compression".to_owned(),
            json!(format!("zstd {ZSTD_LEVEL}")),
        ),
        ("uncompressed_size".to_owned(), json!(cpio.len())),
        (
            "contents".to_owned(),
            json!([
                "/init",
                "/dev",
                "/dev/console",
                "/proc",
                "/sys",
                "/newroot",
                "/tmp",
                "/run"
            ]),
        ),
    ]);
    cache::write_record("initramfs", &out, &key, secs, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn header_layout() {
        let h = Header {
            ino: 1,
            mode: 0o100_755,
            nlink: 1,
            filesize: 0x1234,
            rdevmajor: 5,
            rdevminor: 1,
            namesize: 5,
            ..Header::default()
        };
        let s = h.encode();
        assert_eq!(s.len(), 110);
        assert!(s.starts_with("070701"));
        assert_eq!(&s[6..14], "00000001");
        assert_eq!(&s[14..22], "000081ED");
        assert_eq!(&s[54..62], "00001234");
        assert_eq!(&s[102..110], "00000000", "check field");
        assert!(s[6..].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn archive_entries_are_aligned_and_parse_back() {
        let agent = b"\x7fELF-not-really-an-agent";
        let a = archive(agent).unwrap();
        assert_eq!(a.len() % 4, 0);
        // Walk the archive like the kernel does.
        let mut off = 0usize;
        let mut names = Vec::new();
        loop {
            let h = &a[off..off + 110];
            assert_eq!(&h[..6], b"070701", "magic at {off}");
            assert_eq!(off % 4, 0);
            let mode = field(h, 1);
            let filesize = field(h, 6) as usize;
            let namesize = field(h, 11) as usize;
            let name_start = off + 110;
            let name = std::str::from_utf8(&a[name_start..name_start + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(a[name_start + namesize - 1], 0, "name NUL");
            let mut data_start = name_start + namesize;
            data_start += (4 - data_start % 4) % 4;
            let data = &a[data_start..data_start + filesize];
            match name.as_str() {
                "init" => {
                    assert_eq!(mode, 0o100_755);
                    assert_eq!(data, agent);
                }
                "dev/console" => {
                    assert_eq!(mode, 0o020_600);
                    assert_eq!((field(h, 9), field(h, 10)), (5, 1));
                }
                "newroot" | "dev" | "proc" | "sys" => assert_eq!(mode & 0o170_000, S_IFDIR),
                _ => {}
            }
            names.push(name.clone());
            off = data_start + filesize;
            off += (4 - off % 4) % 4;
            if name == TRAILER {
                break;
            }
        }
        assert_eq!(off, a.len());
        for n in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "dev/console",
            "init",
            TRAILER,
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        // Parents come before children.
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("dev") < pos("dev/console"));
    }

    #[test]
    fn cpio_tool_lists_the_archive() {
        // Cross-check with GNU cpio when it is installed; skip loudly otherwise.
        if super::tools::which("cpio").is_none() {
            eprintln!("SKIP: cpio not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        fs::write(&path, archive(b"#!/bin/sh\n").unwrap()).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -itv < {}", path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("init"), "{list}");
        assert!(list.contains("crw-------"), "{list}");
        assert!(list.contains("dev/console"), "{list}");
    }
}
