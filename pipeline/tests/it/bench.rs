//! `pipeline bench` on a few labelled photos, against a real nats-server (with
//! its monitoring port), PostgreSQL, the stage binaries and `perf`: the paired
//! comparison of two builds and the account of CPU by process and operation.

use crate::support::{bin_dir, free_port, shared_dir, Deployment, NatsServer};

/// The numbers of the line of `text` that starts with `label`.
fn figures(text: &str, label: &str) -> Vec<f64> {
    let line = text.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no line `{label}` in:\n{text}"));
    line[label.len()..].split_whitespace().filter_map(|v| v.parse().ok()).collect()
}

#[tokio::test]
async fn bench_compares_two_builds_and_accounts_for_each_process_and_operation() {
    let monitor = free_port();
    let nats = NatsServer::start_with_args(&["-m", &monitor.to_string()]);
    let nats_pid = nats.pid().unwrap();
    let deployment = Deployment::start_on_server(nats, |_| {}, &[]).await;
    let corpus = tempfile::tempdir().unwrap();
    let mut photos: Vec<_> = std::fs::read_dir(shared_dir().join("data/faces/wider_val_subset"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    photos.sort();
    for p in photos.iter().take(8) {
        std::fs::copy(p, corpus.path().join(p.file_name().unwrap())).unwrap();
    }

    // B is this build's binaries too: the test is about the figures, not a speed-up.
    let out = deployment
        .command("pipeline")
        .arg("bench")
        .arg(corpus.path())
        .args(["--account", "--rounds", "1", "--nats-pid", &nats_pid.to_string()])
        .arg("--nats-monitor")
        .arg(format!("http://127.0.0.1:{monitor}"))
        .arg("--baseline-bin")
        .arg(bin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));

    assert!(text.contains("(8 images,"), "{text}");
    let ratio = figures(&text, "images/s");
    assert!(ratio.len() == 3 && ratio.iter().all(|v| *v > 0.0), "paired images/s A, B, A/B: {ratio:?}");
    // Every image needs a pull, a publish and an ack from detect, at least.
    let detect_messages = figures(&text, "facepipe-detect");
    assert!(detect_messages[0] >= 2.0 && detect_messages[1] >= 1.0, "detect's messages per image: {detect_messages:?}\n{text}");
    assert!(figures(&text, "database")[0] > 0.0, "{text}");

    // Both accounts, with the floor and every process in its own column.
    let account = text.split("account     A (this build)").nth(1).unwrap_or_else(|| panic!("no account in:\n{text}"));
    let header: Vec<&str> = account.lines().nth(1).unwrap().split_whitespace().skip(4).collect();
    for role in ["floor", "detect", "crop", "nats", "postgres"] {
        assert!(header.contains(&role), "no `{role}` column in {header:?}");
    }
    let column = |row: &str, role: &str| -> f64 {
        let cells = &account.lines().find(|l| l.starts_with(row)).unwrap_or_else(|| panic!("no row `{row}`:\n{account}"))[44..];
        // Cells are 9 characters wide, in the header's order; an empty cell is zero.
        let i = header.iter().position(|h| *h == role).unwrap();
        cells.get(i * 9..(i + 1) * 9).map(str::trim).filter(|c| !c.is_empty()).map_or(0.0, |c| c.parse().unwrap())
    };
    let work = "image work (decode, detect, crop, encode)";
    assert!(column(work, "floor") > 0.0 && column(work, "detect") > 0.0, "{account}");
    assert_eq!(column(work, "nats"), 0.0, "nats-server does no image work:\n{account}");
    let all = figures(account.lines().find(|l| l.starts_with("all ")).unwrap(), "all");
    assert!(all.iter().all(|v| v.is_finite()) && all[all.len() - 2] > all[0] * 0.5, "{account}");
    assert!(text.contains("account     B (baseline)"), "{text}");
}
