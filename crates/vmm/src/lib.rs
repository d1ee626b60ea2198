//! Ferrovisor's VMM: one VM on `/dev/kvm` — guest memory, vCPUs, boot, devices, lifecycle.
#![deny(missing_docs)]

pub mod boot;
pub mod builder;
pub mod console;
pub mod control;
pub mod cpu;
pub mod event;
pub mod fault_trace;
pub mod irqchip;
pub mod kvm;
pub mod memory;
pub mod spawner;
pub mod terminal;
pub mod virtio;
pub mod vm;

pub use config::VmConfig;
pub use vm::{ExitReason, Vm, VmError, VmOutcome};
