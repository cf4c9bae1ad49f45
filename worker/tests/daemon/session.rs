//! The whole session: Hello, assignment, weight shipping, expert batches, the shared in-memory
//! store, the disk cache, the local model file, stats and drain.

use std::collections::HashSet;

use moeshard_kernels::moe::Route;
use moeshard_protocol::auth::cluster_id;
use moeshard_protocol::control::{Control, ExpertShard};
use moeshard_protocol::frame::PROTOCOL_VERSION;
use quinn::ConnectionError;

use crate::util::{Client, Layer, TEST_DEADLINE, TempDir, Worker, bits, hidden_states, key};

const ASSIGNED: [u32; 2] = [1, 3];

fn routes() -> Vec<Route> {
    vec![
        Route { token: 0, expert: 3, weight: 0.625 },
        Route { token: 0, expert: 1, weight: 0.375 },
        Route { token: 1, expert: 3, weight: 1.0 },
        Route { token: 3, expert: 1, weight: 0.25 },
    ]
}

fn shards(layer: &Layer) -> Vec<ExpertShard> {
    ASSIGNED.iter().map(|&e| layer.shard(e)).collect()
}

fn blob_hashes(shards: &[ExpertShard]) -> HashSet<[u8; 32]> {
    shards.iter().flat_map(|s| [s.gate.hash, s.up.hash, s.down.hash]).collect()
}

fn blob_bytes(shards: &[ExpertShard]) -> u64 {
    shards.iter().map(|s| s.gate.len + s.up.len + s.down.len).sum()
}

/// Sends a batch of four tokens (token 2 routed nowhere) and checks the partial sums bit for bit
/// against the single-node computation.
async fn assert_batch_matches(client: &Client, layer: &Layer, seed: u64) {
    let x = hidden_states(4, seed);
    let (batch, expected) = layer.batch(&x, &routes());
    let sums = client.batch(&batch).await;
    assert_eq!((sums.step, sums.layer, sums.n_tokens, sums.n_embd), (batch.step, batch.layer, 4, batch.n_embd));
    assert!(expected.iter().any(|&v| v != 0.0));
    assert_eq!(bits(&sums.sums), bits(&expected), "partial sums differ from the single-node result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_computes_and_caches() {
    let cache = TempDir::new("cache");
    let layer = Layer::new(4, 1);
    let assigned = shards(&layer);
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns", "--mem-budget", "64M"]);
        assert_eq!(worker.cluster, cluster_id(&key()));
        assert_eq!(worker.node_id.len(), 16);

        let (mut first, hello) = Client::start(worker.connect_addr()).await;
        assert_eq!((hello.protocol, hello.node_id.as_str()), (PROTOCOL_VERSION, worker.node_id.as_str()));
        assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.capabilities.cores, 2);
        assert_eq!(hello.capabilities.mem_budget, 64 << 20);
        assert_eq!(hello.capabilities.backends, ["cpu"]);
        assert!(hello.capabilities.gemv_gbps > 0.0);

        let (need, experts, bytes) = first.assign(&layer, assigned.clone()).await;
        assert_eq!(need.iter().copied().collect::<HashSet<_>>(), blob_hashes(&assigned));
        assert_eq!(need.len(), 6);
        assert_eq!((experts, bytes), (2, blob_bytes(&assigned)));
        for hash in &need {
            let file = cache.path().join(format!("{}.bin", moeshard_worker::hex(hash)));
            assert_eq!(std::fs::read(&file).expect("cache file").as_slice(), layer.blob_bytes(hash).expect("blob"));
        }
        assert_batch_matches(&first, &layer, 10).await;
        assert_batch_matches(&first, &layer, 11).await;
        first.assert_alive().await;

        let Control::Stats(stats) = first.call(&Control::GetStats).await else { panic!("expected Stats") };
        assert_eq!((stats.batches, stats.tokens, stats.experts), (2, 8, 2));
        assert!(stats.bytes_in > 0 && stats.bytes_out > 4 * 64 * 4 * 2);

        // A second coordinator with the same model: the blobs are already in memory.
        let (mut second, _) = Client::start(worker.connect_addr()).await;
        let (need, experts, _) = second.assign(&layer, assigned.clone()).await;
        assert!(need.is_empty(), "second session needs {} blobs", need.len());
        assert_eq!(experts, 2);
        assert_batch_matches(&second, &layer, 12).await;
        let Control::Stats(stats) = second.call(&Control::GetStats).await else { panic!("expected Stats") };
        assert_eq!(stats.batches, 1, "stats are per session");

        // Drain closes the session gracefully; the other session is unaffected.
        second.send(&Control::Drain).await;
        match second.closed().await {
            ConnectionError::ApplicationClosed(close) => assert_eq!(close.error_code.into_inner(), 0),
            other => panic!("drain closed the connection with {other}"),
        }
        assert_batch_matches(&first, &layer, 13).await;
        drop(first);
        assert!(worker.terminate().success(), "SIGTERM exits cleanly");

        // A restarted worker finds every blob in the disk cache.
        let worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns"]);
        let (mut third, _) = Client::start(worker.connect_addr()).await;
        let (need, experts, _) = third.assign(&layer, assigned.clone()).await;
        assert!(need.is_empty(), "restarted worker needs {} blobs", need.len());
        assert_eq!(experts, 2);
        assert_batch_matches(&third, &layer, 14).await;

        // A new assignment replaces the old one: expert 0 only, which needs its three blobs.
        let (need, experts, _) = third.assign(&layer, vec![layer.shard(0)]).await;
        assert_eq!((need.len(), experts), (3, 1));
        let x = hidden_states(2, 15);
        let (batch, expected) = layer.batch(&x, &[Route { token: 1, expert: 0, weight: 0.5 }]);
        assert_eq!(bits(&third.batch(&batch).await.sums), bits(&expected));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_model_file_skips_shipping() {
    let dir = TempDir::new("model");
    let layer = Layer::new(4, 2);
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, &layer.file).expect("model file");
    let cache = dir.path().join("cache");
    let model_arg = model.to_str().expect("utf-8 path");
    tokio::time::timeout(TEST_DEADLINE, async {
        let worker = Worker::spawn(&cache, &["--listen", "127.0.0.1:0", "--no-mdns", "--model", model_arg]);
        let (mut client, _) = Client::start(worker.connect_addr()).await;
        let assigned = shards(&layer);
        let (need, experts, bytes) = client.assign(&layer, assigned.clone()).await;
        assert!(need.is_empty(), "the worker found its blobs in the model file, yet needs {}", need.len());
        assert_eq!((experts, bytes), (2, blob_bytes(&assigned)));
        assert_batch_matches(&client, &layer, 20).await;

        // A shard whose offset points elsewhere in the file is shipped.
        let mut moved = layer.shard(2);
        moved.up.file_offset += 1;
        let (need, experts, _) = client.assign(&layer, vec![moved.clone()]).await;
        assert_eq!((need, experts), (vec![moved.up.hash], 1));
    })
    .await
    .expect("test deadline");
}
