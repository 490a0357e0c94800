//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! annotations and the [`crate::wire`] types, and served at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi, ToResponse};

use crate::wire::ErrorBody;

/// The document's fixed part; the paths come from the router (see [`crate::router`]).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "facepipe HTTP API",
        description = "The old design's batch endpoints, served by `pipeline serve`. When `api.token` \
            (or PIPELINE_API_TOKEN) is set, every /api request needs `Authorization: Bearer <token>`."
    ),
    components(
        schemas(ErrorBody),
        responses(BadRequest, Unauthorized, NotFound, TooLarge, UnsupportedMediaType, TooMany, TooManyFailures, Unavailable),
    ),
    tags(
        (name = "batches", description = "Start batches, follow them, read their outcomes and crops."),
        (name = "queues", description = "The stages' queues."),
        (name = "dead letters", description = "Messages the stages gave up on, and their replay."),
        (name = "service", description = "The document and liveness."),
    ),
    modifiers(&BearerToken),
)]
pub struct ApiDoc;

/// Declares the bearer token, required on `/api` routes only when the deployment sets one.
pub struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("bearer", scheme);
    }
}

/// The document for a deployment: with a token configured, every `/api` operation
/// requires it, and may answer 429 to a client that failed too often.
pub fn document(mut doc: utoipa::openapi::OpenApi, token_required: bool) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{Ref, RefOr};
    if token_required {
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                operation.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
                operation.responses.responses.entry("429".into()).or_insert_with(|| RefOr::Ref(Ref::from_response_name("TooManyFailures")));
            }
        }
    }
    doc
}

/// The request is malformed; the error says how.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct BadRequest(ErrorBody);

/// The bearer token is missing or wrong.
#[derive(ToResponse)]
#[response(headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
#[allow(dead_code)]
pub struct Unauthorized(ErrorBody);

/// No such batch, crop or endpoint.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct NotFound(ErrorBody);

/// Over a size limit (`api.max_upload_bytes`, `api.max_images_per_request`, the server's message size).
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct TooLarge(ErrorBody);

/// The body is not of the media type the operation takes.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct UnsupportedMediaType(ErrorBody);

/// More batches from this client than `api.uploads_per_minute`.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds until a batch is allowed again.")))]
#[allow(dead_code)]
pub struct TooMany(ErrorBody);

/// More failed authentications from this client than `api.auth_failures_per_minute`:
/// refused, whatever it sends, until its allowance refills.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds until this client may try again.")))]
#[allow(dead_code)]
pub struct TooManyFailures(ErrorBody);

/// A service behind the API (NATS, PostgreSQL, the object store) failed; try again.
#[derive(ToResponse)]
#[allow(dead_code)]
pub struct Unavailable(ErrorBody);

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every `$ref` in `value`.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    out.push(target);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_in_the_document_resolves() {
        let doc = serde_json::to_value(crate::openapi_document(true)).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 10, "the document uses shared components: {found:?}");
        for target in found {
            let pointer = target.strip_prefix('#').unwrap_or_else(|| panic!("{target} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
    }

    #[test]
    fn the_token_is_required_exactly_when_configured() {
        let with = serde_json::to_value(crate::openapi_document(true)).unwrap();
        let without = serde_json::to_value(crate::openapi_document(false)).unwrap();
        let status = "/api/batch/status/{batchId}";
        assert_eq!(with["paths"][status]["get"]["security"], serde_json::json!([{ "bearer": [] }]));
        assert!(without["paths"][status]["get"]["security"].is_null());
        assert!(with["paths"]["/healthz"]["get"]["security"].is_null());
        assert_eq!(with["paths"].as_object().unwrap().len(), 17, "fifteen /api routes, the document and liveness");
    }
}
