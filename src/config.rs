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
    pub log_json: bool,
    pub debug: bool,
    pub migrate_on_start: bool,
    pub database_wait: Duration,
    pub health_check_interval: Duration,
    pub catalog_sync_interval: Duration,
    pub snapshot_reload_interval: Duration,
    pub sweeper_interval: Duration,
    /// How long SIGTERM waits for in-flight requests before Pingora's own exit.
    pub grace_period: Duration,
    pub login_attempts_per_minute: u32,
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

/// Where a value came from: an environment variable or the YAML file.
struct Source {
    yaml: serde_yaml::Mapping,
}

impl Source {
    fn get(&self, name: &str) -> Option<String> {
        if let Ok(v) = std::env::var(name) {
            return Some(v);
        }
        let key = serde_yaml::Value::String(name.to_ascii_lowercase());
        match self.yaml.get(&key)? {
            serde_yaml::Value::String(s) => Some(s.clone()),
            serde_yaml::Value::Number(n) => Some(n.to_string()),
            serde_yaml::Value::Bool(b) => Some(b.to_string()),
            serde_yaml::Value::Sequence(items) => Some(
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        }
    }

    fn parse<T: std::str::FromStr>(&self, name: &str, default: T, errs: &mut Vec<String>) -> T {
        match self.get(name) {
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

    fn bool(&self, name: &str, default: bool, errs: &mut Vec<String>) -> bool {
        match self.get(name).map(|v| v.trim().to_ascii_lowercase()) {
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

impl Config {
    /// Loads and validates. Every problem is reported, one line each.
    pub fn load(yaml_path: Option<&str>) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let yaml = match yaml_path {
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
        let src = Source { yaml };
        Self::from_source(&src, &mut errs).ok_or(errs)
    }

    fn from_source(src: &Source, errs: &mut Vec<String>) -> Option<Config> {
        let host = src.get("HOST").unwrap_or_else(|| "0.0.0.0".into());
        let port = src.parse("PORT", 8000u16, errs);

        let flowise_raw = src
            .get("FLOWISE_API_URL")
            .unwrap_or_else(|| "http://localhost:3000".into());
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
            .get("JWT_ALGORITHM")
            .unwrap_or_else(|| "HS256".into())
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

        let metrics_raw = src
            .get("METRICS_ADDR")
            .unwrap_or_else(|| "127.0.0.1:9464".into());
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
        let log_format = src.get("LOG_FORMAT").unwrap_or_else(|| "json".into());
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
        let ms = |name: &str, default: u64, errs: &mut Vec<String>| {
            Duration::from_millis(src.parse(name, default, errs).max(1))
        };
        let health_check_interval = ms("HEALTH_CHECK_INTERVAL_MS", 1000, errs);
        let catalog_sync_interval = ms("CATALOG_SYNC_INTERVAL_MS", 60_000, errs);
        let snapshot_reload_interval = ms("SNAPSHOT_RELOAD_INTERVAL_MS", 5_000, errs);
        let sweeper_interval = ms("SWEEPER_INTERVAL_MS", 10_000, errs);
        let grace_period = Duration::from_secs(src.parse("GRACE_PERIOD_SECONDS", 30u64, errs));
        let login_attempts_per_minute = src.parse("LOGIN_ATTEMPTS_PER_MINUTE", 10u32, errs);
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
            log_json,
            debug,
            migrate_on_start,
            database_wait,
            health_check_interval,
            catalog_sync_interval,
            snapshot_reload_interval,
            sweeper_interval,
            grace_period,
            login_attempts_per_minute,
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

/// The optional settings for tokens issued elsewhere.
fn external_auth(src: &Source, own_secret: &str, errs: &mut Vec<String>) -> ExternalAuthConfig {
    let non_empty = |name: &str| {
        src.get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let list = |name: &str, default: &str| -> Vec<String> {
        non_empty(name)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let claims = |prefix: &str, username_default: &str| ClaimNames {
        subject: non_empty(&format!("{prefix}_SUBJECT_CLAIM")).unwrap_or_else(|| "sub".into()),
        username: non_empty(&format!("{prefix}_USERNAME_CLAIM"))
            .unwrap_or_else(|| username_default.into()),
        role: non_empty(&format!("{prefix}_ROLE_CLAIM")).unwrap_or_else(|| "role".into()),
        admin_roles: list(&format!("{prefix}_ADMIN_ROLES"), "admin"),
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
        let secs = |name: &str, default: u64, errs: &mut Vec<String>| {
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

/// Reads only `DATABASE_URL` (env over YAML): enough for the admin CLI.
pub fn database_url_only(yaml_path: Option<&str>) -> Result<String, String> {
    if let Ok(v) = std::env::var("DATABASE_URL") {
        if !v.is_empty() {
            return Ok(v);
        }
    }
    if let Some(path) = yaml_path {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        if let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str::<serde_yaml::Value>(&text)
        {
            if let Some(serde_yaml::Value::String(s)) =
                m.get(serde_yaml::Value::String("database_url".into()))
            {
                return Ok(s.clone());
            }
        }
    }
    Err("DATABASE_URL is not set".into())
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
        Config::from_source(&Source { yaml }, &mut errs).ok_or(errs)
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
