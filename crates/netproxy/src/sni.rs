//! Server Name Indication from a TLS ClientHello, by hand and with checked slicing.
//!
//! The parser never indexes out of bounds and never panics on any input (proptest below).
//! It reassembles a ClientHello split over several TLS records (up to [`MAX_HELLO_BYTES`])
//! and tells "need more bytes" apart from "this is not TLS".

/// Bytes of a ClientHello the proxy buffers at most before giving up.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;

/// What the first bytes of a connection say about its TLS server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniOutcome {
    /// More bytes are needed to decide.
    Incomplete,
    /// The bytes are not a TLS ClientHello (or one larger than [`MAX_HELLO_BYTES`]).
    NotTls,
    /// A well-formed ClientHello without a usable host name.
    NoSni,
    /// The host name, lowercase, without a trailing dot.
    Sni(String),
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|s| s.first().copied())
    }

    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([*s.first()?, *s.get(1)?]))
    }

    fn u24(&mut self) -> Option<usize> {
        let s = self.take(3)?;
        Some(
            (usize::from(*s.first()?) << 16)
                | (usize::from(*s.get(1)?) << 8)
                | usize::from(*s.get(2)?),
        )
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// Parses the first bytes a client sent on a connection.
pub fn parse_client_hello(data: &[u8]) -> SniOutcome {
    // Reassemble the handshake layer from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut records = Reader::new(data);
    loop {
        if records.is_empty() {
            return SniOutcome::Incomplete;
        }
        let Some(content_type) = records.u8() else {
            return SniOutcome::Incomplete;
        };
        if content_type != RECORD_HANDSHAKE {
            return SniOutcome::NotTls;
        }
        let Some(major) = records.u8() else {
            return SniOutcome::Incomplete;
        };
        if major != 3 {
            return SniOutcome::NotTls;
        }
        let Some(_minor) = records.u8() else {
            return SniOutcome::Incomplete;
        };
        let Some(len) = records.u16() else {
            return SniOutcome::Incomplete;
        };
        let len = usize::from(len);
        if len == 0 || len > MAX_HELLO_BYTES {
            return SniOutcome::NotTls;
        }
        let Some(fragment) = records.take(len) else {
            // Whole record not there yet; decide early if it is not a ClientHello.
            if let Some(&t) = data.get(5)
                && handshake.is_empty()
                && t != HANDSHAKE_CLIENT_HELLO
            {
                return SniOutcome::NotTls;
            }
            return SniOutcome::Incomplete;
        };
        handshake.extend_from_slice(fragment);
        if handshake.len() > MAX_HELLO_BYTES + 4 {
            return SniOutcome::NotTls;
        }
        let mut hs = Reader::new(&handshake);
        let (Some(msg_type), Some(msg_len)) = (hs.u8(), hs.u24()) else {
            continue;
        };
        if msg_type != HANDSHAKE_CLIENT_HELLO || msg_len > MAX_HELLO_BYTES {
            return SniOutcome::NotTls;
        }
        let Some(body) = hs.take(msg_len) else {
            continue;
        };
        return parse_hello_body(body);
    }
}

fn parse_hello_body(body: &[u8]) -> SniOutcome {
    let mut r = Reader::new(body);
    // client_version, random
    if r.take(2).is_none() || r.take(32).is_none() {
        return SniOutcome::NotTls;
    }
    // session_id, cipher_suites, compression_methods
    if r.vec8().is_none() || r.vec16().is_none() || r.vec8().is_none() {
        return SniOutcome::NotTls;
    }
    if r.is_empty() {
        return SniOutcome::NoSni;
    }
    let Some(extensions) = r.vec16() else {
        return SniOutcome::NotTls;
    };
    let mut exts = Reader::new(extensions);
    while !exts.is_empty() {
        let (Some(ext_type), Some(ext_data)) = (exts.u16(), exts.vec16()) else {
            return SniOutcome::NotTls;
        };
        if ext_type == EXT_SERVER_NAME {
            return parse_server_name(ext_data);
        }
    }
    SniOutcome::NoSni
}

fn parse_server_name(ext: &[u8]) -> SniOutcome {
    let mut r = Reader::new(ext);
    let Some(list) = r.vec16() else {
        return SniOutcome::NotTls;
    };
    let mut names = Reader::new(list);
    while !names.is_empty() {
        let (Some(name_type), Some(name)) = (names.u8(), names.vec16()) else {
            return SniOutcome::NotTls;
        };
        if name_type == NAME_TYPE_HOST {
            return match normalize_host(name) {
                Some(n) => SniOutcome::Sni(n),
                None => SniOutcome::NoSni,
            };
        }
    }
    SniOutcome::NoSni
}

/// A host name as ASCII lowercase without a trailing dot, or `None` when it has bytes no
/// DNS host name has.
fn normalize_host(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return None;
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.' || *b == b'_')
    {
        return None;
    }
    Some(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

/// Builds a minimal TLS 1.2-style ClientHello record carrying `sni` (tests and benches).
pub fn build_client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let name = name.as_bytes();
        let mut list = vec![NAME_TYPE_HOST];
        list.extend_from_slice(&u16_len(name.len()));
        list.extend_from_slice(name);
        let mut ext = u16_len(list.len()).to_vec();
        ext.extend_from_slice(&list);
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&u16_len(ext.len()));
        exts.extend_from_slice(&ext);
    }
    // supported_versions-like filler extension so SNI is not always the only one.
    exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&u16_len(exts.len()));
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    let len = body.len();
    hs.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
    hs.extend_from_slice(&body);
    let mut rec = vec![RECORD_HANDSHAKE, 0x03, 0x01];
    rec.extend_from_slice(&u16_len(hs.len()));
    rec.extend_from_slice(&hs);
    rec
}

fn u16_len(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_sni() {
        let hello = build_client_hello(Some("Example.COM."));
        assert_eq!(
            parse_client_hello(&hello),
            SniOutcome::Sni("example.com".into())
        );
    }

    #[test]
    fn no_sni() {
        assert_eq!(
            parse_client_hello(&build_client_hello(None)),
            SniOutcome::NoSni
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let hello = build_client_hello(Some("a.example.org"));
        for n in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..n]),
                SniOutcome::Incomplete,
                "prefix {n}"
            );
        }
    }

    #[test]
    fn split_over_two_records() {
        let hello = build_client_hello(Some("split.example.org"));
        let hs = &hello[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 0x03, 0x01];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 0x03, 0x01]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(
            parse_client_hello(&two),
            SniOutcome::Sni("split.example.org".into())
        );
    }

    #[test]
    fn not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            SniOutcome::NotTls
        );
        assert_eq!(parse_client_hello(b"SSH-2.0-x"), SniOutcome::NotTls);
        // A handshake record that is not a ClientHello.
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x40, 0x02]),
            SniOutcome::NotTls
        );
    }

    #[test]
    fn bad_name_bytes() {
        assert_eq!(
            parse_client_hello(&build_client_hello(Some("a b.com"))),
            SniOutcome::NoSni
        );
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn never_panics_on_mutated_hello(
            idx in 0usize..120, val in any::<u8>(), cut in 0usize..200
        ) {
            let mut hello = build_client_hello(Some("mutated.example.com"));
            if let Some(b) = hello.get_mut(idx) { *b = val; }
            hello.truncate(cut.max(1));
            let _ = parse_client_hello(&hello);
        }

        #[test]
        fn roundtrip(name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){0,3}") {
            prop_assert_eq!(
                parse_client_hello(&build_client_hello(Some(&name))),
                SniOutcome::Sni(name.clone())
            );
        }
    }
}
