//! The accelerator verdict: KVM only when a canary guest really runs on it.
//!
//! Opening `/dev/kvm` proves nothing: a PVM-flavoured KVM (`kvm_pvm`) accepts a guest and
//! then emulates it instruction by instruction, so an ordinary kernel never boots. The
//! probe therefore boots a canary under `-accel kvm`: a 64 KiB firmware image whose reset
//! vector runs a 16.7-million-iteration loop and then writes to QEMU's `isa-debug-exit`
//! port, which makes QEMU exit with status `(0x31 << 1) | 1 = 99`. Real hardware
//! virtualization finishes it in milliseconds, TCG in a few hundred; an emulating KVM
//! needs over a minute and hits the deadline. The verdict is cached on disk, keyed by
//! host name, QEMU version, kernel release and the identity of `/dev/kvm`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandbox_core::ports::Accelerator;
use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::error::ProbeError;

/// QEMU's exit status when the canary finished: `(0x31 << 1) | 1`.
pub const CANARY_EXIT_STATUS: i32 = 99;

/// Loop iterations of the canary (two instructions each).
pub const CANARY_ITERATIONS: u32 = 0x0100_0000;

/// Bumped whenever the canary or the verdict logic changes (part of the cache key).
const CANARY_REVISION: u32 = 1;

/// Default deadline of the canary boot.
pub const DEFAULT_CANARY_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a cached verdict is trusted.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The canary firmware: 64 KiB (QEMU wants a multiple of 64 KiB), mapped so that its
/// last 16 bytes hold the x86 reset vector.
///
/// ```text
/// 0xFFA0: 66 B9 imm32   mov ecx, CANARY_ITERATIONS
///         66 49         dec ecx
///         75 FC         jnz -4
///         B0 31         mov al, 0x31
///         E6 F4         out 0xf4, al      ; isa-debug-exit: QEMU exits with 99
///         F4            hlt
///         EB FD         jmp -3
/// 0xFFF0: EB AE         jmp 0xFFA0        ; reset vector
/// ```
pub fn canary_firmware() -> Vec<u8> {
    let mut image = vec![0xF4u8; 64 * 1024]; // hlt everywhere else
    let mut code = vec![0x66, 0xB9];
    code.extend_from_slice(&CANARY_ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0x49, 0x75, 0xFC, 0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD,
    ]);
    image[0xFFA0..0xFFA0 + code.len()].copy_from_slice(&code);
    image[0xFFF0..0xFFF2].copy_from_slice(&[0xEB, 0xAE]);
    image
}

/// The QEMU arguments that boot the canary firmware at `firmware` under `accel`.
pub fn canary_args(firmware: &Path, accel: Accelerator) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-M",
        "microvm,x-option-roms=off,isa-serial=off,rtc=off,acpi=off",
        "-m",
        "16M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "none",
        "-monitor",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    match accel {
        Accelerator::Kvm => args.extend(
            ["-accel", "kvm", "-cpu", "host,-arch-capabilities,-vmx,-svm"].map(OsString::from),
        ),
        Accelerator::Tcg => {
            args.extend(["-accel", "tcg,thread=single", "-cpu", "max"].map(OsString::from))
        }
    }
    args.push("-bios".into());
    args.push(firmware.as_os_str().to_owned());
    args
}

/// How a canary boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryOutcome {
    /// The guest ran the loop and signalled the exit port.
    Passed(Duration),
    /// The deadline passed first; QEMU was killed.
    TimedOut(Duration),
    /// QEMU exited otherwise (refused the accelerator, crashed, ...).
    Failed {
        /// QEMU's exit status, as text.
        status: String,
        /// The last line QEMU wrote to stderr.
        stderr: String,
    },
}

/// Boots the canary once under `accel` with a deadline.
pub async fn run_canary(
    qemu: &Path,
    accel: Accelerator,
    timeout: Duration,
) -> Result<CanaryOutcome, ProbeError> {
    let mut file = tempfile::Builder::new()
        .prefix("sbx-canary-")
        .suffix(".bin")
        .tempfile()
        .map_err(|e| ProbeError::io("creating the canary firmware file", e))?;
    file.write_all(&canary_firmware())
        .and_then(|()| file.flush())
        .map_err(|e| ProbeError::io("writing the canary firmware", e))?;
    let args = canary_args(file.path(), accel);
    let started = Instant::now();
    match cmd::run(qemu.as_os_str(), &args, None, timeout).await {
        Ok(out) if out.status.code() == Some(CANARY_EXIT_STATUS) => {
            Ok(CanaryOutcome::Passed(out.elapsed))
        }
        Ok(out) => Ok(CanaryOutcome::Failed {
            status: out.status.to_string(),
            stderr: out.stderr_line(),
        }),
        Err(ProbeError::Timeout { .. }) => Ok(CanaryOutcome::TimedOut(started.elapsed())),
        Err(e) => Err(e),
    }
}

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    /// KVM or TCG.
    pub accelerator: Accelerator,
    /// Why, in words (e.g. `/dev/kvm missing → TCG`).
    pub reason: String,
    /// How long the canary boot took, when one ran.
    pub canary_ms: Option<u64>,
    /// True when this verdict came from the on-disk cache.
    #[serde(default)]
    pub from_cache: bool,
}

impl AccelVerdict {
    fn tcg(reason: impl Into<String>) -> Self {
        Self {
            accelerator: Accelerator::Tcg,
            reason: reason.into(),
            canary_ms: None,
            from_cache: false,
        }
    }
}

/// What decides the verdict; everything is injectable for tests.
#[derive(Debug, Clone)]
pub struct AccelProbe {
    /// The KVM device (normally `/dev/kvm`).
    pub dev_kvm: PathBuf,
    /// The QEMU binary and its version line, when found.
    pub qemu: Option<(PathBuf, String)>,
    /// Directory of the verdict cache (`accel.json`), or `None` for no cache.
    pub cache_dir: Option<PathBuf>,
    /// `SBX_FORCE_TCG=1`.
    pub force_tcg: bool,
    /// Deadline of the canary boot.
    pub timeout: Duration,
    /// How long a cached verdict is trusted.
    pub cache_ttl: Duration,
    /// Host name (cache key).
    pub hostname: String,
    /// Kernel release (cache key).
    pub kernel_release: String,
}

/// Identity of the KVM device node: device number, inode and change time. A new node
/// (reboot, module reload) gives a new identity and invalidates cached verdicts.
fn kvm_identity(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "rdev={:x},ino={},ctime={}.{}",
        meta.rdev(),
        meta.ino(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheKey {
    revision: u32,
    hostname: String,
    qemu: String,
    kernel_release: String,
    kvm: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: CacheKey,
    probed_at_unix: u64,
    verdict: AccelVerdict,
}

const CACHE_FILE: &str = "accel.json";

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_cache(dir: &Path, key: &CacheKey, ttl: Duration) -> Option<AccelVerdict> {
    let text = std::fs::read(dir.join(CACHE_FILE)).ok()?;
    let entry: CacheEntry = serde_json::from_slice(&text).ok()?;
    let age = now_unix().saturating_sub(entry.probed_at_unix);
    if entry.key != *key || age > ttl.as_secs() {
        tracing::debug!(
            age,
            "accelerator cache entry stale or for another host state"
        );
        return None;
    }
    let mut verdict = entry.verdict;
    verdict.from_cache = true;
    Some(verdict)
}

fn write_cache(dir: &Path, key: CacheKey, verdict: &AccelVerdict) -> Result<(), ProbeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ProbeError::io(format!("creating {}", dir.display()), e))?;
    let entry = CacheEntry {
        key,
        probed_at_unix: now_unix(),
        verdict: verdict.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&entry)
        .map_err(|e| ProbeError::io("encoding the accelerator cache", e.into()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| ProbeError::io(format!("writing the cache in {}", dir.display()), e))?;
    tmp.write_all(&bytes)
        .map_err(|e| ProbeError::io("writing the accelerator cache", e))?;
    tmp.persist(dir.join(CACHE_FILE))
        .map_err(|e| ProbeError::io("renaming the accelerator cache", e.error))?;
    Ok(())
}

/// Decides the accelerator: forced TCG, missing or inaccessible `/dev/kvm`, missing
/// QEMU → TCG at once; otherwise the cached verdict when its key matches, else a canary
/// boot under KVM (cached afterwards).
pub async fn probe_accelerator(p: &AccelProbe) -> AccelVerdict {
    if p.force_tcg {
        return AccelVerdict::tcg("SBX_FORCE_TCG=1 → TCG");
    }
    let dev = p.dev_kvm.display();
    let meta = match std::fs::metadata(&p.dev_kvm) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return AccelVerdict::tcg(format!("{dev} missing → TCG"));
        }
        Err(e) => return AccelVerdict::tcg(format!("{dev} not accessible ({e}) → TCG")),
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.dev_kvm)
    {
        let why = match e.raw_os_error() {
            Some(libc::EACCES) => "EACCES".to_owned(),
            Some(libc::EPERM) => "EPERM".to_owned(),
            _ => e.to_string(),
        };
        return AccelVerdict::tcg(format!("{dev} not accessible ({why}) → TCG"));
    }
    let Some((qemu, qemu_version)) = &p.qemu else {
        return AccelVerdict::tcg(format!("{dev} present but QEMU not found → TCG"));
    };
    let key = CacheKey {
        revision: CANARY_REVISION,
        hostname: p.hostname.clone(),
        qemu: format!("{}|{qemu_version}", qemu.display()),
        kernel_release: p.kernel_release.clone(),
        kvm: kvm_identity(&meta),
    };
    if let Some(dir) = &p.cache_dir
        && let Some(v) = read_cache(dir, &key, p.cache_ttl)
    {
        tracing::debug!(accelerator = %v.accelerator, reason = %v.reason, "accelerator verdict from cache");
        return v;
    }
    let secs = p.timeout.as_secs_f64();
    let verdict = match run_canary(qemu, Accelerator::Kvm, p.timeout).await {
        Ok(CanaryOutcome::Passed(took)) => AccelVerdict {
            accelerator: Accelerator::Kvm,
            reason: format!(
                "{dev} present and a canary guest ran in {} ms → KVM",
                took.as_millis()
            ),
            canary_ms: Some(duration_ms(took)),
            from_cache: false,
        },
        Ok(CanaryOutcome::TimedOut(took)) => AccelVerdict {
            canary_ms: Some(duration_ms(took)),
            ..AccelVerdict::tcg(format!(
                "{dev} present, canary guest did not finish in {secs}s \
                 (KVM present but cannot run a guest) → TCG"
            ))
        },
        Ok(CanaryOutcome::Failed { status, stderr }) => AccelVerdict::tcg(format!(
            "{dev} present, canary guest failed under KVM ({status}: {stderr}) → TCG"
        )),
        Err(e) => {
            // Not a fact about KVM (e.g. no temp dir): do not cache it.
            return AccelVerdict::tcg(format!("{dev} present, canary could not run ({e}) → TCG"));
        }
    };
    tracing::info!(accelerator = %verdict.accelerator, reason = %verdict.reason, "accelerator probed");
    if let Some(dir) = &p.cache_dir
        && let Err(e) = write_cache(dir, key, &verdict)
    {
        tracing::warn!(%e, "cannot cache the accelerator verdict");
    }
    verdict
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(dir: &Path) -> AccelProbe {
        AccelProbe {
            dev_kvm: dir.join("kvm"),
            qemu: None,
            cache_dir: Some(dir.join("cache")),
            force_tcg: false,
            timeout: Duration::from_secs(3),
            cache_ttl: DEFAULT_CACHE_TTL,
            hostname: "h".into(),
            kernel_release: "k".into(),
        }
    }

    #[test]
    fn firmware_layout() {
        let fw = canary_firmware();
        assert_eq!(fw.len(), 65536);
        assert_eq!(&fw[0xFFF0..0xFFF2], &[0xEB, 0xAE]);
        // The short jump lands on the code.
        let target = 0xFFF2i64 + i64::from(0xAEu8 as i8);
        assert_eq!(target, 0xFFA0);
        assert_eq!(&fw[0xFFA0..0xFFA2], &[0x66, 0xB9]);
        assert_eq!(&fw[0xFFA2..0xFFA6], &CANARY_ITERATIONS.to_le_bytes());
    }

    #[tokio::test]
    async fn forced_missing_and_inaccessible() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = probe(tmp.path());
        p.force_tcg = true;
        let v = probe_accelerator(&p).await;
        assert_eq!(v.accelerator, Accelerator::Tcg);
        assert!(v.reason.contains("SBX_FORCE_TCG"));

        p.force_tcg = false;
        let v = probe_accelerator(&p).await;
        assert_eq!(v.accelerator, Accelerator::Tcg);
        assert!(v.reason.ends_with("missing → TCG"), "{}", v.reason);

        // A directory cannot be opened read-write: not accessible.
        std::fs::create_dir(tmp.path().join("kvm")).unwrap();
        let v = probe_accelerator(&p).await;
        assert!(v.reason.contains("not accessible"), "{}", v.reason);

        // A regular file opens but there is no QEMU.
        std::fs::remove_dir(tmp.path().join("kvm")).unwrap();
        std::fs::write(tmp.path().join("kvm"), b"").unwrap();
        let v = probe_accelerator(&p).await;
        assert!(v.reason.contains("QEMU not found"), "{}", v.reason);
    }

    #[tokio::test]
    async fn canary_failure_is_cached_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut p = probe(tmp.path());
        std::fs::write(tmp.path().join("kvm"), b"").unwrap();
        let counter = tmp.path().join("runs");
        let fake = tmp.path().join("qemu");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho run >> {}\necho 'kvm: bad thing' >&2\nexit 1\n",
                counter.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.qemu = Some((fake.clone(), "QEMU emulator version 10.0.2".into()));

        let v = probe_accelerator(&p).await;
        assert_eq!(v.accelerator, Accelerator::Tcg);
        assert!(!v.from_cache);
        assert!(v.reason.contains("kvm: bad thing"), "{}", v.reason);
        let v2 = probe_accelerator(&p).await;
        assert!(v2.from_cache);
        assert_eq!(v2.reason, v.reason);
        assert_eq!(
            std::fs::read_to_string(&counter).unwrap().lines().count(),
            1
        );

        // A different kernel release is a different key: probed again.
        p.kernel_release = "other".into();
        let v3 = probe_accelerator(&p).await;
        assert!(!v3.from_cache);
        assert_eq!(
            std::fs::read_to_string(&counter).unwrap().lines().count(),
            2
        );

        // An expired entry is probed again.
        p.cache_ttl = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(1100));
        let v4 = probe_accelerator(&p).await;
        assert!(!v4.from_cache);
        assert_eq!(
            std::fs::read_to_string(&counter).unwrap().lines().count(),
            3
        );

        // A corrupt cache file is ignored.
        std::fs::write(tmp.path().join("cache").join(CACHE_FILE), b"{not json").unwrap();
        p.cache_ttl = DEFAULT_CACHE_TTL;
        let v5 = probe_accelerator(&p).await;
        assert!(!v5.from_cache);
    }

    #[tokio::test]
    async fn hanging_canary_times_out_to_tcg() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut p = probe(tmp.path());
        std::fs::write(tmp.path().join("kvm"), b"").unwrap();
        let fake = tmp.path().join("qemu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.qemu = Some((fake, "QEMU emulator version 10.0.2".into()));
        p.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let v = probe_accelerator(&p).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(v.accelerator, Accelerator::Tcg);
        assert!(v.reason.contains("did not finish in 0.3s"), "{}", v.reason);
        assert!(v.reason.contains("KVM present but cannot run a guest"));
    }
}
