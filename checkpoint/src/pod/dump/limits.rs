//! When a dump must stop: its deadline passed, or its caller gave up.

use std::time::Duration;

use podsnap_runtime::launcher::Limit;

use crate::error::{Error, Result};

/// Fails once the deadline passed or the caller gave up, saying during what.
pub(super) fn check(limit: &Limit, deadline: Duration, during: &str) -> Result<()> {
    if limit.cancelled() {
        return Err(Error::Stopped {
            reason: format!("the caller gave up {during}"),
        });
    }
    if limit.expired() {
        return Err(Error::Stopped {
            reason: format!("the dump deadline of {} s passed {during}", deadline.as_secs()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_in_time_goes_on() {
        let limit = Limit::after(Duration::from_secs(60), None);
        assert!(check(&limit, Duration::from_secs(60), "while freezing the pod").is_ok());
    }

    #[test]
    fn a_passed_deadline_says_when_it_passed() {
        let limit = Limit::after(Duration::ZERO, None);
        let err = check(&limit, Duration::from_secs(7), "while the pod was frozen")
            .expect_err("expired")
            .to_string();
        assert!(
            err.contains("the dump deadline of 7 s passed while the pod was frozen"),
            "{err}"
        );
    }

    #[test]
    fn a_caller_that_gave_up_is_named_first() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let limit = Limit::after(Duration::ZERO, Some(rx));
        tx.send(true).expect("send");
        let err = check(&limit, Duration::from_secs(7), "before the freeze")
            .expect_err("cancelled")
            .to_string();
        assert!(err.contains("the caller gave up before the freeze"), "{err}");
    }
}
