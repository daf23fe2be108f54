//! `tracing` subscriber setup: an `EnvFilter` from `[log] level`, text or JSON lines on
//! stderr, and a [`LogHandle`] that changes the filter at run time (`log level` on the
//! admin socket).

use std::fmt;
use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};
use crate::Error;

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

/// Parses a log level or filter: one of error, warn, info, debug, trace, off, or an
/// `EnvFilter` directive list such as `"info,spool_dataplane=debug"`.
///
/// A single bare word that is not a level is rejected: `EnvFilter` would read it as a
/// target name and silence everything else (a typo such as "warning" would do that);
/// write `TARGET=trace` for a single target.
pub fn parse_level(level: &str) -> Result<EnvFilter, String> {
    let level = level.trim();
    if level.is_empty() {
        return Err("must not be empty: use error, warn, info, debug, trace or off".to_owned());
    }
    let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level));
    if !is_level && !level.contains(['=', ',', '[']) {
        return Err(format!(
            "not a level (error, warn, info, debug, trace, off) nor a filter such as \
             \"info,spool_dataplane=debug\"; for one target write \"{level}=trace\""
        ));
    }
    EnvFilter::try_new(level).map_err(|e| format!("invalid log filter: {e}"))
}

/// Changes the log filter of the subscriber it came from.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogHandle {
    /// Replaces the filter (same syntax as `[log] level`). On error the filter in
    /// force is kept.
    pub fn set_level(&self, level: &str) -> Result<(), Error> {
        let filter =
            parse_level(level).map_err(|why| Error::Log(format!("level {level:?}: {why}")))?;
        self.reload
            .reload(filter)
            .map_err(|e| Error::Log(format!("cannot change the level: {e}")))?;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = level.trim().to_owned();
        tracing::info!(level = level.trim(), "log level changed");
        Ok(())
    }

    /// The filter in force, as it was given.
    pub fn level(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogHandle")
            .field("level", &self.level())
            .finish_non_exhaustive()
    }
}

/// Builds the subscriber (not installed) writing to `writer`, and its handle. Tests use
/// it with `tracing::subscriber::with_default`.
pub fn build<W>(
    config: &LogConfig,
    writer: W,
    ansi: bool,
) -> Result<(impl Subscriber + Send + Sync + 'static, LogHandle), Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = parse_level(&config.level)
        .map_err(|why| Error::Log(format!("log.level = {:?}: {why}", config.level)))?;
    let (filter, reload) = reload::Layer::new(filter);
    let output = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed(),
    };
    let subscriber = Registry::default().with(filter).with(output);
    let handle = LogHandle {
        reload,
        current: Mutex::new(config.level.trim().to_owned()),
    };
    Ok((subscriber, handle))
}

/// Installs the process-wide subscriber (stderr; colours only on a terminal) and
/// returns the handle that changes its level. Fails if one is installed already.
pub fn init(config: &LogConfig) -> Result<LogHandle, Error> {
    let ansi = std::io::stderr().is_terminal();
    let (subscriber, handle) = build(config, std::io::stderr, ansi)?;
    subscriber
        .try_init()
        .map_err(|e| Error::Log(format!("cannot install the logger: {e}")))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `MakeWriter` that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn config(level: &str, format: LogFormat) -> LogConfig {
        LogConfig {
            level: level.to_owned(),
            format,
        }
    }

    #[test]
    fn levels_and_filters_parse() {
        for ok in [
            "info",
            "DEBUG",
            " warn ",
            "off",
            "info,spool_dataplane=debug",
            "spool=trace",
        ] {
            assert!(parse_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "  ", "warning", "verbose", "spool=loud"] {
            assert!(parse_level(bad).is_err(), "{bad}");
        }
        assert!(parse_level("warning")
            .unwrap_err()
            .contains("warning=trace"));
    }

    #[test]
    fn level_changes_at_run_time() {
        let out = Capture::default();
        let (subscriber, handle) =
            build(&config("info", LogFormat::Text), out.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden-before");
            tracing::info!("shown-info");
            handle.set_level("debug").unwrap();
            tracing::debug!("shown-after");
            assert!(handle.set_level("nonsense").is_err());
            assert_eq!(handle.level(), "debug");
            handle.set_level("error").unwrap();
            tracing::info!("hidden-again");
        });
        let text = out.text();
        assert!(!text.contains("hidden-before"), "{text}");
        assert!(text.contains("shown-info"), "{text}");
        assert!(text.contains("shown-after"), "{text}");
        assert!(!text.contains("hidden-again"), "{text}");
        assert_eq!(handle.level(), "error");
    }

    #[test]
    fn json_format_writes_one_object_per_line() {
        let out = Capture::default();
        let (subscriber, _handle) =
            build(&config("info", LogFormat::Json), out.clone(), false).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(cores = 2, "started");
        });
        let text = out.text();
        let line = text.lines().next().unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["message"], "started");
        assert_eq!(v["cores"], 2);
        assert_eq!(v["level"], "INFO");
    }

    #[test]
    fn bad_level_is_an_error() {
        assert!(build(
            &config("warning", LogFormat::Text),
            Capture::default(),
            false
        )
        .is_err());
    }
}
