//! Running async protocol code over bytes in memory, without a runtime: a connection that
//! reads from a buffer, and a poller that runs a future until it completes or waits on input
//! that will never come.
//!
//! A harness must be deterministic and fast (a fuzzer runs it a million times), so nothing
//! here touches a socket, a clock or a thread.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

/// How many polls a future gets before the harness calls it a livelock: far more than any
/// exchange over a fuzz input needs.
const MAX_POLLS: usize = 100_000;

/// Remembers whether a future asked to be polled again.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A future polled by hand until it completes or stalls: it returned `Pending` without
/// having asked to be woken, so it waits on something only the harness can give (more
/// input, or the end of it).
pub struct Poller<F: Future> {
    fut: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

impl<F: Future> Poller<F> {
    /// Starts polling `fut` (lazily: nothing runs before [`Poller::settle`]).
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        Poller {
            fut: Box::pin(fut),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }

    /// Polls until the future completes (`Some`) or stalls (`None`). Panics on a future
    /// that wakes itself forever: a livelock is a bug the fuzzer should report.
    pub fn settle(&mut self) -> Option<F::Output> {
        let mut cx = Context::from_waker(&self.waker);
        for _ in 0..MAX_POLLS {
            self.flag.0.store(false, Ordering::SeqCst);
            match self.fut.as_mut().poll(&mut cx) {
                Poll::Ready(out) => return Some(out),
                Poll::Pending if !self.flag.0.load(Ordering::SeqCst) => return None,
                Poll::Pending => {}
            }
        }
        panic!("a future over in-memory input kept waking itself ({MAX_POLLS} polls)");
    }
}

/// Runs `fut` to completion; `None` if it stalls (see [`Poller`]).
pub fn run<F: Future>(fut: F) -> Option<F::Output> {
    Poller::new(fut).settle()
}

/// What a [`MemIo`]'s reader does once its input is used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtEnd {
    /// Reads end of file: the peer closed.
    Eof,
    /// Reads wait (without waking): the peer is silent, the connection open.
    Wait,
}

/// A connection whose peer sent `input` (delivered at most `chunk` bytes per read), and
/// which swallows whatever is written to it. The end of input can be turned into an end
/// of file later (through [`MemIo::closer`]'s flag), so a harness can first see what a
/// reader makes of the bytes alone, then what it makes of the close. A server's
/// connection ([`MemIo::answering`]) sends nothing before something was written to it: an
/// upstream answers a request.
pub struct MemIo {
    input: Vec<u8>,
    at: usize,
    chunk: usize,
    closed: Arc<AtomicBool>,
    /// Reads wait until something was written.
    answers: bool,
    written: bool,
    /// A reader waiting for the first write.
    reader: Option<Waker>,
}

impl MemIo {
    /// A connection that reads `input` in pieces of at most `chunk` bytes (at least 1), then
    /// does what `at_end` says.
    pub fn new(input: Vec<u8>, chunk: usize, at_end: AtEnd) -> Self {
        MemIo {
            input,
            at: 0,
            chunk: chunk.max(1),
            closed: Arc::new(AtomicBool::new(at_end == AtEnd::Eof)),
            answers: false,
            written: false,
            reader: None,
        }
    }

    /// Like [`MemIo::new`], for the connection to a server that sends `input` once it has
    /// been written to (a request came).
    pub fn answering(input: Vec<u8>, chunk: usize, at_end: AtEnd) -> Self {
        MemIo {
            answers: true,
            ..MemIo::new(input, chunk, at_end)
        }
    }

    /// Takes what is written: the first write lets an answering peer speak.
    fn write(&mut self, n: usize) -> usize {
        if n > 0 && !self.written {
            self.written = true;
            if let Some(reader) = self.reader.take() {
                reader.wake();
            }
        }
        n
    }

    /// A handle that turns the end of input into an end of file when set.
    pub fn closer(&self) -> Arc<AtomicBool> {
        self.closed.clone()
    }

    /// How many input bytes have been read.
    pub fn consumed(&self) -> usize {
        self.at
    }

    /// The next piece of input for a reader with `room` bytes of space: `Some(empty)` at
    /// end of file, `None` while the connection waits.
    fn next_piece(&mut self, cx: &Context<'_>, room: usize) -> Option<&[u8]> {
        if self.answers && !self.written {
            self.reader = Some(cx.waker().clone());
            return None;
        }
        let left = self.input.len() - self.at;
        if left == 0 {
            return self.closed.load(Ordering::SeqCst).then_some(&[][..]);
        }
        let n = left.min(room).min(self.chunk);
        let start = self.at;
        self.at += n;
        Some(&self.input[start..start + n])
    }
}

impl tokio::io::AsyncRead for MemIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        match self.get_mut().next_piece(cx, room) {
            Some(piece) => {
                buf.put_slice(piece);
                Poll::Ready(Ok(()))
            }
            None => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncWrite for MemIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.get_mut().write(buf.len())))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Read for MemIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        match self.get_mut().next_piece(cx, room) {
            Some(piece) => {
                buf.put_slice(piece);
                Poll::Ready(Ok(()))
            }
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for MemIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.get_mut().write(buf.len())))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Escapes `bytes` for a failure message: printable ASCII as is, the rest as `\xNN`.
pub fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
