//! Model families other than llama over real worker processes: tiny
//! random-weight models made by `scripts/make-test-models.py` (gemma3:
//! sliding-window layers and the host-side embedding scale; gpt-oss: MoE,
//! sliding window on even layers, one-row output; deepseek2: leading dense
//! layers, MoE, a dropped MTP layer; granite: embedding scale on the first
//! stage only), split by `llama-worker split` at uneven boundaries, each
//! shard run by its own `llama-worker` process. Greedy tokens and the
//! prompt's last-token logits must equal the unsplit model's in this process.
//! The test models carry no chat template (granite's copy one llama.cpp does
//! not recognise): a chat request is answered in ChatML, as llama.cpp's
//! server does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_engine::chain::max_abs_diff;
use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{PipelineCluster, binary, test_dir};

const N_GEN: u32 = 16;
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/make-test-models.py"
);

/// The engine's test model `name` (same cache as `engine/tests/arch_split.rs`).
fn test_model(name: &str) -> PathBuf {
    let script = std::fs::read(SCRIPT).expect("scripts/make-test-models.py");
    let version = &blake3::hash(&script).to_hex()[..12];
    let dir = llama_cluster_engine::cache_root()
        .join("test-models")
        .join(version);
    let path = dir.join(format!("{name}.gguf"));
    if !path.exists() {
        let st = Command::new("python3")
            .arg(SCRIPT)
            .arg(&dir)
            .arg(name)
            .stdout(Stdio::null())
            .status()
            .expect("python3");
        assert!(st.success(), "make-test-models.py {name} failed");
    }
    path
}

fn split(model: &Path, out: &Path, ranges: &str) -> PathBuf {
    let out_log = Command::new(binary("llama-worker"))
        .args(["split", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(["--ranges", ranges])
        .stdin(Stdio::null())
        .output()
        .expect("llama-worker split");
    assert!(
        out_log.status.success(),
        "split failed: {}",
        String::from_utf8_lossy(&out_log.stderr)
    );
    out.join("manifest.json")
}

/// A copy of `model` in `dir` that carries the chat template `template`.
fn with_template(model: &Path, dir: &Path, template: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join("with-template.gguf");
    let st = Command::new("python3")
        .args([
            "-m",
            "gguf.scripts.gguf_new_metadata",
            "--force",
            "--chat-template",
            template,
        ])
        .arg(model)
        .arg(&copy)
        .stdout(Stdio::null())
        .status()
        .expect("python3 with the gguf package");
    assert!(st.success(), "gguf_new_metadata failed");
    copy
}

async fn check(name: &str, ranges: &str, first_host: u8, template: Option<&str>) {
    let dir = test_dir(&format!("family-{name}"));
    let model = match template {
        Some(t) => with_template(&test_model(name), &dir, t),
        None => test_model(name),
    };
    let manifest = split(&model, &dir.join("split"), ranges);
    let cluster = PipelineCluster::start(&dir, &manifest, first_host, &[])
        .await
        .unwrap();
    let base = Baseline::load(
        &model,
        EngineSettings {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    // (prompt, sent as a chat message, the text the unsplit model is given)
    let cases = [
        ("a", false, "a".to_string()),
        (
            "the rivers and the old roads of a city, again and again",
            false,
            "the rivers and the old roads of a city, again and again".to_string(),
        ),
        (
            "the old roads",
            true,
            "<|im_start|>user\nthe old roads<|im_end|>\n<|im_start|>assistant\n".to_string(),
        ),
    ];
    for (i, (prompt, chat, text)) in cases.iter().enumerate() {
        let want = base.greedy(&base.tokenize(text), N_GEN as usize).unwrap();
        let driver = &cluster.workers[i % cluster.workers.len()];
        let mut client = driver.client().await.unwrap();
        let req = InferenceRequest {
            prompt: prompt.to_string(),
            chat: *chat,
            max_tokens: N_GEN,
            return_prompt_logits: true,
            ..Default::default()
        };
        let mut stream = client
            .inference(req)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", driver.log()))
            .into_inner();
        let (mut tokens, mut logits) = (Vec::new(), Vec::new());
        while let Some(msg) = stream.message().await.unwrap() {
            match msg.event {
                Some(Event::Chunk(c)) => tokens.extend(c.token_ids),
                Some(Event::Stats(s)) => logits = s.prompt_logits,
                None => {}
            }
        }
        let diff = max_abs_diff(&logits, &want.prompt_logits);
        println!(
            "{name} {ranges}, driver {}, chat {chat}: logits max|diff| {diff:e}, tokens {tokens:?}",
            driver.name
        );
        assert!(diff <= 1e-4, "{name}: logits differ by {diff}");
        // The pipeline stops early only at end-of-generation.
        assert!(!tokens.is_empty());
        assert_eq!(
            tokens[..],
            want.tokens[..tokens.len()],
            "{name}: tokens differ"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_over_worker_processes() {
    // The global layer 5 is in the second shard, which starts at 3.
    check("gemma3-swa", "0-2,3-5,6-7", 210, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt_oss_over_worker_processes() {
    check("gpt-oss-swa", "0-2,3-5", 214, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek2_over_worker_processes() {
    // The second shard starts inside the leading dense layers (0-1).
    check("deepseek2-moe-mtp", "0-0,1-3,4-5", 217, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granite_over_worker_processes() {
    // A template llama.cpp does not recognise (no marker of a known one).
    let unknown = "{% for m in messages %}{{ m.content }}{% endfor %}";
    check("granite-tied", "0-3,4-5", 221, Some(unknown)).await;
}
