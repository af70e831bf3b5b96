//! The local runner: the whole saga on 127.0.0.1 (see the README's "Run it locally").
//!
//! - [`services`]: starts (or reuses) DynamoDB Local and moto's SQS;
//! - [`template`] and [`provision`]: read `template.yaml` and create its tables and queues;
//! - [`stack`]: wires every function of the template to its handler;
//! - [`http`]: API Gateway's HTTP API in front of the order API handler;
//! - [`esm`]: Lambda's SQS event source mapping in front of the queue consumers;
//! - [`pacing`]: scaled timeouts, back-off and fewer pollers when the machine is slow;
//! - [`redrive`]: moves messages from a DLQ back to its source queue;
//! - [`audit`]: reads the stores and lists every broken invariant (`saga-local audit`);
//! - [`sam`]: what `sam local` needs to run the built functions against the local stack;
//! - [`counting`] and [`access`]: record the AWS calls the stack makes, all of them (the
//!   budget benchmark) or per function as IAM sees them (the least-privilege test);
//! - [`timing`]: where the time goes under load (queue waits, handler time, AWS calls, final
//!   states), for the load benchmark.
pub mod access;
pub mod audit;
pub mod authorizer;
pub mod bench;
pub mod cognito;
pub mod counting;
pub mod esm;
pub mod http;
pub mod opening;
pub mod pacing;
pub mod provision;
pub mod redrive;
pub mod sam;
pub mod services;
pub mod stack;
pub mod template;
pub mod timing;
