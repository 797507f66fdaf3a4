//! The `previewd` command: the server (`serve`) and its kubectl-like client commands.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use previewd::cli::{self, Connection, get::Output};
use previewd::controller::leader::LeaseConfig;
use previewd::controller::link::{LinkConfig, PublicUrl, UrlStyle};
use previewd::controller::{AgentBinary, ControllerConfig};
use previewd::resources::crd;
use previewd::resources::daemon_source::DaemonSourcePolicy;
use previewd::serve::{self, ServeConfig, StoreChoice};

#[derive(Parser)]
#[command(
    name = "previewd",
    version,
    about = "Preview links to ports inside containers, declared as Kubernetes-style objects"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the client commands.
#[derive(clap::Args)]
struct ClientArgs {
    /// The previewd API server.
    #[arg(
        long,
        env = "PREVIEWD_SERVER",
        default_value = "http://127.0.0.1:8001",
        global = true
    )]
    server: String,
    /// Namespace of the objects.
    #[arg(
        short = 'n',
        long,
        env = "PREVIEWD_NAMESPACE",
        default_value = "default",
        global = true
    )]
    namespace: String,
    /// Bearer token of an API served beyond loopback.
    #[arg(
        long,
        env = "PREVIEWD_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreKind {
    Auto,
    Local,
    Kube,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `previewd serve`'s flags.
#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the API listener (Kubernetes API, health checks).
    #[arg(long, env = "PREVIEWD_API_LISTEN", default_value = "127.0.0.1:8001")]
    api_listen: SocketAddr,
    /// Directory of the local YAML store [default: $XDG_STATE_HOME/previewd or ~/.local/state/previewd].
    #[arg(long, env = "PREVIEWD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log line format (filter with RUST_LOG).
    #[arg(long, env = "PREVIEWD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The previewd-agent binary injected into containers [default: beside this executable].
    #[arg(long, env = "PREVIEWD_AGENT_BINARY")]
    agent_binary: Option<PathBuf>,
    /// Port the injected agent listens on inside each container (0: a free one).
    #[arg(long, env = "PREVIEWD_AGENT_PORT", default_value_t = 0)]
    agent_port: u16,
    /// Run the controllers (false: serve only the API, e.g. while another previewd
    /// reconciles, or to exercise the API alone).
    #[arg(long, env = "PREVIEWD_CONTROLLERS", default_value_t = true, action = clap::ArgAction::Set)]
    controllers: bool,
    /// Connect links to loopback ports from inside their container's network namespace
    /// when previewd may (root on the Docker engine's host): the app's own loopback, without
    /// the agent's relay in the way. False, or without the privilege: through the agent.
    #[arg(long, env = "PREVIEWD_ENTER_NETNS", default_value_t = true, action = clap::ArgAction::Set)]
    enter_netns: bool,
    /// Where previewd may not enter namespaces but runs beside the Docker engine: have each
    /// agent connect to loopback ports and hand previewd the connected socket (through a
    /// helper running as previewd's own user), so no relay copies the bytes. False: the
    /// agent relays them.
    #[arg(long, env = "PREVIEWD_SOCKET_HANDOFF", default_value_t = true, action = clap::ArgAction::Set)]
    socket_handoff: bool,
    /// Address of the preview proxy (link URLs point here).
    #[arg(long, env = "PREVIEWD_PROXY_LISTEN", default_value = "127.0.0.1:8002")]
    proxy_listen: SocketAddr,
    /// Milliseconds a proxy client may take to send a request head once it began (hidden:
    /// tests shorten it; slow-header clients get 408 after it).
    #[arg(
        long,
        env = "PREVIEWD_PROXY_HEADER_TIMEOUT_MS",
        default_value_t = 30_000,
        hide = true
    )]
    proxy_header_timeout_ms: u64,
    /// Seconds a proxy client connection may sit without beginning a request (new or kept
    /// alive) before it is closed.
    #[arg(
        long,
        env = "PREVIEWD_PROXY_IDLE_TIMEOUT_SECONDS",
        default_value_t = 15
    )]
    proxy_idle_timeout_seconds: u64,
    /// Seconds a proxy client may send no part of a request body before the request ends.
    #[arg(
        long,
        env = "PREVIEWD_PROXY_BODY_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    proxy_body_timeout_seconds: u64,
    /// Most proxy client connections at once [default: what the open-files limit, raised
    /// to its hard limit at start-up, allows].
    #[arg(long, env = "PREVIEWD_PROXY_MAX_CONNECTIONS")]
    proxy_max_connections: Option<usize>,
    /// Most proxy client connections from one address (0: no such cap; behind a load
    /// balancer every client has its address).
    #[arg(
        long,
        env = "PREVIEWD_PROXY_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 256
    )]
    proxy_max_connections_per_client: usize,
    /// Seconds the proxy waits for a connection to an upstream (a link's
    /// spec.timeouts.connect overrides it), then answers 502.
    #[arg(
        long,
        env = "PREVIEWD_PROXY_CONNECT_TIMEOUT_SECONDS",
        default_value_t = 10
    )]
    proxy_connect_timeout_seconds: u64,
    /// Seconds the proxy waits for an upstream's response head once the request was sent
    /// (a link's spec.timeouts.response overrides it), then answers 504.
    #[arg(
        long,
        env = "PREVIEWD_PROXY_RESPONSE_TIMEOUT_SECONDS",
        default_value_t = 60
    )]
    proxy_response_timeout_seconds: u64,
    /// Wildcard domain of host-routed links (`*.localhost` resolves to loopback).
    #[arg(
        long,
        env = "PREVIEWD_PREVIEW_DOMAIN",
        default_value = "preview.localhost"
    )]
    preview_domain: String,
    /// Form of `status.url`: `{link}.{domain}` hosts, or `/p/{link}/` paths.
    #[arg(
        long,
        env = "PREVIEWD_URL_STYLE",
        value_enum,
        default_value = "subdomain"
    )]
    url_style: UrlStyle,
    /// Also serve links by path (`/p/{name}.{namespace}/`, for resolvers without wildcard
    /// hosts). Path links share one origin, so one preview's pages can read another's data;
    /// `--url-style path` turns this on.
    #[arg(long, env = "PREVIEWD_PATH_URLS", default_value_t = false, action = clap::ArgAction::Set)]
    path_urls: bool,
    /// How users reach the proxy, when not at its listen address (behind an Ingress or a
    /// load balancer): `https://preview.example.com`. Link URLs use it.
    #[arg(long, env = "PREVIEWD_PUBLIC_URL")]
    public_url: Option<PublicUrl>,
    /// Token every API call must carry as `Authorization: Bearer …` (required when
    /// --api-listen is not a loopback address).
    #[arg(long, env = "PREVIEWD_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// A directory whose executables DaemonInjections may name as their daemon
    /// (`spec.daemon.source.hostPath`; repeatable). None by default, and refused with a
    /// Kubernetes API server: previewd copies these files into containers.
    #[arg(
        long = "daemon-source-dir",
        env = "PREVIEWD_DAEMON_SOURCE_DIRS",
        value_delimiter = ','
    )]
    daemon_source_dirs: Vec<PathBuf>,
    /// Host names the API listener also serves when it needs no token (it always serves
    /// localhost, 127.0.0.1, [::1], its listen address and the public URL's host); any other
    /// Host is refused, so a web page on a rebound DNS name cannot reach the API.
    #[arg(long, env = "PREVIEWD_API_ACCEPT_HOSTS", value_delimiter = ',')]
    api_accept_hosts: Vec<String>,
    /// Origins (`https://console.example.com`) whose web pages may call the API; requests
    /// from any other site's page are refused.
    #[arg(long, env = "PREVIEWD_API_ACCEPT_ORIGINS", value_delimiter = ',')]
    api_accept_origins: Vec<String>,
    /// Namespace of the objects the REST shim (/api/daemon-proxy) creates (default:
    /// --namespace, else `default`; it must be a namespace the controllers watch).
    #[arg(long, env = "PREVIEWD_REST_NAMESPACE")]
    rest_namespace: Option<String>,
    /// Longest a REST shim call waits for a daemon or link to be ready, in seconds.
    #[arg(long, env = "PREVIEWD_REST_WAIT_SECONDS", default_value_t = 60)]
    rest_wait_seconds: u64,
    /// Where objects live: `local` (the embedded API over the YAML store), `kube` (a
    /// Kubernetes API server), or `auto` (kube in a pod or with --kubeconfig, else local).
    #[arg(long, env = "PREVIEWD_STORE", value_enum, default_value = "auto")]
    store: StoreKind,
    /// Kubeconfig of the Kubernetes API server (implies --store kube under auto).
    #[arg(long, env = "PREVIEWD_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Reconcile and route this namespace only [default: all namespaces].
    #[arg(long = "namespace", env = "PREVIEWD_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// This replica's identity in leader election [default: $POD_NAME, else host and pid].
    #[arg(long, env = "PREVIEWD_IDENTITY")]
    identity: Option<String>,
    /// Namespace of the leader-election Lease [default: $POD_NAMESPACE, else --namespace,
    /// else default].
    #[arg(long, env = "PREVIEWD_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a leader's lease lasts unrenewed: a crashed leader is replaced after this.
    #[arg(long, env = "PREVIEWD_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds the embedded API keeps Events (kube-apiserver's default is an hour).
    #[arg(long, env = "PREVIEWD_EVENT_TTL_SECONDS", default_value_t = 3600)]
    event_ttl_seconds: u64,
    /// Record every request to the embedded API in this file, one JSON line each (verb,
    /// group, resource: what RBAC would have to allow).
    #[arg(long, env = "PREVIEWD_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Seconds before expiry the leader renews (less than the duration).
    #[arg(long, env = "PREVIEWD_LEASE_GRACE_SECONDS", default_value_t = 5)]
    lease_grace_seconds: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the API (the embedded Kubernetes API over the local YAML store, or
    /// a Kubernetes API server), the preview proxy, the REST shim and the controllers.
    Serve(Box<ServeArgs>),
    /// Print a preview link's token.
    Token {
        /// The PreviewLink's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a preview link's self-authenticating URL (`url?previewd_token=…`).
    Url {
        /// The PreviewLink's name.
        name: String,
        /// Print the path-routed URL, which works with any resolver.
        #[arg(long, conflicts_with = "embed")]
        path: bool,
        /// Print the capability URL to embed in an iframe: it opens the link with no token
        /// and no cookie (it is a credential, like the token).
        #[arg(long)]
        embed: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create or update the objects of a YAML manifest (`-` reads standard input).
    Apply {
        /// Manifest file, or `-`.
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show objects of a kind (plural, singular or short name: pl, di).
    Get {
        /// Kind.
        kind: String,
        /// One object's name.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// List across all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete one object.
    Delete {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the CustomResourceDefinitions (or write them into a directory).
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("previewd"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/previewd"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, not when the future is
/// first polled: as PID 1 in a container, a signal that arrives before its handler exists is
/// ignored, and the container is then killed instead of stopping cleanly.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

fn read_manifest(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let ServeArgs {
                api_listen,
                state_dir,
                log_format,
                agent_binary,
                agent_port,
                controllers,
                enter_netns,
                socket_handoff,
                proxy_listen,
                proxy_header_timeout_ms,
                proxy_idle_timeout_seconds,
                proxy_body_timeout_seconds,
                proxy_max_connections,
                proxy_max_connections_per_client,
                proxy_connect_timeout_seconds,
                proxy_response_timeout_seconds,
                preview_domain,
                url_style,
                path_urls,
                public_url,
                api_token,
                api_accept_hosts,
                api_accept_origins,
                daemon_source_dirs,
                rest_namespace,
                rest_wait_seconds,
                store,
                kubeconfig,
                watch_namespace,
                identity,
                lease_namespace,
                lease_duration_seconds,
                lease_grace_seconds,
                audit_log,
                event_ttl_seconds,
            } = *args;
            let shutdown = shutdown_signal()?;
            init_logging(log_format);
            let local_dir = || match &state_dir {
                Some(d) => Ok(d.clone()),
                None => default_state_dir(),
            };
            let store = match store {
                StoreKind::Local => StoreChoice::Local(local_dir()?),
                StoreKind::Kube => StoreChoice::Kube { kubeconfig },
                StoreKind::Auto => StoreChoice::detect(kubeconfig, local_dir)?,
            };
            let lease = LeaseConfig {
                namespace: lease_namespace
                    .or_else(|| {
                        std::env::var("POD_NAMESPACE")
                            .ok()
                            .filter(|n| !n.is_empty())
                    })
                    .or_else(|| watch_namespace.clone())
                    .unwrap_or_else(|| "default".into()),
                name: LeaseConfig::NAME.into(),
                identity: identity.unwrap_or_else(LeaseConfig::default_identity),
                duration: Duration::from_secs(lease_duration_seconds),
                grace: Duration::from_secs(lease_grace_seconds),
            };
            let rest_namespace = serve::rest_namespace(
                rest_namespace,
                watch_namespace.as_deref().filter(|_| controllers),
            )?;
            let pod_targets = matches!(store, StoreChoice::Kube { .. });
            let daemon_sources = if pod_targets {
                anyhow::ensure!(
                    daemon_source_dirs.is_empty(),
                    "--daemon-source-dir is refused with a Kubernetes API server: there the host \
                     is previewd's own pod, whose files (its service-account token) are not for \
                     whoever may create a DaemonInjection"
                );
                DaemonSourcePolicy::InCluster
            } else {
                DaemonSourcePolicy::directories(&daemon_source_dirs).map_err(anyhow::Error::msg)?
            };
            let controller = ControllerConfig {
                agent_binary: agent_binary.unwrap_or_else(AgentBinary::default_path),
                agent_port,
                namespace: watch_namespace,
                pod_targets,
                daemon_sources: daemon_sources.clone(),
                enter_netns,
                socket_handoff,
            };
            let links = LinkConfig {
                preview_domain,
                url_style,
                proxy_addr: proxy_listen,
                public_url,
                path_urls: path_urls || url_style == UrlStyle::Path,
            };
            let config = ServeConfig {
                api_listen,
                store,
                links,
                controller: controllers.then_some(controller),
                lease,
                api_token,
                api_accept_hosts,
                api_accept_origins,
                daemon_sources,
                rest_namespace,
                rest_wait: Duration::from_secs(rest_wait_seconds),
                audit_log,
                proxy_clients: previewd::proxy::server::ClientTimeouts {
                    header: Duration::from_millis(proxy_header_timeout_ms.max(1)),
                    idle: Duration::from_secs(proxy_idle_timeout_seconds.max(1)),
                    body: Duration::from_secs(proxy_body_timeout_seconds.max(1)),
                },
                proxy_max_connections,
                proxy_max_connections_per_client,
                proxy_timeouts: previewd::proxy::forward::Timeouts {
                    connect: Duration::from_secs(proxy_connect_timeout_seconds.max(1)),
                    response: Duration::from_secs(proxy_response_timeout_seconds.max(1)),
                },
                event_ttl: Duration::from_secs(event_ttl_seconds),
            };
            serve::run(config, shutdown).await?;
        }
        Command::Apply { file, client } => {
            let manifest = read_manifest(&file)?;
            let conn = Connection::new(&client.server, &client.namespace, client.token.as_deref())?;
            for line in cli::apply::apply(&conn, &manifest).await? {
                println!("{line}");
            }
        }
        Command::Get {
            kind,
            name,
            output,
            all_namespaces,
            client,
        } => {
            let conn = Connection::new(&client.server, &client.namespace, client.token.as_deref())?;
            let text = cli::get::get(&conn, &kind, name.as_deref(), all_namespaces, output).await?;
            if text.starts_with("No resources found") {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        }
        Command::Token { name, client } => {
            let conn = Connection::new(&client.server, &client.namespace, client.token.as_deref())?;
            println!("{}", cli::link::token(&conn, &name).await?);
        }
        Command::Url {
            name,
            path,
            embed,
            client,
        } => {
            let conn = Connection::new(&client.server, &client.namespace, client.token.as_deref())?;
            let url = if embed {
                cli::link::embed_url(&conn, &name).await?
            } else {
                cli::link::url(&conn, &name, path).await?
            };
            println!("{url}");
        }
        Command::Delete { kind, name, client } => {
            let conn = Connection::new(&client.server, &client.namespace, client.token.as_deref())?;
            println!("{}", cli::delete::delete(&conn, &kind, &name).await?);
        }
        Command::Crd { write } => match write {
            None => print!("{}", crd::all_yaml()?),
            Some(dir) => {
                for c in crd::all() {
                    let path = dir.join(crd::file_name(&c));
                    std::fs::write(&path, crd::to_yaml(&c)?)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
            }
        },
    }
    Ok(())
}

/// mimalloc: the proxy allocates per request (headers, bodies, futures) on several threads,
/// and glibc's malloc cost it a measurable share of its CPU per request (bench/proxy.sh).
#[global_allocator]
static ALLOCATOR: previewd::allocator::MiMalloc = previewd::allocator::MiMalloc;

/// Keeps this process's memory in 4 KiB pages. mimalloc reserves its arena with
/// `MADV_HUGEPAGE`, so a first touch there faults in 2 MiB and khugepaged later fills freed
/// ranges back into huge pages: `bench/scale.sh` saw RSS grow by 47 MiB, idle, in the two
/// minutes after 10,000 links were deleted, AnonHugePages with it. Done before the runtime
/// starts its threads; without the prctl (an old kernel) previewd runs as before.
fn keep_pages_small() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and changes only this process's
    // flag for transparent huge pages.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// Hands freed memory back to the system every [`previewd::allocator::RETURN_INTERVAL`] for
/// as long as the runtime runs: an idle previewd otherwise keeps what a burst of work freed.
async fn return_freed_memory_while_running() {
    let mut tick = tokio::time::interval(previewd::allocator::RETURN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        previewd::allocator::return_freed_memory();
    }
}

fn main() -> ExitCode {
    keep_pages_small();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.spawn(return_freed_memory_while_running());
    runtime.block_on(async {
        match run(Cli::parse()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
