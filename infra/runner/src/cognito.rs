//! The template's Cognito user pools, app clients and groups, created in moto (which serves
//! the same cognito-idp API as AWS, InitiateAuth and the pool's JWKS included), and the
//! users of a local run: `saga-local token` signs a customer or an operator in and prints
//! an access token.
//!
//! Like the tables and queues, each is named `prefix + logical id` and reused when it
//! exists, so a restarted runner keeps its users. Nothing about a pool is hard-coded: its
//! password policy, sign-up setting, client auth flows and group names come from
//! `template.yaml`.

use aws_sdk_cognitoidentityprovider::Client;
use aws_sdk_cognitoidentityprovider::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_cognitoidentityprovider::types::{
    AdminCreateUserConfigType, AuthFlowType, ExplicitAuthFlowsType, MessageActionType,
    PasswordPolicyType, UserPoolPolicyType, UsernameConfigurationType,
};

use crate::template::{EnvValue, LocalNames, PasswordPolicySpec, Template, UserPoolSpec};

/// A failed cognito-idp call: the operation, what it was about, and the SDK's own words.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {subject}: {message}")]
pub struct CognitoError {
    pub operation: &'static str,
    pub subject: String,
    pub message: String,
}

fn failed<E>(operation: &'static str, subject: &str) -> impl FnOnce(E) -> CognitoError
where
    E: std::error::Error + 'static,
{
    let subject = subject.to_string();
    move |e| CognitoError {
        operation,
        subject,
        message: DisplayErrorContext(e).to_string(),
    }
}

/// The local name of a pool: `prefix + logical id`.
pub fn local_pool_name(prefix: &str, pool: &UserPoolSpec) -> String {
    format!("{prefix}{}", pool.logical_id)
}

/// Creates (or finds) every user pool, app client and group of the template, and records
/// the pools' and clients' ids in `names`.
pub async fn provision(
    template: &Template,
    prefix: &str,
    cognito: &Client,
    names: &mut LocalNames,
) -> Result<(), CognitoError> {
    for pool in &template.user_pools {
        let name = local_pool_name(prefix, pool);
        let id = match find_pool(cognito, &name).await? {
            Some(id) => id,
            None => create_pool(cognito, pool, &name).await?,
        };
        names.user_pools.insert(pool.logical_id.clone(), id);
    }
    for client in &template.user_pool_clients {
        let pool_id = &names.user_pools[&client.user_pool];
        let name = client
            .client_name
            .clone()
            .unwrap_or_else(|| client.logical_id.clone());
        let id = match find_client(cognito, pool_id, &name).await? {
            Some(id) => id,
            None => {
                let flows = (client.explicit_auth_flows.iter())
                    .map(|f| ExplicitAuthFlowsType::from(f.as_str()))
                    .collect();
                let out = cognito
                    .create_user_pool_client()
                    .user_pool_id(pool_id)
                    .client_name(&name)
                    .generate_secret(client.generate_secret)
                    .set_explicit_auth_flows(Some(flows))
                    .send()
                    .await
                    .map_err(failed("CreateUserPoolClient", &name))?;
                (out.user_pool_client.and_then(|c| c.client_id)).ok_or_else(|| CognitoError {
                    operation: "CreateUserPoolClient",
                    subject: name.clone(),
                    message: "the answer has no ClientId".into(),
                })?
            }
        };
        names
            .user_pool_clients
            .insert(client.logical_id.clone(), id);
    }
    for group in &template.user_pool_groups {
        let pool_id = &names.user_pools[&group.user_pool];
        let exists = cognito
            .get_group()
            .user_pool_id(pool_id)
            .group_name(&group.group_name)
            .send()
            .await;
        match exists {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                cognito
                    .create_group()
                    .user_pool_id(pool_id)
                    .group_name(&group.group_name)
                    .send()
                    .await
                    .map_err(failed("CreateGroup", &group.group_name))?;
            }
            Err(e) => return Err(failed("GetGroup", &group.group_name)(e)),
        }
    }
    Ok(())
}

/// Deletes the user pools [`provision`] made for `prefix` (their clients, groups and users
/// go with them). An empty prefix is refused, as for tables and queues.
pub async fn delete_prefixed(
    template: &Template,
    prefix: &str,
    cognito: &Client,
) -> Result<(), CognitoError> {
    if prefix.is_empty() {
        return Err(CognitoError {
            operation: "DeleteUserPool",
            subject: "(no prefix)".into(),
            message: "refusing to delete the unprefixed pools a local run keeps its users in"
                .into(),
        });
    }
    for pool in &template.user_pools {
        let name = local_pool_name(prefix, pool);
        if let Some(id) = find_pool(cognito, &name).await? {
            cognito
                .delete_user_pool()
                .user_pool_id(&id)
                .send()
                .await
                .map_err(failed("DeleteUserPool", &name))?;
        }
    }
    Ok(())
}

async fn find_pool(cognito: &Client, name: &str) -> Result<Option<String>, CognitoError> {
    let mut pages = cognito
        .list_user_pools()
        .max_results(60)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(failed("ListUserPools", name))?;
        if let Some(pool) = (page.user_pools.unwrap_or_default().into_iter())
            .find(|p| p.name.as_deref() == Some(name))
        {
            return Ok(pool.id);
        }
    }
    Ok(None)
}

async fn create_pool(
    cognito: &Client,
    pool: &UserPoolSpec,
    name: &str,
) -> Result<String, CognitoError> {
    let p = &pool.password_policy;
    let mut request = cognito
        .create_user_pool()
        .pool_name(name)
        .policies(
            UserPoolPolicyType::builder()
                .password_policy(
                    PasswordPolicyType::builder()
                        .minimum_length(p.minimum_length as i32)
                        .require_lowercase(p.require_lowercase)
                        .require_uppercase(p.require_uppercase)
                        .require_numbers(p.require_numbers)
                        .require_symbols(p.require_symbols)
                        .build(),
                )
                .build(),
        )
        .admin_create_user_config(
            AdminCreateUserConfigType::builder()
                .allow_admin_create_user_only(pool.admin_create_user_only)
                .build(),
        );
    if let Some(case_sensitive) = pool.case_sensitive_usernames {
        request = request.username_configuration(
            UsernameConfigurationType::builder()
                .case_sensitive(case_sensitive)
                .build()
                .expect("case_sensitive is set"),
        );
    }
    let out = request
        .send()
        .await
        .map_err(failed("CreateUserPool", name))?;
    (out.user_pool.and_then(|p| p.id)).ok_or_else(|| CognitoError {
        operation: "CreateUserPool",
        subject: name.to_string(),
        message: "the answer has no Id".into(),
    })
}

async fn find_client(
    cognito: &Client,
    pool_id: &str,
    name: &str,
) -> Result<Option<String>, CognitoError> {
    let mut pages = cognito
        .list_user_pool_clients()
        .user_pool_id(pool_id)
        .max_results(60)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(failed("ListUserPoolClients", name))?;
        if let Some(client) = (page.user_pool_clients.unwrap_or_default().into_iter())
            .find(|c| c.client_name.as_deref() == Some(name))
        {
            return Ok(client.client_id);
        }
    }
    Ok(None)
}

/// The group whose members are operators: what the order API's `OPERATORS_GROUP` says
/// (the template's `OperatorsGroup` parameter), else `operators`.
pub fn operators_group(template: &Template) -> String {
    (template.functions.iter())
        .find_map(|f| match f.environment.get("OPERATORS_GROUP") {
            Some(EnvValue::Literal(group)) => Some(group.clone()),
            _ => None,
        })
        .unwrap_or_else(|| saga_core::identity::DEFAULT_OPERATORS_GROUP.to_string())
}

/// A signed-in user's tokens.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub access_token: String,
    pub id_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_seconds: i32,
}

/// Where users sign in: a pool, its app client, and the groups that grant roles.
#[derive(Clone, Debug)]
pub struct SignIn {
    pub cognito: Client,
    pub pool_id: String,
    pub client_id: String,
    pub password_policy: PasswordPolicySpec,
}

impl SignIn {
    /// The template's one user pool and app client, as provisioned in `names`. An error says
    /// what is missing (e.g. when `OidcIssuerUrl` makes the template create no pool).
    pub fn of_template(
        template: &Template,
        names: &LocalNames,
        cognito: Client,
    ) -> Result<Self, String> {
        let [pool] = template.user_pools.as_slice() else {
            return Err(format!(
                "the template has {} user pools; signing in locally needs exactly one (is OidcIssuerUrl set?)",
                template.user_pools.len()
            ));
        };
        let client = (template.user_pool_clients.iter())
            .find(|c| c.user_pool == pool.logical_id)
            .ok_or_else(|| format!("user pool {} has no app client", pool.logical_id))?;
        Ok(Self {
            cognito,
            pool_id: names.user_pools[&pool.logical_id].clone(),
            client_id: names.user_pool_clients[&client.logical_id].clone(),
            password_policy: pool.password_policy.clone(),
        })
    }

    /// Makes `username` a user of the pool (if absent) who belongs to exactly `groups` of
    /// `managed_groups`, gives it a new random password and signs it in
    /// (`USER_PASSWORD_AUTH`, the app client's flow).
    pub async fn sign_in(
        &self,
        username: &str,
        groups: &[&str],
        managed_groups: &[&str],
    ) -> Result<Tokens, CognitoError> {
        let c = &self.cognito;
        let exists = c
            .admin_get_user()
            .user_pool_id(&self.pool_id)
            .username(username)
            .send()
            .await;
        match exists {
            Ok(_) => {}
            Err(e) if e.code() == Some("UserNotFoundException") => {
                c.admin_create_user()
                    .user_pool_id(&self.pool_id)
                    .username(username)
                    .message_action(MessageActionType::Suppress)
                    .send()
                    .await
                    .map_err(failed("AdminCreateUser", username))?;
            }
            Err(e) => return Err(failed("AdminGetUser", username)(e)),
        }
        for group in managed_groups {
            if groups.contains(group) {
                c.admin_add_user_to_group()
                    .user_pool_id(&self.pool_id)
                    .username(username)
                    .group_name(*group)
                    .send()
                    .await
                    .map_err(failed("AdminAddUserToGroup", username))?;
            } else {
                let removed = c
                    .admin_remove_user_from_group()
                    .user_pool_id(&self.pool_id)
                    .username(username)
                    .group_name(*group)
                    .send()
                    .await;
                // Not a member: nothing to remove.
                if let Err(e) = removed {
                    if e.code() != Some("ResourceNotFoundException") {
                        return Err(failed("AdminRemoveUserFromGroup", username)(e));
                    }
                }
            }
        }
        let password = random_password(&self.password_policy);
        c.admin_set_user_password()
            .user_pool_id(&self.pool_id)
            .username(username)
            .password(&password)
            .permanent(true)
            .send()
            .await
            .map_err(failed("AdminSetUserPassword", username))?;
        let out = c
            .initiate_auth()
            .client_id(&self.client_id)
            .auth_flow(AuthFlowType::UserPasswordAuth)
            .auth_parameters("USERNAME", username)
            .auth_parameters("PASSWORD", &password)
            .send()
            .await
            .map_err(failed("InitiateAuth", username))?;
        let result = out.authentication_result.ok_or_else(|| CognitoError {
            operation: "InitiateAuth",
            subject: username.to_string(),
            message: format!(
                "no tokens: the pool asks for a challenge ({:?})",
                out.challenge_name
            ),
        })?;
        let missing = |what: &str| CognitoError {
            operation: "InitiateAuth",
            subject: username.to_string(),
            message: format!("the answer has no {what}"),
        };
        Ok(Tokens {
            access_token: result.access_token.ok_or_else(|| missing("AccessToken"))?,
            id_token: result.id_token.ok_or_else(|| missing("IdToken"))?,
            refresh_token: result.refresh_token,
            expires_in_seconds: result.expires_in,
        })
    }
}

/// A password that meets `policy`: 32 random characters with at least one of each class.
fn random_password(policy: &PasswordPolicySpec) -> String {
    const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
    const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    const DIGITS: &[u8] = b"23456789";
    const SYMBOLS: &[u8] = b"!#%+-=?@^_";
    let pick = |set: &[u8]| set[fastrand::usize(..set.len())] as char;
    let mut chars: Vec<char> = vec![pick(LOWER), pick(UPPER), pick(DIGITS), pick(SYMBOLS)];
    let all: Vec<u8> = [LOWER, UPPER, DIGITS, SYMBOLS].concat();
    let length = (policy.minimum_length as usize).max(32);
    while chars.len() < length {
        chars.push(pick(&all));
    }
    fastrand::shuffle(&mut chars);
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_making_a_password_should_meet_the_strictest_policy() {
        let policy = PasswordPolicySpec {
            minimum_length: 40,
            ..PasswordPolicySpec::default()
        };
        for _ in 0..100 {
            let p = random_password(&policy);
            assert!(p.len() >= 40);
            assert!(p.chars().any(|c| c.is_ascii_lowercase()));
            assert!(p.chars().any(|c| c.is_ascii_uppercase()));
            assert!(p.chars().any(|c| c.is_ascii_digit()));
            assert!(p.chars().any(|c| !c.is_ascii_alphanumeric()));
        }
    }
}
