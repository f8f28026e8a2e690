//! The command line as the README documents it: `--help` describes this
//! program, every command takes `-c`, the settings file that run-local.sh
//! writes is found by default, and `-t` shows what it checked and fails on a
//! misspelled key.
//!
//! Every command runs with an empty environment (`env_clear`), so nothing leaks
//! in from the shell that runs the tests.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_flowise-proxy");
const SECRET: &str = "cli-test-secret-0123456789-abcdefghijklmnop";

/// Runs the binary in `dir` with only `env` set, stdin from `input`.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)], input: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowise-proxy");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(stdin);
    child.wait_with_output().expect("flowise-proxy output")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_describes_this_program_not_pingora() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), &["--help"], &[], None);
    let help = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(help.contains("Edge proxy for Flowise"), "{help}");
    assert!(!help.contains("pingora-based service"), "{help}");
    assert!(!help.contains("upgrading service"), "{help}");
    for expected in ["--conf", "--test", "--env-file", ".local/flowise-proxy.env"] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
    // Every subcommand documents -c as well.
    let out = run(dir.path(), &["user", "list", "--help"], &[], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("--conf"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_takes_c_with_the_database_url_in_the_yaml() {
    let db = support::pg::fresh_db().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("proxy.yaml");
    std::fs::write(
        &conf,
        format!(
            "version: 1\nthreads: 2\ndatabase_url: {}\nhold_ttl_seconds: 600\n",
            db.url
        ),
    )
    .expect("write yaml");
    let c = conf.to_str().expect("utf-8 path");
    let out = run(dir.path(), &["migrate", "-c", c], &[], None);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        dir.path(),
        &[
            "user",
            "add",
            "carol",
            "--role",
            "user",
            "--credits",
            "5",
            "-c",
            c,
        ],
        &[],
        Some("carol-password-1\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    // -c before the subcommand works too.
    let out = run(dir.path(), &["-c", c, "user", "list"], &[], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("carol"), "{}", text(&out));
    let out = run(dir.path(), &["ledger", "verify", "-c", c], &[], None);
    assert!(out.status.success(), "{}", text(&out));

    // The ledger has no foreign key to accounts (migration V8, a per-row
    // cost): a row of a user without an account is what verify reports.
    db.client()
        .await
        .execute(
            "INSERT INTO ledger (user_id, kind, delta_available, delta_held) VALUES (987654, 'grant', 3, 0)",
            &[],
        )
        .await
        .expect("insert a stray ledger row");
    let out = run(dir.path(), &["ledger", "verify", "-c", c], &[], None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("user 987654: 1 ledger rows but no account"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shell_finds_the_settings_run_local_wrote() {
    let db = support::pg::fresh_db().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join(".local")).expect("mkdir .local");
    let conf = dir.path().join("conf.yaml");
    std::fs::write(&conf, "version: 1\nport: 8123\n").expect("write yaml");
    // The shape scripts/run-local.sh writes.
    std::fs::write(
        dir.path().join(".local/flowise-proxy.env"),
        format!(
            "# written by run-local.sh\nFLOWISE_PROXY_CONF='{}'\nDATABASE_URL='{}'\nJWT_SECRET_KEY='{SECRET}'\n",
            conf.display(),
            db.url
        ),
    )
    .expect("write settings file");
    let out = run(
        dir.path(),
        &["user", "add", "dave", "--role", "admin"],
        &[],
        Some("dave-password-1\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(dir.path(), &["user", "list"], &[], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("dave"), "{}", text(&out));

    // -t shows the settings file, the YAML it named, and where each value came from.
    let out = run(dir.path(), &["-t"], &[], None);
    let report = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        report.contains("settings file: .local/flowise-proxy.env"),
        "{report}"
    );
    assert!(
        report.contains(&format!("YAML file: {}", conf.display())),
        "{report}"
    );
    assert!(report.contains("PORT = 8123  [YAML"), "{report}");
    assert!(
        report.contains("DATABASE_URL = postgresql://") && report.contains("[settings file"),
        "{report}"
    );
    // The environment still wins over the file.
    let out = run(dir.path(), &["-t"], &[("PORT", "9001")], None);
    assert!(
        stdout(&out).contains("PORT = 9001  [environment]"),
        "{}",
        text(&out)
    );
}

#[test]
fn test_flag_prints_what_it_checked_with_secrets_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("ok.yaml");
    std::fs::write(
        &conf,
        "version: 1\nthreads: 2\nport: 8100\nflowise_api_url: http://127.0.0.1:3000\n",
    )
    .expect("write yaml");
    let db_url = "postgresql://proxy:db-password-4711@127.0.0.1:5432/flowise_proxy";
    let out = run(
        dir.path(),
        &["-t", "-c", conf.to_str().expect("utf-8 path")],
        &[
            ("DATABASE_URL", db_url),
            ("JWT_SECRET_KEY", SECRET),
            ("FLOWISE_API_KEY", "flowise-key-4711"),
        ],
        None,
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let report = stdout(&out);
    for expected in [
        "environment variables",
        &format!("YAML file: {}", conf.display()),
        "PORT = 8100  [YAML",
        "DATABASE_URL = postgresql://proxy:***@127.0.0.1:5432/flowise_proxy  [environment]",
        "JWT_SECRET_KEY = (set, 43 bytes, hidden)  [environment]",
        "FLOWISE_API_KEY = (set, 16 bytes, hidden)  [environment]",
        "HOLD_TTL_SECONDS = 900  [default]",
        "configuration test passed",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    for secret in [SECRET, "db-password-4711", "flowise-key-4711"] {
        assert!(!all.contains(secret), "{secret} printed:\n{all}");
    }
    assert!(!all.contains("Ignoring command line argument"), "{all}");
}

#[test]
fn test_flag_fails_on_a_misspelled_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("typo.yaml");
    // `flowise_api_ur` instead of `flowise_api_url`; `threads` is Pingora's.
    std::fs::write(
        &conf,
        "version: 1\nthreads: 2\nflowise_api_ur: http://x:3000\n",
    )
    .expect("write yaml");
    let env = [
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/x"),
        ("JWT_SECRET_KEY", SECRET),
    ];
    let c = conf.to_str().expect("utf-8 path");
    let out = run(dir.path(), &["-t", "-c", c], &env, None);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("unknown key \"flowise_api_ur\""), "{all}");
    assert!(all.contains("configuration test FAILED"), "{all}");
    assert!(
        !all.contains("\"threads\""),
        "Pingora's keys are known: {all}"
    );

    // The server refuses it too instead of ignoring it.
    let out = run(dir.path(), &["serve", "-c", c], &env, None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("flowise_api_ur"), "{}", text(&out));
}

#[test]
fn missing_database_url_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(dir.path(), &["user", "list"], &[], None);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("DATABASE_URL is not set"), "{all}");
    assert!(all.contains(".local/flowise-proxy.env"), "{all}");
}

/// A binary older than the database's schema (a rollback, or an old
/// instance restarting during a rolling upgrade) refuses to start and says
/// why, instead of running on a schema it was not written for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_binary_refuses_a_newer_schema_and_says_so() {
    let db = support::pg::fresh_db().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("JWT_SECRET_KEY", SECRET),
    ];
    let out = run(dir.path(), &["migrate"], &env, None);
    assert!(out.status.success(), "{}", text(&out));
    // What a later version's migration leaves behind.
    db.client()
        .await
        .execute(
            "INSERT INTO flowise_proxy_migrations (version, name, applied_on, checksum)
             SELECT 9999, 'from_the_future', applied_on, '0'
             FROM flowise_proxy_migrations ORDER BY version DESC LIMIT 1",
            &[],
        )
        .await
        .expect("record a newer migration");
    for args in [&["migrate"][..], &["serve"][..]] {
        let out = run(dir.path(), args, &env, None);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let said = text(&out);
        assert!(
            said.contains("migrated by a newer flowise-proxy")
                && said.contains("V9999__from_the_future"),
            "{args:?}: {said}"
        );
    }
}
