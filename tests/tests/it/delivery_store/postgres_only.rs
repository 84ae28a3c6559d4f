//! PostgreSQL only: credentials in errors, an outage and its recovery, a wrong password.

use super::*;

#[tokio::test]
async fn postgres_credentials_never_appear_in_errors_or_debug() {
    let backend = Backend::postgres().await;
    let server = backend._postgres.as_ref().unwrap();
    let wrong = "Wr0ngS3cretValue";
    let text = format!(
        "postgres://pushwire:{wrong}@127.0.0.1:{}/deliveries",
        server.port()
    );
    let url = StoreUrl::parse(&text).unwrap();
    assert!(!url.to_string().contains(wrong));
    assert!(!format!("{url:?}").contains(wrong));
    let err = delivery_store::open(&url, &OpenOptions::default())
        .await
        .expect_err("a wrong password is refused");
    for shown in [
        err.to_string(),
        format!("{err:?}"),
        format!("{:#}", anyhow::Error::new(err)),
    ] {
        assert!(!shown.contains(wrong), "{shown}");
        assert!(shown.contains("pushwire:***@127.0.0.1"), "{shown}");
    }

    // The right password works, and neither the URL nor the store shows it.
    let store = backend.open().await;
    let debug = format!("{store:?}");
    assert!(!debug.contains(server.password()), "{debug}");
    assert!(debug.contains("***"), "{debug}");
    let url = StoreUrl::parse(&backend.url).unwrap();
    assert!(!url.to_string().contains(server.password()));

    // Another scheme is refused by name, without the rest of the URL.
    let err = StoreUrl::parse(&format!("mysql://root:{wrong}@127.0.0.1/x")).unwrap_err();
    assert!(err.to_string().contains("mysql"), "{err}");
    assert!(!err.to_string().contains(wrong), "{err}");
}

#[tokio::test]
async fn postgres_outage_is_transient_and_the_store_recovers_by_itself() {
    let mut server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = StoreUrl::parse(&server.create_database("deliveries").unwrap()).unwrap();
    let options = OpenOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_secs(2),
    };
    let store = delivery_store::open(&url, &options).await.unwrap();
    store
        .hand_off(&[queued(key("1", "crm", "p1"), t0())], t0())
        .await
        .unwrap();

    let server = tokio::task::spawn_blocking(move || {
        server.stop().unwrap();
        server
    })
    .await
    .unwrap();
    let err = store
        .count_queued()
        .await
        .expect_err("the database is down");
    assert!(err.is_transient(), "{err}");
    let err = store
        .hand_off(&[queued(key("1", "crm", "p2"), t0())], t0())
        .await
        .expect_err("the database is down");
    assert!(err.is_transient(), "{err}");

    let mut server = server;
    let server = tokio::task::spawn_blocking(move || {
        server.resume().unwrap();
        server
    })
    .await
    .unwrap();
    // The pool reconnects on its own; the row handed off before the outage is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.count_queued().await {
            Ok(count) => {
                assert_eq!(count, 1);
                break;
            }
            Err(err) if tokio::time::Instant::now() < deadline => {
                assert!(err.is_transient(), "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the store did not recover: {err}"),
        }
    }
    drop(server);

    // Not transient: a URL that names no store.
    let err = StoreError::from(StoreUrl::parse("mysql://x/y").unwrap_err());
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_wrong_password_is_not_transient() {
    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = StoreUrl::parse(&format!(
        "postgres://pushwire:wrong@127.0.0.1:{}/postgres",
        server.port()
    ))
    .unwrap();
    let err = delivery_store::open(&url, &OpenOptions::default())
        .await
        .expect_err("refused");
    assert!(!err.is_transient(), "{err}");
}
