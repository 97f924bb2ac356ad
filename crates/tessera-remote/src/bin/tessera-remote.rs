//! `tessera-remote serve --listen ADDR --secret-file F [--tls-cert C --tls-key K]`: the GPU
//! node's side of remote attachments (started by the agent under the slice library), over TLS
//! when given a certificate.
//! `tessera-remote relay --listen ADDR --to ADDR --rtt-us N`: a relay that adds N µs to each
//! round trip, for tests and benchmarks.

fn main() {
    tessera_remote::cli::main(std::env::args().skip(1).collect());
}
