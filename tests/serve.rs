//! `moeshard serve` as clients use it: a live server process on loopback with the tiny Mellum
//! fixture, driven with reqwest through the OpenAI and Ollama APIs.

use std::time::Duration;

use futures_util::StreamExt;
use moeshard::gguf::GgufFile;
use moeshard::tokenizer::Tokenizer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::util::{Server, TempDir, Worker, metric, model_path, reference, u32s};

const MODEL: &str = "tiny-mellum-q8_0";
/// The conformance rule's greedy margin for quantized files (tests/fixtures/README.md).
const GREEDY_MARGIN: f64 = 0.08;
/// How far served logprobs may be from the fixture's.
const LOGPROB_TOLERANCE: f64 = 0.1;

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(model_path(MODEL)).expect("fixture")).expect("tokenizer")
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    client().post(url).json(body).send().await.expect("request")
}

/// POSTs `body` and returns the status and JSON answer.
async fn post_json(url: &str, body: &Value) -> (StatusCode, Value) {
    let resp = post(url, body).await;
    let status = resp.status();
    (status, resp.json().await.expect("JSON body"))
}

async fn get_json(url: &str) -> Value {
    let resp = client().get(url).send().await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp.json().await.expect("JSON body")
}

/// The `data:` payloads of a server-sent-events response, read to its end.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(ct.starts_with("text/event-stream"), "content type {ct}");
    let text = resp.text().await.expect("stream");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}")).to_owned())
        .collect()
}

/// Parses a stream's JSON events, checking that it ends with `[DONE]`.
fn json_events(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("JSON event")).collect()
}

fn assert_usage(usage: &Value, prompt_tokens: Option<usize>) {
    let p = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = usage["completion_tokens"].as_u64().expect("completion_tokens");
    assert_eq!(usage["total_tokens"].as_u64(), Some(p + c));
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64(), "{usage}");
    if let Some(expected) = prompt_tokens {
        assert_eq!(p as usize, expected, "prompt tokens");
    }
}

fn chat_case(i: usize) -> Value {
    reference(MODEL)["chat"][i].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_with_and_without_streaming() {
    let server = Server::start(MODEL, &[]);
    let url = format!("{}/v1/chat/completions", server.url);
    let case = chat_case(0);
    let n_prompt = case["tokens"].as_array().expect("tokens").len();
    let body = json!({ "model": MODEL, "messages": case["messages"], "max_tokens": 8, "temperature": 0 });
    let (status, r) = post_json(&url, &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], MODEL);
    assert!(r["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().expect("content").to_owned();
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().expect("finish_reason")));
    assert_usage(&r["usage"], Some(n_prompt));

    let mut stream_body = body.clone();
    stream_body["stream"] = true.into();
    stream_body["stream_options"] = json!({ "include_usage": true });
    let events = json_events(&sse_events(post(&url, &stream_body).await).await);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        events.iter().filter_map(|e| e["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned)).collect();
    assert_eq!(streamed, content, "streaming and non-streaming greedy output differ");
    let finish = events.iter().filter_map(|e| e["choices"].get(0)?["finish_reason"].as_str()).collect::<Vec<_>>();
    assert_eq!(finish, [choice["finish_reason"].as_str().expect("finish")]);
    let last = events.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_usage(&last["usage"], Some(n_prompt));
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));

    // Content as an array of text parts, and a multi-turn conversation with a system prompt.
    let parts =
        json!([{ "role": "user", "content": [{ "type": "text", "text": "Write a function that adds two numbers." }] }]);
    let (status, r) = post_json(&url, &json!({ "messages": parts, "max_tokens": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_usage(&r["usage"], Some(n_prompt));
    let case = chat_case(1);
    let (status, r) = post_json(&url, &json!({ "messages": case["messages"], "max_tokens": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_usage(&r["usage"], Some(case["tokens"].as_array().expect("tokens").len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_template_kwargs_render_like_the_reference() {
    let server = Server::start(MODEL, &[]);
    let url = format!("{}/v1/chat/completions", server.url);
    let case = chat_case(2);
    let n_tools_prompt = case["tokens"].as_array().expect("tokens").len();
    let body = json!({ "messages": case["messages"], "tools": case["tools"], "tool_choice": "auto", "max_tokens": 6, "temperature": 0 });
    let (status, r) = post_json(&url, &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_usage(&r["usage"], Some(n_tools_prompt));
    let msg = &r["choices"][0]["message"];
    assert!(msg["content"].is_string() || msg["tool_calls"].is_array(), "{msg}");
    if let Some(calls) = msg["tool_calls"].as_array() {
        for c in calls {
            assert_eq!(c["type"], "function");
            assert!(c["function"]["arguments"].is_string());
        }
    }
    // `tool_choice: none` leaves the tools out of the prompt.
    let (status, r) = post_json(
        &url,
        &json!({ "messages": case["messages"], "tools": case["tools"], "tool_choice": "none", "max_tokens": 1 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert!((r["usage"]["prompt_tokens"].as_u64().expect("usage") as usize) < n_tools_prompt);

    // A finished tool round trip: assistant tool call (arguments as a JSON string) and result.
    let messages = json!([
        case["messages"][0],
        { "role": "assistant", "content": null, "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\": \"Paris\"}" } }] },
        { "role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C" },
    ]);
    let mut stream_body = json!({ "messages": messages, "tools": case["tools"], "max_tokens": 4, "stream": true });
    let events = json_events(&sse_events(post(&url, &stream_body).await).await);
    let finish = events.iter().filter_map(|e| e["choices"].get(0)?["finish_reason"].as_str()).collect::<Vec<_>>();
    assert_eq!(finish.len(), 1, "one finish reason");
    stream_body["stream"] = false.into();
    let (status, r) = post_json(&url, &stream_body).await;
    assert_eq!(status, StatusCode::OK, "{r}");

    let case = chat_case(3);
    let body = json!({ "messages": case["messages"], "chat_template_kwargs": case["kwargs"], "max_tokens": 2 });
    let (status, r) = post_json(&url, &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_usage(&r["usage"], Some(case["tokens"].as_array().expect("tokens").len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completions_match_the_fixture() {
    let server = Server::start(MODEL, &[]);
    let url = format!("{}/v1/completions", server.url);
    let tok = tokenizer();
    let r = reference(MODEL);
    let mut checked = 0;
    for g in r["greedy"].as_array().expect("greedy") {
        let prompt = u32s(&g["prompt_tokens"]);
        let expected = u32s(&g["greedy_tokens"]);
        let steps = g["steps"].as_array().expect("steps");
        let must_match = steps
            .iter()
            .zip(&expected)
            .position(|(s, &t)| s["margin"].as_f64().expect("margin") < GREEDY_MARGIN || tok.is_eog(t))
            .unwrap_or(expected.len());
        if must_match == 0 {
            continue;
        }
        let body =
            json!({ "model": MODEL, "prompt": prompt, "max_tokens": must_match, "temperature": 0, "logprobs": 5 });
        let (status, resp) = post_json(&url, &body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        let choice = &resp["choices"][0];
        assert_eq!(choice["text"].as_str(), Some(tok.decode(&expected[..must_match], true).as_str()), "{}", g["name"]);
        assert_eq!(choice["finish_reason"], "length");
        assert_usage(&resp["usage"], Some(prompt.len()));
        let lp = &choice["logprobs"];
        let ours: Vec<f64> =
            lp["token_logprobs"].as_array().expect("token_logprobs").iter().map(|v| v.as_f64().expect("f64")).collect();
        assert_eq!(ours.len(), must_match);
        for (i, (ours, step)) in ours.iter().zip(steps).enumerate() {
            let theirs = step["logprob"].as_f64().expect("logprob");
            assert!((ours - theirs).abs() <= LOGPROB_TOLERANCE, "{} step {i}: logprob {ours} vs {theirs}", g["name"]);
            let mut top: Vec<f64> =
                lp["top_logprobs"][i].as_object().expect("top").values().map(|v| v.as_f64().expect("f64")).collect();
            top.sort_by(|a, b| b.total_cmp(a));
            let ref_top: Vec<f64> =
                step["top"].as_array().expect("top").iter().map(|p| p[1].as_f64().expect("f64")).collect();
            // Tokens spelled alike share a key (the likeliest kept), so some ranks may be missing.
            assert!(
                (top[0] - ref_top[0]).abs() <= LOGPROB_TOLERANCE,
                "{} step {i}: top-1 {top:?} vs {ref_top:?}",
                g["name"]
            );
            for a in &top {
                assert!(
                    ref_top.iter().any(|b| (a - b).abs() <= LOGPROB_TOLERANCE),
                    "{} step {i}: top logprobs {top:?} vs {ref_top:?}",
                    g["name"]
                );
            }
        }
        let offsets = lp["text_offset"].as_array().expect("text_offset");
        assert_eq!(offsets.len(), must_match);
        checked += must_match;
    }
    assert!(checked >= 10, "too few greedy steps checked: {checked}");

    // `echo` returns the prompt before the completion; a prompt list with one text works.
    let body = json!({ "prompt": ["def add(a, b):"], "max_tokens": 3, "temperature": 0, "echo": true });
    let (status, resp) = post_json(&url, &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert!(resp["choices"][0]["text"].as_str().expect("text").starts_with("def add(a, b):"));
}

/// A greedy completion of `prompt`'s text, `max_tokens` long.
async fn greedy_text(url: &str, prompt: &[u32], max_tokens: usize, extra: Value) -> (String, String) {
    let mut body = json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 });
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let (status, r) = post_json(url, &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let choice = &r["choices"][0];
    (choice["text"].as_str().expect("text").to_owned(), choice["finish_reason"].as_str().expect("finish").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_output() {
    let server = Server::start(MODEL, &[]);
    let url = format!("{}/v1/completions", server.url);
    let prompt = u32s(&reference(MODEL)["greedy"][2]["prompt_tokens"]);
    let (full, _) = greedy_text(&url, &prompt, 24, json!({})).await;
    // A stop string of three ASCII characters from the middle of the output.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let start = (chars.len() / 3..chars.len().saturating_sub(3))
        .find(|&i| chars[i..i + 3].iter().all(|(_, c)| c.is_ascii_graphic()))
        .expect("an ASCII window in the output");
    let stop = &full[chars[start].0..chars[start + 3].0];
    let first = full.find(stop).expect("stop occurs");
    let (text, finish) = greedy_text(&url, &prompt, 24, json!({ "stop": [stop, "never appears"] })).await;
    assert_eq!((text.as_str(), finish.as_str()), (&full[..first], "stop"), "stop {stop:?} in {full:?}");

    // The same through the streaming chat-free path.
    let body = json!({ "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stop, "stream": true });
    let events = json_events(&sse_events(post(&url, &body).await).await);
    let streamed: String =
        events.iter().filter_map(|e| e["choices"].get(0)?["text"].as_str().map(str::to_owned)).collect();
    assert_eq!(streamed, &full[..first]);
    assert!(events.iter().any(|e| e["choices"][0]["finish_reason"] == "stop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_output() {
    let server = Server::start(MODEL, &[]);
    let url = format!("{}/v1/chat/completions", server.url);
    let messages = chat_case(0)["messages"].clone();
    let sample = |seed: u64| {
        let url = url.clone();
        let body = json!({ "messages": messages, "max_tokens": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0, "seed": seed });
        async move {
            let (status, r) = post_json(&url, &body).await;
            assert_eq!(status, StatusCode::OK, "{r}");
            r["choices"][0]["message"]["content"].as_str().expect("content").to_owned()
        }
    };
    let a = sample(1234).await;
    assert_eq!(sample(1234).await, a);
    let others = [sample(1).await, sample(2).await, sample(3).await];
    assert!(others.iter().any(|o| *o != a), "different seeds should give different samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_and_generate() {
    let server = Server::start(MODEL, &[]);
    let base = &server.url;
    assert!(get_json(&format!("{base}/api/version")).await["version"].is_string());
    let tags = get_json(&format!("{base}/api/tags")).await;
    let name = tags["models"][0]["name"].as_str().expect("name").to_owned();
    assert_eq!(name, format!("{MODEL}:latest"));
    let (status, show) = post_json(&format!("{base}/api/show"), &json!({ "model": name })).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert_eq!(show["details"]["format"], "gguf");
    assert!(show["capabilities"].as_array().expect("capabilities").contains(&json!("tools")));

    let case = chat_case(0);
    let n_prompt = case["tokens"].as_array().expect("tokens").len() as u64;
    let body =
        json!({ "model": name, "messages": case["messages"], "options": { "num_predict": 5, "temperature": 0 } });
    let resp = post(&format!("{base}/api/chat"), &body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("NDJSON line")).collect();
    let (last, rest) = lines.split_last().expect("lines");
    assert!(rest.iter().all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    assert_eq!(last["done"], true);
    assert!(["stop", "length"].contains(&last["done_reason"].as_str().expect("done_reason")));
    assert_eq!(last["prompt_eval_count"].as_u64(), Some(n_prompt));
    assert!(last["eval_count"].as_u64().is_some_and(|n| (1..=5).contains(&n)));
    assert!(last["total_duration"].is_u64() && last["eval_duration"].is_u64());
    let streamed: String = rest.iter().filter_map(|l| l["message"]["content"].as_str()).collect();

    let mut body = body.clone();
    body["stream"] = false.into();
    let (status, r) = post_json(&format!("{base}/api/chat"), &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["done"], true);
    assert_eq!(r["message"]["content"].as_str(), Some(streamed.as_str()));

    let body = json!({ "model": MODEL, "prompt": "def add(a, b):", "raw": true, "options": { "num_predict": 4, "temperature": 0 } });
    let resp = post(&format!("{base}/api/generate"), &body).await;
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/x-ndjson"));
    let text = resp.text().await.expect("body");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("NDJSON line")).collect();
    let last = lines.last().expect("lines");
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().is_some_and(|n| n <= 4));
    let streamed: String = lines.iter().filter_map(|l| l["response"].as_str()).collect();
    let mut body = body.clone();
    body["stream"] = false.into();
    let (status, r) = post_json(&format!("{base}/api/generate"), &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["response"].as_str(), Some(streamed.as_str()));
    let (status, r) = post_json(&format!("{base}/api/generate"), &json!({ "model": MODEL, "prompt": "hi", "system": "Be brief.", "stream": false, "options": { "num_predict": 2 } })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert!(r["prompt_eval_count"].as_u64().is_some_and(|n| n > 5), "templated prompt: {r}");
}

/// Checks one malformed request's answer: `status` and the OpenAI error shape (with `param`
/// when given).
async fn expect_error(resp: reqwest::Response, status: StatusCode, param: Option<&str>, what: &str) {
    assert_eq!(resp.status(), status, "{what}");
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
    let err = &body["error"];
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(err["type"].is_string(), "{what}: {body}");
    assert!(err.get("param").is_some() && err.get("code").is_some(), "{what}: {body}");
    if let Some(p) = param {
        assert_eq!(err["param"].as_str(), Some(p), "{what}: {body}");
    }
}

/// Sends `head` (request line, headers and perhaps the start of a body) over a plain TCP
/// connection to `base` and reads the response: its status and JSON body.
async fn raw_http(base: &str, head: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.strip_prefix("http://").expect("http URL");
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((headers, body)) = text.split_once("\r\n\r\n") {
                let len = headers
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>())
                    })
                    .and_then(Result::ok);
                if n == 0 || len.is_some_and(|len| body.len() >= len) {
                    return (headers.to_owned(), body.to_owned());
                }
            }
            assert!(n > 0, "connection closed before a full response: {text:?}");
        }
    };
    let (headers, body) = tokio::time::timeout(Duration::from_secs(30), read).await.expect("response in time");
    let status = headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors_while_serving() {
    let server = Server::start(MODEL, &[]);
    let base = server.url.clone();
    // A good streaming request runs throughout.
    let good = {
        let url = format!("{base}/v1/completions");
        tokio::spawn(async move {
            let body = json!({ "prompt": "def add(a, b):", "max_tokens": 512, "temperature": 0, "stream": true });
            json_events(&sse_events(post(&url, &body).await).await)
        })
    };
    let chat = format!("{base}/v1/chat/completions");
    let cmpl = format!("{base}/v1/completions");
    let (ochat, ogen, oshow) = (format!("{base}/api/chat"), format!("{base}/api/generate"), format!("{base}/api/show"));
    let msgs = json!([{ "role": "user", "content": "hi" }]);
    let with = |extra: Value| {
        let mut b = json!({ "messages": msgs });
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    };
    let bad = StatusCode::BAD_REQUEST;
    let json_cases: Vec<(&str, Value, StatusCode, Option<&str>)> = vec![
        (&chat, json!([]), bad, None),
        (&chat, json!({}), bad, Some("messages")),
        (&chat, json!({ "messages": [] }), bad, Some("messages")),
        (&chat, json!({ "messages": "hi" }), bad, Some("messages")),
        (&chat, json!({ "messages": [5] }), bad, Some("messages[0]")),
        (&chat, json!({ "messages": [{ "role": "wizard", "content": "hi" }] }), bad, Some("messages[0].role")),
        (&chat, json!({ "messages": [{ "role": "user", "content": 5 }] }), bad, Some("messages[0].content")),
        (
            &chat,
            json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": {} }] }] }),
            bad,
            Some("messages[0].content[0]"),
        ),
        (&chat, with(json!({ "temperature": 5 })), bad, Some("temperature")),
        (&chat, with(json!({ "temperature": "hot" })), bad, Some("temperature")),
        (&chat, with(json!({ "top_p": 0 })), bad, Some("top_p")),
        (&chat, with(json!({ "top_p": 1.5 })), bad, Some("top_p")),
        (&chat, with(json!({ "max_tokens": 0 })), bad, Some("max_tokens")),
        (&chat, with(json!({ "max_completion_tokens": -3 })), bad, Some("max_completion_tokens")),
        (&chat, with(json!({ "n": 2 })), bad, Some("n")),
        (&chat, with(json!({ "stop": 5 })), bad, Some("stop")),
        (&chat, with(json!({ "tools": "x" })), bad, Some("tools")),
        (&chat, with(json!({ "tools": [{ "type": "function" }] })), bad, Some("tools[0]")),
        (&chat, with(json!({ "tools": [], "tool_choice": 5 })), bad, Some("tool_choice")),
        (&chat, with(json!({ "logprobs": true, "top_logprobs": 50 })), bad, Some("top_logprobs")),
        (&chat, with(json!({ "chat_template_kwargs": "x" })), bad, Some("chat_template_kwargs")),
        (&chat, with(json!({ "stream": "yes" })), bad, Some("stream")),
        (&chat, with(json!({ "seed": "abc" })), bad, Some("seed")),
        (&chat, with(json!({ "presence_penalty": 3 })), bad, Some("presence_penalty")),
        (&chat, with(json!({ "frequency_penalty": -3 })), bad, Some("frequency_penalty")),
        (&chat, with(json!({ "repetition_penalty": -1 })), bad, Some("repetition_penalty")),
        (&chat, with(json!({ "model": "gpt-4" })), StatusCode::NOT_FOUND, Some("model")),
        (&cmpl, json!({ "max_tokens": 2 }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": "" }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": [] }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": [1, 999_999] }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": [-1] }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": ["a", "b"] }), bad, Some("prompt")),
        (&cmpl, json!({ "prompt": "hi", "logprobs": 100 }), bad, Some("logprobs")),
        (&cmpl, json!({ "prompt": "hi", "max_tokens": 100_000 }), bad, None),
        (&ochat, json!({ "messages": msgs, "options": "x" }), bad, Some("options")),
        (&ochat, json!({ "messages": msgs, "options": { "temperature": -1 } }), bad, Some("options.temperature")),
        (&ogen, json!({ "model": "llama3", "prompt": "hi" }), StatusCode::NOT_FOUND, Some("model")),
        (&oshow, json!({ "model": "llama3" }), StatusCode::NOT_FOUND, Some("model")),
    ];
    let n_json = json_cases.len();
    for (url, body, status, param) in json_cases {
        expect_error(post(url, &body).await, status, param, &format!("POST {url} {body}")).await;
    }
    let c = client();
    let raw_cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (c.post(&chat).header("content-type", "application/json").body("{\"messages\": ["), bad, "truncated JSON"),
        (c.post(&chat).body("not json at all"), bad, "not JSON"),
        (c.get(format!("{base}/v1/nope")), StatusCode::NOT_FOUND, "unknown route"),
        (c.get(&chat), StatusCode::METHOD_NOT_ALLOWED, "GET on a POST route"),
    ];
    let n_raw = raw_cases.len();
    for (req, status, what) in raw_cases {
        expect_error(req.send().await.expect("request"), status, None, what).await;
    }
    // A body over the 8 MiB limit is refused from its Content-Length, before it is sent (over a
    // plain socket: an HTTP client would fail writing the body the server does not read).
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{",
        9 << 20
    );
    let (status, body) = raw_http(&base, &head).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert!(n_json + n_raw + 1 >= 20);

    // The context overflow names the limits.
    let (_, r) = post_json(&cmpl, &json!({ "prompt": "hi", "max_tokens": 100_000 })).await;
    let msg = r["error"]["message"].as_str().expect("message");
    assert!(msg.contains("max_tokens 100000") && msg.contains("the context holds"), "{msg}");

    let events = tokio::time::timeout(Duration::from_secs(120), good)
        .await
        .expect("good request in time")
        .expect("good request");
    assert!(events.iter().any(|e| e["choices"][0]["finish_reason"].is_string()), "the good stream finished");
    // Still serving.
    let (status, _) = post_json(&cmpl, &json!({ "prompt": "x", "max_tokens": 1 })).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_streams_match_solo_runs() {
    let server = Server::start(MODEL, &["--parallel", "8"]);
    let url = format!("{}/v1/completions", server.url);
    let text = u32s(&reference(MODEL)["teacher_forced"][0]["tokens"]);
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| text[i * 7..i * 7 + 5 + 3 * i].to_vec()).collect();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(greedy_text(&url, p, 12, json!({})).await.0);
    }
    let streams = prompts.iter().map(|p| {
        let body = json!({ "prompt": p, "max_tokens": 12, "temperature": 0, "stream": true });
        let url = url.clone();
        tokio::spawn(async move {
            let events = json_events(&sse_events(post(&url, &body).await).await);
            events.iter().filter_map(|e| e["choices"].get(0)?["text"].as_str().map(str::to_owned)).collect::<String>()
        })
    });
    let together = futures_util::future::join_all(streams).await;
    for (i, (alone, with_others)) in solo.iter().zip(together).enumerate() {
        assert_eq!(&with_others.expect("stream task"), alone, "stream {i} differs when run with 7 others");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_metrics_and_cancellation() {
    let server = Server::start(MODEL, &["--alias", "tiny"]);
    let base = &server.url;
    assert_eq!(get_json(&format!("{base}/health")).await["status"], "ok");
    let models = get_json(&format!("{base}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "tiny");
    // Both the alias and the file stem name the model.
    for name in ["tiny", MODEL] {
        let (status, r) =
            post_json(&format!("{base}/v1/completions"), &json!({ "model": name, "prompt": "a", "max_tokens": 1 }))
                .await;
        assert_eq!(status, StatusCode::OK, "{r}");
    }

    // A client that goes away mid-stream cancels its request: the same greedy request run to
    // its end generates more tokens than the cancelled one.
    let metrics_page =
        || async { client().get(format!("{base}/metrics")).send().await.expect("metrics").text().await.expect("page") };
    let mut body = json!({ "prompt": "import os", "max_tokens": 4000, "temperature": 0 });
    let (status, r) = post_json(&format!("{base}/v1/completions"), &body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let full = r["usage"]["completion_tokens"].as_f64().expect("usage");
    assert!(full > 100.0, "too short to cancel: {r}");
    let before = metric(&metrics_page().await, "moeshard_generated_tokens_total").expect("generated tokens");
    body["stream"] = true.into();
    let resp = post(&format!("{base}/v1/completions"), &body).await;
    let mut stream = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("first event in time");
    assert!(first.is_some_and(|c| c.is_ok()));
    drop(stream);
    let page = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let page = metrics_page().await;
            if metric(&page, "moeshard_active_sequences") == Some(0.0) {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the cancelled sequence ends in time");
    let generated = metric(&page, "moeshard_generated_tokens_total").expect("generated tokens") - before;
    assert!(generated < full, "the cancelled request ran to the end ({generated} tokens)");

    let _ = client().get(format!("{base}/nope")).send().await;
    let page = metrics_page().await;
    assert_eq!(
        metric(&page, r#"moeshard_requests_total{endpoint="/v1/completions",status="200"}"#),
        Some(4.0),
        "{page}"
    );
    assert_eq!(metric(&page, r#"moeshard_requests_total{endpoint="unmatched",status="404"}"#), Some(1.0), "{page}");
    for name in [
        "moeshard_prompt_tokens_total",
        "moeshard_prefill_tokens_per_second",
        "moeshard_decode_tokens_per_second",
        "moeshard_queue_depth",
        r#"moeshard_time_to_first_token_seconds_count"#,
    ] {
        assert!(metric(&page, name).is_some(), "{name} missing from\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gets_503_and_the_server_recovers() {
    let server = Server::start(MODEL, &["--parallel", "1", "--max-queue", "1"]);
    let url = format!("{}/v1/completions", server.url);
    let body = json!({ "prompt": "def", "max_tokens": 4000, "temperature": 1.0, "stream": true });
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        let resp = post(&url, &body).await;
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(resp);
            break;
        }
        held.push(resp);
    }
    let refused = refused.expect("a request beyond the queue is refused");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    expect_error(refused, StatusCode::SERVICE_UNAVAILABLE, None, "queue full").await;
    drop(held);
    let (status, r) = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (status, r) = post_json(&url, &json!({ "prompt": "x", "max_tokens": 1 })).await;
            if status != StatusCode::SERVICE_UNAVAILABLE {
                return (status, r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("served again in time");
    assert_eq!(status, StatusCode::OK, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_with_two_workers_matches_one_machine() {
    const KEY: &str = "serve-test-cluster-key-0123456789";
    let dirs = [TempDir::new("serve-w1"), TempDir::new("serve-w2")];
    let w1 = Worker::start("w1", KEY, &dirs[0].0, &[]);
    let w2 = Worker::start("w2", KEY, &dirs[1].0, &[]);
    let (a1, a2) = (w1.addr.to_string(), w2.addr.to_string());
    let pooled = Server::start(MODEL, &["--cluster-key", KEY, "--no-discovery", "--worker", &a1, "--worker", &a2]);
    let alone = Server::start(MODEL, &[]);
    let prompt = u32s(&reference(MODEL)["greedy"][2]["prompt_tokens"]);
    let url = |s: &Server| format!("{}/v1/completions", s.url);
    let (with_workers, _) = greedy_text(&url(&pooled), &prompt, 12, json!({})).await;
    let (single, _) = greedy_text(&url(&alone), &prompt, 12, json!({})).await;
    assert_eq!(with_workers, single);
    let page =
        client().get(format!("{}/metrics", pooled.url)).send().await.expect("metrics").text().await.expect("page");
    for w in ["w1", "w2"] {
        let trips = metric(&page, &format!("moeshard_worker_round_trips_total{{worker=\"{w}\"}}"));
        assert!(trips.is_some_and(|n| n > 0.0), "no round trips to {w} in\n{page}");
        assert!(metric(&page, &format!("moeshard_worker_rtt_mean_seconds{{worker=\"{w}\"}}")).is_some(), "{page}");
    }
}

/// Reads from `sock` until the server closes the connection (end of stream or reset); returns
/// what it sent before. Panics unless that happens within `within`.
async fn read_until_closed(sock: &mut tokio::net::TcpStream, within: Duration, what: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = sock.read(&mut chunk).await {
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or_else(|_| panic!("{what}: still open after {within:?}"));
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `GET /health` on an open keep-alive connection and checks the 200 answer.
async fn health_on(sock: &mut tokio::net::TcpStream, what: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("\"ok\"") {
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "{what}: closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.unwrap_or_else(|_| panic!("{what}: no answer"));
    assert!(got.starts_with(b"HTTP/1.1 200"), "{what}: {:?}", String::from_utf8_lossy(&got));
}

fn server_addr(server: &Server) -> String {
    server.url.strip_prefix("http://").expect("http URL").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_dropped_after_the_timeouts() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(MODEL, &["--header-timeout", "2", "--body-timeout", "2"]);
    let addr = server_addr(&server);
    let window = (Duration::from_millis(1500), Duration::from_secs(8));

    // Slowloris: a header line every 300 ms, never the blank line that ends the head.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.expect("write");
    let start = std::time::Instant::now();
    let trickle = async {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow.write_all(format!("x-slow-{i}: y\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(window.1, trickle).await.expect("the slow client is cut off");
    let waited = start.elapsed();
    assert!(waited >= window.0, "cut off after {waited:?}, before the 2 s timeout");
    let sent = read_until_closed(&mut slow, window.1, "slowloris").await;
    assert!(sent.is_empty(), "no response to an unfinished head: {sent:?}");

    // An idle keep-alive connection is closed after the same time.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    health_on(&mut idle, "keep-alive request").await;
    let start = std::time::Instant::now();
    read_until_closed(&mut idle, window.1, "idle keep-alive connection").await;
    assert!(start.elapsed() >= window.0, "idle connection closed after {:?}", start.elapsed());

    // A body that stalls gets an error once it has paused for the body timeout.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"messages\"")
        .await
        .expect("write");
    let start = std::time::Instant::now();
    let answer = read_until_closed(&mut stalled, window.1, "stalled body").await;
    assert!(start.elapsed() >= window.0, "stalled body answered after {:?}", start.elapsed());
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("\"error\""), "{answer}");

    // Meanwhile, and after, normal clients are served.
    let (status, r) =
        post_json(&format!("{}/v1/completions", server.url), &json!({ "prompt": "x", "max_tokens": 2 })).await;
    assert_eq!(status, StatusCode::OK, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_open_ones_keep_working() {
    let server = Server::start(MODEL, &["--max-connections", "2"]);
    let addr = server_addr(&server);
    let mut first = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let mut second = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    health_on(&mut first, "first connection").await;
    health_on(&mut second, "second connection").await;

    for i in 0..3 {
        let mut extra = tokio::net::TcpStream::connect(&addr).await.expect("the kernel completes the handshake");
        let sent = read_until_closed(&mut extra, Duration::from_secs(5), "connection over the cap").await;
        assert!(sent.is_empty(), "extra connection {i} got {sent:?}");
    }
    health_on(&mut first, "first connection, at the cap").await;
    health_on(&mut second, "second connection, at the cap").await;

    // Closing one frees its place.
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(resp) = client().get(format!("{}/health", server.url)).send().await {
                return resp.status();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a new connection is served once one closed");
    assert_eq!(served, StatusCode::OK);
    health_on(&mut second, "second connection, still open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_configured_limit_get_413_even_without_a_length() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(MODEL, &["--max-body-mib", "1"]);
    let addr = server_addr(&server);
    // Chunked, so the limit is enforced while reading rather than from Content-Length.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    sock.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .expect("write head");
    let (mut rx, mut tx) = sock.into_split();
    let writer = tokio::spawn(async move {
        let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, " ".repeat(64 << 10));
        for _ in 0..24 {
            if tx.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = tx.write_all(b"0\r\n\r\n").await;
    });
    let mut got = Vec::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = rx.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).contains("}}") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("answer in time");
    writer.abort();
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large") && answer.contains("1048576 bytes"), "{answer}");

    // Just under the limit is fine.
    let prompt = "x ".repeat(200);
    let pad = " ".repeat((1 << 20) - 1000);
    let body = format!("{{\"prompt\": \"{prompt}\", \"max_tokens\": 1{pad}}}");
    let resp = client().post(format!("{}/v1/completions", server.url)).body(body).send().await.expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
}
