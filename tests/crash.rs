//! Crash tests: batchline runs as a real process, aborts at a failpoint, and
//! is started again on the same group, topics and simulator. Every request
//! must get a terminal result, none may be billed twice, and a result may be
//! repeated only identically (DESIGN.md "Durability").
//!
//! Needs the `failpoints` feature (the README's test command enables it).
#![cfg(feature = "failpoints")]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::*;

/// Runs `n` requests for `provider` through a batchline that aborts at
/// `failpoint`, then through a fresh one, and checks the promise.
async fn crash_and_recover(provider: &str, model: &str, failpoint: &str) {
    let n = 300;
    let sim = Sim::start(SimConfig {
        error_rate: 0.05,
        seed: 9,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &topics, &sim, provider, None);
    let (records, expected) =
        numbered_chat_requests(&format!("{failpoint}-{provider}"), provider, model, n);
    produce_unbatched(&topics.requests, &records).await;

    let mut first = Process::start(&config, Some(failpoint), dir.path().join("first.log"));
    tokio::task::block_in_place(|| first.wait_for_abort(Duration::from_secs(90)));
    let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(
        log.contains("failpoint reached; aborting") && log.contains(failpoint),
        "the first run stopped at {failpoint}:\n{log}"
    );

    let second = Process::start(&config, None, dir.path().join("second.log"));
    wait_for_keys(&topics.results, &expected, RESULT_TIMEOUT);
    tokio::task::block_in_place(|| second.stop());

    check_promise(&topics, &sim, &expected, provider, failpoint).await;
}

/// Every custom_id has a result, repeats are identical, nothing was billed
/// twice, and the status agrees with the bill.
async fn check_promise(
    topics: &Topics,
    sim: &Sim,
    expected: &HashSet<String>,
    provider: &str,
    label: &str,
) {
    let failpoint = label;
    let mut results: HashMap<String, serde_json::Value> = HashMap::new();
    let mut repeats = 0;
    for r in read_all(&topics.results).await {
        let v = r.json();
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
    // Repeats are possible for any failpoint: another batch may have been
    // publishing when the process died; they were checked identical above.
    eprintln!(
        "{failpoint}/{provider}: {} results, {repeats} repeated",
        results.len()
    );
    let stats = sim.stats().await;
    for (id, r) in &results {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        assert!(billed <= 1, "{id} billed {billed} times");
        match r["status"].as_str().unwrap() {
            "succeeded" => assert_eq!(billed, 1, "{r}"),
            "errored" => assert_eq!(billed, 0, "{r}"),
            other => panic!("unexpected status {other}: {r}"),
        }
        assert_eq!(r["provider"], provider);
        assert_eq!(r["metadata"]["id"], id.as_str(), "metadata comes back: {r}");
    }
}

macro_rules! crash_tests {
    ($($name:ident: $provider:literal, $model:literal, $failpoint:literal;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            crash_and_recover($provider, $model, $failpoint).await;
        }
    )*};
}

crash_tests! {
    openai_after_intent: "openai", "gpt-4o-mini", "after_intent";
    openai_after_upload: "openai", "gpt-4o-mini", "after_upload";
    openai_after_create: "openai", "gpt-4o-mini", "after_create";
    openai_while_polling: "openai", "gpt-4o-mini", "while_polling";
    openai_mid_publish: "openai", "gpt-4o-mini", "mid_publish";
    openai_before_commit: "openai", "gpt-4o-mini", "before_commit";
    xai_after_intent: "xai", "grok-4.3", "after_intent";
    xai_after_upload: "xai", "grok-4.3", "after_upload";
    xai_after_create: "xai", "grok-4.3", "after_create";
    xai_while_polling: "xai", "grok-4.3", "while_polling";
    xai_mid_publish: "xai", "grok-4.3", "mid_publish";
    xai_before_commit: "xai", "grok-4.3", "before_commit";
    anthropic_after_intent: "anthropic", "claude-haiku-4-5", "after_intent";
    anthropic_after_create: "anthropic", "claude-haiku-4-5", "after_create";
    anthropic_while_polling: "anthropic", "claude-haiku-4-5", "while_polling";
    anthropic_mid_publish: "anthropic", "claude-haiku-4-5", "mid_publish";
    anthropic_before_commit: "anthropic", "claude-haiku-4-5", "before_commit";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_between_instances_with_batches_in_flight() {
    // Two instances share the group; one is SIGKILLed mid-run and a third
    // joins. The cooperative rebalances move partitions whose batches are
    // in flight: their new owners carry on from the journal.
    let sim = Sim::start(SimConfig {
        error_rate: 0.02,
        batch_duration: Duration::from_secs(4),
        seed: 4,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| write_config(&dir.path().join(name), &topics, &sim, "openai", None);
    let n = 2000;
    let (records, expected) = numbered_chat_requests("move", "openai", "gpt-4o-mini", n);
    let a_log = dir.path().join("a.log");
    let mut a = Process::start(&config("a"), None, a_log.clone());
    wait_for_log(&a_log, "partition ready", 4);
    produce_unbatched(&topics.requests, &records).await;
    // B joins while A has batches in flight: a clean hand-over.
    wait_for_log(&a_log, "batch submitted", 4);
    let b = Process::start(&config("b"), None, dir.path().join("b.log"));
    wait_for_count(&topics.results, n / 4, RESULT_TIMEOUT);
    // A dies with batches open; its partitions go to B, then some to C.
    wait_for_log(&a_log, "batch submitted", 8);
    let _ = a.child.kill();
    let _ = a.child.wait();
    let c = Process::start(&config("c"), None, dir.path().join("c.log"));
    let (_, missing) = read_until_keys(&topics.results, &expected, RESULT_TIMEOUT);
    if !missing.is_empty() {
        let kept = dir.keep();
        let mut sample: Vec<_> = missing.iter().collect();
        sample.sort();
        panic!(
            "{} of {n} results missing, e.g. {:?}; the instances' logs are kept in {}",
            missing.len(),
            &sample[..sample.len().min(5)],
            kept.display()
        );
    }
    tokio::task::block_in_place(|| {
        b.stop();
        c.stop();
    });
    check_promise(&topics, &sim, &expected, "openai", "rebalance").await;
    // The kill did leave batches open, and a new owner took them over.
    let taken_over = ["b.log", "c.log"]
        .iter()
        .map(|l| std::fs::read_to_string(dir.path().join(l)).unwrap())
        .filter(|log| log.contains("open batch re-read from the input topic"))
        .count();
    if taken_over == 0 {
        for l in ["a.log", "b.log", "c.log"] {
            let log = std::fs::read_to_string(dir.path().join(l)).unwrap();
            for line in log.lines().filter(|l| {
                l.contains("assigned")
                    || l.contains("revoked")
                    || l.contains("replayed")
                    || l.contains("batch submitted")
            }) {
                eprintln!("{l}: {line}");
            }
        }
        panic!("no open batch changed hands");
    }
}

/// What a hand-over run left: both instances' logs.
struct HandOver {
    a_log: String,
    b_log: String,
}

/// Instance A runs `n` requests over 4 partitions with `failpoint` pausing
/// its batches; once `paused` appears 4 times in its log, B joins and takes
/// partitions from A while they are paused. Checks that every request has
/// exactly one result (no repeat at all) and was billed as its status says.
async fn hand_over_while_paused(prefix: &str, n: usize, failpoint: &str, paused: &str) -> HandOver {
    let sim = Sim::start(SimConfig {
        batch_duration: Duration::from_secs(1),
        seed: 7,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| write_config(&dir.path().join(name), &topics, &sim, "openai", None);
    let (records, expected) = numbered_chat_requests(prefix, "openai", "gpt-4o-mini", n);
    let (a_log, b_log) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let a = Process::start(&config("a"), Some(failpoint), a_log.clone());
    wait_for_log(&a_log, "partition ready", 4);
    produce_unbatched(&topics.requests, &records).await;
    wait_for_log(&a_log, paused, 4);
    let b = Process::start(&config("b"), None, b_log.clone());
    // B gets its partitions once A has let them go.
    wait_for_log(&b_log, "partition ready", 1);
    let (_, missing) = read_until_keys(&topics.results, &expected, RESULT_TIMEOUT);
    tokio::task::block_in_place(|| {
        b.stop();
        a.stop();
    });
    assert!(missing.is_empty(), "{} results missing", missing.len());
    check_promise(&topics, &sim, &expected, "openai", prefix).await;
    // Every custom_id exactly once: no repeat at all (past the end markers
    // the read above wrote).
    let results: Vec<Record> = read_all(&topics.results)
        .await
        .into_iter()
        .filter(|r| !r.key_str().starts_with("end-of-log"))
        .collect();
    assert_eq!(exactly_once(&results).len(), n);
    HandOver {
        a_log: std::fs::read_to_string(&a_log).unwrap(),
        b_log: std::fs::read_to_string(&b_log).unwrap(),
    }
}

/// The lines of `log` that tell how partitions and batches moved.
fn moves(log: &str) -> String {
    log.lines()
        .filter(|l| {
            [
                "revo",
                "uploaded",
                "handed",
                "submitted",
                "assigned",
                "ready",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_hand_over_publishes_nothing_twice() {
    // A's collections pause halfway through their results, and B joins
    // meanwhile: the revocation of the partitions B takes waits for those
    // collections to publish, confirm their `done` and commit, so B
    // publishes none of their results again (100 repeats without the wait).
    let run =
        hand_over_while_paused("handover", 400, "mid_publish=sleep(6000)", "batch ended").await;
    assert!(
        run.a_log
            .contains("revocation waits for the collections in progress"),
        "no collection was in progress at the revocation; A's log:\n{}",
        moves(&run.a_log)
    );
    assert!(!run
        .a_log
        .contains("collections still running at the revocation deadline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_over_before_the_create_sends_none_and_hands_the_requests_back() {
    // A's batches pause between their `uploaded` record and their create,
    // and B joins meanwhile: the revocation waits for them; on the
    // partitions B takes they send no create and hand their requests back
    // through a `done`, which B packs again at once, with no create to
    // resolve by lookup.
    let run = hand_over_while_paused(
        "release",
        200,
        "after_upload=sleep(8000)",
        "batch file uploaded",
    )
    .await;
    assert!(
        run.a_log
            .contains("partition handed over before the create was sent"),
        "no batch of a revoked partition was between its upload and its create; A's log:\n{}",
        moves(&run.a_log)
    );
    assert!(
        !run.b_log
            .contains("resolving a create a previous owner may have sent"),
        "B had a create to resolve; B's log:\n{}",
        moves(&run.b_log)
    );
}

/// The chaos run: 20,000 requests over 4 partitions and two instances,
/// three SIGKILLs with a fresh instance each time, 429 and 5xx storms, 1 %
/// per-request errors, expiring batches and ambiguous creates. It prints
/// requests in, results out, repeats and the most successes billed for one
/// custom_id (must be 1). It is part of the test command; alone:
/// `cargo test --features failpoints --test crash chaos -- --nocapture`
/// (`CHAOS_REQUESTS` changes the size, `CHAOS_TIMEOUT_SECS` the wait,
/// `CHAOS_KEEP_LOGS=1` keeps the instances' logs of a passing run; a failing
/// run always keeps them). It found a stall (a partition claimed twice), a
/// double bill (an instance not adopting its own earlier create) and an
/// orphan judged before its partition's replay had ended, all fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos() {
    let n: usize = std::env::var("CHAOS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let sim = Sim::start(SimConfig {
        error_rate: 0.01,
        http_429_rate: 0.1,
        http_5xx_rate: 0.05,
        ambiguous_create_rate: 0.2,
        expire_rate: 0.05,
        expire_completed_fraction: 0.5,
        batch_duration: Duration::from_secs(2),
        seed: 2026,
        ..SimConfig::default()
    })
    .await;
    let topics = Topics::create(4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut generation = 0;
    let mut start = |dir: &Path| {
        generation += 1;
        let d = dir.join(format!("i{generation}"));
        let config = write_config(&d, &topics, &sim, "openai", None);
        let log = d.join("batchline.log");
        (Process::start(&config, None, log.clone()), log)
    };
    let (records, expected) = numbered_chat_requests("chaos", "openai", "gpt-4o-mini", n);
    let mut running = vec![start(dir.path()), start(dir.path())];
    produce_unbatched(&topics.requests, &records).await;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for kill in 1..=3 {
        wait_for_count(&topics.results, n * kill / 5, RESULT_TIMEOUT);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (mut victim, _) = running.swap_remove((rng % running.len() as u64) as usize);
        let _ = victim.child.kill();
        let _ = victim.child.wait();
        eprintln!("chaos: SIGKILL {kill}");
        running.push(start(dir.path()));
    }
    let timeout = std::env::var("CHAOS_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(900));
    let (_, missing) = read_until_keys(&topics.results, &expected, timeout);
    if !missing.is_empty() {
        chaos_post_mortem(&topics, &sim, dir, &missing, timeout).await;
    }
    tokio::task::block_in_place(|| {
        for (p, _) in running {
            p.stop();
        }
    });
    if std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let out = std::path::PathBuf::from(format!("/tmp/chaos-logs-{stamp}-passed"));
        copy_logs(dir.path(), &out);
        eprintln!("chaos: logs kept in {}", out.display());
    }
    let mut results: HashMap<String, serde_json::Value> = HashMap::new();
    let mut repeats = 0;
    for r in read_all(&topics.results).await {
        let v = r.json();
        if let Some(earlier) = results.insert(r.key_str().to_owned(), v.clone()) {
            repeats += 1;
            assert_eq!(earlier, v, "a repeated result is identical");
        }
    }
    let stats = sim.stats().await;
    let max_billed = expected
        .iter()
        .map(|id| stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let mut by_status: HashMap<String, usize> = HashMap::new();
    for r in results.values() {
        *by_status
            .entry(r["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    eprintln!(
        "chaos: {n} requests in, {} results out ({repeats} repeats), by status {by_status:?}, max billed successes per custom_id {max_billed}",
        results.len()
    );
    assert_eq!(results.len(), n);
    if max_billed > 1 {
        let twice: Vec<(&String, &serde_json::Value)> = expected
            .iter()
            .filter(|id| {
                stats["custom_ids"][id.as_str()]["billed"]
                    .as_u64()
                    .unwrap_or(0)
                    > 1
            })
            .map(|id| (id, &results[id]))
            .collect();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let out = std::path::PathBuf::from(format!("/tmp/chaos-logs-{stamp}-billed-twice"));
        copy_logs(dir.path(), &out);
        panic!(
            "{} custom_ids billed twice, e.g. {:?}; logs kept in {}",
            twice.len(),
            &twice[..twice.len().min(3)],
            out.display()
        );
    }
    for (id, r) in &results {
        let billed = stats["custom_ids"][id]["billed"].as_u64().unwrap_or(0);
        if r["status"] == "succeeded" {
            assert_eq!(billed, 1, "{r}");
        }
    }
}

/// Copies each instance's log (`<dir>/i<n>/batchline.log`) to `out/i<n>.log`.
fn copy_logs(dir: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let log = entry.path().join("batchline.log");
        if log.exists() {
            let name = entry.file_name().to_string_lossy().into_owned();
            std::fs::copy(&log, out.join(format!("{name}.log"))).unwrap();
        }
    }
}

/// A chaos run left results missing: keep every log, dump the state topic,
/// the committed offsets and where each missing request sits in the input,
/// then fail.
async fn chaos_post_mortem(
    topics: &Topics,
    sim: &Sim,
    dir: tempfile::TempDir,
    missing: &HashSet<String>,
    timeout: Duration,
) -> ! {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = std::path::PathBuf::from(format!("/tmp/chaos-logs-{stamp}"));
    let kept = dir.keep();
    copy_logs(&kept, &out);
    // Tansu's high watermark lags behind multi-record batches: are the
    // "missing" results really absent, or just not yet visible to a reader?
    let present: HashSet<String> = read_all(&topics.results)
        .await
        .iter()
        .map(|r| r.key_str().to_owned())
        .collect();
    let really_missing = missing.iter().filter(|k| !present.contains(*k)).count();
    // Where the missing requests sit in the input topic.
    let mut position: HashMap<String, (i32, i64)> = HashMap::new();
    for r in read_all(&topics.requests).await {
        position.insert(r.key_str().to_owned(), (r.partition, r.offset));
    }
    let mut by_partition: std::collections::BTreeMap<i32, Vec<(i64, String)>> = Default::default();
    for id in missing {
        let (p, o) = position.get(id).copied().unwrap_or((-1, -1));
        by_partition.entry(p).or_default().push((o, id.clone()));
    }
    let mut report = format!(
        "{} missing by the waiting reader, {really_missing} still missing when read to an end marker\n",
        missing.len()
    );
    for (p, mut offs) in by_partition {
        offs.sort();
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for (o, _) in &offs {
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == *o => *end = *o,
                _ => ranges.push((*o, *o)),
            }
        }
        report.push_str(&format!(
            "partition {p}: {} missing, offsets {ranges:?}\n  ids: {:?}\n",
            offs.len(),
            offs.iter().map(|(_, id)| id).collect::<Vec<_>>()
        ));
    }
    report.push_str(&format!(
        "committed: {:?}\n",
        committed(&topics.group, &topics.requests, 4)
    ));
    std::fs::write(out.join("missing.txt"), &report).unwrap();
    // The journal, in log order per partition.
    let mut state = String::new();
    for r in read_all(&topics.state).await {
        state.push_str(&format!(
            "p{} o{} {} {}\n",
            r.partition,
            r.offset,
            r.key_str(),
            r.value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_else(|| "<tombstone>".into())
        ));
    }
    std::fs::write(out.join("state.txt"), state).unwrap();
    let stats = sim.stats().await;
    std::fs::write(
        out.join("sim-stats.json"),
        serde_json::to_vec_pretty(&stats).unwrap(),
    )
    .unwrap();
    panic!(
        "chaos: {} of results missing after {timeout:?}; logs, journal and report in {} (tempdir kept at {}):\n{report}",
        missing.len(),
        out.display(),
        kept.display()
    );
}
