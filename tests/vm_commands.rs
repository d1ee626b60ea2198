//! The VM loop driven by typed commands, without any socket: a [`vmm::vm::VmHandle`] sends
//! [`VmCommand`]s to a tiny real-mode guest's VM on this machine's KVM, exactly as the control
//! socket does for another process.

mod common;

use api::control::{RunState, VmCommand, VmResponse};
use common::firmware::Program;
use common::*;
use config::{ByteSize, SerialConfig, VmConfig};
use std::time::{Duration, Instant};
use vmm::{ExitReason, Vm};

const T: Duration = Duration::from_secs(10);

#[test]
fn every_command_is_answered_by_the_vm_loop() {
    if !kvm_available("every_command_is_answered_by_the_vm_loop") {
        return;
    }
    let dir = scratch("vm-commands");
    let fw = write_firmware(&dir, "fw.bin", &Program::new().spin().build());
    let config = VmConfig {
        firmware: Some(fw),
        cpus: 2,
        memory: ByteSize(16 << 20),
        serial: SerialConfig::Null,
        ..VmConfig::default()
    };
    let vm = Vm::build(&config, std::path::Path::new("/dev/kvm"), Instant::now())
        .expect("the VM builds");
    let handle = vm.handle();
    let driver = std::thread::spawn(move || {
        let mut answers = Vec::new();
        for cmd in [
            VmCommand::Status,
            VmCommand::Pause,
            VmCommand::Status,
            VmCommand::Shutdown,
            VmCommand::Resume,
            VmCommand::Stats,
            VmCommand::Balloon {
                size: ByteSize(1 << 20),
            },
            VmCommand::Stop,
        ] {
            answers.push((cmd.clone(), handle.send(cmd, T)));
        }
        answers
    });
    let outcome = vm.run().expect("the VM runs");
    let answers = driver.join().expect("the driver thread");
    assert!(
        matches!(outcome.reason, ExitReason::Stopped(None)),
        "{:?}",
        outcome.reason
    );
    let mut it = answers.into_iter();
    let mut next = |want: VmCommand| {
        let (cmd, reply) = it.next().expect("an answer");
        assert_eq!(cmd, want);
        reply
    };
    match next(VmCommand::Status) {
        Ok(VmResponse::Status(s)) => {
            assert_eq!(s.state, RunState::Running);
            assert_eq!(s.cpus, 2);
            assert_eq!(s.memory, 16 << 20);
            assert_eq!(s.pid, std::process::id());
        }
        other => panic!("status: {other:?}"),
    }
    assert_eq!(
        next(VmCommand::Pause),
        Ok(VmResponse::State(RunState::Paused))
    );
    assert!(matches!(
        next(VmCommand::Status),
        Ok(VmResponse::Status(s)) if s.state == RunState::Paused
    ));
    let refused = next(VmCommand::Shutdown).expect_err("a paused VM cannot see the button");
    assert!(refused.contains("paused"), "{refused}");
    assert_eq!(
        next(VmCommand::Resume),
        Ok(VmResponse::State(RunState::Running))
    );
    match next(VmCommand::Stats) {
        Ok(VmResponse::Stats(s)) => {
            assert_eq!(s.vcpus.len(), 2);
            assert_eq!(s.vcpus[1].vcpu, 1);
            // Every exit kind is reported, the total included (a spinning guest may not have
            // exited at all: a vCPU paused before its first KVM_RUN never was in the guest).
            assert!(
                s.vcpus
                    .iter()
                    .all(|v| v.exits.contains_key("total") && v.exits.contains_key("interrupted")),
                "{s:?}"
            );
            assert!(s.devices.is_empty());
            assert!(s.balloon.is_none());
        }
        other => panic!("stats: {other:?}"),
    }
    let refused = next(VmCommand::Balloon {
        size: ByteSize(1 << 20),
    })
    .expect_err("no balloon");
    assert!(refused.contains("no balloon"), "{refused}");
    assert_eq!(
        next(VmCommand::Stop),
        Ok(VmResponse::State(RunState::Stopped))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
