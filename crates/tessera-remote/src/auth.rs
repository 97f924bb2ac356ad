//! The handshake: client and server each prove they hold the attachment's secret, over nonces
//! both chose, before a single driver call crosses. The agent hands the same random secret to the
//! server it starts and to the workload it attaches; nothing else on the network knows it.
//!
//! ```text
//! server → client  MAGIC, server nonce
//! client → server  MAGIC, client nonce, HMAC(secret, "client" | server nonce | client nonce)
//! server → client  1, HMAC(secret, "server" | client nonce | server nonce)   (or 0, and it hangs up)
//! ```

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::MAGIC;

const NONCE: usize = 32;
const TAG: usize = 32;

fn tag(secret: &[u8], role: &[u8], first: &[u8], second: &[u8]) -> [u8; TAG] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(role);
    mac.update(first);
    mac.update(second);
    mac.finalize().into_bytes().into()
}

fn verify(secret: &[u8], role: &[u8], first: &[u8], second: &[u8], claimed: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(role);
    mac.update(first);
    mac.update(second);
    // Constant time: a wrong secret learns nothing from how long the refusal took.
    mac.verify_slice(claimed).is_ok()
}

fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

fn refused(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, what.to_string())
}

/// The server's side; `Err` when the client does not hold the secret (it has been told so).
pub fn accept(stream: &mut (impl Read + Write), secret: &[u8]) -> io::Result<()> {
    let server = nonce()?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&server);
    stream.write_all(&hello)?;
    let mut answer = [0u8; 8 + NONCE + TAG];
    stream.read_exact(&mut answer)?;
    if &answer[..8] != MAGIC {
        return Err(refused("the peer does not speak this protocol"));
    }
    let client = &answer[8..8 + NONCE];
    if !verify(secret, b"client", &server, client, &answer[8 + NONCE..]) {
        stream.write_all(&[0])?;
        return Err(refused("the client's proof of the secret is wrong"));
    }
    let mut ok = vec![1u8];
    ok.extend_from_slice(&tag(secret, b"server", client, &server));
    stream.write_all(&ok)
}

/// The client's side; `Err` when the server refused the secret or does not hold it itself.
pub fn connect(stream: &mut (impl Read + Write), secret: &[u8]) -> io::Result<()> {
    let mut hello = [0u8; 8 + NONCE];
    stream.read_exact(&mut hello)?;
    if &hello[..8] != MAGIC {
        return Err(refused(
            "the peer is not a Tessera GPU server (or another version)",
        ));
    }
    let server = &hello[8..];
    let client = nonce()?;
    let mut answer = MAGIC.to_vec();
    answer.extend_from_slice(&client);
    answer.extend_from_slice(&tag(secret, b"client", server, &client));
    stream.write_all(&answer)?;
    let mut verdict = [0u8; 1];
    stream.read_exact(&mut verdict)?;
    if verdict[0] != 1 {
        return Err(refused("the GPU server refused this attachment's secret"));
    }
    let mut proof = [0u8; TAG];
    stream.read_exact(&mut proof)?;
    if !verify(secret, b"server", &client, server, &proof) {
        return Err(refused(
            "the GPU server does not hold this attachment's secret",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn handshake(server_secret: &'static [u8], client_secret: &[u8]) -> (String, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, server_secret).map_err(|e| e.to_string())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = connect(&mut c, client_secret).map_err(|e| e.to_string());
        let server = server.join().unwrap();
        (
            server.err().unwrap_or_default(),
            client.err().unwrap_or_default(),
        )
    }

    #[test]
    fn the_same_secret_is_accepted_on_both_sides() {
        assert_eq!(
            handshake(b"s3cret", b"s3cret"),
            (String::new(), String::new())
        );
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_client_is_told() {
        let (server, client) = handshake(b"s3cret", b"guess");
        assert!(server.contains("proof of the secret is wrong"), "{server}");
        assert!(client.contains("refused"), "{client}");
    }
}
