//! `kmesh-cni`: a CNI plugin chained after the node's primary plugin. On ADD of a Kubernetes
//! pod it hands the pod's network namespace to the kmesh daemon over a local Unix socket and
//! waits for its answer, so a pod in the mesh is enrolled before its containers start; the
//! primary plugin's result is passed through unchanged. It never talks to the API server (the
//! daemon decides). Fails closed: if the daemon cannot be reached the ADD fails with CNI error
//! 11 (try again later) and the kubelet retries the sandbox; namespaces listed in
//! `exclude_namespaces` (the daemon's own, kube-system) are passed through without asking.
//! DEL tells the daemon on a best-effort basis and always succeeds (the daemon also drops
//! namespaces that disappear).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kmesh_cni::{DEFAULT_SOCKET, Request, Response};
use serde_json::{Value, json};

const SUPPORTED: [&str; 7] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "0.1.0"];

/// CNI error codes (SPEC.md, "Error").
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const BAD_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
}

struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Failure {
    Failure { code, msg: msg.into(), details: details.into() }
}

/// `CNI_ARGS`: `K=V;K=V`.
fn cni_args(s: &str) -> Vec<(String, String)> {
    s.split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn ask(socket: &str, req: &Request, timeout: Duration) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn run(command: &str, stdin: &str) -> Result<Option<Value>, Failure> {
    if command == "VERSION" {
        let v = serde_json::from_str::<Value>(stdin)
            .ok()
            .and_then(|c| c.get("cniVersion").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(json!({ "cniVersion": v, "supportedVersions": SUPPORTED })));
    }
    let conf: Value = serde_json::from_str(stdin)
        .map_err(|e| fail(code::DECODE, "failed to decode the network configuration", e.to_string()))?;
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| fail(code::INVALID_CONFIG, "the network configuration has no cniVersion", ""))?;
    if !SUPPORTED.contains(&version) {
        return Err(fail(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {version} is not supported"),
            SUPPORTED.join(", "),
        ));
    }
    let socket = conf.get("socket").and_then(Value::as_str).unwrap_or(DEFAULT_SOCKET).to_string();
    let timeout = Duration::from_millis(conf.get("timeout_ms").and_then(Value::as_u64).unwrap_or(10_000));
    let excluded: Vec<String> = conf
        .get("exclude_namespaces")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    // What a chained plugin prints on success: the previous result, in the asked version.
    let pass = || {
        let mut r = conf.get("prevResult").cloned().unwrap_or_else(|| json!({}));
        if let Some(o) = r.as_object_mut() {
            o.insert("cniVersion".into(), json!(version));
        }
        r
    };
    let args = cni_args(&env("CNI_ARGS").unwrap_or_default());
    let arg = |k: &str| args.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let req = |command: &str| -> Result<Request, Failure> {
        Ok(Request {
            command: command.into(),
            netns: env("CNI_NETNS").ok_or_else(|| fail(code::BAD_ENV, "CNI_NETNS is not set", ""))?,
            container_id: env("CNI_CONTAINERID")
                .ok_or_else(|| fail(code::BAD_ENV, "CNI_CONTAINERID is not set", ""))?,
            namespace: arg("K8S_POD_NAMESPACE").unwrap_or_default(),
            name: arg("K8S_POD_NAME").unwrap_or_default(),
            uid: arg("K8S_POD_UID"),
        })
    };
    match command {
        "ADD" => {
            let r = req("ADD")?;
            if r.namespace.is_empty() || r.name.is_empty() || excluded.contains(&r.namespace) {
                return Ok(Some(pass()));
            }
            match ask(&socket, &r, timeout) {
                Ok(Response { error: Some(e), .. }) => Err(fail(
                    code::TRY_AGAIN_LATER,
                    format!("kmesh could not take pod {}/{}", r.namespace, r.name),
                    e,
                )),
                Ok(_) => Ok(Some(pass())),
                Err(e) => Err(fail(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "the kmesh daemon is not reachable at {socket}; pod {}/{} is retried",
                        r.namespace, r.name
                    ),
                    e.to_string(),
                )),
            }
        }
        "DEL" => {
            // Best effort: a DEL must not block a pod's teardown.
            if let Ok(r) = req("DEL")
                && !r.namespace.is_empty()
                && !excluded.contains(&r.namespace)
            {
                let _ = ask(&socket, &r, timeout.min(Duration::from_secs(2)));
            }
            Ok(None)
        }
        "CHECK" => {
            req("CHECK")?;
            Ok(None)
        }
        "STATUS" => match UnixStream::connect(&socket) {
            Ok(_) => Ok(None),
            Err(e) => Err(fail(
                code::NOT_AVAILABLE,
                format!("the kmesh daemon is not reachable at {socket}"),
                e.to_string(),
            )),
        },
        "GC" => Ok(None),
        other => Err(fail(code::BAD_ENV, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

fn main() {
    let command = env("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    // Read first, whatever the command (VERSION gets `{"cniVersion": ...}` too): a runtime
    // writing its configuration must never see a closed pipe.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let out = if command.is_empty() {
        Err(fail(code::BAD_ENV, "CNI_COMMAND is not set", ""))
    } else {
        run(&command, &stdin)
    };
    match out {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(f) => {
            let version = serde_json::from_str::<Value>(&stdin)
                .ok()
                .and_then(|c| c.get("cniVersion").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| "1.0.0".into());
            println!(
                "{}",
                json!({ "cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details })
            );
            std::process::exit(1);
        }
    }
}
