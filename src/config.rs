//! The configuration tree: `config/default.toml`, then an optional file, then
//! `BATCHLINE__SECTION__KEY` environment variables, deserialised into typed
//! settings and validated once at start-up.
//!
//! Library code never reads the environment: API keys are resolved here, by
//! [`Config::load`], into [`ApiKey`] values that never print.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The repository's `config/default.toml`, compiled in so the binary runs
/// from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("loading configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    pub window: WindowConfig,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub limits: LimitsConfig,
    pub results: ResultsConfig,
    #[serde(default)]
    pub pricing: BTreeMap<String, BTreeMap<String, Price>>,
    #[serde(default)]
    pub budget: BudgetConfig,
    pub spool: SpoolConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    /// Extra librdkafka properties for the input consumer.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka properties for the result and DLQ producer.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    pub requests: String,
    pub results: String,
    pub dlq: String,
    pub state: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    pub default_provider: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub max_requests: Option<u32>,
    pub max_bytes: Option<ByteSize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Xai,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Xai => "xai",
        }
    }

    /// The provider's own per-batch limits (PROVIDERS.md): requests, and the
    /// bytes of batch input batchline lets a window reach (the provider's
    /// limit less a margin).
    pub fn limits(self) -> (u32, u64) {
        match self {
            ProviderKind::Openai => (50_000, 190 * MB),
            ProviderKind::Anthropic => (100_000, 200 * MB),
            ProviderKind::Xai => (50_000, 48 * MB),
        }
    }

    /// Endpoints the provider's batch API accepts (PROVIDERS.md 1.2, 2.2, 3.5).
    pub fn endpoints(self) -> &'static [&'static str] {
        match self {
            ProviderKind::Openai => &[
                "/v1/chat/completions",
                "/v1/responses",
                "/v1/embeddings",
                "/v1/completions",
                "/v1/moderations",
                "/v1/images/generations",
                "/v1/images/edits",
                "/v1/videos",
            ],
            ProviderKind::Anthropic => &["/v1/messages"],
            ProviderKind::Xai => &[
                "/v1/chat/completions",
                "/v1/responses",
                "/v1/images/generations",
                "/v1/images/edits",
                "/v1/videos/generations",
                "/v1/videos",
                "/v1/videos/edits",
                "/v1/videos/extensions",
            ],
        }
    }

    pub fn default_endpoint(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "/v1/messages",
            ProviderKind::Openai | ProviderKind::Xai => "/v1/chat/completions",
        }
    }
}

const MB: u64 = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub base_url: String,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key (takes precedence over `api_key_env`).
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Extra HTTP headers sent on every call (Azure `api-key`,
    /// `OpenAI-Organization`, `anthropic-version`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub max_batches_in_flight: Option<usize>,
    pub max_enqueued_tokens: Option<u64>,
    #[serde(with = "humantime_serde", default)]
    pub max_wait: Option<Duration>,
    pub max_requests: Option<u32>,
    pub max_bytes: Option<ByteSize>,
    /// Per-call HTTP timeout for reads and small calls.
    #[serde(with = "humantime_serde", default = "default_http_timeout")]
    pub request_timeout: Duration,
    /// The resolved key; never deserialised, never printed.
    #[serde(skip)]
    pub api_key: Option<ApiKey>,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub create_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub create_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub lookup_grace: Duration,
    pub min_upload_rate: ByteRate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub max_requeues: u32,
    /// First backoff for retried provider calls; doubles up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl RetryConfig {
    /// The wait before retry number `attempt`: `initial_backoff` doubled per
    /// attempt, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.initial_backoff
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_backoff)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_held_requests: u64,
    pub max_spool_bytes: ByteSize,
    /// Result deliveries awaited at once by the publisher.
    pub max_inflight_deliveries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsConfig {
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    #[serde(default = "default_discount")]
    pub batch_discount: f64,
}

fn default_discount() -> f64 {
    0.5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub max_usd_per_day: Option<f64>,
    /// Output tokens assumed, in the estimate, for a request that sets no
    /// `max_tokens` (or `max_completion_tokens`, `max_output_tokens`).
    #[serde(default = "default_output_tokens")]
    pub default_output_tokens: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            max_usd_per_day: None,
            default_output_tokens: default_output_tokens(),
        }
    }
}

fn default_output_tokens() -> u64 {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Environment variable holding the status API's bearer token.
    pub token_env: String,
    /// The resolved token: when set, every `/v1/*` route requires it. Never
    /// deserialised, never printed.
    #[serde(skip)]
    pub token: Option<ApiKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// An API key. Its `Debug` and `Display` never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// A byte count written as an integer or with a unit: `200MB`, `20GB`,
/// `512KiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a byte size such as 200MB"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            other => return Err(format!("unknown byte unit `{other}` in `{s}`")),
        };
        Ok(ByteSize((number * scale as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A transfer rate such as `8MB/s`, in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ByteRate(pub u64);

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = s.strip_suffix("/s").ok_or_else(|| {
            serde::de::Error::custom(format!("`{s}` is not a rate such as 8MB/s"))
        })?;
        let size: ByteSize = bytes.parse().map_err(serde::de::Error::custom)?;
        Ok(ByteRate(size.0))
    }
}

/// The librdkafka property an environment variable sets, if it is one:
/// `BATCHLINE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS` sets `fetch.wait.max.ms`
/// under `kafka.consumer` (`_` stands for `.`, which no property name
/// settable as a string lacks and which shells do not allow in names).
fn librdkafka_property(var: &str) -> Option<(&'static str, String)> {
    let rest = var.strip_prefix("BATCHLINE__")?;
    let (map, name) = if let Some(name) = strip_prefix_ignore_case(rest, "KAFKA__CONSUMER__") {
        ("kafka.consumer", name)
    } else {
        (
            "kafka.producer",
            strip_prefix_ignore_case(rest, "KAFKA__PRODUCER__")?,
        )
    };
    Some((map, name.to_ascii_lowercase().replace('_', ".")))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Effective window limits for one provider, after the provider's own
/// overrides and its hard limits are applied.
#[derive(Debug, Clone, Copy)]
pub struct RouteLimits {
    pub max_requests: u32,
    pub max_bytes: u64,
    pub max_wait: Duration,
}

impl Config {
    /// Layers the compiled-in defaults, an optional file and the
    /// environment, resolves API keys, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, vars)
    }

    /// [`Config::load`] with the environment passed in (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        // librdkafka property names contain dots, which the layered
        // sources read as nesting: those two maps are filled here instead.
        let mut properties: Vec<(&'static str, String, &String)> = Vec::new();
        let mut overrides = config::Map::new();
        for (k, v) in env.iter().filter(|(k, _)| k.starts_with("BATCHLINE__")) {
            match librdkafka_property(k) {
                Some((map, name)) => properties.push((map, name, v)),
                None => {
                    overrides.insert(k.clone(), v.clone());
                }
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BATCHLINE")
                .prefix_separator("__")
                .separator("__")
                .source(Some(overrides)),
        );
        let mut cfg: Config = builder.build()?.try_deserialize()?;
        for (map, name, value) in properties {
            if name.is_empty() {
                return Err(invalid(map, "an environment variable names no property"));
            }
            let map = if map == "kafka.consumer" {
                &mut cfg.kafka.consumer
            } else {
                &mut cfg.kafka.producer
            };
            map.insert(name, value.clone());
        }
        cfg.resolve_keys(&env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a complete configuration from TOML text, without layering or
    /// environment (for tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_keys(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (name, provider) in &mut self.providers {
            if let Some(path) = &provider.api_key_file {
                let key = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        format!("providers.{name}.api_key_file"),
                        format!("reading {}: {e}", path.display()),
                    )
                })?;
                provider.api_key = Some(ApiKey::new(key.trim()));
            } else if let Some(var) = &provider.api_key_env {
                provider.api_key = env
                    .get(var)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| ApiKey::new(v.trim()));
            }
        }
        self.http.token = env
            .get(&self.http.token_env)
            .filter(|v| !v.trim().is_empty())
            .map(|v| ApiKey::new(v.trim()));
        Ok(())
    }

    /// Checks every value that deserialisation cannot, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        for (key, topic) in [
            ("topics.requests", &self.topics.requests),
            ("topics.results", &self.topics.results),
            ("topics.dlq", &self.topics.dlq),
            ("topics.state", &self.topics.state),
        ] {
            if topic.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.topics.requests == self.topics.results {
            return Err(invalid(
                "topics.results",
                "must differ from topics.requests",
            ));
        }
        if self.window.max_wait.is_zero() {
            return Err(invalid("window.max_wait", "must be greater than zero"));
        }
        if let Some(default) = &self.routing.default_provider {
            if !self.providers.contains_key(default) {
                return Err(invalid(
                    "routing.default_provider",
                    format!(
                        "`{default}` is not a configured provider (configured: {})",
                        self.providers
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for (name, p) in &self.providers {
            let key = |k: &str| format!("providers.{name}.{k}");
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(
                    format!("providers.{name}"),
                    "provider names use only letters, digits, `_` and `-`",
                ));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(invalid(
                    key("base_url"),
                    format!("`{}` is not an http(s) URL", p.base_url),
                ));
            }
            if p.poll_interval.is_zero() {
                return Err(invalid(key("poll_interval"), "must be greater than zero"));
            }
            if p.max_batches_in_flight == Some(0) {
                return Err(invalid(key("max_batches_in_flight"), "must be at least 1"));
            }
            let (hard_requests, hard_bytes) = p.kind.limits();
            if let Some(n) = p.max_requests.or(self.window.max_requests) {
                if n == 0 || n > hard_requests {
                    return Err(invalid(
                        key("max_requests"),
                        format!(
                            "{n} is outside 1..={hard_requests}, the {} batch limit",
                            p.kind.as_str()
                        ),
                    ));
                }
            }
            let limits = self.route_limits(name).expect("provider exists");
            if limits.max_bytes > hard_bytes {
                return Err(invalid(
                    key("max_bytes"),
                    format!(
                        "{} bytes exceeds {hard_bytes}, the {} batch limit less a margin",
                        limits.max_bytes,
                        p.kind.as_str()
                    ),
                ));
            }
            let upload_secs = limits.max_bytes as f64 / self.batch.min_upload_rate.0.max(1) as f64;
            if upload_secs > self.batch.create_timeout.as_secs_f64() {
                return Err(invalid(
                    key("max_bytes"),
                    format!(
                        "{} bytes cannot be sent within batch.create_timeout ({:?}) at batch.min_upload_rate",
                        limits.max_bytes, self.batch.create_timeout
                    ),
                ));
            }
        }
        for (provider, models) in &self.pricing {
            for (model, price) in models {
                if !(0.0..=1.0).contains(&price.batch_discount) {
                    return Err(invalid(
                        format!("pricing.{provider}.{model}.batch_discount"),
                        "must lie between 0 and 1",
                    ));
                }
            }
        }
        if let Some(max) = self.budget.max_usd_per_day {
            if !max.is_finite() || max < 0.0 {
                return Err(invalid(
                    "budget.max_usd_per_day",
                    "must be a number of US dollars of at least 0",
                ));
            }
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if self.limits.max_held_requests == 0 {
            return Err(invalid("limits.max_held_requests", "must be at least 1"));
        }
        if self.limits.max_inflight_deliveries == 0 {
            return Err(invalid(
                "limits.max_inflight_deliveries",
                "must be at least 1",
            ));
        }
        if self.results.max_bytes < 1024 {
            return Err(invalid("results.max_bytes", "must be at least 1024"));
        }
        if self.shutdown.timeout.is_zero() {
            return Err(invalid("shutdown.timeout", "must be greater than zero"));
        }
        Ok(())
    }

    /// The window limits that apply to requests for `provider`.
    pub fn route_limits(&self, provider: &str) -> Option<RouteLimits> {
        let p = self.providers.get(provider)?;
        let (hard_requests, hard_bytes) = p.kind.limits();
        Some(RouteLimits {
            max_requests: p
                .max_requests
                .or(self.window.max_requests)
                .unwrap_or(hard_requests)
                .min(hard_requests),
            max_bytes: p
                .max_bytes
                .or(self.window.max_bytes)
                .map(|b| b.0)
                .unwrap_or(hard_bytes),
            max_wait: p.max_wait.unwrap_or(self.window.max_wait),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(cfg.topics.requests, "llm.requests");
        assert_eq!(cfg.window.max_wait, Duration::from_secs(60));
        assert_eq!(cfg.http.listen, "127.0.0.1:9464");
        let openai = &cfg.providers["openai"];
        assert_eq!(openai.kind, ProviderKind::Openai);
        assert_eq!(openai.base_url, "https://api.openai.com/v1");
        assert!(openai.api_key.is_none());
    }

    #[test]
    fn environment_overrides_nested_keys_and_resolves_keys() {
        let cfg = Config::load_from(
            None,
            env(&[
                (
                    "BATCHLINE__PROVIDERS__OPENAI__BASE_URL",
                    "http://127.0.0.1:1/openai/v1",
                ),
                ("BATCHLINE__WINDOW__MAX_WAIT", "5s"),
                ("BATCHLINE__WINDOW__MAX_REQUESTS", "100"),
                ("OPENAI_API_KEY", "sk-test"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.providers["openai"].base_url,
            "http://127.0.0.1:1/openai/v1"
        );
        assert_eq!(cfg.window.max_wait, Duration::from_secs(5));
        assert_eq!(cfg.route_limits("openai").unwrap().max_requests, 100);
        assert_eq!(
            cfg.providers["openai"].api_key.as_ref().unwrap().expose(),
            "sk-test"
        );
    }

    #[test]
    fn environment_sets_librdkafka_properties_with_underscores_for_dots() {
        let cfg = Config::load_from(
            None,
            env(&[
                ("BATCHLINE__KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "100"),
                ("BATCHLINE__KAFKA__CONSUMER__security.protocol", "SASL_SSL"),
                ("BATCHLINE__KAFKA__PRODUCER__LINGER_MS", "20"),
                ("BATCHLINE__KAFKA__BROKERS", "kafka:9092"),
            ]),
        )
        .unwrap();
        let consumer: Vec<_> = cfg.kafka.consumer.iter().collect();
        assert_eq!(
            consumer,
            [
                (&"fetch.wait.max.ms".to_string(), &"100".to_string()),
                (&"security.protocol".to_string(), &"SASL_SSL".to_string()),
            ]
        );
        assert_eq!(cfg.kafka.producer["linger.ms"], "20");
        assert_eq!(cfg.kafka.brokers, "kafka:9092");
        let err = Config::load_from(None, env(&[("BATCHLINE__KAFKA__CONSUMER__", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.consumer"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::load_from(None, env(&[("BATCHLINE__WINDOW__MAX_REQUESTS", "60000")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("providers.openai.max_requests"), "{err}");
        let err = Config::load_from(None, env(&[("BATCHLINE__WINDOW__MAX_WAIT", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_wait"), "{err}");
        let err = Config::load_from(
            None,
            env(&[("BATCHLINE__ROUTING__DEFAULT_PROVIDER", "nope")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("routing.default_provider"), "{err}");
    }

    #[test]
    fn default_providers_and_prices() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        let kinds: Vec<_> = cfg
            .providers
            .iter()
            .map(|(n, p)| (n.as_str(), p.kind, p.base_url.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (
                    "anthropic",
                    ProviderKind::Anthropic,
                    "https://api.anthropic.com/v1"
                ),
                ("openai", ProviderKind::Openai, "https://api.openai.com/v1"),
                ("xai", ProviderKind::Xai, "https://api.x.ai/v1"),
            ]
        );
        assert_eq!(
            cfg.providers["anthropic"].headers["anthropic-version"],
            "2023-06-01"
        );
        // Dotted model names survive the layering.
        assert_eq!(cfg.pricing["xai"]["grok-4.3"].batch_discount, 0.2);
        assert_eq!(cfg.pricing["openai"]["gpt-4.1-mini"].input_per_mtok, 0.40);
        assert_eq!(
            cfg.pricing["anthropic"]["claude-haiku-4-5"].batch_discount,
            0.5
        );
        let cfg = Config::load_from(
            None,
            env(&[(
                "BATCHLINE__PROVIDERS__ANTHROPIC__BASE_URL",
                "http://127.0.0.1:1/anthropic/v1",
            )]),
        )
        .unwrap();
        assert_eq!(
            cfg.providers["anthropic"].base_url,
            "http://127.0.0.1:1/anthropic/v1"
        );
    }

    #[test]
    fn api_keys_never_print() {
        let key = ApiKey::new("sk-secret-value");
        assert!(!format!("{key:?}").contains("secret"));
        let cfg = Config::load_from(None, env(&[("OPENAI_API_KEY", "sk-secret-value")])).unwrap();
        assert!(!format!("{cfg:?}").contains("sk-secret-value"));
    }

    #[test]
    fn the_status_api_token_comes_from_the_named_variable_and_never_prints() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        assert!(cfg.http.token.is_none());
        let cfg = Config::load_from(None, env(&[("BATCHLINE_HTTP_TOKEN", "  ")])).unwrap();
        assert!(cfg.http.token.is_none(), "an empty variable means no token");
        let cfg = Config::load_from(
            None,
            env(&[
                ("BATCHLINE__HTTP__TOKEN_ENV", "OPS_TOKEN"),
                ("OPS_TOKEN", "tok-secret-value"),
                ("BATCHLINE_HTTP_TOKEN", "not-this-one"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.http.token.as_ref().unwrap().expose(),
            "tok-secret-value"
        );
        assert!(!format!("{cfg:?}").contains("tok-secret-value"));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let retry = Config::load_from(None, env(&[])).unwrap().retry;
        assert_eq!(retry.backoff(0), retry.initial_backoff);
        assert_eq!(retry.backoff(1), retry.initial_backoff * 2);
        assert_eq!(retry.backoff(3), retry.initial_backoff * 8);
        assert_eq!(retry.backoff(40), retry.max_backoff);
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!("200MB".parse::<ByteSize>().unwrap(), ByteSize(200_000_000));
        assert_eq!("1KiB".parse::<ByteSize>().unwrap(), ByteSize(1024));
        assert_eq!("42".parse::<ByteSize>().unwrap(), ByteSize(42));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
    }
}
