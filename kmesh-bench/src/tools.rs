//! Reading what wrk and iperf3 print.

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("wrk output has no {0} line:\n{1}")]
    Wrk(&'static str, String),
    #[error("iperf3 output: {0}")]
    Iperf(String),
}

/// One wrk run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkRun {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Socket errors of every kind plus non-2xx/3xx responses.
    pub errors: u64,
}

/// A wrk duration ("48.00us", "1.20ms", "2.00s") in microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    for (unit, f) in [("us", 1.0), ("ms", 1e3), ("m", 60e6), ("s", 1e6)] {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * f);
        }
    }
    None
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<WrkRun, ParseError> {
    let err = |what| ParseError::Wrk(what, text.to_string());
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p).and_then(|rest| rest.strip_prefix('%')).and_then(duration_us))
    };
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| err("Requests/sec"))?;
    let requests = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.contains(" requests in ").then(|| l.split_whitespace().next()?.parse().ok()).flatten()
        })
        .ok_or_else(|| err("requests in"))?;
    let mut errors = 0;
    for l in text.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(WrkRun {
        requests,
        rps,
        p50_us: pct("50").ok_or_else(|| err("50%"))?,
        p90_us: pct("90").ok_or_else(|| err("90%"))?,
        p99_us: pct("99").ok_or_else(|| err("99%"))?,
        errors,
    })
}

/// Received throughput of an `iperf3 -J` client run, in Gbit/s.
pub fn parse_iperf3(json: &str) -> Result<f64, ParseError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| ParseError::Iperf(e.to_string()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(ParseError::Iperf(e.to_string()));
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .map(|b| b / 1e9)
        .ok_or_else(|| ParseError::Iperf("no end.sum_received.bits_per_second".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://10.244.0.2:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    52.13us   10.05us   1.23ms   95.12%
    Req/Sec    17.50k     1.20k   18.90k    70.00%
  Latency Distribution
     50%   48.00us
     75%   53.00us
     90%   60.00us
     99%    1.10ms
  35001 requests in 2.00s, 6.21MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 5
Requests/sec:  17500.12
Transfer/sec:      3.10MB
";

    #[test]
    fn wrk_latency_output() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 35001);
        assert_eq!(r.rps, 17500.12);
        assert_eq!(r.p50_us, 48.0);
        assert_eq!(r.p90_us, 60.0);
        assert_eq!(r.p99_us, 1100.0);
        assert_eq!(r.errors, 8);
        assert!(parse_wrk("garbage").is_err());
        assert_eq!(duration_us("2.00s"), Some(2e6));
    }

    #[test]
    fn iperf3_json() {
        let j = r#"{"end": {"sum_received": {"bits_per_second": 2.5e10}}}"#;
        assert_eq!(parse_iperf3(j).unwrap(), 25.0);
        assert!(parse_iperf3(r#"{"error": "the server is busy"}"#).is_err());
    }
}
