//! Services: long-running replicas behind the controller's HTTP gateway.
//!
//! A service is a set of one-replica jobs placed one by one (not a gang), each told a port
//! (`$PORT`) and probed for readiness by the gateway, which routes requests to ready replicas.
//! Moves and scale-downs are make-before-break: a replacement must be ready before the old
//! replica stops taking requests, and the old one stops only once its requests are done.

use serde::{Deserialize, Serialize};
use tessera_sched::ValidationError;

use crate::units::parse_duration;

/// `spec.service` as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceManifest {
    /// `auto` (default: the agent picks a free port) or a fixed port.
    #[serde(default)]
    pub port: Option<serde_yaml::Value>,
    #[serde(default)]
    pub readiness: Option<ReadinessManifest>,
    #[serde(default)]
    pub autoscale: Option<AutoscaleManifest>,
    /// How long a replica being removed may take to finish its requests (default 30s).
    #[serde(default)]
    pub drain: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReadinessManifest {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub period: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoscaleManifest {
    pub min: u32,
    pub max: u32,
    /// Requests in flight per replica to aim for.
    #[serde(default)]
    pub target_in_flight: Option<f64>,
    /// Requests per second per replica to aim for.
    #[serde(default)]
    pub target_rps: Option<f64>,
    /// How long the load must stay low before replicas are removed (default 30s).
    #[serde(default)]
    pub scale_down_delay: Option<String>,
}

/// A service's settings, checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDef {
    /// Replicas wanted now (the autoscaler changes it between min and max).
    pub replicas: u32,
    /// A fixed port, or `None` for one the agent picks.
    pub port: Option<u16>,
    pub readiness_path: String,
    pub readiness_period_ms: u64,
    pub drain_ms: u64,
    pub autoscale: Option<Autoscale>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    pub metric: ScaleMetric,
    /// The target per replica.
    pub target: f64,
    pub scale_down_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleMetric {
    InFlight,
    Rps,
}

/// Most replicas of one service.
pub const MAX_REPLICAS: u32 = 256;

fn ms(
    field: &str,
    text: Option<&str>,
    default: &str,
    lo_ms: u64,
    hi_ms: u64,
) -> Result<u64, ValidationError> {
    let d = parse_duration(field, text.unwrap_or(default))?.as_millis() as u64;
    if d < lo_ms || d > hi_ms {
        return Err(ValidationError::new(
            field,
            text.unwrap_or(default),
            "out of range",
            format!("use {} ms to {} s", lo_ms, hi_ms / 1000),
        ));
    }
    Ok(d)
}

impl ServiceManifest {
    /// Checks the service settings; `replicas` is `spec.replicas`.
    pub fn check(self, replicas: Option<u32>) -> Result<ServiceDef, ValidationError> {
        let port = match &self.port {
            None => None,
            Some(serde_yaml::Value::String(s)) if s == "auto" => None,
            Some(serde_yaml::Value::Number(n)) => match n.as_u64() {
                Some(p @ 1024..=65535) => Some(p as u16),
                _ => {
                    return Err(ValidationError::new(
                        "spec.service.port",
                        n.to_string(),
                        "not a port a workload may listen on",
                        "use 1024 to 65535, or auto",
                    ));
                }
            },
            Some(other) => {
                return Err(ValidationError::new(
                    "spec.service.port",
                    format!("{other:?}"),
                    "not a port",
                    "use a number from 1024 to 65535, or auto (the program reads $PORT)",
                ));
            }
        };
        let readiness = self.readiness.unwrap_or_default();
        let readiness_path = readiness.path.unwrap_or_else(|| "/".into());
        if !readiness_path.starts_with('/') {
            return Err(ValidationError::new(
                "spec.service.readiness.path",
                &readiness_path,
                "not a path",
                "start it with /, e.g. /healthz",
            ));
        }
        let readiness_period_ms = ms(
            "spec.service.readiness.period",
            readiness.period.as_deref(),
            "1s",
            100,
            60_000,
        )?;
        let drain_ms = ms(
            "spec.service.drain",
            self.drain.as_deref(),
            "30s",
            0,
            3_600_000,
        )?;
        let autoscale = match self.autoscale {
            None => None,
            Some(a) => {
                if a.min == 0 || a.min > a.max || a.max > MAX_REPLICAS {
                    return Err(ValidationError::new(
                        "spec.service.autoscale",
                        format!("min {} max {}", a.min, a.max),
                        "not a range of replicas",
                        format!("use 1 <= min <= max <= {MAX_REPLICAS}"),
                    ));
                }
                let (metric, target) = match (a.target_in_flight, a.target_rps) {
                    (Some(t), None) => (ScaleMetric::InFlight, t),
                    (None, Some(t)) => (ScaleMetric::Rps, t),
                    _ => {
                        return Err(ValidationError::new(
                            "spec.service.autoscale",
                            "",
                            "needs exactly one target",
                            "give targetInFlight (requests in flight per replica) or targetRps",
                        ));
                    }
                };
                if !(target > 0.0 && target.is_finite()) {
                    return Err(ValidationError::new(
                        "spec.service.autoscale.target",
                        target.to_string(),
                        "not a positive number",
                        "e.g. targetInFlight: 4",
                    ));
                }
                Some(Autoscale {
                    min: a.min,
                    max: a.max,
                    metric,
                    target,
                    scale_down_delay_ms: ms(
                        "spec.service.autoscale.scaleDownDelay",
                        a.scale_down_delay.as_deref(),
                        "30s",
                        0,
                        3_600_000,
                    )?,
                })
            }
        };
        let replicas = match (replicas, &autoscale) {
            (Some(r), Some(a)) => r.clamp(a.min, a.max),
            (Some(r), None) => r,
            (None, Some(a)) => a.min,
            (None, None) => 1,
        };
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(ValidationError::new(
                "spec.replicas",
                replicas.to_string(),
                "out of range",
                format!("use 1 to {MAX_REPLICAS}"),
            ));
        }
        Ok(ServiceDef {
            replicas,
            port,
            readiness_path,
            readiness_period_ms,
            drain_ms,
            autoscale,
        })
    }
}

/// What the autoscaler remembers between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleMemory {
    /// Since when the load has asked for fewer replicas than there are.
    pub low_since_ms: Option<u64>,
}

/// The replicas a service should have, given its load (`in_flight` now, or `rps` over the last
/// window, summed over replicas). Up at once; down only when the load has stayed low for the
/// delay, and then to what the load asks for. Pure: the clock is passed in.
pub fn desired_replicas(
    a: &Autoscale,
    current: u32,
    load: f64,
    now_ms: u64,
    memory: &mut ScaleMemory,
) -> u32 {
    let want = ((load / a.target).ceil() as u32).clamp(a.min, a.max);
    if want >= current {
        memory.low_since_ms = None;
        return want;
    }
    let since = *memory.low_since_ms.get_or_insert(now_ms);
    if now_ms.saturating_sub(since) >= a.scale_down_delay_ms {
        memory.low_since_ms = None;
        want
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(min: u32, max: u32, target: f64, delay: u64) -> Autoscale {
        Autoscale {
            min,
            max,
            metric: ScaleMetric::InFlight,
            target,
            scale_down_delay_ms: delay,
        }
    }

    #[test]
    fn scale_up_is_immediate_and_down_waits_for_the_delay() {
        let a = auto(1, 5, 2.0, 10_000);
        let mut m = ScaleMemory::default();
        assert_eq!(desired_replicas(&a, 1, 7.0, 0, &mut m), 4);
        assert_eq!(
            desired_replicas(&a, 4, 100.0, 1, &mut m),
            5,
            "capped at max"
        );
        assert_eq!(desired_replicas(&a, 5, 1.0, 1_000, &mut m), 5, "not yet");
        assert_eq!(desired_replicas(&a, 5, 1.0, 10_999, &mut m), 5);
        assert_eq!(desired_replicas(&a, 5, 1.0, 11_000, &mut m), 1);
        // A burst in the middle restarts the wait.
        assert_eq!(desired_replicas(&a, 3, 0.0, 20_000, &mut m), 3);
        assert_eq!(desired_replicas(&a, 3, 6.0, 25_000, &mut m), 3);
        assert_eq!(desired_replicas(&a, 3, 0.0, 26_000, &mut m), 3);
        assert_eq!(desired_replicas(&a, 3, 0.0, 35_999, &mut m), 3);
        assert_eq!(
            desired_replicas(&a, 3, 0.0, 36_000, &mut m),
            1,
            "never below min"
        );
    }

    #[test]
    fn settings_are_checked_with_the_field_named() {
        let parse = |y: &str| {
            serde_yaml::from_str::<ServiceManifest>(y)
                .unwrap()
                .check(None)
        };
        let d = parse("{port: 8080, readiness: {path: /healthz, period: 200ms}}").unwrap();
        assert_eq!(
            (d.port, d.readiness_period_ms, d.replicas),
            (Some(8080), 200, 1)
        );
        assert_eq!(parse("{port: auto}").unwrap().port, None);
        let d = parse("{autoscale: {min: 2, max: 4, targetRps: 50}}").unwrap();
        assert_eq!(d.replicas, 2);
        assert_eq!(d.autoscale.unwrap().metric, ScaleMetric::Rps);
        assert_eq!(
            parse("{port: 70000}").unwrap_err().field,
            "spec.service.port"
        );
        // A workload runs unprivileged: no port below 1024.
        assert_eq!(parse("{port: 80}").unwrap_err().field, "spec.service.port");
        assert_eq!(
            parse("{readiness: {path: healthz}}").unwrap_err().field,
            "spec.service.readiness.path"
        );
        assert_eq!(
            parse("{autoscale: {min: 3, max: 2, targetRps: 1}}")
                .unwrap_err()
                .field,
            "spec.service.autoscale"
        );
        assert_eq!(
            parse("{autoscale: {min: 1, max: 2}}").unwrap_err().field,
            "spec.service.autoscale"
        );
    }
}
