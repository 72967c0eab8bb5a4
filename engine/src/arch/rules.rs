//! The table: one rule per accepted architecture, the refused ones with
//! their reasons, and the hooks the rules name.

use super::{Edit, Hook, Meta, Model, Output, Rule, Shard, Swa, TokScale};
use crate::{EngineError, Result};

const NO_HOOKS: &[Hook] = &[];

pub static RULES: &[Rule] = &[
    Rule {
        arch: "llama",
        models: "Llama 2/3.x (3.1+ rope_freqs, 3.2 tied head), Mistral 7B, SmolLM2",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "qwen2",
        models: "Qwen2, Qwen2.5",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "qwen3",
        models: "Qwen3",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "qwen2moe",
        models: "Qwen1.5-MoE, Qwen2-MoE",
        output: Output::Required,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "qwen3moe",
        models: "Qwen3-MoE (30B-A3B, 235B-A22B)",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "gemma3",
        models: "Gemma 3 270M, 1B, 4B, 12B (not 27B)",
        output: Output::Optional,
        swa: Swa::WithWindow {
            pattern: 6,
            dense_first: false,
        },
        tok_scale: TokScale::SqrtEmbd,
        hooks: NO_HOOKS,
        check: Some(gemma3_check),
        align: 1,
    },
    Rule {
        arch: "phi3",
        models: "Phi-3, Phi-3.5, Phi-4",
        output: Output::Optional,
        swa: Swa::None, // llama.cpp disables Phi's sliding window
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "mistral3",
        models: "Mistral Small 3.x, Ministral 3",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "granite",
        models: "Granite 3.x",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: &[granite_embedding_scale],
        check: Some(granite_check),
        align: 1,
    },
    Rule {
        arch: "olmo2",
        models: "OLMo 2, OLMo 3",
        output: Output::Required,
        swa: Swa::WithWindow {
            pattern: 4,
            dense_first: false,
        },
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "gpt-oss",
        models: "gpt-oss (llama.cpp's openai-moe graph)",
        output: Output::Required,
        swa: Swa::Always {
            pattern: 2,
            dense_first: false,
        },
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        align: 1,
    },
    Rule {
        arch: "smollm3",
        models: "SmolLM3",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: NO_HOOKS,
        check: None,
        // smollm3.cpp: no RoPE where (il + 1) % 4 == 0, il the local index.
        align: 4,
    },
    Rule {
        arch: "deepseek2",
        models: "DeepSeek V2, V2.5, V3, R1, Kimi-K2-style",
        output: Output::Optional,
        swa: Swa::None,
        tok_scale: TokScale::None,
        hooks: &[deepseek2_dense_lead, deepseek2_lite, deepseek2_gating],
        check: Some(deepseek2_check),
        align: 1,
    },
];

/// Architectures refused with a known reason (others: not verified).
pub static REFUSED: &[(&str, &str)] = &[
    (
        "gemma",
        "llama.cpp multiplies whatever input a stage gets by sqrt(n_embd), so every stage after the first would scale its input again",
    ),
    (
        "gemma2",
        "llama.cpp multiplies whatever input a stage gets by sqrt(n_embd), and picks the attention scale of the 27B from the layer count (46)",
    ),
    (
        "glm4",
        "llama.cpp aborts when a batch of embeddings reaches a graph without M-RoPE",
    ),
    (
        "glm4moe",
        "llama.cpp aborts when a batch of embeddings reaches a graph without M-RoPE",
    ),
    (
        "llama4",
        "its no-RoPE and MoE interleave are hard-coded on the local layer index (not verified with aligned boundaries)",
    ),
    (
        "exaone4",
        "llama.cpp enables the sliding window of the 32B only when the layer count is 64",
    ),
    (
        "gemma3n",
        "per-layer token embeddings and KV shared across layers cannot be cut by layer",
    ),
    (
        "gemma4",
        "per-layer token embeddings and KV shared across layers cannot be cut by layer",
    ),
    (
        "qwen35",
        "interleaved M-RoPE needs 4 positions per token in embedding batches",
    ),
    (
        "qwen35moe",
        "interleaved M-RoPE needs 4 positions per token in embedding batches",
    ),
];

fn gemma3_check(_: &dyn Meta, m: &Model, ranges: &[(u32, u32)]) -> Result<()> {
    // gemma3.cpp: f_attention_scale depends on `type == LLM_TYPE_27B`, which
    // is `n_layer() == 62`.
    if m.n_layer == 62 {
        return Err(EngineError::Unsupported(
            "gemma3 27B cannot be split: llama.cpp picks its attention scale from the layer count (62), which no shard has".into(),
        ));
    }
    if let Some(&(a, b)) = ranges.iter().find(|&&(a, b)| b - a + 1 == 62) {
        return Err(EngineError::Unsupported(format!(
            "gemma3: a shard of 62 layers ({a}-{b}) would get the 27B's attention scale; choose other ranges"
        )));
    }
    Ok(())
}

fn granite_check(meta: &dyn Meta, m: &Model, _: &[(u32, u32)]) -> Result<()> {
    if meta.has(&format!("{}.deepstack_mapping", m.arch)) {
        return Err(EngineError::Unsupported(
            "granite with deepstack layers (Granite Vision) cannot be split: the deepstack inputs are not carried between stages".into(),
        ));
    }
    Ok(())
}

/// granite: `embedding_scale` multiplies token and embedding input alike,
/// so only the first shard may keep it.
fn granite_embedding_scale(_: &dyn Meta, m: &Model, s: &Shard, e: &mut Vec<Edit>) -> Result<()> {
    if !s.is_first() {
        e.push(Edit::Remove(format!("{}.embedding_scale", m.arch)));
    }
    Ok(())
}

/// deepseek2.cpp: V2-Lite-style models are recognised by their layer count
/// (26, 27, or 48 with a vocabulary of 128256) and read no `q_lora_rank`.
fn deepseek2_is_lite(n_layer: u32, n_vocab: u32) -> bool {
    n_layer == 27 || n_layer == 26 || (n_layer == 48 && n_vocab == 128256)
}

fn deepseek2_check(_: &dyn Meta, m: &Model, ranges: &[(u32, u32)]) -> Result<()> {
    if deepseek2_is_lite(m.n_layer, m.n_vocab) {
        return Ok(()); // every shard gets q_lora_rank = 0 written out
    }
    let n = ranges.len();
    for (i, &(a, b)) in ranges.iter().enumerate() {
        let vocab = if i + 1 == n { m.n_vocab } else { 1 };
        if deepseek2_is_lite(b - a + 1, vocab) {
            return Err(EngineError::Unsupported(format!(
                "deepseek2: llama.cpp would take a shard of {} layers ({a}-{b}) for a V2-Lite model and ignore its q_lora_rank; choose other ranges",
                b - a + 1
            )));
        }
    }
    Ok(())
}

/// Leading dense (non-MoE) layers are counted from the shard's first layer.
fn deepseek2_dense_lead(meta: &dyn Meta, m: &Model, s: &Shard, e: &mut Vec<Edit>) -> Result<()> {
    let key = format!("{}.leading_dense_block_count", m.arch);
    if let Some(lead) = meta.u32(&key) {
        e.push(Edit::U32(
            key,
            lead.saturating_sub(s.start).min(s.n_layers()),
        ));
    }
    Ok(())
}

fn deepseek2_lite(_: &dyn Meta, m: &Model, _: &Shard, e: &mut Vec<Edit>) -> Result<()> {
    if deepseek2_is_lite(m.n_layer, m.n_vocab) {
        e.push(Edit::U32(format!("{}.attention.q_lora_rank", m.arch), 0));
    }
    Ok(())
}

/// Without `expert_gating_func`, llama.cpp infers it from the layer count
/// and vocabulary (sigmoid for GLM 4.7 Lite, else softmax): write it out.
fn deepseek2_gating(meta: &dyn Meta, m: &Model, _: &Shard, e: &mut Vec<Edit>) -> Result<()> {
    let key = format!("{}.expert_gating_func", m.arch);
    if meta.u32(&key).is_none_or(|g| g == 0) {
        let sigmoid = (m.n_layer == 47 || m.n_layer == 48) && m.n_vocab == 154880;
        e.push(Edit::U32(key, if sigmoid { 2 } else { 1 }));
    }
    Ok(())
}
