//! The tables of consistent-hash load balancing, built ahead of time so that the kernel only
//! hashes the client and looks up one slot: a hash ring (Envoy's `RING_HASH`) or a Maglev
//! lookup table (`MAGLEV`). Pure and deterministic: the same endpoints give the same table on
//! every node and after every restart, so a client keeps its endpoint across them.

/// One endpoint of a level: its backend id, its weight, and the name it is hashed by (stable
/// across compilations: the workload's uid).
pub struct Member<'a> {
    pub backend_id: u32,
    pub weight: u32,
    pub name: &'a str,
}

/// A stable 64-bit hash (FNV-1a with a finalizer): table layouts must not change with the
/// compiler's version, as `std`'s hasher may.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The largest ring or table built (entries per level): each is one slot in `ENDPOINTS`.
pub const MAX_ENTRIES: u32 = 65_537;

/// A ring, as (backend id, point) sorted by point. Each endpoint has a fixed number of points
/// per unit of weight (weights reduced by their common divisor): `size / 8`, so 128 for the
/// default 1,024, enough for an even spread. Unlike Envoy's ring, which keeps its size and
/// rescales every endpoint's share when one goes, an endpoint's points do not depend on the
/// others: removing one moves only the clients it had. Only a ring over [`MAX_ENTRIES`]
/// points is scaled down.
pub fn ring(members: &[Member<'_>], size: u32) -> Vec<(u32, u32)> {
    let g = members.iter().map(|m| u64::from(m.weight.max(1))).fold(0, gcd).max(1);
    let weights: Vec<u64> = members.iter().map(|m| u64::from(m.weight.max(1)) / g).collect();
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let per = u64::from(size / 8).max(1);
    let max = u64::from(MAX_ENTRIES);
    let mut points = Vec::new();
    for (m, w) in members.iter().zip(weights) {
        let n = if per * total <= max { per * w } else { (w * max / total).max(1) };
        for i in 0..n {
            let h = hash64(format!("{}_{i}", m.name).as_bytes());
            points.push(((h >> 32) as u32, m.backend_id));
        }
    }
    points.sort_unstable();
    points.dedup_by_key(|p| p.0);
    points.into_iter().map(|(p, b)| (b, p)).collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A Maglev lookup table of `size` entries (a prime), each endpoint taking its share by
/// weight: every endpoint walks its own permutation of the table and claims the next free
/// entry in turn, heavier ones more often.
pub fn maglev(members: &[Member<'_>], size: u32) -> Vec<u32> {
    let m = u64::from(size.clamp(2, MAX_ENTRIES));
    if members.is_empty() {
        return Vec::new();
    }
    let perm: Vec<(u64, u64)> = members
        .iter()
        .map(|e| {
            let offset = hash64(format!("{}#offset", e.name).as_bytes()) % m;
            let skip = hash64(format!("{}#skip", e.name).as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_w = members.iter().map(|e| e.weight.max(1)).max().unwrap_or(1) as f64;
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0f64; members.len()];
    let mut table: Vec<Option<u32>> = vec![None; m as usize];
    let mut filled = 0u64;
    while filled < m {
        for (i, e) in members.iter().enumerate() {
            credit[i] += f64::from(e.weight.max(1)) / max_w;
            if credit[i] < 1.0 {
                continue;
            }
            credit[i] -= 1.0;
            let (offset, skip) = perm[i];
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c].is_none() {
                    table[c] = Some(e.backend_id);
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table.into_iter().map(|b| b.expect("every entry filled")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[String]) -> Vec<Member<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Member { backend_id: i as u32 + 1, weight: 1, name: n })
            .collect()
    }

    fn ring_pick(r: &[(u32, u32)], h: u32) -> u32 {
        r.iter().find(|(_, p)| *p > h).unwrap_or(&r[0]).0
    }

    /// Removing one endpoint of ten moves about a tenth of the keys, and only keys it had.
    #[test]
    fn removing_an_endpoint_moves_only_its_keys() {
        let names: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:8080")).collect();
        let all = members(&names);
        let less: Vec<Member<'_>> =
            all.iter().filter(|m| m.backend_id != 4).map(|m| Member { ..*m }).collect();
        let keys: Vec<u32> = (0..20_000u64).map(kmesh_common::client_hash).collect();
        let (r1, r2) = (ring(&all, 1024), ring(&less, 1024));
        let (m1, m2) = (maglev(&all, 4099), maglev(&less, 4099));
        for (name, before, after) in [
            (
                "ring",
                keys.iter().map(|h| ring_pick(&r1, *h)).collect::<Vec<_>>(),
                keys.iter().map(|h| ring_pick(&r2, *h)).collect::<Vec<_>>(),
            ),
            (
                "maglev",
                keys.iter().map(|h| m1[(*h % 4099) as usize]).collect(),
                keys.iter().map(|h| m2[(*h % 4099) as usize]).collect(),
            ),
        ] {
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let had = before.iter().filter(|b| **b == 4).count();
            let moved_others = before.iter().zip(&after).filter(|(a, b)| a != b && **a != 4).count();
            let share = moved as f64 / keys.len() as f64;
            let others = moved_others as f64 / keys.len() as f64;
            eprintln!("{name}: {share:.3} of keys moved, {others:.3} from endpoints that stayed");
            assert!(moved >= had, "{name}: every key of the removed endpoint moves");
            // Maglev moves a few others (about 1% at this size); the ring none.
            let (max_share, max_others) = if name == "maglev" { (0.13, 0.02) } else { (0.13, 0.0) };
            assert!((0.07..max_share).contains(&share), "{name}: {share}");
            assert!(others <= max_others, "{name}: {others}");
        }
    }

    #[test]
    fn shares_follow_weights() {
        let names = ["a".to_string(), "b".to_string()];
        let ms = [
            Member { backend_id: 1, weight: 1, name: &names[0] },
            Member { backend_id: 2, weight: 3, name: &names[1] },
        ];
        let t = maglev(&ms, 4099);
        let b = t.iter().filter(|x| **x == 2).count() as f64 / t.len() as f64;
        assert!((0.72..0.78).contains(&b), "{b}");
        let r = ring(&ms, 1024);
        assert!(r.windows(2).all(|w| w[0].1 < w[1].1), "sorted by point");
        let b = r.iter().filter(|x| x.0 == 2).count() as f64 / r.len() as f64;
        assert!((0.72..0.78).contains(&b), "{b}");
        // Deterministic.
        assert_eq!(t, maglev(&ms, 4099));
    }
}
