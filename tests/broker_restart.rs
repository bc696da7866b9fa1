//! Broker restart mid-run (issue 10): batchline runs as a real process on a
//! Tansu broker of its own whose `sqlite://` storage survives a restart. The
//! broker is SIGKILLed while batches are in flight and started again on the
//! same port and database. The promise must hold as it does across a
//! batchline crash: every request gets a terminal result (a repeat only
//! identical), none is billed twice. After batchline's graceful stop the
//! broker is restarted once more: Tansu compacts `cleanup.policy=compact`
//! topics when it starts (its maintenance interval ticks at once), and the
//! state topic's live keys must then be only claims and marks.
//!
//! This binary points `common::brokers()` at its own broker, so every test
//! in it shares that broker (there is one).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A Tansu broker on a fixed port and a sqlite database in a temporary
/// directory, started, killed and started again. The child is owned by a
/// thread that lives as long as this handle, so that the parent-death
/// signal only fires when the test ends (it is tied to the spawning
/// thread, and tokio's threads come and go).
struct Broker {
    addr: String,
    dir: PathBuf,
    generation: usize,
    commands: mpsc::Sender<BrokerCommand>,
}

enum BrokerCommand {
    Start {
        log: PathBuf,
        done: mpsc::Sender<()>,
    },
    Kill {
        done: mpsc::Sender<()>,
    },
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let addr = format!("127.0.0.1:{}", free_port());
        let (commands, rx) = mpsc::channel::<BrokerCommand>();
        let (listen, cwd) = (addr.clone(), dir.to_owned());
        std::thread::spawn(move || {
            let mut child: Option<Child> = None;
            let kill = |child: &mut Option<Child>| {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            };
            for command in rx {
                match command {
                    BrokerCommand::Start { log, done } => {
                        kill(&mut child);
                        let log = std::fs::File::create(log).unwrap();
                        // `sqlite://tansu.db` is relative to the working
                        // directory. The filter logs only the compaction,
                        // whose `return=Ok(n)` says how many records it
                        // removed.
                        let mut cmd = tansu_broker(&listen, "sqlite://tansu.db");
                        cmd.current_dir(&cwd)
                            .env("RUST_LOG", "tansu_storage::lite[policy_compact]=info")
                            .env("NO_COLOR", "1")
                            .stdout(log.try_clone().unwrap())
                            .stderr(log);
                        child = Some(cmd.spawn().expect(
                            "starting tansu (`cargo install tansu --locked --features dynostore,libsql`)",
                        ));
                        let _ = done.send(());
                    }
                    BrokerCommand::Kill { done } => {
                        kill(&mut child);
                        let _ = done.send(());
                    }
                }
            }
            kill(&mut child);
        });
        let mut broker = Broker {
            addr,
            dir: dir.to_owned(),
            generation: 0,
            commands,
        };
        broker.restart();
        broker
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("tansu-{}.log", self.generation))
    }

    fn send(&self, command: impl FnOnce(mpsc::Sender<()>) -> BrokerCommand) {
        let (done, wait) = mpsc::channel();
        self.commands.send(command(done)).unwrap();
        wait.recv().unwrap();
    }

    /// SIGKILL: whatever the broker acknowledged is in its database.
    fn kill(&self) {
        self.send(|done| BrokerCommand::Kill { done });
    }

    /// Kills the broker if it runs, starts it on the same port and
    /// database, and waits until it serves.
    fn restart(&mut self) {
        self.generation += 1;
        let log = self.log();
        self.send(|done| BrokerCommand::Start { log, done });
        wait_for_line(&self.log(), |l| l.starts_with("ready in"), 1);
    }

    /// Waits for this generation's start-up compaction to finish: how many
    /// records it removed.
    fn compacted(&self) -> u64 {
        let done = |l: &str| l.contains("policy_compact") && l.contains("return=Ok(");
        wait_for_line(&self.log(), done, 1);
        let text = std::fs::read_to_string(self.log()).unwrap();
        let line = text.lines().find(|l| done(l)).unwrap();
        let n = line.split("return=Ok(").nth(1).unwrap();
        n[..n.find(')').unwrap()].parse().unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (60 s at most) until `log` has `count` lines for which `matches`
/// holds.
fn wait_for_line(log: &Path, matches: impl Fn(&str) -> bool, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().filter(|l| matches(l)).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never had {count} such lines:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory kept when the test fails: batchline's and Tansu's
/// logs, and Tansu's database (`sqlite3 tansu.db`).
struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = self.0.take().unwrap().keep();
            eprintln!(
                "broker_restart: logs and database kept in {}",
                kept.display()
            );
        }
    }
}

/// The simulator's batches by status.
async fn batch_statuses(sim: &Sim) -> BTreeMap<String, usize> {
    let list = sim.openai_get("/batches?limit=100").await;
    let mut out = BTreeMap::new();
    for b in list["data"].as_array().unwrap() {
        *out.entry(b["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    out
}

/// Waits for a result for every key of `expected`, checking all along that
/// batchline is still running.
fn wait_for_results(process: &mut Process, topic: &str, expected: &HashSet<String>) {
    let deadline = Instant::now() + RESULT_TIMEOUT;
    loop {
        process.assert_running();
        let (_, missing) = read_until_keys(topic, expected, Duration::from_secs(5));
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let mut sample: Vec<_> = missing.iter().collect();
            sample.sort();
            panic!(
                "{} of {} results missing after {RESULT_TIMEOUT:?} (batchline wedged after the broker restart?), e.g. {:?}; log:\n{}",
                missing.len(),
                expected.len(),
                &sample[..sample.len().min(5)],
                process.log_text()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_mid_run_keeps_the_promise_and_compacts_to_open_batches() {
    let dir = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let dir = dir.0.as_ref().unwrap();
    let mut broker = Broker::start(dir.path());
    use_brokers(&broker.addr);

    let sim = Sim::start(SimConfig {
        error_rate: 0.02,
        batch_duration: Duration::from_secs(2),
        seed: 10,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let config = write_config(dir.path(), &topics, &sim, "openai", Some(4));
    let n = 2000;
    let (records, expected) = numbered_chat_requests("restart", "openai", "gpt-4o-mini", n);

    let log = dir.path().join("batchline.log");
    let mut process = Process::start(&config, None, log.clone());
    wait_for_log(&log, "partition ready", 4);
    produce_unbatched(&topics.requests, &records).await;

    // Some results are out and batches are in flight: the broker dies.
    wait_for_count(&topics.results, n / 4, RESULT_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(30);
    let statuses = loop {
        let statuses = batch_statuses(&sim).await;
        if ["validating", "in_progress", "finalizing"]
            .iter()
            .any(|s| statuses.contains_key(*s))
        {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "no batch in flight to kill the broker under: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::task::block_in_place(|| broker.kill());
    // It stays down until batchline has noticed, then comes back on the
    // same port and database (and compacts at start).
    wait_for_log(&log, "; not ready", 1);
    tokio::task::block_in_place(|| broker.restart());
    let compacted_mid_run = tokio::task::block_in_place(|| broker.compacted());
    wait_for_log(&log, "kafka brokers reachable again", 1);

    tokio::task::block_in_place(|| {
        wait_for_results(&mut process, &topics.results, &expected);
        process.stop();
    });
    let submitted = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("batch submitted"))
        .count();
    eprintln!(
        "broker_restart: batches by status when the broker was killed: {statuses:?}; the restart compacted {compacted_mid_run} records; {submitted} batches submitted in all"
    );
    check_promise(&topics, &sim, &expected).await;

    // Another restart: Tansu compacts at start. Waiting for its log line
    // makes the read below see the compacted log.
    tokio::task::block_in_place(|| broker.restart());
    let compacted = tokio::task::block_in_place(|| broker.compacted());
    check_state_topic(&topics.state, compacted).await;
}

/// Every custom_id has a result, repeats are identical, nothing was billed
/// twice, and the status agrees with the bill.
async fn check_promise(topics: &Topics, sim: &Sim, expected: &HashSet<String>) {
    let mut results: HashMap<String, serde_json::Value> = HashMap::new();
    let mut repeats = 0;
    // A repeat at an offset already read is the reader's (Tansu's), not a
    // second publish: count it apart.
    let mut offsets = HashSet::new();
    let mut redelivered = 0;
    for r in read_all(&topics.results).await {
        if !offsets.insert((r.partition, r.offset)) {
            redelivered += 1;
            continue;
        }
        let v = r.json();
        assert_eq!(v["custom_id"].as_str(), Some(r.key_str()), "{v}");
        if let Some(earlier) = results.insert(r.key_str().to_owned(), v.clone()) {
            repeats += 1;
            assert_eq!(earlier, v, "a repeated result is identical");
        }
    }
    assert_eq!(
        &results.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "every request has a result"
    );
    let stats = sim.stats().await;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for (id, r) in &results {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert!(billed <= 1, "{id} billed {billed} times");
        let status = r["status"].as_str().unwrap();
        match status {
            "succeeded" => assert_eq!(billed, 1, "{r}"),
            "errored" => assert_eq!(billed, 0, "{r}"),
            other => panic!("unexpected status {other}: {r}"),
        }
        *by_status.entry(status.to_owned()).or_default() += 1;
        assert_eq!(r["metadata"]["id"], id.as_str(), "metadata comes back: {r}");
    }
    eprintln!(
        "broker_restart: {} results ({repeats} published twice, {redelivered} read twice at one offset), by status {by_status:?}",
        results.len()
    );
}

/// After the start-up compaction the log holds one record per key (Tansu
/// keeps the latest, tombstones included, and never drops tombstones), and
/// the keys whose latest value is not a tombstone are each partition's latest
/// claim and mark only: every batch was finished, committed and tombstoned,
/// and so were earlier claims and marks.
async fn check_state_topic(state: &str, compacted: u64) {
    let read = read_all(state).await;
    // Tansu 0.6 hands a reader of a compacted partition (offsets with gaps)
    // some records a second time, at their own offsets, after later ones:
    // count each offset once.
    let mut seen = HashSet::new();
    let records: Vec<&Record> = read
        .iter()
        .filter(|r| seen.insert((r.partition, r.offset)))
        .collect();
    if std::env::var_os("DEBUG_STATE").is_some() {
        for r in &read {
            eprintln!(
                "p{} o{} {} {}",
                r.partition,
                r.offset,
                r.key_str(),
                r.value.is_some()
            );
        }
    }
    let mut latest: BTreeMap<String, bool> = BTreeMap::new();
    let mut seen_twice = Vec::new();
    for r in &records {
        if latest
            .insert(r.key_str().to_owned(), r.value.is_some())
            .is_some()
        {
            seen_twice.push(r.key_str().to_owned());
        }
    }
    let live: Vec<&String> = latest
        .iter()
        .filter(|(_, live)| **live)
        .map(|(k, _)| k)
        .collect();
    let tombstoned = latest.values().filter(|live| !**live).count();
    let kind = |key: &str| key.split('/').nth(1).unwrap_or("").to_owned();
    let mut live_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for k in &live {
        *live_by_kind.entry(kind(k)).or_default() += 1;
    }
    eprintln!(
        "broker_restart: state topic after the final restart's compaction ({compacted} records removed): {} records ({} read), {} keys, {tombstoned} tombstoned, live {live_by_kind:?}",
        records.len(),
        read.len(),
        latest.len()
    );
    assert!(
        seen_twice.is_empty(),
        "Tansu compacted at start, yet keys appear more than once: {:?}",
        &seen_twice[..seen_twice.len().min(5)]
    );
    assert!(tombstoned > 0, "finished batches' records were tombstoned");
    let open: Vec<&&String> = live
        .iter()
        .filter(|k| !matches!(kind(k).as_str(), "claim" | "mark"))
        .collect();
    assert!(
        open.is_empty(),
        "every batch finished, yet the state topic has live batch keys: {open:?}"
    );
    // Earlier claims and marks are tombstoned once the owner has marked
    // and no batch of theirs is live: each partition keeps its latest
    // claim, and at most one mark.
    assert_eq!(
        live_by_kind.get("claim").copied().unwrap_or(0),
        4,
        "each of the 4 partitions has its latest claim live, and only that: {live:?}"
    );
    assert!(
        live_by_kind.get("mark").copied().unwrap_or(0) <= 4,
        "at most one mark per partition is live: {live:?}"
    );
}
