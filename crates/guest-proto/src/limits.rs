//! Limits and input rules shared by the host and the guest agent.
//!
//! The host validates every request before any VM work; the guest re-checks the same rules
//! because it never trusts the host. Keeping the rules here means both sides agree by
//! construction.

use std::fmt;

/// Largest accepted source code, in bytes (after a leading BOM is stripped).
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Most environment variables one exec may carry.
pub const MAX_ENV_VARS: usize = 100;
/// Longest environment variable name, in bytes.
pub const MAX_ENV_NAME_BYTES: usize = 256;
/// Longest environment variable value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Cap on captured stdout of one exec, in bytes.
pub const MAX_STDOUT_BYTES: usize = 1_000_000;
/// Cap on captured stderr of one exec, in bytes.
pub const MAX_STDERR_BYTES: usize = 100_000;
/// Largest file that can be written to or read from the guest, in bytes.
pub const MAX_FILE_BYTES: u64 = 500 * 1024 * 1024;
/// Longest guest path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single path component, in bytes.
pub const MAX_PATH_COMPONENT_BYTES: usize = 255;
/// Shortest exec timeout, in seconds.
pub const MIN_TIMEOUT_SECS: u32 = 1;
/// Longest exec timeout, in seconds.
pub const MAX_TIMEOUT_SECS: u32 = 300;
/// Fewest fresh random bytes a `Resume` must carry (256 bits, the kernel CRNG's seed size).
pub const MIN_RESUME_ENTROPY_BYTES: usize = 32;
/// Most random bytes a `Resume` may carry (what one `RNDADDENTROPY` is worth taking).
pub const MAX_RESUME_ENTROPY_BYTES: usize = 256;

/// Checks the length of a `Resume`'s entropy: [`MIN_RESUME_ENTROPY_BYTES`] to
/// [`MAX_RESUME_ENTROPY_BYTES`] bytes.
pub fn validate_resume_entropy(entropy: &[u8]) -> Result<(), String> {
    let n = entropy.len();
    if (MIN_RESUME_ENTROPY_BYTES..=MAX_RESUME_ENTROPY_BYTES).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "resume entropy is {n} bytes; {MIN_RESUME_ENTROPY_BYTES} to \
             {MAX_RESUME_ENTROPY_BYTES} are required"
        ))
    }
}

/// Environment variable names that change how interpreters, the shell or the dynamic loader
/// behave. Matched case-insensitively; entries ending in `*` are prefixes.
pub const ENV_BLOCKLIST: &[&str] = &[
    "LD_*",
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "HOSTALIASES",
    "LOCPATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TMPDIR",
    "TZDIR",
    "MALLOC_*",
    "NODE_OPTIONS",
    "NODE_REPL_HISTORY",
    "NODE_PATH",
    "PYTHONPATH",
    "PYTHONINSPECT",
    "PYTHONWARNINGS",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONBREAKPOINT",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PROMPT_COMMAND",
    "IFS",
    "CDPATH",
    "PS4",
    "PATH",
];

/// Why a piece of code was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeError {
    /// Nothing but whitespace.
    Empty,
    /// Larger than [`MAX_CODE_BYTES`].
    TooLarge {
        /// Size in bytes.
        size: usize,
    },
    /// Contains a NUL byte.
    NulByte,
}

impl fmt::Display for CodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "code is empty"),
            Self::TooLarge { size } => {
                write!(
                    f,
                    "code is {size} bytes, more than the {MAX_CODE_BYTES}-byte limit"
                )
            }
            Self::NulByte => write!(f, "code contains a NUL byte"),
        }
    }
}

impl std::error::Error for CodeError {}

/// Checks code and returns it with a leading UTF-8 BOM removed.
pub fn validate_code(code: &str) -> Result<&str, CodeError> {
    let code = code.strip_prefix('\u{feff}').unwrap_or(code);
    if code.len() > MAX_CODE_BYTES {
        return Err(CodeError::TooLarge { size: code.len() });
    }
    if code.contains('\0') {
        return Err(CodeError::NulByte);
    }
    if code.trim().is_empty() {
        return Err(CodeError::Empty);
    }
    Ok(code)
}

/// Why an environment variable was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvError {
    /// More than [`MAX_ENV_VARS`] variables.
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// Empty name.
    EmptyName,
    /// Name longer than [`MAX_ENV_NAME_BYTES`].
    NameTooLong {
        /// The name, truncated for display.
        name: String,
    },
    /// Value longer than [`MAX_ENV_VALUE_BYTES`].
    ValueTooLong {
        /// The variable's name.
        name: String,
    },
    /// The name contains `=`, NUL or a control character.
    InvalidName {
        /// The name, escaped for display.
        name: String,
    },
    /// The value contains NUL or a control character other than tab.
    InvalidValue {
        /// The variable's name.
        name: String,
    },
    /// Shell code (`raw`) takes only names a shell can assign: `[A-Za-z_][A-Za-z0-9_]*`.
    NotShellName {
        /// The name, truncated for display.
        name: String,
    },
    /// The name is on [`ENV_BLOCKLIST`].
    Blocked {
        /// The variable's name.
        name: String,
    },
}

impl EnvError {
    /// The variable name this error is about, when there is one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::TooMany { .. } | Self::EmptyName => None,
            Self::NameTooLong { name }
            | Self::ValueTooLong { name }
            | Self::InvalidName { name }
            | Self::InvalidValue { name }
            | Self::NotShellName { name }
            | Self::Blocked { name } => Some(name),
        }
    }
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany { count } => {
                write!(
                    f,
                    "{count} environment variables, at most {MAX_ENV_VARS} allowed"
                )
            }
            Self::EmptyName => write!(f, "environment variable name is empty"),
            Self::NameTooLong { name } => write!(
                f,
                "environment variable name {name:?} is longer than {MAX_ENV_NAME_BYTES} bytes"
            ),
            Self::ValueTooLong { name } => write!(
                f,
                "value of environment variable {name:?} is longer than {MAX_ENV_VALUE_BYTES} bytes"
            ),
            Self::InvalidName { name } => write!(
                f,
                "environment variable name {name:?} contains '=', NUL or a control character"
            ),
            Self::InvalidValue { name } => write!(
                f,
                "value of environment variable {name:?} contains NUL or a control character"
            ),
            Self::NotShellName { name } => write!(
                f,
                "environment variable name {name:?} is not a valid shell variable name \
                 ([A-Za-z_][A-Za-z0-9_]*)"
            ),
            Self::Blocked { name } => write!(
                f,
                "environment variable {name:?} is not allowed: it changes how the interpreter or loader behaves"
            ),
        }
    }
}

impl std::error::Error for EnvError {}

fn display_name(name: &str) -> String {
    name.chars().take(64).collect()
}

/// True when `name` is on [`ENV_BLOCKLIST`] (case-insensitive, `*` entries are prefixes).
pub fn is_blocked_env_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ENV_BLOCKLIST
        .iter()
        .any(|entry| match entry.strip_suffix('*') {
            Some(prefix) => upper.starts_with(prefix),
            None => upper == *entry,
        })
}

/// Checks one environment variable.
pub fn validate_env_var(name: &str, value: &str) -> Result<(), EnvError> {
    if name.is_empty() {
        return Err(EnvError::EmptyName);
    }
    if name.len() > MAX_ENV_NAME_BYTES {
        return Err(EnvError::NameTooLong {
            name: display_name(name),
        });
    }
    if name.chars().any(|c| c == '=' || c.is_control()) {
        return Err(EnvError::InvalidName {
            name: display_name(name),
        });
    }
    if is_blocked_env_name(name) {
        return Err(EnvError::Blocked {
            name: name.to_owned(),
        });
    }
    if value.len() > MAX_ENV_VALUE_BYTES {
        return Err(EnvError::ValueTooLong {
            name: name.to_owned(),
        });
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(EnvError::InvalidValue {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// True when `name` is a shell variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_shell_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Checks a whole set of environment variables for code in `language`: the rules of
/// [`validate_env`], plus shell variable names for `raw` (the host checks this before any
/// VM work; the agent checks it again).
pub fn validate_env_for<'a, I>(language: crate::Language, vars: I) -> Result<(), EnvError>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let vars: Vec<(&str, &str)> = vars.into_iter().collect();
    validate_env(vars.iter().copied())?;
    if language == crate::Language::Raw
        && let Some((name, _)) = vars.iter().find(|(k, _)| !is_shell_identifier(k))
    {
        return Err(EnvError::NotShellName {
            name: display_name(name),
        });
    }
    Ok(())
}

/// Checks a whole set of environment variables.
pub fn validate_env<'a, I>(vars: I) -> Result<(), EnvError>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut count = 0usize;
    for (name, value) in vars {
        count += 1;
        validate_env_var(name, value)?;
    }
    if count > MAX_ENV_VARS {
        return Err(EnvError::TooMany { count });
    }
    Ok(())
}

/// Why a guest path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Empty path where a file is required.
    Empty,
    /// Absolute path.
    Absolute,
    /// Contains NUL or a control character.
    InvalidCharacter,
    /// Longer than [`MAX_PATH_BYTES`].
    TooLong,
    /// A component longer than [`MAX_PATH_COMPONENT_BYTES`].
    ComponentTooLong,
    /// `..` would leave the root.
    EscapesRoot,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "path is empty"),
            Self::Absolute => write!(f, "path must be relative to /home/user"),
            Self::InvalidCharacter => write!(f, "path contains NUL or a control character"),
            Self::TooLong => write!(f, "path is longer than {MAX_PATH_BYTES} bytes"),
            Self::ComponentTooLong => write!(
                f,
                "a path component is longer than {MAX_PATH_COMPONENT_BYTES} bytes"
            ),
            Self::EscapesRoot => write!(f, "path escapes /home/user"),
        }
    }
}

impl std::error::Error for PathError {}

/// Lexically normalises a guest path relative to the session root.
///
/// Returns the normalised components joined by `/` (`""` is the root itself). `allow_root`
/// says whether the root is acceptable (listing) or not (reading and writing a file).
/// Symlink checks need the filesystem and are the guest's job.
pub fn normalize_guest_path(path: &str, allow_root: bool) -> Result<String, PathError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::InvalidCharacter);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        if comp.len() > MAX_PATH_COMPONENT_BYTES {
            return Err(PathError::ComponentTooLong);
        }
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() && !allow_root {
        return Err(PathError::Empty);
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_names_only_for_raw() {
        use crate::Language;
        let bad = [("BAD-KEY", "1")];
        assert!(validate_env_for(Language::Python, bad).is_ok());
        assert!(validate_env_for(Language::Javascript, bad).is_ok());
        let err = validate_env_for(Language::Raw, bad).unwrap_err();
        assert_eq!(err.name(), Some("BAD-KEY"));
        assert!(err.to_string().contains("shell variable name"));
        assert!(validate_env_for(Language::Raw, [("_OK_1", "x"), ("a", "")]).is_ok());
        for name in ["1A", "A.B", "A B", "é"] {
            assert!(!is_shell_identifier(name), "{name}");
        }
        // The general rules still come first.
        assert!(matches!(
            validate_env_for(Language::Raw, [("LD_PRELOAD", "x")]),
            Err(EnvError::Blocked { .. })
        ));
    }

    #[test]
    fn code_rules() {
        assert_eq!(validate_code("\u{feff}print(1)"), Ok("print(1)"));
        assert_eq!(validate_code("  \n\t"), Err(CodeError::Empty));
        assert_eq!(validate_code(""), Err(CodeError::Empty));
        assert_eq!(validate_code("a\0b"), Err(CodeError::NulByte));
        let big = "x".repeat(MAX_CODE_BYTES + 1);
        assert!(matches!(
            validate_code(&big),
            Err(CodeError::TooLarge { .. })
        ));
        let exact = "x".repeat(MAX_CODE_BYTES);
        assert!(validate_code(&exact).is_ok());
    }

    #[test]
    fn env_blocklist_is_case_insensitive_with_prefixes() {
        for name in [
            "LD_PRELOAD",
            "ld_library_path",
            "Ld_Audit",
            "GLIBC_TUNABLES",
            "node_options",
            "PYTHONPATH",
            "PythonStartup",
            "PYTHONHOME",
            "BASH_ENV",
            "ENV",
            "path",
            "IFS",
            "PROMPT_COMMAND",
            "MALLOC_ARENA_MAX",
            "malloc_check_",
            "TMPDIR",
            "CDPATH",
            "PS4",
        ] {
            assert!(is_blocked_env_name(name), "{name} should be blocked");
            assert!(matches!(
                validate_env_var(name, "x"),
                Err(EnvError::Blocked { .. })
            ));
        }
        for name in ["HOME", "FOO", "ENVIRONMENT", "MY_PATH", "PATHX", "LANG"] {
            assert!(!is_blocked_env_name(name), "{name} should be allowed");
        }
    }

    #[test]
    fn env_value_and_name_rules() {
        assert!(validate_env_var("A", "tab\tok").is_ok());
        assert!(matches!(
            validate_env_var("A", "new\nline"),
            Err(EnvError::InvalidValue { .. })
        ));
        assert!(matches!(
            validate_env_var("A", "nul\0"),
            Err(EnvError::InvalidValue { .. })
        ));
        assert!(matches!(
            validate_env_var("", "x"),
            Err(EnvError::EmptyName)
        ));
        assert!(matches!(
            validate_env_var("A=B", "x"),
            Err(EnvError::InvalidName { .. })
        ));
        assert!(validate_env_var(&"N".repeat(256), "x").is_ok());
        assert!(matches!(
            validate_env_var(&"N".repeat(257), "x"),
            Err(EnvError::NameTooLong { .. })
        ));
        assert!(validate_env_var("A", &"v".repeat(4096)).is_ok());
        assert!(matches!(
            validate_env_var("A", &"v".repeat(4097)),
            Err(EnvError::ValueTooLong { .. })
        ));
    }

    #[test]
    fn env_count_limit() {
        let names: Vec<String> = (0..101).map(|i| format!("V{i}")).collect();
        let ok: Vec<(&str, &str)> = names[..100].iter().map(|n| (n.as_str(), "1")).collect();
        assert!(validate_env(ok).is_ok());
        let too_many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
        assert_eq!(
            validate_env(too_many),
            Err(EnvError::TooMany { count: 101 })
        );
    }

    #[test]
    fn guest_paths() {
        assert_eq!(
            normalize_guest_path("a/./b//c", false).as_deref(),
            Ok("a/b/c")
        );
        assert_eq!(normalize_guest_path("a/../b", false).as_deref(), Ok("b"));
        assert_eq!(normalize_guest_path("", true).as_deref(), Ok(""));
        assert_eq!(normalize_guest_path("", false), Err(PathError::Empty));
        assert_eq!(
            normalize_guest_path("/etc/passwd", false),
            Err(PathError::Absolute)
        );
        assert_eq!(
            normalize_guest_path("../x", false),
            Err(PathError::EscapesRoot)
        );
        assert_eq!(
            normalize_guest_path("a/../../x", false),
            Err(PathError::EscapesRoot)
        );
        assert_eq!(
            normalize_guest_path("a\0b", false),
            Err(PathError::InvalidCharacter)
        );
        assert_eq!(
            normalize_guest_path("a\nb", false),
            Err(PathError::InvalidCharacter)
        );
        assert_eq!(
            normalize_guest_path(&"c".repeat(256), false),
            Err(PathError::ComponentTooLong)
        );
        let long = vec!["d"; 2049].join("/");
        assert_eq!(normalize_guest_path(&long, false), Err(PathError::TooLong));
    }
}
