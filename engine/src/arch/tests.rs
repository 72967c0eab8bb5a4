use super::*;
use std::collections::HashMap;

#[derive(Default)]
struct Kv(HashMap<String, u32>, HashMap<String, usize>);
impl Meta for Kv {
    fn u32(&self, key: &str) -> Option<u32> {
        self.0.get(key).copied()
    }
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key) || self.1.contains_key(key)
    }
    fn arr_len(&self, key: &str) -> Option<usize> {
        self.1.get(key).copied()
    }
}

fn model(arch: &str, n: u32) -> Model<'_> {
    Model {
        arch,
        n_layer_all: n,
        n_layer: n,
        n_vocab: 1000,
    }
}

fn shard(index: usize, n_shards: usize, start: u32, end: u32) -> Shard {
    Shard {
        index,
        n_shards,
        start,
        end,
    }
}

#[test]
fn refusals_name_the_architecture_and_why() {
    let e = rule("gemma2")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("\"gemma2\"") && e.contains("sqrt(n_embd)"),
        "{e}"
    );
    let e = rule("bert")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("\"bert\"") && e.contains("not been checked"),
        "{e}"
    );
    assert!(rule("qwen3moe").is_ok());
}

#[test]
fn sliding_window_patterns_follow_the_global_layer_index() {
    assert_eq!(
        swa_layers(6, false, 8),
        [true, true, true, true, true, false, true, true]
    );
    let mut kv = Kv::default();
    kv.0.insert("gemma3.attention.sliding_window".into(), 512);
    let m = model("gemma3", 8);
    let e = shard_edits(&kv, &m, &shard(1, 2, 4, 7)).unwrap();
    assert_eq!(
        e,
        vec![Edit::Bools(
            "gemma3.attention.sliding_window_pattern".into(),
            vec![true, false, true, true]
        )]
    );
    // No window: no pattern.
    assert!(
        shard_edits(&Kv::default(), &m, &shard(1, 2, 4, 7))
            .unwrap()
            .is_empty()
    );
    // gpt-oss: always, even layers.
    let e = shard_edits(&Kv::default(), &model("gpt-oss", 6), &shard(1, 2, 3, 5)).unwrap();
    assert_eq!(
        e,
        vec![Edit::Bools(
            "gpt-oss.attention.sliding_window_pattern".into(),
            vec![false, true, false]
        )]
    );
}

#[test]
fn deepseek2_counts_dense_layers_from_the_shard_start() {
    let mut kv = Kv::default();
    kv.0.insert("deepseek2.leading_dense_block_count".into(), 3);
    let m = model("deepseek2", 8);
    let lead = |s: Shard| {
        shard_edits(&kv, &m, &s)
            .unwrap()
            .into_iter()
            .find_map(|e| match e {
                Edit::U32(k, v) if k.ends_with("leading_dense_block_count") => Some(v),
                _ => None,
            })
    };
    assert_eq!(lead(shard(0, 3, 0, 1)), Some(2));
    assert_eq!(lead(shard(1, 3, 2, 4)), Some(1));
    assert_eq!(lead(shard(2, 3, 5, 7)), Some(0));
    assert!(check_plan(&kv, &model("deepseek2", 61), &[(0, 26), (27, 60)]).is_err());
    assert!(check_plan(&kv, &model("deepseek2", 61), &[(0, 29), (30, 60)]).is_ok());
}

#[test]
fn gemma3_27b_and_granite_scale() {
    assert!(check_plan(&Kv::default(), &model("gemma3", 62), &[(0, 30), (31, 61)]).is_err());
    assert!(check_plan(&Kv::default(), &model("gemma3", 26), &[(0, 12), (13, 25)]).is_ok());
    assert_eq!(host_embedding_scale("gemma3", 64), Some(8.0));
    assert_eq!(host_embedding_scale("llama", 64), None);
    let m = model("granite", 4);
    assert!(
        shard_edits(&Kv::default(), &m, &shard(0, 2, 0, 1))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        shard_edits(&Kv::default(), &m, &shard(1, 2, 2, 3)).unwrap(),
        vec![Edit::Remove("granite.embedding_scale".into())]
    );
}

#[test]
fn smollm3_shards_start_at_multiples_of_4() {
    let kv = Kv::default();
    assert!(check_plan(&kv, &model("smollm3", 8), &[(0, 3), (4, 7)]).is_ok());
    let e = check_plan(&kv, &model("smollm3", 8), &[(0, 4), (5, 7)])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("multiple of 4") && e.contains("5-7"), "{e}");
}
