//! Health, readiness, metrics and the OpenAPI document.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn healthz_and_readyz_answer_200() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);
    let response = app.get("/readyz").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_commands() {
    let app = spawn_app().await;
    app.create_order().await;
    let text = app.metrics().await;
    assert!(text.contains("commands_total"), "{text}");
    assert!(text.contains("command_duration_seconds"));
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_error_status() {
    let app = spawn_app().await;
    let doc: Value = app
        .get("/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/orders", "post", "201"),
        ("/orders/{id}/items", "post", "200"),
        ("/orders/{id}/items/{sku}", "delete", "200"),
        ("/orders/{id}/place", "post", "200"),
        ("/orders/{id}/pay", "post", "200"),
        ("/orders/{id}/ship", "post", "200"),
        ("/orders/{id}/cancel", "post", "200"),
    ];
    for (path, method, success) in expected {
        let responses = &paths[path][method]["responses"];
        assert!(responses.get(success).is_some(), "{method} {path}");
        for status in ["400", "401", "422", "503"] {
            assert!(responses.get(status).is_some(), "{method} {path} {status}");
        }
    }
    for status in ["404", "409", "412", "413", "415"] {
        assert!(
            paths["/orders/{id}/pay"]["post"]["responses"]
                .get(status)
                .is_some()
        );
    }
    assert_eq!(
        paths["/orders/{id}/pay"]["post"]["responses"]["412"]["content"]["application/problem+json"]
            ["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert!(paths.contains_key(path), "{path}");
    }
    assert!(doc["components"]["schemas"].get("Problem").is_some());
    assert!(
        doc["components"]["schemas"]
            .get("CreateOrderRequest")
            .is_some()
    );
}
