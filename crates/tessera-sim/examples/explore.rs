use std::path::Path;
use tessera_sched::policy::PolicyKind;
use tessera_sim::{grid::run_grid, metrics::mean_sd, openb};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new("/work/shared/traces/openb");
    let nodes = openb::load_nodes(&dir.join("openb_node_list_gpu_node.csv")).unwrap();
    let trace = openb::load_tasks(&dir.join(format!("openb_pod_list_{}.csv", args[1]))).unwrap();
    let policies: Vec<PolicyKind> = args[2]
        .split(',')
        .map(|p| PolicyKind::from_name(p).unwrap())
        .collect();
    let nseeds: u64 = args.get(3).map_or(10, |s| s.parse().unwrap());
    let seeds: Vec<u64> = (42..42 + nseeds).collect();
    let t = std::time::Instant::now();
    let res = run_grid(&nodes, &[trace], &policies, &seeds, &|_| {}).unwrap();
    for p in &policies {
        let v: Vec<f64> = res
            .iter()
            .filter(|r| r.policy == *p)
            .map(|r| r.curve.unallocated_at(100).unwrap())
            .collect();
        let (m, sd) = mean_sd(&v);
        println!(
            "{:14} {:6.2} ± {:4.2}   {:?}",
            p.name(),
            m,
            sd,
            v.iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
    eprintln!("{:.1}s", t.elapsed().as_secs_f64());
}
