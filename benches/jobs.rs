//! Benchmark of a containment job: one job over every machine carrying a tag
//! (2,000 devices), on three handler instances that share one Azurite (blob
//! and queue services) and one simulated tenant, with the Functions host's
//! queue trigger emulated per instance (`tests/common/queue_host.rs`) and
//! clocks sped up. While the job runs, single restricts arrive at random
//! instances. What each figure means: `docs/benchmarks.md`, "Containment
//! jobs".
//!
//! `cargo bench --bench jobs` runs it in full (about 7 minutes of real time
//! at the default 10x); `BENCH_SMOKE=1 cargo bench --bench jobs` runs 60
//! devices (CI: checks the harness, asserts no timing). `BENCH_JOB_SPEED`
//! sets the clock speed, `BENCH_JOB_DEVICES` the job's size.
//!
//! It exits non-zero when the harness breaks or the job is wrong (a device
//! acted on twice, a stale or merged record acted on, counts that do not add
//! up, the job never ending); it never fails on a timing.

#[path = "../tests/common/queue_host.rs"]
mod queue_host;
mod support;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use queue_host::{HostEvent, QueueHost, QueueOptions, QueueTrigger};
use serde_json::{Value, json};
use support::{Proc, Result, free_port, load_average, wait_ready};

const PER_MINUTE: u64 = 100;
const PER_HOUR: u64 = 1500;
const TAG: &str = "outbreak-bench";
const INSTANCES: usize = 3;

struct Plan {
    smoke: bool,
    devices: usize,
    /// Extra Inactive records under the tag (re-onboarded devices).
    stale: usize,
    /// Extra records merged into a live one.
    merged: usize,
    speed: f64,
    /// Single restricts sent during the job, one every this much sim time.
    interactive_every: Duration,
    interactive_max: usize,
}

impl Plan {
    fn new(smoke: bool) -> Self {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
        let devices =
            env("BENCH_JOB_DEVICES").map_or(if smoke { 60 } else { 2000 }, |d| d as usize);
        Self {
            smoke,
            devices,
            stale: devices / 40,
            merged: devices / 100,
            speed: env("BENCH_JOB_SPEED").unwrap_or(10.0),
            interactive_every: Duration::from_secs(if smoke { 20 } else { 180 }),
            interactive_max: if smoke { 3 } else { 25 },
        }
    }
}

fn main() {
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke");
    let plan = Plan::new(smoke);
    let started = Instant::now();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("benchmark harness failed: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(&plan)) {
        Ok(report) => {
            println!("{report}");
            println!(
                "benchmark {} finished in {:.1} s",
                if smoke { "smoke run" } else { "run" },
                started.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            eprintln!("benchmark harness failed: {e}");
            std::process::exit(1);
        }
    }
}

/// The fastest schedule for `n` POSTs under 100 a minute and 1,500 an hour:
/// each as early as the call `PER_MINUTE` places before it allows (60 s
/// later) and the one `PER_HOUR` places before it (an hour later).
fn minimum_makespan_secs(n: u64) -> u64 {
    let mut slots: Vec<u64> = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(usize::MAX) {
        let mut slot = slots.last().copied().unwrap_or(0);
        for (limit, window) in [(PER_MINUTE, 60), (PER_HOUR, 3600)] {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            if i >= limit {
                slot = slot.max(slots[i - limit] + window);
            }
        }
        slots.push(slot);
    }
    slots.last().copied().unwrap_or(0)
}

async fn run(plan: &Plan) -> Result<String> {
    let load_before = load_average();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let speed = plan.speed.to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;

    let azurite = Azurite::start()?;
    let (sim_proc, sim_port) = support::spawn_simulator(&["--speed", &speed])?;
    let sim = format!("http://127.0.0.1:{sim_port}");
    // The job's devices, and devices outside it for the single restricts.
    let fleet = json!({
        "name": "bench", "tag": TAG, "devices": plan.devices,
        "staleRecords": plan.stale, "mergedRecords": plan.merged,
    });
    let fleet: Value = post_json(&http, &format!("{sim}/_sim/fleets"), &fleet).await?;
    let others = json!({"name": "desk", "tag": "helpdesk", "devices": plan.interactive_max});
    let others: Value = post_json(&http, &format!("{sim}/_sim/fleets"), &others).await?;
    let devices = Devices::of(&fleet, &others)?;

    let storage = azurite.connection_string();
    let env = [
        ("DEFENDER_RATE_CLOCK_SPEED", speed.as_str()),
        ("COORDINATION", "storage"),
        ("AzureWebJobsStorage", storage.as_str()),
        ("COORDINATION_CONTAINER", "bench-jobs"),
    ];
    let settings = {
        let storage = storage.clone();
        move |name: &str| (name == "AzureWebJobsStorage").then(|| storage.clone())
    };
    let host_json: Value = serde_json::from_str(&std::fs::read_to_string(root.join("host.json"))?)?;
    let processors = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = QueueOptions::from_host_json(&host_json, processors)?;
    let worker = QueueTrigger::from_app(root, "job-worker", &settings)?;
    let poison = QueueTrigger::from_app(root, "job-poison", &settings)?;
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        let handler = LoggedHandler::start(sim_port, &env)?;
        let base = format!("http://127.0.0.1:{}", handler.port);
        let hosts = [
            QueueHost::start(&base, worker.clone(), options.clone(), &settings)?,
            QueueHost::start(&base, poison.clone(), options.clone(), &settings)?,
        ];
        instances.push((handler, base, hosts));
    }
    eprintln!(
        "jobs: {} devices under '{TAG}' ({} stale and {} merged records too) on {INSTANCES} instances, clocks at {}x",
        plan.devices, plan.stale, plan.merged, plan.speed
    );

    // Start the job on the first instance (forwarded HTTP, as host.json says).
    let started = Instant::now();
    let body = json!({"machineTag": TAG, "comment": "benchmark outbreak", "callerName": "bench"});
    let response = http
        .post(format!(
            "{}/api/restrict-code-execution/jobs",
            instances[0].1
        ))
        .json(&body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let answer: Value = response.json().await?;
    if status != 202 || answer["devices"].as_u64() != Some(plan.devices as u64) {
        return Err(format!("start-job answered {status}: {answer}").into());
    }
    let job_id = answer["jobId"].as_str().ok_or("no jobId")?.to_owned();

    // Single restricts while the job runs, and its status until it is done.
    // A status answer that is not 200 or 202 (a 503 while storage is slow)
    // is what a polling Logic App retries: counted, not fatal.
    let mut interactive = Vec::new();
    let mut interactive_failures = Vec::new();
    let mut status_errors: BTreeMap<u16, usize> = BTreeMap::new();
    let mut next_interactive = started;
    let mut last_status = Value::Null;
    let give_up = started + Duration::from_secs_f64(3.0 * 3600.0 / plan.speed + 120.0);
    let mut sent = 0;
    let done_at = loop {
        let now = Instant::now();
        if now >= next_interactive && sent < plan.interactive_max {
            let base = &instances[sent % INSTANCES].1;
            match single_restrict(&http, base, &devices.others[sent]).await? {
                Ok(latency) => interactive.push(latency),
                Err(answer) => interactive_failures.push(answer),
            }
            sent += 1;
            next_interactive +=
                Duration::from_secs_f64(plan.interactive_every.as_secs_f64() / plan.speed);
        }
        let response = http
            .get(format!(
                "{}/api/restrict-code-execution/jobs/{job_id}",
                instances[1].1
            ))
            .send()
            .await?;
        let code = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match code {
            200 => {
                last_status = body;
                break Instant::now();
            }
            202 => last_status = body,
            other => *status_errors.entry(other).or_default() += 1,
        }
        if Instant::now() > give_up {
            return Err(format!(
                "the job did not end: {}; status errors {status_errors:?}",
                summary(&last_status)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let makespan_sim = (done_at - started).as_secs_f64() * plan.speed;

    // Let the last deletes land, then stop everything and collect.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut host_events = Vec::new();
    let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
    let mut host_storage = 0;
    let mut storage_operations = 0;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for (mut handler, _, hosts) in instances {
        for host in hosts {
            host_storage += host.storage().total();
            host_events.extend(host.stop().await);
        }
        let (total, kinds) = handler.stop_and_count_storage_operations()?;
        for message in handler
            .warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            *warnings.entry(message).or_default() += 1;
        }
        storage_operations += total;
        for (kind, n) in kinds {
            *by_kind.entry(kind).or_default() += n;
        }
    }
    let log: Vec<Value> = get_json(&http, &format!("{sim}/_sim/requests")).await?;
    let actions: Vec<Value> = get_json(&http, &format!("{sim}/_sim/actions")).await?;
    drop(sim_proc);
    drop(azurite);

    let checks = devices.check(&actions, &last_status)?;
    let calls = Calls::of(&log, &devices);
    let timeline = calls.timeline();
    let posts_total = checks.job_posts + sent;
    let minimum = minimum_makespan_secs(plan.devices as u64) as f64;
    let minimum_all = minimum_makespan_secs(posts_total as u64) as f64;
    let mut latencies: Vec<f64> = interactive
        .iter()
        .map(|s| s.as_secs_f64() * plan.speed)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let p99 = latencies
        .get(((latencies.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    let invocations = host_events
        .iter()
        .filter(|e| matches!(e, HostEvent::Invoked { .. }))
        .count();
    for e in &host_events {
        if let HostEvent::Invoked {
            outcome: queue_host::Outcome::Failed { reason, .. },
            ..
        } = e
        {
            let reason: String = reason.chars().take(300).collect();
            *warnings
                .entry(format!("an invocation failed: {reason}"))
                .or_default() += 1;
        }
    }
    let failed_invocations = host_events
        .iter()
        .filter(|e| matches!(e, HostEvent::Released { .. }))
        .count();
    let poisoned = host_events
        .iter()
        .filter(|e| matches!(e, HostEvent::Poisoned { .. }))
        .count();

    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |figure: String, result: String, target: &str, met: Option<bool>| {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        rows.push([figure, result, target.to_owned(), met.to_owned()]);
    };
    let ratio = makespan_sim / minimum.max(1.0);
    row(
        format!(
            "makespan of a job over {} devices by tag, {INSTANCES} instances, clocks at {}x",
            plan.devices, plan.speed
        ),
        format!(
            "{:.1} min simulated ({:.1} s real); the restrict API's minimum for {} POSTs is {:.1} min ({:.1} min with the {} single restricts): ratio {ratio:.3}",
            makespan_sim / 60.0,
            (done_at - started).as_secs_f64(),
            plan.devices,
            minimum / 60.0,
            minimum_all / 60.0,
            sent
        ),
        "≤ 1.1× the minimum",
        (!plan.smoke).then_some(ratio <= 1.1),
    );
    let per_device = calls.job as f64 / plan.devices as f64;
    row(
        "  Defender calls for the job, per device".to_owned(),
        format!(
            "{per_device:.3} ({} calls: {})",
            calls.job,
            calls.describe_job()
        ),
        "≤ 1.3",
        Some(per_device <= 1.3),
    );
    row(
        "  devices acted on twice; actions on stale or merged records".to_owned(),
        format!("{}; {}", checks.duplicates, checks.wrong_record),
        "0; 0",
        Some(checks.duplicates == 0 && checks.wrong_record == 0),
    );
    row(
        "  answers 429 from the simulated Defender".to_owned(),
        calls.throttled.to_string(),
        "0",
        Some(calls.throttled == 0),
    );
    row(
        format!(
            "  single restricts during the job ({}), simulated latency",
            interactive.len()
        ),
        format!(
            "p50 {:.1} s, p99 {p99:.1} s, max {:.1} s",
            latencies.get(latencies.len() / 2).copied().unwrap_or(0.0),
            latencies.last().copied().unwrap_or(0.0)
        ),
        "p99 within one minute window (≤ 60 s)",
        (!plan.smoke).then_some(p99 <= 60.0),
    );
    let kinds = by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    row(
        "  storage operations per device (the handlers')".to_owned(),
        format!(
            "{:.1} ({storage_operations}: {kinds})",
            storage_operations as f64 / plan.devices as f64
        ),
        "reported",
        None,
    );
    row(
        "  storage operations per device (the host's queue trigger)".to_owned(),
        format!(
            "{:.1} ({host_storage}: receives including empty polls, deletes, visibility updates, poison sends); {invocations} invocations, {failed_invocations} failed (delivered again), {poisoned} poisoned",
            host_storage as f64 / plan.devices as f64
        ),
        "reported",
        None,
    );
    row(
        "  job status at the end".to_owned(),
        summary(&last_status),
        "every device has its outcome",
        Some(checks.counts_add_up),
    );

    let mut out = format!(
        "\n## Containment job{}\n\n",
        if plan.smoke {
            " (SMOKE RUN: small job, not comparable with the targets)"
        } else {
            ""
        }
    );
    out.push_str(&format!(
        "Load average (1 min) before the run {load_before}, after it {}\n\n| figure | result | target | met |\n|---|---|---|---|\n",
        load_average()
    ));
    for [a, b, c, d] in rows {
        out.push_str(&format!("| {a} | {b} | {c} | {d} |\n"));
    }
    out.push_str(&format!(
        "\nThe job's restricts Defender accepted, per simulated minute after the first one \
         (the jobs' share allows {} a minute and {} an hour), and the answers 429:\n\n{timeline}\n",
        restrict_code_execution::defender::budget::Share::of(
            PER_MINUTE as usize,
            restrict_code_execution::defender::budget::Share::JOBS.minute
        ),
        restrict_code_execution::defender::budget::Share::of(
            PER_HOUR as usize,
            restrict_code_execution::defender::budget::Share::JOBS.hour
        ),
    ));
    if !warnings.is_empty() {
        out.push_str("\nThe handlers' warnings and errors:\n\n");
        for (message, n) in &warnings {
            out.push_str(&format!("- {n} × {message}\n"));
        }
    }
    if !checks.ok() {
        return Err(format!("the job went wrong:\n{out}").into());
    }
    Ok(out)
}

fn summary(status: &Value) -> String {
    format!("status {} counts {}", status["status"], status["counts"])
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value> {
    let response = http.post(url).json(body).send().await?;
    let status = response.status();
    let value: Value = response.json().await?;
    if !status.is_success() {
        return Err(format!("POST {url}: {status} {value}").into());
    }
    Ok(value)
}

async fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> Result<T> {
    let response = http.get(url).send().await?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: {}", response.status()).into());
    }
    Ok(response.json().await?)
}

/// One single restrict (forwarded HTTP): its real latency, or the answer
/// that was not a success.
async fn single_restrict(
    http: &reqwest::Client,
    base: &str,
    device: &Device,
) -> Result<std::result::Result<Duration, String>> {
    let sent = Instant::now();
    let response = http
        .post(format!("{base}/api/restrict-code-execution"))
        .json(&json!({"deviceId": device.aad, "callerName": "helpdesk"}))
        .send()
        .await?;
    let latency = sent.elapsed();
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    if !(200..300).contains(&status) {
        return Ok(Err(format!("{status} {}", body["code"])));
    }
    Ok(Ok(latency))
}

#[derive(Debug, Clone)]
struct Device {
    aad: String,
    machine: String,
}

/// The job's devices (live, stale and merged records) and the others.
struct Devices {
    job: Vec<Device>,
    /// Machine ids of records the job must never act on.
    not_to_act_on: HashSet<String>,
    others: Vec<Device>,
}

impl Devices {
    fn of(fleet: &Value, others: &Value) -> Result<Self> {
        let list = |v: &Value| -> Result<Vec<Value>> {
            Ok(v["devices"]
                .as_array()
                .ok_or("no devices in the fleet answer")?
                .clone())
        };
        let device = |d: &Value| Device {
            aad: d["aadDeviceId"].as_str().unwrap_or_default().to_lowercase(),
            machine: d["machineId"].as_str().unwrap_or_default().to_lowercase(),
        };
        let fleet = list(fleet)?;
        let mut not_to_act_on = HashSet::new();
        for d in &fleet {
            for key in ["staleMachineId", "mergedMachineId"] {
                if let Some(id) = d[key].as_str() {
                    not_to_act_on.insert(id.to_lowercase());
                }
            }
        }
        Ok(Self {
            job: fleet.iter().map(device).collect(),
            not_to_act_on,
            others: list(others)?.iter().map(device).collect(),
        })
    }

    fn check(&self, actions: &[Value], status: &Value) -> Result<Checks> {
        let mut per_machine: HashMap<String, usize> = HashMap::new();
        for action in actions {
            if action["type"] == "RestrictCodeExecution" {
                let id = action["machineId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase();
                *per_machine.entry(id).or_default() += 1;
            }
        }
        let job: HashSet<&str> = self.job.iter().map(|d| d.machine.as_str()).collect();
        let duplicates = per_machine.values().filter(|n| **n > 1).count();
        let wrong_record = per_machine
            .keys()
            .filter(|m| self.not_to_act_on.contains(*m))
            .count();
        let job_posts = per_machine
            .iter()
            .filter(|(m, _)| job.contains(m.as_str()))
            .map(|(_, n)| *n)
            .sum();
        let restricted = per_machine
            .keys()
            .filter(|m| job.contains(m.as_str()))
            .count();
        let counts = &status["counts"];
        let n = |k: &str| counts[k].as_u64().unwrap_or(0);
        let total = n("total");
        let counts_add_up = status["status"] == "done"
            && total == self.job.len() as u64
            && n("queued") == 0
            && restricted == self.job.len()
            && n("requested") + n("already_pending") + n("already_in_state") == total;
        Ok(Checks {
            duplicates,
            wrong_record,
            job_posts,
            counts_add_up,
        })
    }
}

struct Checks {
    duplicates: usize,
    wrong_record: usize,
    job_posts: usize,
    counts_add_up: bool,
}

impl Checks {
    fn ok(&self) -> bool {
        self.duplicates == 0 && self.wrong_record == 0 && self.counts_add_up
    }
}

/// Defender calls from the simulator's log, the job's apart from the single
/// restricts' (those name a device outside the job).
struct Calls {
    job: usize,
    by_kind: BTreeMap<String, usize>,
    throttled: usize,
    /// Each 429: the API and when it arrived (simulated Unix ms).
    throttled_at: Vec<(String, i64)>,
    /// When each of the job's accepted restricts arrived (simulated Unix ms).
    restricts_at: Vec<i64>,
}

impl Calls {
    fn of(log: &[Value], devices: &Devices) -> Self {
        let others: Vec<&str> = devices
            .others
            .iter()
            .flat_map(|d| [d.aad.as_str(), d.machine.as_str()])
            .collect();
        let mut calls = Self {
            job: 0,
            by_kind: BTreeMap::new(),
            throttled: 0,
            throttled_at: Vec::new(),
            restricts_at: Vec::new(),
        };
        for r in log {
            let path = r["path"].as_str().unwrap_or_default();
            if !path.starts_with("/api/") {
                continue;
            }
            let method = r["method"].as_str().unwrap_or_default();
            let kind = restrict_code_execution::defender::Endpoint::parse(method, path)
                .map_or_else(
                    || format!("{method} {path}"),
                    |(e, _)| e.bucket().to_owned(),
                );
            let arrived = r["arrivedMs"].as_i64().unwrap_or(0);
            if r["status"] == 429 {
                calls.throttled += 1;
                calls.throttled_at.push((kind.clone(), arrived));
            }
            let text =
                format!("{path} {}", r["filter"].as_str().unwrap_or_default()).to_lowercase();
            if others.iter().any(|o| text.contains(o)) {
                continue;
            }
            calls.job += 1;
            if kind == "restrict" && r["status"].as_u64().is_some_and(|s| s < 300) {
                calls.restricts_at.push(arrived);
            }
            *calls.by_kind.entry(kind).or_default() += 1;
        }
        calls
    }

    /// The job's accepted restricts per simulated minute after the first
    /// (minutes without any left out), then each 429 by API and minute:
    /// where the schedule fell behind its share, and what was throttled.
    fn timeline(&self) -> String {
        let Some(&first) = self.restricts_at.iter().min() else {
            return "(no restrict)".to_owned();
        };
        let minute = |ms: i64| (ms - first).div_euclid(60_000);
        let mut per_minute: BTreeMap<i64, usize> = BTreeMap::new();
        for &at in &self.restricts_at {
            *per_minute.entry(minute(at)).or_default() += 1;
        }
        let mut text = per_minute
            .iter()
            .map(|(m, n)| format!("{m}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let last = self.restricts_at.iter().max().copied().unwrap_or(first);
        // Defender's windows slide: the most in any 60 simulated seconds.
        let mut sorted = self.restricts_at.clone();
        sorted.sort_unstable();
        let busiest = sorted
            .iter()
            .enumerate()
            .map(|(i, &at)| sorted[i..].partition_point(|&t| t < at + 60_000))
            .max()
            .unwrap_or(0);
        text.push_str(&format!(
            "; the last at {:.1} min; the most in any 60 s: {busiest}.",
            (last - first) as f64 / 60_000.0
        ));
        if !self.throttled_at.is_empty() {
            let throttled = self
                .throttled_at
                .iter()
                .map(|(kind, at)| format!("{kind} at {:.2}", (at - first) as f64 / 60_000.0))
                .collect::<Vec<_>>()
                .join(", ");
            text.push_str(&format!(" 429s (minute): {throttled}."));
        }
        text
    }

    fn describe_job(&self) -> String {
        self.by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Azurite's blob and queue services (one process, in memory); killed when
/// dropped.
struct Azurite {
    _proc: Proc,
    blob: u16,
    queue: u16,
}

impl Azurite {
    fn start() -> Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/azurite.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            return Err("scripts/azurite.sh failed: is npm installed?".into());
        }
        let blob_launcher = String::from_utf8(out.stdout)?.trim().to_owned();
        let launcher = Path::new(&blob_launcher).with_file_name("azurite");
        let (blob, queue) = (free_port()?, free_port()?);
        let workspace = std::env::temp_dir().join(format!("bench-jobs-azurite-{blob}"));
        std::fs::create_dir_all(&workspace)?;
        let child = Command::new(launcher)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &blob.to_string()])
            .args([
                "--queueHost",
                "127.0.0.1",
                "--queuePort",
                &queue.to_string(),
            ])
            .args(["--tableHost", "127.0.0.1", "--tablePort", "0"])
            .args([
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--silent",
            ])
            .current_dir(&workspace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let proc = Proc { child };
        let until = Instant::now() + Duration::from_secs(60);
        for port in [blob, queue] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > until {
                    return Err("Azurite did not listen".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Self {
            _proc: proc,
            blob,
            queue,
        })
    }

    fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};\
             BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;\
             QueueEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            restrict_code_execution::coordination::settings::AZURITE_KEY,
            self.blob,
            self.queue
        )
    }
}

/// A handler whose `coordination totals` log line is kept, and its warnings
/// and errors.
struct LoggedHandler {
    proc: Proc,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl LoggedHandler {
    fn start(sim_port: u16, extra: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let mut child = support::handler_command(sim_port, port, extra)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no handler stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let (keep, warn) = (lines.clone(), warnings.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.contains("coordination totals") {
                    keep.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                } else if line.contains("\"level\":\"WARN\"")
                    || line.contains("\"level\":\"ERROR\"")
                {
                    let message = serde_json::from_str::<Value>(&line)
                        .ok()
                        .and_then(|v| {
                            let message = v["message"].as_str()?.to_owned();
                            let why = ["reason", "error"]
                                .iter()
                                .find_map(|k| v[*k].as_str())
                                .map(|w| format!(": {}", w.chars().take(200).collect::<String>()))
                                .unwrap_or_default();
                            Some(format!("{message}{why}"))
                        })
                        .unwrap_or(line);
                    warn.lock().unwrap_or_else(|e| e.into_inner()).push(message);
                }
            }
        });
        let mut proc = Proc { child };
        wait_ready(&mut proc, port)?;
        Ok(Self {
            proc,
            port,
            lines,
            warnings,
        })
    }

    /// SIGTERM, wait, and read the storage operations it logged at exit.
    fn stop_and_count_storage_operations(&mut self) -> Result<(u64, BTreeMap<String, u64>)> {
        let pid = self.proc.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.proc.child.wait()?;
        std::thread::sleep(Duration::from_millis(200));
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let line = lines
            .last()
            .ok_or("the handler logged no coordination totals")?;
        let value: Value = serde_json::from_str(line)?;
        let field = |name: &str| {
            value
                .pointer(&format!("/fields/{name}"))
                .or_else(|| value.get(name))
                .cloned()
        };
        let total = field("storage_operations")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| format!("no storage_operations in {line}"))?;
        let by_kind = field("by_kind")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pair| {
                let (kind, n) = pair.split_once('=')?;
                Some((kind.to_owned(), n.parse().ok()?))
            })
            .collect();
        Ok((total, by_kind))
    }
}
