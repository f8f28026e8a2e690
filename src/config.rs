//! Configuration: environment variables over an optional YAML file, validated once.
//!
//! The YAML file is Pingora's own configuration file (`-c`); Pingora ignores keys it
//! does not know, so our settings live beside its keys, lower-cased
//! (`flowise_api_url: ...`). Environment variables use the original Python
//! service's names so its `.env` files keep working, and win over the file.

use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::Algorithm;

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub flowise_urls: Vec<FlowiseUrl>,
    pub flowise_api_key: Option<String>,
    pub database_url: String,
    pub database_pool_size: usize,
    pub jwt_secret: Vec<u8>,
    pub jwt_algorithm: Algorithm,
    pub jwt_expiration: Duration,
    pub refresh_token_lifetime: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub cors_allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub default_credit_cost: i64,
    pub hold_ttl: Duration,
    /// A credit lease holds this many predictions' prices (0: exact holds
    /// only); see `src/ledger/lease.rs`.
    pub credit_lease_predictions: i64,
    /// A lease unused this long is closed (its rest goes back to the balance).
    pub credit_lease_idle: Duration,
    pub log_json: bool,
    pub debug: bool,
    pub migrate_on_start: bool,
    pub database_wait: Duration,
    pub health_check_interval: Duration,
    pub catalog_sync_interval: Duration,
    pub snapshot_reload_interval: Duration,
    /// A full identity reload this often (a safety net; deltas keep it current).
    pub snapshot_full_reload_interval: Duration,
    pub sweeper_interval: Duration,
    /// How long SIGTERM waits for in-flight requests before Pingora's own exit.
    pub grace_period: Duration,
    pub login_attempts_per_minute: u32,
    /// Client connection limits, enforced by `crate::limits`.
    pub client_limits: ClientLimits,
    /// Bearer tokens issued elsewhere (the old login service, an OIDC provider).
    pub external: ExternalAuthConfig,
}

/// Tokens from other issuers, verified locally (see `src/auth/external.rs`).
#[derive(Debug, Clone, Default)]
pub struct ExternalAuthConfig {
    /// The old Python service's login service: HS256 tokens with a shared secret.
    pub login_service: Option<LoginServiceConfig>,
    /// One OpenID Connect provider: RS256/ES256 tokens checked against its JWKS.
    pub oidc: Option<OidcConfig>,
    /// `EXTERNAL_AUTH_URL`: password logins of users who are not local are
    /// checked by this login service (its token is verified with the shared secret).
    pub auth_url: Option<String>,
}

impl ExternalAuthConfig {
    pub fn any(&self) -> bool {
        self.login_service.is_some() || self.oidc.is_some()
    }
}

/// Which claims name the user, and which role values make an admin.
#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub subject: String,
    pub username: String,
    /// A claim name, or a dotted path into nested objects (`realm_access.roles`);
    /// its value is a string or an array of strings.
    pub role: String,
    pub admin_roles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LoginServiceConfig {
    pub secret: Vec<u8>,
    pub algorithm: Algorithm,
    /// Required `iss` value, if the service sets one.
    pub issuer: Option<String>,
    /// Required `aud` value, if the service sets one.
    pub audience: Option<String>,
    pub claims: ClaimNames,
}

#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// None: found through `{issuer}/.well-known/openid-configuration`.
    pub jwks_url: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub claims: ClaimNames,
    /// Periodic key-set refresh.
    pub jwks_refresh: Duration,
    /// At most one refresh per this interval for tokens with an unknown `kid`.
    pub jwks_min_refresh: Duration,
    /// How long a request with an unknown `kid` waits for that one refresh.
    pub jwks_wait: Duration,
}

/// What one client connection may hold on to (see `crate::limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// An idle keep-alive connection is closed after this long without a new request.
    pub keepalive_timeout: Duration,
    /// A request's whole header must arrive within this long (counted from
    /// the connection's accept for its first request, from the first byte for
    /// later ones).
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this long after its header.
    pub body_timeout: Duration,
    /// Larger request headers (request line included) are refused with 431.
    pub max_header_bytes: usize,
    /// Client connections open at once; more are answered 503 and closed.
    /// Lowered at start-up to what the descriptor limit allows.
    pub max_connections: usize,
    /// An answer must begin within this long after the request's body is
    /// complete (`UPSTREAM_FIRST_BYTE_TIMEOUT_MS`; 504 otherwise). Streams
    /// that have begun are bounded by `UPSTREAM_READ_TIMEOUT_MS` between reads.
    pub first_byte_timeout: Option<Duration>,
}

/// One Flowise server: where to connect and what to send as `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowiseUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Path prefix when Flowise is mounted below `/` (no trailing slash).
    pub base_path: String,
}

impl FlowiseUrl {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Sample secrets that appear in documentation and must never run in production.
const KNOWN_SAMPLE_SECRETS: &[&str] = &[
    "your-secret-key",
    "your-secret-key-here",
    "your_secret_key",
    "change-me",
    "changeme",
    "secret",
    "your-super-secret-jwt-key-change-this-in-production",
    "CHANGE_ME_TO_A_LONG_RANDOM_SECRET_AT_LEAST_32_BYTES",
];

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Environment,
    EnvFile(String),
    Yaml(String),
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Environment => write!(f, "environment"),
            Origin::EnvFile(p) => write!(f, "settings file {p}"),
            Origin::Yaml(p) => write!(f, "YAML {p}"),
            Origin::Default => write!(f, "default"),
        }
    }
}

/// The settings file `scripts/run-local.sh` writes (KEY=VALUE lines), looked up
/// in the working directory when neither `--env-file` nor
/// `FLOWISE_PROXY_ENV_FILE` names one.
pub const DEFAULT_ENV_FILE: &str = ".local/flowise-proxy.env";

/// Names a YAML file to use when `-c` is not given (environment or settings file).
pub const CONF_VARIABLE: &str = "FLOWISE_PROXY_CONF";

/// Every source of settings, in precedence order: the process environment, the
/// settings file (KEY=VALUE), the YAML file (lower-case keys), the defaults.
/// Records every name it is asked for, so `-t` can list them and unknown YAML
/// keys can be told apart from ours without a second list to keep in step.
pub struct Source {
    env_file_path: Option<String>,
    env_file: std::collections::HashMap<String, String>,
    yaml_path: Option<String>,
    yaml: serde_yaml::Mapping,
    /// (name, default as shown) in the order `from_source` asked.
    asked: std::cell::RefCell<Vec<(&'static str, Option<String>)>>,
    /// Problems with the sources themselves (unreadable file, unknown key).
    pub problems: Vec<String>,
}

impl Source {
    /// Reads the settings file and the YAML file. `conf` is `-c`; `env_file` is
    /// `--env-file`. Unreadable files are errors; unknown YAML keys are
    /// `problems`, reported once the known names are recorded (see [`Source::check_keys`]).
    pub fn open(conf: Option<&str>, env_file: Option<&str>) -> Result<Source, Vec<String>> {
        let env_file_path = match env_file {
            Some(p) => Some(p.to_string()),
            None => match std::env::var("FLOWISE_PROXY_ENV_FILE") {
                Ok(p) if !p.is_empty() => Some(p),
                _ => std::path::Path::new(DEFAULT_ENV_FILE)
                    .is_file()
                    .then(|| DEFAULT_ENV_FILE.to_string()),
            },
        };
        let mut env_file_map = std::collections::HashMap::new();
        if let Some(path) = &env_file_path {
            let iter = dotenvy::from_path_iter(path)
                .map_err(|e| vec![format!("cannot read settings file {path}: {e}")])?;
            for item in iter {
                let (k, v) = item.map_err(|e| vec![format!("{path}: {e}")])?;
                env_file_map.insert(k, v);
            }
        }
        let yaml_path = conf.map(str::to_string).or_else(|| {
            std::env::var(CONF_VARIABLE)
                .ok()
                .or_else(|| env_file_map.get(CONF_VARIABLE).cloned())
                .filter(|p| !p.is_empty())
        });
        let yaml = match &yaml_path {
            None => serde_yaml::Mapping::new(),
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => return Err(vec![format!("cannot read configuration file {path}: {e}")]),
                Ok(text) => match serde_yaml::from_str::<serde_yaml::Value>(&text) {
                    Ok(serde_yaml::Value::Mapping(m)) => m,
                    Ok(serde_yaml::Value::Null) => serde_yaml::Mapping::new(),
                    Ok(_) => return Err(vec![format!("{path}: expected a YAML mapping")]),
                    Err(e) => return Err(vec![format!("{path}: invalid YAML: {e}")]),
                },
            },
        };
        Ok(Source {
            env_file_path,
            env_file: env_file_map,
            yaml_path,
            yaml,
            asked: std::cell::RefCell::new(Vec::new()),
            problems: Vec::new(),
        })
    }

    pub fn yaml_path(&self) -> Option<&str> {
        self.yaml_path.as_deref()
    }

    pub fn env_file_path(&self) -> Option<&str> {
        self.env_file_path.as_deref()
    }

    /// Keys of the YAML file that neither Pingora nor flowise-proxy reads, and
    /// keys of the settings file that are not settings. Call after
    /// [`Config::from_source`] so that every name we read is known.
    pub fn check_keys(&mut self) {
        let ours: std::collections::HashSet<String> = self
            .asked
            .borrow()
            .iter()
            .map(|(n, _)| n.to_string())
            .chain([CONF_VARIABLE.to_string()])
            .collect();
        let pingora = pingora_keys();
        let mut problems = Vec::new();
        if let Some(path) = &self.yaml_path {
            for key in self.yaml.keys() {
                let name = match key {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                if !ours.contains(&name.to_ascii_uppercase()) && !pingora.contains(&name) {
                    problems.push(format!(
                        "{path}: unknown key {name:?} (neither a flowise-proxy setting nor a Pingora key; misspelled?)"
                    ));
                }
            }
        }
        if let Some(path) = &self.env_file_path {
            let mut keys: Vec<&String> = self.env_file.keys().collect();
            keys.sort();
            for key in keys {
                if !ours.contains(key) {
                    problems.push(format!("{path}: unknown setting {key:?} (misspelled?)"));
                }
            }
        }
        self.problems.extend(problems);
    }

    /// Each setting read, its value as shown (secrets masked) and its origin.
    pub fn report(&self) -> Vec<(String, String, Origin)> {
        let asked = self.asked.borrow();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (name, default) in asked.iter() {
            if !seen.insert(*name) {
                continue;
            }
            let (value, origin) = match self.lookup(name) {
                Some((v, o)) => (mask(name, &v), o),
                None => (
                    default.clone().unwrap_or_else(|| "(not set)".into()),
                    Origin::Default,
                ),
            };
            out.push((name.to_string(), value, origin));
        }
        out
    }

    fn lookup(&self, name: &str) -> Option<(String, Origin)> {
        if let Ok(v) = std::env::var(name) {
            return Some((v, Origin::Environment));
        }
        if let Some(v) = self.env_file.get(name) {
            let path = self.env_file_path.clone().unwrap_or_default();
            return Some((v.clone(), Origin::EnvFile(path)));
        }
        let key = serde_yaml::Value::String(name.to_ascii_lowercase());
        let yaml = match self.yaml.get(&key)? {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            _ => return None,
        };
        Some((
            yaml,
            Origin::Yaml(self.yaml_path.clone().unwrap_or_default()),
        ))
    }

    fn note(&self, name: &'static str, default: Option<String>) {
        self.asked.borrow_mut().push((name, default));
    }

    /// The value of `name`, recording that it is a setting without a default.
    pub fn get(&self, name: &'static str) -> Option<String> {
        self.note(name, None);
        self.lookup(name).map(|(v, _)| v)
    }

    /// The value of `name`, or `default` (shown by `-t`).
    fn get_or(&self, name: &'static str, default: &str) -> String {
        self.note(name, Some(default.to_string()));
        self.lookup(name)
            .map(|(v, _)| v)
            .unwrap_or_else(|| default.to_string())
    }

    fn parse<T: std::str::FromStr + std::fmt::Display>(
        &self,
        name: &'static str,
        default: T,
        errs: &mut Vec<String>,
    ) -> T {
        self.note(name, Some(default.to_string()));
        match self.lookup(name).map(|(v, _)| v) {
            None => default,
            Some(v) if v.trim().is_empty() => default,
            Some(v) => match v.trim().parse() {
                Ok(x) => x,
                Err(_) => {
                    errs.push(format!("{name}: cannot parse {:?}", v));
                    default
                }
            },
        }
    }

    fn bool(&self, name: &'static str, default: bool, errs: &mut Vec<String>) -> bool {
        self.note(name, Some(default.to_string()));
        match self
            .lookup(name)
            .map(|(v, _)| v.trim().to_ascii_lowercase())
        {
            None => default,
            Some(v) if v.is_empty() => default,
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    errs.push(format!("{name}: expected true or false, got {v:?}"));
                    default
                }
            },
        }
    }
}

/// The keys of Pingora's own `ServerConf`, as its YAML spells them.
fn pingora_keys() -> std::collections::HashSet<String> {
    let conf = pingora_core::server::configuration::ServerConf::default();
    match serde_yaml::to_value(&conf) {
        Ok(serde_yaml::Value::Mapping(m)) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        _ => std::collections::HashSet::new(),
    }
}

/// A value as `-t` may print it: secrets hidden, passwords in URLs replaced.
pub fn mask(name: &str, value: &str) -> String {
    let upper = name.to_ascii_uppercase();
    let secret = upper.contains("SECRET")
        || upper.contains("PASSWORD")
        || upper.ends_with("_KEY")
        || upper.ends_with("_TOKEN");
    if secret {
        return if value.is_empty() {
            "(empty)".into()
        } else {
            format!("(set, {} bytes, hidden)", value.len())
        };
    }
    if let Ok(mut url) = url::Url::parse(value) {
        if url.password().is_some() && url.set_password(Some("***")).is_ok() {
            return url.to_string();
        }
    }
    value.to_string()
}

impl Config {
    /// Loads and validates from every source (see [`Source`]); also returns the
    /// sources (the YAML file found is Pingora's too). Every problem is
    /// reported, one line each.
    pub fn load_with(
        yaml_path: Option<&str>,
        env_file: Option<&str>,
    ) -> Result<(Config, Source), Vec<String>> {
        let mut src = Source::open(yaml_path, env_file)?;
        let mut errs = Vec::new();
        let cfg = Self::from_source(&src, &mut errs);
        src.check_keys();
        errs.extend(src.problems.iter().cloned());
        match cfg {
            Some(cfg) if errs.is_empty() => Ok((cfg, src)),
            _ => Err(errs),
        }
    }

    pub fn from_source(src: &Source, errs: &mut Vec<String>) -> Option<Config> {
        let host = src.get_or("HOST", "0.0.0.0");
        let port = src.parse("PORT", 8000u16, errs);

        let flowise_raw = src.get_or("FLOWISE_API_URL", "http://localhost:3000");
        let mut flowise_urls = Vec::new();
        for part in flowise_raw
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match parse_flowise_url(part) {
                Ok(u) => flowise_urls.push(u),
                Err(e) => errs.push(format!("FLOWISE_API_URL: {e}")),
            }
        }
        if flowise_urls.is_empty() && !flowise_raw.trim().is_empty() {
            // error already reported
        } else if flowise_urls.is_empty() {
            errs.push("FLOWISE_API_URL: no Flowise URL given".into());
        }

        let flowise_api_key = src.get("FLOWISE_API_KEY").filter(|k| !k.is_empty());

        let database_url = src.get("DATABASE_URL").unwrap_or_default();
        if database_url.is_empty() {
            errs.push("DATABASE_URL: required (postgresql://user@host:port/db)".into());
        } else if !(database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            errs.push("DATABASE_URL: must start with postgresql:// or postgres://".into());
        } else if database_url.parse::<tokio_postgres::Config>().is_err() {
            errs.push("DATABASE_URL: not a valid PostgreSQL URL".into());
        }
        let database_pool_size = src.parse("DATABASE_POOL_SIZE", 16usize, errs);
        if database_pool_size == 0 {
            errs.push("DATABASE_POOL_SIZE: must be at least 1".into());
        }

        let jwt_secret = src.get("JWT_SECRET_KEY").unwrap_or_default();
        if jwt_secret.is_empty() {
            errs.push("JWT_SECRET_KEY: required (at least 32 random bytes)".into());
        } else if KNOWN_SAMPLE_SECRETS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(jwt_secret.trim()))
        {
            errs.push("JWT_SECRET_KEY: is a published sample value; generate a random one".into());
        } else if jwt_secret.len() < 32 {
            errs.push(format!(
                "JWT_SECRET_KEY: too short ({} bytes, need at least 32)",
                jwt_secret.len()
            ));
        }
        let jwt_algorithm = match src
            .get_or("JWT_ALGORITHM", "HS256")
            .to_ascii_uppercase()
            .as_str()
        {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => {
                errs.push(format!(
                    "JWT_ALGORITHM: {other:?} is not one of HS256, HS384, HS512"
                ));
                Algorithm::HS256
            }
        };
        let jwt_hours: f64 = src.parse("JWT_EXPIRATION_HOURS", 24.0, errs);
        if !(jwt_hours > 0.0 && jwt_hours <= 24.0 * 366.0) {
            errs.push("JWT_EXPIRATION_HOURS: must be positive".into());
        }
        let refresh_days: f64 = src.parse("REFRESH_TOKEN_DAYS", 7.0, errs);
        if !(refresh_days > 0.0 && refresh_days <= 3660.0) {
            errs.push("REFRESH_TOKEN_DAYS: must be positive".into());
        }

        let metrics_raw = src.get_or("METRICS_ADDR", "127.0.0.1:9464");
        let metrics_addr = if metrics_raw.trim().is_empty() {
            None
        } else {
            match metrics_raw.trim().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(format!("METRICS_ADDR: {metrics_raw:?} is not HOST:PORT"));
                    None
                }
            }
        };
        let cors_allowed_origins = src
            .get("CORS_ALLOWED_ORIGINS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let max_body_bytes = src.parse("MAX_BODY_BYTES", 10_485_760usize, errs);
        if max_body_bytes == 0 {
            errs.push("MAX_BODY_BYTES: must be positive".into());
        }
        let connect_ms = src.parse("UPSTREAM_CONNECT_TIMEOUT_MS", 5000u64, errs);
        let read_ms = src.parse("UPSTREAM_READ_TIMEOUT_MS", 300_000u64, errs);
        if connect_ms == 0 || read_ms == 0 {
            errs.push("UPSTREAM_*_TIMEOUT_MS: must be positive".into());
        }
        let default_credit_cost = src.parse("DEFAULT_CREDIT_COST", 1i64, errs);
        if default_credit_cost < 0 {
            errs.push("DEFAULT_CREDIT_COST: must not be negative".into());
        }
        let hold_ttl = src.parse("HOLD_TTL_SECONDS", 900u64, errs);
        if hold_ttl == 0 {
            errs.push("HOLD_TTL_SECONDS: must be positive".into());
        }
        let credit_lease_predictions = src.parse("CREDIT_LEASE_PREDICTIONS", 32i64, errs);
        if !(0..=1_000_000).contains(&credit_lease_predictions) {
            errs.push("CREDIT_LEASE_PREDICTIONS: must be between 0 and 1000000".into());
        }
        let log_format = src.get_or("LOG_FORMAT", "json");
        let log_json = match log_format.to_ascii_lowercase().as_str() {
            "json" | "" => true,
            "text" => false,
            other => {
                errs.push(format!("LOG_FORMAT: {other:?} is not json or text"));
                true
            }
        };
        let debug = src.bool("DEBUG", false, errs);
        let migrate_on_start = src.bool("MIGRATE_ON_START", true, errs);
        let database_wait = Duration::from_secs(src.parse("DATABASE_WAIT_SECONDS", 30u64, errs));
        let ms = |name: &'static str, default: u64, errs: &mut Vec<String>| {
            Duration::from_millis(src.parse(name, default, errs).max(1))
        };
        let health_check_interval = ms("HEALTH_CHECK_INTERVAL_MS", 1000, errs);
        let catalog_sync_interval = ms("CATALOG_SYNC_INTERVAL_MS", 60_000, errs);
        let snapshot_reload_interval = ms("SNAPSHOT_RELOAD_INTERVAL_MS", 5_000, errs);
        let snapshot_full_reload_interval = ms("SNAPSHOT_FULL_RELOAD_INTERVAL_MS", 3_600_000, errs);
        let sweeper_interval = ms("SWEEPER_INTERVAL_MS", 10_000, errs);
        let credit_lease_idle = ms("CREDIT_LEASE_IDLE_MS", 5_000, errs);
        let grace_period = Duration::from_secs(src.parse("GRACE_PERIOD_SECONDS", 30u64, errs));
        let login_attempts_per_minute = src.parse("LOGIN_ATTEMPTS_PER_MINUTE", 10u32, errs);
        let client_limits = client_limits(src, errs);
        let external = external_auth(src, &jwt_secret, errs);

        if !errs.is_empty() {
            return None;
        }
        Some(Config {
            host,
            port,
            flowise_urls,
            flowise_api_key,
            database_url,
            database_pool_size,
            jwt_secret: jwt_secret.into_bytes(),
            jwt_algorithm,
            jwt_expiration: Duration::from_secs_f64(jwt_hours * 3600.0),
            refresh_token_lifetime: Duration::from_secs_f64(refresh_days * 86400.0),
            metrics_addr,
            cors_allowed_origins,
            max_body_bytes,
            upstream_connect_timeout: Duration::from_millis(connect_ms),
            upstream_read_timeout: Duration::from_millis(read_ms),
            default_credit_cost,
            hold_ttl: Duration::from_secs(hold_ttl),
            credit_lease_predictions,
            credit_lease_idle,
            log_json,
            debug,
            migrate_on_start,
            database_wait,
            health_check_interval,
            catalog_sync_interval,
            snapshot_reload_interval,
            snapshot_full_reload_interval,
            sweeper_interval,
            grace_period,
            login_attempts_per_minute,
            client_limits,
            external,
        })
    }

    pub fn listen_addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The claim settings of the two external issuers, by name (setting names are
/// `'static`: `-t` lists every name asked for).
fn claim_setting(prefix: &str, what: &str) -> &'static str {
    match (prefix, what) {
        ("EXTERNAL", "SUBJECT_CLAIM") => "EXTERNAL_SUBJECT_CLAIM",
        ("EXTERNAL", "USERNAME_CLAIM") => "EXTERNAL_USERNAME_CLAIM",
        ("EXTERNAL", "ROLE_CLAIM") => "EXTERNAL_ROLE_CLAIM",
        ("EXTERNAL", _) => "EXTERNAL_ADMIN_ROLES",
        (_, "SUBJECT_CLAIM") => "OIDC_SUBJECT_CLAIM",
        (_, "USERNAME_CLAIM") => "OIDC_USERNAME_CLAIM",
        (_, "ROLE_CLAIM") => "OIDC_ROLE_CLAIM",
        _ => "OIDC_ADMIN_ROLES",
    }
}

/// The optional settings for tokens issued elsewhere.
fn external_auth(src: &Source, own_secret: &str, errs: &mut Vec<String>) -> ExternalAuthConfig {
    let non_empty = |name: &'static str| {
        src.get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let list = |name: &'static str, default: &str| -> Vec<String> {
        non_empty(name)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let claims = |prefix: &str, username_default: &str| ClaimNames {
        subject: non_empty(claim_setting(prefix, "SUBJECT_CLAIM")).unwrap_or_else(|| "sub".into()),
        username: non_empty(claim_setting(prefix, "USERNAME_CLAIM"))
            .unwrap_or_else(|| username_default.into()),
        role: non_empty(claim_setting(prefix, "ROLE_CLAIM")).unwrap_or_else(|| "role".into()),
        admin_roles: list(claim_setting(prefix, "ADMIN_ROLES"), "admin"),
    };

    let login_service = non_empty("EXTERNAL_JWT_SECRET").map(|secret| {
        if KNOWN_SAMPLE_SECRETS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&secret))
        {
            errs.push(
                "EXTERNAL_JWT_SECRET: is a published sample value; use the login service's real secret"
                    .into(),
            );
        } else if secret.len() < 16 {
            errs.push(format!(
                "EXTERNAL_JWT_SECRET: too short ({} bytes, need at least 16)",
                secret.len()
            ));
        } else if secret == own_secret {
            errs.push(
                "EXTERNAL_JWT_SECRET: must differ from JWT_SECRET_KEY (the login service must not be able to mint this proxy's tokens)"
                    .into(),
            );
        }
        let algorithm = match non_empty("EXTERNAL_JWT_ALGORITHM")
            .unwrap_or_else(|| "HS256".into())
            .to_ascii_uppercase()
            .as_str()
        {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => {
                errs.push(format!(
                    "EXTERNAL_JWT_ALGORITHM: {other:?} is not one of HS256, HS384, HS512"
                ));
                Algorithm::HS256
            }
        };
        LoginServiceConfig {
            secret: secret.into_bytes(),
            algorithm,
            issuer: non_empty("EXTERNAL_JWT_ISSUER"),
            audience: non_empty("EXTERNAL_JWT_AUDIENCE"),
            claims: claims("EXTERNAL", "username"),
        }
    });

    let oidc = non_empty("OIDC_ISSUER").map(|issuer| {
        if url::Url::parse(&issuer).is_err() {
            errs.push(format!("OIDC_ISSUER: {issuer:?} is not a URL"));
        }
        let audiences = list("OIDC_AUDIENCE", "");
        if audiences.is_empty() {
            errs.push(
                "OIDC_AUDIENCE: required with OIDC_ISSUER (the client id or API identifier tokens are issued for)"
                    .into(),
            );
        }
        let jwks_url = non_empty("OIDC_JWKS_URL");
        if let Some(u) = &jwks_url {
            match url::Url::parse(u) {
                Ok(p) if matches!(p.scheme(), "http" | "https") => {}
                _ => errs.push(format!("OIDC_JWKS_URL: {u:?} is not an http(s) URL")),
            }
        }
        let mut algorithms = Vec::new();
        for a in list("OIDC_ALGORITHMS", "RS256,ES256") {
            match a.to_ascii_uppercase().as_str() {
                "RS256" => algorithms.push(Algorithm::RS256),
                "RS384" => algorithms.push(Algorithm::RS384),
                "RS512" => algorithms.push(Algorithm::RS512),
                "PS256" => algorithms.push(Algorithm::PS256),
                "PS384" => algorithms.push(Algorithm::PS384),
                "PS512" => algorithms.push(Algorithm::PS512),
                "ES256" => algorithms.push(Algorithm::ES256),
                "ES384" => algorithms.push(Algorithm::ES384),
                other => errs.push(format!(
                    "OIDC_ALGORITHMS: {other:?} is not an asymmetric algorithm (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)"
                )),
            }
        }
        let secs = |name: &'static str, default: u64, errs: &mut Vec<String>| {
            Duration::from_secs(src.parse(name, default, errs).max(1))
        };
        OidcConfig {
            issuer,
            audiences,
            jwks_url,
            algorithms,
            claims: claims("OIDC", "preferred_username"),
            jwks_refresh: secs("OIDC_JWKS_REFRESH_SECONDS", 300, errs),
            jwks_min_refresh: secs("OIDC_JWKS_MIN_REFRESH_SECONDS", 10, errs),
            jwks_wait: Duration::from_millis(src.parse("OIDC_JWKS_WAIT_MS", 2000u64, errs)),
        }
    });

    let auth_url = non_empty("EXTERNAL_AUTH_URL");
    if let Some(u) = &auth_url {
        match url::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "http" | "https") => {}
            _ => errs.push(format!("EXTERNAL_AUTH_URL: {u:?} is not an http(s) URL")),
        }
        if login_service.is_none() {
            errs.push(
                "EXTERNAL_AUTH_URL: needs EXTERNAL_JWT_SECRET to verify the tokens the login service returns"
                    .into(),
            );
        }
    }
    ExternalAuthConfig {
        login_service,
        oidc,
        auth_url,
    }
}

fn client_limits(src: &Source, errs: &mut Vec<String>) -> ClientLimits {
    let keepalive_secs = src.parse("KEEPALIVE_TIMEOUT_SECONDS", 60u64, errs);
    let header_ms = src.parse("REQUEST_HEADER_TIMEOUT_MS", 10_000u64, errs);
    let body_ms = src.parse("REQUEST_BODY_TIMEOUT_MS", 60_000u64, errs);
    if keepalive_secs == 0 || header_ms == 0 || body_ms == 0 {
        errs.push(
            "KEEPALIVE_TIMEOUT_SECONDS, REQUEST_HEADER_TIMEOUT_MS, REQUEST_BODY_TIMEOUT_MS: must be positive"
                .into(),
        );
    }
    let max_header_bytes = src.parse("MAX_HEADER_BYTES", 65_536usize, errs);
    // Pingora's own ceiling is just under 1 MiB.
    if !(1024..=1_048_575).contains(&max_header_bytes) {
        errs.push("MAX_HEADER_BYTES: must be between 1024 and 1048575".into());
    }
    let max_connections = src.parse("MAX_CONNECTIONS", 10_000usize, errs);
    let first_byte_ms = src.parse("UPSTREAM_FIRST_BYTE_TIMEOUT_MS", 120_000u64, errs);
    if max_connections == 0 {
        errs.push("MAX_CONNECTIONS: must be at least 1".into());
    }
    ClientLimits {
        keepalive_timeout: Duration::from_secs(keepalive_secs),
        header_timeout: Duration::from_millis(header_ms),
        body_timeout: Duration::from_millis(body_ms),
        max_header_bytes,
        max_connections,
        first_byte_timeout: (first_byte_ms > 0).then(|| Duration::from_millis(first_byte_ms)),
    }
}

/// `DATABASE_URL` and the sources, for the admin commands: the rest of the
/// configuration need not be complete (no JWT secret is needed to add a user),
/// but the sources must be readable and free of unknown keys.
pub fn for_admin(
    yaml_path: Option<&str>,
    env_file: Option<&str>,
) -> Result<(String, Duration), Vec<String>> {
    let mut src = Source::open(yaml_path, env_file)?;
    let mut errs = Vec::new();
    let cfg = Config::from_source(&src, &mut errs);
    src.check_keys();
    if !src.problems.is_empty() {
        return Err(src.problems.clone());
    }
    match src.lookup("DATABASE_URL") {
        Some((url, _)) if !url.is_empty() => {
            // The full configuration may be incomplete for admin work (no JWT
            // secret is needed to add a user): then read the hold lifetime alone.
            let hold_ttl = cfg.map(|c| c.hold_ttl).unwrap_or_else(|| {
                let secs = src
                    .lookup("HOLD_TTL_SECONDS")
                    .and_then(|(v, _)| v.trim().parse().ok())
                    .unwrap_or(900);
                Duration::from_secs(secs)
            });
            Ok((url, hold_ttl))
        }
        _ => Err(vec![format!(
            "DATABASE_URL is not set: looked in the environment, {}, and {}",
            match src.env_file_path() {
                Some(p) => format!("the settings file {p}"),
                None => format!(
                    "the settings file (none: no --env-file, FLOWISE_PROXY_ENV_FILE unset, no {DEFAULT_ENV_FILE} here)"
                ),
            },
            match src.yaml_path() {
                Some(p) => format!("database_url in {p}"),
                None => "no YAML file (-c)".into(),
            }
        )]),
    }
}

fn parse_flowise_url(raw: &str) -> Result<FlowiseUrl, String> {
    let url = url::Url::parse(raw).map_err(|_| format!("{raw:?} is not a URL"))?;
    let tls = match url.scheme() {
        "http" => false,
        "https" => true,
        s => return Err(format!("{raw:?}: scheme {s:?} is not http or https")),
    };
    if tls {
        return Err(format!(
            "{raw:?}: https upstreams are not supported by this build; put Flowise on a private http address"
        ));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{raw:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{raw:?}: credentials in the URL are not allowed; use FLOWISE_API_KEY"
        ));
    }
    let base_path = url.path().trim_end_matches('/').to_string();
    Ok(FlowiseUrl {
        host,
        port,
        tls,
        base_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml_source(text: &str) -> Source {
        match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Ok(serde_yaml::Value::Mapping(yaml)) => Source {
                env_file_path: None,
                env_file: Default::default(),
                yaml_path: None,
                yaml,
                asked: Default::default(),
                problems: Vec::new(),
            },
            _ => panic!("test YAML must be a mapping"),
        }
    }

    #[test]
    fn client_limits_have_defaults_and_are_checked() {
        let mut errs = Vec::new();
        let limits = client_limits(&yaml_source("{}"), &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            limits,
            ClientLimits {
                keepalive_timeout: Duration::from_secs(60),
                header_timeout: Duration::from_millis(10_000),
                body_timeout: Duration::from_millis(60_000),
                max_header_bytes: 65_536,
                max_connections: 10_000,
                first_byte_timeout: Some(Duration::from_millis(120_000)),
            }
        );
        let limits = client_limits(
            &yaml_source("keepalive_timeout_seconds: 5\nmax_header_bytes: 8192"),
            &mut errs,
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(limits.max_header_bytes, 8192);
        client_limits(
            &yaml_source(
                "request_body_timeout_ms: 0\nmax_header_bytes: 2000000\nmax_connections: 0",
            ),
            &mut errs,
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask("JWT_SECRET_KEY", "abcdef"), "(set, 6 bytes, hidden)");
        assert_eq!(mask("FLOWISE_API_KEY", "k"), "(set, 1 bytes, hidden)");
        assert_eq!(mask("REFRESH_TOKEN_DAYS", "7"), "7");
        assert_eq!(
            mask("DATABASE_URL", "postgresql://u:hunter2@db:5432/x"),
            "postgresql://u:***@db:5432/x"
        );
        assert_eq!(
            mask("DATABASE_URL", "postgresql://u@db/x"),
            "postgresql://u@db/x"
        );
    }

    #[test]
    fn pingora_keys_come_from_its_own_configuration() {
        let keys = pingora_keys();
        for k in [
            "version",
            "threads",
            "pid_file",
            "upgrade_sock",
            "work_stealing",
        ] {
            assert!(keys.contains(k), "{k} missing from {keys:?}");
        }
        assert!(!keys.contains("flowise_api_url"));
    }

    #[test]
    fn flowise_urls_parse() {
        let u = parse_flowise_url("http://localhost:3000").expect("valid");
        assert_eq!(u.addr(), "localhost:3000");
        assert_eq!(u.base_path, "");
        let u = parse_flowise_url("http://10.0.0.1/flowise/").expect("valid");
        assert_eq!(u.port, 80);
        assert_eq!(u.base_path, "/flowise");
        assert_eq!(u.host_header(), "10.0.0.1");
        assert!(parse_flowise_url("ftp://x").is_err());
        assert!(parse_flowise_url("not a url").is_err());
        assert!(parse_flowise_url("http://user:pw@x").is_err());
    }

    fn from_yaml(text: &str) -> Result<Config, Vec<String>> {
        let base = "database_url: postgresql://postgres@127.0.0.1/x\njwt_secret_key: 0123456789abcdef0123456789abcdef0123\n";
        let yaml = serde_yaml::from_str(&format!("{base}{text}")).expect("yaml");
        let mut errs = Vec::new();
        let src = Source {
            env_file_path: None,
            env_file: Default::default(),
            yaml_path: None,
            yaml,
            asked: Default::default(),
            problems: Vec::new(),
        };
        Config::from_source(&src, &mut errs).ok_or(errs)
    }

    #[test]
    fn external_auth_settings_are_checked() {
        let none = from_yaml("").expect("valid");
        assert!(!none.external.any());
        let ok = from_yaml(
            "external_jwt_secret: login-service-secret-123\nexternal_subject_claim: user_id\n\
             oidc_issuer: https://idp.example.com\noidc_audience: a, b\n",
        )
        .expect("valid");
        let ls = ok.external.login_service.expect("login service");
        assert_eq!(ls.claims.subject, "user_id");
        assert_eq!(ls.claims.username, "username");
        let oidc = ok.external.oidc.expect("oidc");
        assert_eq!(oidc.audiences, ["a", "b"]);
        assert_eq!(oidc.algorithms, [Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(oidc.claims.username, "preferred_username");

        for (yaml, wanted) in [
            ("oidc_issuer: https://idp.example.com\n", "OIDC_AUDIENCE"),
            (
                "oidc_issuer: https://idp.example.com\noidc_audience: a\noidc_algorithms: HS256\n",
                "OIDC_ALGORITHMS",
            ),
            (
                "external_auth_url: http://auth:3000/login\n",
                "EXTERNAL_AUTH_URL",
            ),
            ("external_jwt_secret: short\n", "EXTERNAL_JWT_SECRET"),
            (
                "external_jwt_secret: 0123456789abcdef0123456789abcdef0123\n",
                "EXTERNAL_JWT_SECRET",
            ),
        ] {
            let errs = from_yaml(yaml).expect_err(yaml);
            assert!(
                errs.iter().any(|e| e.starts_with(wanted)),
                "{yaml}: {errs:?}"
            );
        }
    }
}
