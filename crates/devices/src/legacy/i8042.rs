//! The i8042 controller, reduced to what a guest uses to reset the machine (pulse the CPU reset
//! line with command 0xfe on port 0x64).

use super::RequestTrigger;
use crate::{BusDevice, VmRequest, VmRequestFn};

/// i8042 at ports 0x60..=0x64 (the bus offset 4 is the command/status port).
pub struct I8042 {
    inner: vm_superio::I8042Device<RequestTrigger>,
}

impl I8042 {
    /// A controller that sends [`VmRequest::Reset`] to `sink` when the guest pulses reset.
    pub fn new(sink: VmRequestFn) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(RequestTrigger {
                request: VmRequest::Reset,
                sink,
            }),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so `kb_wait()` loops end at once.
        let value = self.inner.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            // The trigger cannot fail (Infallible).
            let _ = self.inner.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::recorder;

    #[test]
    fn reset_command_requests_reset_and_nothing_else_does() {
        let (sink, log) = recorder();
        let mut dev = I8042::new(sink);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0x20]);
        dev.write(4, &[0xfe, 0xfe]);
        assert!(log.lock().unwrap().is_empty());
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
        dev.write(4, &[0xfe]);
        assert_eq!(*log.lock().unwrap(), vec![VmRequest::Reset]);
    }
}
