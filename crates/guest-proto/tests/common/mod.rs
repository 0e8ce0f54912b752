//! proptest strategies shared by the integration tests.

#![allow(dead_code)]

use bytes::Bytes;
use guest_proto::{
    DirEntry, ExecRequest, Frame, GuestErrorKind, GuestMessage, HostMessage, Language, OpId,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

pub fn op_id() -> impl Strategy<Value = OpId> {
    prop_oneof![
        Just(OpId(0)),
        Just(OpId(u64::MAX)),
        any::<u64>().prop_map(OpId)
    ]
}

pub fn language() -> impl Strategy<Value = Language> {
    prop_oneof![
        Just(Language::Python),
        Just(Language::Javascript),
        Just(Language::Raw)
    ]
}

pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just(String::new()),
        // JSON escapes, control characters, quotes, astral plane.
        "[\"\\\\\u{0}-\u{1f}\u{7f}\u{2028}\u{feff}a\u{1F600}]{0,16}",
    ]
}

pub fn data() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        vec(any::<u8>(), 0..2048).prop_map(Bytes::from),
        // Bytes that look like frame headers or JSON.
        vec(
            prop_oneof![Just(0u8), Just(1), Just(b'{'), Just(0xff)],
            0..64
        )
        .prop_map(Bytes::from),
    ]
}

pub fn error_kind() -> impl Strategy<Value = GuestErrorKind> {
    prop_oneof![
        Just(GuestErrorKind::Code),
        Just(GuestErrorKind::EnvVar),
        Just(GuestErrorKind::Path),
        Just(GuestErrorKind::Io),
        Just(GuestErrorKind::Timeout),
        Just(GuestErrorKind::OutputLimit),
        Just(GuestErrorKind::Request),
        Just(GuestErrorKind::Protocol),
        Just(GuestErrorKind::Package),
        Just(GuestErrorKind::Execution),
        Just(GuestErrorKind::NoSpace),
    ]
}

pub fn host_message() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        any::<u8>().prop_map(|protocol_version| HostMessage::Ping { protocol_version }),
        (
            language(),
            text(),
            any::<u32>(),
            vec((text(), text()), 0..6)
        )
            .prop_map(|(language, code, timeout_secs, env)| {
                HostMessage::Exec(ExecRequest {
                    language,
                    code,
                    timeout_secs,
                    env,
                })
            }),
        language().prop_map(|language| HostMessage::WarmUp { language }),
        (text(), any::<bool>())
            .prop_map(|(path, executable)| HostMessage::WriteFile { path, executable }),
        data().prop_map(HostMessage::WriteChunk),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(size, sha256)| HostMessage::WriteEnd { size, sha256 }),
        text().prop_map(|path| HostMessage::ReadFile { path }),
        text().prop_map(|path| HostMessage::ListDir { path }),
        (language(), vec(text(), 0..6), any::<u32>()).prop_map(
            |(language, packages, timeout_secs)| HostMessage::InstallPackages {
                language,
                packages,
                timeout_secs,
            }
        ),
        Just(HostMessage::Cancel),
        Just(HostMessage::Shutdown),
        (any::<u64>(), resume_entropy()).prop_map(|(unix_time_ns, entropy)| {
            HostMessage::Resume {
                unix_time_ns,
                entropy,
            }
        }),
    ]
}

/// Entropy of every valid `Resume` length, the bounds included.
pub fn resume_entropy() -> impl Strategy<Value = Bytes> {
    use guest_proto::limits::{MAX_RESUME_ENTROPY_BYTES, MIN_RESUME_ENTROPY_BYTES};
    prop_oneof![
        vec(
            any::<u8>(),
            MIN_RESUME_ENTROPY_BYTES..=MAX_RESUME_ENTROPY_BYTES
        ),
        vec(
            any::<u8>(),
            MIN_RESUME_ENTROPY_BYTES..=MIN_RESUME_ENTROPY_BYTES
        ),
        vec(
            any::<u8>(),
            MAX_RESUME_ENTROPY_BYTES..=MAX_RESUME_ENTROPY_BYTES
        ),
    ]
    .prop_map(Bytes::from)
}

pub fn dir_entry() -> impl Strategy<Value = DirEntry> {
    (text(), any::<bool>(), any::<u64>()).prop_map(|(name, is_dir, size)| DirEntry {
        name,
        is_dir,
        size,
    })
}

pub fn guest_message() -> impl Strategy<Value = GuestMessage> {
    prop_oneof![
        (
            any::<u8>(),
            text(),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
            option::of(any::<u64>())
        )
            .prop_map(
                |(protocol_version, agent_version, boot_ms, setup_us, crng_reseeds)| {
                    GuestMessage::Pong {
                        protocol_version,
                        agent_version,
                        boot_ms,
                        setup_us,
                        crng_reseeds,
                    }
                }
            ),
        data().prop_map(GuestMessage::Stdout),
        data().prop_map(GuestMessage::Stderr),
        (any::<i32>(), any::<u64>(), option::of(any::<u64>())).prop_map(
            |(exit_code, execution_ms, spawn_ms)| GuestMessage::ExecDone {
                exit_code,
                execution_ms,
                spawn_ms,
            }
        ),
        language().prop_map(|language| GuestMessage::WarmUpDone { language }),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(size, sha256)| GuestMessage::FileWritten { size, sha256 }),
        data().prop_map(GuestMessage::FileChunk),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(size, sha256)| GuestMessage::FileRead { size, sha256 }),
        vec(dir_entry(), 0..6).prop_map(|entries| GuestMessage::DirListing { entries }),
        text().prop_map(|output| GuestMessage::PackagesInstalled { output }),
        (error_kind(), text()).prop_map(|(kind, message)| GuestMessage::Error { kind, message }),
        Just(GuestMessage::ShuttingDown),
        (any::<u32>(), any::<u64>()).prop_map(|(reseeded, crng_reseeds)| {
            GuestMessage::Resumed {
                reseeded,
                crng_reseeds,
            }
        }),
    ]
}

pub fn host_frame() -> impl Strategy<Value = Frame<HostMessage>> {
    (op_id(), host_message()).prop_map(|(op_id, msg)| Frame { op_id, msg })
}

pub fn guest_frame() -> impl Strategy<Value = Frame<GuestMessage>> {
    (op_id(), guest_message()).prop_map(|(op_id, msg)| Frame { op_id, msg })
}

/// Sorted, deduplicated cut points inside `0..=len`, from arbitrary indices.
pub fn cut_points(len: usize, raw: &[prop::sample::Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.iter().map(|i| i.index(len + 1)).collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// A reader that hands out at most `step` bytes per `read` call, cycling through `steps`.
pub struct Dribble<'a> {
    pub data: &'a [u8],
    pub steps: Vec<usize>,
    pub at: usize,
}

impl std::io::Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let step = if self.steps.is_empty() {
            buf.len()
        } else {
            self.steps[self.at % self.steps.len()].max(1)
        };
        self.at += 1;
        let n = step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
