//! Benchmark of the fleet view (`GET /api/restrict-code-execution/devices`)
//! on a large tenant: the release `handler` and `handler simulator`
//! as separate processes on loopback, as in `benches/e2e.rs`.
//!
//! `cargo bench --bench fleet` seeds 100,000 machines and 300,000 restrict
//! and unrestrict actions straight into the simulator (its `/_sim/fleets`
//! and bulk `/_sim/actions` controls, not through the handler), then reads
//! the first page of the view in each filter and format, one page of
//! 10,000, and every page of `state=all`; it reports Defender calls, handler
//! time and the handler's peak RSS against the targets (docs/benchmarks.md).
//! `BENCH_SMOKE=1` runs a tenant a hundredth that size, only to check the
//! harness.
//!
//! Like `e2e`, it exits non-zero when the harness breaks (a process does not
//! start, an answer is not the expected one), never on a timing.

mod support;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use restrict_code_execution::simulator::RecordedRequest;
use serde_json::{Value, json};

use support::{
    Memory, Proc, Result, free_port, load_average, spawn_handler, spawn_simulator, wait_ready,
};

const DEVICES_PATH: &str = "/api/restrict-code-execution/devices";
/// The simulator's page of machine actions (Defender's largest).
const SIM_PAGE: usize = 10_000;

/// The tenant, in five rounds an hour apart: every machine restricted;
/// `released` of them released and restricted again; `cleared` of those
/// released again and restricted once more, that last restrict still
/// pending. Restricted at the end: all but
/// `cleared`; released: `cleared`, each with a pending restrict.
struct Tenant {
    machines: usize,
    released: usize,
    cleared: usize,
}

impl Tenant {
    fn actions(&self) -> usize {
        self.machines + 2 * self.released + 2 * self.cleared
    }

    fn expected(&self, state: &str) -> usize {
        match state {
            "restricted" => self.machines - self.cleared,
            "released" | "pending" => self.cleared,
            _ => self.machines,
        }
    }

    /// List calls one read takes: every page of each type, and the empty
    /// page after a full last one.
    fn calls_per_read(&self) -> usize {
        let restricts = self.machines + self.released + self.cleared;
        let releases = self.released + self.cleared;
        restricts / SIM_PAGE + 1 + releases / SIM_PAGE + 1
    }
}

fn main() {
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke");
    let tenant = if smoke {
        Tenant {
            machines: 1_000,
            released: 700,
            cleared: 300,
        }
    } else {
        Tenant {
            machines: 100_000,
            released: 70_000,
            cleared: 30_000,
        }
    };
    let started = Instant::now();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("benchmark harness failed: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(&tenant, smoke)) {
        Ok(report) => {
            println!("{report}");
            println!(
                "fleet benchmark {} finished in {:.1} s",
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

async fn run(tenant: &Tenant, smoke: bool) -> Result<String> {
    let sim = Running::simulator()?;
    let handler = Running::handler(&sim)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let idle = Memory::of(handler.pid())?;

    eprintln!(
        "seeding {} machines and {} actions",
        tenant.machines,
        tenant.actions()
    );
    let seeding = Instant::now();
    let fleet: Value = expect(
        http.post(format!("http://127.0.0.1:{}/_sim/fleets", sim.port))
            .json(&json!({"name": "fleet", "tag": "fleet-bench", "devices": tenant.machines})),
        201,
    )
    .await?
    .json()
    .await?;
    let ids: Vec<String> = fleet["devices"]
        .as_array()
        .ok_or("no devices in the fleet answer")?
        .iter()
        .filter_map(|d| d["machineId"].as_str().map(str::to_owned))
        .collect();
    drop(fleet);
    if ids.len() != tenant.machines {
        return Err(format!("{} machines seeded", ids.len()).into());
    }
    let rounds: [(&[String], &str, &str); 5] = [
        (&ids, "RestrictCodeExecution", "INC-2026-0042: outbreak"),
        (
            &ids[..tenant.released],
            "UnrestrictCodeExecution",
            "INC-2026-0042: cleared",
        ),
        (
            &ids[..tenant.released],
            "RestrictCodeExecution",
            "INC-2026-0043: reinfected",
        ),
        (
            &ids[..tenant.cleared],
            "UnrestrictCodeExecution",
            "INC-2026-0043: cleared",
        ),
        (
            &ids[..tenant.cleared],
            "RestrictCodeExecution",
            "INC-2026-0044: reinfected again",
        ),
    ];
    for (round, (machines, kind, comment)) in rounds.into_iter().enumerate() {
        for chunk in machines.chunks(20_000) {
            let created: Value = expect(
                http.post(format!("http://127.0.0.1:{}/_sim/actions", sim.port))
                    .json(&json!({
                        "type": kind,
                        "machineIds": chunk,
                        "comment": format!("{comment} (requested by soc-analyst@contoso.com)"),
                    })),
                201,
            )
            .await?
            .json()
            .await?;
            if created["created"].as_u64() != Some(chunk.len() as u64) {
                return Err(format!("round {round}: {created:.300}").into());
            }
        }
        if round < 4 {
            advance(&http, sim.port, 3600).await?;
        }
    }
    eprintln!("seeded in {:.1} s", seeding.elapsed().as_secs_f64());

    // Each read of the full tenant folds 300,000 actions: one sample each.
    let repeats = if smoke { 3 } else { 1 };
    let reads: [(&str, Option<usize>, &str, &str); 6] = [
        ("restricted", None, "application/json", "JSON"),
        ("pending", None, "application/json", "JSON"),
        ("all", None, "application/json", "JSON"),
        ("all", Some(10_000), "application/json", "JSON"),
        ("all", None, "text/plain", "text"),
        ("all", None, "text/html", "HTML"),
    ];
    let mut rows = Vec::new();
    let mut max_calls = 0;
    let mut max_handler = Duration::ZERO;
    for (state, page_size, accept, format) in reads {
        let mut samples = Vec::new();
        for _ in 0..repeats {
            let (sample, body) =
                read(&http, &sim, &handler, state, page_size, None, accept).await?;
            let listed = match format {
                "JSON" => serde_json::from_str::<Value>(&body)?["count"]
                    .as_u64()
                    .map_or(0, |n| n as usize),
                // One line per device, then the count line.
                "text" => body.lines().count().saturating_sub(1),
                _ => body.matches("<tr data-machine-id=").count(),
            };
            let page = page_size.unwrap_or(1_000).min(tenant.expected(state));
            if listed != page {
                return Err(format!(
                    "{state} {format}: {listed} devices listed, expected a page of {page}"
                )
                .into());
            }
            samples.push(sample);
        }
        samples.sort_by_key(|s| s.elapsed);
        let median = &samples[samples.len() / 2];
        let handler_time = median.elapsed.saturating_sub(median.defender);
        max_calls = max_calls.max(samples.iter().map(|s| s.calls).max().unwrap_or(0));
        max_handler = max_handler.max(handler_time);
        let hwm = Memory::of(handler.pid())?.hwm_kib;
        let row = format!(
            "| `state={state}`{}, {format} | {} of {} | {} | {} ms | {} ms | **{} ms** | {:.2} MiB | {:.1} MiB |",
            page_size
                .map(|n| format!("&pageSize={n}"))
                .unwrap_or_default(),
            page_size.unwrap_or(1_000).min(tenant.expected(state)),
            tenant.expected(state),
            median.calls,
            ms(median.elapsed),
            ms(median.defender),
            ms(handler_time),
            median.bytes as f64 / (1024.0 * 1024.0),
            hwm as f64 / 1024.0
        );
        eprintln!("{row}");
        rows.push(row);
    }

    // Every page of `state=all`: each machine once.
    let walk_page = if smoke { 300 } else { 10_000 };
    let walk = Instant::now();
    let mut seen = HashSet::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    let mut walk_calls = 0;
    loop {
        let (sample, body) = read(
            &http,
            &sim,
            &handler,
            "all",
            Some(walk_page),
            token.as_deref(),
            "application/json",
        )
        .await?;
        pages += 1;
        walk_calls += sample.calls;
        let answer: Value = serde_json::from_str(&body)?;
        for device in answer["devices"].as_array().into_iter().flatten() {
            let id = device["machineId"].as_str().unwrap_or_default().to_owned();
            if !seen.insert(id.clone()) {
                return Err(format!("machine {id} on two pages").into());
            }
        }
        match answer["continuation"].as_str() {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
        if pages > tenant.machines / walk_page + 1 {
            return Err("the pages never end".into());
        }
    }
    if seen.len() != tenant.machines {
        return Err(format!("{} machines over every page", seen.len()).into());
    }
    let walk_time = walk.elapsed();
    let peak = Memory::of(handler.pid())?;

    let mut out = String::new();
    out.push_str(&format!(
        "\n## Fleet view{}\n\n",
        if smoke {
            " (SMOKE RUN: a hundredth of the tenant, not comparable with the targets)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "Tenant: {} machines, {} restrict/unrestrict actions (5 rounds; {} restricted, {} released \
         with a restrict pending); simulator page size {SIM_PAGE}. Every read is a new read of \
         Defender (`FLEET_VIEW_MAX_AGE_SECONDS=0`). Median of {repeats} reads each. Load average \
         (1 min) after the run {}.\n\n",
        tenant.machines,
        tenant.actions(),
        tenant.expected("restricted"),
        tenant.expected("released"),
        load_average()
    ));
    out.push_str(
        "| read | devices (page of matching) | Defender calls | end to end | Defender (simulator) time | handler time | answer | handler VmHWM so far |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&row);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nEvery page of `state=all&pageSize={walk_page}`: {pages} pages, {} machines each once, {walk_calls} \
         Defender calls, {:.1} s.\n",
        seen.len(),
        walk_time.as_secs_f64()
    ));
    let mib = |kib: u64| kib as f64 / 1024.0;
    let calls_target = tenant.calls_per_read();
    out.push_str(&format!(
        "\n| figure | result | target | met |\n|---|---|---|---|\n\
         | Defender calls per read (most in any read) | {max_calls} | ≤ {calls_target} (every page once) | {} |\n\
         | handler time per read (slowest median) | {} ms | < 5 s | {} |\n\
         | handler peak RSS (VmHWM over all reads; idle {:.1} MiB) | {:.1} MiB | < 150 MiB | {} |\n",
        yes(max_calls <= calls_target),
        ms(max_handler),
        yes(max_handler < Duration::from_secs(5)),
        mib(idle.rss_kib),
        mib(peak.hwm_kib),
        yes(peak.hwm_kib < 150 * 1024),
    ));
    Ok(out)
}

/// One view read, with what Defender received for it.
async fn read(
    http: &reqwest::Client,
    sim: &Running,
    handler: &Running,
    state: &str,
    page_size: Option<usize>,
    continuation: Option<&str>,
    accept: &str,
) -> Result<(Sample, String)> {
    clear_log(http, sim.port).await?;
    let mut query = vec![("state", state.to_owned())];
    if let Some(size) = page_size {
        query.push(("pageSize", size.to_string()));
    }
    if let Some(token) = continuation {
        query.push(("continuation", token.to_owned()));
    }
    let mut url = url::Url::parse(&format!("http://127.0.0.1:{}{DEVICES_PATH}", handler.port))?;
    url.query_pairs_mut().extend_pairs(&query);
    let sent = Instant::now();
    let response = http.get(url).header("Accept", accept).send().await?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    let elapsed = sent.elapsed();
    if status != 200 {
        return Err(format!("{state} {accept}: HTTP {status}: {body:.300}").into());
    }
    let log: Vec<RecordedRequest> = http
        .get(format!("http://127.0.0.1:{}/_sim/requests", sim.port))
        .send()
        .await?
        .json()
        .await?;
    let calls: Vec<&RecordedRequest> = log.iter().filter(|r| r.path.starts_with("/api/")).collect();
    Ok((
        Sample {
            elapsed,
            defender: defender_time(&calls),
            calls: calls.len(),
            bytes: body.len(),
        },
        body,
    ))
}

struct Sample {
    elapsed: Duration,
    defender: Duration,
    calls: usize,
    bytes: usize,
}

/// The simulator's time on the read's critical path: the two type-filtered
/// lists run side by side, each a chain of pages, so the longer chain counts.
fn defender_time(calls: &[&RecordedRequest]) -> Duration {
    let chain = |kind: &str| -> Duration {
        calls
            .iter()
            .filter(|r| r.filter.as_deref().is_some_and(|f| f.contains(kind)))
            .map(|r| Duration::from_micros(r.duration_micros))
            .sum()
    };
    chain("'RestrictCodeExecution'").max(chain("'UnrestrictCodeExecution'"))
}

/// A call to the simulator's test controls that must answer `expected`.
async fn expect(request: reqwest::RequestBuilder, expected: u16) -> Result<reqwest::Response> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status != expected {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("simulator control: HTTP {status}: {text:.300}").into());
    }
    Ok(response)
}

async fn advance(http: &reqwest::Client, port: u16, seconds: u64) -> Result<()> {
    let body = json!({"advanceSeconds": seconds});
    control(
        http.post(format!("http://127.0.0.1:{port}/_sim/clock"))
            .json(&body),
        200,
    )
    .await
}

async fn clear_log(http: &reqwest::Client, port: u16) -> Result<()> {
    control(
        http.delete(format!("http://127.0.0.1:{port}/_sim/requests")),
        204,
    )
    .await
}

async fn control(request: reqwest::RequestBuilder, expected: u16) -> Result<()> {
    expect(request, expected).await.map(drop)
}

// ---------------------------------------------------------------------------
// Processes

/// A started process and its port.
struct Running {
    proc: Proc,
    port: u16,
}

impl Running {
    /// `handler simulator`, its rate limits off (every read takes dozens
    /// of pages). Its clock runs at 1/10,000 of real time: the seeding
    /// moves it on past each round, and the last restricts stay Pending
    /// while the reads run.
    /// Its clock runs at 1/10,000 of real time: the seeding moves it on past
    /// each phase, and the last restricts stay Pending while the reads run.
    fn simulator() -> Result<Self> {
        let (proc, port) = spawn_simulator(&["--no-rate-limits", "--speed", "0.0001"])?;
        Ok(Self { proc, port })
    }

    /// The custom handler, its rate budget lifted and every view a new
    /// read, so that repeated reads measure the handler, not the budget or
    /// the sharing of reads.
    fn handler(sim: &Self) -> Result<Self> {
        let port = free_port()?;
        let mut proc = spawn_handler(
            sim.port,
            port,
            &[
                ("DEFENDER_RATE_LIMIT_PER_MINUTE", "1000000"),
                ("DEFENDER_RATE_LIMIT_PER_HOUR", "1000000"),
                ("FLEET_VIEW_MAX_AGE_SECONDS", "0"),
            ],
        )?;
        wait_ready(&mut proc, port)?;
        Ok(Self { proc, port })
    }

    fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn yes(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}
