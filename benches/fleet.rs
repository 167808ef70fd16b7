//! Benchmark of the fleet view (`GET /api/restrict-code-execution/devices`)
//! on a large tenant: the release `handler` and `handler simulator`
//! as separate processes on loopback, as in `benches/e2e.rs`.
//!
//! `cargo bench --bench fleet` seeds 10,000 machines and 20,000 restrict and
//! unrestrict actions straight into the simulator (its `/_sim/machines`
//! control and its Defender API, not through the handler), then reads the
//! view in each filter and format, and reports Defender calls, handler time
//! and the handler's peak RSS against the targets (docs/benchmarks.md).
//! `BENCH_SMOKE=1` runs a tenant a tenth that size, only to check the harness.
//!
//! Like `e2e`, it exits non-zero when the harness breaks (a process does not
//! start, an answer is not the expected one), never on a timing.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use restrict_code_execution::simulator::RecordedRequest;
use serde_json::{Value, json};

use support::{
    Memory, Proc, Result, free_port, load_average, spawn_handler, spawn_simulator, wait_ready,
};

const DEVICES_PATH: &str = "/api/restrict-code-execution/devices";
/// Reads of each kind; the median is reported.
const REPEATS: usize = 5;

/// The tenant: every machine restricted once, `released` of them released
/// again, and `again` of those restricted again (still pending).
struct Tenant {
    machines: usize,
    released: usize,
    again: usize,
}

impl Tenant {
    fn actions(&self) -> usize {
        self.machines + self.released + self.again
    }
}

fn main() {
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0")
        || std::env::args().any(|a| a == "--smoke");
    let tenant = if smoke {
        Tenant {
            machines: 1_000,
            released: 700,
            again: 300,
        }
    } else {
        Tenant {
            machines: 10_000,
            released: 7_000,
            again: 3_000,
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
        .timeout(Duration::from_secs(120))
        .build()?;
    let idle = Memory::of(handler.pid())?;

    eprintln!(
        "seeding {} machines and {} actions",
        tenant.machines,
        tenant.actions()
    );
    let seeding = Instant::now();
    let ids: Vec<String> = (0..tenant.machines).map(|k| format!("{k:040x}")).collect();
    let machines: Vec<(String, Value)> = ids
        .iter()
        .enumerate()
        .map(|(k, id)| ("/_sim/machines".to_owned(), machine_json(k, id)))
        .collect();
    post_all(&http, sim.port, machines, 201).await?;
    let restrict = |ids: &[String], kind: &str, comment: &str| -> Vec<(String, Value)> {
        ids.iter()
            .map(|id| {
                (
                    format!("/api/machines/{id}/{kind}"),
                    json!({"Comment": format!("{comment} (requested by soc-analyst@contoso.com)")}),
                )
            })
            .collect()
    };
    post_all(
        &http,
        sim.port,
        restrict(&ids, "restrictCodeExecution", "INC-2026-0042: outbreak"),
        201,
    )
    .await?;
    advance(&http, sim.port, 3600).await?;
    let released = &ids[..tenant.released];
    post_all(
        &http,
        sim.port,
        restrict(
            released,
            "unrestrictCodeExecution",
            "INC-2026-0042: cleared",
        ),
        201,
    )
    .await?;
    advance(&http, sim.port, 3600).await?;
    post_all(
        &http,
        sim.port,
        restrict(
            &released[..tenant.again],
            "restrictCodeExecution",
            "INC-2026-0043: reinfected",
        ),
        201,
    )
    .await?;
    let seeded: Vec<Value> = http
        .get(format!("http://127.0.0.1:{}/_sim/actions", sim.port))
        .send()
        .await?
        .json()
        .await?;
    if seeded.len() != tenant.actions() {
        return Err(format!(
            "seeded {} actions, expected {}",
            seeded.len(),
            tenant.actions()
        )
        .into());
    }
    drop(seeded);
    eprintln!("seeded in {:.1} s", seeding.elapsed().as_secs_f64());

    let expected = |state: &str| match state {
        "restricted" => tenant.machines - tenant.released,
        "released" => tenant.released,
        "pending" => tenant.again,
        _ => tenant.machines,
    };
    let reads: [(&str, &str, &str); 5] = [
        ("restricted", "application/json", "JSON"),
        ("pending", "application/json", "JSON"),
        ("all", "application/json", "JSON"),
        ("all", "text/plain", "text"),
        ("all", "text/html", "HTML"),
    ];
    let mut rows = Vec::new();
    let mut max_calls = 0;
    let mut max_handler = Duration::ZERO;
    for (state, accept, format) in reads {
        let mut samples = Vec::new();
        for _ in 0..REPEATS {
            clear_log(&http, sim.port).await?;
            let sent = Instant::now();
            let response = http
                .get(format!(
                    "http://127.0.0.1:{}{DEVICES_PATH}?state={state}",
                    handler.port
                ))
                .header("Accept", accept)
                .send()
                .await?;
            let status = response.status().as_u16();
            let body = response.text().await?;
            let elapsed = sent.elapsed();
            if status != 200 {
                return Err(format!("{state} {format}: HTTP {status}: {body:.300}").into());
            }
            let listed = match format {
                "JSON" => serde_json::from_str::<Value>(&body)?["count"]
                    .as_u64()
                    .map_or(0, |n| n as usize),
                "text" => body.lines().count(),
                _ => body.matches("<tr data-machine-id=").count(),
            };
            if listed != expected(state) {
                return Err(format!(
                    "{state} {format}: {listed} devices listed, expected {}",
                    expected(state)
                )
                .into());
            }
            let log: Vec<RecordedRequest> = http
                .get(format!("http://127.0.0.1:{}/_sim/requests", sim.port))
                .send()
                .await?
                .json()
                .await?;
            let calls: Vec<&RecordedRequest> =
                log.iter().filter(|r| r.path.starts_with("/api/")).collect();
            let defender = defender_time(&calls);
            samples.push(Sample {
                elapsed,
                defender,
                calls: calls.len(),
                bytes: body.len(),
            });
        }
        samples.sort_by_key(|s| s.elapsed);
        let median = &samples[samples.len() / 2];
        let handler_time = median.elapsed.saturating_sub(median.defender);
        max_calls = max_calls.max(samples.iter().map(|s| s.calls).max().unwrap_or(0));
        max_handler = max_handler.max(handler_time);
        let hwm = Memory::of(handler.pid())?.hwm_kib;
        rows.push(format!(
            "| `state={state}`, {format} | {} | {} | {} ms | {} ms | **{} ms** | {:.1} MiB | {:.1} MiB |",
            expected(state),
            median.calls,
            ms(median.elapsed),
            ms(median.defender),
            ms(handler_time),
            median.bytes as f64 / (1024.0 * 1024.0),
            hwm as f64 / 1024.0
        ));
    }
    let peak = Memory::of(handler.pid())?;

    let mut out = String::new();
    out.push_str(&format!(
        "\n## Fleet view{}\n\n",
        if smoke {
            " (SMOKE RUN: a tenth of the tenant, not comparable with the targets)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "Tenant: {} machines, {} restrict/unrestrict actions ({} restricts, {} releases, {} \
         restricts again and still pending); simulator page size 10,000. Median of {REPEATS} reads \
         each. Load average (1 min) after the run {}.\n\n",
        tenant.machines,
        tenant.actions(),
        tenant.machines,
        tenant.released,
        tenant.again,
        load_average()
    ));
    out.push_str(
        "| read | devices | Defender calls | end to end | Defender (simulator) time | handler time | answer | handler VmHWM so far |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        out.push_str(&row);
        out.push('\n');
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    out.push_str(&format!(
        "\n| figure | result | target | met |\n|---|---|---|---|\n\
         | Defender calls per read (most in any read) | {max_calls} | ≤ 6 | {} |\n\
         | handler time per read (slowest median) | {} ms | < 1 s | {} |\n\
         | handler peak RSS (VmHWM over all reads; idle {:.1} MiB) | {:.1} MiB | < 60 MiB | {} |\n",
        yes(max_calls <= 6),
        ms(max_handler),
        yes(max_handler < Duration::from_secs(1)),
        mib(idle.rss_kib),
        mib(peak.hwm_kib),
        yes(peak.hwm_kib < 60 * 1024),
    ));
    Ok(out)
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

/// POST every `(path, body)` to the simulator, 16 at a time; each must answer `expected`.
async fn post_all(
    http: &reqwest::Client,
    port: u16,
    requests: Vec<(String, Value)>,
    expected: u16,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(requests);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, requests, http) = (next.clone(), requests.clone(), http.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, body)) = requests.get(i) else {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                    };
                    let response = http
                        .post(format!("http://127.0.0.1:{port}{path}"))
                        .bearer_auth("bench-seeding-token")
                        .json(body)
                        .send()
                        .await?;
                    let status = response.status().as_u16();
                    if status != expected {
                        let text = response.text().await.unwrap_or_default();
                        return Err(format!("POST {path}: HTTP {status}: {text:.300}").into());
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
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

/// A call to the simulator's test controls that must answer `expected`.
async fn control(request: reqwest::RequestBuilder, expected: u16) -> Result<()> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status != expected {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("simulator control: HTTP {status}: {text:.300}").into());
    }
    Ok(())
}

/// A machine record of a real one's shape.
fn machine_json(k: usize, id: &str) -> Value {
    json!({
        "id": id,
        "computerDnsName": format!("FLEET-{k:05}.contoso.local"),
        "aadDeviceId": format!("5a000000-0000-4000-8000-{k:012}"),
        "healthStatus": "Active",
        "osPlatform": "Windows11",
        "onboardingStatus": "Onboarded",
        "lastSeen": "2026-11-28T08:12:03.1234567Z",
        "firstSeen": "2025-04-02T10:00:00.0000000Z",
        "osBuild": 22631,
        "version": "23H2",
        "lastIpAddress": "10.0.1.21",
        "agentVersion": "10.8760.22631.1011",
        "rbacGroupName": "Workstations",
        "isAadJoined": true,
    })
}

// ---------------------------------------------------------------------------
// Processes

/// A started process and its port.
struct Running {
    proc: Proc,
    port: u16,
}

impl Running {
    /// `handler simulator`, its rate limits off (the seeding sends tens of
    /// thousands of POSTs straight to it).
    /// Its clock runs at 1/10,000 of real time: the seeding moves it on past
    /// each phase, and the last restricts stay Pending while the reads run.
    fn simulator() -> Result<Self> {
        let (proc, port) = spawn_simulator(&["--no-rate-limits", "--speed", "0.0001"])?;
        Ok(Self { proc, port })
    }

    /// The custom handler, its rate budget lifted so that repeated reads
    /// measure the handler, not the budget.
    fn handler(sim: &Self) -> Result<Self> {
        let port = free_port()?;
        let mut proc = spawn_handler(
            sim.port,
            port,
            &[
                ("DEFENDER_RATE_LIMIT_PER_MINUTE", "1000000"),
                ("DEFENDER_RATE_LIMIT_PER_HOUR", "1000000"),
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
