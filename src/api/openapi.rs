//! `GET /openapi.json` and `GET /docs`: the API described from the code.
//!
//! The paths come from the route table (`route::ENDPOINTS`, the list `/info`
//! prints and the resolver is tested against); each route's bodies, answers and
//! error statuses are described here by its name. Request bodies are the
//! handlers' own structs (`#[derive(ToSchema)]` next to `Deserialize`); answers
//! that handlers build with `json!()` are described by the types in `schemas`.
//! The page at `/docs` is Swagger UI, compiled into the binary by
//! `utoipa-swagger-ui` (its `vendored` feature: no download at build time, no
//! network at run time).

use std::sync::{Arc, OnceLock};

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathsBuilder,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, ComponentsBuilder, KnownFormat,
    ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    Header, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required, ResponsesBuilder,
};
use utoipa::ToSchema;

use super::Reply;
use crate::errors::ApiError;
use crate::route::{Access, Endpoint, ENDPOINTS};

const BEARER: &str = "bearer";
/// Where the page lives; its assets are under `DOCS/`.
const DOCS: &str = "/docs";

/// The document as served, built once.
pub fn document_json() -> &'static [u8] {
    static DOC: OnceLock<Vec<u8>> = OnceLock::new();
    DOC.get_or_init(|| match document() {
        Ok(doc) => doc.to_pretty_json().unwrap_or_default().into_bytes(),
        // Unreachable while the unit tests pass; never a panic on a request.
        Err(missing) => {
            tracing::error!(route = missing, "openapi: a route has no description");
            Vec::new()
        }
    })
}

pub fn openapi_reply() -> Result<Reply, ApiError> {
    let body = document_json();
    if body.is_empty() {
        return Err(ApiError::internal());
    }
    Ok(Reply {
        status: 200,
        body: body.to_vec(),
        headers: vec![("Content-Type", "application/json".into())],
    })
}

fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Arc::new(
                utoipa_swagger_ui::Config::new(["/openapi.json"])
                    // The default sends the document to an online validator.
                    .validator_url("none")
                    .try_it_out_enabled(true),
            )
        })
        .clone()
}

/// `GET /docs`: Swagger UI's page, its relative asset links made absolute so
/// that `/docs` and `/docs/` both work.
pub fn docs_page() -> Result<Reply, ApiError> {
    let file = swagger_file("index.html")?.ok_or_else(ApiError::internal)?;
    let html = absolute_links(&String::from_utf8_lossy(&file.bytes));
    Ok(asset_reply(html.into_bytes(), "text/html; charset=utf-8"))
}

/// `href="x.css"` and `src="./x.js"` become `/docs/x.css`, `/docs/x.js`.
fn absolute_links(html: &str) -> String {
    let mut out = String::with_capacity(html.len() + 128);
    let mut rest = html;
    while let Some(at) = ["href=\"", "src=\""]
        .iter()
        .filter_map(|attr| rest.find(attr).map(|i| i + attr.len()))
        .min()
    {
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        let value = tail.split('"').next().unwrap_or_default();
        let relative = !value.starts_with('/') && !value.starts_with('#') && !value.contains(':');
        if relative {
            out.push_str(DOCS);
            out.push('/');
            rest = tail.strip_prefix("./").unwrap_or(tail);
        } else {
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// `GET /docs/{file}`: Swagger UI's scripts, styles and icons.
pub fn docs_asset(file: &str) -> Result<Reply, ApiError> {
    let file = swagger_file(file)?.ok_or_else(ApiError::not_found)?;
    let content_type = match file.content_type.as_str() {
        t if t.starts_with("text/") && !t.contains("charset") => format!("{t}; charset=utf-8"),
        t => t.to_string(),
    };
    Ok(asset_reply(file.bytes.into_owned(), &content_type))
}

fn swagger_file(path: &str) -> Result<Option<utoipa_swagger_ui::SwaggerFile<'static>>, ApiError> {
    utoipa_swagger_ui::serve(path, swagger_config()).map_err(|e| {
        tracing::error!(error = %e, "docs: Swagger UI file could not be served");
        ApiError::internal()
    })
}

fn asset_reply(body: Vec<u8>, content_type: &str) -> Reply {
    Reply {
        status: 200,
        body,
        headers: vec![
            ("Content-Type", content_type.to_string()),
            ("Cache-Control", "public, max-age=3600".into()),
            ("X-Content-Type-Options", "nosniff".into()),
        ],
    }
}

/// What one route takes and answers, beyond what the route table says.
struct Spec {
    tag: &'static str,
    summary: &'static str,
    description: &'static str,
    body: Body,
    ok: Answer,
    /// Error statuses besides those that follow from the access level and the
    /// body (401/403, 400/408/413/422).
    errors: &'static [u16],
    query: &'static [Query],
}

enum Body {
    None,
    Json(&'static str),
    /// JSON when sent, and optional.
    OptionalJson(&'static str),
    /// Flowise's prediction: JSON, or a multipart form with files.
    JsonOrForm(&'static str),
    Form,
}

enum Answer {
    Json(u16, &'static str),
    JsonArray(&'static str),
    /// Flowise's own JSON answer, passed through.
    FlowiseJson,
    /// A prediction: Flowise's JSON answer or its event stream.
    Prediction,
    Html,
    Asset,
    Binary,
    Text,
    /// Never answered with success.
    Refused,
}

struct Query {
    name: &'static str,
    integer: bool,
    required: bool,
    description: &'static str,
}

const fn q(name: &'static str, description: &'static str) -> Query {
    Query {
        name,
        integer: false,
        required: false,
        description,
    }
}

const PAGE: &[Query] = &[
    Query {
        name: "limit",
        integer: true,
        required: false,
        description: "Page size, 1-500 (default 50).",
    },
    Query {
        name: "offset",
        integer: true,
        required: false,
        description: "Rows to skip (default 0).",
    },
];

const REVOKE_QUERY: &[Query] = &[
    Query {
        name: "user_id",
        integer: true,
        required: false,
        description: "The user, when there is no body.",
    },
    q("username", "The user, when there is no body."),
];

const CHATMESSAGE_QUERY: &[Query] = &[
    q("chatId", "One conversation."),
    q("sessionId", "One conversation (same as chatId)."),
];

const UPLOAD_FILE_QUERY: &[Query] = &[
    Query {
        name: "chatflowId",
        integer: false,
        required: true,
        description: "A granted chatflow.",
    },
    Query {
        name: "chatId",
        integer: false,
        required: true,
        description: "One of the caller's conversations of it.",
    },
    Query {
        name: "fileName",
        integer: false,
        required: true,
        description: "A plain file name (no path).",
    },
];

fn spec(name: &str) -> Option<Spec> {
    use Answer::*;
    let s = |tag, summary, description, body, ok, errors, query| Spec {
        tag,
        summary,
        description,
        body,
        ok,
        errors,
        query,
    };
    let none = Body::None;
    Some(match name {
        "root" => s(
            "service",
            "Service name, version and status",
            "",
            none,
            Json(200, "ServiceStatus"),
            &[],
            &[],
        ),
        "health" => s(
            "service",
            "Readiness",
            "200 when the database answers, at least one Flowise server is healthy, the identity \
             snapshot is loaded and the instance is not draining; 503 (same body) otherwise.",
            none,
            Json(200, "Health"),
            &[503],
            &[],
        ),
        "info" => s(
            "service",
            "Features and the endpoint list",
            "",
            none,
            Json(200, "Info"),
            &[],
            &[],
        ),
        "openapi" => s(
            "service",
            "This document (OpenAPI 3.1)",
            "",
            none,
            Json(200, "OpenApiDocument"),
            &[],
            &[],
        ),
        "docs" => s(
            "service",
            "This document as a page (Swagger UI, served by the proxy)",
            "",
            none,
            Html,
            &[],
            &[],
        ),
        "docs_asset" => s(
            "service",
            "Assets of the `/docs` page",
            "",
            none,
            Asset,
            &[404],
            &[],
        ),
        "chat_authenticate" => s(
            "auth",
            "Log in with username and password",
            "Returns an access token (JWT) and a refresh token. Repeated failures from one \
             address or for one user are throttled (429 with `Retry-After`).",
            Body::Json("Login"),
            Json(200, "TokenPair"),
            &[401, 429, 503],
            &[],
        ),
        "chat_refresh" => s(
            "auth",
            "Exchange a refresh token for a new pair",
            "The refresh token is single-use: it is rotated on every call.",
            Body::Json("RefreshBody"),
            Json(200, "TokenPair"),
            &[401, 503],
            &[],
        ),
        "chat_revoke" => s(
            "auth",
            "Log out",
            "Revokes the calling access token, the given refresh token, or with `all` every \
             token of the caller. The body is optional.",
            Body::OptionalJson("RevokeBody"),
            Json(200, "Revoked"),
            &[503],
            &[],
        ),
        "chat_api_keys" => s(
            "auth",
            "The caller's own API keys",
            "Active keys only; a key's secret is never shown again after it was issued.",
            none,
            JsonArray("OwnApiKey"),
            &[503],
            &[],
        ),
        "chat_api_key_revoke" => s(
            "auth",
            "Revoke one of the caller's own API keys",
            "404 for a key that is not the caller's.",
            none,
            Json(200, "ApiKeyRevoked"),
            &[404, 503],
            &[],
        ),
        "chat_credits" => s(
            "chat",
            "The caller's credit balance",
            "",
            none,
            Json(200, "Balance"),
            &[503],
            &[],
        ),
        "chat_predict" => s(
            "chat",
            "Ask a chatflow (debited)",
            "A credit hold is placed before Flowise is called and settled when the answer ends. \
             With `streaming: true` the answer is Flowise's event stream. The body is limited to \
             64 KiB; files go through `POST /api/v1/prediction/{chatflow_id}`.",
            Body::Json("PredictRequest"),
            Prediction,
            &[402, 403, 404, 502, 503, 504],
            &[],
        ),
        "chat_sessions" => s(
            "chat",
            "The caller's conversations",
            "",
            none,
            JsonArray("SessionSummary"),
            &[503],
            PAGE,
        ),
        "chat_session_history" => s(
            "chat",
            "Messages of one of the caller's conversations",
            "",
            none,
            Json(200, "SessionHistory"),
            &[404, 502, 503, 504],
            &[],
        ),
        "chat_session_delete" => s(
            "chat",
            "Delete one of the caller's conversations (here and in Flowise)",
            "",
            none,
            Json(200, "SessionDeleted"),
            &[404, 502, 503, 504],
            &[],
        ),
        "chatflows" => s(
            "catalogue",
            "Chatflows granted to the caller (all of them for admins)",
            "",
            none,
            JsonArray("CatalogChatflow"),
            &[],
            &[],
        ),
        "chatflow" => s(
            "catalogue",
            "One granted chatflow",
            "",
            none,
            Json(200, "CatalogChatflow"),
            &[403, 404],
            &[],
        ),
        "chatflow_config" => s(
            "catalogue",
            "Public chatbot configuration of a granted chatflow (Flowise's answer)",
            "",
            none,
            FlowiseJson,
            &[403, 404, 502, 504],
            &[],
        ),
        "admin_list_users" => s(
            "admin",
            "List users",
            "",
            none,
            JsonArray("UserRow"),
            &[503],
            PAGE,
        ),
        "admin_create_user" => s(
            "admin",
            "Create a user",
            "",
            Body::Json("NewUser"),
            Json(201, "UserRow"),
            &[409, 503],
            &[],
        ),
        "admin_get_user" => s(
            "admin",
            "One user with balance",
            "",
            none,
            Json(200, "UserDetail"),
            &[404, 503],
            &[],
        ),
        "admin_patch_user" => s(
            "admin",
            "Change role, active flag, email or password",
            "Deactivating a user or changing their password revokes their tokens.",
            Body::Json("UserPatch"),
            Json(200, "UserRow"),
            &[404, 503],
            &[],
        ),
        "admin_delete_user" => s(
            "admin",
            "Deactivate a user (the ledger keeps its history)",
            "",
            none,
            Json(200, "UserRow"),
            &[404, 503],
            &[],
        ),
        "admin_user_credits" => s(
            "admin",
            "Grant (positive) or take back (negative) credits",
            "`idempotency_key` makes a retry safe: the same key applies the change once and \
             answers `replayed: true` afterwards.",
            Body::Json("CreditChange"),
            Json(200, "CreditResult"),
            &[404, 409, 503],
            &[],
        ),
        "admin_user_ledger" => s(
            "admin",
            "A user's ledger, newest first",
            "",
            none,
            Json(200, "LedgerPage"),
            &[404, 503],
            PAGE,
        ),
        "admin_create_api_key" => s(
            "admin",
            "Create an API key (`fpk_…`) for a user",
            "The key is shown once, in this answer; only its hash is stored.",
            Body::OptionalJson("NewKey"),
            Json(201, "ApiKeyCreated"),
            &[404, 503],
            &[],
        ),
        "admin_revoke_api_key" => s(
            "admin",
            "Revoke an API key",
            "",
            none,
            Json(200, "ApiKeyRevoked"),
            &[404, 503],
            &[],
        ),
        "admin_list_chatflows" => s(
            "admin",
            "The synced chatflow catalogue with prices",
            "",
            none,
            JsonArray("ChatflowRow"),
            &[503],
            &[],
        ),
        "admin_sync_chatflows" => s(
            "admin",
            "Sync the catalogue from Flowise",
            "Chatflows must be synced before they can be granted or priced; the proxy also \
             syncs periodically.",
            none,
            Json(200, "SyncResult"),
            &[502, 503, 504],
            &[],
        ),
        "admin_patch_chatflow" => s(
            "admin",
            "Set a chatflow's prices",
            "An absent field is left as is; `null` clears it (back to the default price).",
            Body::Json("Pricing"),
            Json(200, "ChatflowRow"),
            &[404, 503],
            &[],
        ),
        "admin_chatflow_users" => s(
            "admin",
            "Users granted a chatflow",
            "",
            none,
            JsonArray("UserRow"),
            &[503],
            &[],
        ),
        "admin_grant_chatflow" => s(
            "admin",
            "Grant a chatflow to a user (by `user_id` or `username`)",
            "201 when the grant is new, 200 when it existed. 404 when the user or the chatflow \
             is unknown: sync the catalogue first (`POST /admin/chatflows/sync`).",
            Body::Json("GrantBody"),
            Json(201, "GrantResult"),
            &[404, 503],
            &[],
        ),
        "admin_revoke_chatflow" => s(
            "admin",
            "Take a chatflow grant away",
            "The user is named in the body or, without a body, in the query.",
            Body::OptionalJson("GrantBody"),
            Json(200, "GrantRevoked"),
            &[404, 503],
            REVOKE_QUERY,
        ),
        "admin_audit" => s(
            "admin",
            "The audit log, newest first",
            "",
            none,
            Json(200, "AuditPage"),
            &[503],
            PAGE,
        ),
        "flowise_prediction" => s(
            "drop-in",
            "Flowise's prediction (debited)",
            "Flowise's own body, JSON or a multipart form with files (passed on byte-exact). \
             Authorized against the grant and debited exactly like `POST /chat/predict`.",
            Body::JsonOrForm("FlowisePredictionRequest"),
            Prediction,
            &[402, 403, 404, 502, 503, 504],
            &[],
        ),
        "flowise_chatflows" => s(
            "drop-in",
            "Flowise's chatflow list, cut down to the caller's grants",
            "",
            none,
            FlowiseJson,
            &[502, 504],
            &[],
        ),
        "flowise_chatflow" => s(
            "drop-in",
            "One granted chatflow, as Flowise has it",
            "",
            none,
            FlowiseJson,
            &[403, 404, 502, 504],
            &[],
        ),
        "flowise_chatbot_config" => s(
            "drop-in",
            "Public chatbot configuration of a granted chatflow",
            "",
            none,
            FlowiseJson,
            &[403, 404, 502, 504],
            &[],
        ),
        "flowise_chatflow_streaming" => s(
            "drop-in",
            "Whether a chatflow streams (open to anyone, as in Flowise)",
            "",
            none,
            Json(200, "StreamingFlag"),
            &[502, 504],
            &[],
        ),
        "flowise_chatmessage" => s(
            "drop-in",
            "Messages of the caller's own conversations of a chatflow",
            "With `chatId` (or `sessionId`) the conversation must be the caller's; without, \
             the messages of all the caller's conversations of that chatflow.",
            none,
            FlowiseJson,
            &[403, 404, 502, 504],
            CHATMESSAGE_QUERY,
        ),
        "flowise_attachments" => s(
            "drop-in",
            "Upload attachments to one of the caller's conversations",
            "",
            Body::Form,
            FlowiseJson,
            &[403, 404, 502, 504],
            &[],
        ),
        "flowise_upload_file" => s(
            "drop-in",
            "Download a file uploaded in one of the caller's conversations",
            "",
            none,
            Binary,
            &[403, 404, 502, 504],
            UPLOAD_FILE_QUERY,
        ),
        "flowise_ping" => s(
            "drop-in",
            "Flowise's ping",
            "",
            none,
            Text,
            &[502, 504],
            &[],
        ),
        "flowise_secret" => s(
            "drop-in",
            "Refused: Flowise routes that hand out secrets",
            "Every path under `/api/v1/apikey`, `/api/v1/api-key`, `/api/v1/credentials` and \
             `/api/v1/variables`, with any method, is refused to everyone, admins included.",
            none,
            Refused,
            &[],
            &[],
        ),
        "flowise_other" => s(
            "drop-in",
            "Any other Flowise route (admins only)",
            "Every other path under `/api/v1/` (`flowise_path` may contain `/`) is passed to \
             Flowise for admins and refused (403) to everyone else.",
            Body::OptionalJson("FlowiseAny"),
            FlowiseJson,
            &[404, 502, 504],
            &[],
        ),
        _ => return None,
    })
}

/// The document. `Err(name)` names a route of the table without a description.
pub fn document() -> Result<OpenApi, &'static str> {
    let mut paths = PathsBuilder::new().build();
    for e in ENDPOINTS {
        let spec = spec(e.name).ok_or(e.name)?;
        paths.add_path_operation(e.path, vec![method(e.method)], operation(e, &spec));
    }
    let info = InfoBuilder::new()
        .title("flowise-proxy")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Edge proxy in front of Flowise: per-user login, chatflow grants, prepaid credits, \
             an audit ledger. Errors of the proxy's own routes are `{\"detail\", \"code\"}`; on \
             the drop-in routes (`/api/v1/...`), errors from Flowise keep Flowise's shape. \
             Authenticate with `Authorization: Bearer <token>`: an access token from \
             `POST /chat/authenticate` or an API key (`fpk_…`). Any request may also be \
             refused before it is routed: 408 (head not received in time), 431 (head too \
             large), 503 with `Retry-After` (too many open connections).",
        ))
        .build();
    let bearer = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT or fpk_ API key")
        .description(Some(
            "An access token (JWT) from `POST /chat/authenticate`, or an API key `fpk_…` \
             created by an admin.",
        ))
        .build();
    let tags = [
        ("service", "Status and this description; no token needed."),
        ("auth", "Login and tokens."),
        ("chat", "Predictions, credits and conversations."),
        ("catalogue", "Chatflows the caller may use."),
        (
            "admin",
            "Users, credits, keys, grants and prices (role admin).",
        ),
        (
            "drop-in",
            "Flowise's own API through the proxy: change the base URL and use a proxy token.",
        ),
    ]
    .map(|(name, d)| TagBuilder::new().name(name).description(Some(d)).build());
    Ok(OpenApiBuilder::new()
        .info(info)
        .paths(paths)
        .components(Some(
            components()
                .security_scheme(BEARER, SecurityScheme::Http(bearer))
                .build(),
        ))
        .tags(Some(tags))
        .build())
}

fn method(m: &str) -> HttpMethod {
    match m {
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn operation(e: &Endpoint, spec: &Spec) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .operation_id(Some(e.operation_id()))
        .tag(spec.tag)
        .summary(Some(spec.summary));
    let access = match e.access {
        Access::Anyone => "No token needed.",
        Access::User => "Any active user.",
        Access::Admin => "Role `admin`.",
    };
    op = op.description(Some(if spec.description.is_empty() {
        access.to_string()
    } else {
        format!("{} {access}", spec.description)
    }));
    if e.access != Access::Anyone {
        op = op.security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    }
    for seg in e.path.split('/') {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let id = name == "user_id" || name == "key_id";
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(if id { integer() } else { path_id() })),
            );
        }
    }
    for p in spec.query {
        op = op.parameter(
            ParameterBuilder::new()
                .name(p.name)
                .parameter_in(ParameterIn::Query)
                .required(if p.required {
                    Required::True
                } else {
                    Required::False
                })
                .description(Some(p.description))
                .schema(Some(if p.integer { integer() } else { string() })),
        );
    }
    let json_body = |schema: &str| ContentBuilder::new().schema(Some(r(schema))).build();
    // A GET carries no body (the catch-all Flowise route takes one otherwise).
    let body = match spec.body {
        _ if e.method == "GET" => None,
        Body::None => None,
        Body::Json(s) => Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json_body(s)),
        ),
        Body::OptionalJson(s) => Some(
            RequestBodyBuilder::new()
                .required(Some(Required::False))
                .content("application/json", json_body(s)),
        ),
        Body::JsonOrForm(s) => Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json_body(s))
                .content(
                    "multipart/form-data",
                    ContentBuilder::new().schema(Some(form())).build(),
                ),
        ),
        Body::Form => Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(
                    "multipart/form-data",
                    ContentBuilder::new().schema(Some(form())).build(),
                ),
        ),
    };
    op = op.request_body(body.map(|b| b.build()));

    let mut responses = ResponsesBuilder::new();
    let (status, ok) = ok_response(&spec.ok);
    if let Some(status) = status {
        responses = responses.response(status.to_string(), ok);
    }
    for code in error_statuses(e, spec) {
        responses = responses.response(code.to_string(), error_response(code, e));
    }
    op.responses(responses.build()).build()
}

fn ok_response(a: &Answer) -> (Option<u16>, utoipa::openapi::Response) {
    let json = |schema: RefOr<Schema>| ContentBuilder::new().schema(Some(schema)).build();
    let credits = || {
        [
            (
                "X-Credits-Remaining",
                "The caller's available credits after the hold.",
            ),
            (
                "X-Credits-Charged",
                "Credits charged, on JSON answers whose price is known before the body.",
            ),
        ]
    };
    let b = ResponseBuilder::new();
    let (status, b) = match a {
        Answer::Json(status, s) => (
            *status,
            b.description("OK").content("application/json", json(r(s))),
        ),
        Answer::JsonArray(s) => (
            200,
            b.description("OK").content(
                "application/json",
                json(ArrayBuilder::new().items(r(s)).into()),
            ),
        ),
        Answer::FlowiseJson => (
            200,
            b.description("Flowise's answer, passed through (any `stack` field removed).")
                .content("application/json", json(r("FlowiseAny"))),
        ),
        Answer::Prediction => {
            let mut b = b
                .description("Flowise's answer: JSON, or with `streaming: true` its event stream.")
                .content("application/json", json(r("PredictionResponse")))
                .content("text/event-stream", json(string()));
            for (name, d) in credits() {
                let mut h = Header::new(integer());
                h.description = Some(d.to_string());
                b = b.header(name, h);
            }
            (200, b)
        }
        Answer::Html => (
            200,
            b.description("The page.")
                .content("text/html", json(string())),
        ),
        Answer::Asset => (
            200,
            b.description("A script, style sheet or image of the page.")
                .content("text/css", json(string()))
                .content("text/javascript", json(string()))
                .content("image/png", json(binary())),
        ),
        Answer::Binary => (
            200,
            b.description("The file, with the content type Flowise gives it.")
                .content("application/octet-stream", json(binary())),
        ),
        Answer::Text => (
            200,
            b.description("`pong`")
                .content("text/plain", json(string())),
        ),
        Answer::Refused => return (None, b.description("never").build()),
    };
    (Some(status), b.build())
}

fn error_statuses(e: &Endpoint, spec: &Spec) -> Vec<u16> {
    let mut codes: Vec<u16> = spec.errors.to_vec();
    match e.access {
        Access::Anyone => {}
        Access::User => codes.push(401),
        Access::Admin => codes.extend([401, 403]),
    }
    if !matches!(spec.body, Body::None) {
        codes.extend([400, 408, 413, 422]);
    }
    if matches!(spec.ok, Answer::Refused) {
        codes.push(403);
    }
    codes.sort_unstable();
    codes.dedup();
    codes
}

fn error_response(status: u16, e: &Endpoint) -> utoipa::openapi::Response {
    let text = match status {
        400 => "The body is not valid JSON (`invalid_json`), or a malformed request (`invalid_request`).",
        401 => "No, an invalid, an expired or a revoked token (`unauthorized`, `invalid_token`, `token_expired`), or wrong credentials (`invalid_credentials`).",
        402 => "Not enough credits for this request (`insufficient_credits`).",
        403 => "Not allowed: the role, or a chatflow or conversation that is not the caller's (`forbidden`).",
        404 => "Unknown (`not_found`).",
        408 => "The body was not received in time (`request_timeout`).",
        409 => "Conflicts with what exists (`conflict`).",
        413 => "The body is too large (`body_too_large`).",
        422 => "The body does not fit the schema (`validation_error`).",
        429 => "Too many attempts; see `Retry-After` (`rate_limited`).",
        502 => "Flowise could not be reached (`upstream_error`), or refused FLOWISE_API_KEY (`flowise_key_rejected`).",
        503 => "The database or the ledger is unavailable, or the instance is not ready (`unavailable`, `ledger_unavailable`).",
        504 => "Flowise did not answer in time (`upstream_timeout`).",
        _ => "Error.",
    };
    let schema = if e.path.starts_with("/api/v1/") {
        // Refusals by the proxy are its own shape; Flowise's errors keep theirs.
        AnyOfBuilder::new()
            .item(r("Error"))
            .item(r("FlowiseError"))
            .into()
    } else {
        r("Error")
    };
    ResponseBuilder::new()
        .description(text)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(schema)).build(),
        )
        .build()
}

fn r(schema: &str) -> RefOr<Schema> {
    Ref::from_schema_name(schema).into()
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn integer() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .into()
}

fn binary() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/octet-stream")
        .into()
}

/// Ids in paths: 1-128 of letters, digits, `-`, `_`, `.`.
fn path_id() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9._-]{1,128}$"))
        .into()
}

fn form() -> RefOr<Schema> {
    ObjectBuilder::new()
        .property("question", string())
        .property("files", ArrayBuilder::new().items(binary()))
        .additional_properties(Some(AdditionalProperties::FreeForm(true)))
        .description(Some(
            "Flowise's form fields; files are passed on byte-exact.",
        ))
        .into()
}

fn components() -> ComponentsBuilder {
    let mut all = Vec::new();
    fn add<T: ToSchema>(all: &mut Vec<(String, RefOr<Schema>)>) {
        all.push((T::name().into_owned(), T::schema()));
        T::schemas(all);
    }
    use super::{admin, chat};
    use crate::store::{catalog::ChatflowRow, identity::UserRow};
    use schemas::*;
    add::<Error>(&mut all);
    add::<FlowiseError>(&mut all);
    add::<FlowiseAny>(&mut all);
    add::<OpenApiDocument>(&mut all);
    add::<ServiceStatus>(&mut all);
    add::<Health>(&mut all);
    add::<Info>(&mut all);
    add::<chat::Login>(&mut all);
    add::<chat::RefreshBody>(&mut all);
    add::<chat::RevokeBody>(&mut all);
    add::<TokenPair>(&mut all);
    add::<Revoked>(&mut all);
    add::<Balance>(&mut all);
    add::<PredictRequest>(&mut all);
    add::<PredictionResponse>(&mut all);
    add::<SessionSummary>(&mut all);
    add::<OwnApiKey>(&mut all);
    add::<SessionHistory>(&mut all);
    add::<SessionDeleted>(&mut all);
    add::<CatalogChatflow>(&mut all);
    add::<UserRow>(&mut all);
    add::<UserDetail>(&mut all);
    add::<admin::NewUser>(&mut all);
    add::<admin::UserPatch>(&mut all);
    add::<admin::CreditChange>(&mut all);
    add::<CreditResult>(&mut all);
    add::<LedgerPage>(&mut all);
    add::<admin::NewKey>(&mut all);
    add::<ApiKeyCreated>(&mut all);
    add::<ApiKeyRevoked>(&mut all);
    add::<ChatflowRow>(&mut all);
    add::<SyncResult>(&mut all);
    add::<admin::Pricing>(&mut all);
    add::<admin::GrantBody>(&mut all);
    add::<GrantResult>(&mut all);
    add::<GrantRevoked>(&mut all);
    add::<AuditPage>(&mut all);
    add::<FlowisePredictionRequest>(&mut all);
    add::<StreamingFlag>(&mut all);
    ComponentsBuilder::new().schemas_from_iter(all)
}

/// Answers that handlers build with `json!()`, described. Never built: they
/// exist for their schemas.
#[allow(dead_code)]
mod schemas {
    use std::collections::BTreeMap;

    use chrono::{DateTime, Utc};
    use serde_json::Value;
    use utoipa::ToSchema;

    use crate::store::catalog::ChatflowRow;

    /// Every error of the proxy's own: a sentence and a stable code.
    #[derive(ToSchema)]
    #[schema(example = json!({"detail": "Not enough credits for this request", "code": "insufficient_credits"}))]
    pub struct Error {
        pub detail: String,
        /// One of `invalid_json`, `invalid_request`, `unauthorized`, `invalid_token`,
        /// `token_expired`, `invalid_credentials`, `insufficient_credits`, `forbidden`,
        /// `not_found`, `method_not_allowed`, `request_timeout`, `conflict`, `body_too_large`,
        /// `header_too_large`, `validation_error`, `rate_limited`, `upstream_error`,
        /// `flowise_key_rejected`, `upstream_timeout`,
        /// `unavailable`, `ledger_unavailable`, `internal_error`.
        pub code: String,
    }

    /// An error in Flowise's shape, passed through on drop-in routes.
    #[derive(ToSchema)]
    pub struct FlowiseError {
        #[schema(rename = "statusCode")]
        pub status_code: Option<i64>,
        pub success: Option<bool>,
        pub message: Option<String>,
    }

    /// Flowise's own JSON, passed through.
    #[derive(ToSchema)]
    #[schema(value_type = Value)]
    pub struct FlowiseAny(pub Value);

    /// An OpenAPI 3.1 document.
    #[derive(ToSchema)]
    pub struct OpenApiDocument {
        pub openapi: String,
        #[schema(value_type = Object)]
        pub info: Value,
        #[schema(value_type = Object)]
        pub paths: Value,
    }

    #[derive(ToSchema)]
    pub struct ServiceStatus {
        #[schema(example = "flowise-proxy")]
        pub service: String,
        pub version: String,
        #[schema(example = "running")]
        pub status: String,
    }

    #[derive(ToSchema)]
    pub struct FlowiseCount {
        pub healthy: i64,
        pub total: i64,
    }

    #[derive(ToSchema)]
    pub struct Health {
        /// `healthy` or `unhealthy`.
        pub status: String,
        /// `ok` or `unreachable`.
        pub database: String,
        /// `ok`, `unreachable`, or `key_rejected` (Flowise refuses FLOWISE_API_KEY).
        pub flowise: String,
        pub flowise_servers: FlowiseCount,
        pub draining: bool,
        pub version: String,
    }

    #[derive(ToSchema)]
    pub struct Info {
        pub name: String,
        pub version: String,
        pub features: BTreeMap<String, bool>,
        /// `METHOD /path` of every endpoint.
        pub endpoints: Vec<String>,
    }

    #[derive(ToSchema)]
    pub struct TokenUser {
        pub id: i64,
        /// Present on login.
        pub username: Option<String>,
        /// `admin` or `user`.
        pub role: String,
    }

    #[derive(ToSchema)]
    pub struct TokenPair {
        pub access_token: String,
        pub refresh_token: String,
        /// Always `bearer`.
        pub token_type: String,
        /// Seconds until the access token expires.
        pub expires_in: i64,
        pub user: TokenUser,
    }

    #[derive(ToSchema)]
    pub struct Revoked {
        pub revoked: bool,
    }

    #[derive(ToSchema)]
    pub struct Balance {
        /// Available credits.
        pub credits: i64,
        /// Credits held by running predictions.
        pub held: i64,
    }

    /// The seed API's prediction.
    #[derive(ToSchema)]
    pub struct PredictRequest {
        pub chatflow_id: String,
        pub question: String,
        pub streaming: Option<bool>,
        /// Continue a conversation of the caller's (or start one with a new id).
        #[schema(rename = "chatId")]
        pub chat_id: Option<String>,
        /// Same as `chatId`.
        #[schema(rename = "sessionId")]
        pub session_id: Option<String>,
        #[schema(rename = "overrideConfig", value_type = Option<Object>)]
        pub override_config: Option<Value>,
        #[schema(value_type = Option<Vec<Object>>)]
        pub history: Option<Value>,
        #[schema(value_type = Option<Vec<Object>>)]
        pub uploads: Option<Value>,
    }

    /// Flowise's prediction body (any other field Flowise takes is passed on).
    #[derive(ToSchema)]
    pub struct FlowisePredictionRequest {
        pub question: Option<String>,
        pub streaming: Option<bool>,
        #[schema(rename = "chatId")]
        pub chat_id: Option<String>,
        #[schema(rename = "overrideConfig", value_type = Option<Object>)]
        pub override_config: Option<Value>,
        #[schema(value_type = Option<Vec<Object>>)]
        pub history: Option<Value>,
        #[schema(value_type = Option<Vec<Object>>)]
        pub uploads: Option<Value>,
    }

    /// Flowise's answer to a prediction.
    #[derive(ToSchema)]
    pub struct PredictionResponse {
        pub text: Option<String>,
        #[schema(rename = "chatId")]
        pub chat_id: Option<String>,
        #[schema(rename = "sessionId")]
        pub session_id: Option<String>,
        #[schema(rename = "chatMessageId")]
        pub chat_message_id: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct StreamingFlag {
        #[schema(rename = "isStreaming")]
        pub is_streaming: bool,
    }

    #[derive(ToSchema)]
    pub struct OwnApiKey {
        pub id: i64,
        /// The key's first characters, to tell keys apart.
        pub prefix: String,
        pub name: Option<String>,
        pub created_at: DateTime<Utc>,
    }

    #[derive(ToSchema)]
    pub struct SessionSummary {
        pub session_id: String,
        pub chatflow_id: String,
        pub created_at: DateTime<Utc>,
        pub last_used_at: DateTime<Utc>,
    }

    /// One message (Flowise's fields are kept besides these).
    #[derive(ToSchema)]
    pub struct HistoryMessage {
        /// `user`, `assistant`, or Flowise's own role name.
        pub role: String,
        pub content: Option<String>,
        pub time: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct SessionHistory {
        pub session_id: String,
        pub chatflow_id: String,
        pub messages: Vec<HistoryMessage>,
    }

    #[derive(ToSchema)]
    pub struct SessionDeleted {
        pub deleted: bool,
        pub session_id: String,
    }

    /// A chatflow as its users see it, with its price.
    #[derive(ToSchema)]
    pub struct CatalogChatflow {
        pub id: String,
        pub name: String,
        pub category: Option<String>,
        pub deployed: bool,
        /// Flat price of one prediction.
        pub credit_cost: i64,
        pub credits_per_1k_tokens: Option<i64>,
        pub max_hold: Option<i64>,
    }

    #[derive(ToSchema)]
    pub struct UserDetail {
        pub id: i64,
        pub username: String,
        pub email: Option<String>,
        pub role: String,
        pub active: bool,
        pub created_at: DateTime<Utc>,
        pub credits: i64,
        pub held: i64,
    }

    #[derive(ToSchema)]
    pub struct CreditResult {
        pub user_id: i64,
        /// Available credits after the change.
        pub credits: i64,
        /// True when this idempotency key had already been applied.
        pub replayed: bool,
    }

    #[derive(ToSchema)]
    pub struct LedgerEntry {
        pub id: i64,
        /// `grant`, `adjust`; per exact hold `hold` then `capture` or `void`; per lease `lease`, then one `charge` or `void` per prediction on it, and `release`; `expire` (swept)
        pub kind: String,
        pub delta_available: i64,
        pub delta_held: i64,
        pub request_id: Option<String>,
        pub idempotency_key: Option<String>,
        pub chatflow_id: Option<String>,
        pub reason: Option<String>,
        pub actor_id: Option<i64>,
        pub created_at: DateTime<Utc>,
    }

    #[derive(ToSchema)]
    pub struct LedgerPage {
        pub user_id: i64,
        pub limit: i64,
        pub offset: i64,
        pub entries: Vec<LedgerEntry>,
    }

    #[derive(ToSchema)]
    pub struct ApiKeyCreated {
        pub id: i64,
        pub user_id: i64,
        /// The key (`fpk_…`): shown only here.
        pub api_key: String,
        pub prefix: String,
        pub created_at: DateTime<Utc>,
    }

    #[derive(ToSchema)]
    pub struct ApiKeyRevoked {
        pub revoked: bool,
        pub id: i64,
    }

    #[derive(ToSchema)]
    pub struct SyncResult {
        pub synced: i64,
        pub chatflows: Vec<ChatflowRow>,
    }

    #[derive(ToSchema)]
    pub struct GrantResult {
        pub chatflow_id: String,
        pub user_id: i64,
        pub granted: bool,
    }

    #[derive(ToSchema)]
    pub struct GrantRevoked {
        pub chatflow_id: String,
        pub user_id: i64,
        /// False when there was no such grant.
        pub revoked: bool,
    }

    #[derive(ToSchema)]
    pub struct AuditEntry {
        pub id: i64,
        pub at: DateTime<Utc>,
        pub actor_id: Option<i64>,
        pub action: String,
        pub target: Option<String>,
        #[schema(value_type = Object)]
        pub details: Value,
        pub request_id: Option<String>,
    }

    #[derive(ToSchema)]
    pub struct AuditPage {
        pub limit: i64,
        pub offset: i64,
        pub entries: Vec<AuditEntry>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_slice(document_json()).expect("the document is JSON")
    }

    #[test]
    fn every_route_of_the_table_is_described() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        for e in ENDPOINTS {
            let op = &doc["paths"][e.path][e.method.to_ascii_lowercase()];
            assert!(op.is_object(), "{} is missing", e.line());
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{}",
                e.line()
            );
            let secured = op.get("security").is_some();
            assert_eq!(secured, e.access != Access::Anyone, "{}", e.line());
        }
    }

    /// Every `$ref` names a schema the document has.
    #[test]
    fn every_reference_resolves() {
        let doc = doc();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(refs.len() > 50);
        for r in refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("local schema ref");
            assert!(schemas.contains_key(name), "{r} is not defined");
        }
    }

    #[test]
    fn errors_have_the_contract_shape() {
        let doc = doc();
        let error = &doc["components"]["schemas"]["Error"];
        let required: Vec<&str> = error["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(required, ["detail", "code"]);
        let login = &doc["paths"]["/chat/authenticate"]["post"]["responses"];
        for code in ["401", "422", "429"] {
            assert_eq!(
                login[code]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Error",
                "{code}"
            );
        }
    }

    #[test]
    fn the_page_and_its_assets_are_in_the_binary() {
        let page = docs_page().expect("page");
        let html = String::from_utf8(page.body).expect("utf8");
        assert!(
            html.contains("src=\"/docs/swagger-initializer.js\""),
            "{html}"
        );
        assert!(html.contains("href=\"/docs/index.css\""), "{html}");
        let init = docs_asset("swagger-initializer.js").expect("initializer");
        let init = String::from_utf8(init.body).expect("utf8");
        assert!(init.contains("/openapi.json"), "{init}");
        assert!(docs_asset("swagger-ui-bundle.js").is_ok());
        assert_eq!(
            docs_asset("nope.js").map(|_| ()),
            Err(ApiError::not_found())
        );
    }
}
