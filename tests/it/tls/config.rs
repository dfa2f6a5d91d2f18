//! The `tls_*` keys at load: a missing, unparsable or mismatched file is refused naming the
//! item and key, a key that would do nothing is refused, and a private key never shows.

use wsbridge::config::Config;

use crate::common::config_text;
use crate::tls::pki::{Ca, Kind};
use crate::tls::{cert_dir, cert_lines, serving_tls, toml_path};

fn problems(text: &str) -> Vec<String> {
    Config::from_toml(text, |_| None, false)
        .err()
        .map(|e| e.0.iter().map(|i| i.to_string()).collect())
        .unwrap_or_default()
}

const UPSTREAM: &str = "[[upstreams]]\nname = \"vb\"\nadapter = \"voipbin\"\ntoken = \"t\"\ntopics = [\"customer_id:abc123:call:*\"]\n";
const WEBHOOK: &str =
    "[[webhooks]]\nname = \"hook\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n";

#[test]
fn bad_tls_files_and_keys_are_refused_naming_the_item_and_key() {
    let dir = cert_dir("config");
    let ca = Ca::new("wsbridge test CA");
    let ca_path = toml_path(&ca.write(&dir, "ca.pem"));
    let (cert, _) = ca.leaf(&["client"], Kind::Client).write(&dir, "client");
    let (_, other_key) = ca.leaf(&["other"], Kind::Client).write(&dir, "other");
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "SECRET-KEY-MATERIAL, not PEM\n").expect("write");
    let (missing, not_pem) = (toml_path(&dir.join("missing.pem")), toml_path(&not_pem));
    let (cert, other_key) = (toml_path(&cert), toml_path(&other_key));
    let text = config_text(&[
        format!("{UPSTREAM}url = \"wss://ws.example/v1.0/ws\"\ntls_ca = {missing}\n"),
        format!("{UPSTREAM}url = \"ws://ws.example/v1.0/ws\"\ntls_server_name = \"ws.example\"\n"),
        format!("{UPSTREAM}url = \"wss://ws.example/v1.0/ws\"\ntls_ca = {ca_path}\ntls_insecure_skip_verify = true\ntls_ca_only = \"yes\"\n"),
        format!("{WEBHOOK}url = \"https://hooks.example/in\"\ntls_ca = {not_pem}\ntls_cert = {cert}\ntls_key = {other_key}\n"),
        format!("{WEBHOOK}url = \"https://hooks.example/in\"\ntls_cert = {cert}\n"),
        format!("{WEBHOOK}url = \"https://hooks.example/in\"\ntls_key = {not_pem}\ntls_cert = {cert}\n"),
    ])
    .replacen("[server]\n", &format!("[server]\ntls_cert = {cert}\n"), 1);
    // Names differ per entry so that each issue says which one.
    let text = text
        .replacen("name = \"vb\"", "name = \"vb0\"", 1)
        .replacen("name = \"vb\"", "name = \"vb1\"", 1)
        .replacen("name = \"vb\"", "name = \"vb2\"", 1)
        .replacen("name = \"hook\"", "name = \"hook0\"", 1)
        .replacen("name = \"hook\"", "name = \"hook1\"", 1)
        .replacen("name = \"hook\"", "name = \"hook2\"", 1);
    let found = problems(&text);
    let has = |prefix: &str, words: &str| {
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(prefix) && p.contains(words)),
            "no `{prefix} … {words}` in:\n{}",
            found.join("\n")
        );
    };
    has("upstreams[0] (\"vb0\").tls_ca: ", "cannot read");
    has(
        "upstreams[1] (\"vb1\").tls_server_name: ",
        "only applies to a TLS URL",
    );
    has("upstreams[2] (\"vb2\").tls_ca_only: ", "boolean");
    has(
        "webhooks[0] (\"hook0\").tls_ca: ",
        "holds no PEM certificate",
    );
    has(
        "webhooks[0] (\"hook0\").tls_key: ",
        "is not the private key of",
    );
    has("webhooks[1] (\"hook1\").tls_key: ", "needs tls_key");
    has("webhooks[2] (\"hook2\").tls_key: ", "no PEM private key");
    has("server.tls_key: ", "needs tls_key");
    for p in &found {
        assert!(
            !p.contains("SECRET-KEY-MATERIAL"),
            "a file's content is quoted: {p}"
        );
    }

    // The skip-verify conflict is named on its own once the type error is gone.
    let conflict = text.replace("tls_ca_only = \"yes\"\n", "");
    let found = problems(&conflict);
    assert!(
        found.iter().any(
            |p| p.starts_with("upstreams[2] (\"vb2\").tls_insecure_skip_verify: ")
                && p.contains("tls_ca")
        ),
        "{found:?}"
    );
}

#[test]
fn a_loaded_private_key_never_prints() {
    let dir = cert_dir("config-print");
    let ca = Ca::new("wsbridge test CA");
    let leaf = ca.leaf(&["localhost"], Kind::Server);
    let server = leaf.write(&dir, "server");
    let client = ca.leaf(&["client"], Kind::Client).write(&dir, "client");
    let text = serving_tls(
        &config_text(&[format!(
            "{UPSTREAM}url = \"wss://ws.example/v1.0/ws\"\n{}",
            cert_lines(&client)
        )]),
        &server,
    );
    let config = Config::from_toml(&text, |_| None, false).unwrap_or_else(|e| panic!("{e}"));
    let printed = format!("{config:?}");
    assert!(printed.contains("[private key]"), "{printed}");
    let key_line = leaf
        .key_pem
        .lines()
        .nth(1)
        .expect("a base64 line of the key");
    assert!(!printed.contains(key_line));
    assert!(!printed.contains("PRIVATE KEY"));
}
