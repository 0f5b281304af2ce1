//! What the demos share: finding the binaries built next to them, and one cleanup that stops
//! what a demo started and removes its scratch directory, at the end or on Ctrl-C.

use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};

use anyhow::bail;
use kmesh_testbed::{CleanupHooks, cleanup_signal_handler};

/// A binary of this workspace, built next to the running example.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to {}; run `cargo build --release --bins --examples`", exe.display())
}

/// Runs a demo; when it failed because of Ctrl-C, waits for the signal handler, which is
/// tearing everything down and will exit the process.
pub fn main_with(run: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let r = run();
    if r.is_err() && kmesh_testbed::interrupted() {
        loop {
            std::thread::park();
        }
    }
    r
}

/// The processes a demo started and its scratch directory.
pub struct Cleanup {
    children: Arc<Mutex<Vec<Child>>>,
    dir: PathBuf,
}

impl Cleanup {
    /// Installs the Ctrl-C handler (which also removes the testbed's pods) for `dir` and the
    /// processes adopted later.
    pub fn install(dir: PathBuf) -> Self {
        let children: Arc<Mutex<Vec<Child>>> = Arc::new(Mutex::new(Vec::new()));
        let hooks: CleanupHooks = Arc::new(Mutex::new(Vec::new()));
        {
            let (children, dir) = (children.clone(), dir.clone());
            hooks.lock().unwrap().push(Box::new(move || stop(&children, &dir)));
        }
        cleanup_signal_handler(hooks);
        Self { children, dir }
    }

    /// A process to stop at the end.
    pub fn adopt(&self, child: Child) {
        self.children.lock().unwrap().push(child);
    }

    /// Stops every adopted process and removes the directory.
    pub fn finish(&self) {
        stop(&self.children, &self.dir);
    }
}

/// SIGTERM to each process, newest first (a daemon uninstalls its programs and pins on the
/// way out), then the directory goes.
fn stop(children: &Mutex<Vec<Child>>, dir: &std::path::Path) {
    for mut c in children.lock().unwrap().drain(..).rev() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(dir);
}
