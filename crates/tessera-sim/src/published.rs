//! The FGD authors' own per-run results (`analysis_allo_discrete.csv` of their artifact), so our
//! numbers print beside theirs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::metrics::{Curve, MAX_ARRIVED_PCT};
use crate::openb::TraceError;

/// Published allocation curves keyed by (workload, policy label such as `06-FGD`), one per seed.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub runs: BTreeMap<(String, String), Vec<(u64, Curve)>>,
}

impl Published {
    /// Reads the published allocation file.
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let err = |line: u64, column: Option<&str>, message: String| TraceError {
            file: path.to_owned(),
            line,
            column: column.map(str::to_owned),
            message,
        };
        let mut reader =
            csv::Reader::from_path(path).map_err(|e| err(0, None, format!("cannot open: {e}")))?;
        let headers = reader
            .headers()
            .map_err(|e| err(1, None, format!("cannot read the header: {e}")))?
            .clone();
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(wc), Some(pc), Some(sc), Some(first)) =
            (col("workload"), col("sc_policy"), col("seed"), col("0"))
        else {
            return Err(err(
                1,
                None,
                "expected columns workload, sc_policy, seed and 0..130".into(),
            ));
        };
        let mut out = Published::default();
        for record in reader.records() {
            let record = record.map_err(|e| {
                err(
                    e.position().map_or(0, |p| p.line()),
                    None,
                    format!("malformed row: {e}"),
                )
            })?;
            let line = record.position().map_or(0, |p| p.line());
            let seed: u64 = record
                .get(sc)
                .unwrap_or("")
                .trim()
                .parse()
                .map_err(|_| err(line, Some("seed"), "not a whole number".into()))?;
            let mut alloc_pct = Vec::with_capacity(MAX_ARRIVED_PCT + 1);
            for pct in 0..=MAX_ARRIVED_PCT {
                let text = record.get(first + pct).unwrap_or("").trim();
                alloc_pct.push(if text.is_empty() {
                    None
                } else {
                    Some(text.parse::<f64>().map_err(|_| {
                        err(
                            line,
                            Some(&pct.to_string()),
                            format!("{text:?} is not a number"),
                        )
                    })?)
                });
            }
            out.runs
                .entry((
                    record.get(wc).unwrap_or("").to_owned(),
                    record.get(pc).unwrap_or("").to_owned(),
                ))
                .or_default()
                .push((seed, Curve { alloc_pct }));
        }
        Ok(out)
    }

    /// Per-seed published curves of one trace and policy label.
    pub fn curves(&self, trace: &str, label: &str) -> Option<&[(u64, Curve)]> {
        self.runs
            .get(&(trace.to_owned(), label.to_owned()))
            .map(Vec::as_slice)
    }
}
