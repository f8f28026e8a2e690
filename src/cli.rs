//! Command line: `serve` (the default) plus the admin commands a fresh install
//! needs, working against `DATABASE_URL`.

use std::io::{BufRead, IsTerminal};

use clap::{Parser, Subcommand};
use pingora_core::server::configuration::Opt;

use crate::auth::password;
use crate::config::{self, Config};
use crate::store;
use crate::validate;

#[derive(Parser)]
#[command(
    name = "flowise-proxy",
    version,
    about = "Edge proxy for Flowise: login, grants, credits, metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    opt: Opt,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve {
        #[command(flatten)]
        opt: Opt,
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
    match cli.command {
        None => serve(cli.opt),
        Some(Command::Serve { opt }) => serve(merge(cli.opt, opt)),
        Some(cmd) => admin(cmd, cli.opt.conf.as_deref()),
    }
}

fn merge(outer: Opt, inner: Opt) -> Opt {
    Opt {
        upgrade: outer.upgrade || inner.upgrade,
        daemon: outer.daemon || inner.daemon,
        nocapture: outer.nocapture || inner.nocapture,
        test: outer.test || inner.test,
        conf: inner.conf.or(outer.conf),
    }
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

fn serve(opt: Opt) -> i32 {
    let cfg = match Config::load(opt.conf.as_deref()) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("flowise-proxy: configuration error: {e}");
            }
            return 2;
        }
    };
    init_logging(cfg.log_json, cfg.debug);
    match crate::server::run(opt, cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
            1
        }
    }
}

fn admin(cmd: Command, conf: Option<&str>) -> i32 {
    init_logging(false, false);
    let url = match config::database_url_only(conf) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
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
    match rt.block_on(run_admin(cmd, &url, conf)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowise-proxy: {e}");
            1
        }
    }
}

async fn run_admin(cmd: Command, url: &str, conf: Option<&str>) -> Result<i32, String> {
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
                store::ledger::adjust(
                    &db,
                    u.id,
                    n,
                    if n > 0 { "grant" } else { "adjust" },
                    "initial credits",
                    None,
                    None,
                )
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
                let (avail, held) = store::ledger::balance(&db, u.id)
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
            let kind = if amount > 0 { "grant" } else { "adjust" };
            match store::ledger::adjust(
                &db,
                id,
                amount,
                kind,
                &reason,
                idempotency_key.as_deref(),
                None,
            )
            .await
            .map_err(|e| e.to_string())?
            {
                store::ledger::Adjusted::Applied { available } => {
                    println!("credits now {available}")
                }
                store::ledger::Adjusted::Replayed { available } => {
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
            let ttl = Config::load(conf)
                .map(|c| c.hold_ttl.as_secs_f64())
                .unwrap_or_else(|_| {
                    std::env::var("HOLD_TTL_SECONDS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(900.0)
                });
            let problems = store::ledger::verify(&db, ttl)
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
