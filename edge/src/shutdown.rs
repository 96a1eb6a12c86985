//! One shutdown signal every task watches (the mini-redis pattern, on a `watch` channel so
//! late subscribers still see it).

use tokio::sync::watch;

/// Fires the shutdown; dropping it fires too, so a panicking owner cannot leave tasks running.
pub struct ShutdownTrigger(watch::Sender<bool>);

#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown was fired (or the trigger dropped). Cancel-safe.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone: treat as fired.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
