//! What reaches a running VM's loop: a leaf module every thread kind imports (vCPUs, the
//! console, the control socket, devices through [`VmRequest`]) and that imports none of them.

use api::control::{VmCommand, VmReply};
use devices::VmRequest;
use std::sync::mpsc::Sender;

/// Something that ends (or changes) the running VM, from a device, a vCPU or the host.
#[derive(Debug)]
pub enum VmEvent {
    /// A device or KVM system event.
    Request(VmRequest),
    /// A vCPU could not go on.
    Fault(Box<FaultReport>),
    /// The host asked us to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// The user typed the console's quit escape.
    UserQuit,
    /// A command (from the control socket or a [`VmHandle`](crate::vm::VmHandle)), with where
    /// its answer goes.
    Command(CommandRequest),
}

/// A [`VmCommand`] and where to send its reply.
#[derive(Debug)]
pub struct CommandRequest {
    /// What to do.
    pub command: VmCommand,
    /// Where the VM loop sends its answer.
    pub reply: Sender<VmReply>,
}

/// Why a vCPU stopped the VM, with what the user needs to understand it.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// Which vCPU.
    pub vcpu: u32,
    /// What happened.
    pub kind: String,
    /// Its registers at that point.
    pub registers: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// KVM's last trace events for this vCPU (`--fault-trace`), oldest first; empty without.
    pub trace: String,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "vCPU {}: {}", self.vcpu, self.kind)?;
        writeln!(f, "{}", self.registers)?;
        if !self.trace.is_empty() {
            writeln!(
                f,
                "last KVM events of this vCPU (--fault-trace, oldest first):\n{}",
                self.trace
            )?;
        }
        if let Some(h) = &self.hint {
            write!(f, "hint: {h}")?;
        }
        Ok(())
    }
}
