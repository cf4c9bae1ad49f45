//! The `moeshard` binary as a user runs it: generation and scoring output formats, and one clear
//! error line (exit code 1, no panic) for every kind of bad model file.

use std::time::Duration;

use moeshard::gguf::{GgufValue, GgufWriter};
use serde_json::Value;

use crate::util::{f64s, model_path, moeshard, reference, temp_path, u32s};

const TIMEOUT: Duration = Duration::from_secs(120);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_json_logprobs_follow_the_greedy_reference() {
    let r = reference("tiny-mellum-q8_0");
    let g = &r["greedy"][0];
    let prompt = u32s(&g["prompt_tokens"]).iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let path = model_path("tiny-mellum-q8_0");
    let out = moeshard(
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "--prompt-tokens",
            &prompt,
            "-n",
            "4",
            "--temp",
            "0",
            "--logprobs",
            "3",
            "--json",
            "-t",
            "1",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    let steps = g["steps"].as_array().unwrap();
    for (line, step) in lines.iter().zip(steps) {
        assert_eq!(line["id"], step["token"], "greedy token");
        let lp = line["logprob"].as_f64().unwrap();
        assert!((lp - step["logprob"].as_f64().unwrap()).abs() < 0.1, "logprob {lp} vs {}", step["logprob"]);
        let top = line["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0][0], line["id"]);
        assert!(line["text"].is_string());
    }
    assert!(stderr(&out).contains("tokens/s"), "speed report on stderr: {}", stderr(&out));
}

#[test]
fn run_streams_text_and_same_seed_gives_same_output() {
    let path = model_path("tiny-qwen3moe-q8_0");
    let args = ["run", "-m", path.to_str().unwrap(), "-p", "def fib(n):", "-n", "12", "--temp", "0.9", "--seed", "7"];
    let a = moeshard(&args, TIMEOUT);
    let b = moeshard(&args, TIMEOUT);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
}

#[test]
fn run_chat_renders_the_template() {
    let path = model_path("kq-mellum-q4_k_m");
    let out = moeshard(
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "--chat",
            "hello",
            "-n",
            "3",
            "--temp",
            "0",
            "-ctk",
            "q8_0",
            "-ctv",
            "f32",
        ],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("prompt: "), "{}", stderr(&out));
}

#[test]
fn score_json_matches_the_teacher_forced_reference() {
    let name = "tiny-mellum-f32";
    let r = reference(name);
    let tf = &r["teacher_forced"][0];
    let tokens = u32s(&tf["tokens"]);
    let model = moeshard::model::Model::load(model_path(name)).unwrap();
    let tokenizer = moeshard::tokenizer::Tokenizer::from_gguf(model.gguf()).unwrap();
    let text = tokenizer.decode(&tokens, false);
    assert_eq!(tokenizer.encode(&text, false).unwrap(), tokens, "the fixture text round-trips");
    let text_file = temp_path("score.txt");
    std::fs::write(&text_file, &text).unwrap();
    let out = moeshard(
        &[
            "score",
            "-m",
            model_path(name).to_str().unwrap(),
            "--text-file",
            text_file.to_str().unwrap(),
            "--top",
            "5",
            "--json",
            "-ctk",
            "f32",
            "-ctv",
            "f32",
        ],
        TIMEOUT,
    );
    std::fs::remove_file(&text_file).ok();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(u32s(&v["tokens"]), tokens);
    let ours = f64s(&v["next_token_logprobs"]);
    let theirs = f64s(&tf["next_token_logprobs"]);
    assert_eq!(ours.len(), tokens.len() - 1);
    assert_eq!(v["top"].as_array().unwrap().len(), tokens.len());
    assert_eq!(v["top"][0].as_array().unwrap().len(), 5);
    let mut diffs: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).collect();
    diffs.sort_by(f64::total_cmp);
    assert!(diffs[diffs.len() / 2] < 0.005, "median difference {}", diffs[diffs.len() / 2]);
    let ppl = v["perplexity"].as_f64().unwrap();
    let ref_ppl = tf["perplexity"].as_f64().unwrap();
    assert!((ppl - ref_ppl).abs() / ref_ppl < 0.002, "perplexity {ppl} vs {ref_ppl}");
}

/// Runs `moeshard run` on `file` and returns its stderr, asserting exit code 1 and one line.
fn run_fails(file: &std::path::Path) -> String {
    let out = moeshard(&["run", "-m", file.to_str().unwrap(), "-p", "x", "-n", "1"], TIMEOUT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
    err
}

#[test]
fn missing_model_file_is_named() {
    let path = temp_path("does-not-exist.gguf");
    let err = run_fails(&path);
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "the OS error is named once: {err}");
}

#[test]
fn non_gguf_file_reports_bad_magic() {
    let path = temp_path("notes.gguf");
    std::fs::write(&path, b"this is not a model file at all").unwrap();
    let err = run_fails(&path);
    std::fs::remove_file(&path).ok();
    assert!(err.contains(path.to_str().unwrap()) && err.contains("magic"), "{err}");
}

#[test]
fn truncated_model_reports_truncation() {
    let bytes = std::fs::read(model_path("kq-mellum-q4_k_m")).unwrap();
    let path = temp_path("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_fails(&path);
    std::fs::remove_file(&path).ok();
    assert!(err.contains(path.to_str().unwrap()) && err.contains("truncated"), "{err}");
}

#[test]
fn unknown_architecture_is_named() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into())).unwrap();
    let path = temp_path("llama.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    w.write_header(&mut f).unwrap();
    drop(f);
    let err = run_fails(&path);
    std::fs::remove_file(&path).ok();
    assert!(err.contains("unknown architecture") && err.contains("llama"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let src = moeshard::gguf::GgufFile::open(model_path("tiny-mellum-q8_0")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.add_metadata(k.clone(), v.clone()).unwrap();
    }
    let path = temp_path("no-tensors.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    w.write_header(&mut f).unwrap();
    drop(f);
    let err = run_fails(&path);
    std::fs::remove_file(&path).ok();
    assert!(err.contains("token_embd.weight") && err.contains("not found"), "{err}");
}

/// `synth` writes a 1-layer Mellum2-geometry file that loads, and `bench` on it prints the
/// llama-bench-like table (and the same figures as JSON).
#[test]
fn synth_file_loads_and_bench_prints_a_table() {
    let path = temp_path("synth-1l.gguf");
    let file = path.to_str().unwrap();
    let out = moeshard(
        &["synth", "--arch", "mellum", "--preset", "mellum2-12b", "--layers", "1", "--type", "q4_k_m", "-o", file],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 layers"), "{}", stderr(&out));

    let out = moeshard(&["bench", "-m", file, "-p", "8", "-n", "4", "-r", "1", "-t", "2"], TIMEOUT);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("| model | size | params | backend | threads | test | t/s |"), "{table}");
    for test in ["| pp8 |", "| tg4 |", "read bandwidth: "] {
        assert!(table.contains(test), "{test} missing from:\n{table}");
    }
    assert!(table.contains("mellum Q4_K - Medium"), "{table}");

    let out = moeshard(&["bench", "-m", file, "-p", "0", "-n", "2", "-r", "2", "-t", "1", "-o", "json"], TIMEOUT);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let tests = report["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 1);
    assert_eq!(tests[0]["test"], "tg2");
    assert_eq!(tests[0]["samples_ts"].as_array().unwrap().len(), 2);
    // One token per step: dense weights plus 8 experts of the one layer, and less than the file.
    let per_token = tests[0]["weight_bytes_per_token"].as_f64().unwrap();
    let size = report["size_bytes"].as_f64().unwrap();
    assert!(per_token > 0.3 * size && per_token < size, "{per_token} of {size}");
    assert!(report["read_bandwidth_gbps"].as_f64().unwrap() > 0.0);

    // `-d`: each test runs after 16 tokens already in the cache, named as llama-bench does.
    let out =
        moeshard(&["bench", "-m", file, "-d", "16", "-p", "8", "-n", "2", "-r", "1", "-t", "1", "-o", "json"], TIMEOUT);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let names: Vec<&str> = report["tests"].as_array().unwrap().iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp8 @ d16", "tg2 @ d16"]);
    assert!(
        report["tests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["n_depth"] == 16 && t["ts"]["mean"].as_f64().unwrap() > 0.0)
    );
    let out = moeshard(&["bench", "-m", file, "-c", "20", "-d", "16", "-p", "8", "-n", "0", "-r", "1"], TIMEOUT);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("(-c) cannot hold -d 16"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

/// The first CPU this process may run on, from `/proc/self/status` (Linux).
fn first_allowed_cpu() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list");
    list.trim().split([',', '-']).next().unwrap().to_owned()
}

#[test]
fn pinned_compute_threads_give_the_same_tokens_and_absent_cpus_are_named() {
    let path = model_path("tiny-mellum-q8_0");
    let args = ["run", "-m", path.to_str().unwrap(), "-p", "def fib(n):", "-n", "6", "--temp", "0", "-t", "2"];
    let free = moeshard(&args, TIMEOUT);
    assert!(free.status.success(), "{}", stderr(&free));
    let cpu = first_allowed_cpu();
    let pinned = moeshard(&[&args[..], &["--cpus", &cpu]].concat(), TIMEOUT);
    assert!(pinned.status.success(), "{}", stderr(&pinned));
    assert_eq!(pinned.stdout, free.stdout, "two threads on CPU {cpu}: the same greedy tokens");

    let absent = moeshard(&[&args[..], &["--cpus", "1023"]].concat(), TIMEOUT);
    let err = stderr(&absent);
    assert_eq!(absent.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(err.contains("--cpus") && err.contains("may not run on CPU 1023"), "{err}");
}
