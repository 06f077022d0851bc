//! Lingering close, as nginx's `lingering_close`: a connection graphgate ends while its client
//! may still be sending (a body refused with 413 before it was read, say) is half-closed and
//! drained for a while before the socket is closed. Closing at once would answer the
//! client's next bytes with a TCP reset, and the client would see a broken pipe instead of
//! the reply it had been sent.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a closed connection drains what its client still sends (nginx's
/// `lingering_timeout` is 5 s; a client that read the reply stops sooner).
const LINGER: Duration = Duration::from_secs(2);
/// The most a closed connection reads and drops.
const MAX_DRAINED: usize = 8 << 20;

/// The most sockets lingering at once; beyond it a socket closes at once (a flood of
/// closed connections must not hold file descriptors past `max_connections`).
const MAX_LINGERING: usize = 1024;

static LINGERING: LingerSlots = LingerSlots::new(MAX_LINGERING);

/// A count of lingering sockets, bounded.
struct LingerSlots {
    held: AtomicUsize,
    max: usize,
}

/// One place among the `LingerSlots`, held by a lingering socket's drain.
struct LingerSlot(&'static LingerSlots);

impl LingerSlots {
    const fn new(max: usize) -> LingerSlots {
        LingerSlots {
            held: AtomicUsize::new(0),
            max,
        }
    }

    fn take(&'static self) -> Option<LingerSlot> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| LingerSlot(self))
    }
}

impl Drop for LingerSlot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A public connection's socket; see the module doc.
pub struct Lingering(Option<TcpStream>);

impl Lingering {
    pub fn new(stream: TcpStream) -> Lingering {
        Lingering(Some(stream))
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.0.as_mut().expect("taken only on drop"))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.0.take() else {
            return;
        };
        let Ok(socket) = stream.into_std() else {
            return;
        };
        // A client that has already closed its side (end of stream, nothing unread) sends
        // nothing more: close now. Bytes waiting, or none yet, may be an upload still on its
        // way (a body refused by its Content-Length is answered before its first byte
        // arrives), so linger.
        match socket.peek(&mut [0u8; 1]) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(slot) = LINGERING.take() else {
            return;
        };
        runtime.spawn(async move {
            let _slot = slot;
            let Ok(mut stream) = TcpStream::from_std(socket) else {
                return;
            };
            let _ = stream.shutdown().await;
            let mut sink = vec![0u8; 16 * 1024];
            let mut drained = 0;
            let _ = tokio::time::timeout(LINGER, async {
                while drained < MAX_DRAINED {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => drained += n,
                    }
                }
            })
            .await;
        });
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_more_than_max_sockets_linger_and_a_finished_drain_frees_its_place() {
        static SLOTS: LingerSlots = LingerSlots::new(3);
        let held: Vec<LingerSlot> = (0..3).filter_map(|_| SLOTS.take()).collect();
        assert_eq!(held.len(), 3);
        assert!(SLOTS.take().is_none());
        drop(held);
        assert!(SLOTS.take().is_some());
    }
}
