//! Percentiles and the final table: every figure with its target and, where the transport
//! floor measured the same thing, the ratio to the floor.

use crate::changes::RunResult;
use crate::discovery::mb;
use crate::storm::StormResult;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

pub fn summary(label: &str, v: &[f64]) -> String {
    let v = sorted(v);
    format!(
        "{label}: n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// p50 and p99 (ms).
fn p50_p99(v: &[f64]) -> Option<(f64, f64)> {
    let v = sorted(v);
    (!v.is_empty()).then(|| (percentile(&v, 50.0), percentile(&v, 99.0)))
}

fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else {
        format!("{v:.1} ms")
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
    } else if bytes >= 1024 {
        format!("{:.0} KB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

struct Row {
    figure: String,
    run: String,
    measured: String,
    target: String,
    floor: String,
    verdict: &'static str,
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    }
}

/// "a / b ms" for p50 / p99 with `missed` deliveries noted.
fn dist(v: &[f64], missed: usize) -> String {
    let missing = if missed > 0 {
        format!(" ({missed} missed)")
    } else {
        String::new()
    };
    match p50_p99(v) {
        Some((a, b)) => format!("{} / {}{missing}", ms(a), ms(b)),
        None => format!("none{missing}"),
    }
}

/// "x / y" ratios of p50 and p99 to the floor's.
fn ratio(v: &[f64], floor: Option<&Vec<f64>>) -> (String, Option<f64>) {
    match (p50_p99(v), floor.and_then(|f| p50_p99(f))) {
        (Some((a, b)), Some((fa, fb))) if fa > 0.0 && fb > 0.0 => {
            (format!("{:.1}x / {:.1}x", a / fa, b / fb), Some(b / fb))
        }
        _ => (String::new(), None),
    }
}

fn run_rows(r: &RunResult, services: usize, rows: &mut Vec<Row>) {
    let floor = r.floor.as_ref();
    let floor_sync = match floor {
        Some(f) if f.sync.as_secs_f64() > 0.0 => format!(
            "floor {:.2} s: {:.1}x",
            f.sync.as_secs_f64(),
            r.sync.as_secs_f64() / f.sync.as_secs_f64()
        ),
        _ => String::new(),
    };
    rows.push(Row {
        figure: format!(
            "initial sync: every proxy has CDS+EDS ({} per proxy)",
            size(r.initial_bytes)
        ),
        run: r.label.clone(),
        measured: format!("{:.2} s", r.sync.as_secs_f64()),
        target: "<= 10 s".into(),
        floor: floor_sync,
        verdict: verdict(Some(r.sync.as_secs_f64() <= 10.0)),
    });
    rows.push(Row {
        figure: "proxy streams lost during the run (reopened after Envoy's backoff)".into(),
        run: r.label.clone(),
        measured: r.lost_streams.to_string(),
        target: "0".into(),
        floor: String::new(),
        verdict: verdict(Some(r.lost_streams == 0)),
    });
    for (name, changes, floor_times, bytes, write_target, write_limit) in [
        (
            "endpoint change",
            r.endpoint.as_ref(),
            floor.and_then(|f| f.endpoint.as_ref()),
            r.endpoint_bytes,
            "p99 <= 100 ms",
            100.0,
        ),
        (
            "global change",
            r.global.as_ref(),
            floor.and_then(|f| f.global.as_ref()),
            r.global_bytes,
            "p99 <= 1 s",
            1000.0,
        ),
    ] {
        let Some(c) = changes else { continue };
        let what = if name == "endpoint change" {
            "the new assignment".to_string()
        } else {
            format!("all {services} updated Clusters")
        };
        let write_p99 = p50_p99(&c.from_write).map(|(_, b)| b);
        let (write_ratio, _) = ratio(&c.from_write, floor_times);
        rows.push(Row {
            figure: format!("{name}: write -> every proxy has {what}, p50 / p99"),
            run: r.label.clone(),
            measured: dist(&c.from_write, c.missed),
            target: write_target.into(),
            floor: write_ratio,
            verdict: verdict(write_p99.map(|p| p <= write_limit && c.missed == 0)),
        });
        let (fan_ratio, fan_p99_ratio) = ratio(&c.fan_out, floor_times);
        rows.push(Row {
            figure: format!("{name}: fan-out, snapshot published -> proxy, p50 / p99"),
            run: r.label.clone(),
            measured: dist(&c.fan_out, c.missed),
            target: "p99 <= 3x floor".into(),
            floor: fan_ratio,
            verdict: verdict(fan_p99_ratio.map(|x| x <= 3.0)),
        });
        if let Some(f) = floor_times {
            rows.push(Row {
                figure: format!(
                    "{name}: transport floor, send -> proxy ({} per proxy), p50 / p99",
                    size(bytes)
                ),
                run: r.label.clone(),
                measured: dist(f, 0),
                target: String::new(),
                floor: String::new(),
                verdict: "",
            });
        }
    }
    let peak = |figure: &str, kb: Option<u64>, rows: &mut Vec<Row>| {
        if let Some(kb) = kb {
            rows.push(Row {
                figure: format!("discovery peak RSS (VmHWM) {figure}"),
                run: r.label.clone(),
                measured: format!("{:.0} MB", mb(kb)),
                target: "<= 128 MB".into(),
                floor: String::new(),
                verdict: verdict(Some(mb(kb) <= 128.0)),
            });
        }
    };
    let since = if r.peak_reset { "" } else { " (since start)" };
    peak(
        &format!("during initial sync{since}"),
        Some(r.peak_sync_kb),
        rows,
    );
    peak(
        &format!("during endpoint changes{since}"),
        r.peak_endpoint_kb,
        rows,
    );
    peak(
        &format!("during global changes{since}"),
        r.peak_global_kb,
        rows,
    );
    if let Some((agent, envoy)) = r.agent {
        rows.push(Row {
            figure: format!(
                "agent RSS with real Envoy, {services} clusters (Envoy itself {:.0} MB)",
                mb(envoy.rss_kb)
            ),
            run: r.label.clone(),
            measured: format!(
                "{:.1} MB (private {:.1} MB)",
                mb(agent.rss_kb),
                mb(agent.anon_kb)
            ),
            target: "<= 10 MB".into(),
            floor: String::new(),
            verdict: verdict(Some(mb(agent.rss_kb) <= 10.0)),
        });
    }
}

fn storm_rows(s: &StormResult, deadline_s: u64, flavour: &str, rows: &mut Vec<Row>) {
    let run = format!("storm {flavour}");
    let d = &s.discovery;
    let floor_all = s.floor.as_ref().and_then(|f| f.all_synced);
    let (measured, ok) = match d.all_synced {
        Some(t) => (
            format!("{:.2} s", t.as_secs_f64()),
            Some(t.as_secs_f64() <= 10.0),
        ),
        None => (
            format!("{} of {} in {deadline_s} s", d.synced, s.clients),
            Some(false),
        ),
    };
    let floor = match (d.all_synced, floor_all) {
        (Some(t), Some(f)) if f.as_secs_f64() > 0.0 => format!(
            "floor {:.2} s: {:.1}x",
            f.as_secs_f64(),
            t.as_secs_f64() / f.as_secs_f64()
        ),
        (None, Some(f)) => format!("floor {:.2} s", f.as_secs_f64()),
        (_, None) if s.floor.is_some() => "floor: not all synced".into(),
        _ => String::new(),
    };
    rows.push(Row {
        figure: format!(
            "storm: {} mTLS proxies connect at once, all have CDS+EDS ({} services, {} per proxy)",
            s.clients,
            s.services,
            size(s.initial_bytes)
        ),
        run: run.clone(),
        measured,
        target: "<= 10 s".into(),
        floor,
        verdict: verdict(ok),
    });
    rows.push(Row {
        figure: "storm: per proxy, start -> synced, p50 / p99".into(),
        run: run.clone(),
        measured: dist(&d.sync_ms, 0),
        target: String::new(),
        floor: s
            .floor
            .as_ref()
            .map(|f| format!("floor {}", dist(&f.sync_ms, 0)))
            .unwrap_or_default(),
        verdict: "",
    });
    rows.push(Row {
        figure: "storm: per proxy, start -> connected (TCP + TLS + HTTP/2), p50 / p99".into(),
        run: run.clone(),
        measured: dist(&d.connect_ms, 0),
        target: String::new(),
        floor: s
            .floor
            .as_ref()
            .map(|f| format!("floor {}", dist(&f.connect_ms, 0)))
            .unwrap_or_default(),
        verdict: "",
    });
    let never = s.clients - d.connected;
    rows.push(Row {
        figure: format!("storm: never connected within {deadline_s} s"),
        run: run.clone(),
        measured: format!(
            "{never} ({} failed attempts, {} streams lost)",
            d.connect_failures, d.stream_failures
        ),
        target: "0".into(),
        floor: String::new(),
        verdict: verdict(Some(never == 0 && d.synced == s.clients)),
    });
    let since = if s.peak_reset { "" } else { " (since start)" };
    rows.push(Row {
        figure: format!("storm: discovery peak RSS (VmHWM){since}"),
        run,
        measured: format!("{:.0} MB", mb(s.peak.hwm_kb)),
        target: "<= 256 MB".into(),
        floor: String::new(),
        verdict: verdict(Some(mb(s.peak.hwm_kb) <= 256.0)),
    });
}

pub fn print_table(
    title: &str,
    runs: &[RunResult],
    services: usize,
    storm: Option<(&StormResult, u64, &str)>,
) {
    let mut rows = Vec::new();
    for r in runs {
        run_rows(r, services, &mut rows);
    }
    if let Some((s, deadline, flavour)) = storm {
        storm_rows(s, deadline, flavour, &mut rows);
    }
    let header = Row {
        figure: "figure".into(),
        run: "run".into(),
        measured: "measured".into(),
        target: "target".into(),
        floor: "vs transport floor (p50 / p99)".into(),
        verdict: "",
    };
    let width = |f: fn(&Row) -> &str| {
        rows.iter()
            .chain(std::iter::once(&header))
            .map(|r| f(r).chars().count())
            .max()
            .unwrap_or(0)
    };
    let w = [
        width(|r| &r.figure),
        width(|r| &r.run),
        width(|r| &r.measured),
        width(|r| &r.target),
        width(|r| &r.floor),
        6,
    ];
    let line = |r: &Row| {
        format!(
            "| {:<w0$} | {:<w1$} | {:<w2$} | {:<w3$} | {:<w4$} | {:<w5$} |",
            r.figure,
            r.run,
            r.measured,
            r.target,
            r.floor,
            r.verdict,
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
            w5 = w[5]
        )
    };
    println!("\n{title}\n");
    println!("{}", line(&header));
    println!(
        "|{}|",
        w.iter()
            .map(|n| "-".repeat(n + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in &rows {
        println!("{}", line(r));
    }
}
