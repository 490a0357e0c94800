//! Fault injection for the integration tests: a stage process aborts, or
//! stalls, on a message whose payload contains a marker. Compiled only with the
//! `fault-injection` feature, which only the test build turns on, so a
//! production binary neither reads these variables nor carries the code.

use std::time::Duration;

/// Environment variable: a process aborts when a message's payload contains its value.
pub const FAULT_CRASH_ON_ENV: &str = "PIPELINE_FAULT_CRASH_ON";

/// Environment variable, `<text>=<millis>`: handling a message whose payload
/// contains `<text>` first sleeps that long (a slow image).
pub const FAULT_SLOW_ON_ENV: &str = "PIPELINE_FAULT_SLOW_ON";

/// The hooks of one process, read once at start.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    crash_on: Option<String>,
    slow_on: Option<(String, Duration)>,
}

impl Faults {
    /// Reads [`FAULT_CRASH_ON_ENV`] and [`FAULT_SLOW_ON_ENV`]; unset disables each.
    pub fn from_env() -> Self {
        Self {
            crash_on: std::env::var(FAULT_CRASH_ON_ENV).ok().filter(|v| !v.is_empty()),
            slow_on: std::env::var(FAULT_SLOW_ON_ENV).ok().and_then(|v| {
                let (needle, millis) = v.rsplit_once('=')?;
                Some((needle.to_string(), Duration::from_millis(millis.parse().ok()?)))
            }),
        }
    }

    /// Aborts the process when `payload` carries the crash marker.
    pub fn crash_if_marked(&self, payload: &[u8], span: &tracing::Span) {
        if let Some(needle) = &self.crash_on {
            if contains_bytes(payload, needle.as_bytes()) {
                tracing::error!(parent: span, "fault injection: aborting on this message");
                std::process::abort();
            }
        }
    }

    /// Sleeps when `payload` carries the slow marker.
    pub async fn stall_if_marked(&self, payload: &[u8], span: &tracing::Span) {
        if let Some((needle, delay)) = &self.slow_on {
            if contains_bytes(payload, needle.as_bytes()) {
                tracing::warn!(parent: span, ?delay, "fault injection: slow message");
                tokio::time::sleep(*delay).await;
            }
        }
    }
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
