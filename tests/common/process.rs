//! batchline as a real child process, for the crash and broker-restart
//! tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{brokers, Sim, Topics};

/// batchline as a child process on a config file written for it; killed
/// when dropped.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

/// A batchline configuration for `topics` and `sim` in `dir` (created if
/// missing): short session
/// and rebalance timeouts, fast polling, small windows. `in_flight` caps the
/// OpenAI provider's batches in flight (default: its own).
pub fn write_config(
    dir: &Path,
    topics: &Topics,
    sim: &Sim,
    provider: &str,
    in_flight: Option<u32>,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let spool = dir.join("spool");
    let base = |prefix: &str| format!("http://{}/{prefix}/v1", sim.addr);
    let toml = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
[kafka.consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "1000"

[topics]
requests = "{requests}"
results = "{results}"
dlq = "{dlq}"
state = "{state}"

[window]
max_wait = "300ms"
max_requests = 100

[routing]
default_provider = "{provider}"

[providers.openai]
base_url = "{openai}"
poll_interval = "100ms"
max_batches_in_flight = {in_flight}
[providers.anthropic]
base_url = "{anthropic}"
poll_interval = "100ms"
[providers.xai]
base_url = "{xai}"
poll_interval = "100ms"

[batch]
lookup_grace = "300ms"
create_deadline = "10s"

[retry]
initial_backoff = "50ms"
max_backoff = "500ms"

[spool]
dir = "{spool}"

[http]
listen = "127.0.0.1:0"

[shutdown]
timeout = "20s"
"#,
        brokers = brokers(),
        group = topics.group,
        requests = topics.requests,
        results = topics.results,
        dlq = topics.dlq,
        state = topics.state,
        openai = base("openai"),
        anthropic = base("anthropic"),
        xai = base("xai"),
        spool = spool.display(),
        in_flight = in_flight.unwrap_or(20),
    );
    let path = dir.join("batchline.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

impl Process {
    pub fn start(config: &Path, failpoint: Option<&str>, log: std::path::PathBuf) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchline"));
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("OPENAI_API_KEY", "sk-test")
            .env("ANTHROPIC_API_KEY", "sk-ant-test")
            .env("XAI_API_KEY", "xai-test")
            // `BATCHLINE_TEST_LOG` overrides the children's filter, e.g.
            // `info,batchline=debug` when chasing a chaos failure.
            .env(
                "RUST_LOG",
                std::env::var("BATCHLINE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // A bare name aborts there; `name=action` (the fail crate's
        // syntax, e.g. `mid_publish=sleep(3000)`) is passed as it is.
        if let Some(fp) = failpoint {
            let spec = if fp.contains('=') {
                fp.to_owned()
            } else {
                format!("{fp}=return")
            };
            // A sleeping failpoint blocks its tokio worker: enough workers
            // keep the batches that are not asleep going.
            if spec.contains("sleep(") {
                cmd.env("TOKIO_WORKER_THREADS", "16");
            }
            cmd.env("FAILPOINTS", spec);
        }
        Process {
            child: cmd.spawn().expect("starting batchline"),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the log, if batchline has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("batchline exited ({status}); log:\n{}", self.log_text());
        }
    }

    /// Waits for the process to die at its failpoint.
    pub fn wait_for_abort(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "batchline exited cleanly instead of aborting"
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "batchline did not reach its failpoint within {timeout:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        self.assert_running();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "batchline exited with {status} after SIGTERM; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            assert!(Instant::now() < deadline, "batchline ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `log` has `count` lines containing `needle`.
pub fn wait_for_log(log: &Path, needle: &str, count: usize) {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.lines().filter(|l| l.contains(needle)).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {count} × `{needle}`:\n{text}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}
