//! `kmesh-xds-server`: serves a local YAML file over ADS (delta, and state of the world for
//! clients that ask for it) as istiod would, and pushes the
//! changes when the file changes: the daemon's format as Istio's workload API (`--config`), or
//! Envoy's listeners, routes, clusters and endpoints (`--envoy`, for the kernel-native mode).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kmesh_model::config;
use kmesh_proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use kmesh_xds_server::{ControlPlane, address_resources, authorization_resources};

#[derive(Parser)]
#[command(
    name = "kmesh-xds-server",
    about = "ADS control plane (delta and state of the world) serving a YAML file (for tests and demos)"
)]
struct Cli {
    /// Mesh configuration to serve (kmesh-daemon's YAML format) as Istio's workload API.
    #[arg(long, conflicts_with = "envoy", required_unless_present = "envoy")]
    config: Option<PathBuf>,
    /// Envoy resources to serve instead (listeners, routes, clusters with their endpoints, in
    /// the compact YAML form of `kmesh_xds_server::envoy_yaml`), for the kernel-native mode
    /// and for Envoy itself.
    #[arg(long)]
    envoy: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// Require `authorization: Bearer <token>`.
    #[arg(long)]
    token: Option<String>,
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// The largest request accepted, as istiod's gRPC receive limit (a bigger one is refused
    /// with RESOURCE_EXHAUSTED, named in the log and to the client).
    #[arg(long, default_value_t = kmesh_xds_server::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Resource bytes per delta response at most: a larger push is sent as several responses,
    /// each ACKed on its own (state-of-the-world responses are whole, as that protocol needs).
    #[arg(long, default_value_t = kmesh_xds_server::DEFAULT_MAX_RESPONSE_BYTES)]
    max_response_bytes: usize,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. Clients such as ztunnel
    /// speak only TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => {
            let cert = std::fs::read(c).with_context(|| format!("reading --tls-cert {}", c.display()))?;
            let key = std::fs::read(k).with_context(|| format!("reading --tls-key {}", k.display()))?;
            Some(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
        }
        _ => None,
    };
    let mut cp = ControlPlane::new()
        .with_max_request_bytes(cli.max_request_bytes)
        .with_max_response_bytes(cli.max_response_bytes);
    if let Some(t) = &cli.token {
        cp = cp.with_token(t);
    }
    let cp2 = cp.clone();
    let envoy = cli.envoy.is_some();
    let path = cli.config.clone().or(cli.envoy.clone()).expect("clap requires one");
    tokio::task::spawn_blocking(move || {
        let mut last = None;
        loop {
            if envoy
                && let Ok(text) = std::fs::read_to_string(&path)
                && last.as_ref() != Some(&text)
            {
                match kmesh_xds_server::envoy_yaml::parse(&text) {
                    Ok(r) => {
                        let counts: Vec<(&str, usize)> = r.iter().map(|(t, v)| (*t, v.len())).collect();
                        for (t, items) in r {
                            cp2.replace_all(t, items);
                        }
                        tracing::info!(?counts, "serving Envoy resources");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Envoy resources refused; still serving the previous ones")
                    }
                }
                last = Some(text);
            } else if !envoy
                && let Ok(text) = std::fs::read_to_string(&path)
                && last.as_ref() != Some(&text)
            {
                match config::parse(&text) {
                    Ok(m) => {
                        cp2.replace_all(ADDRESS_TYPE, address_resources(&m));
                        cp2.replace_all(AUTHORIZATION_TYPE, authorization_resources(&m));
                        tracing::info!(
                            workloads = m.workloads.len(),
                            services = m.services.len(),
                            policies = m.policies.len(),
                            "serving"
                        );
                    }
                    Err(e) => tracing::error!(error = %e, "config refused; still serving the previous one"),
                }
                last = Some(text);
            }
            std::thread::sleep(Duration::from_millis(cli.poll_ms));
        }
    });
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %cli.listen, tls = tls.is_some(), max_request_bytes = cli.max_request_bytes, "ADS listening (delta and state of the world)");
    cp.serve(listener, tls, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
