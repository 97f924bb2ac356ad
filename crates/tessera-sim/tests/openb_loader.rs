//! Malformed trace files: errors that name file, line and column, never a panic.

use std::path::PathBuf;

use tessera_sched::request::GpuRequest;
use tessera_sim::openb::{load_nodes, load_tasks, write_tasks};

struct Temp(PathBuf);

impl Temp {
    fn new(name: &str, body: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("tessera-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        Temp(path)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const POD_HEADER: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n";

#[test]
fn pods_convert_to_shares_whole_devices_and_cpu_only() {
    let f = Temp::new(
        "ok.csv",
        &format!(
            "{POD_HEADER}p0,1000,1024,1,460,\np1,8000,2048,1,1000,T4\np2,64000,4096,8,1000,V100M16|V100M32\np3,2000,512,0,0,\n"
        ),
    );
    let trace = load_tasks(&f.0).unwrap();
    let gpus: Vec<GpuRequest> = trace.tasks.iter().map(|t| t.request.gpu).collect();
    assert_eq!(
        gpus,
        vec![
            GpuRequest::Share { milli: 460 },
            GpuRequest::Whole { devices: 1 },
            GpuRequest::Whole { devices: 8 },
            GpuRequest::None
        ]
    );
    assert_eq!(
        trace.tasks[2].request.device_models,
        vec!["V100M16", "V100M32"]
    );
    assert_eq!(trace.tasks[0].request.memory_bytes, 1024 << 20);
    assert_eq!(trace.name, "ok");
}

#[test]
fn a_bad_number_names_file_line_and_column() {
    let f = Temp::new(
        "bad_number.csv",
        &format!("{POD_HEADER}p0,1000,1024,1,460,\np1,abc,1024,1,460,\n"),
    );
    let err = load_tasks(&f.0).unwrap_err();
    assert_eq!(err.line, 3);
    assert_eq!(err.column.as_deref(), Some("cpu_milli"));
    let text = err.to_string();
    assert!(
        text.contains("bad_number.csv:3: column cpu_milli"),
        "{text}"
    );
}

#[test]
fn a_share_spread_over_several_devices_is_refused() {
    let f = Temp::new(
        "bad_share.csv",
        &format!("{POD_HEADER}p0,1000,1024,2,500,\n"),
    );
    let err = load_tasks(&f.0).unwrap_err();
    assert_eq!((err.line, err.column.as_deref()), (2, Some("gpu_milli")));
    assert!(err.message.contains("whole devices"), "{}", err.message);
}

#[test]
fn a_row_with_missing_fields_or_missing_columns_is_an_error() {
    let f = Temp::new("short.csv", &format!("{POD_HEADER}p0,1000,1024\n"));
    let err = load_tasks(&f.0).unwrap_err();
    assert_eq!(err.line, 2);
    let f = Temp::new("nocol.csv", "name,cpu_milli\np0,1\n");
    let err = load_tasks(&f.0).unwrap_err();
    assert_eq!(err.column.as_deref(), Some("memory_mib"));
    let err = load_tasks(&PathBuf::from("/nonexistent/pods.csv")).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[test]
fn node_lists_need_models_for_gpus_and_accept_cpu_only_nodes() {
    let f = Temp::new(
        "nodes.csv",
        "sn,cpu_milli,memory_mib,gpu,model\nn0,32000,1024,2,T4\nn1,32000,1024,0,nan\n",
    );
    let nodes = load_nodes(&f.0).unwrap();
    assert_eq!(nodes[0].devices.len(), 2);
    assert_eq!(nodes[0].devices[0].memory_bytes, 15109 << 20);
    assert!(nodes[1].devices.is_empty());
    let f = Temp::new(
        "nodes_bad.csv",
        "sn,cpu_milli,memory_mib,gpu,model\nn0,32000,1024,2,\n",
    );
    let err = load_nodes(&f.0).unwrap_err();
    assert_eq!((err.line, err.column.as_deref()), (2, Some("model")));
    let f = Temp::new("nodes_empty.csv", "sn,cpu_milli,memory_mib,gpu,model\n");
    assert!(load_nodes(&f.0).unwrap_err().message.contains("no nodes"));
}

#[test]
fn a_written_pod_list_reads_back_the_same_tasks() {
    let f = Temp::new(
        "roundtrip.csv",
        &format!(
            "{POD_HEADER}p0,1000,1024,1,460,\np1,8000,2048,1,1000,T4\np2,64000,4096,8,1000,V100M16|V100M32\np3,2000,512,0,0,\n"
        ),
    );
    let trace = load_tasks(&f.0).unwrap();
    let mut written = Vec::new();
    write_tasks(&trace, &mut written).unwrap();
    let again = Temp::new("roundtrip2.csv", std::str::from_utf8(&written).unwrap());
    assert_eq!(load_tasks(&again.0).unwrap().tasks, trace.tasks);
}
