//! What the guest runs, as the layer builder needs it: read from the guest assets'
//! `manifest.json` (written by `cargo xtask assets`).

use std::path::Path;

use sandbox_core::Language;
use serde_json::Value;

use crate::error::LayerError;

/// The guest a layer is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTarget {
    /// Language of the image.
    pub language: Language,
    /// Interpreter version (`3.11.2`, `18.20.4`).
    pub interpreter: String,
    /// glibc `(major, minor)` of the image (manylinux tags).
    pub glibc: (u32, u32),
    /// SHA-256 of the base image the layer goes with.
    pub base_digest: String,
    /// Architecture (`x86_64`).
    pub arch: String,
}

fn debian_upstream(v: &str) -> &str {
    let v = v.split_once(':').map_or(v, |(_, r)| r);
    v.split(['-', '+', '~']).next().unwrap_or(v)
}

impl GuestTarget {
    /// `major.minor` of the interpreter.
    pub fn interpreter_minor(&self) -> String {
        self.interpreter
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Reads the target of `language` from the assets manifest at `path`.
    pub fn from_assets_manifest(path: &Path, language: Language) -> Result<Self, LayerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LayerError::io(format!("read {}", path.display()), e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LayerError::Target(format!("{}: {e}", path.display())))?;
        Self::from_manifest_json(&v, language).ok_or_else(|| {
            LayerError::Target(format!(
                "{} does not say which {language} interpreter and glibc the guest image \
                     has (rebuild the assets with `cargo xtask assets`)",
                path.display()
            ))
        })
    }

    /// The target of `language` in a parsed assets manifest.
    pub fn from_manifest_json(v: &Value, language: Language) -> Option<Self> {
        let image = v.get("assets")?.get(format!("image:{language}"))?;
        let base_digest = image.get("sha256")?.as_str()?.to_owned();
        let installed = image.get("inputs")?.get("installed_packages")?;
        let get = |name: &str| installed.get(name).and_then(Value::as_str);
        let libc = debian_upstream(get("libc6")?);
        let mut parts = libc.split('.');
        let glibc = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
        let interpreter = match language {
            Language::Python => {
                // The versioned package (python3.11) carries the real interpreter version.
                let mut names: Vec<(&String, &Value)> = installed
                    .as_object()?
                    .iter()
                    .filter(|(k, _)| {
                        k.strip_prefix("python3.")
                            .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .collect();
                names.sort_by_key(|(k, _)| k.len());
                debian_upstream(names.last()?.1.as_str()?).to_owned()
            }
            // Debian's nodejs, else the runtime the image took from npm (Bun).
            Language::Javascript => match get("nodejs") {
                Some(v) => debian_upstream(v).to_owned(),
                None => {
                    let rt = image
                        .get("inputs")?
                        .get("npm_runtimes")?
                        .as_array()?
                        .first()?;
                    let package = rt.get("package")?.as_str()?;
                    let version = rt.get("version")?.as_str()?;
                    format!("{package}@{version}")
                }
            },
            Language::Raw => return None,
        };
        Some(Self {
            language,
            interpreter,
            glibc,
            base_digest,
            arch: std::env::consts::ARCH.to_owned(),
        })
    }

    /// pip's target options: version, implementation, ABIs and platforms.
    pub fn pip_target_args(&self) -> Vec<String> {
        let minor = self.interpreter_minor();
        let nodot = minor.replace('.', "");
        let mut a = vec![
            "--python-version".to_owned(),
            minor,
            "--implementation".into(),
            "cp".into(),
            "--abi".into(),
            format!("cp{nodot}"),
            "--abi".into(),
            "abi3".into(),
            "--abi".into(),
            "none".into(),
        ];
        for p in self.manylinux_platforms() {
            a.push("--platform".into());
            a.push(p);
        }
        a
    }

    /// manylinux tags the guest's glibc accepts, newest first (PEP 600 and the legacy
    /// aliases).
    pub fn manylinux_platforms(&self) -> Vec<String> {
        let arch = &self.arch;
        let (major, minor) = self.glibc;
        let mut out: Vec<String> = (5..=minor)
            .rev()
            .map(|m| format!("manylinux_{major}_{m}_{arch}"))
            .collect();
        for (legacy, need) in [
            ("manylinux2014", 17),
            ("manylinux2010", 12),
            ("manylinux1", 5),
        ] {
            if major == 2 && minor >= need {
                out.push(format!("{legacy}_{arch}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Value {
        serde_json::json!({"assets": {
            "image:python": {"sha256": "ab".repeat(32), "inputs": {"installed_packages": {
                "libc6": "2.36-9+deb12u14", "python3": "3.11.2-1+b1",
                "python3.11": "3.11.2-6+deb12u9", "python3.11-minimal": "3.11.2-6+deb12u9",
                "python3-pip": "23.0.1+dfsg-1"}}},
            "image:javascript": {"sha256": "cd".repeat(32), "inputs": {"installed_packages": {
                "libc6": "2.36-9+deb12u14", "nodejs": "18.20.4+dfsg-1~deb12u3"}}}
        }})
    }

    #[test]
    fn reads_the_guest_from_the_assets_manifest() {
        let py = GuestTarget::from_manifest_json(&manifest(), Language::Python).unwrap();
        assert_eq!(py.interpreter, "3.11.2");
        assert_eq!(py.interpreter_minor(), "3.11");
        assert_eq!(py.glibc, (2, 36));
        assert_eq!(py.base_digest, "ab".repeat(32));
        let js = GuestTarget::from_manifest_json(&manifest(), Language::Javascript).unwrap();
        assert_eq!(js.interpreter, "18.20.4");
        assert!(GuestTarget::from_manifest_json(&manifest(), Language::Raw).is_none());
        // An image whose runtime came from npm (Bun): no Debian nodejs.
        let bun = serde_json::json!({"assets": {"image:javascript": {"sha256": "ef".repeat(32),
            "inputs": {"installed_packages": {"libc6": "2.36-9+deb12u14"},
                "npm_runtimes": [{"package": "@oven/bun-linux-x64", "version": "1.4.5"}]}}}});
        let js = GuestTarget::from_manifest_json(&bun, Language::Javascript).unwrap();
        assert_eq!(js.interpreter, "@oven/bun-linux-x64@1.4.5");
        assert_eq!(js.glibc, (2, 36));
        assert!(
            GuestTarget::from_manifest_json(&serde_json::json!({}), Language::Python).is_none()
        );
    }

    #[test]
    fn pip_targets_the_guest_not_the_host() {
        let py = GuestTarget::from_manifest_json(&manifest(), Language::Python).unwrap();
        let a = py.pip_target_args().join(" ");
        assert!(
            a.contains("--python-version 3.11 --implementation cp --abi cp311"),
            "{a}"
        );
        assert!(
            a.contains(&format!("--platform manylinux_2_36_{}", py.arch)),
            "{a}"
        );
        assert!(
            a.contains(&format!("--platform manylinux_2_17_{}", py.arch)),
            "{a}"
        );
        assert!(
            a.contains(&format!("--platform manylinux2014_{}", py.arch)),
            "{a}"
        );
        assert!(!a.contains("manylinux_2_37"), "{a}");
    }
}
