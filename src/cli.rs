//! Command line: `serve` (the default) plus the admin commands a fresh install
//! needs. Every command reads its settings from the same sources as the server
//! (see `config::Source`): the environment, the settings file
//! (`.local/flowise-proxy.env`, written by `scripts/run-local.sh`), the YAML
//! file given with `-c`, then the defaults.

use std::io::{BufRead, IsTerminal};

use clap::{Args, Parser, Subcommand};
use pingora_core::server::configuration::Opt;

use crate::auth::password;
use crate::config::{self, Config};
use crate::store;
use crate::validate;

#[derive(Parser)]
#[command(
    name = "flowise-proxy",
    version,
    about = "Edge proxy for Flowise: per-user login, chatflow grants, prepaid credits, metrics",
    long_about = "Edge proxy for Flowise: per-user login, chatflow grants, prepaid credits, metrics.\n\n\
Without a command it runs the proxy (`serve`). Settings come from, in this order of \
precedence: environment variables, the settings file (KEY=VALUE lines; --env-file, \
else $FLOWISE_PROXY_ENV_FILE, else .local/flowise-proxy.env in the working directory, \
which scripts/run-local.sh writes), the YAML file (-c, else $FLOWISE_PROXY_CONF), \
then the defaults. Every command reads the same sources.",
    after_help = "Check a configuration: flowise-proxy -t -c conf/flowise-proxy.yaml"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    serve: ServeFlags,
}

/// Options every command takes.
#[derive(Args, Clone, Default)]
struct Common {
    /// YAML configuration file: flowise-proxy's settings (lower-case names) and
    /// Pingora's keys. Default: $FLOWISE_PROXY_CONF, if set.
    #[arg(short = 'c', long = "conf", value_name = "FILE", global = true)]
    conf: Option<String>,
    /// Settings file of KEY=VALUE lines. Default: $FLOWISE_PROXY_ENV_FILE, else
    /// .local/flowise-proxy.env when it exists in the working directory.
    #[arg(long = "env-file", value_name = "FILE", global = true)]
    env_file: Option<String>,
    /// Test the configuration and exit: prints each source and every setting
    /// with its value (secrets hidden) and origin; exits 1 on any error,
    /// including a YAML key nobody reads (a misspelling).
    #[arg(short = 't', long = "test", global = true)]
    test: bool,
}

/// Flags of `serve`.
#[derive(Args, Clone, Default)]
struct ServeFlags {
    /// Run in the background (writes the YAML's pid_file).
    #[arg(short = 'd', long)]
    daemon: bool,
    /// Take the listening sockets over from a running instance (graceful
    /// upgrade through the YAML's upgrade_sock); then send it SIGQUIT.
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Accepted and ignored (passed by `cargo test` harnesses).
    #[arg(long, hide = true)]
    nocapture: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve {
        #[command(flatten)]
        flags: ServeFlags,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage credits.
    Credits {
        #[command(subcommand)]
        cmd: CreditsCmd,
    },
    /// Grant a chatflow to a user.
    Grant {
        username: String,
        chatflow_id: String,
    },
    /// Manage API keys.
    Apikey {
        #[command(subcommand)]
        cmd: ApikeyCmd,
    },
    /// Check the books.
    Ledger {
        #[command(subcommand)]
        cmd: LedgerCmd,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user; the password is read from stdin, or generated and printed.
    Add {
        username: String,
        #[arg(long, default_value = "user")]
        role: String,
        #[arg(long)]
        credits: Option<i64>,
        #[arg(long)]
        email: Option<String>,
    },
    /// List users.
    List,
}

#[derive(Subcommand)]
enum CreditsCmd {
    /// Add (or with a negative N, remove) credits.
    Grant {
        username: String,
        #[arg(allow_hyphen_values = true)]
        amount: i64,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum ApikeyCmd {
    /// Issue an API key; the secret is printed once.
    Create {
        username: String,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Exit 1 with a report when any balance drifts from its ledger rows or any
    /// hold is orphaned past HOLD_TTL_SECONDS.
    Verify,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let common = cli.common;
    if common.test {
        return test_configuration(&common);
    }
    match cli.command {
        None => serve(&common, cli.serve),
        Some(Command::Serve { flags }) => serve(
            &common,
            ServeFlags {
                daemon: cli.serve.daemon || flags.daemon,
                upgrade: cli.serve.upgrade || flags.upgrade,
                nocapture: cli.serve.nocapture || flags.nocapture,
            },
        ),
        Some(cmd) => {
            // An admin command's output piped into `head` ends quietly when the
            // reader closes, as a Unix tool does, instead of panicking on EPIPE.
            // SAFETY: resetting a signal disposition at start-up, before any
            // thread of ours exists.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            admin(cmd, &common)
        }
    }
}

/// `-t`: every source, every setting and where it came from, then the verdict.
fn test_configuration(common: &Common) -> i32 {
    // `flowise-proxy -t | head` ends quietly, like other Unix tools, instead of
    // panicking on the closed pipe. Only here: this path serves nothing.
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    println!(
        "flowise-proxy {} configuration test",
        env!("CARGO_PKG_VERSION")
    );
    let src = match config::Source::open(common.conf.as_deref(), common.env_file.as_deref()) {
        Ok(src) => src,
        Err(errs) => return report_failure(&errs),
    };
    println!("sources, highest precedence first:");
    println!("  environment variables");
    match src.env_file_path() {
        Some(p) => println!("  settings file: {p}"),
        None => println!(
            "  settings file: none (no --env-file, FLOWISE_PROXY_ENV_FILE unset, no {} here)",
            config::DEFAULT_ENV_FILE
        ),
    }
    match src.yaml_path() {
        Some(p) => println!("  YAML file: {p}"),
        None => println!("  YAML file: none (no -c, {} unset)", config::CONF_VARIABLE),
    }
    println!("  defaults");
    let mut src = src;
    let mut errs = Vec::new();
    let cfg = Config::from_source(&src, &mut errs);
    src.check_keys();
    errs.extend(src.problems.iter().cloned());
    println!("settings:");
    for (name, value, origin) in src.report() {
        println!("  {name} = {value}  [{origin}]");
    }
    if let Some(path) = src.yaml_path() {
        match pingora_core::server::configuration::ServerConf::load_from_yaml(path) {
            Ok(_) => println!("Pingora keys in {path}: ok"),
            Err(e) => errs.push(format!("{path}: Pingora's configuration: {e}")),
        }
    }
    if cfg.is_none() && errs.is_empty() {
        errs.push("the configuration is incomplete".into());
    }
    if !errs.is_empty() {
        return report_failure(&errs);
    }
    println!("configuration test passed");
    0
}

fn report_failure(errs: &[String]) -> i32 {
    for e in errs {
        eprintln!("flowise-proxy: configuration error: {e}");
    }
    println!("configuration test FAILED: {} problem(s)", errs.len());
    1
}

fn init_logging(json: bool, debug: bool) {
    // DEBUG only raises log verbosity; clients never see more either way.
    let default = if debug {
        "info,flowise_proxy=debug"
    } else {
        "warn,flowise_proxy=info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn serve(common: &Common, flags: ServeFlags) -> i32 {
    let (cfg, src) = match Config::load_with(common.conf.as_deref(), common.env_file.as_deref()) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("flowise-proxy: configuration error: {e}");
            }
            return 2;
        }
    };
    init_logging(cfg.log_json, cfg.debug);
    let opt = Opt {
        upgrade: flags.upgrade,
        daemon: flags.daemon,
        nocapture: flags.nocapture,
        test: false,
        // Pingora reads its keys from the same YAML file, wherever it was found.
        conf: src.yaml_path().map(str::to_string),
    };
    match crate::server::run(opt, cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
            1
        }
    }
}

fn admin(cmd: Command, common: &Common) -> i32 {
    init_logging(false, false);
    let (url, hold_ttl) =
        match config::for_admin(common.conf.as_deref(), common.env_file.as_deref()) {
            Ok(found) => found,
            Err(errs) => {
                for e in errs {
                    eprintln!("flowise-proxy: {e}");
                }
                return 2;
            }
        };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
            return 1;
        }
    };
    match rt.block_on(run_admin(cmd, &url, hold_ttl)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
            1
        }
    }
}

async fn run_admin(cmd: Command, url: &str, hold_ttl: std::time::Duration) -> Result<i32, String> {
    if let Command::Migrate = cmd {
        let applied = store::migrate(url).await?;
        println!(
            "migrations applied: {}",
            if applied.is_empty() {
                "none (up to date)".into()
            } else {
                applied.join(", ")
            }
        );
        return Ok(0);
    }
    store::migrate(url).await?;
    let db = store::build_pool(url, 2)?;
    let user_id = |name: String| {
        let db = db.clone();
        async move {
            store::identity::find_user_by_name(&db, &name)
                .await
                .map_err(|e| e.to_string())?
                .map(|u| u.id)
                .ok_or_else(|| format!("no user named {name:?}"))
        }
    };
    match cmd {
        Command::Migrate | Command::Serve { .. } => Ok(0),
        Command::User {
            cmd:
                UserCmd::Add {
                    username,
                    role,
                    credits,
                    email,
                },
        } => {
            validate::username(&username).map_err(|e| e.detail)?;
            validate::role(&role).map_err(|_| "--role must be admin or user".to_string())?;
            if let Some(e) = &email {
                validate::email(e).map_err(|e| e.detail)?;
            }
            let (pw, generated) = read_password()?;
            validate::password(&pw).map_err(|e| e.detail)?;
            let hash = password::hash_password(&pw)?;
            let u = store::identity::create_user(&db, &username, &hash, &role, email.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if let Some(n) = credits.filter(|n| *n != 0) {
                crate::ledger::change_balance(&db, u.id, n, "initial credits", None, None)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            println!("created user {} (id {}, role {})", u.username, u.id, u.role);
            if generated {
                println!("password: {pw}");
            }
            Ok(0)
        }
        Command::User { cmd: UserCmd::List } => {
            for u in store::identity::list_users(&db, 500, 0)
                .await
                .map_err(|e| e.to_string())?
            {
                let (avail, held) = crate::ledger::balance(&db, u.id)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or((0, 0));
                println!(
                    "{}\t{}\t{}\t{}\tcredits={avail}\theld={held}",
                    u.id,
                    u.username,
                    u.role,
                    if u.active { "active" } else { "inactive" }
                );
            }
            Ok(0)
        }
        Command::Credits {
            cmd:
                CreditsCmd::Grant {
                    username,
                    amount,
                    reason,
                    idempotency_key,
                },
        } => {
            validate::credit_change(amount, &reason, idempotency_key.as_deref())
                .map_err(|e| e.detail)?;
            let id = user_id(username).await?;
            match crate::ledger::change_balance(
                &db,
                id,
                amount,
                &reason,
                idempotency_key.as_deref(),
                None,
            )
            .await
            .map_err(|e| e.to_string())?
            {
                crate::ledger::Adjusted::Applied { available } => {
                    println!("credits now {available}")
                }
                crate::ledger::Adjusted::Replayed { available } => {
                    println!("already applied; credits {available}")
                }
            }
            Ok(0)
        }
        Command::Grant {
            username,
            chatflow_id,
        } => {
            validate::chatflow_id(&chatflow_id).map_err(|e| e.detail)?;
            let id = user_id(username).await?;
            // The catalogue may not have synced yet: make sure the row exists.
            store::catalog::ensure_known(&db, &chatflow_id)
                .await
                .map_err(|e| e.to_string())?;
            store::identity::grant(&db, id, &chatflow_id)
                .await
                .map_err(|e| e.to_string())?;
            println!("granted {chatflow_id} to user {id}");
            Ok(0)
        }
        Command::Apikey {
            cmd: ApikeyCmd::Create { username, name },
        } => {
            if let Some(n) = &name {
                validate::key_name(n).map_err(|e| e.detail)?;
            }
            let id = user_id(username).await?;
            let k = password::new_api_key();
            let (key_id, _) = store::identity::insert_api_key(
                &db,
                id,
                &k.prefix,
                &k.secret_hash,
                name.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())?;
            println!("api key {key_id} (shown once): {}", k.token);
            Ok(0)
        }
        Command::Ledger {
            cmd: LedgerCmd::Verify,
        } => {
            let problems = crate::ledger::verify(&db, hold_ttl)
                .await
                .map_err(|e| e.to_string())?;
            if problems.is_empty() {
                println!(
                    "ledger ok: every balance equals the sum of its ledger rows; no orphaned holds"
                );
                Ok(0)
            } else {
                for p in &problems {
                    println!("DRIFT: {p}");
                }
                println!("ledger verify failed: {} problem(s)", problems.len());
                Ok(1)
            }
        }
    }
}

/// The password from stdin when piped, else a generated one.
fn read_password() -> Result<(String, bool), String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let pw = line.trim_end_matches(['\r', '\n']).to_string();
        if !pw.is_empty() {
            return Ok((pw, false));
        }
    }
    Ok((password::random_token(18), true))
}
