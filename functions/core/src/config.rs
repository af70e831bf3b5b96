//! Typed configuration, loaded once at cold start from environment variables that the SAM
//! template sets from its own resources. A missing or malformed setting fails the cold start
//! with a message naming it: there are no silent defaults for resource names.
//!
//! Every loader takes a lookup function so the local runner can hand each function the
//! environment that `template.yaml` gives it, without touching the process environment.

use std::time::Duration;

use crate::identity::AccessPolicy;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("environment variable {0} is not set (the SAM template sets it for this function)")]
    Missing(&'static str),
    #[error("environment variable {name} has an invalid value {value:?}: {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// A lookup from variable name to value; `std::env::var` in Lambda.
pub trait Lookup {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn required(env: &impl Lookup, name: &'static str) -> Result<String, ConfigError> {
    match env.get(name) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError::Missing(name)),
    }
}

fn optional_parsed<T: std::str::FromStr>(
    env: &impl Lookup,
    name: &'static str,
    default: T,
    expected: &'static str,
    valid: impl Fn(&T) -> bool,
) -> Result<T, ConfigError> {
    match env.get(name) {
        None => Ok(default),
        Some(raw) if raw.trim().is_empty() => Ok(default),
        Some(raw) => match raw.trim().parse::<T>() {
            Ok(v) if valid(&v) => Ok(v),
            _ => Err(ConfigError::Invalid {
                name,
                value: raw,
                expected,
            }),
        },
    }
}

pub const ORDERS_TABLE: &str = "ORDERS_TABLE";
pub const ORDERS_PENDING_INDEX: &str = "ORDERS_PENDING_INDEX";
pub const ORDERS_CUSTOMER_INDEX: &str = "ORDERS_CUSTOMER_INDEX";
pub const GROUPS_CLAIM: &str = "GROUPS_CLAIM";
pub const OPERATORS_GROUP: &str = "OPERATORS_GROUP";
pub const PRODUCTS_TABLE: &str = "PRODUCTS_TABLE";
pub const STOCK_MOVEMENTS_TABLE: &str = "STOCK_MOVEMENTS_TABLE";
pub const IDEMPOTENCY_TABLE: &str = "IDEMPOTENCY_TABLE";
pub const PAYMENT_LEDGER_TABLE: &str = "PAYMENT_LEDGER_TABLE";
pub const STOCK_QUEUE_URL: &str = "STOCK_QUEUE_URL";
pub const PAYMENT_QUEUE_URL: &str = "PAYMENT_QUEUE_URL";
pub const COORDINATOR_QUEUE_URL: &str = "COORDINATOR_QUEUE_URL";
pub const PAYMENT_FAILURE_RATE: &str = "PAYMENT_FAILURE_RATE";
pub const ORDER_TIMEOUT_SECONDS: &str = "ORDER_TIMEOUT_SECONDS";

#[derive(Clone, Debug)]
pub struct OrderApiConfig {
    pub orders_table: String,
    pub customer_index: String,
    pub products_table: String,
    pub stock_movements_table: String,
    pub idempotency_table: String,
    pub stock_queue_url: String,
    pub payment_queue_url: String,
    /// Which claim holds the caller's groups and which group is the operators'; Cognito's
    /// (`cognito:groups`, `operators`) unless `GROUPS_CLAIM` / `OPERATORS_GROUP` say otherwise.
    pub access: AccessPolicy,
}

impl OrderApiConfig {
    /// Variables this function reads (checked against the template by a test).
    pub const VARIABLES: &'static [&'static str] = &[
        ORDERS_TABLE,
        ORDERS_CUSTOMER_INDEX,
        PRODUCTS_TABLE,
        STOCK_MOVEMENTS_TABLE,
        IDEMPOTENCY_TABLE,
        STOCK_QUEUE_URL,
        PAYMENT_QUEUE_URL,
        GROUPS_CLAIM,
        OPERATORS_GROUP,
    ];

    pub fn load(env: &impl Lookup) -> Result<Self, ConfigError> {
        let defaults = AccessPolicy::default();
        let or_default = |name, default: String| match env.get(name) {
            Some(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => default,
        };
        Ok(Self {
            orders_table: required(env, ORDERS_TABLE)?,
            customer_index: required(env, ORDERS_CUSTOMER_INDEX)?,
            products_table: required(env, PRODUCTS_TABLE)?,
            stock_movements_table: required(env, STOCK_MOVEMENTS_TABLE)?,
            idempotency_table: required(env, IDEMPOTENCY_TABLE)?,
            stock_queue_url: required(env, STOCK_QUEUE_URL)?,
            payment_queue_url: required(env, PAYMENT_QUEUE_URL)?,
            access: AccessPolicy {
                groups_claim: or_default(GROUPS_CLAIM, defaults.groups_claim),
                operators_group: or_default(OPERATORS_GROUP, defaults.operators_group),
            },
        })
    }
}

#[derive(Clone, Debug)]
pub struct StockConfig {
    pub products_table: String,
    pub idempotency_table: String,
    pub coordinator_queue_url: String,
}

impl StockConfig {
    pub const VARIABLES: &'static [&'static str] =
        &[PRODUCTS_TABLE, IDEMPOTENCY_TABLE, COORDINATOR_QUEUE_URL];

    pub fn load(env: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            products_table: required(env, PRODUCTS_TABLE)?,
            idempotency_table: required(env, IDEMPOTENCY_TABLE)?,
            coordinator_queue_url: required(env, COORDINATOR_QUEUE_URL)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct PaymentConfig {
    pub idempotency_table: String,
    pub ledger_table: String,
    pub coordinator_queue_url: String,
    /// Share (0.0 to 1.0) of charges the simulator declines at random. Default 0.
    pub failure_rate: f64,
}

impl PaymentConfig {
    pub const VARIABLES: &'static [&'static str] = &[
        IDEMPOTENCY_TABLE,
        PAYMENT_LEDGER_TABLE,
        COORDINATOR_QUEUE_URL,
        PAYMENT_FAILURE_RATE,
    ];

    pub fn load(env: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            idempotency_table: required(env, IDEMPOTENCY_TABLE)?,
            ledger_table: required(env, PAYMENT_LEDGER_TABLE)?,
            coordinator_queue_url: required(env, COORDINATOR_QUEUE_URL)?,
            failure_rate: optional_parsed(
                env,
                PAYMENT_FAILURE_RATE,
                0.0,
                "a number from 0.0 to 1.0",
                |r: &f64| (0.0..=1.0).contains(r),
            )?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub orders_table: String,
    pub stock_queue_url: String,
    pub payment_queue_url: String,
}

impl CoordinatorConfig {
    pub const VARIABLES: &'static [&'static str] =
        &[ORDERS_TABLE, STOCK_QUEUE_URL, PAYMENT_QUEUE_URL];

    pub fn load(env: &impl Lookup) -> Result<Self, ConfigError> {
        Ok(Self {
            orders_table: required(env, ORDERS_TABLE)?,
            stock_queue_url: required(env, STOCK_QUEUE_URL)?,
            payment_queue_url: required(env, PAYMENT_QUEUE_URL)?,
        })
    }
}

#[derive(Clone, Debug)]
pub struct SweeperConfig {
    pub orders_table: String,
    pub pending_index: String,
    pub coordinator_queue_url: String,
    /// How long an order may stay PENDING before the sweeper cancels it. Default 300 s.
    pub order_timeout: Duration,
}

impl SweeperConfig {
    pub const VARIABLES: &'static [&'static str] = &[
        ORDERS_TABLE,
        ORDERS_PENDING_INDEX,
        COORDINATOR_QUEUE_URL,
        ORDER_TIMEOUT_SECONDS,
    ];

    pub fn load(env: &impl Lookup) -> Result<Self, ConfigError> {
        let secs = optional_parsed(
            env,
            ORDER_TIMEOUT_SECONDS,
            300u64,
            "a whole number of seconds, at least 1",
            |s: &u64| *s >= 1,
        )?;
        Ok(Self {
            orders_table: required(env, ORDERS_TABLE)?,
            pending_index: required(env, ORDERS_PENDING_INDEX)?,
            coordinator_queue_url: required(env, COORDINATOR_QUEUE_URL)?,
            order_timeout: Duration::from_secs(secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Lookup + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn when_a_table_name_is_missing_should_name_the_variable() {
        let err = StockConfig::load(&env(&[
            (IDEMPOTENCY_TABLE, "i"),
            (COORDINATOR_QUEUE_URL, "u"),
        ]))
        .unwrap_err();
        assert_eq!(err, ConfigError::Missing(PRODUCTS_TABLE));
        assert!(err.to_string().contains("PRODUCTS_TABLE"));
    }

    #[test]
    fn when_failure_rate_is_out_of_range_should_refuse_it() {
        let base = [
            (IDEMPOTENCY_TABLE, "i"),
            (PAYMENT_LEDGER_TABLE, "l"),
            (COORDINATOR_QUEUE_URL, "u"),
        ];
        let mut pairs = base.to_vec();
        pairs.push((PAYMENT_FAILURE_RATE, "1.5"));
        assert!(matches!(
            PaymentConfig::load(&env(&pairs)),
            Err(ConfigError::Invalid {
                name: PAYMENT_FAILURE_RATE,
                ..
            })
        ));
        let ok = PaymentConfig::load(&env(&base)).unwrap();
        assert_eq!(ok.failure_rate, 0.0);
    }

    #[test]
    fn when_timeout_is_unset_should_default_to_300_seconds() {
        let cfg = SweeperConfig::load(&env(&[
            (ORDERS_TABLE, "o"),
            (ORDERS_PENDING_INDEX, "idx"),
            (COORDINATOR_QUEUE_URL, "u"),
        ]))
        .unwrap();
        assert_eq!(cfg.order_timeout, Duration::from_secs(300));
    }
}
