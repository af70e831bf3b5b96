//! `sam local invoke` and `sam local start-lambda` against the local stack.
//!
//! SAM runs a function's `bootstrap` in a container on Docker's bridge network, where
//! 127.0.0.1 is the container itself. So:
//!
//! - [`container_environment`] turns a function's environment, as the template declares it
//!   and resolved to the local resources, into the one the container needs: every URL of the
//!   local services (the queue URLs) rewritten to the address the container reaches them at
//!   (`host.docker.internal`, which `--add-host host.docker.internal:host-gateway` maps to
//!   the bridge's gateway), plus the endpoint variables the binaries read
//!   (`AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SQS`). [`env_vars_file`] is the
//!   `--env-vars` file of every function: it is generated, never written by hand.
//! - SAM passes a function only the variables its template declares (an `--env-vars` entry
//!   for any other name is silently dropped), and template.yaml rightly declares no endpoint
//!   variables. [`local_template`] is SAM's built template (`.aws-sam/build/template.yaml`)
//!   with the two endpoint variables declared in every function and the code locations made
//!   absolute: a template for local runs only. The artifact it runs is the arm64 `bootstrap`
//!   that `sam build` built and that deploys.
//! - moto listens on 127.0.0.1 only, out of the container's reach. [`relay`] forwards
//!   connections from the bridge's gateway address (an address of this machine that only its
//!   containers reach) to it; DynamoDB Local already listens on every interface.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use tokio::net::{TcpListener, TcpStream};
use yaml_serde::Value;

use crate::template::{Template, TemplateError};

/// The host name containers reach this machine by (`--add-host host.docker.internal:host-gateway`).
pub const CONTAINER_HOST: &str = "host.docker.internal";

/// Where the local services are, as seen from one side (this machine, or a container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub dynamodb: String,
    pub sqs: String,
}

impl Endpoints {
    /// The same ports as `host`'s endpoints, on [`CONTAINER_HOST`].
    pub fn for_container(host: &Endpoints) -> Result<Endpoints, String> {
        let port = |url: &str| -> Result<u16, String> {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| format!("{url}: only http:// endpoints can be relayed"))?;
            let authority = rest.split('/').next().unwrap_or(rest);
            authority
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| format!("{url}: no port"))
        };
        Ok(Endpoints {
            dynamodb: format!("http://{CONTAINER_HOST}:{}", port(&host.dynamodb)?),
            sqs: format!("http://{CONTAINER_HOST}:{}", port(&host.sqs)?),
        })
    }
}

/// The variables the binaries read their endpoints from (see `saga_core::aws`).
pub const ENDPOINT_VARIABLES: [&str; 2] = ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_SQS"];

/// A function's environment for its container: `resolved` (the template's environment
/// resolved to the local resources, as `Stack::environments` or
/// [`crate::template::FunctionSpec::resolve_environment`] give it) with every value that
/// starts with one of `host`'s endpoints moved to the same path on `container`'s, plus the
/// endpoint variables.
pub fn container_environment(
    resolved: &BTreeMap<String, String>,
    host: &Endpoints,
    container: &Endpoints,
) -> BTreeMap<String, String> {
    let moved = |value: &str| {
        for (from, to) in [
            (&host.sqs, &container.sqs),
            (&host.dynamodb, &container.dynamodb),
        ] {
            if let Some(rest) = value.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        value.to_string()
    };
    let mut env: BTreeMap<String, String> = resolved
        .iter()
        .map(|(k, v)| (k.clone(), moved(v)))
        .collect();
    env.insert(ENDPOINT_VARIABLES[0].into(), container.dynamodb.clone());
    env.insert(ENDPOINT_VARIABLES[1].into(), container.sqs.clone());
    env
}

/// The `--env-vars` file: `{ "LogicalId": { "VARIABLE": "value", ... }, ... }`.
pub fn env_vars_file(
    environments: &BTreeMap<String, BTreeMap<String, String>>,
) -> serde_json::Value {
    serde_json::to_value(environments).expect("string maps serialise")
}

/// Every function's `--env-vars` entry for the resources of `names` (one stack).
pub fn env_vars_for_stack(
    template: &Template,
    names: &crate::template::LocalNames,
    host: &Endpoints,
    overrides: &BTreeMap<String, String>,
) -> Result<serde_json::Value, String> {
    let container = Endpoints::for_container(host)?;
    let mut all = BTreeMap::new();
    for f in &template.functions {
        let mut env = f
            .resolve_environment(names, template)
            .map_err(|e: TemplateError| e.to_string())?;
        env.extend(overrides.clone());
        all.insert(
            f.logical_id.clone(),
            container_environment(&env, host, &container),
        );
    }
    Ok(env_vars_file(&all))
}

/// SAM's built template (`built_dir/template.yaml`, what `sam build` wrote) for local runs:
/// every `AWS::Serverless::Function` declares [`ENDPOINT_VARIABLES`] (empty, so that the
/// `--env-vars` file can set them: the binaries treat an empty value as unset) and has an
/// absolute `CodeUri`, so the result can live anywhere. Nothing else changes.
pub fn local_template(built_dir: &Path) -> Result<String, String> {
    let path = built_dir.join("template.yaml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (run `sam build` first)", path.display()))?;
    let mut doc: Value =
        yaml_serde::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let resources = doc
        .get_mut("Resources")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{}: no Resources", path.display()))?;
    let mut functions = 0;
    for (id, resource) in resources.iter_mut() {
        if resource.get("Type").and_then(Value::as_str) != Some("AWS::Serverless::Function") {
            continue;
        }
        functions += 1;
        let id = id.as_str().unwrap_or_default().to_string();
        let props = resource
            .get_mut("Properties")
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| format!("{id}: no Properties"))?;
        let code = props
            .get("CodeUri")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{id}: no CodeUri in the built template"))?;
        let code = built_dir.join(code);
        props.insert(
            "CodeUri".into(),
            Value::String(code.to_string_lossy().into_owned()),
        );
        let env = props
            .entry("Environment".into())
            .or_insert_with(|| Value::Mapping(Default::default()));
        let vars = env
            .as_mapping_mut()
            .ok_or_else(|| format!("{id}: Environment is not a mapping"))?
            .entry("Variables".into())
            .or_insert_with(|| Value::Mapping(Default::default()))
            .as_mapping_mut()
            .ok_or_else(|| format!("{id}: Environment.Variables is not a mapping"))?;
        for name in ENDPOINT_VARIABLES {
            vars.entry(name.into())
                .or_insert_with(|| Value::String(String::new()));
        }
    }
    if functions == 0 {
        return Err(format!("{}: no AWS::Serverless::Function", path.display()));
    }
    let header = "# Generated by `saga-local sam-env` from SAM's built template, for `sam local` only:\n\
                  # every function also declares the endpoint variables, so that --env-vars can set them.\n";
    Ok(format!(
        "{header}{}",
        yaml_serde::to_string(&doc).map_err(|e| e.to_string())?
    ))
}

/// Forwards every connection accepted on `listener` to `to`, until the task is dropped.
pub async fn relay(listener: TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(to).await {
                let _ = outbound.set_nodelay(true);
                let _ = inbound.set_nodelay(true);
                // Either side closing ends the relayed connection; nothing to report.
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Endpoints {
        Endpoints {
            dynamodb: "http://127.0.0.1:8000".into(),
            sqs: "http://127.0.0.1:9324".into(),
        }
    }

    #[test]
    fn when_moved_into_a_container_should_keep_ports_and_paths_and_add_the_endpoints() {
        let container = Endpoints::for_container(&host()).unwrap();
        assert_eq!(container.sqs, "http://host.docker.internal:9324");
        let env = BTreeMap::from([
            (
                "COORDINATOR_QUEUE_URL".to_string(),
                "http://127.0.0.1:9324/123456789012/CoordinatorQueue".to_string(),
            ),
            ("PRODUCTS_TABLE".to_string(), "ProductsTable".to_string()),
        ]);
        let out = container_environment(&env, &host(), &container);
        assert_eq!(
            out["COORDINATOR_QUEUE_URL"],
            "http://host.docker.internal:9324/123456789012/CoordinatorQueue"
        );
        assert_eq!(out["PRODUCTS_TABLE"], "ProductsTable");
        assert_eq!(
            out["AWS_ENDPOINT_URL_DYNAMODB"],
            "http://host.docker.internal:8000"
        );
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn when_an_endpoint_has_no_port_should_refuse_it() {
        let bad = Endpoints {
            dynamodb: "http://localhost".into(),
            sqs: "http://127.0.0.1:9324".into(),
        };
        assert!(Endpoints::for_container(&bad).is_err());
    }

    #[test]
    fn when_made_local_the_built_template_should_declare_the_endpoints_with_absolute_code() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("template.yaml"),
            "Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      CodeUri: F\n      Environment:\n        Variables:\n          A: !Ref T\n  T:\n    Type: AWS::DynamoDB::Table\n",
        )
        .unwrap();
        let text = local_template(dir.path()).unwrap();
        let doc: Value = yaml_serde::from_str(&text).unwrap();
        let props = &doc["Resources"]["F"]["Properties"];
        assert_eq!(
            props["CodeUri"].as_str().unwrap(),
            dir.path().join("F").to_str().unwrap()
        );
        let vars = &props["Environment"]["Variables"];
        assert_eq!(vars["AWS_ENDPOINT_URL_SQS"].as_str(), Some(""));
        assert!(text.contains("A: !Ref T"), "{text}");
    }
}
