//! The DNS server on the gateway: filters names through the policy and resolves allowed
//! ones upstream, remembering the answers for the TCP and TLS checks.

use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::gateway::VmCtx;
use crate::policy::{DenyReason, Mode, normalize_name};

/// Most A records put in one answer.
const MAX_ANSWERS: usize = 16;
/// Upper bound on one upstream resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one DNS query message; `None` when nothing should be sent back (the bytes are
/// not a query at all).
pub(crate) async fn answer(ctx: &VmCtx, query: &[u8]) -> Option<Vec<u8>> {
    let req = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            ctx.deny_dns(None, DenyReason::BadQuery);
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            // Never answer something that already claims to be a response.
            if query.get(2).is_some_and(|b| b & 0x80 != 0) {
                return None;
            }
            return encode(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
        }
    };
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = req.metadata.id;
    let mut resp = Message::response(id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = req.queries.clone();
    if req.metadata.op_code != OpCode::Query {
        ctx.deny_dns(None, DenyReason::BadQuery);
        resp.metadata.response_code = ResponseCode::NotImp;
        return encode(resp);
    }
    let [q] = req.queries.as_slice() else {
        ctx.deny_dns(None, DenyReason::BadQuery);
        resp.metadata.response_code = ResponseCode::FormErr;
        return encode(resp);
    };
    let Some(name) = normalize_name(&q.name.to_ascii()) else {
        ctx.deny_dns(None, DenyReason::BadQuery);
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(resp);
    };
    match &ctx.mode {
        Mode::PortsOnly => {
            ctx.deny_dns(Some(&name), DenyReason::PortsOnly);
            resp.metadata.response_code = ResponseCode::Refused;
            return encode(resp);
        }
        Mode::Allowlist(list) if !list.allows(&name) => {
            ctx.deny_dns(Some(&name), DenyReason::NameNotAllowed);
            resp.metadata.response_code = ResponseCode::NXDomain;
            return encode(resp);
        }
        _ => {}
    }
    if q.query_class != DNSClass::IN {
        ctx.deny_dns(Some(&name), DenyReason::BadQuery);
        resp.metadata.response_code = ResponseCode::Refused;
        return encode(resp);
    }
    // Resolve even for non-A types, so a name that does not exist says so.
    let (addrs, ttl) = match resolve(ctx, &name).await {
        Ok(found) => found,
        Err(code) => {
            resp.metadata.response_code = code;
            return encode(resp);
        }
    };
    ctx.allow_dns(&name, q.query_type, &addrs);
    if q.query_type == RecordType::A {
        let ttl_s = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).max(1);
        for ip in addrs.into_iter().take(MAX_ANSWERS) {
            resp.answers
                .push(Record::from_rdata(q.name.clone(), ttl_s, RData::A(A(ip))));
        }
    }
    // AAAA and other types: NOERROR without records (the VM network is IPv4-only).
    encode(resp)
}

/// Addresses of an allowed name, from the per-VM cache or upstream.
async fn resolve(ctx: &VmCtx, name: &str) -> Result<(Vec<Ipv4Addr>, Duration), ResponseCode> {
    if let Some(hit) = ctx.cache().fresh(name) {
        return Ok(hit);
    }
    let looked_up =
        tokio::time::timeout(RESOLVE_TIMEOUT, ctx.config.resolver.lookup_ipv4(name)).await;
    match looked_up {
        Ok(Ok(mut addrs)) => {
            // DNS rebinding: a name may resolve anywhere, but the guest only ever learns
            // (and may then connect to) addresses it is allowed to reach.
            addrs.retain(|ip| match ctx.addresses.check(*ip) {
                Ok(()) => true,
                Err(_) => {
                    ctx.deny_dns(Some(name), DenyReason::RebindingAnswer);
                    false
                }
            });
            ctx.cache().insert(
                name,
                addrs.clone(),
                ctx.config.dns_ttl,
                ctx.config.dns_remember,
            );
            Ok((addrs, ctx.config.dns_ttl))
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(vm_id = %ctx.vm_id, name, "dns: upstream says no such name");
            Err(ResponseCode::NXDomain)
        }
        Ok(Err(e)) => {
            ctx.stats.fail("dns_upstream");
            tracing::warn!(vm_id = %ctx.vm_id, name, error = %e, "dns: upstream failed");
            Err(ResponseCode::ServFail)
        }
        Err(_) => {
            ctx.stats.fail("dns_upstream");
            tracing::warn!(vm_id = %ctx.vm_id, name, "dns: upstream timed out");
            Err(ResponseCode::ServFail)
        }
    }
}

fn encode(msg: Message) -> Option<Vec<u8>> {
    match msg.to_vec() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "dns: cannot encode answer");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;
    use sandbox_core::VmId;

    use super::*;
    use crate::policy::Allowlist;
    use crate::{ProxyConfig, StaticResolver};

    fn ctx(mode: Mode) -> VmCtx {
        let resolver = StaticResolver::new()
            .with("example.com", &[Ipv4Addr::new(203, 0, 113, 1)])
            .with("www.example.com", &[Ipv4Addr::new(203, 0, 113, 2)])
            .with(
                "rebind.example.com",
                &[
                    Ipv4Addr::new(10, 0, 0, 1),
                    Ipv4Addr::new(169, 254, 169, 254),
                    Ipv4Addr::new(127, 0, 0, 1),
                    Ipv4Addr::new(100, 100, 100, 200),
                    Ipv4Addr::new(203, 0, 113, 9),
                ],
            )
            .with("intranet.example.com", &[Ipv4Addr::new(10, 1, 2, 3)]);
        let cfg = ProxyConfig {
            resolver: Arc::new(resolver),
            ..ProxyConfig::default()
        };
        VmCtx::new(VmId::new(), mode, Arc::new(cfg))
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn answers_and_remembers() {
        let c = ctx(Mode::Allowlist(Allowlist::new(&["example.com"])));
        let rt = rt();
        let r = Message::from_vec(&rt.block_on(answer(&c, &query("www.example.com"))).unwrap())
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert!(
            c.cache()
                .resolved_to("www.example.com", Ipv4Addr::new(203, 0, 113, 2))
        );
        let r = Message::from_vec(&rt.block_on(answer(&c, &query("evilexample.com"))).unwrap())
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(
            c.cache()
                .names_for(Ipv4Addr::new(203, 0, 113, 1))
                .is_empty()
        );
    }

    fn a_records(r: &Message) -> Vec<Ipv4Addr> {
        r.answers
            .iter()
            .filter_map(|rec| match rec.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    /// DNS rebinding: answers pointing into private, shared, link-local or loopback
    /// ranges are dropped from the answer and never become connectable, in allowlist and
    /// open mode alike.
    #[test]
    fn answers_into_special_ranges_are_dropped() {
        let rt = rt();
        for mode in [
            Mode::Allowlist(Allowlist::new(&["example.com"])),
            Mode::Open,
        ] {
            let c = ctx(mode);
            let r = Message::from_vec(
                &rt.block_on(answer(&c, &query("rebind.example.com")))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(a_records(&r), vec![Ipv4Addr::new(203, 0, 113, 9)]);
            assert_eq!(c.stats.snapshot().denied(DenyReason::RebindingAnswer), 4);
            for ip in [
                "10.0.0.1",
                "169.254.169.254",
                "127.0.0.1",
                "100.100.100.200",
            ] {
                assert!(c.cache().names_for(ip.parse().unwrap()).is_empty(), "{ip}");
            }
            // Nothing left: an empty answer, and nothing remembered.
            let r = Message::from_vec(
                &rt.block_on(answer(&c, &query("intranet.example.com")))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(a_records(&r).is_empty());
        }
        // Unless the operator allowed that range.
        let cfg = ProxyConfig {
            resolver: Arc::new(
                StaticResolver::new().with("intranet.example.com", &[Ipv4Addr::new(10, 1, 2, 3)]),
            ),
            allowed_ranges: vec!["10.1.0.0/16".parse().unwrap()],
            ..ProxyConfig::default()
        };
        let c = VmCtx::new(VmId::new(), Mode::Open, Arc::new(cfg));
        let r = Message::from_vec(
            &rt.block_on(answer(&c, &query("intranet.example.com")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 1, 2, 3)]);
    }

    /// Prints the time to answer a cached allowed name (target: well under 1 ms).
    #[test]
    fn cached_answer_latency() {
        let c = ctx(Mode::Allowlist(Allowlist::new(&["example.com"])));
        let rt = rt();
        let q = query("example.com");
        rt.block_on(answer(&c, &q)).unwrap();
        let n = 20_000u32;
        let t = Instant::now();
        for _ in 0..n {
            rt.block_on(answer(&c, &q)).unwrap();
        }
        let per = t.elapsed() / n;
        println!("dns cached answer at the proxy: {per:?} per query");
        assert!(per < Duration::from_millis(1), "{per:?}");
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let rt = rt();
            for mode in [Mode::PortsOnly, Mode::Allowlist(Allowlist::new(&["example.com"]))] {
                let c = ctx(mode);
                let _ = rt.block_on(answer(&c, &data));
            }
        }

        #[test]
        fn never_panics_on_mutated_query(idx in 0usize..40, val in any::<u8>(), cut in 0usize..60) {
            let mut q = query("www.example.com");
            if let Some(b) = q.get_mut(idx) { *b = val; }
            q.truncate(cut.max(2));
            let c = ctx(Mode::Allowlist(Allowlist::new(&["example.com"])));
            let _ = rt().block_on(answer(&c, &q));
        }
    }
}
