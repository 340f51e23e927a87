//! The `[migration]` channel's own throughput over loopback, memory to memory: what a live
//! migration's window is measured against (`tests/benches/migration_downtime.rs` runs it).
//!
//! `channel_loopback KEY PEER MIB ROUNDS`: an endpoint with the ed25519 key `KEY` listing the
//! public key `PEER` listens on 127.0.0.1, another connects to it (mutual TLS, as `migrate` and
//! `receive` do; both use `KEY`, so `PEER` must be its public key) and sends `MIB` MiB in 256
//! KiB data frames, `ROUNDS` times; one line per round: `MiB/s <value>`. Built with the CLI's
//! profile (`cargo build --release -p podsnap-coordinator --examples`): the channel's code runs
//! as optimized as in `podsnap`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use podsnap_coordinator::migrate::{Endpoint, Frame, Identity, Peers, Purpose, Timeouts};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [key, peer, mib, rounds] = &args[..] else {
        eprintln!("usage: channel_loopback KEY PEER MIB ROUNDS");
        std::process::exit(2);
    };
    let (mib, rounds): (u64, usize) = match (mib.parse(), rounds.parse()) {
        (Ok(m), Ok(r)) if m > 0 => (m, r),
        _ => {
            eprintln!("channel_loopback: MIB and ROUNDS are positive numbers");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = runtime.block_on(measure(PathBuf::from(key), PathBuf::from(peer), mib, rounds)) {
        eprintln!("channel_loopback: {e}");
        std::process::exit(1);
    }
}

async fn measure(
    key: PathBuf,
    peer: PathBuf,
    mib: u64,
    rounds: usize,
) -> podsnap_coordinator::migrate::Result<()> {
    let identity = Identity::load(&key)?;
    let endpoint = || -> podsnap_coordinator::migrate::Result<Endpoint> {
        let peers = Peers::load(std::slice::from_ref(&peer))?;
        Endpoint::new(&identity, peers, Timeouts::new(Duration::from_secs(10)))
    };
    let (server, client) = (endpoint()?, endpoint()?);
    let chunk = bytes::Bytes::from(vec![0x5a_u8; 256 << 10]);
    let total = mib << 20;
    for _ in 0..rounds {
        let listener = server.bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let receiving = tokio::spawn(async move {
            let mut channel = listener.accept().await?.accept().await?;
            let mut got = 0u64;
            while got < total {
                if let Frame::Data(d) = channel.recv().await? {
                    got += d.len() as u64;
                }
            }
            Ok::<_, podsnap_coordinator::migrate::Error>(channel)
        });
        let mut channel = client.connect(&addr, Purpose::Control { ticket: None }).await?;
        let started = Instant::now();
        for _ in 0..total.div_ceil(chunk.len() as u64) {
            channel.send(Frame::Data(chunk.clone())).await?;
        }
        let received = receiving.await.expect("the receiving task")?;
        println!("MiB/s {:.1}", mib as f64 / started.elapsed().as_secs_f64());
        received.close().await;
        channel.close().await;
    }
    Ok(())
}
