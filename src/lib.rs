//! batchline: a Kafka stream processor that turns a stream of LLM requests
//! into provider batch jobs and publishes one result per request.
//!
//! The crate is a library first; `main.rs` only parses the command line.
//! Stages, in pipeline order: [`ingest`] → [`packer`] → [`submitter`] →
//! [`tracker`] → [`collector`] → [`publisher`], wired by [`app`].

pub mod app;
pub mod bench;
pub mod budget;
pub mod cli;
pub mod collector;
pub mod config;
pub mod health;
pub mod http;
pub mod ingest;
pub mod journal;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod packer;
pub mod provider;
pub mod publisher;
pub mod send;
pub mod sim;
pub mod state;
pub mod status;
pub mod submitter;
pub mod tail;
pub mod tracker;

/// A named crash point for crash tests: with the `failpoints` feature and
/// `FAILPOINTS=<name>=return`, the process aborts here. Without the feature
/// it compiles to nothing.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                tracing::error!(failpoint = $name, "failpoint reached; aborting");
                std::process::abort();
            }
        }
    };
}
