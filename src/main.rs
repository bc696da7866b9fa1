//! The `batchline` command line: parses arguments and hands over to the
//! library. Nothing else lives here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use batchline::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "batchline",
    version,
    about = "Kafka requests in, provider batch jobs out, one result per request"
)]
struct Cli {
    /// Configuration file layered over the defaults (then BATCHLINE__* variables).
    #[arg(long, global = true, env = "BATCHLINE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json (default: log.format).
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stream processor.
    Run,
    /// Run the provider simulator (OpenAI-compatible batch API).
    Sim(SimArgs),
    /// Measure throughput against raw Kafka, or memory while holding requests.
    Bench(BenchArgs),
    /// Produce requests from a JSONL file to the input topic.
    Send {
        /// One request message per line.
        file: PathBuf,
        /// Brokers (default: kafka.brokers).
        #[arg(long)]
        brokers: Option<String>,
        /// Follow the results topic until every request has a result.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the first N results as they arrive (with --wait).
        #[arg(long, default_value_t = 0)]
        show: usize,
    },
    /// Show a running instance's in-flight batches (from its status API).
    Status {
        /// The status API (default: http://<http.listen>).
        #[arg(long)]
        url: Option<String>,
    },
    /// Cancel an in-flight batch at its provider; requests that did not run
    /// get `canceled` results.
    Cancel {
        /// The local batch id (`bl-<partition>-<uuid>`, see `batchline status`).
        id: String,
        /// The status API (default: http://<http.listen>).
        #[arg(long)]
        url: Option<String>,
    },
    /// Show a running instance's daily budget and spend, or change its cap.
    Budget {
        /// A new cap in USD a day (held batches are submitted when they fit).
        #[arg(long, conflicts_with = "unset")]
        set: Option<f64>,
        /// Remove the cap.
        #[arg(long)]
        unset: bool,
        /// The status API (default: http://<http.listen>).
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Brokers to run against (default: kafka.brokers).
    #[arg(long)]
    brokers: Option<String>,
    /// What to measure: throughput (against raw Kafka) or hold (memory).
    #[arg(long, default_value = "throughput")]
    mode: String,
    /// Requests for the throughput run.
    #[arg(long, default_value_t = 200_000)]
    requests: usize,
    /// Held requests, small and large size, for the memory run.
    #[arg(long, default_value_t = 250_000)]
    hold_small: usize,
    #[arg(long, default_value_t = 1_000_000)]
    hold_large: usize,
    /// Sizes measured in the memory run, evenly spaced from the small to
    /// the large one; the slope is fitted over all of them.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=20))]
    hold_points: u32,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Size of each request message.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// batchline's `window.max_wait` in the throughput run: the last window
    /// of each route waits this long for more requests before it is sent.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// Compression of the benchmark's input producer (none, gzip, snappy,
    /// lz4, zstd), the same in both runs. batchline's results are zstd.
    #[arg(long, default_value = "zstd")]
    compression: String,
    /// `fetch.wait.max.ms` of both input consumers, the passthrough's and
    /// batchline's (default: librdkafka's 500 ms). Some brokers, Tansu
    /// among them, hold every fetch for part of this wait even when data is
    /// there, which then bounds both runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    fetch_wait: Option<Duration>,
    /// Give up on a phase after this long.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// Keep files, batches and the billing ledger here, so they survive a
    /// restart of the simulator (default: a temporary directory, in memory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Require this API key (default: any non-empty key).
    #[arg(long, env = "SIM_API_KEY")]
    api_key: Option<String>,
    /// Time a batch spends validating.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    validate_duration: Duration,
    /// Time a batch spends in progress.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    batch_duration: Duration,
    /// Time a batch spends finalizing.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    finalize_duration: Duration,
    /// Fraction of requests that fail (deterministic by custom_id).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests whose result the provider never returns
    /// (deterministic by custom_id).
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Fraction of batches that fail validation.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fraction of batches that fail with token_limit_exceeded.
    #[arg(long, default_value_t = 0.0)]
    token_limit_rate: f64,
    /// Fraction of custom_ids whose line fails validation, failing the batch
    /// with an error naming that line.
    #[arg(long, default_value_t = 0.0)]
    invalid_line_rate: f64,
    /// Fraction of batches that expire.
    #[arg(long, default_value_t = 0.0)]
    expire_rate: f64,
    /// Fraction of an expiring batch's lines that complete first.
    #[arg(long, default_value_t = 0.5)]
    expire_completed_fraction: f64,
    /// Fraction of API calls answered 429.
    #[arg(long, default_value_t = 0.0)]
    http_429_rate: f64,
    /// Fraction of API calls answered 500.
    #[arg(long, default_value_t = 0.0)]
    http_5xx_rate: f64,
    /// Fraction of creates that create the batch and then answer 500.
    #[arg(long, default_value_t = 0.0)]
    ambiguous_create_rate: f64,
    /// retry-after sent with 429s.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    retry_after: Duration,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How long every batch status call waits before it answers (a slow
    /// provider).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    poll_delay: Duration,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Hands freed heap pages back to the system once a second. glibc keeps
/// the pages of large freed buffers (fetched input, decompressed) in its
/// heaps, so resident memory would otherwise stay at the last burst's peak
/// rather than follow what is held (BENCHMARKS.md, 2026-12-07).
fn spawn_memory_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::Builder::new()
        .name("memory-trim".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: malloc_trim takes an integer and only releases free
            // memory; it is safe to call from any thread at any time.
            unsafe { libc::malloc_trim(0) };
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::warn!(error = %e, "not trimming freed memory"));
}

/// Cancels `token` on the first SIGINT or SIGTERM; exits at once on a second.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
            tracing::info!("shutting down (a second signal exits at once)");
            token.cancel();
        }
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();

    let cli = Cli::parse();
    let format = |cfg_format: LogFormat| match cli.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => cfg_format,
    };
    match cli.command {
        Command::Run => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            spawn_memory_trim();
            batchline::app::run(cfg, shutdown).await?;
            Ok(())
        }
        Command::Sim(args) => {
            init_logging(format(LogFormat::Text));
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            tracing::info!(listen = %args.listen, "simulator serving /openai/v1 (and /v1), /anthropic/v1 and /xai/v1");
            let config = batchline::sim::SimConfig {
                data_dir: args.data_dir,
                api_key: args.api_key,
                validate_duration: args.validate_duration,
                batch_duration: args.batch_duration,
                finalize_duration: args.finalize_duration,
                error_rate: args.error_rate,
                drop_rate: args.drop_rate,
                fail_rate: args.fail_rate,
                token_limit_rate: args.token_limit_rate,
                invalid_line_rate: args.invalid_line_rate,
                expire_rate: args.expire_rate,
                expire_completed_fraction: args.expire_completed_fraction,
                http_429_rate: args.http_429_rate,
                http_5xx_rate: args.http_5xx_rate,
                ambiguous_create_rate: args.ambiguous_create_rate,
                retry_after: args.retry_after,
                seed: args.seed,
                poll_delay: args.poll_delay,
            };
            batchline::sim::serve(listener, config, shutdown).await?;
            Ok(())
        }
        Command::Bench(args) => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let opts = batchline::bench::BenchOptions {
                brokers: args.brokers.unwrap_or(cfg.kafka.brokers.clone()),
                requests: args.requests,
                partitions: args.partitions,
                body_bytes: args.body_bytes,
                max_wait: args.max_wait,
                compression: args.compression,
                fetch_wait: args.fetch_wait,
                timeout: args.timeout,
            };
            let report = match args.mode.as_str() {
                "throughput" => batchline::bench::throughput(&opts).await?,
                "hold" => {
                    let sizes = batchline::bench::hold_sizes(
                        args.hold_small,
                        args.hold_large,
                        args.hold_points as usize,
                    );
                    batchline::bench::hold(&opts, &sizes).await?
                }
                other => anyhow::bail!("unknown bench mode `{other}` (throughput or hold)"),
            };
            println!("{report}");
            Ok(())
        }
        Command::Send {
            file,
            brokers,
            wait,
            timeout,
            show,
        } => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let brokers = brokers.unwrap_or(cfg.kafka.brokers.clone());
            let opts = batchline::send::SendOptions {
                brokers: &brokers,
                requests_topic: &cfg.topics.requests,
                results_topic: &cfg.topics.results,
                wait,
                timeout,
                show,
            };
            if let Some(report) = batchline::send::send_file(&file, &opts).await? {
                print!("{report}");
            }
            Ok(())
        }
        Command::Status { url } => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let url = url.unwrap_or_else(|| batchline::cli::default_url(&cfg.http.listen));
            let api = batchline::cli::StatusApi::new(&url, cfg.http.token.clone())?;
            print!("{}", batchline::cli::format_status(&api.batches().await?));
            Ok(())
        }
        Command::Cancel { id, url } => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let url = url.unwrap_or_else(|| batchline::cli::default_url(&cfg.http.listen));
            let api = batchline::cli::StatusApi::new(&url, cfg.http.token.clone())?;
            print!(
                "{}",
                batchline::cli::format_cancelled(&api.cancel(&id).await?)
            );
            Ok(())
        }
        Command::Budget { set, unset, url } => {
            let cfg = Config::load(cli.config.as_deref())?;
            init_logging(format(cfg.log.format));
            let url = url.unwrap_or_else(|| batchline::cli::default_url(&cfg.http.listen));
            let api = batchline::cli::StatusApi::new(&url, cfg.http.token.clone())?;
            let view = match (set, unset) {
                (Some(max), _) => api.set_budget(Some(max)).await?,
                (None, true) => api.set_budget(None).await?,
                (None, false) => api.budget().await?,
            };
            print!("{}", batchline::cli::format_budget(&view));
            Ok(())
        }
    }
}
