//! Loaders for the Alibaba openb GPU-cluster traces (cluster-trace-gpu-v2023), the traces of the
//! FGD paper: a node list (`sn,cpu_milli,memory_mib,gpu,model`) and pod lists
//! (`name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`).
//!
//! A malformed row is an error that names the file, the line and the column; never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

use tessera_sched::model::{DeviceSpec, MIB, MILLI_PER_DEVICE, NodeSpec};
use tessera_sched::request::{GpuRequest, ResourceRequest};

/// A trace file that cannot be read or has a bad value.
#[derive(Debug, thiserror::Error)]
pub struct TraceError {
    pub file: PathBuf,
    /// 1-based line in the file (0 when the file could not be opened).
    pub line: u64,
    /// Column name, when one field is at fault.
    pub column: Option<String>,
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(column) = &self.column {
            write!(f, ": column {column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One task of a pod list, converted to a Tessera request.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceTask {
    pub name: String,
    pub request: ResourceRequest,
}

/// A pod list.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The file stem, e.g. `openb_pod_list_default` (the name the FGD results use).
    pub name: String,
    pub tasks: Vec<TraceTask>,
}

/// Device memory of the models the openb traces name, from the reference simulator's table;
/// undisclosed models (G1, G2, G3) are unknown (0).
pub fn device_memory_mib(model: &str) -> u64 {
    match model {
        "P4" => 7611,
        "2080" => 11019,
        "1080" => 11178,
        "M40" => 11448,
        "T4" => 15109,
        "V100M16" => 16160,
        "P100" => 16280,
        "A10" => 22731,
        "3090" => 24268,
        "V100M32" => 32510,
        "A100" => 81251,
        _ => 0,
    }
}

struct Table {
    file: PathBuf,
    headers: Vec<String>,
    reader: csv::Reader<std::fs::File>,
}

struct Row<'a> {
    file: &'a Path,
    line: u64,
    headers: &'a [String],
    record: csv::StringRecord,
}

impl Table {
    fn open(path: &Path, required: &[&str]) -> Result<Table, TraceError> {
        let io = |message: String| TraceError {
            file: path.to_owned(),
            line: 0,
            column: None,
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| io(format!("cannot open: {e}")))?;
        let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(file);
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| TraceError {
                line: 1,
                ..io(format!("cannot read the header: {e}"))
            })?
            .iter()
            .map(|h| h.trim().to_owned())
            .collect();
        for column in required {
            if !headers.iter().any(|h| h == column) {
                return Err(TraceError {
                    file: path.to_owned(),
                    line: 1,
                    column: Some((*column).to_owned()),
                    message: format!(
                        "the header has no column {column:?} (found: {})",
                        headers.join(",")
                    ),
                });
            }
        }
        Ok(Table {
            file: path.to_owned(),
            headers,
            reader,
        })
    }

    fn for_each(
        &mut self,
        mut f: impl FnMut(&Row) -> Result<(), TraceError>,
    ) -> Result<(), TraceError> {
        let mut record = csv::StringRecord::new();
        loop {
            let line = self.reader.position().line();
            match self.reader.read_record(&mut record) {
                Ok(false) => return Ok(()),
                Ok(true) => {
                    let row = Row {
                        file: &self.file,
                        line: record.position().map_or(line, |p| p.line()),
                        headers: &self.headers,
                        record: record.clone(),
                    };
                    f(&row)?;
                }
                Err(e) => {
                    let line = e.position().map_or(line, |p| p.line());
                    return Err(TraceError {
                        file: self.file.clone(),
                        line,
                        column: None,
                        message: format!("malformed row: {e}"),
                    });
                }
            }
        }
    }
}

impl Row<'_> {
    fn error(&self, column: &str, message: impl Into<String>) -> TraceError {
        TraceError {
            file: self.file.to_owned(),
            line: self.line,
            column: Some(column.to_owned()),
            message: message.into(),
        }
    }

    fn text(&self, column: &str) -> &str {
        self.headers
            .iter()
            .position(|h| h == column)
            .and_then(|i| self.record.get(i))
            .map_or("", str::trim)
    }

    fn number(&self, column: &str) -> Result<u64, TraceError> {
        let text = self.text(column);
        text.parse::<u64>().map_err(|_| {
            self.error(
                column,
                format!("{text:?} is not a whole number of zero or more"),
            )
        })
    }
}

/// Reads a node list. Nodes with no GPU carry an empty (or `nan`) model.
pub fn load_nodes(path: &Path) -> Result<Vec<NodeSpec>, TraceError> {
    let mut table = Table::open(path, &["sn", "cpu_milli", "memory_mib", "gpu", "model"])?;
    let mut nodes = Vec::new();
    table.for_each(|row| {
        let name = row.text("sn").to_owned();
        if name.is_empty() {
            return Err(row.error("sn", "the node name is empty"));
        }
        let cpu_milli = row.number("cpu_milli")?;
        if cpu_milli == 0 {
            return Err(row.error("cpu_milli", "a node must have some CPU"));
        }
        let memory_mib = row.number("memory_mib")?;
        if memory_mib == 0 {
            return Err(row.error("memory_mib", "a node must have some memory"));
        }
        let gpus = row.number("gpu")?;
        if gpus > 64 {
            return Err(row.error("gpu", format!("{gpus} devices on one node; at most 64")));
        }
        let model = row.text("model");
        let model = if model.eq_ignore_ascii_case("nan") {
            ""
        } else {
            model
        };
        if gpus > 0 && model.is_empty() {
            return Err(row.error("model", "a node with GPUs needs a model name"));
        }
        let device = DeviceSpec {
            class: Default::default(),
            model: model.to_owned(),
            memory_bytes: device_memory_mib(model) * MIB,
        };
        nodes.push(NodeSpec::with_devices(
            name,
            cpu_milli,
            memory_mib * MIB,
            gpus as usize,
            device,
        ));
        Ok(())
    })?;
    if nodes.is_empty() {
        return Err(TraceError {
            file: path.to_owned(),
            line: 0,
            column: None,
            message: "the node list has no nodes".into(),
        });
    }
    Ok(nodes)
}

/// Reads a pod list and converts each pod into a request.
pub fn load_tasks(path: &Path) -> Result<Trace, TraceError> {
    let mut table = Table::open(
        path,
        &["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"],
    )?;
    let has_spec = table.headers.iter().any(|h| h == "gpu_spec");
    let mut tasks = Vec::new();
    table.for_each(|row| {
        let name = row.text("name").to_owned();
        if name.is_empty() {
            return Err(row.error("name", "the task name is empty"));
        }
        let cpu_milli = row.number("cpu_milli")?;
        let memory_mib = row.number("memory_mib")?;
        let num_gpu = row.number("num_gpu")?;
        let gpu_milli = row.number("gpu_milli")?;
        let milli_per_device = u64::from(MILLI_PER_DEVICE);
        let gpu = match (num_gpu, gpu_milli) {
            (0, 0) => GpuRequest::None,
            (0, _) => {
                return Err(row.error(
                    "gpu_milli",
                    format!("{gpu_milli} milli-GPU on a task with num_gpu 0; set it to 0"),
                ));
            }
            (_, 0) => {
                return Err(row.error(
                    "gpu_milli",
                    format!("0 milli-GPU per device on a task with num_gpu {num_gpu}"),
                ));
            }
            (_, m) if m > milli_per_device => {
                return Err(row.error(
                    "gpu_milli",
                    format!("{m} milli-GPU per device; a device has 1000"),
                ));
            }
            (1, m) if m < milli_per_device => GpuRequest::Share { milli: m as u32 },
            (n, m) if m == milli_per_device && n <= 64 => GpuRequest::Whole { devices: n as u32 },
            (n, m) if m == milli_per_device => {
                return Err(row.error("num_gpu", format!("{n} devices; at most 64 per task")));
            }
            (n, m) => {
                return Err(row.error(
                    "gpu_milli",
                    format!(
                        "{m} milli-GPU on each of {n} devices; a task above one device takes whole devices (1000)"
                    ),
                ));
            }
        };
        let device_models = if has_spec {
            row.text("gpu_spec")
                .split('|')
                .map(str::trim)
                .filter(|m| !m.is_empty() && !m.eq_ignore_ascii_case("nan"))
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        if cpu_milli == 0 && gpu == GpuRequest::None {
            return Err(row.error("cpu_milli", "a task with no GPU must ask for some CPU"));
        }
        tasks.push(TraceTask {
            name,
            request: ResourceRequest { gpu_attach: Default::default(),
                gpu,
                gpu_memory_bytes: 0,
                cpu_milli,
                memory_bytes: memory_mib * MIB,
                device_models,
                node_selector: Default::default(),
            },
        });
        Ok(())
    })?;
    let name = path
        .file_stem()
        .map_or_else(|| "trace".into(), |s| s.to_string_lossy().into_owned());
    Ok(Trace { name, tasks })
}

/// Writes a pod list in openb's format (`name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec`),
/// so that a generated variant replays like any published trace.
pub fn write_tasks(trace: &Trace, out: impl std::io::Write) -> std::io::Result<()> {
    let mut writer = csv::Writer::from_writer(out);
    writer.write_record([
        "name",
        "cpu_milli",
        "memory_mib",
        "num_gpu",
        "gpu_milli",
        "gpu_spec",
    ])?;
    for task in &trace.tasks {
        let r = &task.request;
        writer.write_record([
            task.name.clone(),
            r.cpu_milli.to_string(),
            (r.memory_bytes / MIB).to_string(),
            r.gpu.device_count().to_string(),
            r.gpu.per_device_milli().to_string(),
            r.device_models.join("|"),
        ])?;
    }
    writer.flush()
}
