//! Packages a request asks for: strict specification parsing, the operator's allowlist, and
//! the [`PackageLayers`] port that turns a set of pinned packages into a read-only layer
//! image attached to the VM.
//!
//! Specifications are exact pins and nothing else:
//!
//! - Python: `name==version` or `name[extra,...]==version`; `name` is a PEP 508 name
//!   (letters, digits, `.`, `_`, `-`, starting and ending with a letter or digit),
//!   compared in its PEP 503 normalized form (lowercase, runs of `-_.` as one `-`);
//!   `version` starts with a digit and holds only `[A-Za-z0-9.!+_-]` (no `*`, no ranges).
//! - JavaScript: `name@version` or `@scope/name@version`; names are npm names (lowercase
//!   letters, digits, `-._~`, starting with a letter or digit, at most 214 characters with
//!   the scope); `version` is an exact semver `MAJOR.MINOR.PATCH[-pre][+build]`.
//!
//! Everything else (ranges, tags, URLs, paths, VCS references, options such as
//! `--index-url`, whitespace and shell metacharacters) is an input error naming the spec,
//! and so is the same package asked for twice with different versions. At most
//! [`MAX_PACKAGES`] per request. All of it is checked before any VM work.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Language;
use crate::error::{Error, Result};

/// Most package specifications per request.
pub const MAX_PACKAGES: usize = 50;
/// Longest package specification, in bytes.
pub const MAX_SPEC_LEN: usize = 256;
/// Longest npm name (with its scope), as npm itself limits it.
const MAX_NPM_NAME_LEN: usize = 214;

/// One validated, normalized package pin.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PackageSpec {
    /// Normalized name: PEP 503 for Python, the npm name (with `@scope/`) for JavaScript.
    pub name: String,
    /// Sorted, normalized extras (Python only).
    pub extras: Vec<String>,
    /// The exact version.
    pub version: String,
}

impl PackageSpec {
    /// The spec as the host's package client takes it (`name[extras]==version`,
    /// `name@version`).
    pub fn to_client_arg(&self, language: Language) -> String {
        match language {
            Language::Javascript => format!("{}@{}", self.name, self.version),
            _ if self.extras.is_empty() => format!("{}=={}", self.name, self.version),
            _ => format!("{}[{}]=={}", self.name, self.extras.join(","), self.version),
        }
    }
}

fn is_pep508_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// PEP 503 normalization: lowercase, every run of `-`, `_`, `.` becomes one `-`.
pub fn normalize_python_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn is_pep440_pin(v: &str) -> bool {
    v.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && v.len() <= 64
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'!' | b'+' | b'_' | b'-'))
        && !v.ends_with(['.', '-', '+', '_'])
}

fn is_npm_part(s: &str) -> bool {
    s.as_bytes()
        .first()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_' | b'~')
        })
}

fn is_semver_number(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|c| c.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.len() <= 16
}

fn is_semver_ident_list(s: &str) -> bool {
    s.split('.').all(|id| {
        !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
    })
}

/// An exact semver version: `MAJOR.MINOR.PATCH[-pre][+build]`.
fn is_exact_semver(v: &str) -> bool {
    let (rest, build) = match v.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (v, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let nums: Vec<&str> = core.split('.').collect();
    nums.len() == 3
        && nums.iter().all(|n| is_semver_number(n))
        && pre.is_none_or(is_semver_ident_list)
        && build.is_none_or(is_semver_ident_list)
}

fn parse_python(spec: &str) -> std::result::Result<PackageSpec, &'static str> {
    let Some((name_part, version)) = spec.split_once("==") else {
        return Err("needs an exact pin: name==version (ranges and bare names are refused)");
    };
    if version.starts_with('=') {
        return Err("'===' is not accepted; use name==version");
    }
    let (name, extras) = match name_part.split_once('[') {
        Some((name, rest)) => {
            let Some(list) = rest.strip_suffix(']') else {
                return Err("malformed extras: want name[extra,...]==version");
            };
            let mut extras = BTreeSet::new();
            for e in list.split(',') {
                if !is_pep508_name(e) {
                    return Err("malformed extras: want name[extra,...]==version");
                }
                extras.insert(normalize_python_name(e));
            }
            (name, extras.into_iter().collect())
        }
        None => (name_part, Vec::new()),
    };
    if !is_pep508_name(name) {
        return Err(
            "invalid name: letters, digits, '.', '_', '-', starting and ending with a letter or digit",
        );
    }
    if !is_pep440_pin(version) {
        return Err(
            "invalid version: an exact version starting with a digit (no '*', ranges, URLs or options)",
        );
    }
    Ok(PackageSpec {
        name: normalize_python_name(name),
        extras,
        version: version.to_owned(),
    })
}

fn parse_npm(spec: &str) -> std::result::Result<PackageSpec, &'static str> {
    let (scope, rest) = match spec.strip_prefix('@') {
        Some(rest) => match rest.split_once('/') {
            Some((scope, rest)) => (Some(scope), rest),
            None => return Err("invalid scope: want @scope/name@version"),
        },
        None => (None, spec),
    };
    let Some((name, version)) = rest.split_once('@') else {
        return Err("needs an exact version: name@1.2.3 (ranges, tags and bare names are refused)");
    };
    if scope.is_some_and(|s| !is_npm_part(s)) {
        return Err("invalid scope: lowercase letters, digits, '-', '.', '_', '~'");
    }
    if !is_npm_part(name) {
        return Err(
            "invalid name: lowercase letters, digits, '-', '.', '_', '~', starting with a letter or digit",
        );
    }
    let full = match scope {
        Some(s) => format!("@{s}/{name}"),
        None => name.to_owned(),
    };
    if full.len() > MAX_NPM_NAME_LEN {
        return Err("name longer than 214 characters");
    }
    if !is_exact_semver(version) {
        return Err(
            "invalid version: an exact semver MAJOR.MINOR.PATCH (no ranges, tags, URLs or paths)",
        );
    }
    Ok(PackageSpec {
        name: full,
        extras: Vec::new(),
        version: version.to_owned(),
    })
}

fn shown(spec: &str) -> String {
    let s: String = spec.chars().take(80).collect();
    format!("{s:?}")
}

/// Parses one specification for `language`; `field` names it in the error.
pub fn parse_spec(language: Language, field: &str, spec: &str) -> Result<PackageSpec> {
    let bad = |why: &str| Error::input(field, format!("package {}: {why}", shown(spec)));
    if spec.is_empty() || spec.len() > MAX_SPEC_LEN {
        return Err(bad(&format!("must be 1 to {MAX_SPEC_LEN} bytes")));
    }
    match language {
        Language::Python => parse_python(spec).map_err(bad),
        Language::Javascript => parse_npm(spec).map_err(bad),
        Language::Raw => Err(bad("raw code has no packages (use python or javascript)")),
    }
}

/// Parses and normalizes a request's specifications: at most [`MAX_PACKAGES`], each
/// strict; exact duplicates collapse, the same name with another version or other extras
/// is refused. The result is sorted by name.
pub fn parse_specs(language: Language, specs: &[String]) -> Result<Vec<PackageSpec>> {
    if specs.len() > MAX_PACKAGES {
        return Err(Error::input(
            "packages",
            format!(
                "{} packages requested, at most {MAX_PACKAGES} allowed",
                specs.len()
            ),
        ));
    }
    let mut by_name: BTreeMap<String, (PackageSpec, &str)> = BTreeMap::new();
    for (i, raw) in specs.iter().enumerate() {
        let field = format!("packages[{i}]");
        let spec = parse_spec(language, &field, raw)?;
        if let Some((prev, prev_raw)) = by_name.get(&spec.name) {
            if *prev != spec {
                return Err(Error::input(
                    field,
                    format!(
                        "package {} conflicts with {} (one version per package)",
                        shown(raw),
                        shown(prev_raw)
                    ),
                ));
            }
            continue;
        }
        by_name.insert(spec.name.clone(), (spec, raw));
    }
    Ok(by_name.into_values().map(|(s, _)| s).collect())
}

/// The operator's package allowlist: the names a request may ask for, per language.
///
/// File format: one name per line; `#` starts a comment; a line `[python]` or
/// `[javascript]` starts that language's section (names before any section are refused).
/// Python names are compared PEP 503-normalized. Only the names a request asks for are
/// checked, not their dependencies (those are pinned by the package's own metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageAllowlist {
    python: BTreeSet<String>,
    javascript: BTreeSet<String>,
}

impl PackageAllowlist {
    /// Parses the file format described on the type; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut list = Self::default();
        let mut section: Option<Language> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                Error::input(
                    "package_allowlist",
                    format!("{origin}:{}: {why}: {line:?}", n + 1),
                )
            };
            match line {
                "[python]" => section = Some(Language::Python),
                "[javascript]" => section = Some(Language::Javascript),
                _ => match section {
                    Some(Language::Python) if is_pep508_name(line) => {
                        list.python.insert(normalize_python_name(line));
                    }
                    Some(Language::Javascript) if parse_npm(&format!("{line}@0.0.0")).is_ok() => {
                        list.javascript.insert(line.to_owned());
                    }
                    None => return Err(bad("a name before any [python]/[javascript] section")),
                    _ => return Err(bad("not a valid package name")),
                },
            }
        }
        Ok(list)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::permanent(
                crate::error::PermanentCause::Config,
                format!("package allowlist {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Number of names for `language`.
    pub fn len(&self, language: Language) -> usize {
        match language {
            Language::Python => self.python.len(),
            Language::Javascript => self.javascript.len(),
            Language::Raw => 0,
        }
    }

    /// True when the list names no package at all.
    pub fn is_empty(&self) -> bool {
        self.python.is_empty() && self.javascript.is_empty()
    }

    /// True when `name` (normalized, as in [`PackageSpec::name`]) is allowed.
    pub fn allows(&self, language: Language, name: &str) -> bool {
        match language {
            Language::Python => self.python.contains(name),
            Language::Javascript => self.javascript.contains(name),
            Language::Raw => false,
        }
    }

    /// Refuses the first spec that is not on the list, as an input error naming it.
    pub fn check(&self, language: Language, specs: &[PackageSpec]) -> Result<()> {
        match specs.iter().find(|s| !self.allows(language, &s.name)) {
            Some(s) => Err(Error::input(
                "packages",
                format!(
                    "package {:?} is not on the operator's package allowlist",
                    s.to_client_arg(language)
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A built, verified package layer, ready to attach to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageLayer {
    /// Read-only EROFS image (attached as a raw read-only disk).
    pub image: PathBuf,
    /// SHA-256 of the image (lowercase hex), part of the VM's identity.
    pub digest: String,
    /// The layer's key (lowercase hex): what the layer was built from.
    pub key: String,
}

impl fmt::Display for PackageLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} ({})", self.key, self.image.display())
    }
}

/// Port: builds or finds the read-only layer that holds `specs` for `language`.
///
/// Implementations fetch with the host's own package clients (the guest never touches the
/// network for packages), verify what they fetched, publish layers atomically under a
/// content key, and build one key once when asked concurrently. A package that does not
/// exist or has no artifact for the guest is an input error naming it.
#[async_trait]
pub trait PackageLayers: Send + Sync {
    /// The layer for `specs` (normalized, sorted: from [`parse_specs`]; non-empty).
    async fn layer(&self, language: Language, specs: &[PackageSpec]) -> Result<PackageLayer>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn py(s: &str) -> Result<PackageSpec> {
        parse_spec(Language::Python, "p", s)
    }
    fn js(s: &str) -> Result<PackageSpec> {
        parse_spec(Language::Javascript, "p", s)
    }

    #[test]
    fn python_pins_are_normalized() {
        let s = py("NumPy==2.1.3").unwrap();
        assert_eq!((s.name.as_str(), s.version.as_str()), ("numpy", "2.1.3"));
        let s = py("Foo_Bar.baz[Socks,http]==1.0.0.post1").unwrap();
        assert_eq!(s.name, "foo-bar-baz");
        assert_eq!(s.extras, vec!["http", "socks"]);
        assert_eq!(
            s.to_client_arg(Language::Python),
            "foo-bar-baz[http,socks]==1.0.0.post1"
        );
        for ok in ["a==1", "torch==2.1.0+cpu", "x==1!2.0", "pkg==1.0rc1"] {
            py(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn python_refusals_name_the_spec() {
        for bad in [
            "numpy",
            "numpy>=1.0",
            "numpy~=1.0",
            "numpy==1.*",
            "numpy===1.0",
            "numpy==",
            "==1.0",
            "-e==1",
            "--index-url==1",
            "numpy==1.0; os_name=='nt'",
            "numpy @ https://x/y.whl",
            "git+https://github.com/x/y",
            "./local.whl",
            "/abs/path==1",
            "numpy==1.0 --index-url http://evil",
            "numpy==1.0;rm -rf /",
            "numpy==$(id)",
            "numpy==1.0`id`",
            "a b==1",
            "pkg[ex==1",
            "pkg[]==1",
            "numpy==1.0|cat",
            "numpy==v1",
            "numpy\n==1",
        ] {
            let err = py(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Input, "{bad}");
            assert!(err.to_string().contains(&shown(bad)), "{bad}: {err}");
        }
        assert!(py(&format!("{}==1", "a".repeat(300))).is_err());
    }

    #[test]
    fn npm_pins() {
        let s = js("@types/node@20.11.5").unwrap();
        assert_eq!(s.name, "@types/node");
        js("lodash@4.17.21").unwrap();
        js("x@1.0.0-beta.1+build.5").unwrap();
        for bad in [
            "lodash",
            "lodash@^4.17.21",
            "lodash@~4.17.21",
            "lodash@4.x",
            "lodash@latest",
            "lodash@4.17",
            "lodash@04.1.1",
            "Lodash@4.17.21",
            "@scope@1.0.0",
            "@/x@1.0.0",
            "a/b@1.0.0",
            "x@git+ssh://a",
            "x@file:../y",
            "x@https://evil/x.tgz",
            "../x@1.0.0",
            ".x@1.0.0",
            "_x@1.0.0",
            "x@1.0.0;id",
            "x@1.0.0 --registry=http://evil",
            "--registry@1.0.0",
            "x@1.0.0@2.0.0",
        ] {
            assert_eq!(js(bad).expect_err(bad).kind(), ErrorKind::Input, "{bad}");
        }
        assert!(parse_spec(Language::Raw, "p", "a==1").is_err());
    }

    #[test]
    fn a_request_is_bounded_sorted_and_deduplicated() {
        let specs: Vec<String> = ["Six==1.16.0", "attrs==23.1.0", "six==1.16.0"]
            .map(String::from)
            .to_vec();
        let parsed = parse_specs(Language::Python, &specs).unwrap();
        let names: Vec<&str> = parsed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["attrs", "six"]);
        let conflict: Vec<String> = vec!["six==1.16.0".into(), "SIX==1.15.0".into()];
        let err = parse_specs(Language::Python, &conflict).unwrap_err();
        assert_eq!(err.context().field.as_deref(), Some("packages[1]"));
        assert!(err.to_string().contains("SIX==1.15.0"), "{err}");
        let many: Vec<String> = (0..51).map(|i| format!("p{i}==1")).collect();
        assert_eq!(
            parse_specs(Language::Python, &many)
                .unwrap_err()
                .context()
                .field
                .as_deref(),
            Some("packages")
        );
        let fifty: Vec<String> = (0..50).map(|i| format!("p{i}==1")).collect();
        assert_eq!(parse_specs(Language::Python, &fifty).unwrap().len(), 50);
        let err = parse_specs(Language::Python, &["ok==1".into(), "bad".into()]).unwrap_err();
        assert_eq!(err.context().field.as_deref(), Some("packages[1]"));
    }

    #[test]
    fn allowlist_sections_and_checks() {
        let list = PackageAllowlist::parse(
            "# comment\n[python]\nNumPy\nscikit_learn  # trailing\n\n[javascript]\nlodash\n@types/node\n",
            "test",
        )
        .unwrap();
        assert!(list.allows(Language::Python, "numpy"));
        assert!(list.allows(Language::Python, "scikit-learn"));
        assert!(list.allows(Language::Javascript, "@types/node"));
        assert!(!list.allows(Language::Javascript, "numpy"));
        let ok = parse_specs(Language::Python, &["scikit-learn==1.5.2".into()]).unwrap();
        list.check(Language::Python, &ok).unwrap();
        let no = parse_specs(Language::Python, &["evil-pkg==1.0".into()]).unwrap();
        let err = list.check(Language::Python, &no).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Input);
        assert!(err.to_string().contains("evil-pkg==1.0"), "{err}");
        for bad in ["numpy\n", "[python]\nnot a name\n", "[javascript]\nUpper\n"] {
            assert!(PackageAllowlist::parse(bad, "t").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_shipped_allowlist_parses() {
        let text = include_str!("../../sbx/package-allowlist.txt");
        let list = PackageAllowlist::parse(text, "package-allowlist.txt").unwrap();
        assert!(
            list.len(Language::Python) >= 150,
            "{}",
            list.len(Language::Python)
        );
        assert!(list.len(Language::Javascript) >= 50);
        for name in [
            "numpy",
            "pandas",
            "requests",
            "scikit-learn",
            "six",
            "attrs",
        ] {
            assert!(list.allows(Language::Python, name), "{name}");
        }
        for name in ["lodash", "left-pad", "is-number"] {
            assert!(list.allows(Language::Javascript, name), "{name}");
        }
    }
}
