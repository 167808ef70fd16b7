//! End-to-end benchmark of the release `handler` against the simulator, both
//! as separate processes on loopback. `cargo bench --bench e2e` runs it in
//! full; `BENCH_SMOKE=1 cargo bench --bench e2e` runs a short version that only
//! checks the harness works (CI). What each figure means: `docs/benchmarks.md`.
//!
//! The harness builds nothing at run time: it starts the `handler` binary cargo
//! built for this very run (`CARGO_BIN_EXE_handler`, bench profile = release
//! settings), once as `handler simulator` and once as the custom handler.
//!
//! It exits non-zero when the harness itself does not work (a process does not
//! start, an answer is not the expected one, an action is duplicated); it never
//! fails on a timing.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use support::{HANDLER, Memory, Proc, Result, free_port, load_average, wait_ready};

/// Defender calls the state rules need (README, "Before acting: the device's
/// state") for a lone invocation: find the machine, read its actions, create
/// the action. Answers that need no POST skip the last, and a remembered
/// machine (60 s) or a shared read makes them cheaper still.
const CALLS_TO_ACT: usize = 3;
const CALLS_TO_ACT_WHAT: &str = "find the machine, read its actions, POST";
const CALLS_NO_POST: usize = 2;
const CALLS_NO_POST_WHAT: &str =
    "at most 2: find the machine (remembered for 60 s), read its actions (shared in a round)";
/// The token `handler simulator` issues and accepts.
const SIM_TOKEN: &str = "sim-access-token";
const FUNCTION_PATH: &str = "/api/restrict-code-execution";
/// Defender's per-endpoint limits, which are also the budget's defaults.
const PER_MINUTE: u64 = 100;
const PER_HOUR: u64 = 1500;

/// How much of each measurement to do.
struct Plan {
    smoke: bool,
    /// Which of [`SECTIONS`] to run.
    sections: Vec<String>,
    cold_starts: usize,
    /// Sequential restricts whose overhead is measured.
    overhead: usize,
    /// (concurrency, invocations) for the throughput runs.
    throughput: Vec<(usize, usize)>,
    /// Invocations of the two-call path (device already pending/restricted).
    repeat: (usize, usize),
    /// (invocations, devices) of each burst.
    bursts: Vec<(usize, usize)>,
    /// Clock speed of the simulator and of the handler's rate budget in the
    /// bursts: 10x, because the restrict API's minimum for a few hundred
    /// POSTs is a minute or two, and at higher speeds the handler's own
    /// (real-time) CPU work would be a large share of it.
    burst_speed: f64,
    /// The same for the sustained hour (30x: two minutes of real time).
    sustained_speed: f64,
    /// Distinct devices offered, evenly spread over this many simulated seconds.
    sustained: (usize, u64),
    /// (invocations, devices) of the burst over three instances.
    scaled: (usize, usize),
}

/// The parts of the run, in order.
const SECTIONS: [&str; 5] = ["cold", "steady", "burst", "sustained", "scaled"];

impl Plan {
    fn runs(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }

    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                smoke,
                sections: Vec::new(),
                cold_starts: 5,
                overhead: 200,
                throughput: vec![(1, 200), (16, 1000), (64, 1000)],
                repeat: (64, 1000),
                bursts: vec![(300, 60), (150, 50)],
                burst_speed: 10.0,
                sustained_speed: 30.0,
                sustained: (120, 600),
                scaled: (150, 50),
            }
        } else {
            Self {
                smoke,
                sections: Vec::new(),
                cold_starts: 20,
                overhead: 3000,
                throughput: vec![(1, 3000), (16, 15_000), (64, 20_000)],
                repeat: (64, 20_000),
                bursts: vec![(1000, 200), (750, 250)],
                burst_speed: 10.0,
                sustained_speed: 30.0,
                sustained: (1600, 3600),
                scaled: (750, 250),
            }
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench` (and any filter); this harness has no options.
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke");
    let mut plan = Plan::new(smoke);
    // Positional arguments pick sections: `cargo bench --bench e2e -- burst`.
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for section in &sections {
        if !SECTIONS.contains(&section.as_str()) {
            eprintln!("unknown section {section:?}; expected some of {SECTIONS:?}");
            std::process::exit(2);
        }
    }
    plan.sections = if sections.is_empty() {
        SECTIONS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        sections
    };
    if let Some(speed) = std::env::var("BENCH_BURST_SPEED")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        plan.burst_speed = speed;
    }
    let started = Instant::now();
    match run(&plan) {
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

fn run(plan: &Plan) -> Result<String> {
    let load_before = load_average();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    eprintln!("handler binary: {HANDLER}");

    // Binary size: the file cargo built for this run (bench profile = release).
    let size = std::fs::metadata(HANDLER)?.len();
    rows.push(Row::new(
        if cfg!(debug_assertions) {
            "binary (dev profile, not the release figure)"
        } else {
            "stripped release binary"
        },
        format!("{:.2} MiB ({size} bytes)", mib(size)),
        "< 15 MiB",
        Some(size < 15 * 1024 * 1024),
    ));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    if plan.runs("cold") {
        // Against an idle simulator (start-up makes no upstream call).
        eprintln!("cold start: {} starts", plan.cold_starts);
        let sim = Sim::start(&["--no-rate-limits"])?;
        let cold = cold_starts(&sim, plan.cold_starts)?;
        let (cold_median, cold_max) = (percentile(&cold, 50.0), max(&cold));
        rows.push(Row::new(
            &format!(
                "cold start, spawn to first answered GET / ({} starts)",
                cold.len()
            ),
            format!("median {} ms, max {} ms", ms(cold_median), ms(cold_max)),
            "median < 20 ms",
            Some(cold_median < Duration::from_millis(20)),
        ));
    }
    if plan.runs("steady") {
        runtime.block_on(steady_state(plan, &mut rows, &mut notes))?;
    }
    if plan.runs("burst") {
        for (set, &(invocations, devices)) in (2..).zip(&plan.bursts) {
            runtime.block_on(burst(
                plan,
                set,
                invocations,
                devices,
                &mut rows,
                &mut notes,
            ))?;
        }
    }
    if plan.runs("sustained") {
        runtime.block_on(sustained(plan, &mut rows, &mut notes))?;
    }
    if plan.runs("scaled") {
        runtime.block_on(scaled(plan, &mut rows, &mut notes))?;
    }

    let mut out = String::new();
    out.push_str(&format!(
        "\n## Results{}\n\n",
        if plan.smoke {
            " (SMOKE RUN: small samples, not comparable with the targets)"
        } else {
            ""
        }
    ));
    out.push_str(&machine_line());
    out.push_str(&format!(
        "Load average (1 min) before the run {load_before}, after it {}\n",
        load_average()
    ));
    out.push_str("\n| figure | result | target | met |\n|---|---|---|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.figure,
            row.result,
            row.target,
            match row.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            out.push_str(&format!("- {note}\n"));
        }
    }
    Ok(out)
}

/// Overhead, calls per invocation, throughput and memory: one simulator with
/// rate limits off and one handler with an effectively unlimited budget.
async fn steady_state(plan: &Plan, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let sim = Sim::start(&["--no-rate-limits"])?;
    let handler = Handler::start(
        &sim,
        &[
            ("DEFENDER_RATE_LIMIT_PER_MINUTE", "1000000"),
            ("DEFENDER_RATE_LIMIT_PER_HOUR", "1000000"),
        ],
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = Memory::of(handler.pid())?;

    // Fresh devices: every measured restrict is the first one for its device,
    // so it takes the full path (find, read actions, POST) and answers 201.
    let total_fresh = plan.overhead + plan.throughput.iter().map(|(_, n)| n).sum::<usize>();
    eprintln!("adding {total_fresh} devices to the simulator");
    let devices: Vec<Device> = (0..total_fresh).map(|k| Device::new(1, k)).collect();
    add_machines(sim.port, &devices).await?;

    // Overhead: sequential restricts, each set against the simulator's own
    // time on the same upstream calls.
    eprintln!("overhead: {} sequential restricts", plan.overhead);
    let (overhead_devices, rest) = devices.split_at(plan.overhead);
    sim.clear_log().await?;
    let mut conn = Conn::connect(handler.port).await?;
    let mut latencies = Vec::with_capacity(plan.overhead);
    for device in overhead_devices {
        let started = Instant::now();
        let (status, body) = conn
            .send("POST", FUNCTION_PATH, &restrict_body(device))
            .await?;
        latencies.push(started.elapsed());
        expect_status(status, 201, &body)?;
    }
    let log = sim.log().await?;
    let groups = group_by_invocation(&log, overhead_devices)?;

    // The first invocation fetches the token and opens the connections.
    let first = latencies[0];
    let overheads: Vec<Duration> = latencies
        .iter()
        .zip(&groups)
        .skip(1)
        .map(|(latency, group)| latency.saturating_sub(group.sim_time))
        .collect();
    let e2e: Vec<Duration> = latencies[1..].to_vec();
    let sim_time: Vec<Duration> = groups[1..].iter().map(|g| g.sim_time).collect();
    let p99 = percentile(&overheads, 99.0);
    rows.push(Row::new(
        &format!(
            "overhead per restrict: end-to-end minus simulator time ({} sequential, first excluded)",
            overheads.len()
        ),
        format!(
            "p50 {} ms, p99 {} ms",
            ms(percentile(&overheads, 50.0)),
            ms(p99)
        ),
        "p99 < 1 ms",
        Some(p99 < Duration::from_millis(1)),
    ));
    rows.push(Row::new(
        "  for reference: end-to-end latency / simulator time per restrict",
        format!(
            "e2e p50 {} ms, p99 {} ms; simulator p50 {} ms, p99 {} ms; first invocation {} ms",
            ms(percentile(&e2e, 50.0)),
            ms(percentile(&e2e, 99.0)),
            ms(percentile(&sim_time, 50.0)),
            ms(percentile(&sim_time, 99.0)),
            ms(first)
        ),
        "",
        None,
    ));

    // Upstream calls per invocation, from the same log.
    let tokens_first = groups[0].count(Kind::Token);
    let tokens_after: usize = groups[1..].iter().map(|g| g.count(Kind::Token)).sum();
    rows.push(Row::new(
        "token requests",
        format!(
            "{tokens_first} for the first invocation, {tokens_after} for the {} after it",
            groups.len() - 1
        ),
        "0 after the first",
        Some(tokens_after == 0),
    ));
    let per_kind = kinds_per_invocation(&groups);
    let defender_max = groups.iter().map(Group::defender_calls).max().unwrap_or(0);
    let defender_min = groups.iter().map(Group::defender_calls).min().unwrap_or(0);
    rows.push(Row::new(
        "Defender calls per restrict (201 requested)",
        format!(
            "{} (min {defender_min}, max {defender_max} per invocation)",
            describe_kinds(&per_kind, groups.len())
        ),
        &format!("{CALLS_TO_ACT}: {CALLS_TO_ACT_WHAT}"),
        Some(defender_min == CALLS_TO_ACT && defender_max == CALLS_TO_ACT),
    ));

    // Throughput on fresh devices at each concurrency: every invocation takes
    // the full path and answers 201.
    let processes = [handler.pid(), sim.pid(), std::process::id()];
    let mut offset = 0;
    for &(concurrency, invocations) in &plan.throughput {
        eprintln!("throughput: {invocations} restricts at concurrency {concurrency}");
        let batch = &rest[offset..offset + invocations];
        offset += invocations;
        // The log is not needed here; clearing it keeps the simulator lean.
        sim.clear_log().await?;
        let before = cpu_times(&processes)?;
        let outcome = load(handler.port, concurrency, batch, 201).await?;
        let cpu = cpu_per_invocation(&before, &cpu_times(&processes)?, outcome.invocations);
        rows.push(Row::new(
            &format!(
                "throughput, concurrency {concurrency} ({} restricts on fresh devices: 201, full path)",
                outcome.invocations
            ),
            outcome.describe(&cpu),
            if concurrency == 64 { ">= 5000 inv/s" } else { "" },
            (concurrency == 64).then_some(outcome.per_second() >= 5000.0),
        ));
        if concurrency == 64 {
            notes.push(format!(
                "CPU per invocation at concurrency 64: handler {:.0} µs, simulator {:.0} µs, load \
                 generator {:.0} µs. The three processes share the machine's CPUs; the handler's \
                 one worker thread, on a CPU of its own, would serve about {:.0} inv/s at this cost.",
                cpu[0],
                cpu[1],
                cpu[2],
                1.0e6 / cpu[0]
            ));
        }
    }

    // The path without a POST: the devices of the overhead run again; their
    // restrict is still pending or has succeeded, so nothing is sent.
    let (concurrency, invocations) = plan.repeat;
    eprintln!("throughput: {invocations} repeated restricts at concurrency {concurrency}");
    sim.clear_log().await?;
    let repeats: Vec<Device> = (0..invocations)
        .map(|i| overhead_devices[i % overhead_devices.len()].clone())
        .collect();
    let before = cpu_times(&processes)?;
    let outcome = load(handler.port, concurrency, &repeats, 200).await?;
    let cpu = cpu_per_invocation(&before, &cpu_times(&processes)?, outcome.invocations);
    let repeat_log = sim.log().await?;
    let repeat_calls = repeat_log
        .iter()
        .filter(|r| Kind::of(r) != Kind::Token)
        .count();
    rows.push(Row::new(
        &format!(
            "throughput, concurrency {concurrency}, repeated restrict ({} invocations: 200 already_pending/already_in_state)",
            outcome.invocations
        ),
        outcome.describe(&cpu),
        "",
        None,
    ));
    rows.push(Row::new(
        "Defender calls per repeated restrict (200, nothing sent)",
        format!(
            "{:.2} per invocation ({repeat_calls} for {})",
            repeat_calls as f64 / outcome.invocations as f64,
            outcome.invocations
        ),
        CALLS_NO_POST_WHAT,
        Some(repeat_calls <= CALLS_NO_POST * outcome.invocations),
    ));

    read_cost(&sim, &overhead_devices[0], rows).await?;

    let loaded = Memory::of(handler.pid())?;
    rows.push(Row::new(
        "handler memory (VmRSS idle after start; VmHWM peak over the whole run above)",
        format!(
            "idle {:.1} MiB, peak {:.1} MiB (VmRSS after the load {:.1} MiB)",
            kib_to_mib(idle.rss_kib),
            kib_to_mib(loaded.hwm_kib),
            kib_to_mib(loaded.rss_kib)
        ),
        "peak < 30 MiB",
        Some(loaded.hwm_kib < 30 * 1024),
    ));
    let sim_memory = Memory::of(sim.pid())?;
    notes.push(format!(
        "The simulator's own peak RSS was {:.1} MiB (it keeps every request in its log); it is not \
         part of the handler's figures.",
        kib_to_mib(sim_memory.hwm_kib)
    ));
    drop(handler);
    drop(sim);
    Ok(())
}

/// What one lone invocation's state read costs, read by machine (what the
/// handler sends) or as the tenant's restrict history (what a batch of
/// machines shares), against the tenant the steady runs left behind.
async fn read_cost(sim: &Sim, device: &Device, rows: &mut Vec<Row>) -> Result<()> {
    const SAMPLES: usize = 10;
    let by_machine = [format!(
        "/api/machineactions?$filter=machineId%20eq%20%27{}%27&$top=10000",
        device.machine_id
    )];
    let tenant = [
        "/api/machineactions?$filter=type%20eq%20%27RestrictCodeExecution%27&$top=10000".to_owned(),
        "/api/machineactions?$filter=type%20eq%20%27UnrestrictCodeExecution%27&$top=10000"
            .to_owned(),
    ];
    let mut conn = Conn::to_defender(sim.port).await?;
    let mut measure = async |paths: &[String]| -> Result<(Duration, usize, usize)> {
        let (mut times, mut bytes, mut calls) = (Vec::new(), 0, 0);
        for _ in 0..SAMPLES {
            let started = Instant::now();
            bytes = 0;
            calls = 0;
            for path in paths {
                let mut next = Some(path.clone());
                while let Some(path) = next.take() {
                    let (status, body) = conn.send("GET", &path, b"").await?;
                    expect_status(status, 200, &body)?;
                    calls += 1;
                    bytes += body.len();
                    next = serde_json::from_slice::<Value>(&body)?
                        .get("@odata.nextLink")
                        .and_then(Value::as_str)
                        .and_then(|link| link.find("/api/").map(|at| link[at..].to_owned()));
                }
            }
            times.push(started.elapsed());
        }
        Ok((percentile(&times, 50.0), calls, bytes))
    };
    let (machine_time, machine_calls, machine_bytes) = measure(&by_machine).await?;
    let (tenant_time, tenant_calls, tenant_bytes) = measure(&tenant).await?;
    let actions: Vec<Value> = serde_json::from_slice(&sim.get("/_sim/actions").await?)?;
    rows.push(Row::new(
        &format!(
            "a lone invocation's state read, tenant of {} actions (median of {SAMPLES}, sequential)",
            actions.len()
        ),
        format!(
            "by machine: {machine_calls} call, {} ms, {machine_bytes} bytes; tenant restrict              history: {tenant_calls} calls, {} ms, {tenant_bytes} bytes",
            ms(machine_time),
            ms(tenant_time)
        ),
        "by machine is cheaper (fewer calls and bytes)",
        Some(machine_calls < tenant_calls && machine_bytes < tenant_bytes),
    ));
    Ok(())
}

/// The burst: invocations over distinct devices, all at once, with the default
/// rate budget and the simulator's limits on, both clocks sped up.
async fn burst(
    plan: &Plan,
    set: u64,
    invocations: usize,
    device_count: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let speed = plan.burst_speed.to_string();
    let sim = Sim::start(&["--speed", &speed])?;
    let handler = Handler::start(&sim, &[("DEFENDER_RATE_CLOCK_SPEED", speed.as_str())])?;
    eprintln!("burst: {invocations} invocations over {device_count} devices, clocks at {speed}x");
    let outcome = run_burst(plan, &sim, &[handler.port], set, invocations, device_count).await?;
    outcome.push_rows(
        rows,
        &format!(
            "burst: {invocations} restricts over {device_count} devices at once, default budget, \
             clocks at {}x",
            plan.burst_speed
        ),
        1.10,
    );
    let per_invocation = outcome.calls.defender_accepted() as f64 / invocations as f64;
    rows.push(Row::new(
        "  Defender calls by endpoint (answered 429 by the simulator)",
        format!(
            "{}; {per_invocation:.2} calls per invocation",
            outcome.calls.describe()
        ),
        "0 answered 429; <= 1.3 calls per invocation",
        Some(outcome.calls.throttled() == 0 && per_invocation <= 1.3),
    ));
    if set == 2 {
        notes.push(format!(
            "Burst minimum: under Defender's {PER_MINUTE}/min and {PER_HOUR}/h, the restrict API's \
             last POST can go no earlier than the schedule that sends each one as early as the \
             windows allow; one round of reads (a lone release's latency, measured just before) \
             comes first. The budget keeps each window 1 s longer than Defender's (latency \
             allowance), {:.1}% of a minute.",
            100.0 / 60.0
        ));
    }
    drop(handler);
    drop(sim);
    Ok(())
}

/// What one burst did.
struct BurstOutcome {
    device_count: usize,
    answers: Answers,
    actions: Actions,
    calls: CallCounts,
    makespan: Duration,
    one_round: Duration,
    speed: f64,
}

/// Invocations over fresh devices (set `set`), all at once, each on its own
/// connection like independent webhooks, spread round-robin over `ports`: a
/// device's duplicates (k, k + devices, ...) land on different instances
/// when there are several. A lone release on its own device goes first: the
/// time of one round of lookup and read, which the minimum adds.
async fn run_burst(
    plan: &Plan,
    sim: &Sim,
    ports: &[u16],
    set: u64,
    invocations: usize,
    device_count: usize,
) -> Result<BurstOutcome> {
    let devices: Vec<Device> = (0..device_count).map(|k| Device::new(set, k)).collect();
    add_machines(sim.port, &devices).await?;
    // A release: it draws from the unrestrict budget, so the burst's
    // restrict budget starts empty.
    let lone = Device::new(set + 100, 0);
    add_machines(sim.port, std::slice::from_ref(&lone)).await?;
    let round_started = Instant::now();
    let (status, body) = Conn::connect(ports[0])
        .await?
        .send("POST", FUNCTION_PATH, &release_body(&lone))
        .await?;
    expect_status(status, 201, &body)?;
    let one_round = round_started.elapsed();
    sim.clear_log().await?;

    let started = Instant::now();
    let tasks: Vec<_> = (0..invocations)
        .map(|k| {
            let device = devices[k % devices.len()].clone();
            let port = ports[k % ports.len()];
            tokio::spawn(async move {
                let mut conn = Conn::connect(port).await?;
                let (status, body) = conn
                    .send("POST", FUNCTION_PATH, &restrict_body(&device))
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body, started.elapsed()))
            })
        })
        .collect();
    let mut answers = Answers::default();
    let mut makespan = Duration::ZERO;
    let mut slowest = (Duration::ZERO, 0, Vec::new());
    let mut last_created = Duration::ZERO;
    for task in tasks {
        let (status, body, done) = task.await??;
        makespan = makespan.max(done);
        if done > slowest.0 {
            slowest = (done, status, body.clone());
        }
        if status == 201 {
            last_created = last_created.max(done);
        }
        answers.add(status, &body);
    }
    eprintln!(
        "last 201 after {:.2} s; slowest answer after {:.2} s: {} {}",
        last_created.as_secs_f64(),
        slowest.0.as_secs_f64(),
        slowest.1,
        String::from_utf8_lossy(&slowest.2[..slowest.2.len().min(300)])
    );
    let actions = Actions::of(sim, &lone).await?;
    if actions.duplicates > 0 {
        return Err(format!(
            "the burst created {} duplicate action(s)",
            actions.duplicates
        )
        .into());
    }
    Ok(BurstOutcome {
        device_count,
        answers,
        actions,
        calls: CallCounts::of(&sim.log().await?),
        makespan,
        one_round,
        speed: plan.burst_speed,
    })
}

impl BurstOutcome {
    /// The actions row and the makespan row, against `target` (the ratio to
    /// the restrict API's minimum).
    fn push_rows(&self, rows: &mut Vec<Row>, label: &str, target: f64) {
        let (device_count, answers, actions) = (self.device_count, &self.answers, &self.actions);
        rows.push(Row::new(
            label,
            format!(
                "{} actions created, {} duplicates, {} failures; answers: {}",
                actions.created,
                actions.duplicates,
                answers.failures,
                answers.describe()
            ),
            &format!("{device_count} actions, 0 duplicates, 0 failures"),
            Some(
                actions.created == device_count && actions.duplicates == 0 && answers.failures == 0,
            ),
        ));
        // Defender's limits cannot let the last POST go earlier than this
        // after the first, whatever the client does.
        let posts = self.calls.accepted(Kind::Defender(Endpoint::Restrict));
        let minimum_budget_secs = minimum_makespan_secs(posts as u64);
        let minimum =
            Duration::from_secs_f64(minimum_budget_secs as f64 / self.speed) + self.one_round;
        let ratio = self.makespan.as_secs_f64() / minimum.as_secs_f64();
        rows.push(Row::new(
            "  makespan vs the restrict API's minimum (its POSTs under 100/min and 1500/h, plus one round of reads)",
            format!(
                "{:.2} s real = {:.0} s budget time; minimum {:.2} s = {minimum_budget_secs} s for \
                 {posts} POSTs + {} ms; ratio {ratio:.3}",
                self.makespan.as_secs_f64(),
                self.makespan.as_secs_f64() * self.speed,
                minimum.as_secs_f64(),
                ms(self.one_round),
            ),
            &format!("ratio <= {target:.2}"),
            Some(ratio <= target),
        ));
    }
}

/// A steady stream: distinct devices, evenly spread over simulated time, at
/// more than Defender's hourly limit allows; how many restricts an hour get
/// through.
async fn sustained(plan: &Plan, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let (offered, sim_secs) = plan.sustained;
    let speed = plan.sustained_speed;
    let speed_arg = speed.to_string();
    let sim = Sim::start(&["--speed", &speed_arg])?;
    let handler = Handler::start(&sim, &[("DEFENDER_RATE_CLOCK_SPEED", speed_arg.as_str())])?;
    let devices: Vec<Device> = (0..offered).map(|k| Device::new(9, k)).collect();
    add_machines(sim.port, &devices).await?;
    sim.clear_log().await?;
    let interval = Duration::from_secs_f64(sim_secs as f64 / speed / offered as f64);
    eprintln!(
        "sustained: {offered} devices over {sim_secs} s simulated ({:.0} s real), clocks at {speed}x",
        sim_secs as f64 / speed
    );

    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(k, device)| {
            let device = device.clone();
            let port = handler.port;
            let at = started + interval * u32::try_from(k).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut conn = Conn::connect(port).await?;
                conn.send("POST", FUNCTION_PATH, &restrict_body(&device))
                    .await
            })
        })
        .collect();
    let mut answers = Answers::default();
    for task in tasks {
        let (status, body) = task.await??;
        answers.add(status, &body);
    }

    // Actions carry the simulator's clock: count those created within the
    // first simulated hour (or the whole window, if shorter).
    let created: Vec<Value> = serde_json::from_slice(&sim.get("/_sim/actions").await?)?;
    let mut times: Vec<time::OffsetDateTime> = created
        .iter()
        .filter_map(|a| a.get("creationDateTimeUtc").and_then(Value::as_str))
        .filter_map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .collect();
    times.sort();
    let window = sim_secs.min(3600);
    let in_window = times.first().map_or(0, |&first| {
        times
            .iter()
            .filter(|&&t| {
                t < first + time::Duration::seconds(i64::try_from(window).unwrap_or(i64::MAX))
            })
            .count()
    });
    let per_hour = in_window as f64 * 3600.0 / window as f64;
    let calls = CallCounts::of(&sim.log().await?);
    rows.push(Row::new(
        &format!(
            "sustained: {offered} distinct devices evenly over {sim_secs} s simulated, default budget, clocks at {speed}x"
        ),
        format!(
            "{in_window} restricts created in the first {window} s ({per_hour:.0} per hour); {} \
             actions in all, {} failures; answers: {}",
            times.len(),
            answers.failures,
            answers.describe()
        ),
        ">= 1400 restricts per hour",
        (!plan.smoke).then_some(per_hour >= 1400.0),
    ));
    rows.push(Row::new(
        "  Defender calls by endpoint (answered 429 by the simulator)",
        calls.describe(),
        "0 answered 429",
        Some(calls.throttled() == 0),
    ));
    notes.push(format!(
        "Sustained: {offered} devices offered over {sim_secs} s of simulated time is more than \
         Defender's {PER_HOUR} calls an hour per API; every restrict needs one lookup, one read \
         and one POST, so each of those APIs is at its hourly limit and the restrict API's own \
         budget is the only ceiling."
    ));
    drop(handler);
    drop(sim);
    Ok(())
}

/// The outbreak burst spread over three instances with `COORDINATION=storage`,
/// one Azurite (npm, `scripts/azurite.sh`) and one simulator.
async fn scaled(plan: &Plan, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let (invocations, device_count) = plan.scaled;
    let speed = plan.burst_speed.to_string();
    let azurite = Azurite::start()?;
    let sim = Sim::start(&["--speed", &speed])?;
    let storage = azurite.connection_string();
    let env = [
        ("DEFENDER_RATE_CLOCK_SPEED", speed.as_str()),
        ("COORDINATION", "storage"),
        ("AzureWebJobsStorage", storage.as_str()),
        ("COORDINATION_CONTAINER", "bench"),
    ];
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(LoggedHandler::start(&sim, &env)?);
    }
    eprintln!(
        "scaled: {invocations} invocations over {device_count} devices on 3 instances, clocks at {speed}x"
    );
    let ports: Vec<u16> = instances.iter().map(|i| i.port).collect();
    let outcome = run_burst(plan, &sim, &ports, 20, invocations, device_count).await?;
    let mut storage_operations = 0;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for instance in &mut instances {
        let (total, kinds) = instance.stop_and_count_storage_operations()?;
        storage_operations += total;
        for (kind, n) in kinds {
            *by_kind.entry(kind).or_default() += n;
        }
    }
    let by_kind = by_kind
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    outcome.push_rows(
        rows,
        &format!(
            "scaled out: {invocations} restricts over {device_count} devices on 3 instances \
             (COORDINATION=storage, Azurite), each device's duplicates on different instances, \
             clocks at {}x",
            plan.burst_speed
        ),
        1.20,
    );
    let per_invocation = storage_operations as f64 / (invocations + 1) as f64;
    rows.push(Row::new(
        "  Defender calls by endpoint (answered 429 by the simulator); storage operations",
        format!(
            "{}; {storage_operations} storage operations ({by_kind}), {per_invocation:.1} per invocation",
            outcome.calls.describe()
        ),
        "0 answered 429",
        Some(outcome.calls.throttled() == 0),
    ));
    notes.push(
        "Scaled out: the storage operations are every request the three instances sent to \
         Azurite (leases, budget reads and conditional writes, retries after an ETag conflict), \
         from each instance's `coordination totals` log line at shutdown, divided by the \
         invocations (the lone one included)."
            .to_owned(),
    );
    drop(instances);
    drop(sim);
    drop(azurite);
    Ok(())
}

/// Azurite's blob service on a free port, in memory; killed when dropped.
struct Azurite {
    _proc: Proc,
    port: u16,
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
        let launcher = String::from_utf8(out.stdout)?.trim().to_owned();
        let port = free_port()?;
        let workspace = std::env::temp_dir().join(format!("bench-azurite-{port}"));
        std::fs::create_dir_all(&workspace)?;
        let child = Command::new(launcher)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
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
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                return Err("Azurite did not listen".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { _proc: proc, port })
    }

    fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};\
             BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            restrict_code_execution::coordination::settings::AZURITE_KEY,
            self.port
        )
    }
}

/// A handler whose log lines are kept (for its shutdown totals).
struct LoggedHandler {
    proc: Proc,
    port: u16,
    lines: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl LoggedHandler {
    fn start(sim: &Sim, extra: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let mut child = support::handler_command(sim.port, port, extra)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no handler stdout")?;
        let lines = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.contains("coordination totals") {
                    keep.lock().push(line);
                }
            }
        });
        let mut proc = Proc { child };
        wait_ready(&mut proc, port)?;
        Ok(Self { proc, port, lines })
    }

    /// SIGTERM, wait for the exit, and read its `coordination totals` line.
    /// Stop the handler; its storage operations in all and by kind.
    fn stop_and_count_storage_operations(&mut self) -> Result<(u64, BTreeMap<String, u64>)> {
        let pid = self.proc.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        self.proc.child.wait()?;
        // The reader thread sees the last lines just after the exit.
        std::thread::sleep(Duration::from_millis(200));
        let lines = self.lines.lock();
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

/// Answers by status and outcome.
#[derive(Default)]
struct Answers {
    by_kind: BTreeMap<String, usize>,
    failures: usize,
}

impl Answers {
    fn add(&mut self, status: u16, body: &[u8]) {
        let outcome = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.get("outcome")
                    .or_else(|| v.get("code"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "unreadable".to_owned());
        if !(200..300).contains(&status) {
            if self.failures == 0 {
                eprintln!(
                    "first failure: {status} {}",
                    String::from_utf8_lossy(&body[..body.len().min(600)])
                );
            }
            self.failures += 1;
        }
        *self
            .by_kind
            .entry(format!("{status} {outcome}"))
            .or_default() += 1;
    }

    fn describe(&self) -> String {
        self.by_kind
            .iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The actions the simulator holds, but for the lone device's.
struct Actions {
    created: usize,
    /// Actions beyond one per machine.
    duplicates: usize,
}

impl Actions {
    async fn of(sim: &Sim, except: &Device) -> Result<Self> {
        let actions: Vec<Value> = serde_json::from_slice(&sim.get("/_sim/actions").await?)?;
        let mut per_machine: HashMap<String, usize> = HashMap::new();
        for action in &actions {
            let machine = action
                .get("machineId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase();
            if machine != except.machine_id {
                *per_machine.entry(machine).or_default() += 1;
            }
        }
        Ok(Self {
            created: per_machine.values().sum(),
            duplicates: per_machine.values().map(|n| n.saturating_sub(1)).sum(),
        })
    }
}

/// Calls in a request log by endpoint: (accepted, answered 429).
struct CallCounts(BTreeMap<Kind, (usize, usize)>);

impl CallCounts {
    fn of(log: &[Recorded]) -> Self {
        let mut calls: BTreeMap<Kind, (usize, usize)> = BTreeMap::new();
        for r in log {
            let entry = calls.entry(Kind::of(r)).or_default();
            if r.status == 429 {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
        Self(calls)
    }

    fn accepted(&self, kind: Kind) -> usize {
        self.0.get(&kind).map_or(0, |(ok, _)| *ok)
    }

    fn defender_accepted(&self) -> usize {
        self.0
            .iter()
            .filter(|(kind, _)| **kind != Kind::Token)
            .map(|(_, (ok, _))| ok)
            .sum()
    }

    fn throttled(&self) -> usize {
        self.0.values().map(|(_, t)| t).sum()
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(k, (ok, throttled))| format!("{} {ok} ({throttled})", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Earliest time (seconds after the first) of the `n`-th call on one endpoint
/// under Defender's two sliding windows: a call can go no earlier than a
/// minute after the call `PER_MINUTE` places before it, nor an hour after the
/// call `PER_HOUR` places before it. Sending each call as early as that allows
/// is the fastest schedule there is.
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

// ---------------------------------------------------------------------------
// Processes

/// `handler simulator` on a free port.
struct Sim {
    proc: Proc,
    port: u16,
}

impl Sim {
    fn start(args: &[&str]) -> Result<Self> {
        let (proc, port) = support::spawn_simulator(args)?;
        Ok(Self { proc, port })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let mut conn = Conn::connect(self.port).await?;
        let (status, body) = conn.send("GET", path, b"").await?;
        expect_status(status, 200, &body)?;
        Ok(body)
    }

    async fn log(&self) -> Result<Vec<Recorded>> {
        Ok(serde_json::from_slice(&self.get("/_sim/requests").await?)?)
    }

    async fn clear_log(&self) -> Result<()> {
        let mut conn = Conn::connect(self.port).await?;
        let (status, body) = conn.send("DELETE", "/_sim/requests", b"").await?;
        expect_status(status, 204, &body)
    }
}

/// The custom handler, started the way the Functions host starts it.
struct Handler {
    proc: Proc,
    port: u16,
}

impl Handler {
    fn spawn(sim: &Sim, port: u16, extra: &[(&str, &str)]) -> Result<Proc> {
        support::spawn_handler(sim.port, port, extra)
    }

    fn start(sim: &Sim, extra: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let mut proc = Self::spawn(sim, port, extra)?;
        wait_ready(&mut proc, port)?;
        Ok(Self { proc, port })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

fn cold_starts(sim: &Sim, n: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let port = free_port()?;
        let started = Instant::now();
        let mut proc = Handler::spawn(sim, port, &[])?;
        wait_ready(&mut proc, port)?;
        times.push(started.elapsed());
        drop(proc);
    }
    Ok(times)
}

// ---------------------------------------------------------------------------
// Load

/// A test device: an Entra device id and a Defender machine.
#[derive(Debug, Clone)]
struct Device {
    aad: String,
    machine_id: String,
    name: String,
}

impl Device {
    /// Deterministic, distinct ids for device `k` of set `set`.
    fn new(set: u64, k: usize) -> Self {
        let mut state = (set << 40) ^ (k as u64);
        let mut next = || {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let (a, b, c) = (next(), next(), next());
        let machine_id = format!("{a:016x}{b:016x}{:08x}", c >> 32);
        let aad = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (set << 28) as u32 ^ k as u32,
            (c >> 16) & 0xffff,
            c & 0xfff,
            (b >> 52) & 0xfff,
            a & 0xffff_ffff_ffff
        );
        Self {
            aad,
            machine_id,
            name: format!("BENCH-{set}-{k:05}.contoso.local"),
        }
    }

    fn machine_json(&self) -> Value {
        // The shape and size of a real machine record.
        json!({
            "id": self.machine_id,
            "computerDnsName": self.name,
            "aadDeviceId": self.aad,
            "healthStatus": "Active",
            "osPlatform": "Windows11",
            "onboardingStatus": "Onboarded",
            "lastSeen": "2026-11-28T08:12:03.1234567Z",
            "firstSeen": "2025-04-02T10:00:00.0000000Z",
            "isPotentialDuplication": false,
            "osProcessor": "x64",
            "osArchitecture": "64-bit",
            "osBuild": 22631,
            "version": "23H2",
            "lastIpAddress": "10.0.1.21",
            "lastExternalIpAddress": "203.0.113.10",
            "agentVersion": "10.8760.22631.1011",
            "rbacGroupName": "Workstations",
            "rbacGroupId": 101,
            "riskScore": "Low",
            "exposureLevel": "Medium",
            "deviceValue": "Normal",
            "isAadJoined": true,
            "defenderAvStatus": "Updated",
            "managedBy": "Intune",
            "managedByStatus": "Success",
            "machineTags": [],
            "ipAddresses": [],
        })
    }
}

/// The lone round before a burst releases its own device: it uses the
/// unrestrict API's budget, so the burst's restrict budget starts empty.
fn release_body(device: &Device) -> Vec<u8> {
    json!({"deviceId": device.aad, "release": true})
        .to_string()
        .into_bytes()
}

fn restrict_body(device: &Device) -> Vec<u8> {
    json!({
        "deviceId": device.aad,
        "release": false,
        "comment": "Benchmark: possible security risk.",
        "callerName": "bench@example.com",
    })
    .to_string()
    .into_bytes()
}

async fn add_machines(sim_port: u16, devices: &[Device]) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let devices: Arc<Vec<Value>> = Arc::new(devices.iter().map(Device::machine_json).collect());
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (next, devices) = (next.clone(), devices.clone());
            tokio::spawn(async move {
                let mut conn = Conn::connect(sim_port).await?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(machine) = devices.get(i) else {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                    };
                    let (status, body) = conn
                        .send("POST", "/_sim/machines", machine.to_string().as_bytes())
                        .await?;
                    expect_status(status, 201, &body)?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

struct LoadOutcome {
    invocations: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl LoadOutcome {
    fn per_second(&self) -> f64 {
        self.invocations as f64 / self.elapsed.as_secs_f64()
    }

    /// `cpu`: µs per invocation of the handler, the simulator, the load generator.
    fn describe(&self, cpu: &[f64; 3]) -> String {
        format!(
            "{:.0} inv/s; latency p50 {} ms, p99 {} ms; CPU µs/inv: handler {:.0}, simulator {:.0}, load generator {:.0}",
            self.per_second(),
            ms(percentile(&self.latencies, 50.0)),
            ms(percentile(&self.latencies, 99.0)),
            cpu[0],
            cpu[1],
            cpu[2]
        )
    }
}

/// User plus system CPU time of each process so far (`/proc/<pid>/stat`).
fn cpu_times(pids: &[u32; 3]) -> Result<[Duration; 3]> {
    let tick = clock_tick();
    let mut times = [Duration::ZERO; 3];
    for (time, pid) in times.iter_mut().zip(pids) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses: state is
        // the first, utime the 12th and stime the 13th.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or("unreadable /proc stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11).ok_or("no utime")?.parse::<u64>()?
            + fields.get(12).ok_or("no stime")?.parse::<u64>()?;
        *time = tick * u32::try_from(ticks)?;
    }
    Ok(times)
}

fn cpu_per_invocation(
    before: &[Duration; 3],
    after: &[Duration; 3],
    invocations: usize,
) -> [f64; 3] {
    let mut per = [0.0; 3];
    for i in 0..3 {
        per[i] = after[i].saturating_sub(before[i]).as_secs_f64() * 1e6 / invocations.max(1) as f64;
    }
    per
}

/// The length of a clock tick, from `getconf CLK_TCK` (100 Hz if unknown).
fn clock_tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let hz = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|hz| *hz > 0)
            .unwrap_or(100);
        Duration::from_secs(1) / hz
    })
}

/// One restrict per device in `devices`, `concurrency` at a time, each worker
/// on its own keep-alive connection; every answer must have `expected` status.
async fn load(
    port: u16,
    concurrency: usize,
    devices: &[Device],
    expected: u16,
) -> Result<LoadOutcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let devices = Arc::new(devices.to_vec());
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(Conn::connect(port).await?);
    }
    let started = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (next, devices) = (next.clone(), devices.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(device) = devices.get(i) else {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(latencies);
                    };
                    let body = restrict_body(device);
                    let sent = Instant::now();
                    let (status, answer) = conn.send("POST", FUNCTION_PATH, &body).await?;
                    latencies.push(sent.elapsed());
                    expect_status(status, expected, &answer)?;
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(devices.len());
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(LoadOutcome {
        invocations: devices.len(),
        elapsed: started.elapsed(),
        latencies,
    })
}

fn expect_status(status: u16, expected: u16, body: &[u8]) -> Result<()> {
    if status == expected {
        Ok(())
    } else {
        Err(format!(
            "expected HTTP {expected}, got {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(600)])
        )
        .into())
    }
}

/// A minimal HTTP/1.1 keep-alive client: the load generator shares the CPUs
/// with what it measures, so it does as little as it can.
struct Conn {
    port: u16,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// Sent as `Authorization: Bearer` (calls to the simulator's Defender API).
    bearer: Option<&'static str>,
}

impl Conn {
    async fn connect(port: u16) -> Result<Self> {
        let mut conn = Self {
            port,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
            bearer: None,
        };
        conn.reconnect().await?;
        Ok(conn)
    }

    /// A connection to the simulator's Defender API with its default token.
    async fn to_defender(port: u16) -> Result<Self> {
        let mut conn = Self::connect(port).await?;
        conn.bearer = Some(SIM_TOKEN);
        Ok(conn)
    }

    async fn reconnect(&mut self) -> Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream.set_nodelay(true)?;
        self.stream = Some(stream);
        self.buf.clear();
        Ok(())
    }

    async fn send(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            self.reconnect().await?;
        }
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        if let Some(token) = self.bearer {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if path == FUNCTION_PATH {
            request.push_str(&format!(
                "X-Azure-Functions-InvocationId: {}\r\n",
                invocation_id()
            ));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        let stream = self.stream.as_mut().ok_or("not connected")?;
        stream.write_all(&bytes).await?;

        self.buf.clear();
        let header_end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            read_more(stream, &mut self.buf).await?;
        };
        let head = std::str::from_utf8(&self.buf[..header_end])?.to_owned();
        let status: u16 = head.get(9..12).ok_or("short status line")?.parse()?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        for line in head.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let body = if chunked {
            let mut body = Vec::new();
            let mut at = header_end;
            loop {
                let line_end = loop {
                    if let Some(end) = find(&self.buf[at..], b"\r\n") {
                        break at + end;
                    }
                    read_more(stream, &mut self.buf).await?;
                };
                let size_text = std::str::from_utf8(&self.buf[at..line_end])?;
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
                at = line_end + 2;
                while self.buf.len() < at + size + 2 {
                    read_more(stream, &mut self.buf).await?;
                }
                body.extend_from_slice(&self.buf[at..at + size]);
                at += size + 2;
                if size == 0 {
                    break body;
                }
            }
        } else {
            let length = length.unwrap_or(0);
            while self.buf.len() < header_end + length {
                read_more(stream, &mut self.buf).await?;
            }
            self.buf[header_end..header_end + length].to_vec()
        };
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err("connection closed before the answer was complete".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invocation_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("bench-{:08}", NEXT.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// The simulator's request log

/// An entry of the simulator's request log (`GET /_sim/requests`).
use restrict_code_execution::{defender::Endpoint, simulator::RecordedRequest as Recorded};

/// What a request-log entry is: a token request, a call to one of the
/// Defender endpoints the service knows, or something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Token,
    Defender(Endpoint),
    Other,
}

impl Kind {
    /// `list machines` for a read, `POST <last path segment>` for a write.
    fn name(self) -> String {
        match self {
            Self::Token => "token".to_owned(),
            Self::Other => "other".to_owned(),
            Self::Defender(endpoint) if endpoint.may_have_acted() => {
                let path = endpoint.path("");
                format!("POST {}", path.rsplit('/').next().unwrap_or(&path))
            }
            Self::Defender(endpoint) => endpoint.bucket().replace('-', " "),
        }
    }

    /// Which upstream call a request-log entry is.
    fn of(r: &Recorded) -> Self {
        if r.path.starts_with("/_identity/") {
            return Kind::Token;
        }
        Endpoint::parse(&r.method, &r.path)
            .map_or(Kind::Other, |(endpoint, _)| Kind::Defender(endpoint))
    }
}

/// The upstream calls of one invocation.
#[derive(Default)]
struct Group {
    kinds: Vec<Kind>,
    sim_time: Duration,
}

impl Group {
    fn count(&self, kind: Kind) -> usize {
        self.kinds.iter().filter(|k| **k == kind).count()
    }

    fn defender_calls(&self) -> usize {
        self.kinds.iter().filter(|k| **k != Kind::Token).count()
    }
}

/// Splits the log of sequential invocations (one per device, in order) into
/// one group per invocation. A token request belongs to the invocation whose
/// first call follows it.
fn group_by_invocation(log: &[Recorded], devices: &[Device]) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::with_capacity(devices.len());
    let mut pending = Group::default();
    for r in log {
        let kind = Kind::of(r);
        let time = Duration::from_micros(r.duration_micros);
        if kind == Kind::Defender(Endpoint::ListMachines) {
            let expected = devices
                .get(groups.len())
                .ok_or("more list-machines calls than invocations")?;
            let matches = r
                .filter
                .as_deref()
                .is_some_and(|f| f.to_ascii_lowercase().contains(&expected.aad));
            if !matches {
                return Err(format!(
                    "invocation {} does not start with the lookup of its device: {:?}",
                    groups.len(),
                    r.filter
                )
                .into());
            }
            let mut group = std::mem::take(&mut pending);
            group.kinds.push(kind);
            group.sim_time += time;
            groups.push(group);
        } else if kind == Kind::Token {
            pending.kinds.push(kind);
            pending.sim_time += time;
        } else {
            let group = groups
                .last_mut()
                .ok_or("a Defender call before any lookup")?;
            group.kinds.push(kind);
            group.sim_time += time;
        }
    }
    if groups.len() != devices.len() {
        return Err(format!(
            "{} invocations but {} lookups in the simulator's log",
            devices.len(),
            groups.len()
        )
        .into());
    }
    Ok(groups)
}

fn kinds_per_invocation(groups: &[Group]) -> BTreeMap<Kind, usize> {
    let mut counts = BTreeMap::new();
    for kind in groups.iter().flat_map(|g| &g.kinds) {
        if *kind != Kind::Token {
            *counts.entry(*kind).or_default() += 1;
        }
    }
    counts
}

fn describe_kinds(counts: &BTreeMap<Kind, usize>, invocations: usize) -> String {
    let total: usize = counts.values().sum();
    let parts: Vec<String> = counts
        .iter()
        .map(|(k, n)| format!("{} {:.2}", k.name(), *n as f64 / invocations as f64))
        .collect();
    format!(
        "{:.2} per invocation: {}",
        total as f64 / invocations as f64,
        parts.join(", ")
    )
}

// ---------------------------------------------------------------------------
// Reporting

struct Row {
    figure: String,
    result: String,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(figure: &str, result: String, target: &str, met: Option<bool>) -> Self {
        Self {
            figure: figure.to_owned(),
            result,
            target: target.to_owned(),
            met,
        }
    }
}

/// Nearest-rank percentile.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn max(samples: &[Duration]) -> Duration {
    samples.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("Machine: {cpus} CPUs, {cpu}; {rustc}; handler {HANDLER}\n")
}
