//! The x86_64 microvm command line, built from a [`VmSpec`] without any I/O.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use sandbox_core::ports::{Accelerator, MemoryBacking, NetworkAttachment, VmSpec};

/// Name of the virtio-serial port the guest agent opens (the contract with the guest,
/// defined in [`guest_proto::contract`]).
pub use guest_proto::contract::AGENT_PORT_NAME;

/// The `-sandbox` argument used when QEMU supports seccomp.
pub const SANDBOX_ARG: &str = probes::qemu::SANDBOX_ARG;

/// The guest CPU under TCG: every feature TCG emulates except the "fast string"
/// flags. With ERMS/FSRM advertised, the guest kernel copies and clears pages with
/// `rep movsb`/`rep stosb` and glibc's memcpy uses `rep movsb` from 4 KiB up; TCG
/// emulates those one byte per iteration, about 7× slower than the vector or `movsq`
/// loops chosen without the flags (64 KiB memcpy in the guest: 0.58 vs 4.0 GB/s here;
/// 100 MiB file write into a session: 31 vs 58 MiB/s).
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// Id of the guest RAM's memory backend when it is a file. Saved and restored VMs must
/// use the same id ("Unknown ramblock" otherwise).
pub const RAM_BACKEND_ID: &str = "sbx.ram";

/// Default TCG translation-block cache, in MiB (QEMU's default is 1 GiB on 64-bit hosts).
pub const DEFAULT_TB_SIZE_MB: u32 = 128;

/// What the QEMU build and the host support, as plain data (see
/// [`QemuFeatures::from_report`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuFeatures {
    /// `-sandbox on,...` is supported.
    pub sandbox: bool,
    /// Disks may use `aio=io_uring` (QEMU and host).
    pub io_uring: bool,
    /// `-run-with exit-with-parent=on` is supported.
    pub exit_with_parent: bool,
    /// qboot firmware for direct PVH boot without option ROMs.
    pub qboot_rom: Option<PathBuf>,
    /// The host CPU has a TSC-deadline timer (PIT/PIC/RTC can go under KVM).
    pub tsc_deadline: bool,
    /// The host's constant TSC rate in kHz: a TCG guest reads that TSC and is told its
    /// rate (`tsc_early_khz=`), having no way to calibrate it on a microvm.
    pub tsc_khz: Option<u64>,
    /// The first line of `qemu-system-x86_64 --version` (empty when unknown).
    pub version_line: String,
}

impl QemuFeatures {
    /// The features a [`probes::HostReport`] found (all off when QEMU is missing).
    pub fn from_report(report: &probes::HostReport) -> Self {
        match &report.qemu {
            Ok(q) => Self {
                version_line: q.version_line.clone(),
                sandbox: q.sandbox,
                io_uring: report.io_uring.usable,
                exit_with_parent: q.exit_with_parent,
                qboot_rom: q.qboot_rom.clone(),
                tsc_deadline: report.tsc_deadline,
                tsc_khz: report.tsc_khz,
            },
            Err(_) => Self {
                tsc_deadline: report.tsc_deadline,
                tsc_khz: report.tsc_khz,
                ..Self::default()
            },
        }
    }
}

/// Tunables of the command line beyond the [`VmSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOptions {
    /// Add a virtio balloon (deflate on OOM, free page reporting).
    pub balloon: bool,
    /// Preallocate guest memory at start (slower start, no faults later).
    pub preallocate_memory: bool,
    /// TCG translation-block cache size in MiB.
    pub tcg_tb_size_mb: u32,
    /// Extra kernel command-line arguments, appended.
    pub extra_kernel_args: Vec<String>,
    /// Start with the vCPUs paused (`-S`); resume with QMP `cont`.
    pub start_paused: bool,
    /// Where the console goes: QEMU's stdout (drained by the process layer) by default.
    pub console: ConsoleTarget,
}

impl Default for CommandOptions {
    fn default() -> Self {
        Self {
            balloon: false,
            preallocate_memory: false,
            tcg_tb_size_mb: DEFAULT_TB_SIZE_MB,
            extra_kernel_args: Vec::new(),
            start_paused: false,
            console: ConsoleTarget::Stdout,
        }
    }
}

/// Where QEMU writes the guest console (`hvc0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// QEMU's stdout, which the process layer drains into a bounded log.
    Stdout,
    /// A file QEMU appends to (unbounded: for debugging only).
    File(PathBuf),
}

/// Builds the argv (without the program) of a microvm QEMU.
#[derive(Debug, Clone)]
pub struct QemuCommandBuilder<'a> {
    spec: &'a VmSpec,
    features: &'a QemuFeatures,
    options: CommandOptions,
}

/// Appends `path` to `out`, doubling commas as QEMU's option syntax requires.
fn push_escaped(out: &mut OsString, path: &OsStr) {
    let mut bytes = Vec::with_capacity(path.len());
    for &b in path.as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    out.push(OsString::from_vec(bytes));
}

/// `prefix` followed by the escaped `path` and `suffix`.
fn opt_with_path(prefix: &str, path: &std::path::Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    push_escaped(&mut s, path.as_os_str());
    s.push(suffix);
    s
}

impl<'a> QemuCommandBuilder<'a> {
    /// A builder for `spec` on a QEMU with `features`, default options.
    pub fn new(spec: &'a VmSpec, features: &'a QemuFeatures) -> Self {
        Self {
            spec,
            features,
            options: CommandOptions::default(),
        }
    }

    /// Replaces the options.
    #[must_use]
    pub fn options(mut self, options: CommandOptions) -> Self {
        self.options = options;
        self
    }

    /// True when PIT, PIC and RTC can be left out: KVM with a TSC-deadline timer. Under
    /// TCG the kernel calibrates the TSC against the PIT and hangs without it.
    pub fn legacy_timers_off(&self) -> bool {
        self.spec.accelerator == Accelerator::Kvm && self.features.tsc_deadline
    }

    /// The `-M` value.
    pub fn machine(&self) -> String {
        let mut m = String::from("microvm");
        if self.features.qboot_rom.is_some() {
            // Debian's default microvm firmware (SeaBIOS) needs option ROMs for -kernel.
            m.push_str(",x-option-roms=off");
        }
        m.push_str(",isa-serial=off");
        if self.legacy_timers_off() {
            m.push_str(",pit=off,pic=off,rtc=off");
        } else {
            m.push_str(",pit=on,pic=on,rtc=on");
        }
        m.push_str(",acpi=off,mem-merge=off,dump-guest-core=off");
        if !matches!(self.spec.memory, MemoryBacking::Anonymous) {
            m.push_str(",memory-backend=");
            m.push_str(RAM_BACKEND_ID);
        } else if self.options.preallocate_memory {
            m.push_str(",memory-backend=mem0");
        }
        m
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let spec = self.spec;
        let mut args: Vec<String> = [
            "console=hvc0",
            "reboot=t",
            "panic=-1",
            "rdinit=/init",
            "tsc=reliable",
            "no_timer_check",
            "i8042.noaux",
            "i8042.nomux",
            "i8042.nopnp",
            "i8042.dumbkbd",
            "8250.nr_uarts=0",
            "nowatchdog",
            "mitigations=off",
            "random.trust_cpu=on",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(format!("nr_cpus={}", spec.vcpus.max(1)));
        if spec.accelerator == Accelerator::Tcg {
            // Skip the delay-loop calibration, slow under emulation.
            args.push("lpj=1000000".into());
            // The guest's TSC is the host's: without its rate the kernel falls back to
            // jiffies for every clock and timer.
            if let Some(khz) = self.features.tsc_khz {
                args.push(format!("tsc_early_khz={khz}"));
            }
        }
        if spec.console.verbose {
            // Unknown KEY=VALUE arguments reach init's environment: the agent logs at
            // info level (setup phases, network).
            args.extend(
                ["loglevel=7", "printk.devkmsg=on", "SBX_AGENT_LOG=info"].map(String::from),
            );
        } else {
            args.extend(["quiet", "loglevel=0", "printk.devkmsg=off"].map(String::from));
        }
        args.extend(self.options.extra_kernel_args.iter().cloned());
        args.extend(self.spec.kernel_args.iter().cloned());
        args.join(" ")
    }

    /// The argv, without the program name.
    pub fn build(&self) -> Vec<OsString> {
        let spec = self.spec;
        let f = self.features;
        let mut a: Vec<OsString> = Vec::with_capacity(64);
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));

        push(&["-name", &format!("guest=sbx-{}", spec.vm_id)]);
        push(&["-M", &self.machine()]);
        match spec.accelerator {
            Accelerator::Kvm => {
                push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities,-vmx,-svm"])
            }
            Accelerator::Tcg => push(&[
                "-accel",
                &format!("tcg,thread=single,tb-size={}", self.options.tcg_tb_size_mb),
                "-cpu",
                TCG_CPU,
            ]),
        }
        let vcpus = spec.vcpus.max(1);
        push(&["-m", &format!("{}M", spec.memory_mb)]);
        push(&["-smp", &format!("{vcpus},maxcpus={vcpus}")]);
        match &spec.memory {
            MemoryBacking::Anonymous if self.options.preallocate_memory => push(&[
                "-object",
                &format!(
                    "memory-backend-ram,id=mem0,size={}M,prealloc=on",
                    spec.memory_mb
                ),
            ]),
            MemoryBacking::Anonymous => {}
            // Saveable: the RAM lives in a file the host keeps after QEMU exits.
            MemoryBacking::SharedFile { path } => {
                a.push("-object".into());
                a.push(opt_with_path(
                    &format!(
                        "memory-backend-file,id={RAM_BACKEND_ID},size={}M,mem-path=",
                        spec.memory_mb
                    ),
                    path,
                    ",share=on",
                ));
            }
            // A clone: private copy-on-write mapping of a read-only file; QEMU never
            // writes it (and never discards pages in it), and waits for the device state.
            MemoryBacking::Restore { ram, .. } => {
                a.push("-object".into());
                a.push(opt_with_path(
                    &format!(
                        "memory-backend-file,id={RAM_BACKEND_ID},size={}M,mem-path=",
                        spec.memory_mb
                    ),
                    ram,
                    ",share=off,readonly=on,rom=off",
                ));
                a.extend(["-incoming", "defer"].map(OsString::from));
            }
        }
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "none",
        ]);
        if f.sandbox {
            push(&["-sandbox", SANDBOX_ARG]);
        }
        if f.exit_with_parent {
            push(&["-run-with", "exit-with-parent=on"]);
        }
        if self.options.start_paused {
            push(&["-S"]);
        }
        if let Some(rom) = &f.qboot_rom {
            a.push("-bios".into());
            a.push(rom.clone().into_os_string());
        }
        a.push("-kernel".into());
        a.push(spec.kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(spec.initramfs.clone().into_os_string());
        a.push("-append".into());
        a.push(self.kernel_cmdline().into());

        // Root disk: the overlay.
        let aio = if f.io_uring { "io_uring" } else { "threads" };
        a.push("-drive".into());
        a.push(opt_with_path(
            "file=",
            &spec.disk,
            &format!(
                ",format=qcow2,if=none,id=root,cache=unsafe,aio={aio},discard=unmap,\
                 detect-zeroes=unmap,werror=report,rerror=report"
            ),
        ));
        a.extend(["-device", "virtio-blk-device,drive=root"].map(OsString::from));
        // Home disk (after the root, which stays /dev/vda); the guest finds it by serial.
        if spec.home_disk_mb.is_some() {
            a.push("-drive".into());
            a.push(opt_with_path(
                "file=",
                &crate::home_disk::path(&spec.work_dir),
                &format!(
                    ",format=raw,if=none,id=home,cache=unsafe,aio={aio},discard=unmap,\
                     detect-zeroes=unmap,werror=report,rerror=report"
                ),
            ));
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-blk-device,drive=home,serial={}",
                    guest_proto::HOME_DISK_SERIAL
                )
                .into(),
            );
        }

        // Package layer: read-only EROFS image; the guest finds it by serial and mounts it
        // read-only. QEMU itself opens it read-only too.
        if let Some(layer) = &spec.package_layer {
            a.push("-drive".into());
            a.push(opt_with_path(
                "file=",
                layer,
                &format!(",format=raw,if=none,id=pkgs,readonly=on,aio={aio}"),
            ));
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-blk-device,drive=pkgs,serial={}",
                    guest_proto::PACKAGE_DISK_SERIAL
                )
                .into(),
            );
        }

        // virtio-serial: console on port 0 (hvc0), the agent on port 1.
        a.extend(["-device", "virtio-serial-device,max_ports=2"].map(OsString::from));
        a.push("-chardev".into());
        a.push(match &self.options.console {
            ConsoleTarget::Stdout => OsString::from("stdio,id=con0,signal=off"),
            ConsoleTarget::File(path) => opt_with_path("file,id=con0,path=", path, ""),
        });
        a.extend(["-device", "virtconsole,chardev=con0,nr=0"].map(OsString::from));
        a.push("-chardev".into());
        a.push(opt_with_path(
            "socket,id=agent,path=",
            &spec.agent_socket,
            ",server=on,wait=off",
        ));
        a.push("-device".into());
        a.push(format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME},nr=1").into());

        a.extend(
            [
                "-object",
                "rng-random,filename=/dev/urandom,id=rng0",
                "-device",
                "virtio-rng-device,rng=rng0",
            ]
            .map(OsString::from),
        );
        if self.options.balloon {
            a.extend(
                [
                    "-device",
                    "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on",
                ]
                .map(OsString::from),
            );
        }
        match &spec.network {
            None => a.extend(["-nic", "none"].map(OsString::from)),
            Some(NetworkAttachment::UnixStream { socket }) => {
                a.push("-netdev".into());
                a.push(opt_with_path(
                    "stream,id=net0,server=off,addr.type=unix,addr.path=",
                    socket,
                    "",
                ));
                a.extend(["-device", "virtio-net-device,netdev=net0"].map(OsString::from));
            }
        }
        // QMP on a unix socket (chardev form, so the path can be escaped).
        a.push("-chardev".into());
        a.push(opt_with_path(
            "socket,id=qmp,path=",
            &spec.qmp_socket,
            ",server=on,wait=off",
        ));
        a.extend(["-mon", "chardev=qmp,mode=control"].map(OsString::from));
        a
    }
}

/// Renders an argv as one shell-like line (for logs and golden files).
pub fn render_argv(program: &OsStr, args: &[OsString]) -> String {
    fn quote(s: &OsStr) -> String {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=,./:+@".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    }
    std::iter::once(program)
        .chain(args.iter().map(OsString::as_os_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sandbox_core::ports::ConsoleSpec;

    pub(crate) fn spec(accel: Accelerator) -> VmSpec {
        VmSpec {
            vm_id: serde_json::from_str("\"00000000000040008000000000000001\"").unwrap(),
            work_dir: "/w".into(),
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/initramfs.cpio.gz".into(),
            disk: "/w/over,lay.qcow2".into(),
            memory_mb: 192,
            memory: Default::default(),
            home_disk_mb: None,
            package_layer: None,
            vcpus: 1,
            accelerator: accel,
            agent_socket: "/w/agent.sock".into(),
            qmp_socket: "/w/qmp.sock".into(),
            network: None,
            console: ConsoleSpec {
                log_path: "/w/console.log".into(),
                max_bytes: 65536,
                lines: None,
                verbose: false,
            },
            kernel_args: Vec::new(),
        }
    }

    fn features() -> QemuFeatures {
        QemuFeatures {
            sandbox: true,
            io_uring: true,
            exit_with_parent: false,
            qboot_rom: Some("/usr/share/qemu/qboot.rom".into()),
            tsc_deadline: true,
            tsc_khz: Some(2_600_000),
            version_line: "QEMU emulator version 10.0.2".into(),
        }
    }

    fn has_pair(argv: &[OsString], flag: &str, value: &str) -> bool {
        argv.windows(2)
            .any(|w| w[0] == OsStr::new(flag) && w[1] == OsStr::new(value))
    }

    #[test]
    fn tcg_keeps_the_pit_and_kvm_drops_legacy_timers() {
        let f = features();
        let s = spec(Accelerator::Tcg);
        let b = QemuCommandBuilder::new(&s, &f);
        assert!(b.machine().contains("pit=on,pic=on"));
        assert!(!b.legacy_timers_off());
        let s = spec(Accelerator::Kvm);
        let b = QemuCommandBuilder::new(&s, &f);
        assert!(b.machine().contains("pit=off,pic=off,rtc=off"));
        let f2 = QemuFeatures {
            tsc_deadline: false,
            ..f
        };
        let b = QemuCommandBuilder::new(&s, &f2);
        assert!(b.machine().contains("pit=on"));
    }

    #[test]
    fn a_package_layer_is_a_read_only_virtio_blk_with_its_serial() {
        let f = features();
        let mut s = spec(Accelerator::Tcg);
        let argv = QemuCommandBuilder::new(&s, &f).build();
        assert!(!argv.iter().any(|a| a.to_string_lossy().contains("id=pkgs")));
        s.package_layer = Some("/c/pk,gs/layer.erofs".into());
        let argv = QemuCommandBuilder::new(&s, &f).build();
        let drive = argv
            .iter()
            .find(|a| a.to_string_lossy().contains("id=pkgs"))
            .expect("package drive")
            .to_string_lossy()
            .into_owned();
        assert!(
            drive.starts_with("file=/c/pk,,gs/layer.erofs,format=raw,"),
            "{drive}"
        );
        assert!(drive.contains(",readonly=on"), "{drive}");
        assert!(has_pair(
            &argv,
            "-device",
            "virtio-blk-device,drive=pkgs,serial=sbx-pkgs"
        ));
    }

    #[test]
    fn a_home_disk_is_a_second_virtio_blk_with_its_serial() {
        let f = features();
        let mut s = spec(Accelerator::Tcg);
        let argv = QemuCommandBuilder::new(&s, &f).build();
        assert!(!argv.iter().any(|a| a.to_string_lossy().contains("id=home")));
        s.home_disk_mb = Some(600);
        let argv = QemuCommandBuilder::new(&s, &f).build();
        let home = crate::home_disk::path(&s.work_dir);
        let drive = argv
            .iter()
            .position(|a| a.to_string_lossy().contains("id=home"))
            .expect("home drive");
        let text = argv[drive].to_string_lossy();
        assert!(
            text.starts_with(&format!("file={},format=raw", home.display())),
            "{text}"
        );
        assert!(has_pair(
            &argv,
            "-device",
            "virtio-blk-device,drive=home,serial=sbx-home"
        ));
        // The root device comes first: it stays /dev/vda.
        let root = argv
            .iter()
            .position(|a| a == OsStr::new("virtio-blk-device,drive=root"))
            .unwrap();
        assert!(root < drive);
    }

    #[test]
    fn tcg_guests_are_told_the_host_tsc_rate() {
        let f = features();
        let line = QemuCommandBuilder::new(&spec(Accelerator::Tcg), &f).kernel_cmdline();
        assert!(line.contains(" tsc_early_khz=2600000"), "{line}");
        let line = QemuCommandBuilder::new(&spec(Accelerator::Kvm), &f).kernel_cmdline();
        assert!(!line.contains("tsc_early_khz"), "{line}");
        let unknown = QemuFeatures {
            tsc_khz: None,
            ..features()
        };
        let line = QemuCommandBuilder::new(&spec(Accelerator::Tcg), &unknown).kernel_cmdline();
        assert!(!line.contains("tsc_early_khz"), "{line}");
    }

    #[test]
    fn tcg_guest_cpu_drops_only_the_fast_string_flags() {
        let f = features();
        let argv = QemuCommandBuilder::new(&spec(Accelerator::Tcg), &f).build();
        assert!(has_pair(&argv, "-cpu", "max,-erms,-fsrm"));
        let argv = QemuCommandBuilder::new(&spec(Accelerator::Kvm), &f).build();
        assert!(has_pair(&argv, "-cpu", "host,-arch-capabilities,-vmx,-svm"));
    }

    #[test]
    fn contract_and_escaping() {
        let f = features();
        let s = spec(Accelerator::Tcg);
        let argv = QemuCommandBuilder::new(&s, &f).build();
        assert!(has_pair(
            &argv,
            "-device",
            "virtserialport,chardev=agent,name=org.sbx.agent,nr=1"
        ));
        assert!(argv.iter().any(|a| {
            a.to_string_lossy()
                .starts_with("file=/w/over,,lay.qcow2,format=qcow2")
        }));
        assert!(has_pair(&argv, "-nic", "none"));
        assert!(has_pair(&argv, "-sandbox", SANDBOX_ARG));
        assert!(!argv.iter().any(|a| a == "-run-with"));
    }

    #[test]
    fn without_qboot_option_roms_stay_on_and_no_bios() {
        let f = QemuFeatures {
            qboot_rom: None,
            sandbox: false,
            io_uring: false,
            ..features()
        };
        let s = spec(Accelerator::Tcg);
        let b = QemuCommandBuilder::new(&s, &f);
        assert!(!b.machine().contains("x-option-roms"));
        let argv = b.build();
        assert!(!argv.iter().any(|a| a == "-bios" || a == "-sandbox"));
        assert!(
            argv.iter()
                .any(|a| a.to_string_lossy().contains("aio=threads"))
        );
    }

    #[test]
    fn options_add_devices() {
        let f = QemuFeatures {
            exit_with_parent: true,
            ..features()
        };
        let mut s = spec(Accelerator::Kvm);
        s.vcpus = 2;
        let argv = QemuCommandBuilder::new(&s, &f)
            .options(CommandOptions {
                balloon: true,
                preallocate_memory: true,
                start_paused: true,
                extra_kernel_args: vec!["init.debug=1".into()],
                console: ConsoleTarget::File("/w/c,on.log".into()),
                ..CommandOptions::default()
            })
            .build();
        let line = render_argv(OsStr::new("qemu"), &argv);
        assert!(line.contains("memory-backend=mem0"), "{line}");
        assert!(line.contains("memory-backend-ram,id=mem0,size=192M,prealloc=on"));
        assert!(line.contains("virtio-balloon-device"));
        assert!(line.contains(" -S "));
        assert!(line.contains("-run-with exit-with-parent=on"));
        assert!(line.contains("file,id=con0,path=/w/c,,on.log"));
        assert!(line.contains("nr_cpus=2"));
        assert!(line.contains("init.debug=1'"), "{line}");
        assert!(line.contains("-smp 2,maxcpus=2"));
    }

    #[test]
    fn render_quotes_what_needs_it() {
        let line = render_argv(
            OsStr::new("q"),
            &["a b".into(), "it's".into(), "x=y,z".into()],
        );
        assert_eq!(line, r"q 'a b' 'it'\''s' x=y,z");
    }
}
