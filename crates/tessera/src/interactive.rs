//! The wire of `tessera exec` (a process inside a running replica) over a WebSocket from the
//! CLI through the controller to the replica's agent. Each binary message is one frame: a
//! channel byte, then its bytes. The controller relays frames as they are; only the two ends
//! read them. (`tessera port-forward` carries a TCP stream's bytes as they are, no channel.)

/// Client to node: bytes for the process's standard input.
pub const STDIN: u8 = 0;
/// Node to client: what the process wrote (with a terminal, everything comes here).
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
/// Client to node: the terminal's size, `{"cols": C, "rows": R}`.
pub const RESIZE: u8 = 3;
/// Node to client, last: `{"code": N}` (128 + the signal for a process killed by one).
pub const EXIT: u8 = 4;
/// Client to node: standard input has ended.
pub const STDIN_END: u8 = 5;
/// Node to client, instead of EXIT: why the process could not start.
pub const FAILED: u8 = 6;

/// One frame: `channel` then `data`.
pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// A frame's channel and bytes; `None` for an empty message.
pub fn split(msg: &[u8]) -> Option<(u8, &[u8])> {
    msg.split_first().map(|(c, rest)| (*c, rest))
}

/// What `tessera exec` asks of a node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    /// The program and its arguments, as a JSON list.
    pub command: String,
    /// Give it a terminal.
    #[serde(default)]
    pub tty: bool,
    /// The terminal's kind (TERM).
    #[serde(default)]
    pub term: Option<String>,
}

/// The command of an [`ExecQuery`], refused with the fix when it is not a non-empty list of
/// strings without NUL bytes.
pub fn command_of(q: &ExecQuery) -> Result<Vec<String>, String> {
    let words: Vec<String> = serde_json::from_str(&q.command)
        .map_err(|_| "command: give the program and its arguments as a JSON list".to_string())?;
    if words.is_empty() || words[0].is_empty() {
        return Err("command: name a program to run, e.g. -- bash".into());
    }
    if words.iter().any(|w| w.contains('\0')) {
        return Err("command: a NUL byte cannot be passed to a program".into());
    }
    if words.iter().map(String::len).sum::<usize>() > 64 * 1024 {
        return Err("command: keep it under 64 KiB".into());
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_channel_and_commands_are_checked() {
        let f = frame(STDOUT, b"hi");
        assert_eq!(split(&f), Some((STDOUT, &b"hi"[..])));
        assert_eq!(split(&[]), None);
        let q = |c: &str| ExecQuery {
            command: c.into(),
            tty: false,
            term: None,
        };
        assert_eq!(command_of(&q(r#"["bash","-l"]"#)).unwrap(), ["bash", "-l"]);
        for bad in ["[]", "bash", r#"[""]"#, "[\"a\\u0000b\"]"] {
            assert!(command_of(&q(bad)).is_err(), "{bad}");
        }
    }
}
