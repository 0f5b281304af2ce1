//! One DNS query in, one decision out: answer it from the [`NameTable`], forward it upstream,
//! or drop it. Pure: the caller owns the sockets, the upstream and the metrics. All parsing and
//! building of the wire format is `hickory-proto`'s.

use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
    emit_message_parts,
};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder, EncodedSize};

use super::names::{Found, NameTable};

/// The largest DNS message (TCP's length prefix is 16 bits).
pub const MAX_MESSAGE: usize = 65535;
/// The UDP payload size this proxy advertises, and the most it sends over UDP (the DNS flag
/// day 2020 value: no IP fragmentation on common paths).
pub const EDNS_PAYLOAD: u16 = 1232;
/// The UDP limit without EDNS (RFC 1035).
pub const CLASSIC_UDP: usize = 512;

/// What the caller does with the query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// Send the query, unchanged, to the upstream resolver.
    Forward,
    /// Ignore the packet.
    Drop,
}

/// How a query was handled, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered from the table with at least one record of the asked type.
    Answered,
    /// The name is the mesh's but has no record of the asked type (NOERROR, empty answer, or
    /// only the CNAME).
    NoData,
    Forward,
    /// Malformed query: FORMERR reply.
    FormErr,
    Dropped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handled {
    pub action: Action,
    pub outcome: Outcome,
}

impl Handled {
    const DROP: Handled = Handled { action: Action::Drop, outcome: Outcome::Dropped };
    const FORWARD: Handled = Handled { action: Action::Forward, outcome: Outcome::Forward };
}

/// Handles one query from a pod in `client_ns` (if known). `tcp`: it came over TCP (replies
/// up to 65535 bytes); else UDP (512 bytes, or up to 1232 with EDNS). A reply too large is
/// truncated to whole records with TC set.
pub fn handle_query(packet: &[u8], table: &NameTable, client_ns: Option<&str>, tcp: bool) -> Handled {
    if packet.len() > MAX_MESSAGE {
        return Handled::DROP;
    }
    let Some(header) = read_header(packet) else { return Handled::DROP };
    if header.message_type != MessageType::Query {
        return Handled::DROP;
    }
    let Some(query) = parse(packet, &header) else { return formerr(&header.metadata, None) };
    if query.op_code != OpCode::Query {
        return Handled::FORWARD;
    }
    if query.queries.len() != 1 {
        return formerr(&query.metadata, query.edns.as_ref());
    }
    let q = &query.queries[0];
    // Classes other than IN, and EDNS versions this proxy does not speak (the upstream
    // answers BADVERS), are the upstream's.
    if q.query_class() != DNSClass::IN || query.edns.as_ref().is_some_and(|e| e.version() != 0) {
        return Handled::FORWARD;
    }
    let Some(qname) = name_text(q.name()) else { return Handled::FORWARD };
    let Some(found) = table.lookup(&qname, client_ns) else { return Handled::FORWARD };

    let qtype = q.query_type();
    let is_address = matches!(qtype, RecordType::A | RecordType::AAAA);
    if !is_address && found.in_cluster_domain {
        // The cluster's DNS knows this name too, and maybe other record types of it.
        return Handled::FORWARD;
    }
    let Some((answers, outcome)) = answers(q, &found) else { return Handled::FORWARD };

    let mut reply = response(&query.metadata, ResponseCode::NoError, query.edns.is_some());
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    reply.answers = answers;
    match encode(&reply, size_limit(&query, tcp)) {
        Some(bytes) => Handled { action: Action::Reply(bytes), outcome },
        None => Handled::FORWARD,
    }
}

/// A SERVFAIL answer to `query` (same id and opcode, question echoed, RD copied, RA set, OPT
/// if the query had one), for when the upstream fails or times out. `None` if `query` does
/// not parse or is not a query.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() > MAX_MESSAGE {
        return None;
    }
    let header = read_header(query)?;
    if header.message_type != MessageType::Query {
        return None;
    }
    let query = parse(query, &header)?;
    let mut reply = response(&query.metadata, ResponseCode::ServFail, query.edns.is_some());
    reply.add_queries(query.queries);
    reply.to_vec().ok()
}

/// The 12-byte header, if there is one.
fn read_header(packet: &[u8]) -> Option<Header> {
    if packet.len() < Header::LEN {
        return None;
    }
    Header::read(&mut BinDecoder::new(packet)).ok()
}

/// The whole message, if its header's counts are possible for its size (so that decoding
/// allocates in proportion to the input) and it decodes.
fn parse(packet: &[u8], header: &Header) -> Option<Message> {
    // A question takes at least 5 bytes (root name, type, class), a record at least 11.
    let HeaderCounts { queries, answers, authorities, additionals } = header.counts;
    let records = usize::from(answers) + usize::from(authorities) + usize::from(additionals);
    if usize::from(queries) * 5 + records * 11 > packet.len() - Header::LEN {
        return None;
    }
    Message::from_vec(packet).ok()
}

/// A FORMERR reply: header only (and the OPT if the query had a valid one).
fn formerr(query: &Metadata, edns: Option<&Edns>) -> Handled {
    match response(query, ResponseCode::FormErr, edns.is_some()).to_vec() {
        Ok(bytes) => Handled { action: Action::Reply(bytes), outcome: Outcome::FormErr },
        Err(_) => Handled::DROP,
    }
}

/// An empty response to `query`: same id and opcode, RD copied, RA set (this proxy recurses
/// through its upstream); with this proxy's OPT if `edns`.
fn response(query: &Metadata, rcode: ResponseCode, edns: bool) -> Message {
    let mut m = Message::new(query.id, MessageType::Response, query.op_code);
    m.metadata.recursion_desired = query.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    if edns {
        m.set_edns(our_edns());
    }
    m
}

/// The OPT record of every reply to an EDNS query: version 0, no DO bit, no options.
fn our_edns() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD).set_version(0).set_dnssec_ok(false);
    e
}

/// The query name as text, if every label is printable ASCII without `.` or `\` (any other
/// name is none of the table's).
fn name_text(name: &Name) -> Option<String> {
    let mut s = String::with_capacity(name.len());
    for label in name.iter() {
        if !label.iter().all(|&b| b.is_ascii_graphic() && b != b'.' && b != b'\\') {
            return None;
        }
        if !s.is_empty() {
            s.push('.');
        }
        // Checked: ASCII.
        s.push_str(std::str::from_utf8(label).ok()?);
    }
    Some(s)
}

/// The answer section for `q` and how to count it; `None` if a name cannot be built (never
/// for the table's names).
fn answers(q: &Query, found: &Found<'_>) -> Option<(Vec<Record>, Outcome)> {
    let ttl = found.addrs.ttl;
    let mut records = Vec::new();
    let owner = if found.cname {
        let target = Name::from_ascii(format!("{}.", found.name)).ok()?;
        records.push(Record::from_rdata(q.name().clone(), ttl, RData::CNAME(CNAME(target.clone()))));
        target
    } else {
        q.name().clone()
    };
    let before = records.len();
    match q.query_type() {
        RecordType::A => records
            .extend(found.addrs.v4.iter().map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip))))),
        RecordType::AAAA => records.extend(
            found.addrs.v6.iter().map(|ip| Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*ip)))),
        ),
        // The CNAME is the answer to a CNAME query.
        RecordType::CNAME if found.cname => return Some((records, Outcome::Answered)),
        _ => {}
    }
    let outcome = if records.len() > before { Outcome::Answered } else { Outcome::NoData };
    Some((records, outcome))
}

/// The most a reply to `query` may take.
fn size_limit(query: &Message, tcp: bool) -> usize {
    if tcp {
        return MAX_MESSAGE;
    }
    match &query.edns {
        Some(e) => usize::from(e.max_payload().min(EDNS_PAYLOAD)).max(CLASSIC_UDP),
        None => CLASSIC_UDP,
    }
}

/// `reply` encoded in at most `limit` bytes: whole, or with TC set and as many whole answers
/// as fit (then no authority or additional records but the OPT).
fn encode(reply: &Message, limit: usize) -> Option<Vec<u8>> {
    let full = reply.to_vec().ok()?;
    if full.len() <= limit {
        return Some(full);
    }
    let opt_len = match &reply.edns {
        Some(e) => {
            let mut buf = Vec::new();
            e.emit(&mut BinEncoder::new(&mut buf)).ok()?;
            buf.len()
        }
        None => 0,
    };
    // How many answers fit in front of the OPT: let the encoder stop at the limit.
    let fit = {
        let mut buf = Vec::with_capacity(limit);
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(u16::try_from(limit.saturating_sub(opt_len)).unwrap_or(u16::MAX));
        emit_message_parts(
            &reply.metadata,
            &mut reply.queries.iter(),
            &mut reply.answers.iter(),
            &mut std::iter::empty::<&Record>(),
            &mut std::iter::empty::<&Record>(),
            None,
            None,
            &mut enc,
        )
        .map_or(0, |h| usize::from(h.counts.answers))
    };
    let mut t = reply.clone();
    t.metadata.truncation = true;
    t.answers.truncate(fit);
    t.authorities.clear();
    t.additionals.clear();
    let bytes = t.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    t.answers.clear();
    t.to_vec().ok().filter(|b| b.len() <= limit)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::dns::names::tests::{model, svc, table, workload};
    use crate::dns::names::{HEADLESS_TTL, VIP_TTL};

    fn query_msg(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(true);
            m.set_edns(e);
        }
        m
    }

    fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        query_msg(id, name, qtype, None).to_vec().unwrap()
    }

    fn reply(h: &Handled) -> Message {
        match &h.action {
            Action::Reply(b) => Message::from_vec(b).unwrap(),
            a => panic!("not a reply: {a:?}"),
        }
    }

    fn ask(packet: &[u8], ns: Option<&str>) -> Handled {
        handle_query(packet, &table(), ns, false)
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn aaaa_records(m: &Message) -> Vec<Ipv6Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn assert_authoritative(m: &Message, id: u16, q: &Query) {
        assert_eq!(m.id, id);
        assert_eq!(m.message_type, MessageType::Response);
        assert!(m.authoritative && m.recursion_available && m.recursion_desired);
        assert!(!m.truncation);
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert_eq!(m.queries, vec![q.clone()]);
    }

    #[test]
    fn dns_message_exact_a_and_aaaa() {
        let p = query(7, "echo.default.svc.cluster.local.", RecordType::A);
        let h = ask(&p, Some("default"));
        assert_eq!(h.outcome, Outcome::Answered);
        let m = reply(&h);
        assert_authoritative(&m, 7, &Message::from_vec(&p).unwrap().queries[0]);
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(m.answers[0].ttl, VIP_TTL);
        assert_eq!(m.answers[0].name, Name::from_ascii("echo.default.svc.cluster.local.").unwrap());
        assert!(m.edns.is_none());

        let h = ask(&query(8, "echo.default.svc.cluster.local.", RecordType::AAAA), None);
        assert_eq!(h.outcome, Outcome::Answered);
        assert_eq!(aaaa_records(&reply(&h)), vec!["fd00::10".parse::<Ipv6Addr>().unwrap()]);
    }

    #[test]
    fn dns_message_ipv6_only_asked_a_is_nodata() {
        let p = query(9, "v6.default.svc.cluster.local.", RecordType::A);
        let h = ask(&p, None);
        assert_eq!(h.outcome, Outcome::NoData);
        let m = reply(&h);
        assert_authoritative(&m, 9, &Message::from_vec(&p).unwrap().queries[0]);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn dns_message_mixed_case_echoed() {
        let p = query(10, "EcHo.DEFAULT.svc.Cluster.Local.", RecordType::A);
        let m = reply(&ask(&p, None));
        // The question and the owner keep the client's case (0x20 randomization).
        assert_eq!(m.queries[0].name().to_ascii(), "EcHo.DEFAULT.svc.Cluster.Local.");
        assert!(m.answers[0].name.eq_case(m.queries[0].name()));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 96, 0, 10)]);
    }

    #[test]
    fn dns_message_headless() {
        let m = reply(&ask(&query(11, "db.default.svc.cluster.local.", RecordType::A), None));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(10, 0, 0, 11), Ipv4Addr::new(10, 0, 0, 12)]);
        assert!(m.answers.iter().all(|r| r.ttl == HEADLESS_TTL));
    }

    #[test]
    fn dns_message_wildcards() {
        let m = reply(&ask(&query(12, "web.example.com.", RecordType::A), None));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(240, 0, 0, 2)]);
        assert_eq!(m.answers[0].name, Name::from_ascii("web.example.com.").unwrap());
        let m = reply(&ask(&query(12, "api.example.com.", RecordType::A), None));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(240, 0, 0, 1)]);
        let m = reply(&ask(&query(12, "x.eu.example.com.", RecordType::A), None));
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(240, 0, 0, 3)]);
    }

    fn assert_cname(m: &Message, qname: &str, target: &str) {
        let r = &m.answers[0];
        assert_eq!(r.name, Name::from_ascii(qname).unwrap());
        match &r.data {
            RData::CNAME(c) => assert_eq!(c.0, Name::from_ascii(target).unwrap()),
            d => panic!("not a CNAME: {d:?}"),
        }
        assert!(m.answers[1..].iter().all(|r| r.name == Name::from_ascii(target).unwrap()));
    }

    #[test]
    fn dns_message_search_suffix_cname_mesh_only_host() {
        let q = "api.example.com.default.svc.cluster.local.";
        let h = ask(&query(13, q, RecordType::A), Some("default"));
        assert_eq!(h.outcome, Outcome::Answered);
        let m = reply(&h);
        assert_cname(&m, q, "api.example.com.");
        assert_eq!(a_records(&m), vec![Ipv4Addr::new(240, 0, 0, 1)]);
        assert!(m.answers.iter().all(|r| r.ttl == VIP_TTL));
        // No AAAA: NODATA holding only the CNAME.
        let h = ask(&query(13, q, RecordType::AAAA), Some("default"));
        assert_eq!(h.outcome, Outcome::NoData);
        let m = reply(&h);
        assert_eq!(m.answers.len(), 1);
        assert_cname(&m, q, "api.example.com.");
    }

    #[test]
    fn dns_message_search_suffix_cname_kubernetes_names() {
        let cases = [
            ("echo.default.default.svc.cluster.local.", "echo.default.svc.cluster.local."),
            ("echo.prod.svc.default.svc.cluster.local.", "echo.prod.svc.cluster.local."),
            ("echo.prod.default.svc.cluster.local.", "echo.prod.svc.cluster.local."),
        ];
        for (q, target) in cases {
            let m = reply(&ask(&query(14, q, RecordType::A), Some("default")));
            assert_cname(&m, q, target);
            assert_eq!(m.answers.len(), 2, "{q}");
        }
    }

    #[test]
    fn dns_message_other_types() {
        // The mesh owns api.example.com: NODATA, not the upstream's NXDOMAIN.
        let h = ask(&query(15, "api.example.com.", RecordType::TXT), None);
        assert_eq!(h.outcome, Outcome::NoData);
        let m = reply(&h);
        assert!(m.authoritative && m.answers.is_empty());
        // Through the search list: NODATA with the CNAME; CNAME asked: the CNAME.
        let q = "api.example.com.default.svc.cluster.local.";
        let h = ask(&query(15, q, RecordType::MX), Some("default"));
        assert_eq!(h.outcome, Outcome::NoData);
        assert_cname(&reply(&h), q, "api.example.com.");
        let h = ask(&query(15, q, RecordType::CNAME), Some("default"));
        assert_eq!(h.outcome, Outcome::Answered);
        assert_cname(&reply(&h), q, "api.example.com.");
        // A cluster name: the cluster's DNS may know other types.
        for t in [RecordType::TXT, RecordType::SRV, RecordType::ANY] {
            let h = ask(&query(16, "echo.default.svc.cluster.local.", t), None);
            assert_eq!(h, Handled::FORWARD);
        }
    }

    #[test]
    fn dns_message_unknown_and_not_ours_forwarded() {
        assert_eq!(ask(&query(17, "google.com.", RecordType::A), Some("default")), Handled::FORWARD);
        assert_eq!(ask(&query(17, "nope.default.svc.cluster.local.", RecordType::A), None), Handled::FORWARD);
        // Class CH.
        let mut m = query_msg(17, "echo.default.svc.cluster.local.", RecordType::A, None);
        m.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(ask(&m.to_vec().unwrap(), None), Handled::FORWARD);
        // Opcode other than QUERY.
        let mut m = query_msg(17, "echo.default.svc.cluster.local.", RecordType::A, None);
        m.metadata.op_code = OpCode::Notify;
        assert_eq!(ask(&m.to_vec().unwrap(), None), Handled::FORWARD);
        // EDNS version 1.
        let mut m = query_msg(17, "echo.default.svc.cluster.local.", RecordType::A, Some(1232));
        m.edns.as_mut().unwrap().set_version(1);
        assert_eq!(ask(&m.to_vec().unwrap(), None), Handled::FORWARD);
        // A label no table name has.
        let name = Name::from_labels([&b"a.b"[..], b"example", b"com"]).unwrap();
        let mut m = Message::new(17, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name, RecordType::A));
        assert_eq!(ask(&m.to_vec().unwrap(), None), Handled::FORWARD);
    }

    fn assert_formerr(h: &Handled, id: u16) {
        assert_eq!(h.outcome, Outcome::FormErr);
        let m = reply(h);
        assert_eq!(
            (m.id, m.response_code, m.message_type),
            (id, ResponseCode::FormErr, MessageType::Response)
        );
        assert!(m.queries.is_empty() && m.answers.is_empty());
    }

    #[test]
    fn dns_message_multiple_questions_formerr() {
        let mut m = query_msg(18, "echo.default.svc.cluster.local.", RecordType::A, None);
        m.add_query(Query::query(Name::from_ascii("api.example.com.").unwrap(), RecordType::A));
        assert_formerr(&ask(&m.to_vec().unwrap(), None), 18);
        let mut m = query_msg(19, "echo.default.svc.cluster.local.", RecordType::A, None);
        m.queries.clear();
        assert_formerr(&ask(&m.to_vec().unwrap(), None), 19);
    }

    #[test]
    fn dns_message_garbage() {
        assert_eq!(ask(&[], None), Handled::DROP);
        assert_eq!(ask(&[1, 2, 3], None), Handled::DROP);
        assert_eq!(ask(&vec![0; MAX_MESSAGE + 1], None), Handled::DROP);
        // A query header, then garbage.
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0xc0, 0xff, 0xff, 0xff]);
        assert_formerr(&ask(&p, None), 0x1234);
        // Counts the packet cannot hold.
        let p = [0xab, 0xcd, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_formerr(&ask(&p, None), 0xabcd);
        // Compression loops: a question name pointing at itself, and two names pointing at
        // each other.
        let mut p = vec![0x12, 0x35, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_formerr(&ask(&p, None), 0x1235);
        let mut p = vec![0x12, 0x36, 0x01, 0x00, 0, 2, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0xc0, 18, 0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1]);
        assert_formerr(&ask(&p, None), 0x1236);
        // Truncated question.
        let p = query(21, "echo.default.svc.cluster.local.", RecordType::A);
        assert_formerr(&ask(&p[..p.len() - 2], None), 21);
        // Two OPT records.
        let mut p = query(22, "echo.default.svc.cluster.local.", RecordType::A);
        p[11] = 2;
        p.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        assert_formerr(&ask(&p, None), 22);
        // The same garbage with QR set.
        let mut p = vec![0x12, 0x34, 0x81, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0xff];
        assert_eq!(ask(&p, None), Handled::DROP);
        p.truncate(12);
        assert_eq!(ask(&p, None), Handled::DROP);
    }

    #[test]
    fn dns_message_response_dropped() {
        let mut m = query_msg(23, "echo.default.svc.cluster.local.", RecordType::A, None);
        m.metadata.message_type = MessageType::Response;
        assert_eq!(ask(&m.to_vec().unwrap(), None), Handled::DROP);
    }

    #[test]
    fn dns_message_edns_echoed() {
        let p = query_msg(24, "echo.default.svc.cluster.local.", RecordType::A, Some(4096)).to_vec().unwrap();
        let m = reply(&ask(&p, None));
        let e = m.edns.as_ref().expect("OPT in the reply");
        assert_eq!((e.max_payload(), e.version(), e.flags().dnssec_ok), (EDNS_PAYLOAD, 0, false));
        assert!(e.options().as_ref().is_empty());
        assert_eq!(a_records(&m).len(), 1);
        // FORMERR keeps it too.
        let mut q = query_msg(25, "echo.default.svc.cluster.local.", RecordType::A, Some(1232));
        q.queries.clear();
        let m = reply(&ask(&q.to_vec().unwrap(), None));
        assert!(m.edns.is_some() && m.response_code == ResponseCode::FormErr);
    }

    fn big_table() -> NameTable {
        let s = svc("default", "big.default.svc.cluster.local", &[]);
        let workloads = (0..200u32)
            .map(|i| workload(&format!("w{i}"), &Ipv4Addr::from(0x0a00_0000 + i).to_string(), true, &s))
            .collect();
        NameTable::build(&model(vec![s], workloads), "cluster.local")
    }

    #[test]
    fn dns_message_truncation() {
        let t = big_table();
        let name = "big.default.svc.cluster.local.";
        // UDP without EDNS: at most 512 bytes, TC, whole records.
        let p = query(26, name, RecordType::A);
        let h = handle_query(&p, &t, None, false);
        let Action::Reply(b) = &h.action else { panic!() };
        assert!(b.len() <= 512, "{}", b.len());
        let m = Message::from_vec(b).unwrap();
        assert!(m.truncation);
        assert_eq!(m.queries, Message::from_vec(&p).unwrap().queries);
        assert!(!m.answers.is_empty() && m.answers.len() < 200);
        assert_eq!(h.outcome, Outcome::Answered);
        // EDNS with a large buffer: 1232 at most, the OPT kept.
        let p = query_msg(27, name, RecordType::A, Some(4096)).to_vec().unwrap();
        let Action::Reply(b) = handle_query(&p, &t, None, false).action else { panic!() };
        assert!(b.len() <= 1232 && b.len() > 1100, "{}", b.len());
        let m = Message::from_vec(&b).unwrap();
        assert!(m.truncation && m.edns.is_some());
        // EDNS with a tiny buffer: 512.
        let p = query_msg(28, name, RecordType::A, Some(100)).to_vec().unwrap();
        let Action::Reply(b) = handle_query(&p, &t, None, false).action else { panic!() };
        assert!(b.len() <= 512);
        // TCP: everything.
        let p = query(29, name, RecordType::A);
        let Action::Reply(b) = handle_query(&p, &t, None, true).action else { panic!() };
        let m = Message::from_vec(&b).unwrap();
        assert!(!m.truncation);
        assert_eq!(a_records(&m).len(), 200);
    }

    #[test]
    fn dns_message_servfail() {
        let p = query_msg(30, "google.com.", RecordType::MX, Some(1400)).to_vec().unwrap();
        let m = Message::from_vec(&servfail(&p).unwrap()).unwrap();
        assert_eq!(
            (m.id, m.response_code, m.message_type),
            (30, ResponseCode::ServFail, MessageType::Response)
        );
        assert!(m.recursion_desired && m.recursion_available && !m.authoritative);
        assert_eq!(m.queries, Message::from_vec(&p).unwrap().queries);
        assert!(m.edns.is_some());
        let p = query(31, "google.com.", RecordType::A);
        assert!(Message::from_vec(&servfail(&p).unwrap()).unwrap().edns.is_none());
        assert_eq!(servfail(&[1, 2, 3]), None);
        assert_eq!(servfail(&p[..p.len() - 1]), None);
        let mut m = Message::from_vec(&p).unwrap();
        m.metadata.message_type = MessageType::Response;
        assert_eq!(servfail(&m.to_vec().unwrap()), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn dns_message_prop_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            tcp in any::<bool>(),
            header in any::<[u8; 12]>(),
            use_header in any::<bool>(),
        ) {
            let t = table();
            let mut p = bytes;
            if use_header {
                // Mostly a plausible query header, so that parsing gets further.
                let mut h = header;
                h[2] &= 0x7f;
                h[4] = 0;
                h[5] %= 3;
                h[6] = 0;
                h[7] %= 3;
                h[8] = 0;
                h[9] %= 3;
                h[10] = 0;
                h[11] %= 3;
                p.splice(0..0, h);
            }
            for b in [Some(p.as_slice()), p.get(..12)].into_iter().flatten() {
                let h = handle_query(b, &t, Some("default"), tcp);
                if let Action::Reply(r) = &h.action {
                    prop_assert!(r.len() <= MAX_MESSAGE);
                    prop_assert!(Message::from_vec(r).is_ok());
                }
                if let Some(r) = servfail(b) {
                    prop_assert!(Message::from_vec(&r).is_ok());
                }
            }
        }

        #[test]
        fn dns_message_prop_valid_queries(
            id in any::<u16>(),
            labels in proptest::collection::vec(
                prop_oneof![
                    3 => proptest::sample::select(vec![
                        "echo", "db", "api", "web", "eu", "example", "default", "prod", "svc", "v6", "big",
                    ]).prop_map(String::from),
                    1 => "[a-z0-9_-]{1,12}",
                ],
                0..3,
            ),
            // Mostly names the table knows, or search-list expansions of them.
            suffix in proptest::sample::select(vec![
                "", "com", "example.com", "eu.example.com", "api.example.com", "cluster.local",
                "svc.cluster.local", "default.svc.cluster.local", "prod.svc.cluster.local",
                "echo.default.svc.cluster.local", "big.default.svc.cluster.local",
                "api.example.com.default.svc.cluster.local", "big.default.svc.cluster.local",
                "big.default.svc.cluster.local",
            ]),
            upper in proptest::collection::vec(any::<bool>(), 64),
            qtype in proptest::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::TXT, RecordType::MX]),
            edns in proptest::option::of(0u16..5000),
            tcp in any::<bool>(),
            rd in any::<bool>(),
            ns in proptest::option::of(proptest::sample::select(vec!["default", "prod", "other"])),
        ) {
            let mut name: String =
                labels.iter().map(String::as_str).chain(Some(suffix).filter(|s| !s.is_empty())).collect::<Vec<_>>().join(".");
            if name.is_empty() {
                name = "echo".into();
            }
            name = name.chars().zip(upper.iter().cycle()).map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c }).collect();
            name.push('.');
            let Ok(qname) = Name::from_ascii(&name) else { return Ok(()) };
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = rd;
            m.add_query(Query::query(qname, qtype));
            if let Some(payload) = edns {
                let mut e = Edns::new();
                e.set_max_payload(payload);
                m.set_edns(e);
            }
            let p = m.to_vec().unwrap();
            let t = if name.to_ascii_lowercase().starts_with("big.") { big_table() } else { table() };
            let h = handle_query(&p, &t, ns, tcp);
            match &h.action {
                Action::Reply(r) => {
                    let limit = if tcp {
                        MAX_MESSAGE
                    } else {
                        edns.map_or(512, |e| usize::from(e.clamp(512, 1232)))
                    };
                    prop_assert!(r.len() <= limit, "{} > {}", r.len(), limit);
                    let reply = Message::from_vec(r).unwrap();
                    prop_assert_eq!(reply.id, id);
                    prop_assert_eq!(reply.recursion_desired, rd);
                    prop_assert_eq!(&reply.queries, &m.queries);
                    prop_assert!(reply.queries[0].name().eq_case(m.queries[0].name()));
                    prop_assert_eq!(reply.edns.is_some(), edns.is_some());
                    prop_assert!(matches!(h.outcome, Outcome::Answered | Outcome::NoData));
                }
                Action::Forward => prop_assert_eq!(h.outcome, Outcome::Forward),
                Action::Drop => prop_assert!(false, "a valid query dropped"),
            }
        }
    }
}
