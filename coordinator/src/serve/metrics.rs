//! Prometheus metrics, rendered on `GET /metrics` (no listener of their own).
//!
//! Request counts and the time-to-first-token histogram are recorded as requests happen; engine
//! and worker figures are read when the page is rendered. The recorder belongs to the server
//! (not installed globally), so several servers in one process keep separate figures.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Recorder, counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::cluster::ClusterExperts;
use crate::engine::EngineStats;

const TTFT: &str = "moeshard_time_to_first_token_seconds";
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How often [`Metrics::upkeep`] folds histogram samples.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics with their descriptions.
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        let recorder = match builder.set_buckets_for_metric(Matcher::Full(TTFT.into()), TTFT_BUCKETS) {
            Ok(b) => b.build_recorder(),
            // Only an empty bucket list fails, and the list above is not empty.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        with_local_recorder(&recorder, || {
            use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
            describe_counter!("moeshard_requests_total", "HTTP requests by endpoint and status");
            describe_counter!("moeshard_prompt_tokens_total", Unit::Count, "Prompt tokens processed");
            describe_counter!("moeshard_generated_tokens_total", Unit::Count, "Tokens generated");
            describe_gauge!("moeshard_prefill_tokens_per_second", "Recent prompt processing speed");
            describe_gauge!("moeshard_decode_tokens_per_second", "Recent generation speed, all sequences together");
            describe_histogram!(TTFT, Unit::Seconds, "Time from submitting a request to its first token");
            describe_gauge!("moeshard_queue_depth", "Requests waiting for a slot");
            describe_gauge!("moeshard_active_sequences", "Sequences being generated");
            describe_gauge!("moeshard_worker_rtt_mean_seconds", "Mean expert round trip to a worker");
            describe_gauge!("moeshard_worker_rtt_p99_seconds", "99th percentile expert round trip to a worker");
            describe_counter!("moeshard_worker_round_trips_total", "Expert round trips to a worker");
            describe_counter!("moeshard_worker_bytes_sent_total", Unit::Bytes, "Activation bytes sent to a worker");
            describe_counter!("moeshard_worker_bytes_received_total", Unit::Bytes, "Bytes received from a worker");
            describe_counter!("moeshard_worker_shipped_bytes_total", Unit::Bytes, "Weight bytes shipped to a worker");
            describe_gauge!("moeshard_worker_experts", "Experts a worker holds");
            describe_counter!("moeshard_worker_failures_total", "Round trips that failed and ran locally");
            describe_gauge!("moeshard_worker_up", "1 while a worker is connected, 0 while it is lost");
            describe_counter!("moeshard_worker_reconnects_total", "Reconnections of a worker after a loss");
        });
        Metrics { recorder }
    }

    /// Folds recorded histogram samples into their buckets every [`UPKEEP_INTERVAL`], forever
    /// (spawn it once per server). The exporter otherwise keeps every sample until `/metrics`
    /// is scraped, so an unscraped server's memory would grow with each request.
    pub fn upkeep(&self) -> impl Future<Output = ()> + Send + 'static {
        let handle = self.recorder.handle();
        async move {
            let mut every = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    }

    fn record(&self, f: impl FnOnce()) {
        with_local_recorder(&self.recorder as &dyn Recorder, f);
    }

    /// Records a finished request.
    pub fn request(&self, endpoint: &str, status: u16) {
        let labels = [("endpoint", endpoint.to_owned()), ("status", status.to_string())];
        self.record(|| counter!("moeshard_requests_total", &labels).increment(1));
    }

    /// Records a request's time to first token.
    pub fn time_to_first_token(&self, seconds: f64) {
        self.record(|| histogram!(TTFT).record(seconds));
    }

    /// The Prometheus text page, with the engine's and the workers' current figures.
    pub fn render(&self, stats: &EngineStats, cluster: Option<&ClusterExperts>) -> String {
        self.record(|| {
            counter!("moeshard_prompt_tokens_total").absolute(stats.prompt_tokens);
            counter!("moeshard_generated_tokens_total").absolute(stats.generated_tokens);
            gauge!("moeshard_prefill_tokens_per_second").set(stats.prefill_tokens_per_s);
            gauge!("moeshard_decode_tokens_per_second").set(stats.decode_tokens_per_s);
            gauge!("moeshard_queue_depth").set(stats.queued as f64);
            gauge!("moeshard_active_sequences").set(stats.active as f64);
            for member in cluster.iter().flat_map(|c| c.members()) {
                let c = member.stats().snapshot();
                let labels = [("worker", member.name().to_owned())];
                let rtts = c.rtt_all_layers();
                if let (Some(mean), Some(p99)) = (rtts.mean(), rtts.quantile(0.99)) {
                    gauge!("moeshard_worker_rtt_mean_seconds", &labels).set(mean.as_secs_f64());
                    gauge!("moeshard_worker_rtt_p99_seconds", &labels).set(p99.as_secs_f64());
                }
                counter!("moeshard_worker_round_trips_total", &labels).absolute(c.round_trips);
                counter!("moeshard_worker_bytes_sent_total", &labels).absolute(c.bytes_out);
                counter!("moeshard_worker_bytes_received_total", &labels).absolute(c.bytes_in);
                counter!("moeshard_worker_shipped_bytes_total", &labels).absolute(c.shipped_bytes);
                gauge!("moeshard_worker_experts", &labels).set(c.experts as f64);
                counter!("moeshard_worker_failures_total", &labels).absolute(c.failures);
                counter!("moeshard_worker_reconnects_total", &labels).absolute(c.reconnects);
                gauge!("moeshard_worker_up", &labels).set(if member.link().is_some() { 1.0 } else { 0.0 });
            }
        });
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }
}

/// Middleware: counts every request by route (`unmatched` for unknown ones) and final status.
pub async fn track(State(state): State<std::sync::Arc<super::ServeState>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    state.metrics.request(&endpoint, resp.status().as_u16());
    tracing::debug!(endpoint, status = resp.status().as_u16(), ms = start.elapsed().as_secs_f64() * 1e3, "request");
    resp
}
