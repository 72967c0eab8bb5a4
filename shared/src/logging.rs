//! Log set-up for command-line tools; nodes use [`crate::telemetry::init`],
//! which adds trace export.

use crate::config::LogFormat;

pub use crate::telemetry::DEFAULT_FILTER;

/// Installs the global subscriber (logs on stderr, no trace export); a
/// second call is a no-op.
pub fn init(format: LogFormat) {
    crate::telemetry::init_logs(format);
}
