//! Tiny 16-bit real-mode guests, assembled by hand: a 4 KiB image mapped at the top of the
//! first 4 GiB whose reset vector jumps to the start of the image (CS base 0xffff0000,
//! IP 0xf000).

/// Builds a real-mode program.
#[derive(Default)]
pub struct Program {
    code: Vec<u8>,
}

/// COM1.
pub const COM1: u16 = 0x3f8;

impl Program {
    pub fn new() -> Self {
        Self::default()
    }

    fn mov_dx(&mut self, port: u16) {
        let [lo, hi] = port.to_le_bytes();
        self.code.extend_from_slice(&[0xba, lo, hi]);
    }

    /// `out port, value`.
    pub fn out8(mut self, port: u16, value: u8) -> Self {
        self.mov_dx(port);
        self.code.extend_from_slice(&[0xb0, value, 0xee]);
        self
    }

    /// `in al, port`.
    pub fn in8(mut self, port: u16) -> Self {
        self.mov_dx(port);
        self.code.push(0xec);
        self
    }

    /// Writes `text` to COM1, one `out` per byte.
    pub fn print(mut self, text: &str) -> Self {
        self.mov_dx(COM1);
        for b in text.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]);
        }
        self
    }

    /// Echoes COM1 input back until a `q` arrives (polls the line status register).
    pub fn echo_until_q(mut self) -> Self {
        // poll: mov dx,0x3fd; in al,dx; test al,1; jz poll
        let poll = self.code.len();
        self.mov_dx(COM1 + 5);
        self.code.extend_from_slice(&[0xec, 0xa8, 0x01]);
        let rel = (poll as isize - (self.code.len() as isize + 2)) as i8;
        self.code.extend_from_slice(&[0x74, rel as u8]);
        // mov dx,0x3f8; in al,dx; out dx,al; cmp al,'q'; jne poll
        self.mov_dx(COM1);
        self.code.extend_from_slice(&[0xec, 0xee, 0x3c, b'q']);
        let rel = (poll as isize - (self.code.len() as isize + 2)) as i8;
        self.code.extend_from_slice(&[0x75, rel as u8]);
        self
    }

    /// ACPI S5 through the sleep control register.
    pub fn poweroff(self) -> Self {
        self.out8(0x600, (5 << 2) | (1 << 5))
    }

    /// i8042 CPU reset pulse.
    pub fn reset(self) -> Self {
        self.out8(0x64, 0xfe)
    }

    /// pvpanic "panicked".
    pub fn panic(self) -> Self {
        self.out8(0x505, 1)
    }

    /// Loads an empty IDT and raises an exception: #GP, #DF, triple fault.
    pub fn triple_fault(mut self) -> Self {
        // lidt cs:[0xf800] (six zero bytes at image offset 0x800), then int3.
        self.code
            .extend_from_slice(&[0x2e, 0x0f, 0x01, 0x1e, 0x00, 0xf8, 0xcc]);
        self
    }

    /// Writes `text` to COM1 over and over, forever.
    pub fn print_forever(mut self, text: &str) -> Self {
        self.mov_dx(COM1);
        let top = self.code.len();
        for b in text.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]);
        }
        let rel = top as isize - (self.code.len() as isize + 2);
        let rel = i8::try_from(rel).expect("text too long for a short jump");
        self.code.extend_from_slice(&[0xeb, rel as u8]);
        self
    }

    /// Spins forever (`jmp $`).
    pub fn spin(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }

    /// The 4 KiB image (ends with `cli; hlt` in case the program falls through).
    pub fn build(mut self) -> Vec<u8> {
        self.code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
        assert!(self.code.len() < 0x800, "program too long");
        let mut img = vec![0u8; 4096];
        img[..self.code.len()].copy_from_slice(&self.code);
        // Reset vector at 0xfff0: jmp near 0xf000.
        img[0xff0..0xff3].copy_from_slice(&[0xe9, 0x0d, 0xf0]);
        img
    }
}
