//! The API document served at /openapi.json matches the server: Schemathesis (from PyPI, put
//! there by scripts/test-deps.sh) generates requests from the document against a live
//! controller and checks every answer: status codes and content types the document declares,
//! bodies that match their schemas, JSON errors, schema-violating requests refused.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_api_document_matches_the_server_under_schemathesis() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["controller", "--data-dir"])
        .arg(dir.path().join("controller"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--gateway-listen",
            "off",
        ])
        .env("TESSERA_CONFIG", dir.path().join("cli.yaml"))
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let controller = Killed(child);
    let token = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("First admin token (shown once): ")
                .map(str::to_string)
        })
        .expect("the controller prints its first admin token");
    let out = Command::new("st")
        .args(["run", &format!("http://127.0.0.1:{port}/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        // A schema cannot say every rule (a name free in the pool, memory of at least 16 MiB
        // written with units, a node no larger than any machine): such requests are refused
        // with a 4xx naming the field, which the pool tests check; every other check runs.
        .args(["--exclude-checks", "positive_data_acceptance"])
        // The fuzzer would revoke its own token and test nothing after.
        .args(["--exclude-path", "/v1/tokens/{id}"])
        .args([
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "20",
            "--seed",
            "42",
        ])
        .arg("--no-color")
        // Its cache of found crashes goes with the test's temp dir, not into the repository.
        .current_dir(dir.path())
        .output()
        .expect("running schemathesis (`st`); scripts/test-deps.sh installs it");
    drop(controller);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found mismatches:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
}
