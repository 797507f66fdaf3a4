//! How many client connections the proxy holds open, in all and per client address.
//!
//! A connection costs a file descriptor (two, once it has an upstream), and the process has a
//! limited number: without a cap, one client opening idle connections locks every other out
//! until timeouts free them. Over a cap a connection is answered at once with a short 503 and
//! closed, so the client sees why; the proxy never stops accepting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Client connections open at once, in all.
    pub total: usize,
    /// Client connections open at once from one address; 0 for no such cap (behind a load
    /// balancer every connection comes from its address).
    pub per_client: usize,
}

/// Counts open client connections against [`ConnectionLimits`]; shared by the workers.
pub struct Connections {
    limits: ConnectionLimits,
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// The proxy holds its most connections.
    Total,
    /// This client holds its most connections.
    Client,
}

impl OverLimit {
    /// The answer written to a refused connection before it is closed.
    pub fn response(self) -> &'static [u8] {
        match self {
            OverLimit::Total => {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 89\r\n\r\n{\"error\":\"TOO_MANY_CONNECTIONS\",\"message\":\"the preview proxy holds its most connections\"}"
            }
            OverLimit::Client => {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 91\r\n\r\n{\"error\":\"TOO_MANY_CONNECTIONS\",\"message\":\"this client holds its most preview connections\"}"
            }
        }
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Admitted {
    owner: Arc<Connections>,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.owner.open.fetch_sub(1, Ordering::SeqCst);
        if self.owner.limits.per_client > 0 {
            let mut map = self
                .owner
                .per_client
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&self.client) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.client);
                }
            }
        }
    }
}

impl Connections {
    /// No connection open yet.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Connections {
            limits,
            open: AtomicUsize::new(0),
            per_client: Mutex::default(),
        })
    }

    /// A place for one more connection from `client`, or why there is none.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, OverLimit> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.limits.total {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(OverLimit::Total);
        }
        if self.limits.per_client > 0 {
            let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(client).or_insert(0);
            if *n >= self.limits.per_client {
                drop(map);
                self.open.fetch_sub(1, Ordering::SeqCst);
                return Err(OverLimit::Client);
            }
            *n += 1;
        }
        Ok(Admitted {
            owner: self.clone(),
            client,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do (the soft default of 1,024 is a relic of `select(2)`; previewd
/// uses epoll). Returns the limit in force afterwards, and the one before.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok((lim.rlim_cur, before))
}

/// The total cap that fits in `open_files`: each connection may hold two descriptors (the
/// client's and its upstream's), and some are kept back for the API listener, the store and
/// the Docker socket.
pub fn total_for(open_files: u64) -> usize {
    const RESERVED: u64 = 256;
    usize::try_from(open_files.saturating_sub(RESERVED) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_client_and_in_all_and_places_come_back() {
        let c = Connections::new(ConnectionLimits {
            total: 3,
            per_client: 2,
        });
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let a1 = c.admit(a);
        let a2 = c.admit(a);
        assert!(a1.is_ok() && a2.is_ok());
        assert!(matches!(c.admit(a), Err(OverLimit::Client)));
        let b1 = c.admit(b);
        assert!(b1.is_ok());
        assert!(matches!(c.admit(b), Err(OverLimit::Total)));
        assert_eq!(c.open(), 3);
        drop(a1);
        assert!(c.admit(b).is_ok(), "a freed place is usable");
        drop(b1);
        drop(a2);
        assert_eq!(c.open(), 0);
        assert!(c.per_client.lock().map(|m| m.is_empty()).unwrap_or(false));
    }

    #[test]
    fn refusals_are_whole_http_answers() {
        for over in [OverLimit::Total, OverLimit::Client] {
            let text = String::from_utf8_lossy(over.response()).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse::<usize>().ok());
            assert_eq!(length, Some(body.len()), "{text}");
            assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
        }
    }

    #[test]
    fn the_limit_is_raised_and_caps_fit_it() {
        let (now, before) = raise_open_files_limit().unwrap_or((0, 0));
        assert!(now >= before && now > 0);
        assert_eq!(total_for(1024), 384);
        assert_eq!(total_for(10), 1);
    }
}
