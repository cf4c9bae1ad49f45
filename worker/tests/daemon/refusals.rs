//! What the worker refuses: the wrong key, malformed or unexpected input after authentication, an
//! assignment over the memory budget, a blob that does not match its hash. Each refusal ends
//! only the offending connection.

use moeshard_kernels::moe::Route;
use moeshard_protocol::auth::{AuthError, ClusterKey};
use moeshard_protocol::control::{Assignment, Control, WeightChunk};
use moeshard_protocol::frame::{FrameHeader, FrameKind, MAGIC, PROTOCOL_VERSION, encode_frame};
use moeshard_protocol::transport::{AUTH_FAILED, PROTOCOL_ERROR, VERSION_MISMATCH};
use quinn::{ConnectionError, VarInt};

use crate::util::{Client, Layer, TEST_DEADLINE, TempDir, Worker, coordinator_hello, hidden_states, key};

/// Asserts the worker closed `client`'s connection with `code`; returns the reason.
async fn assert_closed_with(client: &Client, code: VarInt) -> String {
    match client.closed().await {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, code, "close reason: {}", String::from_utf8_lossy(&close.reason));
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("expected an application close with code {code}, got {other}"),
    }
}

/// Opens a batch stream, writes `bytes` and finishes it.
async fn send_on_new_stream(client: &Client, bytes: &[u8]) {
    let (mut send, _recv) = client.conn.open_bi().await.expect("open stream");
    send.write_all(bytes).await.expect("write");
    send.finish().expect("finish");
    // Keep the stream's receive side until the worker reacts.
    let _ = client.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_refused_and_the_worker_keeps_serving() {
    let cache = TempDir::new("auth");
    tokio::time::timeout(TEST_DEADLINE, async {
        let worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns"]);
        let intruder = ClusterKey::parse("not the cluster key of this worker").expect("key");
        match Client::connect_with(worker.connect_addr(), &intruder).await {
            Err(AuthError::ClosedByPeer { code, reason }) => {
                assert_eq!((code, reason.as_str()), (AUTH_FAILED.into_inner(), "authentication failed"));
            }
            Err(other) => panic!("expected the worker's close reason, got {other}"),
            Ok(_) => panic!("a client with the wrong key was accepted"),
        }
        let (mut client, _) = Client::start(worker.connect_addr()).await;
        client.assert_alive().await;
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_that_connection() {
    let cache = TempDir::new("garbage");
    let layer = Layer::new(4, 3);
    tokio::time::timeout(TEST_DEADLINE, async {
        let worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns"]);
        let addr = worker.connect_addr();

        // Garbage on a batch stream.
        let (client, _) = Client::start(addr).await;
        send_on_new_stream(&client, b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n").await;
        let reason = assert_closed_with(&client, PROTOCOL_ERROR).await;
        assert!(reason.contains("magic"), "{reason}");

        // A frame header announcing more than the maximum payload.
        let (client, _) = Client::start(addr).await;
        let mut header = FrameHeader::new(FrameKind::ExpertBatch, 16).expect("header").to_bytes();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        send_on_new_stream(&client, &header).await;
        let reason = assert_closed_with(&client, PROTOCOL_ERROR).await;
        assert!(reason.contains("exceeds the maximum"), "{reason}");

        // A well-formed frame of the wrong kind, and an undecodable expert batch.
        let (client, _) = Client::start(addr).await;
        send_on_new_stream(&client, &encode_frame(FrameKind::Control, &[0; 8]).expect("frame")).await;
        assert_closed_with(&client, PROTOCOL_ERROR).await;
        let (mut client, _) = Client::start(addr).await;
        client.assign(&layer, vec![layer.shard(1)]).await;
        send_on_new_stream(&client, &encode_frame(FrameKind::ExpertBatch, &[0xa5; 300]).expect("frame")).await;
        let reason = assert_closed_with(&client, PROTOCOL_ERROR).await;
        assert!(reason.contains("malformed data message"), "{reason}");

        // Garbage on the control stream.
        let (mut client, _) = Client::start(addr).await;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[FrameKind::Control as u8, 0, 4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        client.send.write_all(&bytes).await.expect("write");
        assert_closed_with(&client, PROTOCOL_ERROR).await;

        // A route to an expert that is not assigned to this connection.
        let (mut client, _) = Client::start(addr).await;
        client.assign(&layer, vec![layer.shard(1)]).await;
        let x = hidden_states(2, 30);
        let (good, _) = layer.batch(&x, &[Route { token: 0, expert: 1, weight: 1.0 }]);
        client.batch(&good).await;
        let (bad, _) =
            layer.batch(&x, &[Route { token: 0, expert: 1, weight: 0.5 }, Route { token: 1, expert: 2, weight: 0.5 }]);
        let (mut send, _recv) = client.conn.open_bi().await.expect("open");
        send.write_all(&encode_frame(FrameKind::ExpertBatch, &bad.encode().expect("encode")).expect("frame"))
            .await
            .expect("write");
        send.finish().expect("finish");
        let reason = assert_closed_with(&client, PROTOCOL_ERROR).await;
        assert!(reason.contains("expert 5.2") && reason.contains("not assigned"), "{reason}");

        // A control message a worker never receives, and a Hello of another protocol version.
        let (mut client, _) = Client::start(addr).await;
        client.send(&Control::Ready { experts: 0, bytes: 0 }).await;
        assert_closed_with(&client, PROTOCOL_ERROR).await;
        let mut client = Client::connect_with(addr, &key()).await.expect("authenticate");
        let mut hello = coordinator_hello();
        hello.protocol = PROTOCOL_VERSION + 1;
        client.send(&Control::Hello(hello)).await;
        let reason = assert_closed_with(&client, VERSION_MISMATCH).await;
        assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 1)), "{reason}");

        // The worker still serves.
        let (mut client, _) = Client::start(addr).await;
        client.assert_alive().await;
        client.assign(&layer, vec![layer.shard(2)]).await;
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_and_corrupt_blobs_are_refused() {
    let cache = TempDir::new("budget");
    let layer = Layer::new(4, 4);
    tokio::time::timeout(TEST_DEADLINE, async {
        let worker = Worker::spawn(cache.path(), &["--listen", "127.0.0.1:0", "--no-mdns", "--mem-budget", "16K"]);
        let (mut client, _) = Client::start(worker.connect_addr()).await;
        let shards = vec![layer.shard(0), layer.shard(1)];
        let needed: u64 = shards.iter().map(|s| s.gate.len + s.up.len + s.down.len).sum();
        let reply = client.call(&Control::Assign(Assignment { model_id: [1; 32], shards })).await;
        assert_eq!(reply, Control::Error(format!("assignment needs {needed} bytes, the memory budget is 16384")));
        client.assert_alive().await;

        let mut bad_shape = layer.shard(0);
        bad_shape.down.rows += 1;
        let reply = client.call(&Control::Assign(Assignment { model_id: [1; 32], shards: vec![bad_shape] })).await;
        assert!(matches!(&reply, Control::Error(text) if text.contains("expert 5.0")), "{reply:?}");
        client.assert_alive().await;

        let shard = layer.shard(0);
        let reply = client.call(&Control::Assign(Assignment { model_id: [1; 32], shards: vec![shard.clone()] })).await;
        assert!(matches!(&reply, Control::Need(need) if need.len() == 3), "{reply:?}");
        let len = shard.gate.len as usize;
        let chunk = WeightChunk { hash: shard.gate.hash, offset: 0, total: len as u64, data: vec![7; len] };
        let reply = client.call(&Control::Chunk(chunk)).await;
        assert!(matches!(&reply, Control::Error(text) if text.contains("does not match its hash")), "{reply:?}");
        assert_closed_with(&client, PROTOCOL_ERROR).await;
        assert_eq!(std::fs::read_dir(cache.path()).expect("cache dir").count(), 0, "nothing cached");

        let (mut client, _) = Client::start(worker.connect_addr()).await;
        client.assert_alive().await;
    })
    .await
    .expect("test deadline");
}
