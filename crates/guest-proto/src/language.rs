//! Languages the guest can run.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A language the guest runs code in.
///
/// Serialised (serde and [`Display`](fmt::Display)) in lowercase: `python`, `javascript`,
/// `raw`. Parsed case-insensitively with [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Python 3.
    Python,
    /// JavaScript (Node.js).
    Javascript,
    /// A shell script run by bash.
    Raw,
}

impl Language {
    /// Every language, in declaration order.
    pub const ALL: [Language; 3] = [Language::Python, Language::Javascript, Language::Raw];

    /// The lowercase name, as used on the wire and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Raw => "raw",
        }
    }

    /// Detects the language from a file extension (case-insensitive): `.py` is Python,
    /// `.js` and `.mjs` are JavaScript, `.sh` is raw. Anything else is `None`.
    pub fn from_path(path: &Path) -> Option<Language> {
        let ext = path.extension()?.to_str()?;
        if ext.eq_ignore_ascii_case("py") {
            Some(Language::Python)
        } else if ext.eq_ignore_ascii_case("js") || ext.eq_ignore_ascii_case("mjs") {
            Some(Language::Javascript)
        } else if ext.eq_ignore_ascii_case("sh") {
            Some(Language::Raw)
        } else {
            None
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Language`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLanguageError {
    value: String,
}

impl ParseLanguageError {
    /// The string that was refused.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for ParseLanguageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown language {:?}: expected python, javascript or raw",
            self.value
        )
    }
}

impl std::error::Error for ParseLanguageError {}

impl FromStr for Language {
    type Err = ParseLanguageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Language::ALL
            .into_iter()
            .find(|lang| lang.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseLanguageError {
                value: s.chars().take(64).collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively() {
        assert_eq!("python".parse(), Ok(Language::Python));
        assert_eq!("PYTHON".parse(), Ok(Language::Python));
        assert_eq!("JavaScript".parse(), Ok(Language::Javascript));
        assert_eq!("Raw".parse(), Ok(Language::Raw));
    }

    #[test]
    fn refuses_unknown_names_and_names_them() {
        for bad in ["", "py", "node", " python", "python ", "ruby"] {
            let err = bad.parse::<Language>().unwrap_err();
            assert_eq!(err.value(), bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn display_round_trips_through_from_str() {
        for lang in Language::ALL {
            assert_eq!(lang.to_string(), lang.as_str());
            assert_eq!(lang.to_string().parse(), Ok(lang));
        }
        assert_eq!(Language::Javascript.to_string(), "javascript");
    }

    #[test]
    fn serde_is_lowercase() {
        assert_eq!(
            serde_json::to_string(&Language::Javascript).unwrap(),
            "\"javascript\""
        );
        assert_eq!(
            serde_json::from_str::<Language>("\"raw\"").unwrap(),
            Language::Raw
        );
        assert!(serde_json::from_str::<Language>("\"Raw\"").is_err());
    }

    #[test]
    fn detects_from_extension() {
        let cases = [
            ("main.py", Some(Language::Python)),
            ("dir/MAIN.PY", Some(Language::Python)),
            ("a.js", Some(Language::Javascript)),
            ("a.mjs", Some(Language::Javascript)),
            ("a.MJS", Some(Language::Javascript)),
            ("run.sh", Some(Language::Raw)),
            ("run.Sh", Some(Language::Raw)),
            ("a.ts", None),
            ("a.pyc", None),
            ("py", None),
            (".py", None),
            ("noext", None),
            ("a.py.txt", None),
            ("archive.tar.sh", Some(Language::Raw)),
        ];
        for (path, want) in cases {
            assert_eq!(Language::from_path(Path::new(path)), want, "{path}");
        }
    }
}
