//! End-to-end tests of secrets at rest: a control plane on a real etcd stores signing secrets and
//! auth header values encrypted (read back here with etcd's own client), refuses to start with
//! keys that do not decrypt them, still hands them to workers and signs with them, and rotates
//! its key with `--reencrypt`; on the embedded store it generates its key file on first start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt as _;
use prost::Message as _;
use pushwire_common::domain::Secret;
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::signing;
use pushwire_control_plane::store::pb as rec;
use pushwire_control_plane::{Config, Listeners};
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
use pushwire_tests::etcd::EtcdServer;
use pushwire_tests::receiver::TestReceiver;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const ACCOUNT: &str = "accounts/42";
const SECRET: &str = "e2e-signing-s3cret-at-rest";
const AUTH_VALUE: &str = "Bearer e2e-auth-t0ken-at-rest";
/// Two keys, and one with the first one's id but other bytes.
const KEY_OLD: &str = "old:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_OLD_OTHER_BYTES: &str = "old:HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";
const KEY_NEW: &str = "new:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const WAIT: Duration = Duration::from_secs(10);

/// Writes a key file of `lines` (mode 0600) and returns its path.
fn key_file(dir: &Path, name: &str, lines: &[&str]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(path)
}

/// A control plane configuration on `etcd` with the keys of `key_file` (and none from the
/// environment), delivering to loopback.
fn on_etcd(etcd: &EtcdServer, key_file: Option<&Path>) -> Config {
    let mut config = test_config(&Backend::Etcd(vec![etcd.endpoint()]));
    config.encryption_key = None;
    config.encryption_key_file = key_file.map(Path::to_path_buf);
    allow_loopback(&mut config);
    config
}

fn allow_loopback(config: &mut Config) {
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into(), "::1/128".into()];
}

/// Runs a control plane that must fail to start, and returns its error with every cause.
async fn start_fails(config: Config) -> anyhow::Result<String> {
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        http: TcpListener::bind("127.0.0.1:0").await?,
    };
    let shutdown = CancellationToken::new();
    let run = pushwire_control_plane::run(config, listeners, shutdown.clone());
    let result = tokio::time::timeout(Duration::from_secs(30), run).await;
    shutdown.cancel();
    match result {
        Err(_) => anyhow::bail!("the control plane started (still running after 30 s)"),
        Ok(Ok(())) => anyhow::bail!("the control plane ran and stopped without an error"),
        Ok(Err(e)) => Ok(format!("{:#}", anyhow::Error::from(e))),
    }
}

async fn create(cp: &ControlPlane, id: &str, url: &str) -> anyhow::Result<pb::Integration> {
    let integration = pb::Integration {
        auth_header: Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: AUTH_VALUE.into(),
            value_set: false,
        }),
        secret: SECRET.into(),
        signature_schemes: vec![pb::SignatureScheme::Qualifio.into()],
        ..integration(id, url)
    };
    Ok(cp
        .admin()
        .await?
        .create_integration(ACCOUNT, id, integration)
        .await?)
}

/// Every key and value in etcd, read with etcd's own client.
async fn raw_etcd(etcd: &EtcdServer) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    let resp = client
        .get("/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    resp.kvs()
        .iter()
        .map(|kv| Ok((kv.key_str()?.to_owned(), kv.value().to_vec())))
        .collect()
}

/// The secret, its distinctive part, and their base64 and hex forms.
fn forms_of_secrets() -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut forms = Vec::new();
    for secret in [SECRET, AUTH_VALUE, "s3cret-at-rest", "t0ken-at-rest"] {
        forms.push(secret.as_bytes().to_vec());
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            forms.push(engine.encode(secret).into_bytes());
        }
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        forms.push(hex.into_bytes());
    }
    forms
}

fn assert_no_secret_in(what: &str, bytes: &[u8]) {
    for form in forms_of_secrets() {
        assert!(
            !bytes.windows(form.len()).any(|w| w == form.as_slice()),
            "{what} holds {:?}",
            String::from_utf8_lossy(&form)
        );
    }
}

/// The key ids of every encrypted value in etcd, by store key.
async fn key_ids(etcd: &EtcdServer) -> anyhow::Result<Vec<(String, String)>> {
    let mut ids = Vec::new();
    for (key, value) in raw_etcd(etcd).await? {
        if key.contains("/integrations/") {
            let r = rec::IntegrationRecord::decode(value.as_slice())?;
            for v in r.auth_header_value.iter() {
                ids.push((key.clone(), v.key_id.clone()));
            }
            for s in &r.secrets {
                let v = s.secret.as_ref().expect("encrypted secret");
                ids.push((key.clone(), v.key_id.clone()));
            }
        } else if key.ends_with("/meta/encryption-check") {
            let r = rec::EncryptionCheckRecord::decode(value.as_slice())?;
            ids.push((key.clone(), r.check.expect("check value").key_id));
        }
    }
    Ok(ids)
}

/// The integration's secrets as a worker gets them from WatchConfig's snapshot.
async fn worker_view(cp: &ControlPlane, name: &str) -> anyhow::Result<(String, Vec<String>)> {
    let mut watch = cp.watch(0).await?;
    let is_it = |c: &pb::IntegrationConfig| c.integration.as_ref().is_some_and(|i| i.name == name);
    let msg = tokio::time::timeout(WAIT, watch.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    let snapshot = msg.snapshot.ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
    let mut config = snapshot.integrations.into_iter().find(is_it);
    // The snapshot may be from just before the write that made it: then it comes next.
    while config.is_none() {
        let msg = tokio::time::timeout(WAIT, watch.next())
            .await
            .map_err(|_| anyhow::anyhow!("{name} not in the snapshot nor after it"))?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        config = msg.changes.into_iter().find_map(|c| match c.change {
            Some(pb::config_change::Change::UpsertIntegration(c)) if is_it(&c) => Some(c),
            _ => None,
        });
    }
    let config = config.expect("found above");
    Ok((
        config.auth_header_value,
        config
            .signing_secrets
            .into_iter()
            .map(|s| s.secret)
            .collect(),
    ))
}

/// TestIntegration reaches `receiver` with the auth header and a signature made with SECRET.
async fn signs_with_the_secret(
    cp: &ControlPlane,
    receiver: &TestReceiver,
    name: &str,
) -> anyhow::Result<()> {
    let resp = cp
        .integrations()
        .await?
        .test_integration(pb::TestIntegrationRequest { name: name.into() })
        .await?
        .into_inner();
    assert_eq!(resp.status_code, 200, "{resp:?}");
    let got = receiver
        .next(WAIT)
        .await
        .ok_or_else(|| anyhow::anyhow!("nothing received"))?;
    assert_eq!(got.header("authorization"), Some(AUTH_VALUE));
    let signature = got
        .header("x-qualifio-signature")
        .ok_or_else(|| anyhow::anyhow!("no x-qualifio-signature"))?;
    assert!(signing::verify_qualifio(
        &Secret::new(SECRET),
        &got.body,
        signature
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_no_secret_in_clear_and_wrong_keys_refuse_to_start() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let old = key_file(dir.path(), "old.key", &[KEY_OLD])?;

    let cp = ControlPlane::start(on_etcd(&etcd, Some(&old))).await?;
    let created = create(&cp, "crm", &receiver.url("/hook")).await?;
    // Update it too: every write encrypts.
    cp.integrations()
        .await?
        .update_integration(pb::UpdateIntegrationRequest {
            integration: Some(pb::Integration {
                name: created.name.clone(),
                display_name: "CRM".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;

    // etcd's own view: no secret, in any usual encoding; every value under key "old".
    let raw = raw_etcd(&etcd).await?;
    assert!(raw.iter().any(|(k, _)| k.ends_with("/integrations/crm")));
    for (key, value) in &raw {
        assert_no_secret_in(key, value);
    }
    let ids = key_ids(&etcd).await?;
    assert_eq!(ids.len(), 3, "auth header, secret and check: {ids:?}");
    assert!(ids.iter().all(|(_, id)| id == "old"), "{ids:?}");

    // The API never reads a secret back; the worker's stream carries them decrypted.
    let read = cp.admin().await?.get_integration(&created.name).await?;
    assert!(read.secret.is_empty() && read.secret_set);
    assert_no_secret_in("GetIntegration", format!("{read:?}").as_bytes());
    assert_no_secret_in("GetIntegration", &read.encode_to_vec());
    assert_eq!(
        worker_view(&cp, &created.name).await?,
        (AUTH_VALUE.to_owned(), vec![SECRET.to_owned()])
    );
    signs_with_the_secret(&cp, &receiver, &created.name).await?;
    cp.stop().await?;

    // The right id with other key material: refused, naming the key.
    let other = key_file(dir.path(), "other.key", &[KEY_OLD_OTHER_BYTES])?;
    let wrong_bytes = start_fails(on_etcd(&etcd, Some(&other))).await?;
    assert!(
        wrong_bytes.contains("key \"old\" does not decrypt"),
        "{wrong_bytes}"
    );
    // Only another key: refused, naming the missing one.
    let new_only = key_file(dir.path(), "new.key", &[KEY_NEW])?;
    let unknown = start_fails(on_etcd(&etcd, Some(&new_only))).await?;
    assert!(
        unknown
            .contains("encrypted with key \"old\", which is not among the configured keys (new)"),
        "{unknown}"
    );
    // No key at all, on etcd: refused.
    let missing = start_fails(on_etcd(&etcd, None)).await?;
    assert!(missing.contains("no encryption key"), "{missing}");
    for err in [&wrong_bytes, &unknown, &missing] {
        assert!(err.starts_with("refusing to start"), "{err}");
        assert_no_secret_in("a start-up error", err.as_bytes());
        for key in [KEY_OLD, KEY_OLD_OTHER_BYTES, KEY_NEW] {
            assert!(!err.contains(key.split_once(':').unwrap().1), "{err}");
        }
    }

    // The right key again: serves, and signs with the same secret.
    let cp = ControlPlane::start(on_etcd(&etcd, Some(&old))).await?;
    signs_with_the_secret(&cp, &receiver, &created.name).await?;
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_etcd_with_other_keys_is_refused_before_any_integration() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let dir = tempfile::tempdir()?;
    let old = key_file(dir.path(), "old.key", &[KEY_OLD])?;
    ControlPlane::start(on_etcd(&etcd, Some(&old)))
        .await?
        .stop()
        .await?;
    // A second replica given another key file would write secrets the first cannot read.
    let other = key_file(dir.path(), "other.key", &[KEY_OLD_OTHER_BYTES])?;
    let err = start_fails(on_etcd(&etcd, Some(&other))).await?;
    assert!(
        err.contains("/pushwire/v1/meta/encryption-check (check): key \"old\" does not decrypt"),
        "{err}"
    );
    for key in [KEY_OLD, KEY_OLD_OTHER_BYTES] {
        assert!(!err.contains(key.split_once(':').unwrap().1), "{err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reencrypts_everything_under_the_new_key() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let dir = tempfile::tempdir()?;
    let receiver = TestReceiver::http().await?;
    let old = key_file(dir.path(), "old.key", &[KEY_OLD])?;
    let cp = ControlPlane::start(on_etcd(&etcd, Some(&old))).await?;
    let crm = create(&cp, "crm", &receiver.url("/crm")).await?;
    cp.stop().await?;

    // 1. The new key first, the old one still decrypting.
    let both = key_file(dir.path(), "both.key", &[KEY_NEW, KEY_OLD])?;
    let cp = ControlPlane::start(on_etcd(&etcd, Some(&both))).await?;
    let erp = create(&cp, "erp", &receiver.url("/erp")).await?;
    let ids = key_ids(&etcd).await?;
    let erp_ids: Vec<_> = ids.iter().filter(|(k, _)| k.ends_with("/erp")).collect();
    assert!(
        erp_ids.len() == 2 && erp_ids.iter().all(|(_, id)| id == "new"),
        "{ids:?}"
    );
    assert!(ids.iter().any(|(_, id)| id == "old"), "{ids:?}");

    // 2. Re-encrypt, while that control plane serves.
    let done = pushwire_control_plane::reencrypt(&on_etcd(&etcd, Some(&both))).await?;
    assert_eq!(done.key_id, "new");
    assert_eq!((done.records, done.rewritten), (3, 2), "{done:?}");
    let ids = key_ids(&etcd).await?;
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert!(ids.iter().all(|(_, id)| id == "new"), "{ids:?}");
    for (key, value) in raw_etcd(&etcd).await? {
        assert_no_secret_in(&key, &value);
    }
    // The serving control plane follows the rewritten records.
    assert_eq!(
        worker_view(&cp, &crm.name).await?,
        (AUTH_VALUE.to_owned(), vec![SECRET.to_owned()])
    );
    cp.stop().await?;

    // 3. The old key removed: starts, and signs with the same secrets.
    let new_only = key_file(dir.path(), "new.key", &[KEY_NEW])?;
    let cp = ControlPlane::start(on_etcd(&etcd, Some(&new_only))).await?;
    for name in [&crm.name, &erp.name] {
        signs_with_the_secret(&cp, &receiver, name).await?;
    }
    cp.stop().await?;
    // And the old key alone no longer does.
    let err = start_fails(on_etcd(&etcd, Some(&old))).await?;
    assert!(err.contains("encrypted with key \"new\""), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_generates_a_private_key_file_on_first_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let receiver = TestReceiver::http().await?;
    let mut config = test_config(&Backend::Embedded(data.clone()));
    config.encryption_key = None;
    config.encryption_key_file = None;
    allow_loopback(&mut config);

    let cp = ControlPlane::start(config.clone()).await?;
    let key_path = data.join(pushwire_control_plane::crypto::GENERATED_KEY_FILE);
    let text = std::fs::read_to_string(&key_path)?;
    let line = text
        .lines()
        .find(|l| !l.starts_with('#'))
        .ok_or_else(|| anyhow::anyhow!("no key line in {text}"))?;
    let (id, b64) = line.split_once(':').expect("key-id:base64");
    assert!(id.starts_with("local-"), "{id}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(b64)?.len(),
        32
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }
    let created = create(&cp, "crm", &receiver.url("/hook")).await?;
    cp.stop().await?;
    let store = std::fs::read(data.join(pushwire_control_plane::EMBEDDED_STORE_FILE))?;
    assert_no_secret_in("the embedded store file", &store);

    // Restarted: the same key is used again.
    let cp = ControlPlane::start(config.clone()).await?;
    assert_eq!(std::fs::read_to_string(&key_path)?, text);
    signs_with_the_secret(&cp, &receiver, &created.name).await?;
    cp.stop().await?;

    // Another key in its place: refused.
    std::fs::write(
        &key_path,
        format!("{id}:{}\n", KEY_NEW.split_once(':').unwrap().1),
    )?;
    let err = start_fails(config).await?;
    assert!(
        err.contains(&format!("key \"{id}\" does not decrypt")),
        "{err}"
    );
    Ok(())
}
