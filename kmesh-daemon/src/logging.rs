//! Logging with a filter that can be changed at runtime (`/debug/loggers`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static CURRENT: OnceLock<std::sync::Mutex<String>> = OnceLock::new();

/// Installs the global subscriber: stderr, filter from `KMESH_LOG` (default `info`).
pub fn init() {
    let spec = std::env::var("KMESH_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let _ = HANDLE.set(handle);
    let _ = CURRENT.set(std::sync::Mutex::new(spec));
}

/// The filter in force (`EnvFilter` syntax, e.g. `info,kmesh::authz=warn`).
pub fn current() -> String {
    CURRENT.get().map(|m| m.lock().unwrap().clone()).unwrap_or_else(|| "info".into())
}

/// Replaces the filter; an invalid one is refused with the parser's message.
pub fn set(spec: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("invalid log filter {spec:?}: {e}"))?;
    let handle = HANDLE.get().ok_or("logging is not initialised in this process")?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    if let Some(m) = CURRENT.get() {
        *m.lock().unwrap() = spec.to_string();
    }
    tracing::info!(filter = spec, "log filter changed");
    Ok(())
}
