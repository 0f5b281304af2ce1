//! The CNI plugin's two sides that are not the binary: the request it sends the daemon over
//! a local Unix socket (one JSON line each way), and the editing of the node's CNI
//! configuration list that chains the plugin after the primary one.

use serde::{Deserialize, Serialize};

/// The plugin's `type` in a conflist (and its binary's name in the CNI bin directory).
pub const PLUGIN_TYPE: &str = "kmesh-cni";
/// Where the daemon listens for the plugin.
pub const DEFAULT_SOCKET: &str = "/var/run/kmesh/cni.sock";

/// What the plugin asks the daemon (one JSON line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    /// `CNI_NETNS`: the pod's network namespace.
    pub netns: String,
    pub container_id: String,
    /// From `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The daemon's answer (one JSON line).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The pod is in the mesh now (ADD) or no longer (DEL).
    #[serde(default)]
    pub enrolled: bool,
    /// Why a pod is not in the mesh (`not_labelled`, `opted_out`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request failed; the sandbox must not start (the kubelet retries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Editing the node's conflist: the plugin entry goes last in the primary network's chain.
pub mod conflist {
    use std::path::{Path, PathBuf};

    use serde_json::Value;

    use super::PLUGIN_TYPE;

    /// The primary network's configuration: the first `.conflist`, `.conf` or `.json` file
    /// of `dir` in lexical order, as the container runtime picks it.
    pub fn primary(dir: &Path) -> Option<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
            })
            .collect();
        files.sort();
        files.into_iter().next()
    }

    fn is_ours(p: &Value) -> bool {
        p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
    }

    /// `conf` (a conflist, or a single-plugin `.conf`, which becomes a conflist) with `entry`
    /// last in its plugins; `None` when it is already there as given. An error names what is
    /// wrong with `conf`.
    pub fn chain(conf: &Value, entry: &Value) -> Result<Option<Value>, String> {
        let obj = conf.as_object().ok_or("the CNI configuration is not a JSON object")?;
        let mut list = if obj.contains_key("plugins") {
            conf.clone()
        } else {
            // A single plugin: wrap it, keeping its version and name.
            let v = obj.get("cniVersion").cloned().ok_or("the CNI configuration has no cniVersion")?;
            let name = obj.get("name").cloned().unwrap_or(Value::String("k8s-pod-network".into()));
            serde_json::json!({ "cniVersion": v, "name": name, "plugins": [conf.clone()] })
        };
        let plugins = list["plugins"].as_array_mut().ok_or("`plugins` is not a list")?;
        if plugins.iter().any(|p| p == entry) && plugins.last() == Some(entry) && obj.contains_key("plugins")
        {
            return Ok(None);
        }
        plugins.retain(|p| !is_ours(p));
        plugins.push(entry.clone());
        Ok(Some(list))
    }

    /// `conf` without the plugin's entry; `None` when it had none.
    pub fn unchain(conf: &Value) -> Option<Value> {
        let plugins = conf.get("plugins")?.as_array()?;
        if !plugins.iter().any(is_ours) {
            return None;
        }
        let mut out = conf.clone();
        out["plugins"].as_array_mut()?.retain(|p| !is_ours(p));
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde_json::json;

        fn entry() -> Value {
            json!({"type": PLUGIN_TYPE, "socket": "/var/run/kmesh/cni.sock"})
        }

        #[test]
        fn the_entry_goes_last_once_and_comes_out_again() {
            let primary = json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
            let chained = chain(&primary, &entry()).unwrap().expect("changed");
            assert_eq!(chained["plugins"].as_array().unwrap().len(), 3);
            assert_eq!(chained["plugins"][2], entry());
            assert_eq!(chain(&chained, &entry()).unwrap(), None, "idempotent");
            // A stale entry (other settings, or not last) is replaced.
            let mut stale = chained.clone();
            stale["plugins"]
                .as_array_mut()
                .unwrap()
                .insert(0, json!({"type": PLUGIN_TYPE, "socket": "/old"}));
            stale["plugins"].as_array_mut().unwrap().pop();
            let fixed = chain(&stale, &entry()).unwrap().expect("changed");
            assert_eq!(fixed, chained);
            assert_eq!(unchain(&chained), Some(primary.clone()));
            assert_eq!(unchain(&primary), None);
        }

        #[test]
        fn a_single_plugin_conf_becomes_a_list_and_bad_ones_are_named() {
            let single = json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"});
            let chained = chain(&single, &entry()).unwrap().expect("changed");
            assert_eq!(chained["cniVersion"], "0.4.0");
            assert_eq!(chained["plugins"][0], single);
            assert_eq!(chained["plugins"][1], entry());
            assert!(chain(&json!([1]), &entry()).unwrap_err().contains("not a JSON object"));
            assert!(chain(&json!({"type": "bridge"}), &entry()).unwrap_err().contains("cniVersion"));
            assert!(
                chain(&json!({"cniVersion": "1.0.0", "plugins": 3}), &entry())
                    .unwrap_err()
                    .contains("plugins")
            );
        }
    }
}
