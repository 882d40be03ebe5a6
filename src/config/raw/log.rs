//! `[log]`: the format and level of log lines.

use serde::Deserialize;

use super::CheckError;
use crate::config::LogConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    format: LogFormat,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl RawLog {
    pub(super) fn check(self) -> Result<LogConfig, CheckError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| ("log.level", e.to_string()))?;
        Ok(LogConfig {
            format: self.format,
            level: self.level,
        })
    }
}
