//! The `custos` binary: `custos serve` runs a node; the other subcommands call a node's API.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use custos_api::client::Client;
use custos_api::types::{DeliveryStatus, LinkRequest, RegisterEntity, RuleSpec, TypeSpec};
use custos_api::webhook::Secret;
use custos_api::CloudEvent;
use custos_node::config::{Config, Overrides, DEFAULT_TOML};
use custos_node::server::{self, Listeners};

// jemalloc returns the memory of passivated profiles to the system; glibc's malloc kept it
// (50,000 customers, every profile passivated: 957-1,048 MiB resident, 275-366 with jemalloc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Custos: the customer's data vault.
#[derive(Debug, Parser)]
#[command(name = "custos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (default: one node, ./custos-data, API on 127.0.0.1:7700).
    Serve(ServeArgs),
    /// Print the commented default configuration file.
    Config,
    /// Run a reference entity (airline, hotel or car-rental): sign-in page, OAuth 2.0 server
    /// with PKCE, a command receiver that verifies signatures, and event emission.
    EntitySim(EntitySimArgs),
    /// Evaluate the rule recommender on the IFTTT rules dataset (rules, trainset, testset).
    RecommendEval {
        /// Directory with the dataset's `rules`, `trainset` and `testset` files.
        #[arg(long)]
        data: PathBuf,
        /// Ignore co-occurrences kept by fewer users than this (1 = as published baselines).
        #[arg(long, default_value_t = 1)]
        min_support: u32,
        /// Evaluate at most this many test users (0 = all).
        #[arg(long, default_value_t = 0)]
        max_users: usize,
    },
    /// Operate the cluster: status, node removal.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Operator and customer calls against a running node.
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes (address, up or down), groups (voters, leader, term, commit and apply index, lag).
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Move a node's replicas and leaderships away, then remove it from the cluster.
    Remove {
        #[command(flatten)]
        target: Target,
        /// The node's id.
        node: u64,
        /// Seconds to wait for the removal to finish (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Configuration file (TOML); see `custos config`.
    #[arg(long, env = "CUSTOS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client API address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Peer (Raft) address.
    #[arg(long)]
    peer_listen: Option<std::net::SocketAddr>,
    /// Allow delivering commands to loopback and private addresses.
    #[arg(long)]
    allow_private_targets: bool,
    /// This node's id (default: assigned when joining, 1 for a first node).
    #[arg(long)]
    node_id: Option<u64>,
    /// The peer address of a member of the cluster to join (repeat for several).
    #[arg(long)]
    join: Vec<String>,
    /// The peer address other nodes reach this one at (default: the bound peer address).
    #[arg(long)]
    peer_advertise: Option<String>,
    /// Log format: human or json.
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(Debug, Args)]
struct EntitySimArgs {
    /// airline, hotel, car-rental, air-contact or hotel-contact (contact centres).
    #[arg(long)]
    preset: String,
    /// Where to serve.
    #[arg(long, default_value = "127.0.0.1:7800")]
    listen: std::net::SocketAddr,
    /// The vault's client API (for registering and sending events).
    #[arg(long, env = "CUSTOS_URL", default_value = "http://127.0.0.1:7700")]
    vault: String,
    /// The entity's `whsec_` secret (or use --register).
    #[arg(long, env = "CUSTOS_ENTITY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Register with the vault (admin token from --token / CUSTOS_TOKEN or
    /// ./custos-data/admin-token) and use the secret it issues.
    #[arg(long)]
    register: bool,
    /// Admin token for --register.
    #[arg(long, env = "CUSTOS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The vault's client secret at this entity's OpenID provider (default: a new random one,
    /// handed to the vault by --register).
    #[arg(long, env = "CUSTOS_SIM_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Write {"addr": ...} here once serving (tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Target {
    /// The node's client API.
    #[arg(
        long,
        env = "CUSTOS_URL",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    url: String,
    /// Bearer token (default: ./custos-data/admin-token).
    #[arg(long, env = "CUSTOS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Register an entity from a JSON file (the body of POST /v1/entities), or from flags.
    RegisterEntity {
        #[command(flatten)]
        target: Target,
        /// JSON file with the registration.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Entity id.
        #[arg(long)]
        id: Option<String>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Command endpoint.
        #[arg(long)]
        command_url: Option<String>,
        /// Event types it sends (repeat).
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Command types it accepts (repeat).
        #[arg(long = "command-type")]
        command_types: Vec<String>,
    },
    /// List entities.
    Entities {
        #[command(flatten)]
        target: Target,
    },
    /// Create a customer; prints its id and token.
    CreateCustomer {
        #[command(flatten)]
        target: Target,
    },
    /// Link an entity to a customer.
    Link {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
        /// Entity id.
        entity: String,
        /// The customer's subject id at the entity.
        subject: String,
    },
    /// Save a rule from a JSON file (the body of POST /v1/customers/{id}/rules).
    AddRule {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
        /// JSON file with the rule.
        file: PathBuf,
    },
    /// Run a rule (JSON file) on a past event or sample data; prints the command it would
    /// send. Nothing is saved or sent.
    TryRule {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
        /// JSON file with the rule.
        file: PathBuf,
        /// A past event of the customer's, by id.
        #[arg(long)]
        event_id: Option<String>,
        /// A JSON file with sample event data (when no --event-id).
        #[arg(long)]
        sample: Option<PathBuf>,
    },
    /// List a customer's rules.
    Rules {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
    },
    /// Show a customer's activity, newest first.
    Activity {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
        /// How many items (1..=500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Items older than this cursor: the `next` of the page before.
        #[arg(long)]
        before: Option<String>,
    },
    /// Print everything the vault holds about a customer (JSON).
    Export {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
    },
    /// Erase a customer and everything held about it, on every replica.
    Erase {
        #[command(flatten)]
        target: Target,
        /// Customer id.
        customer: String,
    },
    /// List deliveries (default: failed).
    Deliveries {
        #[command(flatten)]
        target: Target,
        /// pending, delivered, failed or cancelled.
        #[arg(long, default_value = "failed")]
        status: String,
    },
    /// Replay a failed delivery, or retry a pending one now.
    Replay {
        #[command(flatten)]
        target: Target,
        /// Command id.
        command_id: String,
    },
    /// Send a signed event as an entity would, from a CloudEvent JSON file.
    SendEvent {
        #[command(flatten)]
        target: Target,
        /// The entity's `whsec_` secret.
        #[arg(long, env = "CUSTOS_ENTITY_SECRET", hide_env_values = true)]
        secret: String,
        /// CloudEvent JSON file.
        file: PathBuf,
    },
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Everything the node writes (RocksDB files, snapshots, tokens, secrets) is its owner's
    // alone: password hashes, personal data and signing secrets live there.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let overrides = Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        listen: args.listen,
        peer_listen: args.peer_listen,
        allow_private_targets: args.allow_private_targets.then_some(true),
        log_format: args.log_format,
        join: (!args.join.is_empty()).then_some(args.join),
        peer_advertise: args.peer_advertise,
    };
    let config = Config::load(args.config, &overrides)?;
    custos_node::telemetry::init_logging(&config.log_format, &config.log_level);
    let json = config.log_format == "json";
    let served = Listeners::bind(&config)
        .with_context(|| format!("binding {} and {}", config.listen, config.peer_listen))
        .and_then(|listeners| {
            actix_rt::System::new()
                .block_on(server::run(config, listeners, shutdown_signal()))
                .map_err(anyhow::Error::from)
        });
    match served {
        // Under JSON logs every line on stderr is JSON, the reason a start failed included.
        Err(e) if json => {
            tracing::error!(error = %format!("{e:#}"), "custos stopped");
            std::process::exit(1);
        }
        other => other,
    }
}

fn entity_sim(args: EntitySimArgs) -> anyhow::Result<()> {
    use custos_node::entity_sim::{self, Sim};
    custos_node::telemetry::init_logging("human", "info");
    let preset = entity_sim::preset(&args.preset).with_context(|| {
        format!(
            "no preset {:?}: use airline, hotel, car-rental, air-contact or hotel-contact",
            args.preset
        )
    })?;
    let secret = match &args.secret {
        Some(s) => Some(Secret::parse(s).map_err(|e| anyhow::anyhow!("secret: {e}"))?),
        None => None,
    };
    let listener = std::net::TcpListener::bind(args.listen)?;
    let addr = listener.local_addr()?;
    let mut sim = Sim::new(
        preset,
        &format!("http://{addr}"),
        secret,
        Some(args.vault.clone()),
    );
    if let Some(s) = &args.client_secret {
        sim = sim.with_client_secret(s);
    }
    let sim = actix_web::web::Data::new(sim);
    actix_rt::System::new().block_on(async move {
        let data = sim.clone();
        // Serving before registering: the vault reads the simulator's OpenID metadata while it
        // registers it.
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .configure(entity_sim::configure)
        })
        .workers(1)
        .listen(listener)?
        .run();
        let serving = actix_rt::spawn(server);
        if args.register {
            let token = match args.token.clone() {
                Some(t) => t,
                None => std::fs::read_to_string("custos-data/admin-token")
                    .map(|t| t.trim().to_owned())
                    .context("--register needs --token / CUSTOS_TOKEN")?,
            };
            entity_sim::register(&sim, &args.vault, &token)
                .await
                .map_err(|e| anyhow::anyhow!("registering with {}: {e}", args.vault))?;
        }
        if let Some(f) = &args.ready_file {
            std::fs::write(f, serde_json::json!({"addr": addr.to_string()}).to_string())?;
        }
        println!("{} ({}) at http://{addr}", preset.name, preset.id);
        for (u, p, s) in preset.users {
            println!("  account {u} / {p} (subject {s})");
        }
        serving.await??;
        Ok(())
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn client(target: &Target) -> anyhow::Result<Client> {
    let token = match &target.token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string("custos-data/admin-token")
            .map(|t| t.trim().to_owned())
            .context("no --token / CUSTOS_TOKEN, and no ./custos-data/admin-token")?,
    };
    Ok(Client::new(target.url.clone(), Some(token)))
}

fn print<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run_client(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::RegisterEntity {
            target,
            file,
            id,
            name,
            command_url,
            event_types,
            command_types,
        } => {
            let req: RegisterEntity = match file {
                Some(f) => read_json(&f)?,
                None => {
                    let types = |ts: Vec<String>| {
                        ts.into_iter()
                            .map(|t| TypeSpec {
                                type_name: t,
                                schema: None,
                            })
                            .collect()
                    };
                    RegisterEntity {
                        id: id.context("--id or --file")?,
                        name: name.context("--name")?,
                        command_url: command_url.context("--command-url")?,
                        event_types: types(event_types),
                        command_types: types(command_types),
                        oauth: None,
                    }
                }
            };
            print(&client(&target)?.register_entity(&req).await?)
        }
        ClientCommand::Entities { target } => print(&client(&target)?.entities().await?),
        ClientCommand::CreateCustomer { target } => {
            print(&client(&target)?.create_customer().await?)
        }
        ClientCommand::Link {
            target,
            customer,
            entity,
            subject,
        } => print(
            &client(&target)?
                .link(
                    &customer,
                    &LinkRequest {
                        entity_id: entity,
                        subject,
                    },
                )
                .await?,
        ),
        ClientCommand::AddRule {
            target,
            customer,
            file,
        } => {
            let spec: RuleSpec = read_json(&file)?;
            print(&client(&target)?.create_rule(&customer, &spec).await?)
        }
        ClientCommand::TryRule {
            target,
            customer,
            file,
            event_id,
            sample,
        } => {
            let req = custos_api::types::TryRule {
                rule: read_json(&file)?,
                event_id,
                sample_data: sample.as_ref().map(read_json).transpose()?,
            };
            print(&client(&target)?.try_rule(&customer, &req).await?)
        }
        ClientCommand::Rules { target, customer } => {
            print(&client(&target)?.rules(&customer).await?)
        }
        ClientCommand::Activity {
            target,
            customer,
            limit,
            before,
        } => print(
            &client(&target)?
                .activity(&customer, limit, before.as_deref())
                .await?,
        ),
        ClientCommand::Export { target, customer } => {
            print(&client(&target)?.export(&customer).await?)
        }
        ClientCommand::Erase { target, customer } => {
            client(&target)?.erase_customer(&customer).await?;
            println!("erased {customer}");
            Ok(())
        }
        ClientCommand::Deliveries { target, status } => {
            let status: DeliveryStatus = serde_json::from_value(serde_json::Value::String(status))
                .context("status: pending, delivered, failed or cancelled")?;
            print(&client(&target)?.deliveries(status).await?)
        }
        ClientCommand::Replay { target, command_id } => {
            print(&client(&target)?.replay(&command_id).await?)
        }
        ClientCommand::SendEvent {
            target,
            secret,
            file,
        } => {
            let event: CloudEvent = read_json(&file)?;
            let secret = Secret::parse(&secret).map_err(|e| anyhow::anyhow!("secret: {e}"))?;
            let c = Client::new(target.url.clone(), None);
            print(&c.send_event(&secret, &event).await?)
        }
    }
}

fn print_status(s: &custos_api::types::ClusterStatus) {
    println!(
        "cluster {} (answered by node {})",
        s.cluster_id, s.answered_by
    );
    println!(
        "\n{:<5} {:<8} {:<5} {:<24} api",
        "node", "state", "up", "peer"
    );
    for n in &s.nodes {
        let up = if n.up { "up" } else { "down" };
        println!(
            "{:<5} {:<8} {:<5} {:<24} {}",
            n.id, n.state, up, n.peer_addr, n.api_addr
        );
    }
    println!(
        "\n{:<5} {:<7} {:<6} {:<10} {:<10} {:<12} {:<10} replicas (node:applied/lag)",
        "group", "leader", "term", "commit", "last log", "voters", "target"
    );
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for g in &s.groups {
        let replicas: Vec<String> = g
            .replicas
            .iter()
            .map(|r| match (r.applied_index, r.lag) {
                (Some(a), Some(l)) => format!("{}:{a}/{l}", r.node),
                _ => format!("{}:down", r.node),
            })
            .collect();
        println!(
            "{:<5} {:<7} {:<6} {:<10} {:<10} {:<12} {:<10} {}",
            g.id,
            g.leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            g.term,
            g.commit_index,
            g.last_log_index,
            ids(&g.voters),
            ids(&g.target),
            replicas.join(" ")
        );
    }
}

async fn run_cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { target, json } => {
            let s = client(&target)?.cluster_status().await?;
            if json {
                print(&s)
            } else {
                print_status(&s);
                Ok(())
            }
        }
        ClusterCommand::Remove { target, node, wait } => {
            let c = client(&target)?;
            c.remove_node(node).await?;
            println!("node {node} is leaving: its replicas and leaderships move away");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
            if wait == 0 {
                return Ok(());
            }
            loop {
                let s = c.cluster_status().await?;
                let state = s
                    .nodes
                    .iter()
                    .find(|n| n.id == node)
                    .map(|n| n.state.clone());
                if state.as_deref() == Some("removed") {
                    println!("node {node} removed");
                    return Ok(());
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "node {node} is still {state:?} after {wait} s; `custos cluster status` shows where its replicas are"
                );
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::EntitySim(args) => entity_sim(args),
        Command::RecommendEval {
            data,
            min_support,
            max_users,
        } => {
            use custos_node::recommend::eval;
            let dataset = eval::load(&data)?;
            let report = eval::run(
                &dataset,
                &eval::EvalOptions {
                    min_support,
                    max_users,
                },
            );
            print!("{}", report.to_markdown());
            Ok(())
        }
        Command::Client(cmd) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_client(cmd))
        }
        Command::Cluster(cmd) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_cluster(cmd))
        }
    }
}
