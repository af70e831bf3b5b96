//! Checks of `template.yaml` that cfn-lint and `sam validate --lint` do not make, each derived
//! from the code and the template rather than from a hand-kept list:
//!
//! - every SQS event source reports batch item failures (`FunctionResponseTypes`);
//! - every work queue has a dead-letter queue after at least 5 receives, the DLQ keeps a
//!   message at least as long as its source, and an alarm watches the DLQ;
//! - every queue's visibility timeout is at least 6 x its consumer's timeout (+ the batching
//!   window);
//! - each function's role grants exactly what the function needs, in both directions: the
//!   AWS calls its code makes (found by reading `functions/*/src/main.rs` and
//!   `functions/core/src` with `syn`, following the calls from `main` through the handler into
//!   the adapters, and resolving each call's table or queue to the environment variable that
//!   names it), plus what Lambda itself does with the role (logs, X-Ray, polling the SQS
//!   source). Granted but unused fails; used but not granted fails;
//! - each function's environment sets every variable its configuration reads (and nothing
//!   the code never reads).
//!
//! Mutation tests break the real template in memory (one break each) and assert the checker
//! reports it, so these checks demonstrably can fail. cfn-lint and `sam validate --lint` run
//! too, from the tools venv (`make setup-tools`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use local_runner::template::{EnvValue, Template};
use saga_core::config::{
    CoordinatorConfig, OrderApiConfig, PaymentConfig, StockConfig, SweeperConfig,
};
use yaml_serde::Value;

fn repo() -> PathBuf {
    saga_tests::repo_root()
}

fn real_template_text() -> String {
    std::fs::read_to_string(repo().join("template.yaml")).expect("read template.yaml")
}

// ==========================================================================================
// The explicit mappings. Everything else is derived from the code and the template.
// ==========================================================================================

/// Rust SDK operation (the fluent-builder method on the client) -> the IAM action that
/// authorises it. `None`: the operation has no action of its own.
#[rustfmt::skip]
const SDK_OPERATIONS: &[(&str, &str, Option<&str>)] = &[
    ("dynamodb", "get_item",                  Some("dynamodb:GetItem")),
    ("dynamodb", "put_item",                  Some("dynamodb:PutItem")),
    ("dynamodb", "update_item",               Some("dynamodb:UpdateItem")),
    ("dynamodb", "delete_item",               Some("dynamodb:DeleteItem")),
    ("dynamodb", "query",                     Some("dynamodb:Query")),
    ("dynamodb", "scan",                      Some("dynamodb:Scan")),
    ("dynamodb", "batch_get_item",            Some("dynamodb:BatchGetItem")),
    ("dynamodb", "batch_write_item",          Some("dynamodb:BatchWriteItem")),
    // A transaction is authorised item by item (see TRANSACTION_ITEMS).
    ("dynamodb", "transact_write_items",      None),
    ("dynamodb", "transact_get_items",        None),
    ("sqs",      "send_message",              Some("sqs:SendMessage")),
    // SendMessageBatch has no action of its own: sqs:SendMessage authorises it.
    ("sqs",      "send_message_batch",        Some("sqs:SendMessage")),
    ("sqs",      "receive_message",           Some("sqs:ReceiveMessage")),
    ("sqs",      "delete_message",            Some("sqs:DeleteMessage")),
    ("sqs",      "delete_message_batch",      Some("sqs:DeleteMessage")),
    ("sqs",      "change_message_visibility", Some("sqs:ChangeMessageVisibility")),
    ("sqs",      "get_queue_attributes",      Some("sqs:GetQueueAttributes")),
];

/// The items of a DynamoDB transaction (`X::builder()` of `aws_sdk_dynamodb::types`) and the
/// action each needs on its table.
const TRANSACTION_ITEMS: &[(&str, &str)] = &[
    ("Put", "dynamodb:PutItem"),
    ("Update", "dynamodb:UpdateItem"),
    ("Delete", "dynamodb:DeleteItem"),
    ("ConditionCheck", "dynamodb:ConditionCheckItem"),
    ("Get", "dynamodb:GetItem"),
];

/// Builder arguments that name the resource a call acts on.
const TABLE_ARGUMENTS: &[&str] = &["table_name", "queue_url", "request_items"];
const INDEX_ARGUMENT: &str = "index_name";

/// What Lambda itself does with the function's role (not the code):
/// writing the function's logs to its log group,
const LOGGING_ACTIONS: &[&str] = &["logs:CreateLogStream", "logs:PutLogEvents"];
/// sending trace segments when `Tracing: Active` (X-Ray has no resource-level permissions),
const TRACING_ACTIONS: &[&str] = &["xray:PutTraceSegments", "xray:PutTelemetryRecords"];
/// and polling an SQS event source: the three actions the Lambda developer guide lists for
/// the execution role ("sqs:ReceiveMessage, sqs:DeleteMessage, sqs:GetQueueAttributes").
const SQS_POLLER_ACTIONS: &[&str] = &[
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
];

/// The variables each configuration type declares it reads (checked below against what its
/// `load` really reads).
fn declared_variables() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("OrderApiConfig", OrderApiConfig::VARIABLES),
        ("StockConfig", StockConfig::VARIABLES),
        ("PaymentConfig", PaymentConfig::VARIABLES),
        ("CoordinatorConfig", CoordinatorConfig::VARIABLES),
        ("SweeperConfig", SweeperConfig::VARIABLES),
    ])
}

/// `tracing_subscriber::EnvFilter::from_default_env` and `try_from_default_env` read this.
const ENV_FILTER_VARIABLE: &str = "RUST_LOG";
const ENV_FILTER_READERS: &[&str] = &["from_default_env", "try_from_default_env"];

/// Variables Lambda sets itself (the "Defined runtime environment variables" of the Lambda
/// developer guide): code may read them, and a template must not set them.
const LAMBDA_RESERVED: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    // Set from LoggingConfig (ApplicationLogLevel, LogFormat).
    "AWS_LAMBDA_LOG_LEVEL",
    "AWS_LAMBDA_LOG_FORMAT",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

// ==========================================================================================
// Reading the code
// ==========================================================================================

mod code {
    //! A small abstract interpreter over the Rust source: it follows method calls from a
    //! binary's `main` through the handler into the adapters, tracking which struct instance
    //! each `self` is (so `self.table` of the idempotency store is known to hold the value of
    //! `IDEMPOTENCY_TABLE`), and records every AWS SDK call with the variable naming its table
    //! or queue. Anything it cannot resolve is reported, never skipped.

    use super::{
        ENV_FILTER_READERS, ENV_FILTER_VARIABLE, INDEX_ARGUMENT, SDK_OPERATIONS, TABLE_ARGUMENTS,
        TRANSACTION_ITEMS,
    };
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::path::Path;
    use std::rc::Rc;
    use syn::punctuated::Punctuated;
    use syn::visit::Visit;
    use syn::{Expr, ExprMethodCall, FnArg, ImplItem, Item, Pat, Token};

    /// Which resource a call acts on.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Target {
        /// The resource whose name (or URL) is in this environment variable.
        Env(String),
        /// The table of a transaction item built elsewhere (`put.table_name`): that builder is
        /// recorded on its own, with its table.
        FromItem,
        /// Could not be resolved (the text says what was seen).
        Unresolved(String),
    }

    /// One AWS call the code makes: the IAM action, the resource, and where it is.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub struct AwsCall {
        pub action: String,
        pub target: Target,
        /// For a query on an index: the variable naming the index.
        pub index: Option<Target>,
        /// `Type::method` that makes the call.
        pub site: String,
    }

    /// What one Lambda binary does, as read from its code.
    #[derive(Clone, Debug, Default)]
    pub struct Binary {
        pub calls: BTreeSet<AwsCall>,
        /// Configuration types its `main` loads.
        pub configs: BTreeSet<String>,
        /// Methods reached from `main`.
        pub reached: BTreeSet<(String, String)>,
        pub problems: Vec<String>,
    }

    /// The crate's source, indexed.
    pub struct Code {
        structs: HashMap<String, BTreeMap<String, String>>,
        methods: HashMap<(String, String), syn::ImplItemFn>,
        free_fns: Vec<(String, syn::ItemFn)>,
        consts: HashMap<String, String>,
        /// (configuration type, field) -> the variable its `load` reads into that field.
        config_fields: HashMap<(String, String), String>,
        /// Configuration type -> every variable its `load` reads.
        pub config_reads: BTreeMap<String, BTreeSet<String>>,
        /// Variables read straight from the process environment, anywhere.
        pub direct_env_reads: BTreeSet<String>,
        /// Methods (and free functions, as `("", name)`) that call the SDK directly.
        pub sdk_sites: BTreeSet<(String, String)>,
        pub problems: Vec<String>,
    }

    fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
        attrs.iter().any(|a| {
            a.path().is_ident("cfg")
                && a.meta
                    .require_list()
                    .map(|l| l.tokens.to_string().contains("test"))
                    .unwrap_or(false)
        })
    }

    fn last_ident(path: &syn::Path) -> String {
        path.segments
            .last()
            .map(|s| s.ident.to_string())
            .unwrap_or_default()
    }

    fn type_name(ty: &syn::Type) -> Option<String> {
        match ty {
            syn::Type::Path(p) => Some(last_ident(&p.path)),
            syn::Type::Reference(r) => type_name(&r.elem),
            _ => None,
        }
    }

    fn tokens(t: &impl quote::ToTokens) -> String {
        t.to_token_stream().to_string()
    }

    fn pat_name(pat: &Pat) -> Option<String> {
        match pat {
            Pat::Ident(i) => Some(i.ident.to_string()),
            Pat::Type(t) => pat_name(&t.pat),
            Pat::Reference(r) => pat_name(&r.pat),
            _ => None,
        }
    }

    fn sdk_operation(service: &str, op: &str) -> Option<Option<&'static str>> {
        SDK_OPERATIONS
            .iter()
            .find(|(s, o, _)| *s == service && *o == op)
            .map(|(_, _, a)| *a)
    }

    /// Every identifier in an expression (paths included), macros aside.
    fn idents(e: &Expr) -> Vec<String> {
        struct Collect(Vec<String>);
        impl<'ast> Visit<'ast> for Collect {
            fn visit_ident(&mut self, i: &'ast syn::Ident) {
                self.0.push(i.to_string());
            }
        }
        let mut c = Collect(Vec::new());
        c.visit_expr(e);
        c.0
    }

    /// The string literal of `std::env::var("X")`, `env::var_os("X")`, ...
    fn env_var_literal(call: &syn::ExprCall) -> Option<String> {
        let Expr::Path(p) = &*call.func else {
            return None;
        };
        let segs: Vec<String> = p
            .path
            .segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect();
        let n = segs.len();
        if n >= 2 && segs[n - 2] == "env" && (segs[n - 1] == "var" || segs[n - 1] == "var_os") {
            if let Some(Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            })) = call.args.first()
            {
                return Some(s.value());
            }
        }
        None
    }

    impl Code {
        /// Reads every `.rs` file under `core_src`, each passed through `edit(path, text)`
        /// (tests use it to change the code in memory).
        pub fn read(core_src: &Path, edit: &dyn Fn(&Path, String) -> String) -> Code {
            let mut code = Code {
                structs: HashMap::new(),
                methods: HashMap::new(),
                free_fns: Vec::new(),
                consts: HashMap::new(),
                config_fields: HashMap::new(),
                config_reads: BTreeMap::new(),
                direct_env_reads: BTreeSet::new(),
                sdk_sites: BTreeSet::new(),
                problems: Vec::new(),
            };
            let mut files = Vec::new();
            collect_rs(core_src, &mut files);
            files.sort();
            for file in &files {
                let text = edit(file, std::fs::read_to_string(file).expect("read source"));
                let parsed = syn::parse_file(&text)
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
                code.index(&parsed.items);
            }
            code.read_configs();
            code.find_sdk_sites();
            code
        }

        fn index(&mut self, items: &[Item]) {
            for item in items {
                match item {
                    Item::Struct(s) if !is_cfg_test(&s.attrs) => {
                        let fields = s
                            .fields
                            .iter()
                            .filter_map(|f| Some((f.ident.as_ref()?.to_string(), tokens(&f.ty))))
                            .collect();
                        self.structs.insert(s.ident.to_string(), fields);
                    }
                    Item::Impl(i) if !is_cfg_test(&i.attrs) => {
                        let Some(ty) = type_name(&i.self_ty) else {
                            continue;
                        };
                        for it in &i.items {
                            if let ImplItem::Fn(f) = it {
                                self.methods
                                    .insert((ty.clone(), f.sig.ident.to_string()), f.clone());
                            }
                        }
                    }
                    Item::Const(c) => {
                        if let Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(s),
                            ..
                        }) = &*c.expr
                        {
                            self.consts.insert(c.ident.to_string(), s.value());
                        }
                    }
                    Item::Fn(f) if !is_cfg_test(&f.attrs) => {
                        self.free_fns.push((f.sig.ident.to_string(), f.clone()));
                    }
                    Item::Mod(m) if !is_cfg_test(&m.attrs) => {
                        if let Some((_, items)) = &m.content {
                            self.index(items);
                        }
                    }
                    _ => {}
                }
            }
        }

        /// From each `XConfig::load`: which variable goes into which field, and every variable
        /// it reads (the string constants it names).
        fn read_configs(&mut self) {
            let loads: Vec<(String, syn::ImplItemFn)> = self
                .methods
                .iter()
                .filter(|((ty, m), _)| m == "load" && ty.ends_with("Config"))
                .map(|((ty, _), f)| (ty.clone(), f.clone()))
                .collect();
            for (ty, f) in loads {
                let mut lets: HashMap<String, Expr> = HashMap::new();
                let mut reads = BTreeSet::new();
                for stmt in &f.block.stmts {
                    if let syn::Stmt::Local(l) = stmt {
                        if let (Some(name), Some(init)) = (pat_name(&l.pat), &l.init) {
                            lets.insert(name, (*init.expr).clone());
                        }
                    }
                }
                struct Structs(Vec<syn::ExprStruct>);
                impl<'ast> Visit<'ast> for Structs {
                    fn visit_expr_struct(&mut self, s: &'ast syn::ExprStruct) {
                        self.0.push(s.clone());
                    }
                }
                let mut structs = Structs(Vec::new());
                structs.visit_block(&f.block);
                for s in structs.0.iter().filter(|s| last_ident(&s.path) == "Self") {
                    for fv in &s.fields {
                        let syn::Member::Named(field) = &fv.member else {
                            continue;
                        };
                        let mut names = idents(&fv.expr);
                        for n in names.clone() {
                            if let Some(init) = lets.get(&n) {
                                names.extend(idents(init));
                            }
                        }
                        if let Some(var) = names.iter().find_map(|n| self.consts.get(n)) {
                            self.config_fields
                                .insert((ty.clone(), field.to_string()), var.clone());
                        }
                    }
                }
                struct All<'c>(&'c HashMap<String, String>, BTreeSet<String>);
                impl<'ast> Visit<'ast> for All<'_> {
                    fn visit_ident(&mut self, i: &'ast syn::Ident) {
                        if let Some(v) = self.0.get(&i.to_string()) {
                            self.1.insert(v.clone());
                        }
                    }
                }
                let mut all = All(&self.consts, BTreeSet::new());
                all.visit_block(&f.block);
                reads.extend(all.1);
                self.config_reads.insert(ty, reads);
            }
        }

        /// Every method or free function that calls the SDK (a `.client.op()` chain or a
        /// transaction item builder), and every literal `env::var` read. SDK calls inside
        /// macros cannot be followed: they are reported.
        fn find_sdk_sites(&mut self) {
            struct Find {
                found: bool,
                env: BTreeSet<String>,
                in_macro: Vec<String>,
            }
            impl<'ast> Visit<'ast> for Find {
                fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
                    if ENV_FILTER_READERS.contains(&m.method.to_string().as_str()) {
                        self.env.insert(ENV_FILTER_VARIABLE.to_string());
                    }
                    if is_sdk_call(m) {
                        self.found = true;
                    }
                    syn::visit::visit_expr_method_call(self, m);
                }
                fn visit_path_segment(&mut self, seg: &'ast syn::PathSegment) {
                    if ENV_FILTER_READERS.contains(&seg.ident.to_string().as_str()) {
                        self.env.insert(ENV_FILTER_VARIABLE.to_string());
                    }
                    syn::visit::visit_path_segment(self, seg);
                }
                fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
                    if item_builder(c).is_some() {
                        self.found = true;
                    }
                    if let Some(v) = env_var_literal(c) {
                        self.env.insert(v);
                    }
                    syn::visit::visit_expr_call(self, c);
                }
                fn visit_macro(&mut self, mac: &'ast syn::Macro) {
                    let text = mac.tokens.to_string();
                    for (_, op, _) in SDK_OPERATIONS {
                        if text.contains(&format!(". {op} (")) {
                            self.in_macro.push(op.to_string());
                        }
                    }
                    if let Ok(args) =
                        mac.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated)
                    {
                        for a in &args {
                            self.visit_expr(a);
                        }
                    }
                }
            }
            let mut sites = BTreeSet::new();
            let mut env = BTreeSet::new();
            let mut problems = Vec::new();
            let mut scan = |ty: &str, name: &str, block: &syn::Block| {
                let mut f = Find {
                    found: false,
                    env: BTreeSet::new(),
                    in_macro: Vec::new(),
                };
                f.visit_block(block);
                if f.found {
                    sites.insert((ty.to_string(), name.to_string()));
                }
                for op in f.in_macro {
                    problems.push(format!(
                        "{ty}::{name} calls the SDK operation {op} inside a macro, which this \
                         test cannot follow: call it outside the macro"
                    ));
                }
                env.extend(f.env);
            };
            for ((ty, name), f) in &self.methods {
                scan(ty, name, &f.block);
            }
            for (name, f) in &self.free_fns {
                scan("", name, &f.block);
            }
            self.sdk_sites = sites;
            self.direct_env_reads = env;
            self.problems.extend(problems);
        }

        /// `Some(service)` when `self.<field>` is an AWS SDK client.
        fn client_service(&self, ty: &str, field: &syn::ExprField) -> Option<&'static str> {
            let Expr::Path(base) = &*field.base else {
                return None;
            };
            if !base.path.is_ident("self") {
                return None;
            }
            let syn::Member::Named(name) = &field.member else {
                return None;
            };
            let declared = self.structs.get(ty)?.get(&name.to_string())?;
            if declared.contains("aws_sdk_dynamodb") {
                Some("dynamodb")
            } else if declared.contains("aws_sdk_sqs") {
                Some("sqs")
            } else {
                None
            }
        }

        fn method(&self, ty: &str, name: &str) -> Option<&syn::ImplItemFn> {
            self.methods.get(&(ty.to_string(), name.to_string()))
        }

        /// Follows a binary's `main` (its `src/main.rs`) and records what it does.
        pub fn binary(&self, main_rs: &Path) -> Binary {
            let mut out = Binary::default();
            let text = match std::fs::read_to_string(main_rs) {
                Ok(t) => t,
                Err(e) => {
                    out.problems
                        .push(format!("cannot read {}: {e}", main_rs.display()));
                    return out;
                }
            };
            let file = syn::parse_file(&text).expect("main.rs parses");
            let Some(main) = file.items.iter().find_map(|i| match i {
                Item::Fn(f) if f.sig.ident == "main" => Some(f),
                _ => None,
            }) else {
                out.problems
                    .push(format!("{} has no fn main", main_rs.display()));
                return out;
            };
            let mut walker = Walker {
                code: self,
                frame: Frame::default(),
                site: "main".into(),
                out: &mut out,
                stack: Vec::new(),
            };
            walker.visit_block(&main.block);
            if out.reached.is_empty() {
                out.problems.push(format!(
                    "{}: no method of saga_core was reached from main",
                    main_rs.display()
                ));
            }
            out
        }
    }

    fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                collect_rs(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Whether a method call looks like an SDK operation on some client: an operation's name
    /// called on something named like a client (`self.client`, `client`, `clients.sqs`).
    fn is_sdk_call(m: &ExprMethodCall) -> bool {
        let op = m.method.to_string();
        let receiver = tokens(&*m.receiver).to_ascii_lowercase();
        SDK_OPERATIONS.iter().any(|(_, o, _)| *o == op)
            && ["client", "dynamodb", "sqs"]
                .iter()
                .any(|end| receiver.ends_with(end))
    }

    /// `Put::builder()` and friends: the transaction item and its action.
    fn item_builder(c: &syn::ExprCall) -> Option<&'static str> {
        let Expr::Path(p) = &*c.func else {
            return None;
        };
        let segs: Vec<String> = p
            .path
            .segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect();
        let n = segs.len();
        if n < 2 || segs[n - 1] != "builder" {
            return None;
        }
        TRANSACTION_ITEMS
            .iter()
            .find(|(item, _)| *item == segs[n - 2])
            .map(|(_, action)| *action)
    }

    /// A value as far as this interpreter knows it.
    #[derive(Clone, Debug)]
    enum Val {
        /// The value of this environment variable.
        Env(String),
        /// An instance of one of the crate's structs, with what its fields hold.
        Obj(Rc<Obj>),
        Unknown,
    }

    #[derive(Debug)]
    struct Obj {
        ty: String,
        fields: BTreeMap<String, Val>,
    }

    #[derive(Clone, Default)]
    struct Frame {
        this: Option<Rc<Obj>>,
        ty: String,
        locals: HashMap<String, Val>,
    }

    /// Methods that hand their receiver's value through unchanged.
    const PASSTHROUGH: &[&str] = &[
        "clone",
        "into",
        "to_string",
        "to_owned",
        "as_str",
        "as_ref",
        "as_deref",
        "unwrap",
        "expect",
        "borrow",
    ];
    const MAX_DEPTH: usize = 40;

    impl Code {
        fn eval(&self, frame: &Frame, e: &Expr, depth: usize) -> Val {
            if depth > MAX_DEPTH {
                return Val::Unknown;
            }
            let eval = |e: &Expr| self.eval(frame, e, depth + 1);
            match e {
                Expr::Reference(r) => eval(&r.expr),
                Expr::Paren(p) => eval(&p.expr),
                Expr::Group(g) => eval(&g.expr),
                Expr::Try(t) => eval(&t.expr),
                Expr::Await(a) => eval(&a.base),
                Expr::Block(b) => self.eval_block(frame.clone(), &b.block, depth + 1),
                Expr::Path(p) if p.path.segments.len() == 1 => {
                    let name = p.path.segments[0].ident.to_string();
                    if name == "self" {
                        frame.this.clone().map(Val::Obj).unwrap_or(Val::Unknown)
                    } else {
                        frame.locals.get(&name).cloned().unwrap_or(Val::Unknown)
                    }
                }
                Expr::Field(f) => {
                    let syn::Member::Named(name) = &f.member else {
                        return Val::Unknown;
                    };
                    let name = name.to_string();
                    match eval(&f.base) {
                        Val::Obj(o) => match o.fields.get(&name) {
                            Some(v @ (Val::Env(_) | Val::Obj(_))) => v.clone(),
                            _ => self
                                .config_fields
                                .get(&(o.ty.clone(), name))
                                .map(|v| Val::Env(v.clone()))
                                .unwrap_or(Val::Unknown),
                        },
                        _ => Val::Unknown,
                    }
                }
                Expr::MethodCall(m) => {
                    let name = m.method.to_string();
                    if PASSTHROUGH.contains(&name.as_str()) {
                        return eval(&m.receiver);
                    }
                    match eval(&m.receiver) {
                        Val::Obj(o) => match self.method(&o.ty, &name) {
                            Some(f) => {
                                let args = m.args.iter().map(eval).collect();
                                self.call_value(f, Some(o.clone()), &o.ty, args, depth + 1)
                            }
                            None => Val::Unknown,
                        },
                        _ => Val::Unknown,
                    }
                }
                Expr::Call(c) => {
                    let Expr::Path(p) = &*c.func else {
                        return Val::Unknown;
                    };
                    let segs: Vec<String> = p
                        .path
                        .segments
                        .iter()
                        .map(|s| s.ident.to_string())
                        .collect();
                    let n = segs.len();
                    if n == 1 && (segs[0] == "Ok" || segs[0] == "Some") && c.args.len() == 1 {
                        return eval(&c.args[0]);
                    }
                    if n >= 2 {
                        let ty = if segs[n - 2] == "Self" {
                            frame.ty.clone()
                        } else {
                            segs[n - 2].clone()
                        };
                        if let Some(f) = self.method(&ty, &segs[n - 1]) {
                            let args = c.args.iter().map(eval).collect();
                            return self.call_value(f, None, &ty, args, depth + 1);
                        }
                    }
                    Val::Unknown
                }
                Expr::Struct(s) => {
                    let mut ty = last_ident(&s.path);
                    if ty == "Self" {
                        ty = frame.ty.clone();
                    }
                    let fields = s
                        .fields
                        .iter()
                        .filter_map(|fv| match &fv.member {
                            syn::Member::Named(n) => Some((n.to_string(), eval(&fv.expr))),
                            syn::Member::Unnamed(_) => None,
                        })
                        .collect();
                    Val::Obj(Rc::new(Obj { ty, fields }))
                }
                _ => Val::Unknown,
            }
        }

        fn eval_block(&self, mut frame: Frame, block: &syn::Block, depth: usize) -> Val {
            for stmt in &block.stmts {
                match stmt {
                    syn::Stmt::Local(l) => {
                        if let (Some(name), Some(init)) = (pat_name(&l.pat), &l.init) {
                            let v = self.eval(&frame, &init.expr, depth + 1);
                            frame.locals.insert(name, v);
                        }
                    }
                    syn::Stmt::Expr(e, None) => return self.eval(&frame, e, depth + 1),
                    _ => {}
                }
            }
            Val::Unknown
        }

        fn bind(f: &syn::ImplItemFn, this: Option<Rc<Obj>>, ty: &str, args: Vec<Val>) -> Frame {
            let params = f.sig.inputs.iter().filter_map(|a| match a {
                FnArg::Typed(t) => Some(pat_name(&t.pat).unwrap_or_default()),
                FnArg::Receiver(_) => None,
            });
            Frame {
                this,
                ty: ty.to_string(),
                locals: params.zip(args).collect(),
            }
        }

        /// The value a method returns (its tail expression), without recording anything.
        fn call_value(
            &self,
            f: &syn::ImplItemFn,
            this: Option<Rc<Obj>>,
            ty: &str,
            args: Vec<Val>,
            depth: usize,
        ) -> Val {
            self.eval_block(Self::bind(f, this, ty, args), &f.block, depth + 1)
        }
    }

    /// Walks a body, following calls into the crate's methods and recording SDK calls.
    struct Walker<'c, 'o> {
        code: &'c Code,
        frame: Frame,
        site: String,
        out: &'o mut Binary,
        stack: Vec<(String, String)>,
    }

    impl Walker<'_, '_> {
        fn eval(&self, e: &Expr) -> Val {
            self.code.eval(&self.frame, e, 0)
        }

        fn target(&self, e: &Expr) -> Target {
            let mut inner = e;
            while let Expr::Reference(r) = inner {
                inner = &r.expr;
            }
            if let Expr::Field(f) = inner {
                if matches!(&f.member, syn::Member::Named(n) if n == "table_name") {
                    return Target::FromItem;
                }
            }
            match self.eval(e) {
                Val::Env(v) => Target::Env(v),
                _ => Target::Unresolved(render(e)),
            }
        }

        fn record(&mut self, action: &str, calls: &[&ExprMethodCall]) {
            let mut target = None;
            let mut index = None;
            for c in calls {
                let m = c.method.to_string();
                if TABLE_ARGUMENTS.contains(&m.as_str()) {
                    if let Some(arg) = c.args.first() {
                        target = Some(self.target(arg));
                    }
                } else if m == INDEX_ARGUMENT {
                    if let Some(arg) = c.args.first() {
                        index = Some(self.target(arg));
                    }
                }
            }
            let target = target.unwrap_or_else(|| {
                Target::Unresolved("no table_name/queue_url in the call".to_string())
            });
            self.out.calls.insert(AwsCall {
                action: action.to_string(),
                target,
                index,
                site: self.site.clone(),
            });
        }

        fn walk_method(&mut self, this: Option<Rc<Obj>>, ty: &str, name: &str, args: Vec<Val>) {
            let Some(f) = self.code.method(ty, name) else {
                return;
            };
            let key = (ty.to_string(), name.to_string());
            if self.stack.contains(&key) || self.stack.len() > MAX_DEPTH {
                return;
            }
            self.out.reached.insert(key.clone());
            let mut stack = std::mem::take(&mut self.stack);
            stack.push(key);
            let mut inner = Walker {
                code: self.code,
                frame: Code::bind(f, this, ty, args),
                site: format!("{ty}::{name}"),
                out: &mut *self.out,
                stack,
            };
            inner.visit_block(&f.block);
            let mut stack = std::mem::take(&mut inner.stack);
            stack.pop();
            self.stack = stack;
        }

        fn chain(&mut self, outer: &ExprMethodCall) {
            let mut calls: Vec<&ExprMethodCall> = vec![outer];
            let mut root: &Expr = &outer.receiver;
            loop {
                match root {
                    Expr::MethodCall(m) => {
                        calls.push(m);
                        root = &m.receiver;
                    }
                    Expr::Try(t) => root = &t.expr,
                    Expr::Await(a) => root = &a.base,
                    Expr::Paren(p) => root = &p.expr,
                    _ => break,
                }
            }
            calls.reverse();
            let visit_args = |w: &mut Self| {
                for c in &calls {
                    for a in &c.args {
                        w.visit_expr(a);
                    }
                }
            };

            // `self.client.op()...`: an SDK call.
            if let Expr::Field(f) = root {
                if let Some(service) = self.code.client_service(&self.frame.ty, f) {
                    let op = calls[0].method.to_string();
                    match sdk_operation(service, &op) {
                        Some(Some(action)) => self.record(action, &calls),
                        Some(None) => {}
                        None => self.out.problems.push(format!(
                            "{} calls {service} operation {op}, which SDK_OPERATIONS does not \
                             map to an IAM action: add it",
                            self.site
                        )),
                    }
                    visit_args(self);
                    return;
                }
            }
            if is_sdk_call(calls[0]) {
                self.out.problems.push(format!(
                    "{} calls {} on `{}`, which is not an SDK client field of its struct: this \
                     test cannot tell which service and resource it is",
                    self.site,
                    calls[0].method,
                    render(root)
                ));
            }
            // `Put::builder()...`: a transaction item.
            if let Expr::Call(c) = root {
                if let Some(action) = item_builder(c) {
                    self.record(action, &calls);
                    visit_args(self);
                    return;
                }
            }
            // Anything else: follow each call into the crate's methods.
            self.visit_expr(root);
            let mut current = self.eval(root);
            for c in &calls {
                for a in &c.args {
                    self.visit_expr(a);
                }
                let name = c.method.to_string();
                if PASSTHROUGH.contains(&name.as_str()) {
                    continue;
                }
                current = match current {
                    Val::Obj(o) if self.code.method(&o.ty, &name).is_some() => {
                        let args: Vec<Val> = c.args.iter().map(|a| self.eval(a)).collect();
                        self.walk_method(Some(o.clone()), &o.ty, &name, args.clone());
                        let f = self.code.method(&o.ty, &name).expect("checked");
                        self.code.call_value(f, Some(o.clone()), &o.ty, args, 0)
                    }
                    _ => Val::Unknown,
                };
            }
        }
    }

    impl<'ast> Visit<'ast> for Walker<'_, '_> {
        fn visit_item(&mut self, _: &'ast Item) {}

        fn visit_local(&mut self, l: &'ast syn::Local) {
            if let Some(init) = &l.init {
                self.visit_expr(&init.expr);
                if let Some((_, diverge)) = &init.diverge {
                    self.visit_expr(diverge);
                }
                if let Some(name) = pat_name(&l.pat) {
                    let v = self.eval(&init.expr);
                    self.frame.locals.insert(name, v);
                }
            }
        }

        fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
            self.chain(m);
        }

        fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
            syn::visit::visit_expr_call(self, c);
            let Expr::Path(p) = &*c.func else {
                return;
            };
            let segs: Vec<String> = p
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect();
            let n = segs.len();
            if n < 2 {
                return;
            }
            let ty = if segs[n - 2] == "Self" {
                self.frame.ty.clone()
            } else {
                segs[n - 2].clone()
            };
            if self.code.config_reads.contains_key(&ty) && segs[n - 1] == "load" {
                self.out.configs.insert(ty.clone());
            }
            if self.code.method(&ty, &segs[n - 1]).is_some() {
                let args = c.args.iter().map(|a| self.eval(a)).collect();
                self.walk_method(None, &ty, &segs[n - 1], args);
            }
        }

        fn visit_macro(&mut self, mac: &'ast syn::Macro) {
            if let Ok(args) = mac.parse_body_with(Punctuated::<Expr, Token![,]>::parse_terminated) {
                for a in &args {
                    self.visit_expr(a);
                }
            }
        }
    }

    pub fn render(e: &Expr) -> String {
        tokens(e)
    }
}

// ==========================================================================================
// Reading the template
// ==========================================================================================

/// A resource an IAM statement names, in terms of the template's logical ids.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Res {
    Table(String),
    Index(String, String),
    Queue(String),
    LogGroup(String),
    Any,
    /// Something this test does not understand (shown as written).
    Other(String),
}

impl std::fmt::Display for Res {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Res::Table(t) => write!(f, "table {t}"),
            Res::Index(t, i) => write!(f, "index {i} of table {t}"),
            Res::Queue(q) => write!(f, "queue {q}"),
            Res::LogGroup(g) => write!(f, "log group {g}"),
            Res::Any => write!(f, "\"*\""),
            Res::Other(o) => write!(f, "{o}"),
        }
    }
}

/// `(name, argument)` of an intrinsic function, short (`!GetAtt`) or long (`Fn::GetAtt`).
fn intrinsic(v: &Value) -> Option<(String, &Value)> {
    match v {
        Value::Tagged(t) => Some((
            t.tag.to_string().trim_start_matches('!').to_string(),
            &t.value,
        )),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next()?;
            let k = k.as_str()?;
            Some((k.strip_prefix("Fn::").unwrap_or(k).to_string(), arg))
        }
        _ => None,
    }
}

/// `!GetAtt X.Arn` (either form) -> ("X", "Arn").
fn get_att(v: &Value) -> Option<(String, String)> {
    let (name, arg) = intrinsic(v)?;
    if name != "GetAtt" {
        return None;
    }
    match arg {
        Value::String(s) => {
            let (a, b) = s.split_once('.')?;
            Some((a.to_string(), b.to_string()))
        }
        Value::Sequence(seq) if seq.len() == 2 => {
            Some((seq[0].as_str()?.to_string(), seq[1].as_str()?.to_string()))
        }
        _ => None,
    }
}

fn ref_of(v: &Value) -> Option<String> {
    match intrinsic(v)? {
        (name, Value::String(s)) if name == "Ref" => Some(s.clone()),
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Sequence(s)) => s.iter().collect(),
        Some(other) => vec![other],
        None => vec![],
    }
}

struct Doc {
    doc: Value,
}

impl Doc {
    fn resources(&self) -> &yaml_serde::Mapping {
        self.doc
            .get("Resources")
            .and_then(Value::as_mapping)
            .expect("Resources")
    }

    fn resource(&self, id: &str) -> Option<&Value> {
        self.resources().get(id)
    }

    fn props(&self, id: &str) -> Option<&Value> {
        self.resource(id)?.get("Properties")
    }

    fn type_of(&self, id: &str) -> Option<&str> {
        self.resource(id)?.get("Type")?.as_str()
    }

    fn global(&self, key: &str) -> Option<&Value> {
        self.doc.get("Globals")?.get("Function")?.get(key)
    }

    /// An IAM `Resource` entry as a [`Res`].
    fn iam_resource(&self, v: &Value) -> Res {
        if v.as_str() == Some("*") {
            return Res::Any;
        }
        if let Some((id, attr)) = get_att(v) {
            if attr == "Arn" {
                match self.type_of(&id) {
                    Some("AWS::DynamoDB::Table") => return Res::Table(id),
                    Some("AWS::SQS::Queue") => return Res::Queue(id),
                    Some("AWS::Logs::LogGroup") => return Res::LogGroup(id),
                    _ => {}
                }
            }
        }
        // !Sub ${Table.Arn}/index/Name
        if let Some((name, Value::String(sub))) = intrinsic(v) {
            let index = sub
                .strip_prefix("${")
                .and_then(|rest| rest.split_once("}/index/"))
                .and_then(|(inner, index)| Some((inner.strip_suffix(".Arn")?, index)));
            if let (true, Some((id, index))) = (name == "Sub", index) {
                if self.type_of(id) == Some("AWS::DynamoDB::Table") {
                    return Res::Index(id.to_string(), index.to_string());
                }
            }
        }
        Res::Other(
            yaml_serde::to_string(v)
                .unwrap_or_default()
                .trim()
                .to_string(),
        )
    }
}

/// One problem found, as a sentence naming what and where.
type Problems = Vec<String>;

/// Everything read from the code.
struct CodeModel {
    code: code::Code,
    /// Binary name -> what it does.
    binaries: BTreeMap<String, code::Binary>,
}

/// Reads the code (a few milliseconds; syn's trees are not `Sync`, so each test reads it).
fn code_model() -> CodeModel {
    code_model_with(&|_, text| text)
}

/// Reads the code with `edit(path, text)` applied to each file of functions/core/src.
fn code_model_with(edit: &dyn Fn(&std::path::Path, String) -> String) -> CodeModel {
    let root = repo();
    let code = code::Code::read(&root.join("functions/core/src"), edit);
    let template = Template::from_str(&real_template_text()).expect("template parses");
    let mut binaries = BTreeMap::new();
    for f in &template.functions {
        let main = root.join("functions").join(&f.binary).join("src/main.rs");
        binaries.insert(f.binary.clone(), code.binary(&main));
    }
    CodeModel { code, binaries }
}

/// Runs every check on a template text; returns the problems found.
fn check(text: &str, model: &CodeModel) -> Problems {
    let mut problems = Problems::new();
    let template = match Template::from_str(text) {
        Ok(t) => t,
        Err(e) => return vec![format!("the local runner refuses the template: {e}")],
    };
    let doc = Doc {
        doc: yaml_serde::from_str(text).expect("YAML"),
    };
    check_event_sources(&template, &mut problems);
    check_queues(&template, &doc, &mut problems);
    check_code_reading(model, &mut problems);
    for f in &template.functions {
        let Some(binary) = model.binaries.get(&f.binary) else {
            problems.push(format!(
                "{}: binary {} has no functions/{}/src/main.rs",
                f.logical_id, f.binary, f.binary
            ));
            continue;
        };
        check_environment(f, binary, model, &mut problems);
        check_permissions(&template, &doc, f, binary, &mut problems);
    }
    problems
}

fn check_event_sources(template: &Template, problems: &mut Problems) {
    for f in &template.functions {
        for e in &f.sqs_events {
            if !e.report_batch_item_failures {
                problems.push(format!(
                    "{}: SQS event {} lacks FunctionResponseTypes: [ReportBatchItemFailures], so \
                     Lambda ignores the handler's batchItemFailures and retries whole batches",
                    f.logical_id, e.name
                ));
            }
        }
    }
}

fn check_queues(template: &Template, doc: &Doc, problems: &mut Problems) {
    let dlqs = template.dead_letter_queues();
    let consumed: BTreeSet<&str> = template
        .functions
        .iter()
        .flat_map(|f| f.sqs_events.iter().map(|e| e.queue.as_str()))
        .collect();
    for q in &template.queues {
        let id = q.logical_id.as_str();
        let is_dlq = dlqs.contains(id);
        if !is_dlq && !consumed.contains(id) {
            problems.push(format!(
                "queue {id} is neither consumed by a function nor any queue's dead-letter queue"
            ));
        }
        if consumed.contains(id) {
            match &q.redrive {
                None => problems.push(format!(
                    "queue {id} has no dead-letter queue (RedrivePolicy): a poison message \
                     would be retried until it expires, unseen"
                )),
                Some(r) => {
                    if r.max_receive_count < 5 {
                        problems.push(format!(
                            "queue {id}: maxReceiveCount {} is under 5 (Lambda's advice), so a \
                             throttled or transiently failing message lands in the DLQ",
                            r.max_receive_count
                        ));
                    }
                    let source_retention = q.message_retention_period.unwrap_or(345_600);
                    let dlq_retention = template
                        .queue(&r.dead_letter_queue)
                        .and_then(|d| d.message_retention_period)
                        .unwrap_or(345_600);
                    if dlq_retention < source_retention {
                        problems.push(format!(
                            "DLQ {} keeps messages {dlq_retention} s, less than its source {id} \
                             ({source_retention} s): a message's age carries over, so it could \
                             expire on arrival",
                            r.dead_letter_queue
                        ));
                    }
                }
            }
            // The visibility timeout must cover six attempts of the slowest consumer.
            for f in &template.functions {
                for e in f.sqs_events.iter().filter(|e| e.queue == id) {
                    let needed = 6 * f.timeout_seconds as i64 + e.batching_window_seconds as i64;
                    let visibility = q.visibility_timeout.unwrap_or(30) as i64;
                    if visibility < needed {
                        problems.push(format!(
                            "queue {id}: VisibilityTimeout {visibility} s is under 6 x the \
                             Timeout of {} ({} s) + its batching window ({} s) = {needed} s",
                            f.logical_id, f.timeout_seconds, e.batching_window_seconds
                        ));
                    }
                }
            }
        }
        if is_dlq && !has_dlq_alarm(doc, id) {
            problems.push(format!(
                "DLQ {id} has no CloudWatch alarm on ApproximateNumberOfMessagesVisible with an \
                 alarm action: messages would sit there unseen"
            ));
        }
    }
}

fn has_dlq_alarm(doc: &Doc, dlq: &str) -> bool {
    doc.resources().iter().any(|(_, r)| {
        r.get("Type").and_then(Value::as_str) == Some("AWS::CloudWatch::Alarm")
            && r.get("Properties").is_some_and(|p| {
                p.get("Namespace").and_then(Value::as_str) == Some("AWS/SQS")
                    && p.get("MetricName").and_then(Value::as_str)
                        == Some("ApproximateNumberOfMessagesVisible")
                    && !list(p.get("AlarmActions")).is_empty()
                    && list(p.get("Dimensions")).iter().any(|d| {
                        d.get("Name").and_then(Value::as_str) == Some("QueueName")
                            && d.get("Value").and_then(get_att)
                                == Some((dlq.to_string(), "QueueName".to_string()))
                    })
            })
    })
}

/// Problems in reading the code itself: a call this test cannot attribute must fail it.
fn check_code_reading(model: &CodeModel, problems: &mut Problems) {
    problems.extend(model.code.problems.iter().cloned());
    let reached: BTreeSet<&(String, String)> = model
        .binaries
        .values()
        .flat_map(|b| b.reached.iter())
        .collect();
    for site in &model.code.sdk_sites {
        if site.0.is_empty() {
            problems.push(format!(
                "free function {} calls the SDK; this test follows methods only: make it a \
                 method of the store it belongs to",
                site.1
            ));
        } else if !reached.contains(site) {
            problems.push(format!(
                "{}::{} calls the SDK but no function's main reaches it (dead code, or a call \
                 path this test cannot follow)",
                site.0, site.1
            ));
        }
    }
    let declared = declared_variables();
    for (ty, reads) in &model.code.config_reads {
        match declared.get(ty.as_str()) {
            None => problems.push(format!(
                "configuration {ty} is not in declared_variables() of this test: add it"
            )),
            Some(vars) => {
                let vars: BTreeSet<String> = vars.iter().map(|v| v.to_string()).collect();
                if &vars != reads {
                    problems.push(format!(
                        "{ty}::VARIABLES is {vars:?} but {ty}::load reads {reads:?}"
                    ));
                }
            }
        }
    }
    for (binary, b) in &model.binaries {
        for p in &b.problems {
            problems.push(format!("binary {binary}: {p}"));
        }
        for call in &b.calls {
            if let code::Target::Unresolved(what) = &call.target {
                problems.push(format!(
                    "binary {binary}: {} ({}) acts on `{what}`, which this test cannot trace to \
                     an environment variable",
                    call.action, call.site
                ));
            }
        }
    }
}

fn check_environment(
    f: &local_runner::template::FunctionSpec,
    binary: &code::Binary,
    model: &CodeModel,
    problems: &mut Problems,
) {
    let declared = declared_variables();
    let mut reads: BTreeSet<String> = BTreeSet::new();
    if binary.configs.is_empty() {
        problems.push(format!(
            "{}: its main loads no configuration this test knows",
            f.logical_id
        ));
    }
    for c in &binary.configs {
        if let Some(vars) = declared.get(c.as_str()) {
            reads.extend(vars.iter().map(|v| v.to_string()));
        }
    }
    for v in &model.code.direct_env_reads {
        if !LAMBDA_RESERVED.contains(&v.as_str()) {
            reads.insert(v.clone());
        }
    }
    let set: BTreeSet<&String> = f.environment.keys().collect();
    for v in &reads {
        if !set.contains(v) {
            problems.push(format!(
                "{}: its code reads {v} but its Environment (with Globals) does not set it",
                f.logical_id
            ));
        }
    }
    for v in set {
        if LAMBDA_RESERVED.contains(&v.as_str()) {
            problems.push(format!(
                "{}: sets {v}, which Lambda reserves and sets itself",
                f.logical_id
            ));
        } else if !reads.contains(v) {
            problems.push(format!(
                "{}: sets {v}, which its code never reads",
                f.logical_id
            ));
        }
    }
}

/// The resource an environment variable of a function names, for a call of `action`.
fn env_resource(
    template: &Template,
    f: &local_runner::template::FunctionSpec,
    var: &str,
) -> Result<Res, String> {
    let value = f
        .environment
        .get(var)
        .ok_or_else(|| format!("{var} is not set in its Environment"))?;
    let id = match value {
        EnvValue::Ref(id) => id.clone(),
        EnvValue::GetAtt(id, attr) if attr == "QueueUrl" || attr == "Arn" => id.clone(),
        other => return Err(format!("{var} is {other:?}, not a table or queue")),
    };
    match template.resource_types.get(&id).map(String::as_str) {
        Some("AWS::DynamoDB::Table") => Ok(Res::Table(id)),
        Some("AWS::SQS::Queue") => Ok(Res::Queue(id)),
        other => Err(format!(
            "{var} names {id} ({other:?}), not a table or queue"
        )),
    }
}

fn env_literal(
    template: &Template,
    f: &local_runner::template::FunctionSpec,
    var: &str,
) -> Result<String, String> {
    match f.environment.get(var) {
        Some(EnvValue::Literal(s)) => Ok(s.clone()),
        Some(EnvValue::Ref(p)) if template.parameters.contains_key(p) => template
            .parameter_value(p)
            .map(str::to_string)
            .ok_or_else(|| format!("parameter {p} has no value")),
        Some(other) => Err(format!("{var} is {other:?}, not a name")),
        None => Err(format!("{var} is not set in its Environment")),
    }
}

fn check_permissions(
    template: &Template,
    doc: &Doc,
    f: &local_runner::template::FunctionSpec,
    binary: &code::Binary,
    problems: &mut Problems,
) {
    let id = &f.logical_id;
    let props = doc.props(id).cloned().unwrap_or(Value::Null);

    // What the function needs, and why.
    let mut needed: BTreeMap<(String, Res), String> = BTreeMap::new();
    let mut from_item: BTreeSet<String> = BTreeSet::new();
    for call in &binary.calls {
        let code::Target::Env(var) = &call.target else {
            if call.target == code::Target::FromItem {
                from_item.insert(call.action.clone());
            }
            continue;
        };
        let res = match env_resource(template, f, var) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!(
                    "{id}: its code calls {} ({}) on the resource in {var}, but {e}",
                    call.action, call.site
                ));
                continue;
            }
        };
        let res = match (&call.index, res) {
            (None, r) => r,
            (Some(code::Target::Env(ivar)), Res::Table(t)) => {
                match env_literal(template, f, ivar) {
                    Ok(index) => {
                        let known = template
                            .table(&t)
                            .is_some_and(|spec| spec.gsis.iter().any(|g| g.name == index));
                        if !known {
                            problems.push(format!(
                                "{id}: {ivar} names index {index}, which table {t} does not have"
                            ));
                        }
                        Res::Index(t, index)
                    }
                    Err(e) => {
                        problems.push(format!(
                            "{id}: {} ({}) queries an index but {e}",
                            call.action, call.site
                        ));
                        continue;
                    }
                }
            }
            (Some(other), r) => {
                problems.push(format!(
                    "{id}: {} ({}) on {r} uses an index this test cannot resolve: {other:?}",
                    call.action, call.site
                ));
                continue;
            }
        };
        needed
            .entry((call.action.clone(), res))
            .or_insert_with(|| format!("its code ({})", call.site));
    }
    for action in &from_item {
        if !needed.keys().any(|(a, _)| a == action) {
            problems.push(format!(
                "{id}: its code calls {action} with the table of an item built elsewhere, and \
                 no builder of such an item was found"
            ));
        }
    }
    // What Lambda does with the role.
    match props
        .get("LoggingConfig")
        .and_then(|l| l.get("LogGroup"))
        .and_then(ref_of)
    {
        Some(group) => {
            for a in LOGGING_ACTIONS {
                needed.insert(
                    (a.to_string(), Res::LogGroup(group.clone())),
                    "Lambda writing its logs".into(),
                );
            }
        }
        None => problems.push(format!(
            "{id}: no LoggingConfig.LogGroup naming a log group of the template, so its logs \
             permissions cannot be checked"
        )),
    }
    let tracing = props
        .get("Tracing")
        .or_else(|| doc.global("Tracing"))
        .and_then(Value::as_str)
        == Some("Active");
    if tracing {
        for a in TRACING_ACTIONS {
            needed.insert((a.to_string(), Res::Any), "Tracing: Active".into());
        }
    }
    for e in &f.sqs_events {
        for a in SQS_POLLER_ACTIONS {
            needed.insert(
                (a.to_string(), Res::Queue(e.queue.clone())),
                format!("Lambda polling its event source {}", e.name),
            );
        }
    }

    // What its role grants.
    let mut granted: BTreeMap<(String, Res), String> = BTreeMap::new();
    if props.get("Policies").is_some() {
        problems.push(format!(
            "{id}: has SAM Policies; give it its own Role with explicit statements so its \
             permissions can be checked"
        ));
    }
    let Some((role, attr)) = props.get("Role").and_then(get_att) else {
        problems.push(format!(
            "{id}: has no Role of its own (!GetAtt Role.Arn): SAM would generate one, with \
             AWSLambdaSQSQueueExecutionRole for SQS events (every queue of the account)"
        ));
        return;
    };
    if attr != "Arn" || doc.type_of(&role) != Some("AWS::IAM::Role") {
        problems.push(format!("{id}: Role is not !GetAtt <AWS::IAM::Role>.Arn"));
        return;
    }
    let role_props = doc.props(&role).cloned().unwrap_or(Value::Null);
    if !list(role_props.get("ManagedPolicyArns")).is_empty() {
        problems.push(format!(
            "{id}: role {role} has ManagedPolicyArns, whose statements this test cannot see"
        ));
    }
    let mut documents: Vec<(String, &Value)> = Vec::new();
    for p in list(role_props.get("Policies")) {
        let name = p
            .get("PolicyName")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if let Some(d) = p.get("PolicyDocument") {
            documents.push((format!("{role}/{name}"), d));
        }
    }
    for (pid, r) in doc.resources() {
        let ty = r.get("Type").and_then(Value::as_str);
        if matches!(ty, Some("AWS::IAM::Policy" | "AWS::IAM::ManagedPolicy")) {
            let props = r.get("Properties");
            let roles = list(props.and_then(|p| p.get("Roles")));
            if roles
                .iter()
                .any(|v| ref_of(v).as_deref() == Some(role.as_str()))
            {
                if let Some(d) = props.and_then(|p| p.get("PolicyDocument")) {
                    documents.push((pid.as_str().unwrap_or("?").to_string(), d));
                }
            }
        }
    }
    for (policy, d) in documents {
        for s in list(d.get("Statement")) {
            let sid = s.get("Sid").and_then(Value::as_str).unwrap_or("-");
            let at = format!("{policy}, statement {sid}");
            if s.get("Effect").and_then(Value::as_str) != Some("Allow") {
                problems.push(format!("{id}: {at} is not Effect: Allow"));
                continue;
            }
            if s.get("NotAction").is_some() || s.get("NotResource").is_some() {
                problems.push(format!("{id}: {at} uses NotAction/NotResource"));
            }
            for a in list(s.get("Action")) {
                let a = a.as_str().unwrap_or("?").to_string();
                if a.contains('*') {
                    problems.push(format!("{id}: {at} grants the wildcard action {a}"));
                }
                for r in list(s.get("Resource")) {
                    let res = doc.iam_resource(r);
                    if let Res::Other(o) = &res {
                        problems.push(format!(
                            "{id}: {at}: resource {o} is not understood by this test"
                        ));
                    }
                    if res == Res::Any && !TRACING_ACTIONS.contains(&a.as_str()) {
                        problems.push(format!("{id}: {at} grants {a} on every resource (\"*\")"));
                    }
                    granted.insert((a.clone(), res), at.clone());
                }
            }
        }
    }

    for ((action, res), why) in &needed {
        if !granted.contains_key(&(action.clone(), res.clone())) {
            problems.push(format!(
                "{id}: needs {action} on {res} (for {why}) but its role {role} does not grant it"
            ));
        }
    }
    for ((action, res), at) in &granted {
        if !needed.contains_key(&(action.clone(), res.clone())) {
            problems.push(format!(
                "{id}: {at} grants {action} on {res}, which neither its code nor Lambda uses"
            ));
        }
    }
}

fn report(problems: &Problems) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ==========================================================================================
// Tests
// ==========================================================================================

#[test]
fn when_checking_the_real_template_should_find_no_problem() {
    let problems = check(&real_template_text(), &code_model());
    assert!(
        problems.is_empty(),
        "template.yaml has {} problem(s):\n{}",
        problems.len(),
        report(&problems)
    );
}

/// The reading of the code finds what the handlers are known to do: a guard against the
/// interpreter silently finding nothing. `SHOW_CALLS=1 cargo test -p saga-tests --test
/// template_policy reading -- --nocapture` prints every call it found, per binary.
#[test]
fn when_reading_the_code_should_find_each_functions_aws_calls() {
    let model = &code_model();
    if std::env::var_os("SHOW_CALLS").is_some() {
        for (b, bin) in &model.binaries {
            for c in &bin.calls {
                println!(
                    "{b}: {} {:?} {:?} @ {}",
                    c.action, c.target, c.index, c.site
                );
            }
            println!("{b}: configs {:?}", bin.configs);
        }
        println!("sites {:?}", model.code.sdk_sites);
        println!("env {:?}", model.code.direct_env_reads);
    }
    let calls = |binary: &str| -> BTreeSet<(String, String, Option<String>)> {
        model.binaries[binary]
            .calls
            .iter()
            .filter_map(|c| match (&c.target, &c.index) {
                (code::Target::Env(v), None) => Some((c.action.clone(), v.clone(), None)),
                (code::Target::Env(v), Some(code::Target::Env(i))) => {
                    Some((c.action.clone(), v.clone(), Some(i.clone())))
                }
                _ => None,
            })
            .collect()
    };
    let has = |binary: &str, action: &str, var: &str| {
        assert!(
            calls(binary).contains(&(action.to_string(), var.to_string(), None)),
            "{binary} should call {action} on {var}; found {:#?}",
            calls(binary)
        );
    };
    // The stock reservation: the idempotency record put, one update per line, and the
    // release's condition check on the reservation record, all inside transactions.
    has("stock", "dynamodb:PutItem", "IDEMPOTENCY_TABLE");
    has("stock", "dynamodb:UpdateItem", "PRODUCTS_TABLE");
    has("stock", "dynamodb:ConditionCheckItem", "IDEMPOTENCY_TABLE");
    has("stock", "sqs:SendMessage", "COORDINATOR_QUEUE_URL");
    // The payment step: claim, complete, release on failure, and the provider's ledger.
    has("payment", "dynamodb:PutItem", "IDEMPOTENCY_TABLE");
    has("payment", "dynamodb:UpdateItem", "IDEMPOTENCY_TABLE");
    has("payment", "dynamodb:DeleteItem", "IDEMPOTENCY_TABLE");
    has("payment", "dynamodb:PutItem", "PAYMENT_LEDGER_TABLE");
    // The API: prices in one batch read, the order and its key's claim in one transaction.
    has("order-api", "dynamodb:BatchGetItem", "PRODUCTS_TABLE");
    has("order-api", "dynamodb:PutItem", "ORDERS_TABLE");
    has("order-api", "sqs:SendMessage", "STOCK_QUEUE_URL");
    has("order-api", "sqs:SendMessage", "PAYMENT_QUEUE_URL");
    has("coordinator", "dynamodb:UpdateItem", "ORDERS_TABLE");
    // The sweeper queries the pending-orders index, never scans.
    assert!(calls("sweeper").contains(&(
        "dynamodb:Query".to_string(),
        "ORDERS_TABLE".to_string(),
        Some("ORDERS_PENDING_INDEX".to_string())
    )));
    assert!(!calls("sweeper")
        .iter()
        .any(|(a, _, _)| a == "dynamodb:Scan"));
    // Nothing the stock function does deletes.
    assert!(!calls("stock")
        .iter()
        .any(|(a, _, _)| a == "dynamodb:DeleteItem"));
}

/// Applies one textual break to the real template, checking it applied.
fn mutated(find: &str, replace: &str, after: Option<&str>) -> String {
    let text = real_template_text();
    let start = after
        .map(|a| {
            text.find(a)
                .unwrap_or_else(|| panic!("template no longer contains {a:?}"))
        })
        .unwrap_or(0);
    let at = text[start..]
        .find(find)
        .unwrap_or_else(|| panic!("template no longer contains {find:?} (after {after:?})"))
        + start;
    format!("{}{}{}", &text[..at], replace, &text[at + find.len()..])
}

fn assert_reported(text: &str, expected: &[&str]) {
    let problems = check(text, &code_model());
    assert!(
        problems
            .iter()
            .any(|p| expected.iter().all(|e| p.contains(e))),
        "expected a problem mentioning {expected:?}; got:\n{}",
        report(&problems)
    );
}

#[test]
fn when_an_sqs_event_lacks_report_batch_item_failures_should_report_it() {
    let text = mutated(
        "            FunctionResponseTypes:\n              - ReportBatchItemFailures\n",
        "",
        Some("  StockFunction:"),
    );
    assert_reported(&text, &["StockFunction", "ReportBatchItemFailures"]);
}

#[test]
fn when_a_queue_has_no_dead_letter_queue_should_report_it() {
    let text = mutated(
        "      RedrivePolicy:\n        deadLetterTargetArn: !GetAtt PaymentDeadLetterQueue.Arn\n        maxReceiveCount: 5\n",
        "",
        None,
    );
    assert_reported(&text, &["queue PaymentQueue", "no dead-letter queue"]);
    let once = mutated(
        "maxReceiveCount: 5",
        "maxReceiveCount: 1",
        Some("  CoordinatorQueue:"),
    );
    assert_reported(&once, &["CoordinatorQueue", "maxReceiveCount 1"]);
}

#[test]
fn when_a_visibility_timeout_is_under_six_times_the_consumer_timeout_should_report_it() {
    // PaymentFunction's Timeout is 15: 6 x 15 + 1 = 91 > 60.
    let text = mutated(
        "VisibilityTimeout: 100",
        "VisibilityTimeout: 60",
        Some("  PaymentQueue:"),
    );
    assert_reported(
        &text,
        &["PaymentQueue", "VisibilityTimeout 60", "PaymentFunction"],
    );
}

#[test]
fn when_a_role_grants_an_action_the_code_does_not_use_should_report_it() {
    let text = mutated(
        "Action: dynamodb:UpdateItem\n                Resource: !GetAtt ProductsTable.Arn",
        "Action:\n                  - dynamodb:UpdateItem\n                  - dynamodb:DeleteItem\n                Resource: !GetAtt ProductsTable.Arn",
        Some("  StockRole:"),
    );
    assert_reported(
        &text,
        &[
            "StockFunction",
            "dynamodb:DeleteItem",
            "table ProductsTable",
            "neither its code nor Lambda uses",
        ],
    );
    // The right action on the wrong table is both unused and missing.
    let text = mutated(
        "Resource: !GetAtt PaymentLedgerTable.Arn",
        "Resource: !GetAtt OrdersTable.Arn",
        Some("  PaymentRole:"),
    );
    assert_reported(
        &text,
        &[
            "PaymentFunction",
            "dynamodb:PutItem",
            "table OrdersTable",
            "neither its code nor Lambda uses",
        ],
    );
    assert_reported(
        &text,
        &[
            "PaymentFunction",
            "needs dynamodb:PutItem on table PaymentLedgerTable",
        ],
    );
}

#[test]
fn when_a_role_lacks_an_action_the_code_uses_should_report_it() {
    let text = mutated(
        "                  - dynamodb:ConditionCheckItem\n",
        "",
        Some("  StockRole:"),
    );
    assert_reported(
        &text,
        &[
            "StockFunction",
            "needs dynamodb:ConditionCheckItem on table IdempotencyTable",
            "StockRole",
        ],
    );
    let text = mutated(
        "                  - sqs:GetQueueAttributes\n",
        "",
        Some("  CoordinatorRole:"),
    );
    assert_reported(
        &text,
        &[
            "CoordinatorFunction",
            "needs sqs:GetQueueAttributes on queue CoordinatorQueue",
        ],
    );
}

/// The other side: the code changes and the template does not.
#[test]
fn when_the_code_starts_making_a_call_its_role_does_not_grant_should_report_it() {
    // The products store reads a product with a Scan instead of a GetItem.
    let model = code_model_with(&|path, text| {
        if path.ends_with("adapters/products.rs") {
            let changed = text.replacen(".get_item()", ".scan()", 1);
            assert_ne!(changed, text, "products.rs no longer calls get_item");
            changed
        } else {
            text
        }
    });
    let problems = check(&real_template_text(), &model);
    let found = |needles: &[&str]| {
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n)))
    };
    assert!(
        found(&[
            "OrderApiFunction",
            "needs dynamodb:Scan on table ProductsTable"
        ]),
        "{}",
        report(&problems)
    );
    assert!(
        found(&[
            "OrderApiFunction",
            "grants dynamodb:GetItem on table ProductsTable",
            "neither"
        ]),
        "{}",
        report(&problems)
    );
    // A call moved into a free function cannot be attributed: that is a failure too.
    let model = code_model_with(&|path, text| {
        if path.ends_with("adapters/sqs.rs") {
            format!("{text}\npub async fn stray(client: aws_sdk_sqs::Client) {{ let _ = client.send_message().send().await; }}\n")
        } else {
            text
        }
    });
    let problems = check(&real_template_text(), &model);
    assert!(
        problems.iter().any(|p| p.contains("free function stray")),
        "{}",
        report(&problems)
    );
}

#[test]
fn when_a_function_environment_lacks_a_variable_its_code_reads_should_report_it() {
    let text = mutated(
        "          PRODUCTS_TABLE: !Ref ProductsTable\n",
        "",
        Some("  StockFunction:"),
    );
    assert_reported(
        &text,
        &["StockFunction", "reads PRODUCTS_TABLE", "does not set it"],
    );
    let text = mutated(
        "          ORDERS_TABLE: !Ref OrdersTable\n",
        "          ORDERS_TABLE: !Ref OrdersTable\n          PRODUCTS_TABLE: !Ref ProductsTable\n",
        Some("  CoordinatorFunction:"),
    );
    assert_reported(
        &text,
        &["CoordinatorFunction", "sets PRODUCTS_TABLE", "never reads"],
    );
}

#[test]
fn when_a_dlq_has_no_alarm_should_report_it() {
    let text = mutated(
        "Value: !GetAtt StockDeadLetterQueue.QueueName",
        "Value: !GetAtt StockQueue.QueueName",
        None,
    );
    assert_reported(&text, &["DLQ StockDeadLetterQueue", "no CloudWatch alarm"]);
}

/// The venv's tool, or a failure telling the user how to install it.
fn tool(name: &str) -> PathBuf {
    let path = repo().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make setup-tools` (infra/scripts/setup.sh tools) to install \
         cfn-lint and aws-sam-cli into .venv",
        path.display()
    );
    path
}

fn run_tool(mut cmd: Command, what: &str) {
    let out = cmd
        .current_dir(repo())
        .env("SAM_CLI_TELEMETRY", "0")
        // Offline checks: no credentials needed or wanted.
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn when_linting_the_template_should_pass_cfn_lint_and_sam_validate() {
    let mut lint = Command::new(tool("cfn-lint"));
    lint.arg("template.yaml");
    run_tool(lint, "cfn-lint template.yaml");
    let mut validate = Command::new(tool("sam"));
    validate.args([
        "validate",
        "--lint",
        "--region",
        "us-east-1",
        "--template-file",
        "template.yaml",
    ]);
    run_tool(validate, "sam validate --lint");
}
