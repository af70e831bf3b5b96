//! AWS SDK clients, built once per process (cold start) and shared by every invocation.
//! Endpoints, region and credentials come from the standard environment
//! (`AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SQS`, `AWS_REGION`, ...), so the same
//! binary talks to AWS in Lambda and to DynamoDB Local and moto on a laptop.

use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;

use crate::config::{ConfigError, Lookup};

#[derive(Clone, Debug)]
pub struct AwsClients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
}

/// The HTTP client every SDK client uses: the SDK's hyper client with rustls on ring (HTTPS to
/// AWS; plain HTTP to local endpoints), whose root certificates load beside the start-up
/// ([`RootsInBackground`]).
pub fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    aws_smithy_runtime_api::client::http::SharedHttpClient::new(RootsInBackground {
        inner: aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https(),
        started: std::sync::OnceLock::new(),
    })
}

/// The SDK's HTTP client, with the platform's root certificates loaded on a thread of their
/// own while the function starts.
///
/// When a client is built, the SDK's HTTP client builds a throw-away TLS connector only to load
/// the platform's root certificates (once per process) before the first request. That load is
/// most of a function's start-up: 3.7 ms of about 6.5 ms on a Debian machine, which keeps every
/// root twice (`/etc/ssl/certs/ca-certificates.crt`, and a file per root beside it). Here it
/// runs on a thread of its own, started by the first client built, while the function asks
/// the Lambda Runtime API for its first event. The first request's connector then finds the
/// roots loaded, or waits for the rest of the load: the work is the same, it overlaps the
/// round trip to the Runtime API instead of preceding it.
#[derive(Debug)]
struct RootsInBackground {
    inner: aws_smithy_runtime_api::client::http::SharedHttpClient,
    started: std::sync::OnceLock<()>,
}

impl aws_smithy_runtime_api::client::http::HttpClient for RootsInBackground {
    fn http_connector(
        &self,
        settings: &aws_smithy_runtime_api::client::http::HttpConnectorSettings,
        components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
    ) -> aws_smithy_runtime_api::client::http::SharedHttpConnector {
        self.inner.http_connector(settings, components)
    }

    fn validate_base_client_config(
        &self,
        _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponentsBuilder,
        _: &aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.started.get_or_init(|| {
            let inner = self.inner.clone();
            // The SDK's own check ignores its arguments and always succeeds: it only loads
            // the roots. Should the thread fail to start, the first request loads them.
            let _ = std::thread::Builder::new()
                .name("tls-roots".into())
                .spawn(move || {
                    let _ = inner.validate_base_client_config(
                        &aws_smithy_runtime_api::client::runtime_components::RuntimeComponentsBuilder::new(
                            "tls-roots",
                        ),
                        &aws_smithy_types::config_bag::ConfigBag::base(),
                    );
                });
        });
        Ok(())
    }

    fn validate_final_config(
        &self,
        components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.inner.validate_final_config(components, cfg)
    }

    fn connector_metadata(
        &self,
    ) -> Option<aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata> {
        self.inner.connector_metadata()
    }
}

impl AwsClients {
    /// Builds both clients from the environment Lambda gives a function: credentials from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, the region from
    /// `AWS_REGION`, and optional endpoint overrides (`AWS_ENDPOINT_URL_DYNAMODB`,
    /// `AWS_ENDPOINT_URL_SQS`, `AWS_ENDPOINT_URL`) for running the binaries against local
    /// stand-ins. Not aws-config's whole default chain (profiles, SSO, IMDS, STS web identity):
    /// a Lambda function never needs it, and leaving it out keeps the binary small.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub fn from_lookup(env: &impl Lookup) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty());
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .ok_or(ConfigError::Missing("AWS_REGION"))?;
        let credentials = aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        );
        let fallback = get("AWS_ENDPOINT_URL");
        Ok(Self::build(
            &Self::sdk_config(region, credentials),
            get("AWS_ENDPOINT_URL_DYNAMODB").or_else(|| fallback.clone()),
            get("AWS_ENDPOINT_URL_SQS").or(fallback),
            &[],
        ))
    }

    /// The configuration both clients share: the region, the credentials and one HTTP client.
    pub fn sdk_config(
        region: String,
        credentials: aws_sdk_dynamodb::config::SharedCredentialsProvider,
    ) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .credentials_provider(credentials)
            .http_client(http_client())
            .build()
    }

    /// The one way clients are built: in Lambda from the environment ([`Self::from_env`]), and
    /// in the local runner and the tests with local endpoints, dummy credentials and, for the
    /// call counting and recording, interceptors that see every call.
    pub fn build(
        config: &aws_config::SdkConfig,
        dynamodb_endpoint: Option<String>,
        sqs_endpoint: Option<String>,
        interceptors: &[SharedInterceptor],
    ) -> Self {
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(config);
        let mut sqs = aws_sdk_sqs::config::Builder::from(config);
        if let Some(url) = dynamodb_endpoint {
            dynamodb = dynamodb.endpoint_url(url);
        }
        if let Some(url) = sqs_endpoint {
            sqs = sqs.endpoint_url(url);
        }
        for interceptor in interceptors {
            dynamodb = dynamodb.interceptor(interceptor.clone());
            sqs = sqs.interceptor(interceptor.clone());
        }
        Self {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_the_region_is_missing_should_fail_naming_it() {
        let err = AwsClients::from_lookup(&|_: &str| None).unwrap_err();
        assert_eq!(err, ConfigError::Missing("AWS_REGION"));
    }

    #[test]
    fn when_endpoints_are_overridden_should_use_them() {
        let env = |k: &str| match k {
            "AWS_REGION" => Some("eu-west-1".to_string()),
            "AWS_ENDPOINT_URL_SQS" => Some("http://127.0.0.1:9324".to_string()),
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:8000".to_string()),
            _ => None,
        };
        let clients = AwsClients::from_lookup(&env).unwrap();
        assert_eq!(clients.sqs.config().region().unwrap().as_ref(), "eu-west-1");
    }
}
