//! A future polled only when it asked to be: its own wakers fired since its last poll.
//!
//! A connection's task is woken for every read and write of its socket, and a `select!`
//! polls each of its futures on every wake-up. The connection's deadlines (first head, idle,
//! shutdown) change a few times in its life; polling their timers on every wake-up cost
//! about 500 instructions a request. Wrapped in [`OnWake`], they are polled when one of
//! them woke the task, and otherwise cost a flag check.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `inner`, polled on its first poll and then only after a waker it was given fired.
    pub(super) struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
    }
}

/// Set by the inner future's wakers; the task to wake with them.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    pub(super) fn new(inner: F) -> Self {
        OnWake {
            inner,
            flag: Arc::new(WakeFlag {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake-up in between wakes this task again.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    use super::*;

    /// Counts its polls; pending until told, keeping the last waker it was given.
    struct Probe {
        polls: Rc<Cell<u32>>,
        ready: Rc<Cell<bool>>,
        waker: Rc<Cell<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            self.waker.set(Some(cx.waker().clone()));
            if self.ready.get() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Wakes of the outer task.
    struct Count(std::sync::atomic::AtomicU32);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_after_its_own_wake_up() {
        let polls = Rc::new(Cell::new(0));
        let ready = Rc::new(Cell::new(false));
        let inner_waker = Rc::new(Cell::new(None::<Waker>));
        let mut on_wake = Box::pin(OnWake::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: inner_waker.clone(),
        }));
        let task = Arc::new(Count(0.into()));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);

        assert!(on_wake.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "polled on its first poll");
        for _ in 0..5 {
            assert!(on_wake.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "not polled while nothing woke it");

        ready.set(true);
        let given = inner_waker.take().expect("the inner future kept a waker");
        given.wake();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "its wake-up wakes the task"
        );
        assert!(on_wake.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.get(), 2, "polled once after its wake-up");
    }
}
