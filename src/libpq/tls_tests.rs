//! Taking the TLS settings out of libpq connection parameters.

use super::*;

#[test]
fn tls_settings_leave_key_value_strings_and_the_rest_is_requoted() {
    let (rest, tls) = split(
        "host=db port = 5432 sslmode=verify-full sslrootcert='/etc/my ca.pem' \
         password='it\\'s' user=a\\ b sslcert=/c sslkey=/k",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tls,
        Tls::new()
            .mode(SslMode::VerifyFull)
            .root_cert("/etc/my ca.pem")
            .client_cert("/c", "/k")
    );
    assert!(!rest.contains("ssl"), "{rest}");
    let config: postgres::Config = rest.parse().unwrap();
    assert_eq!(config.get_user(), Some("a b"));
    assert_eq!(config.get_password(), Some(&b"it's"[..]));
    assert_eq!(config.get_ports(), [5432]);
}

#[test]
fn tls_settings_leave_urls() {
    let (rest, tls) =
        split("postgres://u@h/db?sslmode=verify-ca&application_name=x&sslrootcert=system").unwrap();
    assert_eq!(rest, "postgres://u@h/db?application_name=x");
    assert_eq!(tls, Tls::new().mode(SslMode::VerifyCa).system_roots());
    let (rest, _) = split("postgres://u@h/db?sslrootcert=%2Ftmp%2Fca.pem").unwrap();
    assert_eq!(rest, "postgres://u@h/db");
}

#[test]
fn a_bad_sslmode_is_a_config_error_and_odd_text_is_left_to_the_parser() {
    assert_eq!(
        split("host=h sslmode=sometimes").unwrap_err().kind(),
        ErrorKind::Config
    );
    let (rest, _) = split("this is = not ' a connection string").unwrap();
    assert_eq!(rest, "this is = not ' a connection string");
}
