//! TLS against a real server: a throwaway cluster with `ssl = on` and certificates this test
//! generates (a CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA),
//! `hostssl`-only and certificate-authenticated roles. Each libpq `sslmode` is checked from
//! outside, in `pg_stat_ssl`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use distlock::testing::{Setup, TestCluster};
use distlock::{ErrorKind, LockKey, LockManager};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// The CA, server and client files, and the cluster that uses them.
struct Tls {
    cluster: TestCluster,
    /// Client-side files: `ca.pem`, `other-ca.pem`, `client.crt`, `client.key`.
    dir: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn signed(issuer: &Issuer<'_, KeyPair>, common_name: &str, sans: Vec<SanType>) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The TLS cluster of this test binary, or `None` (with the reason said) where it cannot run.
fn tls() -> Option<&'static Tls> {
    static TLS: OnceLock<Option<Tls>> = OnceLock::new();
    TLS.get_or_init(|| {
        if distlock::testing::database_url().is_some() {
            distlock::testing::skip(
                "DATABASE_URL is set, and these tests configure a server of their own",
            );
            return None;
        }
        let (ca_params, ca_key, ca_pem) = ca("distlock test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let (server_crt, server_key) = signed(
            &issuer,
            "127.0.0.1",
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        );
        let (client_crt, client_key) = signed(&issuer, "distlock_cert", Vec::new());
        let (_, _, other_ca_pem) = ca("an unrelated CA");
        let dir = std::env::temp_dir().join(format!("distlock-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in [
            ("ca.pem", &ca_pem),
            ("other-ca.pem", &other_ca_pem),
            ("client.crt", &client_crt),
            ("client.key", &client_key),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let setup = Setup {
            hba: vec![
                "hostssl all distlock_tls_only 127.0.0.1/32 scram-sha-256".into(),
                "host all distlock_tls_only 127.0.0.1/32 reject".into(),
                "hostssl all distlock_cert 127.0.0.1/32 cert".into(),
                "host all distlock_md5 127.0.0.1/32 md5".into(),
                "host all distlock_cert 127.0.0.1/32 reject".into(),
            ],
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
                ("ssl_ca_file".into(), "ca.pem".into()),
            ],
            files: vec![
                ("server.crt".into(), server_crt.into_bytes()),
                ("server.key".into(), server_key.into_bytes()),
                ("ca.pem".into(), ca_pem.into_bytes()),
            ],
            sql: vec![
                "CREATE ROLE distlock_tls_only LOGIN PASSWORD 'tls-only-secret'".into(),
                "CREATE ROLE distlock_cert LOGIN".into(),
                "SET password_encryption = 'md5'; \
                 CREATE ROLE distlock_md5 LOGIN PASSWORD 'md5-secret'"
                    .into(),
            ],
            // Also listen where a connection without a host looks, as libpq's would.
            socket_dirs: vec![distlock::testing::default_socket_dir().to_path_buf()],
            ..Default::default()
        };
        let cluster = TestCluster::start_with(&setup).expect("start the TLS cluster");
        Some(Tls { cluster, dir })
    })
    .as_ref()
}

impl Tls {
    fn port(&self) -> u16 {
        self.cluster.port().expect("local")
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Connection parameters for `user` at `host`, plus `extra`.
    fn params(&self, host: &str, user: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user={user} dbname=postgres {extra}",
            self.port()
        )
    }
}

/// Whether the session named `app` is encrypted, as the server sees it.
fn encrypted(cluster: &TestCluster, app: &str) -> bool {
    let mut client = postgres::Client::connect(cluster.url(), postgres::NoTls).unwrap();
    client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0)
}

fn manager(params: &str, app: &str) -> distlock::Result<LockManager> {
    LockManager::builder().application_name(app).connect(params)
}

/// Connects, takes a lock, and says whether the session was encrypted.
fn works(tls: &Tls, params: &str, app: &str) -> bool {
    let locks = manager(params, app).unwrap_or_else(|e| panic!("{params}: {e:?}"));
    let guard = locks
        .try_lock(LockKey::name(app))
        .unwrap()
        .expect("free key");
    let encrypted = encrypted(&tls.cluster, app);
    guard.unlock().unwrap();
    encrypted
}

fn rejected(params: &str, app: &str) -> String {
    let err = manager(params, app).expect_err(params);
    assert_eq!(err.kind(), ErrorKind::Connect, "{params}: {err:?}");
    err.to_string()
}

#[test]
fn require_and_prefer_encrypt_against_a_tls_server() {
    let Some(tls) = tls() else { return };
    assert!(works(
        tls,
        &tls.params("127.0.0.1", "postgres", "sslmode=require"),
        "tls-require"
    ));
    // prefer is the default, as in libpq: TLS when the server offers it, and then really encrypted.
    assert!(works(
        tls,
        &tls.params("127.0.0.1", "postgres", ""),
        "tls-default"
    ));
    assert!(works(
        tls,
        &tls.params("127.0.0.1", "postgres", "sslmode=prefer"),
        "tls-prefer"
    ));
    assert!(!works(
        tls,
        &tls.params("127.0.0.1", "postgres", "sslmode=disable"),
        "tls-disable"
    ));
}

#[test]
fn verify_full_checks_the_ca_and_the_host_name() {
    let Some(tls) = tls() else { return };
    let ca = tls.file("ca.pem");
    assert!(works(
        tls,
        &tls.params(
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-full sslrootcert={ca}")
        ),
        "tls-verify-full"
    ));
    // The URL form says the same.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={ca}",
        tls.port()
    );
    assert!(works(tls, &url, "tls-verify-full-url"));

    let other = tls.file("other-ca.pem");
    let message = rejected(
        &tls.params(
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-full sslrootcert={other}"),
        ),
        "tls-other-ca",
    );
    assert!(message.contains("certificate was rejected"), "{message}");
    let message = rejected(
        &tls.params(
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-ca sslrootcert={other}"),
        ),
        "tls-other-ca-ca",
    );
    assert!(message.contains("certificate was rejected"), "{message}");

    // The certificate names 127.0.0.1 only: through "localhost" the host name does not match.
    let message = rejected(
        &tls.params(
            "localhost",
            "postgres",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        "tls-wrong-host",
    );
    assert!(message.contains("host name"), "{message}");
    // verify-ca checks the chain and not the name.
    assert!(works(
        tls,
        &tls.params(
            "localhost",
            "postgres",
            &format!("sslmode=verify-ca sslrootcert={ca}")
        ),
        "tls-verify-ca"
    ));
    // require with a root certificate verifies the chain, as libpq does.
    let message = rejected(
        &tls.params(
            "127.0.0.1",
            "postgres",
            &format!("sslmode=require sslrootcert={other}"),
        ),
        "tls-require-root",
    );
    assert!(message.contains("certificate was rejected"), "{message}");
}

#[test]
fn require_against_a_server_without_tls_is_a_clear_error() {
    let Some(_) = tls() else { return };
    let plain = TestCluster::start().expect("a plain cluster");
    let params = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        plain.port().unwrap()
    );
    let message = rejected(&params, "tls-plain-require");
    assert!(message.contains("does not support TLS"), "{message}");
}

#[test]
fn a_client_certificate_authenticates_its_role() {
    let Some(tls) = tls() else { return };
    let (cert, key) = (tls.file("client.crt"), tls.file("client.key"));
    assert!(works(
        tls,
        &tls.params(
            "127.0.0.1",
            "distlock_cert",
            &format!(
                "sslmode=verify-full sslrootcert={} sslcert={cert} sslkey={key}",
                tls.file("ca.pem")
            )
        ),
        "tls-client-cert"
    ));
    // Without the certificate the role cannot log in.
    let message = rejected(
        &tls.params(
            "127.0.0.1",
            "distlock_cert",
            "sslmode=require sslcert=/nonexistent.crt",
        ),
        "tls-no-client-cert",
    );
    assert!(
        message.contains("requires a valid client certificate"),
        "the server's reason is not in the error: {message}"
    );
    // A key others can read is refused before any connection, as libpq refuses it.
    let open_key = Path::new(&tls.dir).join("open.key");
    std::fs::copy(&key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = manager(
        &tls.params(
            "127.0.0.1",
            "distlock_cert",
            &format!(
                "sslmode=require sslcert={cert} sslkey={}",
                open_key.display()
            ),
        ),
        "tls-open-key",
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(err.to_string().contains("group or world access"), "{err}");
}

#[test]
fn a_hostssl_only_role_connects_over_tls_with_scram_and_channel_binding() {
    let Some(tls) = tls() else { return };
    let password = "password=tls-only-secret";
    assert!(works(
        tls,
        &tls.params(
            "127.0.0.1",
            "distlock_tls_only",
            &format!("{password} sslmode=require channel_binding=require")
        ),
        "tls-only-role"
    ));
    // Over plaintext the server refuses it.
    let message = rejected(
        &tls.params(
            "127.0.0.1",
            "distlock_tls_only",
            &format!("{password} sslmode=disable"),
        ),
        "tls-only-plain",
    );
    assert!(
        message.contains("pg_hba.conf rejects connection") && message.contains("no encryption"),
        "the server's reason is not in the error: {message}"
    );
    // The password appears in no error or debug output.
    let err = manager(
        &tls.params(
            "127.0.0.1",
            "distlock_tls_only",
            "password=wrong-secret-789 sslmode=require",
        ),
        "tls-wrong-password",
    )
    .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-secret-789"), "{shown}");
}

#[test]
fn the_command_honours_the_pgssl_variables() {
    let Some(tls) = tls() else { return };
    let distlock = |root: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"));
        cmd.env(
            "DATABASE_URL",
            format!(
                "host=127.0.0.1 port={} user=distlock_cert dbname=postgres",
                tls.port()
            ),
        )
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", root)
        .env("PGSSLCERT", tls.file("client.crt"))
        .env("PGSSLKEY", tls.file("client.key"))
        .env("PGAPPNAME", "tls-cli")
        .stdin(std::process::Stdio::null());
        cmd
    };
    // The client certificate logs in (the role allows nothing else), over verified TLS.
    let out = distlock(&tls.file("ca.pem"))
        .args(["run", "--key", "tls/cli", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = distlock(&tls.file("ca.pem")).arg("locks").output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unrelated CA: the certificate is rejected, and the command says so.
    let out = distlock(&tls.file("other-ca.pem"))
        .args(["run", "--key", "tls/cli", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("certificate was rejected"), "{err}");
    // A connection string's own sslmode wins over the variable's: `disable` in the string, with
    // PGSSLMODE=verify-full and a CA that would reject the server's certificate in the
    // environment, connects in plaintext (the variable would make it exit 69).
    let out = distlock(&tls.file("other-ca.pem"))
        .env(
            "DATABASE_URL",
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                tls.port()
            ),
        )
        .args(["run", "--key", "tls/cli", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Prints (asserts nothing about timing) what TLS costs in wall-clock time on this machine: the
/// time to connect a manager, and the lock+unlock cycle, each plaintext against TLS, interleaved.
/// `cargo test --release --test tls measured -- --nocapture` reproduces the README's figures.
#[test]
fn measured_tls_cost_in_wall_clock_time() {
    let Some(tls) = tls() else { return };
    let ca = tls.file("ca.pem");
    let cases = [
        (
            "plaintext",
            tls.params("127.0.0.1", "postgres", "sslmode=disable"),
        ),
        (
            "TLS, require",
            tls.params("127.0.0.1", "postgres", "sslmode=require"),
        ),
        (
            "TLS, verify-full",
            tls.params(
                "127.0.0.1",
                "postgres",
                &format!("sslmode=verify-full sslrootcert={ca}"),
            ),
        ),
    ];
    let p50 = |mut v: Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut connects = vec![Vec::new(); cases.len()];
    for _ in 0..20 {
        for (i, (_, params)) in cases.iter().enumerate() {
            let started = Instant::now();
            let locks = LockManager::connect(params).unwrap();
            connects[i].push(started.elapsed());
            drop(locks);
        }
    }
    let managers: Vec<LockManager> = cases
        .iter()
        .map(|(_, params)| LockManager::connect(params).unwrap())
        .collect();
    let mut cycles = vec![Vec::new(); cases.len()];
    for round in 0..10 {
        for (i, locks) in managers.iter().enumerate() {
            for n in 0..200 {
                let key = LockKey::pair(9000 + i as i32, round * 200 + n);
                let started = Instant::now();
                drop(locks.try_lock(key).unwrap().unwrap());
                cycles[i].push(started.elapsed());
            }
        }
    }
    for (i, (name, _)) in cases.iter().enumerate() {
        eprintln!(
            "tls cost: {name:<17} connect p50 {:>10.2?}   lock+unlock cycle p50 {:>9.2?}",
            p50(connects[i].clone()),
            p50(cycles[i].clone())
        );
    }
    assert!(!connects[0].is_empty() && !cycles[0].is_empty());
}

#[test]
fn md5_roles_and_unix_domain_sockets_connect() {
    let Some(tls) = tls() else { return };
    assert!(works(
        tls,
        &tls.params("127.0.0.1", "distlock_md5", "password=md5-secret"),
        "md5-role"
    ));
    let dir = tls.cluster.socket_dir().unwrap().display().to_string();
    let locks = LockManager::builder()
        .application_name("unix-socket")
        .connect(&format!(
            "host={dir} port={} user=postgres dbname=postgres",
            tls.port()
        ))
        .expect("unix socket");
    assert!(locks.try_lock("tls/unix").unwrap().is_some());
    let mut client = postgres::Client::connect(tls.cluster.url(), postgres::NoTls).unwrap();
    let local: bool = client
        .query_one(
            "SELECT client_addr IS NULL FROM pg_stat_activity WHERE application_name = 'unix-socket'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(local, "connected through the socket, not TCP");
}

#[test]
fn no_host_means_libpqs_default_socket_for_the_library_and_the_command() {
    let Some(tls) = tls() else { return };
    let locks = LockManager::builder()
        .application_name("default-socket")
        .connect(&format!(
            "port={} user=postgres dbname=postgres",
            tls.port()
        ))
        .expect("the default socket");
    assert!(locks.try_lock("tls/default-socket").unwrap().is_some());
    // Sessions of `app` and whether each came over a unix-domain socket (no client address).
    let mut outside = postgres::Client::connect(tls.cluster.url(), postgres::NoTls).unwrap();
    let mut over_socket = |app: &str| -> Vec<bool> {
        outside
            .query(
                "SELECT client_addr IS NULL FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(
        over_socket("default-socket"),
        vec![true],
        "not over the socket"
    );
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_distlock"))
        .env_remove("DATABASE_URL")
        .env_remove("PGHOST")
        .env("PGPORT", tls.port().to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .env("PGAPPNAME", "default-socket-cli")
        .args(["run", "--key", "tls/default-socket-cli", "--", "sleep", "1"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    assert!(
        common::eventually(Duration::from_secs(5), || {
            seen = over_socket("default-socket-cli");
            !seen.is_empty()
        }),
        "the command's session never showed"
    );
    assert!(
        seen.iter().all(|&s| s),
        "the command did not use the socket"
    );
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
