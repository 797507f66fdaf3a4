//! Sockets made inside a container's network namespace, from previewd's host.
//!
//! An app bound to 127.0.0.1 in a container is reachable only from inside its network
//! namespace. The injected agent relays to it, at the price of a second TCP hop through the
//! kernel for every byte (the agent's profile is 86 % kernel). A process on the engine's host
//! with `CAP_SYS_ADMIN` can instead make its socket in the container's namespace: a socket
//! belongs to the namespace its creating thread was in, for good, so the connection is then
//! the app's own loopback, and previewd's proxy reads and writes it like any other.
//!
//! A short-lived thread enters the namespace, makes the socket and ends: no thread of the
//! runtime ever changes namespace. A namespace is named by a host pid *and* the inode the
//! agent saw as its own namespace; the inode is checked on the opened file before entering,
//! so a pid reused by another process after the container stopped is refused, not entered.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// Why no socket could be made in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `/proc/{pid}/ns/net` cannot be opened (the process is gone, or not visible here).
    #[error("cannot open the network namespace of pid {pid}: {source}")]
    Open {
        /// The host pid.
        pid: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pid now names another namespace: the container stopped and the pid was reused.
    #[error("pid {pid} is no longer in network namespace {expected} (it is in {found})")]
    Moved {
        /// The host pid.
        pid: u32,
        /// The namespace the pid was in when the route was made.
        expected: u64,
        /// The namespace it is in now.
        found: u64,
    },
    /// `setns` was refused (previewd lacks `CAP_SYS_ADMIN`) or the socket was not made.
    #[error("cannot make a socket in network namespace {inode}: {source}")]
    Enter {
        /// The namespace.
        inode: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The namespace is previewd's own: its loopback is the host's (previewd's API, the
    /// engine's), never a container's, so a route naming it is refused.
    #[error("network namespace {0} is previewd's own")]
    Own(u64),
    /// The thread that enters the namespace could not be started or did not answer.
    #[error("no thread to enter network namespace {0}")]
    Thread(u64),
}

/// The inode of the network namespace process `pid` is in, as the agent reports its own:
/// the identity both sides of a namespace agree on.
pub fn inode_of(pid: u32) -> std::io::Result<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino())
}

/// The inode of this process's own network namespace (`None` without `/proc`), read once.
pub fn own_inode() -> Option<u64> {
    static OWN: OnceLock<Option<u64>> = OnceLock::new();
    *OWN.get_or_init(|| std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino()))
}

/// Whether this process may enter network namespaces at all (it has `CAP_SYS_ADMIN`): tried
/// once, by entering its own namespace on a thread of its own.
pub fn may_enter() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| {
        let Some(own) = own_inode() else { return false };
        let probe = std::thread::Builder::new()
            .name("netns-probe".into())
            .spawn(move || enter(std::process::id(), own).is_ok());
        probe.is_ok_and(|t| t.join().unwrap_or(false))
    })
}

/// Checks that host pid `pid` is in network namespace `inode` and that this is a container's,
/// not previewd's own (whose loopback is the host's): what a pid recorded for a container
/// must still hold before previewd relies on it (a pid is reused once its process is gone).
pub fn in_container_namespace(pid: u32, inode: u64) -> Result<(), NetnsError> {
    if own_inode() == Some(inode) {
        return Err(NetnsError::Own(inode));
    }
    let found = inode_of(pid).map_err(|source| NetnsError::Open { pid, source })?;
    if found != inode {
        return Err(NetnsError::Moved {
            pid,
            expected: inode,
            found,
        });
    }
    Ok(())
}

/// This process's effective user and group: the user previewd's own processes (and the
/// agent's handoff helper, which runs as previewd's user) have.
pub fn own_user() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Opens `/proc/{pid}/ns/net`, checks it is namespace `inode`, and moves the calling thread
/// into it. Only for threads that end right after.
fn enter(pid: u32, inode: u64) -> Result<(), NetnsError> {
    let file = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|source| NetnsError::Open { pid, source })?;
    let found = file
        .metadata()
        .map_err(|source| NetnsError::Open { pid, source })?
        .ino();
    if found != inode {
        return Err(NetnsError::Moved {
            pid,
            expected: inode,
            found,
        });
    }
    // SAFETY: `setns` reads the descriptor, which `file` keeps open for the call, and
    // changes only the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter {
            inode,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// An unconnected TCP socket for `addr`'s family, made inside network namespace `inode`
/// (of host pid `pid`): connecting it reaches `addr` as a process in the container would.
/// Never previewd's own namespace.
pub async fn socket_in(
    pid: u32,
    inode: u64,
    addr: SocketAddr,
) -> Result<tokio::net::TcpSocket, NetnsError> {
    if own_inode() == Some(inode) {
        return Err(NetnsError::Own(inode));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-socket".into())
        .spawn(move || {
            let made = enter(pid, inode).and_then(|()| {
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                };
                socket.map_err(|source| NetnsError::Enter { inode, source })
            });
            // The thread, and the namespace it entered, end here.
            let _ = tx.send(made);
        })
        .map_err(|_| NetnsError::Thread(inode))?;
    rx.await.map_err(|_| NetnsError::Thread(inode))?
}

/// The host pid of the process that is `inner_pid` in its own pid namespace and sits in
/// network namespace `inode`, among this user's processes: how previewd finds the agent's
/// handoff helper, which the agent knows only by its pid inside the container. `hint`, the
/// pid found before, is checked first, so the scan of `/proc` runs only when it changed.
pub fn host_pid_of(inner_pid: u32, inode: u64, hint: Option<u32>) -> Option<u32> {
    let (euid, _) = own_user();
    let is_it =
        |pid: u32| inode_of(pid).ok() == Some(inode) && innermost_pid(pid) == Some(inner_pid);
    if let Some(pid) = hint.filter(|p| is_it(*p)) {
        return Some(pid);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == euid))
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_it(*pid))
}

/// Process `pid`'s pid in the innermost pid namespace it is in (the last of `NSpid`).
fn innermost_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process outside any container is its own innermost pid, and is found by it.
    #[test]
    fn a_process_is_found_by_its_pid_in_its_namespace() {
        let own = std::process::id();
        let Some(inode) = own_inode() else {
            panic!("no /proc/self/ns/net")
        };
        assert_eq!(innermost_pid(own), Some(own));
        assert_eq!(host_pid_of(own, inode, None), Some(own));
        assert_eq!(host_pid_of(own, inode, Some(1)), Some(own), "a wrong hint");
        assert_eq!(
            host_pid_of(own, inode + 1, Some(own)),
            None,
            "another namespace"
        );
    }

    /// A recorded pid counts only while it is in the recorded namespace, and previewd's own
    /// namespace never counts as a container's.
    #[test]
    fn a_recorded_pid_holds_only_in_a_namespace_not_previewds() {
        let Some(own) = own_inode() else {
            panic!("no /proc/self/ns/net")
        };
        let me = std::process::id();
        assert!(matches!(
            in_container_namespace(me, own),
            Err(NetnsError::Own(_))
        ));
        assert!(matches!(
            in_container_namespace(me, own + 1),
            Err(NetnsError::Moved { found, .. }) if found == own
        ));
        assert!(matches!(
            in_container_namespace(u32::MAX, own + 1),
            Err(NetnsError::Open { .. })
        ));
    }

    #[test]
    fn a_namespace_is_named_by_its_inode() {
        let own = own_inode();
        assert!(own.is_some());
        assert_eq!(inode_of(std::process::id()).ok(), own);
    }

    #[tokio::test]
    async fn only_the_namespace_named_and_never_previewds_own_is_entered() {
        let Some(own) = own_inode() else {
            panic!("no /proc/self/ns/net")
        };
        let wrong = own + 1;
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        match socket_in(std::process::id(), wrong, addr).await {
            Err(NetnsError::Moved {
                expected, found, ..
            }) => assert_eq!((expected, found), (wrong, own)),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(matches!(
            socket_in(u32::MAX, wrong, addr).await,
            Err(NetnsError::Open { .. })
        ));
        // The host's loopback is not a container's, whoever names it.
        assert!(matches!(
            socket_in(std::process::id(), own, addr).await,
            Err(NetnsError::Own(_))
        ));
    }
}
