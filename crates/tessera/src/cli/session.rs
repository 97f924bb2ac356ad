//! Where the CLI talks to and as whom: `tessera config use|view`, `whoami`, `version`,
//! `completion` (as `kubectl config use-context`, `whoami`, `version`, `completion`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{Client, ConfigFile, Output, config_path, table};

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Talk to the controller at URL from now on (writes the config file; keeps its token
    /// unless --token is given).
    Use {
        url: String,
        #[arg(long)]
        token: Option<String>,
        /// CA certificate (PEM) to trust for an HTTPS controller.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
    },
    /// Show the config file (its token shortened).
    View,
}

/// Reads the config file, if there is one.
fn read() -> anyhow::Result<Option<ConfigFile>> {
    let path = config_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml::from_str(&text)
            .map(Some)
            .with_context(|| format!("{}: not a Tessera config file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the config file, readable by its owner only.
pub fn write(file: &ConfigFile) -> anyhow::Result<PathBuf> {
    let path = config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::controller::write_private(&path, &serde_yaml::to_string(file)?)?;
    Ok(path)
}

/// A token shown without its secret: `tsr_<id>_…`.
fn shortened(token: &str) -> String {
    match token.rsplit_once('_') {
        Some((id, _)) => format!("{id}_…"),
        None if token.is_empty() => String::new(),
        None => "…".into(),
    }
}

pub fn config(cmd: ConfigCmd, output: Output) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::Use {
            url,
            token,
            ca_cert,
        } => {
            crate::endpoints::Endpoints::parse("the URL", &url)?;
            let old = read()?;
            let token = token
                .or_else(|| old.as_ref().map(|o| o.token.clone()))
                .filter(|t| !t.is_empty())
                .context("no token yet: give one with --token (an admin makes one with `tessera token create`)")?;
            let was = old.as_ref().map(|o| o.url.clone());
            let file = ConfigFile {
                url: url.trim_end_matches('/').to_string(),
                token,
                ca_cert: ca_cert.or_else(|| old.and_then(|o| o.ca_cert)),
            };
            let path = write(&file)?;
            match was {
                Some(was) if was != file.url => {
                    println!("{}: url {} (was {was})", path.display(), file.url)
                }
                _ => println!("{}: url {}", path.display(), file.url),
            }
            Ok(())
        }
        ConfigCmd::View => {
            let path = config_path();
            let file = read()?.with_context(|| {
                format!(
                    "no config file at {}: `tessera up` writes one, or `tessera config use URL --token T`",
                    path.display()
                )
            })?;
            let v = json!({
                "path": path.display().to_string(),
                "url": file.url,
                "token": shortened(&file.token),
                "ca_cert": file.ca_cert,
            });
            show(output, &v, || {
                println!("Config:   {}", path.display());
                println!("URL:      {}", file.url);
                println!("Token:    {}", shortened(&file.token));
                if let Some(ca) = &file.ca_cert {
                    println!("CA cert:  {}", ca.display());
                }
            })
        }
    }
}

/// Prints `v` as the output format asks, or `table` for a table.
fn show(output: Output, v: &Value, table: impl FnOnce()) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(v)?),
        Output::Csv | Output::Table => table(),
    }
    Ok(())
}

/// `tessera whoami`: the caller's user, role and projects, as the controller sees them.
pub fn whoami(c: &Client) -> anyhow::Result<()> {
    let v = c.get("/v1/whoami")?;
    c.print(&v, |v| {
        let projects: Vec<&str> = v["projects"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        table(
            &["USER", "ROLE", "PROJECTS"],
            vec![vec![
                v["user"].as_str().unwrap_or("").into(),
                v["role"].as_str().unwrap_or("").into(),
                projects.join(","),
            ]],
        );
        Ok(())
    })
}

/// `tessera version`: this program's version, and the controller's when one answers.
pub fn version(client: anyhow::Result<Client>, output: Output) -> anyhow::Result<()> {
    let mine = env!("CARGO_PKG_VERSION");
    let (server, why) = match client.and_then(|c| c.get("/openapi.json")) {
        Ok(doc) => (doc["info"]["version"].as_str().map(str::to_string), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let v = json!({"client": mine, "controller": server, "controller_error": why});
    show(output, &v, || {
        println!("Client:      tessera {mine}");
        match (&server, &why) {
            (Some(s), _) => println!("Controller:  tessera {s}"),
            (None, Some(e)) => println!("Controller:  not reached ({e})"),
            (None, None) => println!("Controller:  not reached"),
        }
    })
}

/// `tessera completion SHELL`: the shell's completion script for every command and flag.
pub fn completion(shell: clap_complete::Shell, cmd: &mut clap::Command) -> anyhow::Result<()> {
    clap_complete::generate(shell, cmd, "tessera", &mut std::io::stdout());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortened_token_keeps_its_id_and_drops_its_secret() {
        assert_eq!(shortened("tsr_abc123_s3cr3t"), "tsr_abc123_…");
        assert_eq!(shortened(""), "");
        assert_eq!(shortened("opaque"), "…");
    }
}
