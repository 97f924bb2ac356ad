//! `tessera sim openb` as a user runs it: a real process, real files.

use std::path::PathBuf;
use std::process::Command;

fn testdata(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(rel)
        .display()
        .to_string()
}

/// `sim openb` on the shipped default trace, plus `extra` arguments.
fn sim_default(extra: &[&str]) -> std::process::Output {
    let nodes = testdata("openb/openb_node_list_gpu_node.csv");
    let pods = testdata("openb/openb_pod_list_default.csv");
    let mut args = vec!["sim", "openb", "--nodes", &nodes, "--pods", &pods];
    args.extend_from_slice(extra);
    tessera(&args)
}

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

#[test]
fn json_output_has_one_object_per_policy_with_published_values() {
    let out = sim_default(&["--policy", "FGD,Tessera", "--seeds", "42..43", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["trace"], "openb_pod_list_default");
        assert_eq!(row["seeds"], serde_json::json!([42, 43]));
        for field in [
            "unallocated_pct_at_100_mean",
            "unallocated_pct_at_100_sd",
            "unallocated_pct_at_130_mean",
        ] {
            let v = row[field].as_f64().unwrap();
            assert!((0.0..100.0).contains(&v), "{field} = {v}");
        }
    }
    assert_eq!(rows[0]["policy"], "FGD");
    // The published FGD mean on the default trace is 4.77 (found next to the traces).
    let published = rows[0]["published_unallocated_pct_at_100_mean"]
        .as_f64()
        .unwrap();
    assert!((published - 4.77).abs() < 0.01, "{published}");
    assert!(rows[1]["published_unallocated_pct_at_100_mean"].is_null());
}

#[test]
fn out_dir_gets_curves_summary_and_a_png() {
    let dir = std::env::temp_dir().join(format!("tessera-sim-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = sim_default(&[
        "--policy",
        "BestFit",
        "--seeds",
        "42",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("BestFit") && table.contains("published@100"),
        "{table}"
    );
    let curves = std::fs::read_to_string(dir.join("curves.csv")).unwrap();
    assert!(curves.starts_with("trace,policy,seed,arrived_pct,allocated_pct,unallocated_pct"));
    assert_eq!(curves.lines().count(), 1 + 131);
    let png = std::fs::read(dir.join("openb_pod_list_default.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "a real plot, not an empty image");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_fail_with_an_actionable_message() {
    let nodes = testdata("openb/openb_node_list_gpu_node.csv");
    let pods = testdata("openb/openb_pod_list_default.csv");
    let cases: [(&[&str], &str); 3] = [
        (
            &["--nodes", &nodes, "--pods", &pods, "--policy", "tetris"],
            "--policy tetris: unknown policy",
        ),
        (
            &["--nodes", &nodes, "--pods", &pods, "--seeds", "51..42"],
            "--seeds 51..42: the range is empty",
        ),
        (
            &["--nodes", "/nonexistent.csv", "--pods", &pods],
            "/nonexistent.csv: cannot open",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["sim", "openb"];
        args.extend_from_slice(extra);
        let out = tessera(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
