//! COM1: a 16550A UART (vm-superio's model) whose transmitter writes to a host sink and whose
//! receiver is fed by the VMM (terminal, socket).

use crate::{BusDevice, Interrupt};
use std::io::{self, Write};

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// The UART at 0x3f8 (8 ports).
pub struct Serial {
    inner: vm_superio::Serial<Interrupt, vm_superio::serial::NoEvents, SerialOutput>,
}

impl Serial {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: Interrupt, out: SerialOutput) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the receive FIFO
    /// (0 when it is full: try again once the guest has read some).
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        match self.inner.enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(vm_superio::serial::Error::Trigger(e))
            | Err(vm_superio::serial::Error::IOError(e)) => Err(e),
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) if off < 8 => *b = self.inner.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if off < 8 {
                if let Err(e) = self.inner.write(off, *value) {
                    // The sink failing (a closed pipe, a full disk) must not stop the guest.
                    tracing::debug!("serial output: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_input_raises_irq() {
        let irq = Interrupt::new().unwrap();
        let sink = Sink::default();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"x").unwrap(), 1);
        assert!(irq.eventfd().read().unwrap() >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b, [b'x']);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let irq = Interrupt::new().unwrap();
        let mut s = Serial::new(irq, Box::new(io::sink()));
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        s.write(0, &[1, 2]);
        s.write(u64::MAX, &[1]);
        let mut b = [0u8];
        s.read(9, &mut b);
        assert_eq!(b, [0xff]);
        let full = vec![0u8; 100];
        let n = s.enqueue_input(&full).unwrap();
        assert!(n > 0 && n < 100);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(b"more").unwrap(), 0);
    }
}
