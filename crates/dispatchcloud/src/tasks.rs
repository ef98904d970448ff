//! The one shutdown idiom: each long-lived component (worker pool, scheduler, queue, service)
//! owns a [`Tasks`], spawns every background task through it, and on shutdown cancels it and
//! joins its tasks for a bounded time. Loops and sleeps end on cancellation; calls that leave
//! the process carry their own deadlines, so the bounded join is enough for them to finish.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// A cancellation token and the tracker of every task spawned under it.
#[derive(Debug, Default, Clone)]
pub struct Tasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    /// A fresh set, not cancelled.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// A set whose token is a child of `parent`'s: cancelling the parent cancels this one.
    pub fn child_of(parent: &CancellationToken) -> Tasks {
        Tasks {
            cancel: parent.child_token(),
            tracker: TaskTracker::new(),
        }
    }

    /// Run `task`, tracked so that [`Tasks::join`] waits for it.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Run `task`, tracked, and drop it at cancellation wherever it is (for work with nothing
    /// to finish: waits, notification loops, retry loops the next dispatcher redoes).
    pub fn spawn_until_cancelled(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// Tell every loop to end.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Whether [`Tasks::cancel`] was called (or the parent token cancelled).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves on cancellation: the `select!` arm of every loop and wait.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// The token, for code that takes one.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Sleep `d`; false if cancelled first (or already).
    pub async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_cancelled(),
            _ = self.cancelled() => false,
        }
    }

    /// Cancel, then wait up to `limit` for every task spawned here to end. False (and a
    /// warning naming `what`) if some were still running at `limit`; they are left to the
    /// runtime.
    pub async fn join(&self, what: &str, limit: Duration) -> bool {
        self.cancel();
        self.tracker.close();
        let joined = tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok();
        if !joined {
            tracing::warn!(
                tasks = self.tracker.len(),
                "{what}: tasks still running after {limit:?}; leaving them"
            );
        }
        joined
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// No task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn join_waits_for_tasks_that_end_on_cancel_and_gives_up_on_the_rest() {
        let t = Tasks::new();
        let ended = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (t2, ended) = (t.clone(), ended.clone());
            t.spawn(async move {
                t2.pause(Duration::from_secs(3600)).await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(t.len(), 3);
        assert!(t.join("test", Duration::from_secs(10)).await);
        assert_eq!(ended.load(Ordering::SeqCst), 3, "all three loops ended");
        assert!(t.is_empty());

        let dropped = Tasks::new();
        dropped.spawn_until_cancelled(std::future::pending());
        assert!(dropped.join("dropped", Duration::from_secs(10)).await);

        let stuck = Tasks::new();
        stuck.spawn(std::future::pending());
        let t0 = std::time::Instant::now();
        assert!(!stuck.join("stuck", Duration::from_millis(100)).await);
        assert!(t0.elapsed() < Duration::from_secs(5), "join is bounded");
    }

    #[tokio::test]
    async fn a_child_set_is_cancelled_with_its_parent() {
        let parent = CancellationToken::new();
        let child = Tasks::child_of(&parent);
        assert!(!child.is_cancelled());
        parent.cancel();
        assert!(child.is_cancelled());
        assert!(!child.pause(Duration::from_secs(3600)).await);
    }
}
