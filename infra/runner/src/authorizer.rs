//! What API Gateway's HTTP API JWT authorizer does, for the local runner: before a route
//! that has the authorizer reaches the function, the token in its identity source (the
//! `Authorization` header, with or without `Bearer `) must be
//! - a JWT signed with RS256 by a key of the issuer's JWKS, found by its `kid` (so `alg:
//!   none`, HS256 and unknown keys fail);
//! - from the template's issuer (`iss`);
//! - for one of the template's audiences: `aud`, or `client_id` when there is no `aud`
//!   (Cognito's access tokens);
//! - current: `exp` after now, `nbf` and `iat` (when present) not after now.
//!
//! A request that fails gets API Gateway's 401 `{"message":"Unauthorized"}` and no handler
//! runs. One that passes carries the claims in `requestContext.authorizer.jwt` exactly as
//! payload format 2.0 does: every value a string (an array as `[a b]`), and the `scope`
//! claim's scopes in `scopes`.
//!
//! Locally the issuer is the template's Cognito pool in moto, whose `iss` is the real AWS
//! form (`https://cognito-idp.{region}.amazonaws.com/{poolId}`); its keys come from moto's
//! `/{poolId}/.well-known/jwks.json`.

use std::collections::HashMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};

/// Why a token was refused (logged; the client only ever sees 401 Unauthorized).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("no token in {0}")]
    Missing(String),
    #[error("not a JWT this API accepts: {0}")]
    Malformed(String),
    #[error("alg {0:?} is not RS256")]
    Algorithm(String),
    #[error("no key with kid {0:?} in the issuer's JWKS")]
    UnknownKey(String),
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("the token is for another audience")]
    Audience,
    #[error("the token was issued in the future")]
    IssuedInFuture,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorizerError {
    #[error(
        "issuer {0} is not a user pool this stack created: locally, only the template's own Cognito pool can sign tokens (leave OidcIssuerUrl empty)"
    )]
    UnknownIssuer(String),
    #[error("JWKS of {url}: {message}")]
    Jwks { url: String, message: String },
    #[error(
        "identity source {0} is not a request header (the local runner reads $request.header.X)"
    )]
    IdentitySource(String),
}

/// A JWT authorizer: the issuer, the audiences and the issuer's keys by `kid`.
#[derive(Clone)]
pub struct JwtAuthorizer {
    issuer: String,
    audiences: Vec<String>,
    header: String,
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for JwtAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthorizer")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("header", &self.header)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The JWKS URL of a Cognito issuer among `pool_ids`, served by moto at `moto_endpoint`.
pub fn local_jwks_url(
    issuer: &str,
    pool_ids: &[&str],
    moto_endpoint: &str,
) -> Result<String, AuthorizerError> {
    let pool = issuer
        .strip_prefix("https://cognito-idp.")
        .and_then(|rest| rest.split_once(".amazonaws.com/"))
        .map(|(_, pool)| pool.trim_end_matches('/'))
        .filter(|pool| pool_ids.contains(pool))
        .ok_or_else(|| AuthorizerError::UnknownIssuer(issuer.to_string()))?;
    Ok(format!(
        "{}/{pool}/.well-known/jwks.json",
        moto_endpoint.trim_end_matches('/')
    ))
}

impl JwtAuthorizer {
    /// An authorizer for `issuer` and `audiences` with the keys of `jwks`; `identity_source`
    /// as the template writes it (`$request.header.Authorization`).
    pub fn new(
        issuer: String,
        audiences: Vec<String>,
        identity_source: &str,
        jwks: &JwkSet,
    ) -> Result<Self, AuthorizerError> {
        let header = identity_source
            .strip_prefix("$request.header.")
            .ok_or_else(|| AuthorizerError::IdentitySource(identity_source.to_string()))?
            .to_ascii_lowercase();
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            // A key that is not a usable RSA key is left out: tokens naming it fail as unknown.
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                keys.insert(kid.clone(), key);
            }
        }
        Ok(Self {
            issuer,
            audiences,
            header,
            keys,
        })
    }

    /// Fetches the issuer's JWKS from `url` and builds the authorizer.
    pub async fn fetch(
        issuer: String,
        audiences: Vec<String>,
        identity_source: &str,
        url: &str,
    ) -> Result<Self, AuthorizerError> {
        use http_body_util::{BodyExt, Empty};
        use hyper::body::Bytes;
        let error = |message: String| AuthorizerError::Jwks {
            url: url.to_string(),
            message,
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let uri: hyper::Uri = url.parse().map_err(|e| error(format!("{e}")))?;
        let response = client.get(uri).await.map_err(|e| error(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| error(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(error(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let jwks: JwkSet = serde_json::from_slice(&body).map_err(|e| error(e.to_string()))?;
        Self::new(issuer, audiences, identity_source, &jwks)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// The `requestContext.authorizer` of a request with these headers, or why it is refused.
    pub fn authorize(&self, headers: &hyper::HeaderMap) -> Result<Value, Refusal> {
        let raw = headers
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Refusal::Missing(self.header.clone()))?;
        let token = match raw.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => raw,
        };
        let claims = self.verify(token)?;
        Ok(json!({"jwt": payload_v2(&claims)}))
    }

    /// The token's claims, if it passes every check now.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, Refusal> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(Refusal::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.unwrap_or_default();
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| Refusal::UnknownKey(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        // The audience is checked below: API Gateway takes `client_id` when there is no `aud`.
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|e| Refusal::Invalid(e.to_string()))?
            .claims;
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(aud)) => vec![aud],
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
            _ => claims
                .get("client_id")
                .and_then(Value::as_str)
                .into_iter()
                .collect(),
        };
        if !audiences
            .iter()
            .any(|a| self.audiences.iter().any(|mine| mine == a))
        {
            return Err(Refusal::Audience);
        }
        if claims
            .get("iat")
            .and_then(Value::as_u64)
            .is_some_and(|iat| iat > now_seconds())
        {
            return Err(Refusal::IssuedInFuture);
        }
        Ok(claims)
    }
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The claims as payload format 2.0 carries them: `{"claims": {name: string}, "scopes": [..]}`.
pub fn payload_v2(claims: &Map<String, Value>) -> Value {
    let strings: Map<String, Value> = claims
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), Value::String(as_gateway_string(v))))
        .collect();
    let scopes = claims
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split_whitespace().collect::<Vec<_>>());
    let mut jwt = json!({"claims": strings});
    if let Some(scopes) = scopes {
        jwt["scopes"] = json!(scopes);
    }
    jwt
}

/// A claim's value as API Gateway writes it into the event: text as it is, numbers and
/// booleans as their text, an array as `[a b]`, an object as its JSON.
fn as_gateway_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(as_gateway_string)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_claims_go_into_the_event_should_be_strings_as_api_gateway_writes_them() {
        let claims: Map<String, Value> = serde_json::from_value(json!({
            "sub": "u-1",
            "exp": 1_700_000_000,
            "email_verified": true,
            "cognito:groups": ["operators", "admins"],
            "scope": "aws.cognito.signin.user.admin orders/read",
        }))
        .unwrap();
        let jwt = payload_v2(&claims);
        assert_eq!(jwt["claims"]["sub"], "u-1");
        assert_eq!(jwt["claims"]["exp"], "1700000000");
        assert_eq!(jwt["claims"]["email_verified"], "true");
        assert_eq!(jwt["claims"]["cognito:groups"], "[operators admins]");
        assert_eq!(
            jwt["scopes"],
            json!(["aws.cognito.signin.user.admin", "orders/read"])
        );
        // What lambda_http reads: claims as a map of strings.
        let parsed: aws_lambda_events::apigw::ApiGatewayRequestAuthorizerJwtDescription =
            serde_json::from_value(jwt).unwrap();
        assert_eq!(parsed.claims["cognito:groups"], "[operators admins]");
    }

    #[test]
    fn when_mapping_an_issuer_to_its_jwks_should_accept_only_the_stacks_pools() {
        let url = local_jwks_url(
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc",
            &["us-east-1_abc"],
            "http://127.0.0.1:9324/",
        )
        .unwrap();
        assert_eq!(
            url,
            "http://127.0.0.1:9324/us-east-1_abc/.well-known/jwks.json"
        );
        for other in [
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_other",
            "https://example.eu.auth0.com/",
        ] {
            assert!(local_jwks_url(other, &["us-east-1_abc"], "http://x").is_err());
        }
    }
}
