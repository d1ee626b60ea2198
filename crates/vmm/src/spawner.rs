//! The thread that makes device worker threads for a confined VMM.
//!
//! A device's worker starts when the guest's driver activates the device, on a vCPU thread.
//! A thread inherits its creator's seccomp filter, so a worker made by a vCPU could do only
//! what a vCPU may. Instead, while the jail's filters are on, vCPU threads ask this thread
//! (filter: what workers do, plus making threads), and each worker narrows that to the device
//! filter as its first act.

use jail::seccomp::{apply_or_abort, ThreadKind};
use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

type Reply = mpsc::Sender<io::Result<JoinHandle<()>>>;
type Job = (String, Box<dyn FnOnce() + Send>, Reply);

/// Starts the spawner thread and routes every device worker through it.
pub fn start() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("fv-spawner".into())
        .spawn(move || {
            apply_or_abort(ThreadKind::Spawner);
            for (name, f, reply) in rx {
                let made = std::thread::Builder::new().name(name).spawn(move || {
                    apply_or_abort(ThreadKind::Device);
                    f()
                });
                let _ = reply.send(made);
            }
        })?;
    let gone = || io::Error::other("the worker spawner thread has ended");
    devices::virtio::worker::set_spawner(Box::new(move |name, f| {
        let (reply, answer) = mpsc::channel();
        tx.send((name, f, reply)).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }));
    Ok(())
}
