//! Several controller URLs for one pool (`--join URL1,URL2`, `TESSERA_URL=URL1,URL2`): agents
//! and the CLI use one and move to the next when it cannot be reached. Any controller of a pool
//! answers (a standby sends the request on to the leader), so which one is in use matters only
//! when one is down.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The URLs of a pool's controllers, and the one in use.
#[derive(Debug)]
pub struct Endpoints {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl Endpoints {
    /// Parses a comma-separated list of URLs; `what` names the flag or variable in errors.
    pub fn parse(what: &str, list: &str) -> anyhow::Result<Endpoints> {
        let mut urls = Vec::new();
        for part in list.split(',') {
            let url = part.trim().trim_end_matches('/');
            if url.is_empty() {
                continue;
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!(
                    "{what}: {url:?} is not a URL; give http://HOST:PORT or https://HOST:PORT, \
                     several separated by commas"
                );
            }
            if !urls.iter().any(|u| u == url) {
                urls.push(url.to_string());
            }
        }
        if urls.is_empty() {
            anyhow::bail!("{what}: no URL given; give http://HOST:PORT (several: URL1,URL2)");
        }
        Ok(Endpoints {
            urls,
            current: AtomicUsize::new(0),
        })
    }

    /// The URL in use.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Moves on from `url` (when it is still the one in use) to the next.
    pub fn failed(&self, url: &str) {
        let at = self.current.load(Ordering::Relaxed);
        if self.urls[at % self.urls.len()] == url {
            let _ = self.current.compare_exchange(
                at,
                (at + 1) % self.urls.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// Whether two lists name a controller in common (the same pool).
    pub fn overlaps(&self, other: &Endpoints) -> bool {
        self.urls.iter().any(|u| other.urls.contains(u))
    }
}

impl std::fmt::Display for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_parses_and_moves_on_from_a_failed_url() {
        let e = Endpoints::parse("--join", " http://a:1/, http://b:2,,http://a:1").unwrap();
        assert_eq!(e.all(), ["http://a:1", "http://b:2"]);
        assert_eq!(e.current(), "http://a:1");
        e.failed("http://b:2");
        assert_eq!(e.current(), "http://a:1", "only the one in use moves on");
        e.failed("http://a:1");
        assert_eq!(e.current(), "http://b:2");
        e.failed("http://b:2");
        assert_eq!(e.current(), "http://a:1");
        assert!(e.overlaps(&Endpoints::parse("x", "http://b:2").unwrap()));
        assert!(!e.overlaps(&Endpoints::parse("x", "http://c:3").unwrap()));
    }

    #[test]
    fn bad_lists_name_the_flag_and_the_fix() {
        let err = Endpoints::parse("--join", "a:1").unwrap_err().to_string();
        assert!(
            err.contains("--join") && err.contains("http://HOST:PORT"),
            "{err}"
        );
        let err = Endpoints::parse("TESSERA_URL", " , ")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TESSERA_URL") && err.contains("no URL"),
            "{err}"
        );
    }
}
