//! [`ReadyOr`]: the future of a middleware that either answers at once (a refusal) or forwards to
//! the inner service, without boxing on the hot path.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// Either an immediate answer or the inner service's future.
    #[project = ReadyOrProj]
    pub enum ReadyOr<F, T, E> {
        /// Answered by the middleware.
        Ready { value: Option<Result<T, E>> },
        /// Forwarded.
        Inner { #[pin] fut: F },
    }
}

impl<F, T, E> ReadyOr<F, T, E> {
    /// An immediate answer.
    pub fn ready(value: Result<T, E>) -> Self {
        Self::Ready { value: Some(value) }
    }

    /// The inner service's future.
    pub fn inner(fut: F) -> Self {
        Self::Inner { fut }
    }
}

impl<F, T, E> Future for ReadyOr<F, T, E>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ReadyOrProj::Inner { fut } => fut.poll(cx),
            // Polled again after completion: tower futures are not fused; answer pending forever
            // rather than panic (no caller does this).
            ReadyOrProj::Ready { value } => value.take().map_or(Poll::Pending, Poll::Ready),
        }
    }
}
