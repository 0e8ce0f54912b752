//! Files below the session root: streamed writes and reads, directory listings.
//!
//! Paths are first normalised lexically by
//! [`guest_proto::limits::normalize_guest_path`] (relative only, no NUL or control
//! characters, ≤ 4096 bytes, components ≤ 255 bytes, `..` may not leave the root). Then
//! every lookup goes through `openat2(root, path, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`:
//! the kernel follows symlinks that stay below the root and refuses (`EXDEV`) any that
//! leave it, atomically, so user code racing to swap a directory for a symlink cannot
//! redirect the agent (which runs as root in the VM) outside the root. New files and
//! directories are then created relative to a directory descriptor obtained that way.
//!
//! Writes stream into `.sbx-upload-<random>.tmp` in the target directory and are renamed
//! over the target only after the size and SHA-256 match; anything else (abort, mismatch,
//! over the size limit, lost connection) removes the temporary file, so the target never
//! holds a partial file. Memory stays flat: chunks are written as they arrive.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use guest_proto::limits::{MAX_FILE_BYTES, normalize_guest_path};
use guest_proto::{CHUNK_BYTES, DirEntry, GuestErrorKind, GuestMessage, Sha256Hasher};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};
use tokio::sync::mpsc;

use crate::config::{AgentConfig, UserIds};
use crate::engine::error;
use crate::server::Outbox;

/// One message of a file write, after the `WriteFile` header.
#[derive(Debug)]
pub enum WriteMsg {
    /// File content.
    Chunk(Bytes),
    /// End of the content with the expected size and digest.
    End {
        /// Total bytes.
        size: u64,
        /// SHA-256 of the content.
        sha256: [u8; 32],
    },
}

fn path_error(message: impl Into<String>) -> GuestMessage {
    error(GuestErrorKind::Path, message)
}

fn errno_message(path: &str, err: Errno) -> GuestMessage {
    match err {
        Errno::EXDEV | Errno::ELOOP => path_error(format!("{path:?} resolves outside the root")),
        Errno::ENOENT => path_error(format!("{path:?} does not exist")),
        Errno::ENOTDIR => path_error(format!("a component of {path:?} is not a directory")),
        Errno::ENAMETOOLONG => path_error(format!("{path:?} is too long")),
        Errno::EISDIR => path_error(format!("{path:?} is a directory")),
        Errno::ENOSPC | Errno::EDQUOT => no_space(&format!("{path:?}"), err.desc()),
        other => error(GuestErrorKind::Io, format!("{path:?}: {}", other.desc())),
    }
}

/// The typed error for a full home directory (`ENOSPC`, or `EDQUOT` over a quota).
fn no_space(what: &str, desc: &str) -> GuestMessage {
    error(
        GuestErrorKind::NoSpace,
        format!("{what}: {desc} (the VM's home directory is full)"),
    )
}

fn io_message(what: &str, err: &io::Error) -> GuestMessage {
    match err.raw_os_error().map(Errno::from_raw) {
        Some(e @ (Errno::ENOSPC | Errno::EDQUOT)) => no_space(what, e.desc()),
        _ => error(GuestErrorKind::Io, format!("{what}: {err}")),
    }
}

fn open_root(cfg: &AgentConfig) -> Result<OwnedFd, GuestMessage> {
    nix::fcntl::open(
        &cfg.root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| {
        error(
            GuestErrorKind::Io,
            format!("cannot open the root: {}", err.desc()),
        )
    })
}

/// Opens `rel` below `root`, refusing any resolution that leaves it.
fn open_beneath(root: &OwnedFd, rel: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
    let rel = if rel.is_empty() { "." } else { rel };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    loop {
        match openat2(root, rel, how) {
            // EAGAIN: a concurrent rename somewhere on the system; the kernel asks to retry.
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

fn ids(user: Option<UserIds>) -> (Option<Uid>, Option<Gid>) {
    match user {
        Some(u) => (Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid))),
        None => (None, None),
    }
}

fn may_chown(user: Option<UserIds>) -> bool {
    user.is_some() && nix::unistd::geteuid().is_root()
}

/// Changes the owner of `path` to `user` (no-op for `None`).
pub fn chown(path: &Path, user: Option<UserIds>) -> io::Result<()> {
    if user.is_none() {
        return Ok(());
    }
    let (uid, gid) = ids(user);
    nix::unistd::chown(path, uid, gid).map_err(io::Error::from)
}

/// Creates `dir` (a trusted path below `root`) and its missing parents, owned by `user`
/// when the agent may change owners.
pub fn create_dirs_owned(root: &Path, dir: &Path, user: Option<UserIds>) -> io::Result<()> {
    let rel = dir.strip_prefix(root).map_err(io::Error::other)?;
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match std::fs::create_dir(&cur) {
            Ok(()) => {
                if may_chown(user) {
                    chown(&cur, user)?;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Opens (creating as needed) the directory `parts` below `root`.
fn ensure_dir(
    root: &OwnedFd,
    parts: &[&str],
    user: Option<UserIds>,
    display: &str,
) -> Result<OwnedFd, GuestMessage> {
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
    let mut cur = open_beneath(root, "", dir_flags).map_err(|e| errno_message(display, e))?;
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..=i].join("/");
        let next = match open_beneath(root, &prefix, dir_flags) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(&cur, *part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        if may_chown(user) {
                            let (uid, gid) = ids(user);
                            fchownat(&cur, *part, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                                .map_err(|e| errno_message(display, e))?;
                        }
                    }
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno_message(display, e)),
                }
                open_beneath(root, &prefix, dir_flags).map_err(|e| errno_message(display, e))?
            }
            Err(e) => return Err(errno_message(display, e)),
        };
        cur = next;
    }
    Ok(cur)
}

/// A temporary upload file, removed on drop unless committed.
struct Upload {
    dir: OwnedFd,
    tmp: String,
    file: Option<File>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = unlinkat(&self.dir, self.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Receives one file write from `rx` (blocking; run it on a blocking thread) and returns
/// the terminal message. `None` when the channel closed before `End` (connection lost or
/// write cancelled): the temporary file is removed and nothing is reported.
pub fn write_file_blocking(
    cfg: &AgentConfig,
    path: &str,
    executable: bool,
    mut rx: mpsc::Receiver<WriteMsg>,
) -> Option<GuestMessage> {
    let rel = match normalize_guest_path(path, false) {
        Ok(rel) => rel,
        Err(err) => return Some(path_error(err.to_string())),
    };
    let (parent, name) = match rel.rsplit_once('/') {
        Some((parent, name)) => (parent.split('/').collect::<Vec<_>>(), name.to_owned()),
        None => (Vec::new(), rel.clone()),
    };
    let root = match open_root(cfg) {
        Ok(fd) => fd,
        Err(msg) => return Some(msg),
    };
    let dir = match ensure_dir(&root, &parent, cfg.user, path) {
        Ok(fd) => fd,
        Err(msg) => return Some(msg),
    };
    // An existing target that is a symlink leading outside the root is refused too
    // (the rename would only replace the link, but the caller meant its target).
    match open_beneath(&root, &rel, OFlag::O_PATH) {
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => return Some(errno_message(path, e)),
    }
    let tmp = format!(".sbx-upload-{}.tmp", crate::process::random_hex());
    let fd = match openat(
        &dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        Err(e) => return Some(errno_message(path, e)),
    };
    let mut upload = Upload {
        dir,
        tmp,
        file: Some(File::from(fd)),
    };
    let mut hasher = Sha256Hasher::new();
    loop {
        let msg = rx.blocking_recv()?;
        match msg {
            WriteMsg::Chunk(data) => {
                if hasher.len() + data.len() as u64 > MAX_FILE_BYTES {
                    return Some(error(
                        GuestErrorKind::Request,
                        format!("file is larger than the {MAX_FILE_BYTES}-byte limit"),
                    ));
                }
                hasher.update(&data);
                let file = upload.file.as_mut()?;
                if let Err(err) = file.write_all(&data) {
                    return Some(io_message("write failed", &err));
                }
            }
            WriteMsg::End { size, sha256 } => {
                let (got_size, digest) = hasher.finish();
                if got_size != size {
                    return Some(error(
                        GuestErrorKind::Request,
                        format!("size mismatch: announced {size} bytes, received {got_size}"),
                    ));
                }
                if digest.0 != sha256 {
                    return Some(error(GuestErrorKind::Request, "sha256 mismatch"));
                }
                return Some(commit(
                    &mut upload,
                    cfg,
                    path,
                    &name,
                    executable,
                    size,
                    sha256,
                ));
            }
        }
    }
}

fn commit(
    upload: &mut Upload,
    cfg: &AgentConfig,
    path: &str,
    name: &str,
    executable: bool,
    size: u64,
    sha256: [u8; 32],
) -> GuestMessage {
    let Some(file) = upload.file.as_ref() else {
        return error(GuestErrorKind::Io, "upload already closed");
    };
    let mode = if executable { 0o755 } else { 0o644 };
    if let Err(e) = fchmod(file.as_fd(), Mode::from_bits_truncate(mode)) {
        return errno_message(path, e);
    }
    if may_chown(cfg.user) {
        let (uid, gid) = ids(cfg.user);
        if let Err(e) = fchown(file.as_fd(), uid, gid) {
            return errno_message(path, e);
        }
    }
    if let Err(e) = renameat(&upload.dir, upload.tmp.as_str(), &upload.dir, name) {
        return errno_message(path, e);
    }
    // Committed: the temporary name no longer exists, so nothing to remove.
    upload.file = None;
    GuestMessage::FileWritten { size, sha256 }
}

/// Streams a file to `out` as `FileChunk`s (blocking; run it on a blocking thread) and
/// returns the terminal `FileRead` or `Error`.
pub fn read_file_blocking(cfg: &AgentConfig, path: &str, out: &Outbox) -> GuestMessage {
    let rel = match normalize_guest_path(path, false) {
        Ok(rel) => rel,
        Err(err) => return path_error(err.to_string()),
    };
    let root = match open_root(cfg) {
        Ok(fd) => fd,
        Err(msg) => return msg,
    };
    // O_NONBLOCK so a FIFO cannot block the open; only regular files are read.
    let fd = match open_beneath(
        &root,
        &rel,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    ) {
        Ok(fd) => fd,
        Err(e) => return errno_message(path, e),
    };
    let st = match fstat(&fd) {
        Ok(st) => st,
        Err(e) => return errno_message(path, e),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return path_error(format!("{path:?} is not a regular file"));
    }
    if st.st_size as u64 > MAX_FILE_BYTES {
        return error(
            GuestErrorKind::Request,
            format!("{path:?} is larger than the {MAX_FILE_BYTES}-byte limit"),
        );
    }
    let mut file = File::from(fd);
    let mut hasher = Sha256Hasher::new();
    loop {
        // Each chunk is read into its own buffer and handed over as is (no copy).
        let mut buf = BytesMut::zeroed(CHUNK_BYTES);
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return io_message("read failed", &err),
        };
        if hasher.len() + n as u64 > MAX_FILE_BYTES {
            return error(GuestErrorKind::Request, "file grew over the size limit");
        }
        buf.truncate(n);
        hasher.update(&buf);
        if !out.blocking_send(GuestMessage::FileChunk(buf.freeze())) {
            return error(GuestErrorKind::Io, "connection closed");
        }
    }
    let (size, digest) = hasher.finish();
    GuestMessage::FileRead {
        size,
        sha256: digest.0,
    }
}

/// Lists a directory below the root (`""` is the root): name, is_dir, size (real usage
/// for sparse files, 0 for directories), sorted by name. Symlinks are listed as what
/// they are, not followed.
pub fn list_dir(cfg: &AgentConfig, path: &str) -> GuestMessage {
    let rel = match normalize_guest_path(path, true) {
        Ok(rel) => rel,
        Err(err) => return path_error(err.to_string()),
    };
    let root = match open_root(cfg) {
        Ok(fd) => fd,
        Err(msg) => return msg,
    };
    let fd = match open_beneath(&root, &rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(e) => return errno_message(path, e),
    };
    let mut dir = match nix::dir::Dir::from_fd(fd) {
        Ok(dir) => dir,
        Err(e) => return errno_message(path, e),
    };
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => return errno_message(path, e),
        };
        let name = entry.file_name().to_owned();
        if name.as_bytes() == b"." || name.as_bytes() == b".." {
            continue;
        }
        names.push(name);
    }
    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        let Ok(st) = fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue; // removed meanwhile
        };
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        let size = if is_dir {
            0
        } else {
            (st.st_size.max(0) as u64).min((st.st_blocks.max(0) as u64).saturating_mul(512))
        };
        entries.push(DirEntry {
            name: String::from_utf8_lossy(name.as_bytes()).into_owned(),
            is_dir,
            size,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    GuestMessage::DirListing { entries }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(msg: &GuestMessage) -> GuestErrorKind {
        match msg {
            GuestMessage::Error { kind, .. } => *kind,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_disk_is_a_typed_error() {
        for errno in [Errno::ENOSPC, Errno::EDQUOT] {
            let io = io::Error::from_raw_os_error(errno as i32);
            let msg = io_message("write failed", &io);
            assert_eq!(kind(&msg), GuestErrorKind::NoSpace, "{errno}");
            assert_eq!(
                kind(&errno_message("a.bin", errno)),
                GuestErrorKind::NoSpace
            );
        }
        let other = io::Error::from_raw_os_error(Errno::EIO as i32);
        assert_eq!(
            kind(&io_message("write failed", &other)),
            GuestErrorKind::Io
        );
        assert_eq!(
            kind(&errno_message("a", Errno::ENOENT)),
            GuestErrorKind::Path
        );
    }
}
