//! The relays' userspace byte buffer.

use std::io;

/// A buffer with a consumed prefix: filled at the end, drained from the front, and only
/// rewound once empty (so no byte is ever moved within it).
///
/// Memory follows what is in flight rather than the configured size: nothing is allocated
/// until the first read, the first allocation is one record's worth and only a read that fills
/// the buffer makes the next one larger (up to the configured size), and [`Buf::release`]
/// gives the memory back once the flow goes quiet. A node holds thousands of mostly idle flows;
/// preallocating three full buffers each cost ~125 KB per flow end. Reads go into spare
/// capacity, so a fresh allocation is never zeroed either.
pub(super) struct Buf {
    /// `len()` is the filled end; an unallocated `Vec` while the buffer is released.
    data: Vec<u8>,
    start: usize,
    /// What the next allocation asks for.
    next: usize,
    max: usize,
    /// Bytes [`Buf::make_room`] moved to the front.
    #[cfg(test)]
    pub(super) moved: usize,
}

/// The first allocation of a buffer: one full TLS record of plaintext.
const FIRST_ALLOCATION: usize = 16 << 10;

impl Buf {
    pub(super) fn new(max: usize) -> Buf {
        Buf::sized(FIRST_ALLOCATION, max)
    }

    /// A buffer whose first allocation is `first` bytes (at most `max`).
    pub(super) fn sized(first: usize, max: usize) -> Buf {
        Buf {
            data: Vec::new(),
            start: 0,
            next: first.min(max),
            max,
            #[cfg(test)]
            moved: 0,
        }
    }

    pub(super) fn with_content(content: Vec<u8>, max: usize) -> Buf {
        let mut buf = Buf::new(max);
        if !content.is_empty() {
            buf.data = content;
        }
        buf
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.data.len()
    }

    pub(super) fn pending(&self) -> &[u8] {
        &self.data[self.start..]
    }

    pub(super) fn pending_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..]
    }

    /// Moves what is pending to the front and makes the buffer hold at least `total` bytes,
    /// so a record cut by a read can be completed in place (the own record layer decrypts
    /// whole records only).
    pub(super) fn make_room(&mut self, total: usize) {
        if self.start > 0 {
            #[cfg(test)]
            {
                self.moved += self.data.len() - self.start;
            }
            self.data.drain(..self.start);
            self.start = 0;
        }
        if self.data.capacity() < total {
            self.data.reserve_exact(total - self.data.len());
        }
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Rewinds an empty buffer so the whole of it is spare again.
    pub(super) fn clear(&mut self) {
        if self.is_empty() {
            self.start = 0;
            if self.data.capacity() < self.next {
                // Outgrown: the next fill allocates the larger size, with nothing to copy.
                self.data = Vec::new();
            } else {
                self.data.clear();
            }
        }
    }

    /// Room left for [`Buf::fill`], allocating the buffer if it is released.
    pub(super) fn spare_len(&mut self) -> usize {
        if self.data.capacity() == 0 {
            self.data = Vec::with_capacity(self.next);
        }
        self.data.capacity() - self.data.len()
    }

    /// Appends with `read`, which may write at most [`Buf::spare_len`] bytes into the spare
    /// capacity of the `Vec` it is given (tokio's `try_read_buf` and `extend_from_slice` both
    /// stay within it). A read that fills the whole buffer asks for a larger one next time.
    pub(super) fn fill(
        &mut self,
        read: impl FnOnce(&mut Vec<u8>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let room = self.spare_len();
        let whole = self.data.is_empty();
        let n = read(&mut self.data)?;
        debug_assert!(self.data.len() <= self.data.capacity());
        if whole && n == room && self.next < self.max {
            self.next = (self.next * 4).min(self.max);
        }
        Ok(n)
    }

    /// Memory is allocated and nothing is pending: [`Buf::release`] would free it.
    pub(super) fn is_drained_allocation(&self) -> bool {
        self.is_empty() && self.data.capacity() != 0
    }

    /// Gives the memory back if nothing is pending.
    pub(super) fn release(&mut self) {
        if self.is_empty() && self.data.capacity() != 0 {
            self.data = Vec::new();
            self.start = 0;
        }
    }
}
