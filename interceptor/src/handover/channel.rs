//! Frames and descriptors over a connected unix stream socket, blocking with timeouts: the
//! handover is a short, strictly ordered conversation, so each side runs it on a thread of
//! its own and a silent peer costs at most [`STEP_TIMEOUT`](super::STEP_TIMEOUT) per step.

use std::{
    io::{self, Write as _},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::{Message, ProtocolError, STEP_TIMEOUT, body_len, decode, encode};
use crate::sys::{self, PeerCred};

/// One side of a handover conversation with a peer whose credentials were checked.
pub struct Channel {
    sock: UnixStream,
    pub peer: PeerCred,
}

impl Channel {
    /// Wraps a connected socket after checking who is on the other end: the kernel's record
    /// of the peer (`SO_PEERCRED`) must carry our own uid. The agent runs as root, so only
    /// another root process can take its listeners (or hand it some).
    pub fn new(sock: UnixStream) -> anyhow::Result<Self> {
        let peer = sys::peer_cred(sock.as_fd()).context("SO_PEERCRED of the handover peer")?;
        let ours = sys::euid();
        if peer.uid != ours {
            bail!(
                "handover peer pid {} runs as uid {}, not {ours}: refused",
                peer.pid,
                peer.uid
            );
        }
        let channel = Channel { sock, peer };
        channel.set_timeout(STEP_TIMEOUT)?;
        Ok(channel)
    }

    /// How long the next reads and writes may wait.
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.sock.set_read_timeout(Some(t))?;
        self.sock.set_write_timeout(Some(t))
    }

    pub fn send(&mut self, msg: &Message, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        if fds.len() != msg.fds() {
            bail!(
                "internal: `{}` carries {} descriptors, {} given",
                msg.kind(),
                msg.fds(),
                fds.len()
            );
        }
        let frame = encode(msg)?;
        let sent = sys::send_with_fds(self.sock.as_fd(), &frame, fds)
            .with_context(|| format!("send `{}`", msg.kind()))?;
        if let Some(rest) = frame.get(sent..) {
            self.sock
                .write_all(rest)
                .with_context(|| format!("send `{}`", msg.kind()))?;
        }
        Ok(())
    }

    /// The next message and the descriptors that came with it. A malformed frame, a wrong
    /// descriptor count, a timeout or an early end is an error; descriptors received with a
    /// bad message are closed.
    pub fn recv(&mut self) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut header = [0u8; 4];
        self.fill(&mut header, &mut fds)?;
        let len = body_len(header)?;
        let mut body = vec![0u8; len];
        self.fill(&mut body, &mut fds)?;
        let msg = decode(&body, fds.len())?;
        Ok((msg, fds))
    }

    /// Receives one message and insists on its kind; an `abort` from the peer is reported
    /// with the peer's reason.
    pub fn expect(&mut self, want: &'static str) -> anyhow::Result<(Message, Vec<OwnedFd>)> {
        let (msg, fds) = self
            .recv()
            .with_context(|| format!("waiting for `{want}`"))?;
        if let Message::Abort { reason } = &msg {
            bail!("the handover peer gave up: {reason}");
        }
        if msg.kind() != want {
            return Err(ProtocolError::Unexpected {
                want,
                got: msg.kind(),
            }
            .into());
        }
        Ok((msg, fds))
    }

    fn fill(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> anyhow::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let (n, got) = match sys::recv_with_fds(self.sock.as_fd(), &mut buf[at..]) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("the handover peer went silent")
                }
                Err(e) => return Err(e.into()),
            };
            fds.extend(got);
            if fds.len() > sys::MAX_PASSED_FDS {
                bail!(
                    "the handover peer sent more than {} descriptors",
                    sys::MAX_PASSED_FDS
                );
            }
            if n == 0 {
                bail!("the handover peer closed the connection");
            }
            at += n;
        }
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
