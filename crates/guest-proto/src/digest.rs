//! SHA-256 digests for file transfers.
//!
//! `WriteEnd`, `FileWritten` and `FileRead` carry a raw `[u8; 32]`; these helpers compute
//! it incrementally while chunks stream past and print it as hex.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A SHA-256 digest. Displays as 64 lowercase hex digits and parses back from them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for Sha256Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<Sha256Digest> for [u8; 32] {
    fn from(digest: Sha256Digest) -> Self {
        digest.0
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDigestError;

impl fmt::Display for ParseDigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SHA-256 digest is 64 hex digits")
    }
}

impl std::error::Error for ParseDigestError {}

impl FromStr for Sha256Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self).ok_or(ParseDigestError)
    }
}

pub(crate) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let digits = s.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = hex_value(pair[0])?;
        let lo = hex_value(pair[1])?;
        *byte = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Incremental SHA-256 that also counts the bytes it has seen.
///
/// Feed it each chunk as it is written or read, then compare [`finish`](Self::finish)
/// with the `size` and `sha256` of the closing message.
#[derive(Clone, Default)]
pub struct Sha256Hasher {
    inner: sha2::Sha256,
    len: u64,
}

impl Sha256Hasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len = self.len.saturating_add(data.len() as u64);
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The total size and digest of everything fed.
    pub fn finish(self) -> (u64, Sha256Digest) {
        (self.len, Sha256Digest(self.inner.finalize().into()))
    }
}

/// Reads `reader` to the end in 1 MiB chunks; returns how many bytes it held and their
/// SHA-256.
pub fn hash_reader(reader: &mut impl std::io::Read) -> std::io::Result<(u64, Sha256Digest)> {
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(hasher.finish())
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256Hasher")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn known_vectors() {
        assert_eq!(Sha256Digest::of(b"").to_string(), EMPTY);
        assert_eq!(Sha256Digest::of(b"abc").to_string(), ABC);
    }

    #[test]
    fn incremental_matches_one_shot() {
        let mut hasher = Sha256Hasher::new();
        assert!(hasher.is_empty());
        hasher.update(b"a");
        hasher.update(b"");
        hasher.update(b"bc");
        assert_eq!(hasher.len(), 3);
        assert_eq!(hasher.finish(), (3, Sha256Digest::of(b"abc")));
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let digest: Sha256Digest = ABC.parse().unwrap();
        assert_eq!(digest, Sha256Digest::of(b"abc"));
        assert_eq!(ABC.to_uppercase().parse::<Sha256Digest>(), Ok(digest));
        assert!("".parse::<Sha256Digest>().is_err());
        assert!(ABC[1..].parse::<Sha256Digest>().is_err());
        assert!(format!("{}g", &ABC[1..]).parse::<Sha256Digest>().is_err());
        assert!(format!("{ABC}00").parse::<Sha256Digest>().is_err());
    }
}
