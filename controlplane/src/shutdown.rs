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

/// Makes a panic on any thread end the process (after the panic message and a log
/// line), as an assertion should: a daemon whose dataplane core, transport or FUSE
/// thread died would otherwise keep running with requests waiting on that thread for
/// ever. Aborting is a crash the store is built for: what was acknowledged is durable
/// and the next start recovers it from the log; the service manager restarts the node.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            panic = %info,
            "a thread panicked: aborting the daemon (the store recovers at the next start)"
        );
        std::process::abort();
    }));
}
