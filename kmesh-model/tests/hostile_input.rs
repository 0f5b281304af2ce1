//! Every decoder of input from the network or a file, fed hostile input: it must return an
//! error, never panic, and never build something unbounded from a small input.
use kmesh_model::{config, xds};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/example.yaml");

fn example_resources() -> Vec<Vec<u8>> {
    let m = config::parse(EXAMPLE).unwrap();
    let mut out: Vec<Vec<u8>> = m
        .workloads
        .values()
        .map(|w| xds::encode_address(&xds::AddressResource::Workload((**w).clone())))
        .collect();
    out.extend(
        m.services.values().map(|s| xds::encode_address(&xds::AddressResource::Service((**s).clone()))),
    );
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = config::parse(&text);
    }

    #[test]
    fn config_parse_never_panics_on_mutated_valid_yaml(pos in 0usize..EXAMPLE.len(), len in 0usize..40, junk in "[ -~\n]{0,20}") {
        let mut s = EXAMPLE.to_string();
        let start = (0..=pos).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len).min(s.len());
        let end = (end..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
        s.replace_range(start..end, &junk);
        if let Ok(m) = config::parse(&s) {
            // Whatever is accepted is valid: every address parsed, every key well formed.
            for (k, svc) in &m.services {
                prop_assert_eq!(k, &svc.key());
            }
        }
    }

    #[test]
    fn address_decoding_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = xds::decode_address(&bytes);
        let _ = xds::decode_authorization(&bytes);
    }

    #[test]
    fn address_decoding_never_panics_on_mutated_resources(which in 0usize..3, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let all = example_resources();
        let mut b = all[which % all.len()].clone();
        for (i, v) in flips {
            let n = b.len();
            if n > 0 {
                b[i % n] ^= v;
            }
        }
        let n = b.len();
        b.truncate(cut % (n + 1));
        let _ = xds::decode_address(&b);
        let _ = xds::decode_authorization(&b);
    }
}

#[test]
fn a_huge_declared_length_is_an_error_not_an_allocation() {
    // Field 1 (workload), length-delimited, declaring 2^62 bytes that are not there.
    let bytes = [0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40];
    assert!(xds::decode_address(&bytes).is_err());
}
