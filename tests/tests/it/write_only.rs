//! Write-only credentials stay write-only: a move to another origin does not take the stored
//! auth header value and secret along, reads show a keyed fingerprint only, and secrets too
//! short to sign anything are refused.

use std::path::Path;

use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backend, ControlPlane, test_config};
use tonic::Code;

const ACCOUNT: &str = "accounts/61";
const AUTH_VALUE: &str = "Bearer write-only-t0ken";
/// `whsec_` + base64("write-only-signing-key-0001").
const SECRET: &str = "whsec_d3JpdGUtb25seS1zaWduaW5nLWtleS0wMDAx";

async fn start(dir: &Path) -> anyhow::Result<ControlPlane> {
    ControlPlane::start(test_config(&Backend::Embedded(dir.join("data")))).await
}

fn with_credentials(url: &str) -> pb::Integration {
    pb::Integration {
        auth_header: Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: AUTH_VALUE.into(),
            value_set: false,
        }),
        secret: SECRET.into(),
        ..integration("CRM", url)
    }
}

fn moved(name: &str, url: &str) -> pb::Integration {
    pb::Integration {
        name: name.into(),
        ..integration("", url)
    }
}

#[tokio::test]
async fn moving_to_another_origin_needs_the_credentials_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = start(dir.path()).await?;
    let admin = cp.admin().await?;
    let created = admin
        .create_integration(
            ACCOUNT,
            "crm",
            with_credentials("https://crm.example.com/hook"),
        )
        .await?;
    let name = created.name.clone();

    // Another host, scheme or port: refused while the credentials would ride along.
    for other in [
        "https://attacker.example.net/hook",
        "https://crm.example.com:8443/hook",
        "https://crm.example.com.attacker.example.net/hook",
    ] {
        let err = admin
            .update_integration(moved(&name, other), &["url"])
            .await
            .expect_err(other);
        assert_eq!(err.code(), Code::FailedPrecondition, "{other}: {err:?}");
        assert!(
            err.message().contains("integration.url")
                && err.message().contains("auth_header and secret"),
            "{err:?}"
        );
        assert!(!err.message().contains("t0ken"), "{err:?}");
    }
    // Giving only one of them is not enough.
    let mut half = moved(&name, "https://attacker.example.net/hook");
    half.secret = SECRET.into();
    let err = admin
        .update_integration(half, &["url", "secret"])
        .await
        .expect_err("the auth header stays behind");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("stored auth_header would"),
        "{err:?}"
    );
    let read = admin.get_integration(&name).await?;
    assert_eq!(read.url, "https://crm.example.com/hook", "unchanged");

    // The same origin (another path, the default port spelled out) keeps them.
    let same = admin
        .update_integration(
            moved(&name, "https://CRM.example.com:443/v2/hook"),
            &["url"],
        )
        .await?;
    assert_eq!(
        same.url, "https://crm.example.com/v2/hook",
        "stored normalised"
    );
    assert!(same.secret_set && same.auth_header.as_ref().is_some_and(|h| h.value_set));
    assert_eq!(same.secret_fingerprint, created.secret_fingerprint);

    // Given again in the same update: the move goes through, the secret unchanged.
    let mut again = with_credentials("https://crm-new.example.com/hook");
    again.name = name.clone();
    let moved_ok = admin
        .update_integration(again, &["url", "auth_header", "secret"])
        .await?;
    assert_eq!(moved_ok.url, "https://crm-new.example.com/hook");
    assert_eq!(moved_ok.secret_fingerprint, created.secret_fingerprint);

    // Or removed in the same update.
    let mut bare = moved(&name, "https://elsewhere.example.org/hook");
    bare.auth_header = None;
    let removed = admin
        .update_integration(bare, &["url", "auth_header", "secret"])
        .await?;
    assert!(
        removed.auth_header.is_none() && !removed.secret_set,
        "{removed:?}"
    );

    // Without credentials, an integration moves freely.
    let free = admin
        .update_integration(moved(&name, "https://anywhere.example.org/"), &["url"])
        .await?;
    assert_eq!(free.url, "https://anywhere.example.org/");
    cp.stop().await
}

/// The fingerprint is keyed: the same secret fingerprints alike within one deployment (to tell
/// a rotation) and differently under another key, so a reader cannot test guesses offline.
#[tokio::test]
async fn secret_fingerprints_are_keyed() -> anyhow::Result<()> {
    let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (a, b) = (start(a_dir.path()).await?, start(b_dir.path()).await?);
    let url = "https://crm.example.com/hook";
    let a1 = a
        .admin()
        .await?
        .create_integration(ACCOUNT, "one", with_credentials(url))
        .await?;
    let mut second = with_credentials(url);
    second.display_name = "CRM 2".into();
    let a2 = a
        .admin()
        .await?
        .create_integration(ACCOUNT, "two", second)
        .await?;
    let b1 = b
        .admin()
        .await?
        .create_integration(ACCOUNT, "one", with_credentials(url))
        .await?;
    assert!(a1.secret_fingerprint.starts_with("hmac-sha256:"), "{a1:?}");
    assert_eq!(a1.secret_fingerprint.len(), "hmac-sha256:".len() + 12);
    assert_eq!(a1.secret_fingerprint, a2.secret_fingerprint);
    assert_ne!(a1.secret_fingerprint, b1.secret_fingerprint, "another key");
    a.stop().await?;
    b.stop().await
}

#[tokio::test]
async fn secrets_too_short_to_sign_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = start(dir.path()).await?;
    let admin = cp.admin().await?;
    // (secret, the reason's words)
    for (secret, why) in [
        ("hunter2", "at least 24 bytes"),
        ("23-bytes-is-not-enough!", "at least 24 bytes"),
        // 16 bytes of key.
        ("whsec_c2l4dGVlbi1ieXRlLWtleQ==", "24 to 64 bytes"),
    ] {
        let mut i = integration("CRM", "https://crm.example.com/hook");
        i.secret = secret.into();
        let err = admin
            .create_integration(ACCOUNT, "crm", i)
            .await
            .expect_err(secret);
        assert_eq!(err.code(), Code::InvalidArgument, "{secret}: {err:?}");
        assert!(
            err.message().contains("integration.secret") && err.message().contains(why),
            "{secret}: {err:?}"
        );
        assert!(!err.message().contains(secret), "{err:?}");
    }
    let mut i = integration("CRM", "https://crm.example.com/hook");
    i.secret = "a-plain-secret-of-24-byte".into();
    admin.create_integration(ACCOUNT, "crm", i).await?;
    cp.stop().await
}
