//! Socket handoff: the agent connects to an app's loopback port inside the container and
//! hands previewd the connected socket over a unix socket (`SCM_RIGHTS`), so the bytes then
//! flow between previewd and the app with no relay in between.
//!
//! previewd without root cannot enter a container's network namespace, and the agent's TCP
//! relay copies every byte through a second socket pair (0.62–0.84 of a direct link in
//! bench/proxy.sh). A unix socket inside the container is reachable from previewd's host
//! through `/proc/{pid}/root/…` of any process there that previewd may inspect: one of its
//! own user. So `serve` runs a helper (`previewd-agent handoff`) as previewd's user, beside
//! itself; the helper answers the same authenticated `CONNECT` as the relay, but with the
//! upstream socket instead of a tunnel. A path under `/proc/{pid}/root` can be longer than a
//! unix socket address holds, so previewd opens the helper's directory and connects through
//! `/proc/self/fd/{dir}/`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Interest, ReadBuf,
};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use crate::agent::backoff::RestartBackoff;
use crate::agent::client::{self, AgentError};
use crate::agent::http;
use crate::agent::process;
use crate::agent::secret::Secret;
use crate::agent::server::{self, Action};

/// The helper's socket, in its directory.
pub const SOCKET_NAME: &str = "socket";

/// A message header over one buffer (`iov`) and room for control messages (`control`); it
/// points into both, so it must not outlive them.
fn message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr (no buffers, no name).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    msg
}

/// Sends `bytes` with `fd` attached (`SCM_RIGHTS`) on the unix socket `sock`, all in one
/// message: the receiver gets the descriptor with the first of these bytes.
fn send_with_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let msg = message(&mut iov, &mut control);
    // SAFETY: `control` is CMSG_SPACE(one fd) bytes, so the first header and its data fit.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Receives into `buf` from the unix socket `sock`, keeping the first descriptor that came
/// with the bytes into `fds` (closed on drop unless used) and closing any other.
/// `Ok(0)` is the end of the stream.
fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a few descriptors: a peer that sends more loses them (MSG_CTRUNC), not us.
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: `msg` points at live buffers; MSG_CMSG_CLOEXEC keeps received descriptors
    // from leaking into children.
    let got = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG macros walk it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize - header) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    // One is all an answer carries: a peer sending more cannot make this
                    // side hold them (each extra one is closed here).
                    if fds.is_empty() {
                        fds.push(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(got as usize)
}

/// The helper `serve` runs: as which user, with its socket in which directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoffHelper {
    /// The helper's own directory (made, and given to the user).
    pub dir: PathBuf,
    /// The user (`uid`, `gid`) previewd runs as on the host.
    pub user: (u32, u32),
}

/// How long a helper may take to listen.
const HELPER_START: std::time::Duration = std::time::Duration::from_secs(5);

/// The running helper's pid, 0 while none runs: the ports answer reports it, so previewd
/// can find it among the host's processes.
static HELPER_PID: AtomicU32 = AtomicU32::new(0);

/// The running helper's pid in the container, if one runs.
pub fn helper_pid() -> Option<u32> {
    Some(HELPER_PID.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
}

/// Runs the helper as a child for as long as `serve` runs, restarting it with a backoff
/// when it exits. It dies with `serve` (parent-death signal), so a stopped or killed agent
/// leaves no helper behind. `first` is told once the first helper listens (or failed), so
/// the agent announces itself with the helper in place (dropping it says the same when there
/// is none). Gives up, saying why on stderr,
/// when the helper cannot run as that user (the agent is neither root nor that user).
pub async fn run_helper(helper: HandoffHelper, first: tokio::sync::oneshot::Sender<()>) {
    let mut first = Some(first);
    let (uid, gid) = helper.user;
    let (euid, egid) = crate::runtime::netns::own_user();
    let switch = (euid, egid) != (uid, gid);
    if switch && euid != 0 {
        eprintln!("no socket handoff: the agent runs as {euid}:{egid}, not as root or {uid}:{gid}");
        return;
    }
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("no socket handoff: cannot name the agent's own binary: {e}");
            return;
        }
    };
    let socket = helper.dir.join(SOCKET_NAME);
    let mut backoff = RestartBackoff::default();
    loop {
        if let Err(e) = prepare_dir(&helper.dir, helper.user) {
            eprintln!("no socket handoff: {}: {e}", helper.dir.display());
            return;
        }
        let mut command = tokio::process::Command::new(&program);
        command.arg("handoff").arg("--socket").arg(&socket);
        command
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if switch {
            command.uid(uid).gid(gid);
        }
        process::die_with_parent(&mut command);
        let started = std::time::Instant::now();
        let child = match command.spawn() {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                if let Some(stderr) = child.stderr.take() {
                    // Its first line says it listens; all it says goes on to the agent's.
                    let mut lines = BufReader::new(stderr).lines();
                    let said = tokio::time::timeout(HELPER_START, lines.next_line()).await;
                    if let Ok(Ok(Some(line))) = said {
                        eprintln!("{line}");
                        HELPER_PID.store(pid, Ordering::Relaxed);
                    }
                    tokio::spawn(async move {
                        while let Ok(Some(line)) = lines.next_line().await {
                            eprintln!("{line}");
                        }
                    });
                }
                Some(child)
            }
            Err(e) => {
                eprintln!("starting the handoff helper failed: {e}");
                None
            }
        };
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        if let Some(mut child) = child {
            let _ = child.wait().await;
            HELPER_PID.store(0, Ordering::Relaxed);
        }
        tokio::time::sleep(backoff.after_exit(started.elapsed())).await;
    }
}

/// Makes the helper's directory, owned by its user and closed to everyone else.
fn prepare_dir(dir: &Path, (uid, gid): (u32, u32)) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// `previewd-agent handoff --socket PATH`: answers requests on a unix socket at `path`
/// (replacing a stale one) until the process is ended; a `CONNECT` is answered with the
/// connected upstream socket attached to the `200` head.
pub async fn serve(path: &Path, secret: Arc<Secret>) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    // Only this user (previewd's, on the host) may connect.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    eprintln!("handing off sockets at {}", path.display());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, secret.clone()));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// One request on the handoff socket. A request to shut down ends the helper (`serve`
/// starts it again), as it ends a daemon.
async fn answer(mut stream: UnixStream, secret: Arc<Secret>) {
    match server::handle(&mut stream, &secret).await {
        Ok(Action::Connected {
            mut upstream,
            pending,
        }) => {
            // The client sends nothing before it has the socket; bytes it sent anyway go
            // first.
            if upstream.write_all(&pending).await.is_ok() {
                send_established(&mut stream, &upstream).await;
            }
        }
        Ok(Action::Shutdown) => std::process::exit(0),
        Ok(Action::Done) | Err(_) => {}
    }
}

/// The `200` head, with `upstream` attached to its first byte. The helper's copy closes
/// when it returns.
async fn send_established(stream: &mut UnixStream, upstream: &TcpStream) {
    let sock = stream.as_raw_fd();
    let fd = upstream.as_raw_fd();
    let head = http::CONNECT_ESTABLISHED;
    let sent = stream
        .async_io(Interest::WRITABLE, || send_with_fd(sock, head, fd))
        .await;
    if let Ok(sent @ 1..) = sent {
        let _ = stream.write_all(&head[sent..]).await;
    }
}

/// Why no socket was handed over.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The helper's directory or socket could not be reached.
    #[error("cannot reach the agent's handoff socket in {dir}: {source}")]
    Reach {
        /// The directory, as previewd's host sees it.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The helper refused, or the exchange failed, as the relay's would.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A `200` came without a socket attached.
    #[error("the agent's handoff answer carried no socket")]
    NoSocket,
    /// What came attached is not a TCP connection.
    #[error("the agent handed over something other than a TCP socket")]
    NotTcp,
}

/// Asks the helper whose directory is `dir` (a path on previewd's host, e.g. under
/// `/proc/{pid}/root`) for a socket connected to `localhost:{port}` in the container.
pub async fn connect(dir: &Path, secret: &str, port: u16) -> Result<TcpStream, HandoffError> {
    let reach = |source| HandoffError::Reach {
        dir: dir.to_owned(),
        source,
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(reach)?;
    let via = format!("/proc/self/fd/{}/{SOCKET_NAME}", opened.as_raw_fd());
    let stream = UnixStream::connect(&via).await.map_err(reach)?;
    drop(opened);
    let mut answer = Collecting {
        stream,
        fds: Vec::new(),
    };
    client::connect(&mut answer, secret, port).await?;
    let fd = answer.fds.pop().ok_or(HandoffError::NoSocket)?;
    if !is_tcp_stream(&fd) {
        return Err(HandoffError::NotTcp);
    }
    let upstream = std::net::TcpStream::from(fd);
    upstream.set_nonblocking(true).map_err(AgentError::Io)?;
    let upstream = TcpStream::from_std(upstream).map_err(AgentError::Io)?;
    // Small writes (WebSocket frames, SSE events) must not wait for Nagle.
    let _ = upstream.set_nodelay(true);
    Ok(upstream)
}

/// Whether `fd` is a TCP socket (stream, IPv4 or IPv6): what the helper must hand over.
fn is_tcp_stream(fd: &OwnedFd) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are live and sized for an int option.
        let ok = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0;
        ok.then_some(value)
    };
    option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(
            option(libc::SO_DOMAIN),
            Some(libc::AF_INET | libc::AF_INET6)
        )
}

/// The client's side of a handoff socket: reads keep the descriptors that come with the
/// bytes, so the agent client reads the answer as it reads the relay's.
struct Collecting {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
}

impl AsyncRead for Collecting {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            std::task::ready!(this.stream.poll_read_ready(cx))?;
            let sock = this.stream.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            let fds = &mut this.fds;
            match this
                .stream
                .try_io(Interest::READABLE, || recv_with_fds(sock, unfilled, fds))
            {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Collecting {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor sent with bytes arrives with them, usable, and the bytes are intact.
    #[test]
    fn a_descriptor_travels_with_its_bytes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (mut x, y) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            send_with_fd(a.as_raw_fd(), b"HTTP/1.1 200 OK\r\n\r\n", y.as_raw_fd()).ok(),
            Some(19)
        );
        drop(y);
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let got =
            recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..got], b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the other end of `x`.
        assert!(!is_tcp_stream(&fds[0]), "a unix socket is not a TCP one");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let tcp =
            std::net::TcpStream::connect(listener.local_addr().unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(is_tcp_stream(&OwnedFd::from(tcp)));
        let mut received = std::os::unix::net::UnixStream::from(fds.remove(0));
        use std::io::{Read, Write};
        x.write_all(b"ping").unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 4];
        received
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"ping");
    }
}
