//! The graceful-shutdown signal of the control plane's servers: a `tokio::sync::watch`
//! channel of `bool`. Sending `true` asks every server holding a receiver to stop
//! accepting, finish the requests in progress and return.

use tokio::sync::watch;

/// Sends the shutdown signal: `send_replace(true)` (never fails, receivers or not).
pub type ShutdownSender = watch::Sender<bool>;
/// Receives the shutdown signal; clone one per server.
pub type ShutdownReceiver = watch::Receiver<bool>;

/// A new shutdown channel, not signalled.
pub fn channel() -> (ShutdownSender, ShutdownReceiver) {
    watch::channel(false)
}

/// Resolves once shutdown is signalled, or once every sender is dropped (nobody could
/// signal it any more: the daemon is going away).
pub async fn requested(rx: &mut ShutdownReceiver) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
