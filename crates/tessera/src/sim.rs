//! `tessera sim openb`: replays the Alibaba openb traces with the FGD paper's protocol and prints
//! our numbers beside the published ones.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_sched::policy::PolicyKind;
use tessera_sim::constrain::{ConstrainSpec, SetChoice, constrain};
use tessera_sim::grid::run_grid;
use tessera_sim::openb::{Trace, load_nodes, load_tasks, write_tasks};
use tessera_sim::plot::plot_trace;
use tessera_sim::published::Published;
use tessera_sim::report::{summarize, table, write_curves_csv};

#[derive(Subcommand)]
pub enum SimCommand {
    /// Replay openb pod lists on an openb node list (FGD paper protocol: shuffle, tune to 130%
    /// of GPU capacity, one-shot placement, no departures).
    Openb(OpenbArgs),
    /// Write a constrained variant of a pod list: a share of its GPU tasks name the device models
    /// they accept (openb's gpu_spec column), drawn from the models of a node list.
    Constrain(ConstrainArgs),
}

#[derive(Args)]
pub struct ConstrainArgs {
    /// Node list whose models the pinned tasks choose from.
    #[arg(long, value_name = "FILE")]
    nodes: PathBuf,
    /// The pod list to constrain.
    #[arg(long, value_name = "FILE")]
    pods: PathBuf,
    /// Share of GPU tasks that pin models, 0 to 1.
    #[arg(long)]
    share: f64,
    /// How a pinned task's models are drawn: plentiful (one model, in proportion to its GPUs),
    /// scarce (one model other than the most common), family (two or three models).
    #[arg(long)]
    sets: SetChoice,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the variant; by default `<pods stem>_spec<NN>_<sets>.csv` in the current
    /// directory.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args)]
pub struct OpenbArgs {
    /// Node list, e.g. openb_node_list_gpu_node.csv.
    #[arg(long, value_name = "FILE")]
    nodes: PathBuf,
    /// Pod list(s); repeat the flag to replay several traces in one run.
    #[arg(long, value_name = "FILE", required = true)]
    pods: Vec<PathBuf>,
    /// Policy name, a comma-separated list, or `all`
    /// (Random, DotProd, GpuClustering, GpuPacking, BestFit, FGD, Tessera).
    #[arg(long, default_value = "all")]
    policy: String,
    /// Seeds: a range `42..51` (inclusive), a list `42,43`, or one seed.
    #[arg(long, default_value = "42..51")]
    seeds: String,
    /// Output format on stdout.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// Also write every curve as CSV and one PNG plot per trace into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The FGD paper's analysis_allo_discrete.csv; by default looked up as
    /// ../fgd-results/analysis_allo_discrete.csv beside the first pod list's directory.
    #[arg(long, value_name = "FILE")]
    published: Option<PathBuf>,
    /// Where every task of at most one device may take its GPU from: `any` lets a task that fits
    /// on no single node run its CPU part on one node and attach its device from another (remote
    /// GPUs); tasks of several devices stay local. The published results are all `local`.
    #[arg(long, value_enum, default_value = "local")]
    gpu_attach: Attach,
}

#[derive(Clone, Copy, ValueEnum)]
enum Attach {
    Local,
    Any,
    Remote,
}

/// Gives every task of at most one device the attachment `attach`.
fn with_attachment(mut trace: Trace, attach: Attach) -> Trace {
    let attach = match attach {
        Attach::Local => return trace,
        Attach::Any => tessera_sched::GpuAttach::Any,
        Attach::Remote => tessera_sched::GpuAttach::Remote,
    };
    for task in &mut trace.tasks {
        let gpu = task.request.gpu;
        if gpu != tessera_sched::GpuRequest::None && gpu.device_count() <= 1 {
            task.request.gpu_attach = attach;
        }
    }
    trace
}

pub fn run(cmd: SimCommand) -> Result<()> {
    match cmd {
        SimCommand::Openb(args) => openb(args),
        SimCommand::Constrain(args) => constrain_trace(args),
    }
}

fn constrain_trace(args: ConstrainArgs) -> Result<()> {
    let nodes = load_nodes(&args.nodes)?;
    let trace = load_tasks(&args.pods)?;
    let spec = ConstrainSpec {
        share: args.share,
        sets: args.sets,
        seed: args.seed,
    };
    let (variant, report) =
        constrain(&trace, &nodes, &spec).map_err(|e| anyhow::anyhow!("--{e}"))?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.csv", variant.name)));
    let file = fs::File::create(&out).with_context(|| format!("writing {}", out.display()))?;
    write_tasks(&variant, std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", out.display()))?;
    let mut sets: Vec<(&String, &usize)> = report.sets.iter().collect();
    sets.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let top: Vec<String> = sets
        .iter()
        .take(6)
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    println!(
        "wrote {}: {} of {} GPU tasks pin models ({}){}",
        out.display(),
        report.pinned,
        report.gpu_tasks,
        top.join(", "),
        if report.unplaceable > 0 {
            format!(
                "; {} fit no node of any model and stay unpinned",
                report.unplaceable
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Reads `42..51`, `42..=51`, `42,43,50` or `42`.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let bad = || {
        anyhow::anyhow!(
            "--seeds {text}: not a seed list; write a range like 42..51 (inclusive), a list like 42,43, or one seed"
        )
    };
    let text = text.trim();
    if let Some((lo, hi)) = text.split_once("..") {
        let hi = hi.strip_prefix('=').unwrap_or(hi);
        let lo: u64 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u64 = hi.trim().parse().map_err(|_| bad())?;
        if hi < lo {
            bail!("--seeds {text}: the range is empty; write it low..high, e.g. 42..51");
        }
        if hi - lo >= 10_000 {
            bail!("--seeds {text}: more than 10000 seeds; narrow the range");
        }
        return Ok((lo..=hi).collect());
    }
    let seeds: Vec<u64> = text
        .split(',')
        .map(|s| s.trim().parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if seeds.is_empty() {
        return Err(bad());
    }
    Ok(seeds)
}

/// Reads `all`, one policy name, or a comma-separated list.
pub fn parse_policies(text: &str) -> Result<Vec<PolicyKind>> {
    if text.trim().eq_ignore_ascii_case("all") {
        return Ok(PolicyKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        let Some(kind) = PolicyKind::from_name(name) else {
            let names: Vec<&str> = PolicyKind::ALL.iter().map(|k| k.name()).collect();
            bail!(
                "--policy {name}: unknown policy; choose one of {}, or all",
                names.join(", ")
            );
        };
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    Ok(out)
}

fn default_published(pods: &Path) -> Option<PathBuf> {
    let dir = pods.canonicalize().ok()?.parent()?.parent()?.to_path_buf();
    let candidate = dir.join("fgd-results").join("analysis_allo_discrete.csv");
    candidate.is_file().then_some(candidate)
}

fn openb(args: OpenbArgs) -> Result<()> {
    let seeds = parse_seeds(&args.seeds)?;
    let policies = parse_policies(&args.policy)?;
    let nodes = load_nodes(&args.nodes)?;
    let traces: Vec<Trace> = args
        .pods
        .iter()
        .map(|p| load_tasks(p).map(|t| with_attachment(t, args.gpu_attach)))
        .collect::<Result<_, _>>()?;
    let published_path = args
        .published
        .clone()
        .or_else(|| default_published(&args.pods[0]));
    let published = published_path
        .as_deref()
        .map(Published::load)
        .transpose()
        .context("reading the published results (--published)")?;

    let total = traces.len() * policies.len() * seeds.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replaying [{bar:40}] {pos}/{len} runs  {elapsed_precise} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let results = run_grid(&nodes, &traces, &policies, &seeds, &|_| bar.inc(1))?;
    bar.finish_and_clear();

    let rows = summarize(&results, published.as_ref());
    match args.output {
        Output::Table => print!("{}", table(&rows)),
        Output::Json => {
            for row in &rows {
                println!("{}", serde_json::to_string(row)?);
            }
        }
    }
    if let Some(dir) = &args.out {
        fs::create_dir_all(dir).with_context(|| format!("creating --out {}", dir.display()))?;
        let curves = dir.join("curves.csv");
        let mut file =
            fs::File::create(&curves).with_context(|| format!("writing {}", curves.display()))?;
        write_curves_csv(&results, &mut file)
            .with_context(|| format!("writing {}", curves.display()))?;
        let summary = dir.join("summary.json");
        fs::write(&summary, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", summary.display()))?;
        for trace in &traces {
            let png = dir.join(format!("{}.png", trace.name));
            plot_trace(&png, &trace.name, &results, published.as_ref())?;
        }
        eprintln!(
            "wrote {}, {} and {} plot(s) to {}",
            curves.display(),
            summary.display(),
            traces.len(),
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_is_given_to_tasks_of_one_device_at_most() {
        use tessera_sched::{GpuAttach, GpuRequest, ResourceRequest};
        use tessera_sim::openb::TraceTask;
        let task = |gpu| TraceTask {
            name: "t".into(),
            request: ResourceRequest {
                gpu,
                cpu_milli: 1000,
                ..Default::default()
            },
        };
        let trace = Trace {
            name: "x".into(),
            tasks: vec![
                task(GpuRequest::None),
                task(GpuRequest::Share { milli: 500 }),
                task(GpuRequest::Whole { devices: 1 }),
                task(GpuRequest::Whole { devices: 2 }),
            ],
        };
        let local = with_attachment(trace.clone(), Attach::Local);
        assert!(
            local
                .tasks
                .iter()
                .all(|t| t.request.gpu_attach == GpuAttach::Local)
        );
        let any = with_attachment(trace, Attach::Any);
        let got: Vec<GpuAttach> = any.tasks.iter().map(|t| t.request.gpu_attach).collect();
        assert_eq!(
            got,
            [
                GpuAttach::Local,
                GpuAttach::Any,
                GpuAttach::Any,
                GpuAttach::Local
            ]
        );
    }

    #[test]
    fn seeds_accept_ranges_lists_and_single_values() {
        assert_eq!(
            parse_seeds("42..51").unwrap(),
            (42..=51).collect::<Vec<_>>()
        );
        assert_eq!(parse_seeds("42..=43").unwrap(), vec![42, 43]);
        assert_eq!(parse_seeds("7, 9").unwrap(), vec![7, 9]);
        assert_eq!(parse_seeds("5").unwrap(), vec![5]);
        let err = parse_seeds("51..42").unwrap_err().to_string();
        assert!(
            err.contains("--seeds 51..42") && err.contains("low..high"),
            "{err}"
        );
        assert!(parse_seeds("a..b").is_err());
        assert!(parse_seeds("").is_err());
    }

    #[test]
    fn policies_accept_all_names_and_lists() {
        assert_eq!(parse_policies("all").unwrap().len(), 7);
        assert_eq!(
            parse_policies("fgd,Tessera,FGD").unwrap(),
            vec![PolicyKind::Fgd, PolicyKind::Tessera]
        );
        let err = parse_policies("tetris").unwrap_err().to_string();
        assert!(
            err.contains("--policy tetris") && err.contains("BestFit"),
            "{err}"
        );
    }
}
