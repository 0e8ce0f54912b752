//! Payload encoding of each message: raw bytes for data messages, JSON for the rest.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::limits::validate_resume_entropy;
use crate::message::{DirEntry, GuestErrorKind, GuestMessage, HostMessage};
use crate::tags::{guest, host};
use crate::{Language, ProtoError};

/// A message that can travel in a frame: a stable type tag plus a payload encoding.
///
/// Implemented by [`HostMessage`] and [`GuestMessage`]. Frames are built and parsed by
/// [`encode_frame`](crate::encode_frame) and [`decode_frame`](crate::decode_frame); this
/// trait only covers the part after the header.
pub trait WireMessage: Sized {
    /// The message's type tag (see [`tags`](crate::tags)).
    fn tag(&self) -> u8;

    /// Appends the payload (everything after the op id) to `dst`.
    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), ProtoError>;

    /// Parses a payload for `tag`. Unknown tags are [`ProtoError::UnknownType`]; payloads
    /// that do not fit the message are [`ProtoError::Malformed`].
    fn decode_payload(tag: u8, payload: Bytes) -> Result<Self, ProtoError>;

    /// The exact payload length when it is known without encoding (data messages), so an
    /// oversized frame is refused before anything is copied. `None` by default.
    fn known_payload_len(&self) -> Option<usize> {
        None
    }
}

/// serde adapter: `[u8; 32]` as 64 lowercase hex digits.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::Sha256Digest(*bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        crate::digest::parse_hex32(&text)
            .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// Lowercase hex of `bytes`.
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// Bytes from hex digits (either case); `None` for an odd length or a non-hex digit.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let hi = char::from(pair[0]).to_digit(16)?;
            let lo = char::from(pair[1]).to_digit(16)?;
            u8::try_from((hi << 4) | lo).ok()
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody<'a> {
    unix_time_ns: u64,
    /// Lowercase hex on the wire.
    entropy: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumedBody {
    reseeded: u32,
    crng_reseeds: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionBody {
    protocol_version: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanguageBody {
    language: Language,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteFileBody<'a> {
    path: Cow<'a, str>,
    executable: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathBody<'a> {
    path: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestBody {
    size: u64,
    #[serde(with = "hex32")]
    sha256: [u8; 32],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallBody<'a> {
    language: Language,
    packages: Cow<'a, [String]>,
    timeout_secs: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PongBody<'a> {
    protocol_version: u8,
    agent_version: Cow<'a, str>,
    boot_ms: Option<u64>,
    #[serde(default)]
    setup_us: Option<u64>,
    #[serde(default)]
    crng_reseeds: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecDoneBody {
    exit_code: i32,
    execution_ms: u64,
    spawn_ms: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirListingBody<'a> {
    entries: Cow<'a, [DirEntry]>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputBody<'a> {
    output: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorBody<'a> {
    kind: GuestErrorKind,
    message: Cow<'a, str>,
}

fn malformed(tag: u8, reason: impl ToString) -> ProtoError {
    ProtoError::Malformed {
        tag,
        reason: reason.to_string(),
    }
}

fn put_json<T: Serialize>(dst: &mut BytesMut, tag: u8, body: &T) -> Result<(), ProtoError> {
    serde_json::to_writer(dst.writer(), body).map_err(|e| malformed(tag, e))
}

fn get_json<'a, T: Deserialize<'a>>(tag: u8, payload: &'a [u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(payload).map_err(|e| malformed(tag, e))
}

fn expect_empty(tag: u8, payload: &[u8]) -> Result<(), ProtoError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(malformed(
            tag,
            format!("expected an empty payload, got {} bytes", payload.len()),
        ))
    }
}

impl WireMessage for HostMessage {
    fn tag(&self) -> u8 {
        match self {
            Self::Ping { .. } => host::PING,
            Self::Exec(_) => host::EXEC,
            Self::WarmUp { .. } => host::WARM_UP,
            Self::WriteFile { .. } => host::WRITE_FILE,
            Self::WriteChunk(_) => host::WRITE_CHUNK,
            Self::WriteEnd { .. } => host::WRITE_END,
            Self::ReadFile { .. } => host::READ_FILE,
            Self::ListDir { .. } => host::LIST_DIR,
            Self::InstallPackages { .. } => host::INSTALL_PACKAGES,
            Self::Cancel => host::CANCEL,
            Self::Shutdown => host::SHUTDOWN,
            Self::Resume { .. } => host::RESUME,
        }
    }

    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let tag = self.tag();
        match self {
            Self::Ping { protocol_version } => put_json(
                dst,
                tag,
                &VersionBody {
                    protocol_version: *protocol_version,
                },
            ),
            Self::Exec(request) => put_json(dst, tag, request),
            Self::WarmUp { language } => put_json(
                dst,
                tag,
                &LanguageBody {
                    language: *language,
                },
            ),
            Self::WriteFile { path, executable } => put_json(
                dst,
                tag,
                &WriteFileBody {
                    path: Cow::Borrowed(path),
                    executable: *executable,
                },
            ),
            Self::WriteChunk(data) => {
                dst.extend_from_slice(data);
                Ok(())
            }
            Self::WriteEnd { size, sha256 } => put_json(
                dst,
                tag,
                &DigestBody {
                    size: *size,
                    sha256: *sha256,
                },
            ),
            Self::ReadFile { path } | Self::ListDir { path } => put_json(
                dst,
                tag,
                &PathBody {
                    path: Cow::Borrowed(path),
                },
            ),
            Self::InstallPackages {
                language,
                packages,
                timeout_secs,
            } => put_json(
                dst,
                tag,
                &InstallBody {
                    language: *language,
                    packages: Cow::Borrowed(packages),
                    timeout_secs: *timeout_secs,
                },
            ),
            Self::Cancel | Self::Shutdown => Ok(()),
            Self::Resume {
                unix_time_ns,
                entropy,
            } => {
                validate_resume_entropy(entropy).map_err(|e| malformed(tag, e))?;
                put_json(
                    dst,
                    tag,
                    &ResumeBody {
                        unix_time_ns: *unix_time_ns,
                        entropy: Cow::Owned(to_hex(entropy)),
                    },
                )
            }
        }
    }

    fn decode_payload(tag: u8, payload: Bytes) -> Result<Self, ProtoError> {
        Ok(match tag {
            host::PING => {
                let body: VersionBody = get_json(tag, &payload)?;
                Self::Ping {
                    protocol_version: body.protocol_version,
                }
            }
            host::EXEC => Self::Exec(get_json(tag, &payload)?),
            host::WARM_UP => {
                let body: LanguageBody = get_json(tag, &payload)?;
                Self::WarmUp {
                    language: body.language,
                }
            }
            host::WRITE_FILE => {
                let body: WriteFileBody = get_json(tag, &payload)?;
                Self::WriteFile {
                    path: body.path.into_owned(),
                    executable: body.executable,
                }
            }
            host::WRITE_CHUNK => Self::WriteChunk(payload),
            host::WRITE_END => {
                let body: DigestBody = get_json(tag, &payload)?;
                Self::WriteEnd {
                    size: body.size,
                    sha256: body.sha256,
                }
            }
            host::READ_FILE => {
                let body: PathBody = get_json(tag, &payload)?;
                Self::ReadFile {
                    path: body.path.into_owned(),
                }
            }
            host::LIST_DIR => {
                let body: PathBody = get_json(tag, &payload)?;
                Self::ListDir {
                    path: body.path.into_owned(),
                }
            }
            host::INSTALL_PACKAGES => {
                let body: InstallBody = get_json(tag, &payload)?;
                Self::InstallPackages {
                    language: body.language,
                    packages: body.packages.into_owned(),
                    timeout_secs: body.timeout_secs,
                }
            }
            host::CANCEL => {
                expect_empty(tag, &payload)?;
                Self::Cancel
            }
            host::SHUTDOWN => {
                expect_empty(tag, &payload)?;
                Self::Shutdown
            }
            host::RESUME => {
                let body: ResumeBody = get_json(tag, &payload)?;
                let entropy = from_hex(&body.entropy)
                    .ok_or_else(|| malformed(tag, "entropy is not hex digits"))?;
                validate_resume_entropy(&entropy).map_err(|e| malformed(tag, e))?;
                Self::Resume {
                    unix_time_ns: body.unix_time_ns,
                    entropy: Bytes::from(entropy),
                }
            }
            other => return Err(ProtoError::UnknownType(other)),
        })
    }

    fn known_payload_len(&self) -> Option<usize> {
        match self {
            Self::WriteChunk(data) => Some(data.len()),
            Self::Cancel | Self::Shutdown => Some(0),
            _ => None,
        }
    }
}

impl WireMessage for GuestMessage {
    fn tag(&self) -> u8 {
        match self {
            Self::Pong { .. } => guest::PONG,
            Self::Stdout(_) => guest::STDOUT,
            Self::Stderr(_) => guest::STDERR,
            Self::ExecDone { .. } => guest::EXEC_DONE,
            Self::WarmUpDone { .. } => guest::WARM_UP_DONE,
            Self::FileWritten { .. } => guest::FILE_WRITTEN,
            Self::FileChunk(_) => guest::FILE_CHUNK,
            Self::FileRead { .. } => guest::FILE_READ,
            Self::DirListing { .. } => guest::DIR_LISTING,
            Self::PackagesInstalled { .. } => guest::PACKAGES_INSTALLED,
            Self::Error { .. } => guest::ERROR,
            Self::ShuttingDown => guest::SHUTTING_DOWN,
            Self::Resumed { .. } => guest::RESUMED,
        }
    }

    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let tag = self.tag();
        match self {
            Self::Pong {
                protocol_version,
                agent_version,
                boot_ms,
                setup_us,
                crng_reseeds,
            } => put_json(
                dst,
                tag,
                &PongBody {
                    protocol_version: *protocol_version,
                    agent_version: Cow::Borrowed(agent_version),
                    boot_ms: *boot_ms,
                    setup_us: *setup_us,
                    crng_reseeds: *crng_reseeds,
                },
            ),
            Self::Stdout(data) | Self::Stderr(data) | Self::FileChunk(data) => {
                dst.extend_from_slice(data);
                Ok(())
            }
            Self::ExecDone {
                exit_code,
                execution_ms,
                spawn_ms,
            } => put_json(
                dst,
                tag,
                &ExecDoneBody {
                    exit_code: *exit_code,
                    execution_ms: *execution_ms,
                    spawn_ms: *spawn_ms,
                },
            ),
            Self::WarmUpDone { language } => put_json(
                dst,
                tag,
                &LanguageBody {
                    language: *language,
                },
            ),
            Self::FileWritten { size, sha256 } | Self::FileRead { size, sha256 } => put_json(
                dst,
                tag,
                &DigestBody {
                    size: *size,
                    sha256: *sha256,
                },
            ),
            Self::DirListing { entries } => put_json(
                dst,
                tag,
                &DirListingBody {
                    entries: Cow::Borrowed(entries),
                },
            ),
            Self::PackagesInstalled { output } => put_json(
                dst,
                tag,
                &OutputBody {
                    output: Cow::Borrowed(output),
                },
            ),
            Self::Error { kind, message } => put_json(
                dst,
                tag,
                &ErrorBody {
                    kind: *kind,
                    message: Cow::Borrowed(message),
                },
            ),
            Self::ShuttingDown => Ok(()),
            Self::Resumed {
                reseeded,
                crng_reseeds,
            } => put_json(
                dst,
                tag,
                &ResumedBody {
                    reseeded: *reseeded,
                    crng_reseeds: *crng_reseeds,
                },
            ),
        }
    }

    fn decode_payload(tag: u8, payload: Bytes) -> Result<Self, ProtoError> {
        Ok(match tag {
            guest::PONG => {
                let body: PongBody = get_json(tag, &payload)?;
                Self::Pong {
                    protocol_version: body.protocol_version,
                    agent_version: body.agent_version.into_owned(),
                    boot_ms: body.boot_ms,
                    setup_us: body.setup_us,
                    crng_reseeds: body.crng_reseeds,
                }
            }
            guest::STDOUT => Self::Stdout(payload),
            guest::STDERR => Self::Stderr(payload),
            guest::EXEC_DONE => {
                let body: ExecDoneBody = get_json(tag, &payload)?;
                Self::ExecDone {
                    exit_code: body.exit_code,
                    execution_ms: body.execution_ms,
                    spawn_ms: body.spawn_ms,
                }
            }
            guest::WARM_UP_DONE => {
                let body: LanguageBody = get_json(tag, &payload)?;
                Self::WarmUpDone {
                    language: body.language,
                }
            }
            guest::FILE_WRITTEN => {
                let body: DigestBody = get_json(tag, &payload)?;
                Self::FileWritten {
                    size: body.size,
                    sha256: body.sha256,
                }
            }
            guest::FILE_CHUNK => Self::FileChunk(payload),
            guest::FILE_READ => {
                let body: DigestBody = get_json(tag, &payload)?;
                Self::FileRead {
                    size: body.size,
                    sha256: body.sha256,
                }
            }
            guest::DIR_LISTING => {
                let body: DirListingBody = get_json(tag, &payload)?;
                Self::DirListing {
                    entries: body.entries.into_owned(),
                }
            }
            guest::PACKAGES_INSTALLED => {
                let body: OutputBody = get_json(tag, &payload)?;
                Self::PackagesInstalled {
                    output: body.output.into_owned(),
                }
            }
            guest::ERROR => {
                let body: ErrorBody = get_json(tag, &payload)?;
                Self::Error {
                    kind: body.kind,
                    message: body.message.into_owned(),
                }
            }
            guest::SHUTTING_DOWN => {
                expect_empty(tag, &payload)?;
                Self::ShuttingDown
            }
            guest::RESUMED => {
                let body: ResumedBody = get_json(tag, &payload)?;
                Self::Resumed {
                    reseeded: body.reseeded,
                    crng_reseeds: body.crng_reseeds,
                }
            }
            other => return Err(ProtoError::UnknownType(other)),
        })
    }

    fn known_payload_len(&self) -> Option<usize> {
        match self {
            Self::Stdout(data) | Self::Stderr(data) | Self::FileChunk(data) => Some(data.len()),
            Self::ShuttingDown => Some(0),
            _ => None,
        }
    }
}
