//! The route table: every (method, path) the proxy knows, in one place, with who
//! may call it and how it is served. Both the proxy (`proxy/`) and the
//! handlers (`api/`) read it; it depends on neither.

/// How a route is served, decided in `request_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Answered by the proxy itself (`api/`).
    Own,
    /// `POST /chat/predict`: a debited prediction mapped onto Flowise's route.
    SeedPrediction,
    /// `POST /api/v1/prediction/{id}`: a debited prediction, Flowise's own body.
    DropInPrediction,
    /// Forwarded to Flowise through the proxy loop (after the checks).
    Flowise,
}

/// Who may call a route. Checked in `request_filter` before anything else runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Anyone,
    /// Any authenticated, active user.
    User,
    /// Role `admin`.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    // The proxy's own endpoints.
    Root,
    Health,
    Info,
    Authenticate,
    Refresh,
    Revoke,
    /// The caller's own API keys: list, revoke one.
    ApiKeys,
    ApiKeyRevoke(i64),
    Credits,
    Predict,
    Sessions,
    SessionHistory(String),
    SessionDelete(String),
    Chatflows,
    Chatflow(String),
    ChatflowConfig(String),
    Admin(AdminRoute),
    // Drop-in mode: Flowise's own API under /api/v1.
    FlowisePrediction(String),
    FlowiseChatflows,
    FlowiseChatflow(String),
    FlowiseChatbotConfig(String),
    FlowiseChatflowStreaming(String),
    FlowiseChatMessage(String),
    FlowiseAttachments(String, String),
    FlowiseUploadFile,
    FlowisePing,
    /// Flowise routes that hand out secrets (API keys, credentials, variables):
    /// refused to everyone, admins included.
    FlowiseSecret,
    /// Any other `/api/v1/...` path: admins only.
    FlowiseOther,
    CorsPreflight,
    NotFound,
    MethodNotAllowed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRoute {
    ListUsers,
    CreateUser,
    GetUser(i64),
    PatchUser(i64),
    DeleteUser(i64),
    UserCredits(i64),
    UserLedger(i64),
    CreateApiKey(i64),
    RevokeApiKey(i64),
    ListChatflows,
    SyncChatflows,
    PatchChatflow(String),
    ChatflowUsers(String),
    GrantChatflow(String),
    RevokeChatflow(String),
    Audit,
}

/// Ids in paths are bounded and plain: anything else is a 404, never passed on.
fn id_segment(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s != "."
        && s != "..";
    ok.then(|| s.to_string())
}

impl Route {
    /// Resolves a request line to a route. `path` excludes the query string.
    pub fn resolve(method: &str, path: &str) -> Route {
        if method == "OPTIONS" {
            return Route::CorsPreflight;
        }
        let trimmed = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        let segs: Vec<&str> = trimmed.split('/').skip(1).collect();
        let get = method == "GET" || method == "HEAD";
        let post = method == "POST";
        let del = method == "DELETE";
        use Route::*;
        let known = |r: Route, allowed: bool| if allowed { r } else { MethodNotAllowed };
        match segs.as_slice() {
            [""] => known(Root, get),
            ["health"] => known(Health, get),
            ["info"] => known(Info, get),
            ["chat", "authenticate"] => known(Authenticate, post),
            ["chat", "refresh"] => known(Refresh, post),
            ["chat", "revoke"] => known(Revoke, post),
            ["chat", "credits"] => known(Credits, get),
            ["chat", "api-keys"] => known(ApiKeys, get),
            ["chat", "api-keys", id] => match id.parse::<i64>().ok().filter(|n| *n > 0) {
                Some(id) => known(ApiKeyRevoke(id), del),
                None => NotFound,
            },
            ["chat", "predict"] => known(Predict, post),
            ["chat", "sessions"] => known(Sessions, get),
            ["chat", "sessions", id] => match id_segment(id) {
                Some(id) if del => SessionDelete(id),
                Some(_) => MethodNotAllowed,
                None => NotFound,
            },
            ["chat", "sessions", id, "history"] => match id_segment(id) {
                Some(id) => known(SessionHistory(id), get),
                None => NotFound,
            },
            ["chatflows"] => known(Chatflows, get),
            ["chatflows", id] => match id_segment(id) {
                Some(id) => known(Chatflow(id), get),
                None => NotFound,
            },
            ["chatflows", id, "config"] => match id_segment(id) {
                Some(id) => known(ChatflowConfig(id), get),
                None => NotFound,
            },
            ["admin", rest @ ..] => Self::resolve_admin(method, rest),
            ["api", "v1", rest @ ..] => Self::resolve_flowise(method, rest),
            _ => NotFound,
        }
    }

    fn resolve_admin(method: &str, rest: &[&str]) -> Route {
        use AdminRoute::*;
        let num = |s: &str| s.parse::<i64>().ok().filter(|n| *n > 0);
        let r = match (method, rest) {
            ("GET", ["users"]) => ListUsers,
            ("POST", ["users"]) => CreateUser,
            ("GET", ["users", id]) => match num(id) {
                Some(id) => GetUser(id),
                None => return Route::NotFound,
            },
            ("PATCH", ["users", id]) => match num(id) {
                Some(id) => PatchUser(id),
                None => return Route::NotFound,
            },
            ("DELETE", ["users", id]) => match num(id) {
                Some(id) => DeleteUser(id),
                None => return Route::NotFound,
            },
            ("POST", ["users", id, "credits"]) => match num(id) {
                Some(id) => UserCredits(id),
                None => return Route::NotFound,
            },
            ("GET", ["users", id, "ledger"]) => match num(id) {
                Some(id) => UserLedger(id),
                None => return Route::NotFound,
            },
            ("POST", ["users", id, "api-keys"]) => match num(id) {
                Some(id) => CreateApiKey(id),
                None => return Route::NotFound,
            },
            ("DELETE", ["api-keys", id]) => match num(id) {
                Some(id) => RevokeApiKey(id),
                None => return Route::NotFound,
            },
            ("GET", ["chatflows"]) => ListChatflows,
            ("POST", ["chatflows", "sync"]) => SyncChatflows,
            ("PATCH", ["chatflows", id]) => match id_segment(id) {
                Some(id) => PatchChatflow(id),
                None => return Route::NotFound,
            },
            (m, ["chatflows", id, "users"]) => match (m, id_segment(id)) {
                ("GET", Some(id)) => ChatflowUsers(id),
                ("POST", Some(id)) => GrantChatflow(id),
                ("DELETE", Some(id)) => RevokeChatflow(id),
                (_, Some(_)) => return Route::MethodNotAllowed,
                (_, None) => return Route::NotFound,
            },
            ("GET", ["audit"]) => Audit,
            (_, ["users"] | ["users", _] | ["users", _, "credits" | "ledger" | "api-keys"])
            | (_, ["api-keys", _] | ["chatflows"] | ["chatflows", _] | ["audit"]) => {
                return Route::MethodNotAllowed
            }
            _ => return Route::NotFound,
        };
        Route::Admin(r)
    }

    fn resolve_flowise(method: &str, rest: &[&str]) -> Route {
        use Route::*;
        let get = method == "GET" || method == "HEAD";
        let secret = |s: &str| {
            let s = s.to_ascii_lowercase();
            ["apikey", "credentials", "variables", "api-key"]
                .iter()
                .any(|p| s.starts_with(p))
        };
        match (method, rest) {
            (_, [first, ..]) if secret(first) => FlowiseSecret,
            ("POST", ["prediction", id]) => match id_segment(id) {
                Some(id) => FlowisePrediction(id),
                None => NotFound,
            },
            (_, ["chatflows"]) if get => FlowiseChatflows,
            (_, ["chatflows", id]) if get => id_segment(id).map_or(NotFound, FlowiseChatflow),
            (_, ["public-chatbotConfig", id]) if get => {
                id_segment(id).map_or(NotFound, FlowiseChatbotConfig)
            }
            (_, ["chatflows-streaming", id]) if get => {
                id_segment(id).map_or(NotFound, FlowiseChatflowStreaming)
            }
            (_, ["chatmessage", id]) if get => id_segment(id).map_or(NotFound, FlowiseChatMessage),
            ("POST", ["attachments", cf, chat]) => match (id_segment(cf), id_segment(chat)) {
                (Some(cf), Some(chat)) => FlowiseAttachments(cf, chat),
                _ => NotFound,
            },
            (_, ["get-upload-file"]) if get => FlowiseUploadFile,
            (_, ["ping"]) if get => FlowisePing,
            _ => FlowiseOther,
        }
    }

    pub fn access(&self) -> Access {
        use Route::*;
        match self {
            Root
            | Health
            | Info
            | Authenticate
            | Refresh
            | CorsPreflight
            | NotFound
            | MethodNotAllowed
            | FlowiseChatflowStreaming(_) => Access::Anyone,
            Admin(_) | FlowiseOther | FlowiseSecret => Access::Admin,
            _ => Access::User,
        }
    }

    /// The chatflow a route acts on, which the caller must be granted.
    pub fn chatflow(&self) -> Option<&str> {
        use Route::*;
        match self {
            Chatflow(id)
            | ChatflowConfig(id)
            | FlowisePrediction(id)
            | FlowiseChatflow(id)
            | FlowiseChatbotConfig(id)
            | FlowiseChatMessage(id)
            | FlowiseAttachments(id, _) => Some(id),
            _ => None,
        }
    }

    /// Debited routes: a credit hold is placed before Flowise is called.
    pub fn is_prediction(&self) -> bool {
        matches!(self, Route::Predict | Route::FlowisePrediction(_))
    }

    pub fn serve(&self) -> Serve {
        use Route::*;
        match self {
            Predict => Serve::SeedPrediction,
            FlowisePrediction(_) => Serve::DropInPrediction,
            SessionHistory(_)
            | ChatflowConfig(_)
            | FlowiseChatflows
            | FlowiseChatflow(_)
            | FlowiseChatbotConfig(_)
            | FlowiseChatflowStreaming(_)
            | FlowiseChatMessage(_)
            | FlowiseAttachments(_, _)
            | FlowiseUploadFile
            | FlowisePing
            | FlowiseSecret
            | FlowiseOther => Serve::Flowise,
            _ => Serve::Own,
        }
    }

    /// Flowise's own API (`/api/v1/...`): its answers keep Flowise's shape.
    pub fn is_drop_in(&self) -> bool {
        use Route::*;
        matches!(
            self,
            FlowisePrediction(_)
                | FlowiseChatflows
                | FlowiseChatflow(_)
                | FlowiseChatbotConfig(_)
                | FlowiseChatflowStreaming(_)
                | FlowiseChatMessage(_)
                | FlowiseAttachments(_, _)
                | FlowiseUploadFile
                | FlowisePing
                | FlowiseSecret
                | FlowiseOther
        )
    }

    /// A bounded label for metrics and logs (never a raw path).
    pub fn name(&self) -> &'static str {
        use Route::*;
        match self {
            Root => "root",
            Health => "health",
            Info => "info",
            Authenticate => "chat_authenticate",
            Refresh => "chat_refresh",
            Revoke => "chat_revoke",
            ApiKeys => "chat_api_keys",
            ApiKeyRevoke(_) => "chat_api_key_revoke",
            Credits => "chat_credits",
            Predict => "chat_predict",
            Sessions => "chat_sessions",
            SessionHistory(_) => "chat_session_history",
            SessionDelete(_) => "chat_session_delete",
            Chatflows => "chatflows",
            Chatflow(_) => "chatflow",
            ChatflowConfig(_) => "chatflow_config",
            Admin(_) => "admin",
            FlowisePrediction(_) => "flowise_prediction",
            FlowiseChatflows => "flowise_chatflows",
            FlowiseChatflow(_) => "flowise_chatflow",
            FlowiseChatbotConfig(_) => "flowise_chatbot_config",
            FlowiseChatflowStreaming(_) => "flowise_chatflow_streaming",
            FlowiseChatMessage(_) => "flowise_chatmessage",
            FlowiseAttachments(_, _) => "flowise_attachments",
            FlowiseUploadFile => "flowise_upload_file",
            FlowisePing => "flowise_ping",
            FlowiseSecret => "flowise_secret",
            FlowiseOther => "flowise_other",
            CorsPreflight => "cors_preflight",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
        }
    }

    /// Endpoint list for `/info`.
    pub const ENDPOINTS: &'static [&'static str] = &[
        "GET /",
        "GET /health",
        "GET /info",
        "POST /chat/authenticate",
        "POST /chat/refresh",
        "POST /chat/revoke",
        "GET /chat/api-keys",
        "DELETE /chat/api-keys/{id}",
        "GET /chat/credits",
        "POST /chat/predict",
        "GET /chat/sessions",
        "GET /chat/sessions/{id}/history",
        "DELETE /chat/sessions/{id}",
        "GET /chatflows/",
        "GET /chatflows/{id}",
        "GET /chatflows/{id}/config",
        "/admin/...",
        "/api/v1/... (Flowise drop-in)",
    ];
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_the_contract_routes() {
        assert_eq!(Route::resolve("GET", "/"), Route::Root);
        assert_eq!(Route::resolve("GET", "/chatflows/"), Route::Chatflows);
        assert_eq!(Route::resolve("POST", "/health"), Route::MethodNotAllowed);
        assert_eq!(
            Route::resolve("POST", "/api/v1/prediction/abc-1"),
            Route::FlowisePrediction("abc-1".into())
        );
        assert_eq!(
            Route::resolve("GET", "/api/v1/anything/else"),
            Route::FlowiseOther
        );
        assert_eq!(
            Route::resolve("POST", "/api/v1/prediction/"),
            Route::FlowiseOther
        );
        assert_eq!(
            Route::resolve("GET", "/chatflows/..%2f/config"),
            Route::NotFound
        );
        assert_eq!(
            Route::resolve("DELETE", "/admin/users/7"),
            Route::Admin(AdminRoute::DeleteUser(7))
        );
        assert_eq!(
            Route::resolve("PUT", "/admin/users/7"),
            Route::MethodNotAllowed
        );
        assert_eq!(Route::resolve("GET", "/admin/users/x"), Route::NotFound);
        assert_eq!(Route::resolve("GET", "/nope"), Route::NotFound);
        assert_eq!(Route::FlowiseOther.access(), Access::Admin);
        for p in [
            "/api/v1/apikey",
            "/api/v1/apikey/x",
            "/api/v1/credentials",
            "/api/v1/variables/1",
        ] {
            assert_eq!(Route::resolve("GET", p), Route::FlowiseSecret, "{p}");
        }
        assert_eq!(
            Route::FlowiseChatflowStreaming("x".into()).access(),
            Access::Anyone
        );
    }
}
