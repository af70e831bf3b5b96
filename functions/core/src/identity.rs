//! Who is calling the order API, from the claims API Gateway's JWT authorizer verified.
//!
//! The HTTP API's JWT authorizer checks the token (signature against the issuer's JWKS,
//! `iss`, audience, `exp`, `nbf`) before the function runs, and hands the token's claims over
//! in `requestContext.authorizer.jwt.claims` (payload format 2.0), every value turned into a
//! string: an array claim such as `cognito:groups` arrives as `"[operators admins]"`. This
//! module reads what the gateway really sends. It trusts the claims because only the gateway
//! can put them there; a request without them (a route deployed without the authorizer) is
//! refused, never served as somebody.

use std::collections::HashMap;

/// Longest `sub` accepted (Cognito's are 36-character UUIDs; other issuers' vary).
pub const MAX_SUBJECT_LEN: usize = 255;

/// The caller of a route that needs a signed-in user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`: the customer id of the orders this caller places and reads.
    pub subject: String,
    /// Whether the caller belongs to the operators' group.
    pub operator: bool,
}

/// Which claim holds the caller's groups, and which group is the operators'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    pub groups_claim: String,
    pub operators_group: String,
}

impl Default for AccessPolicy {
    /// Cognito's: the `cognito:groups` claim and the template's `operators` group.
    fn default() -> Self {
        Self {
            groups_claim: DEFAULT_GROUPS_CLAIM.to_string(),
            operators_group: DEFAULT_OPERATORS_GROUP.to_string(),
        }
    }
}

pub const DEFAULT_GROUPS_CLAIM: &str = "cognito:groups";
pub const DEFAULT_OPERATORS_GROUP: &str = "operators";

/// Why a request has no usable caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error(
        "the request carries no verified token claims (is the route behind the JWT authorizer?)"
    )]
    NoClaims,
    #[error("the token has no usable sub claim: {0}")]
    BadSubject(String),
}

impl AccessPolicy {
    /// The caller whose verified claims these are.
    pub fn caller(
        &self,
        claims: Option<&HashMap<String, String>>,
    ) -> Result<Caller, Unauthenticated> {
        let claims = claims.ok_or(Unauthenticated::NoClaims)?;
        let subject = claims.get("sub").ok_or(Unauthenticated::NoClaims)?;
        if subject.is_empty()
            || subject.len() > MAX_SUBJECT_LEN
            || !subject.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Unauthenticated::BadSubject(format!(
                "1 to {MAX_SUBJECT_LEN} visible ASCII characters expected"
            )));
        }
        let operator = claims
            .get(&self.groups_claim)
            .is_some_and(|groups| parse_groups(groups).any(|g| g == self.operators_group));
        Ok(Caller {
            subject: subject.clone(),
            operator,
        })
    }
}

/// The groups of an array claim as API Gateway hands it over: `[a b c]`. A JSON array
/// (`["a","b"]`, what a token itself holds) and a single bare value are read too.
fn parse_groups(value: &str) -> impl Iterator<Item = &str> {
    let value = value.trim();
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    inner
        .split(|c: char| c.is_whitespace() || c == ',')
        .map(|g| g.trim_matches('"'))
        .filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn when_groups_arrive_as_api_gateway_sends_them_should_find_the_operators() {
        let policy = AccessPolicy::default();
        for (groups, operator) in [
            ("[operators]", true),
            ("[admins operators]", true),
            (r#"["admins","operators"]"#, true),
            ("operators", true),
            ("[operators-eu]", false),
            ("[admins]", false),
            ("[]", false),
        ] {
            let c = claims(&[("sub", "u-1"), ("cognito:groups", groups)]);
            assert_eq!(
                policy.caller(Some(&c)).unwrap().operator,
                operator,
                "{groups}"
            );
        }
        let no_groups = claims(&[("sub", "u-1")]);
        assert_eq!(
            policy.caller(Some(&no_groups)).unwrap(),
            Caller {
                subject: "u-1".into(),
                operator: false
            }
        );
    }

    #[test]
    fn when_another_issuer_names_its_groups_otherwise_should_follow_the_policy() {
        let policy = AccessPolicy {
            groups_claim: "roles".into(),
            operators_group: "shop-admin".into(),
        };
        let c = claims(&[
            ("sub", "u-1"),
            ("roles", "[shop-admin]"),
            ("cognito:groups", "[operators]"),
        ]);
        assert!(policy.caller(Some(&c)).unwrap().operator);
        let c = claims(&[("sub", "u-1"), ("cognito:groups", "[operators]")]);
        assert!(!policy.caller(Some(&c)).unwrap().operator);
    }

    #[test]
    fn when_claims_or_sub_are_missing_should_refuse_the_caller() {
        let policy = AccessPolicy::default();
        assert_eq!(policy.caller(None), Err(Unauthenticated::NoClaims));
        let c = claims(&[("cognito:groups", "[operators]")]);
        assert_eq!(policy.caller(Some(&c)), Err(Unauthenticated::NoClaims));
        for bad in ["", "a b", "é"] {
            let c = claims(&[("sub", bad)]);
            assert!(
                matches!(policy.caller(Some(&c)), Err(Unauthenticated::BadSubject(_))),
                "{bad:?}"
            );
        }
        // Other issuers' subjects are not UUIDs.
        let c = claims(&[("sub", "auth0|5f7c8ec7#x@y")]);
        assert_eq!(
            policy.caller(Some(&c)).unwrap().subject,
            "auth0|5f7c8ec7#x@y"
        );
    }
}
