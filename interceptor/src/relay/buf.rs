//! The relays' userspace byte buffer.

use std::{io, sync::Mutex};

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
    /// The first allocation's size: the one size whose memory goes back to [`POOL`].
    first: usize,
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
            first: first.min(max),
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
                self.give_back();
            } else {
                self.data.clear();
            }
        }
    }

    /// Room left for [`Buf::fill`], allocating the buffer if it is released.
    pub(super) fn spare_len(&mut self) -> usize {
        if self.data.capacity() == 0 {
            self.data = if self.next == self.first {
                take(self.first)
            } else {
                Vec::with_capacity(self.next)
            };
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
            self.give_back();
            self.start = 0;
        }
    }

    /// Frees the allocation, into [`POOL`] if it is a first allocation.
    fn give_back(&mut self) {
        let data = std::mem::take(&mut self.data);
        // (An unallocated buffer, or a kernel relay's zero-sized one, has nothing to give.)
        if data.capacity() != 0 && data.capacity() == self.first {
            give(data);
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// First allocations that flows gave back, for the next flow to take.
///
/// A flow keeps its buffers until it has been quiet for `relay::RELEASE_AFTER`, so the
/// buffers of flows set up one after another were freed among the small, long-lived
/// allocations (tasks, rows, AEAD contexts) made meanwhile for the later flows. Freed to
/// glibc's heap, each left a hole that those small allocations split, too small for the next
/// buffer, which took fresh memory from the heap's top: 1 000 idle connections through two
/// agents grew their RSS by 10.0 MB instead of 9.4 MB with this pool (bench/README.md, "Idle
/// memory"). Buffers that come from and go back to the pool leave no holes, and a new flow
/// takes one without calling the allocator. Only first allocations are kept (a grown buffer
/// belongs to a busy flow and goes back to the allocator), up to [`POOL_BYTES`].
static POOL: Mutex<Pool> = Mutex::new(Pool::new(POOL_BYTES));

/// What [`POOL`] keeps at most. Measured on that workload: a 64 KiB pool saved nothing, 256 KiB
/// 0.36 MB, 1 MiB 0.58 MB and 4 MiB no more than 1 MiB.
const POOL_BYTES: usize = 1 << 20;

/// Empty buffers by exact capacity, up to `limit` bytes in all.
struct Pool {
    free: Vec<Vec<u8>>,
    /// The capacities in `free`, summed.
    bytes: usize,
    limit: usize,
}

impl Pool {
    const fn new(limit: usize) -> Pool {
        Pool {
            free: Vec::new(),
            bytes: 0,
            limit,
        }
    }

    /// An empty buffer of exactly `capacity` bytes if the pool has one, the latest given first.
    fn take(&mut self, capacity: usize) -> Option<Vec<u8>> {
        let i = self.free.iter().rposition(|v| v.capacity() == capacity)?;
        self.bytes -= capacity;
        Some(self.free.swap_remove(i))
    }

    /// Keeps `data`, emptied, if there is room; else it is freed.
    fn give(&mut self, mut data: Vec<u8>) {
        if data.capacity() == 0 || self.bytes + data.capacity() > self.limit {
            return;
        }
        data.clear();
        self.bytes += data.capacity();
        self.free.push(data);
    }
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An empty buffer of exactly `capacity` bytes, from [`POOL`] if it has one.
fn take(capacity: usize) -> Vec<u8> {
    let pooled = pool().take(capacity);
    pooled.unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps `data` in [`POOL`] if it has room, else frees it.
fn give(data: Vec<u8>) {
    pool().give(data);
}

#[cfg(test)]
mod tests {
    use super::{Buf, Pool};

    /// A given buffer comes back to the next taker of its exact size, as the same memory and
    /// empty; other sizes are not served from it.
    #[test]
    fn the_pool_hands_back_the_same_memory_for_the_same_size_only() {
        let mut pool = Pool::new(1 << 20);
        let mut data = Vec::with_capacity(16 << 10);
        data.extend_from_slice(b"secret");
        let at = data.as_ptr();
        pool.give(data);
        assert_eq!(pool.bytes, 16 << 10);
        assert!(pool.take(32 << 10).is_none(), "another size served");
        let again = pool.take(16 << 10).expect("the buffer given back");
        assert_eq!(again.as_ptr(), at, "not the same memory");
        assert!(again.is_empty(), "the old contents are still in it");
        assert_eq!(pool.bytes, 0);
        assert!(pool.take(16 << 10).is_none(), "taken twice");
    }

    /// The pool keeps no more than its limit: what does not fit is freed.
    #[test]
    fn the_pool_keeps_no_more_than_its_limit() {
        let mut pool = Pool::new(40 << 10);
        for _ in 0..3 {
            pool.give(Vec::with_capacity(16 << 10));
        }
        assert_eq!(pool.free.len(), 2);
        assert_eq!(pool.bytes, 32 << 10);
        pool.give(Vec::new());
        assert_eq!(pool.free.len(), 2, "an unallocated buffer kept");
    }

    /// A buffer gives its first allocation back (to the shared pool) when released, when
    /// outgrown and when dropped, and a grown buffer's memory is not pooled: checked through
    /// what `give_back` would pool, since other tests share the pool.
    #[test]
    fn only_first_allocations_go_back_to_the_pool() {
        let mut buf = Buf::new(128 << 10);
        assert_eq!(buf.spare_len(), 16 << 10);
        assert_eq!(buf.data.capacity(), buf.first);
        // A read that fills the buffer asks for a larger one next time.
        let n = buf
            .fill(|v| {
                v.resize(v.capacity(), 7);
                Ok(v.len())
            })
            .unwrap();
        assert_eq!(n, 16 << 10);
        buf.consume(n);
        buf.clear();
        assert_eq!(buf.data.capacity(), 0, "the outgrown first buffer was kept");
        assert_eq!(buf.spare_len(), 64 << 10, "not the grown size");
        assert_ne!(
            buf.data.capacity(),
            buf.first,
            "a grown buffer would be pooled"
        );
        buf.release();
        assert_eq!(buf.data.capacity(), 0, "a drained buffer was kept");
    }
}
