//! The pods' DNS proxy: `names` (the model's names and how a pod's query finds one) and
//! `message` (one query in, one answer or a decision out) are pure; `proxy` keeps a server in
//! every enrolled pod's namespace and `server` serves and forwards.

pub mod message;
pub mod names;
pub mod proxy;
mod server;

pub use message::{Action, Handled, Outcome, handle_query, servfail};
pub use names::{Addrs, Found, HEADLESS_TTL, NameTable, VIP_TTL};
pub use proxy::{DEFAULT_PORT, DnsOptions, DnsProxy, MeshView};
