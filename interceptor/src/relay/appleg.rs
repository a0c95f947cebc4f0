//! The app leg of the userspace relay under sk_msg (`tuning.relayAppLeg: skMsg`): what the
//! app sends on its loopback connection to the agent is put by the join program straight
//! into the receive queue of the agent's end, inside the app's `sendmsg`, instead of crossing
//! the loopback TCP stack (send, softirq receive, ACK). The agent reads it as before.
//!
//! The program's rule is [`interceptor_common::JoinGrant`]'s (`JOIN_INGRESS`): it needs to
//! know how much the agent has read, which this side publishes. Reads are published at
//! growing steps (the first read, then after 2, 4, … bytes more, up to half the window), so a
//! flow whose first bytes took TCP (sent before the agent armed it) is redirected again from
//! its next message on, and a steady flow costs one map update per half window.
//!
//! Only the userspace relay arms it: bytes redirected into a socket's receive queue are
//! invisible to `splice(2)`, which the kTLS relay uses on the app leg.

use std::{
    os::fd::AsFd as _,
    sync::{Arc, Mutex},
};

use interceptor_common::{JOIN_INGRESS, JoinGrant, LegKey};
use tokio::net::TcpStream;
use tracing::debug;

use crate::datapath::{DatapathError, JoinMaps};

/// Bytes the app may have sent beyond what the agent has read before its messages take TCP
/// (and TCP's flow control) instead: the kernel charges a redirected message to no receive
/// buffer and gives its sender no back-pressure, so this bounds what one flow can queue.
/// Request/response traffic never reaches it; a bulk sender does within one window and from
/// then on uses TCP until the agent catches up with it at a publication.
pub const WINDOW: u64 = 1 << 20;

/// The agent's end of one app connection, armed for the join program.
pub struct AppLeg {
    maps: Arc<Mutex<JoinMaps>>,
    /// The app's socket, as the program keys it (from the app's end).
    app: LegKey,
    reads: Reads,
}

/// When to publish what the agent has read.
#[derive(Debug, Default)]
struct Reads {
    /// Bytes read from the agent's end since arming.
    read: u64,
    /// The `read` last published.
    published: u64,
    /// Publish again once this many more bytes were read (0: at the first read).
    step: u64,
}

impl Reads {
    /// Counts `n` bytes read; the total to publish, if it is time.
    fn read(&mut self, n: u64) -> Option<u64> {
        self.read += n;
        if n == 0 || self.read - self.published < self.step {
            return None;
        }
        self.published = self.read;
        self.step = (self.step * 2).clamp(1, WINDOW / 2);
        Some(self.read)
    }
}

impl AppLeg {
    /// Lets the app socket at the far end of `own` (the agent's end) redirect into `own`:
    /// `own` goes in the program's peer map under the app's key, then the first grant.
    /// Nothing read yet: the app's bytes sent before this (still in TCP) keep the program
    /// passing until the first publication says they were read.
    pub fn arm(maps: Arc<Mutex<JoinMaps>>, own: &TcpStream) -> Result<AppLeg, DatapathError> {
        let key = || -> std::io::Result<LegKey> {
            let netns = crate::sys::netns_cookie(own.as_fd())?;
            Ok(crate::datapath::leg_key(
                netns,
                own.peer_addr()?,
                own.local_addr()?,
            ))
        };
        let app = key().map_err(DatapathError::Sys)?;
        let leg = AppLeg {
            maps,
            app,
            reads: Reads::default(),
        };
        leg.lock().arm(app, own.as_fd(), grant(0))?;
        Ok(leg)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JoinMaps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay read `n` bytes from the agent's end.
    pub fn read(&mut self, n: usize) {
        let Some(read) = self.reads.read(n as u64) else {
            return;
        };
        if let Err(e) = self.lock().set_grant(self.app, grant(read)) {
            // The program keeps the last grant: at worst the flow takes TCP, correct.
            debug!(error = %e, "sk_msg app leg grant not updated");
        }
    }
}

fn grant(read: u64) -> JoinGrant {
    JoinGrant {
        relayed: read,
        granted: read + WINDOW,
        kind: JOIN_INGRESS,
    }
}

impl Drop for AppLeg {
    /// No grant, no peer: the program passes everything the app sends from now on.
    fn drop(&mut self) {
        let app = self.app;
        self.lock().disarm(app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64-byte messages: published at the first read, then at doubling steps (so a flow
    /// whose first bytes took TCP is redirected again soon), then once per half window.
    #[test]
    fn reads_are_published_at_doubling_steps_up_to_half_the_window() {
        let mut r = Reads::default();
        let mut at = Vec::new();
        for i in 1..=40_000u64 {
            if let Some(total) = r.read(64) {
                assert_eq!(total, i * 64, "publishes the total read");
                at.push(i);
            }
        }
        assert_eq!(&at[..4], &[1, 2, 3, 4]);
        // The gap grows to half the window and stays there.
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&(WINDOW / 2 / 64)));
        assert!(at.len() < 30, "{} publications for 2.4 MiB", at.len());
        assert_eq!(r.read(0), None, "an empty read publishes nothing");
    }

    #[test]
    fn a_grant_allows_a_window_beyond_what_was_read() {
        let g = grant(1000);
        assert_eq!(
            (g.relayed, g.granted, g.kind),
            (1000, 1000 + WINDOW, JOIN_INGRESS)
        );
    }
}
