//! Timing each layer of SmolLM2-135M with llama.cpp (what
//! `split --balance measured` cuts by): every layer and the head are
//! measured, the head (a 49152 x 576 matrix, about 8 layers' weights) takes
//! several layers' time, and bad input is an error, not a panic.

use std::path::Path;

use llama_cluster_engine::profile::{Timing, time_layers};

#[test]
fn every_layer_and_the_head_are_timed() {
    let model = llama_cluster_engine::default_model_path();
    assert!(model.exists(), "run scripts/fetch-model.sh");
    let t = Timing {
        steps: 5,
        ..Timing::default()
    };
    let mut said = Vec::new();
    let times = time_layers(&model, 30, &t, |m| said.push(m.to_string())).unwrap();
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "layers (ms): {:?}\nhead {:.2} ms, before the graph {:.2} ms",
        times.layers.iter().map(|&n| ms(n)).collect::<Vec<_>>(),
        ms(times.head),
        ms(times.fixed)
    );
    assert_eq!(times.layers.len(), 30);
    assert!(times.layers.iter().all(|&n| n > 0), "a layer was not timed");
    let mut sorted = times.layers.clone();
    sorted.sort_unstable();
    let median = sorted[15];
    assert!(
        times.head > 2 * median,
        "head {} ns against a median layer of {median} ns",
        times.head
    );
    // Progress: loading, filling the sessions, each timed step.
    assert_eq!(
        said.iter().filter(|m| m.starts_with("timing step")).count(),
        5
    );
    assert_eq!(said.iter().filter(|m| m.starts_with("filling")).count(), 1);
}

#[test]
fn bad_input_is_an_error() {
    let missing = time_layers(
        Path::new("/nonexistent.gguf"),
        30,
        &Timing::default(),
        |_| {},
    );
    assert!(missing.unwrap_err().to_string().contains("does not exist"));
    let model = llama_cluster_engine::default_model_path();
    let too_many = time_layers(&model, 31, &Timing::default(), |_| {});
    assert!(
        too_many.unwrap_err().to_string().contains("31 expected"),
        "31 layers of a 30-layer model"
    );
    let zero = Timing {
        steps: 0,
        ..Timing::default()
    };
    assert!(time_layers(&model, 30, &zero, |_| {}).is_err());
}

/// `split --balance measured --measure-sessions N`: the head takes about
/// the same time per step whatever the step holds, so in steps of 2 sessions it weighs
/// far more layers than in steps of 16, and the cut moves towards the last
/// shard (SmolLM2 here: head 6.8 ms against 0.56 ms a layer per step of
/// 2, 16 ms against 3.1 ms per step of 16; cut 0-20 against 0-17).
#[test]
fn the_cut_follows_the_sessions_per_step() {
    use llama_cluster_engine::plan::SplitPlan;
    use llama_cluster_engine::split::split_model;
    let model = llama_cluster_engine::default_model_path();
    let mut first_end = Vec::new();
    for sessions in [2, 16] {
        let dir = std::env::temp_dir().join(format!(
            "llama-cluster-layer-times-{}-{sessions}",
            std::process::id()
        ));
        let plan = SplitPlan::Measured {
            shards: 2,
            sessions,
        };
        let m = split_model(&model, &dir, &plan, None);
        let _ = std::fs::remove_dir_all(&dir);
        let m = m.unwrap();
        println!(
            "steps of {sessions} sessions: shards {:?}",
            m.shards
                .iter()
                .map(|s| (s.layer_start, s.layer_end))
                .collect::<Vec<_>>()
        );
        first_end.push(m.shards[0].layer_end);
    }
    assert!(
        first_end[0] > first_end[1],
        "the first shard ends at layer {} when measured in steps of 2 sessions and at {} in steps of 16: the step size is not what was timed",
        first_end[0],
        first_end[1]
    );
}
