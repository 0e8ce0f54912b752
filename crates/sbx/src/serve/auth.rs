//! Bearer-token authentication.
//!
//! Tokens are compared in constant time: the SHA-256 of the presented token is compared
//! with the SHA-256 of every known token (`subtle`), without stopping at the first match,
//! so neither the position nor the length of a known token leaks through timing. Each
//! token has a short public id (a prefix of its SHA-256) used in logs and for per-token
//! limits; the token itself is never logged.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest accepted token.
pub const MIN_TOKEN_LEN: usize = 16;

/// Caller identity of requests when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Clone)]
struct Known {
    digest: [u8; 32],
    id: String,
}

/// Who may call the API.
#[derive(Clone)]
pub struct Auth {
    tokens: Option<Vec<Known>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tokens {
            None => f.write_str("Auth::Disabled"),
            Some(t) => f
                .debug_struct("Auth")
                .field("token_ids", &t.iter().map(|k| &k.id).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// The authenticated caller, kept in request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Public id of the caller's token (`anonymous` without auth).
    pub token_id: String,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The public id of `token`: 12 hex digits of its SHA-256.
pub fn token_id(token: &str) -> String {
    hex::encode(&digest(token)[..6])
}

impl Auth {
    /// No authentication (only allowed on loopback listeners).
    pub fn disabled() -> Self {
        Self { tokens: None }
    }

    /// Accepts any of `tokens`. Errors when one is shorter than [`MIN_TOKEN_LEN`] or when
    /// there is none.
    pub fn tokens<I, S>(tokens: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut known = Vec::new();
        for t in tokens {
            let t = t.as_ref();
            if t.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "a token is {} characters; at least {MIN_TOKEN_LEN} are required",
                    t.len()
                ));
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("tokens may not contain whitespace or control characters".into());
            }
            known.push(Known {
                digest: digest(t),
                id: token_id(t),
            });
        }
        if known.is_empty() {
            return Err("no token given".into());
        }
        Ok(Self {
            tokens: Some(known),
        })
    }

    /// Reads tokens from `path`: one per line; blank lines and `#` comments are skipped.
    ///
    /// The file must be a regular file (not a symlink) that neither its group nor other
    /// users can read or write (mode `0600` or stricter): a token file others can read
    /// hands out the API. Checked on the open descriptor, so the file read is the file
    /// checked.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!(
                "token file {} is not a regular file",
                path.display()
            ));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "token file {} is readable or writable by others (mode {mode:04o}); \
                 run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        let tokens: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        Self::tokens(tokens).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// A fresh random token (256 bits, hex) and the auth that accepts it.
    pub fn generate() -> Result<(Self, String), String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a token: {e}"))?;
        let token = format!("sbx_{}", hex::encode(bytes));
        let auth = Self::tokens([&token])?;
        Ok((auth, token))
    }

    /// True when tokens are required.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// Checks an `Authorization` header value. `None` means refused.
    pub fn check(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let Some(known) = &self.tokens else {
            return Some(Caller {
                token_id: ANONYMOUS.to_owned(),
            });
        };
        let value = authorization?;
        let token = strip_bearer(value)?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found: Option<&Known> = None;
        for k in known {
            // No early exit: every known token is compared.
            if bool::from(k.digest.ct_eq(&presented)) {
                found = Some(k);
            }
        }
        found.map(|k| Caller {
            token_id: k.id.clone(),
        })
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let rest = rest.trim_ascii();
    (!rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_known_tokens() {
        let auth = Auth::tokens(["a-long-enough-token-1", "a-long-enough-token-2"]).unwrap();
        let ok = auth.check(Some(b"Bearer a-long-enough-token-2")).unwrap();
        assert_eq!(ok.token_id, token_id("a-long-enough-token-2"));
        assert!(
            auth.check(Some(b"bearer  a-long-enough-token-1 "))
                .is_some()
        );
        for bad in [
            &b"Bearer a-long-enough-token-3"[..],
            b"Basic a-long-enough-token-1",
            b"a-long-enough-token-1",
            b"Bearer ",
            b"",
        ] {
            assert!(auth.check(Some(bad)).is_none(), "{bad:?}");
        }
        assert!(auth.check(None).is_none());
        assert!(Auth::disabled().check(None).is_some());
    }

    #[test]
    fn rejects_short_or_missing_tokens() {
        assert!(Auth::tokens(["short"]).is_err());
        assert!(Auth::tokens(Vec::<String>::new()).is_err());
        let (auth, token) = Auth::generate().unwrap();
        assert!(token.len() > 64);
        assert!(
            auth.check(Some(format!("Bearer {token}").as_bytes()))
                .is_some()
        );
    }

    fn set_mode(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn token_file_readable_by_others_or_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, "token-number-one-xyz\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            set_mode(&p, mode);
            let err = Auth::from_file(&p).unwrap_err();
            assert!(err.contains("chmod 600"), "{mode:o}: {err}");
        }
        set_mode(&p, 0o400);
        assert!(Auth::from_file(&p).is_ok());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(Auth::from_file(&link).is_err());
        assert!(Auth::from_file(dir.path()).is_err());
    }

    #[test]
    fn token_file_skips_comments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "# ops\n\n  token-number-one-xyz  \ntoken-number-two-xyz\n",
        )
        .unwrap();
        set_mode(&p, 0o600);
        let auth = Auth::from_file(&p).unwrap();
        assert!(auth.check(Some(b"Bearer token-number-one-xyz")).is_some());
        assert!(auth.check(Some(b"Bearer token-number-two-xyz")).is_some());
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(Auth::from_file(&p).is_err());
    }
}
