#!/usr/bin/env python3
"""Tiny random-weight GGUF models, one or more per architecture the splitter
accepts, written with the `gguf` package (pinned in scripts/setup.sh).

    python3 scripts/make-test-models.py OUT_DIR

Each model is small (a few MB at most) but has what its family is special
for: global RoPE tensors (Llama 3.1+ `rope_freqs`, Phi-3 LongRoPE factors),
sliding-window layers on both sides of the boundaries the tests use (Gemma 3,
OLMo 3, gpt-oss), MoE with leading dense layers and an MTP layer
(DeepSeek V2/V3), per-layer arrays (Qwen3-MoE), tied and untied heads, and
token embeddings in many ggml types (F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K,
Q6_K). Weights are random: only equality with the unsplit model matters.
Deterministic: the same script writes the same files.
"""

import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

N_VOCAB = 512


def vocab(w):
    toks, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(toks) < N_VOCAB:
        toks.append("\u2581" + letters[i % 26] + letters[(i // 26) % 26])
        scores.append(-float(i))
        types.append(1)
        i += 1
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)


def f16(x):
    return np.float16(x).tobytes()


def q8_0(rng, rows, cols):
    out = bytearray()
    for _ in range(rows * cols // 32):
        out += f16(rng.uniform(0.0005, 0.002)) + rng.integers(-127, 128, 32, dtype=np.int8).tobytes()
    return out


def q4_0(rng, rows, cols):
    out = bytearray()
    for _ in range(rows * cols // 32):
        out += f16(rng.uniform(0.005, 0.02)) + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return out


def q4_k(rng, rows, cols):
    out = bytearray()
    for _ in range(rows * cols // 256):
        out += f16(rng.uniform(1e-4, 4e-4)) + f16(rng.uniform(2e-5, 2e-4))
        out += rng.integers(0, 256, 12 + 128, dtype=np.uint8).tobytes()
    return out


def q5_k(rng, rows, cols):
    out = bytearray()
    for _ in range(rows * cols // 256):
        out += f16(rng.uniform(6e-5, 2e-4)) + f16(rng.uniform(2e-5, 1e-4))
        out += rng.integers(0, 256, 12 + 32 + 128, dtype=np.uint8).tobytes()
    return out


def q6_k(rng, rows, cols):
    out = bytearray()
    for _ in range(rows * cols // 256):
        out += rng.integers(0, 256, 128 + 64, dtype=np.uint8).tobytes()
        out += rng.integers(-64, 64, 16, dtype=np.int8).tobytes()
        out += f16(rng.uniform(1e-4, 4e-4))
    return out


RAW = {"Q8_0": (q8_0, Q.Q8_0), "Q4_0": (q4_0, Q.Q4_0), "Q4_K": (q4_k, Q.Q4_K),
       "Q5_K": (q5_k, Q.Q5_K), "Q6_K": (q6_k, Q.Q6_K)}


class Model:
    def __init__(self, arch, seed, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, n_layer=6):
        self.arch, self.rng = arch, np.random.default_rng(seed)
        self.n_embd, self.n_head, self.n_head_kv, self.n_ff = n_embd, n_head, n_head_kv, n_ff
        self.hd = n_embd // n_head
        self.n_layer = n_layer
        self.kv, self.tensors = [], []

    def key(self, name, value, kind=None):
        self.kv.append((f"{self.arch}.{name}" if not name.startswith(("general.", "tokenizer.")) else name, value, kind))

    def t(self, name, *ne, kind="F32", scale=None, ones=False):
        """A tensor of ggml shape ne (fastest dimension first)."""
        shape = tuple(reversed(ne))
        if ones:
            x = 1.0 + 0.1 * self.rng.standard_normal(shape)
        else:
            s = scale if scale is not None else 1.0 / np.sqrt(ne[0])
            x = s * self.rng.standard_normal(shape)
        if kind in RAW:
            gen, qt = RAW[kind]
            raw = np.frombuffer(bytes(gen(self.rng, ne[1], ne[0])), dtype=np.uint8)
            self.tensors.append((name, raw.reshape(ne[1], -1), qt))
        elif kind == "BF16":
            bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            self.tensors.append((name, bits.view(np.uint8).reshape(ne[1], -1), Q.BF16))
        else:
            self.tensors.append((name, x.astype(np.float16 if kind == "F16" else np.float32), None))

    def common_keys(self, ctx=2048):
        self.key("block_count", self.n_layer)
        self.key("context_length", ctx)
        self.key("embedding_length", self.n_embd)
        self.key("feed_forward_length", self.n_ff)
        self.key("attention.head_count", self.n_head)
        self.key("attention.head_count_kv", self.n_head_kv)
        self.key("attention.layer_norm_rms_epsilon", 1e-5)
        self.key("rope.freq_base", 10000.0)
        self.key("rope.dimension_count", self.hd)

    def attn(self, i, bias=False, qk_norm=None, norm=True):
        e, hd = self.n_embd, self.hd
        if norm:
            self.t(f"blk.{i}.attn_norm.weight", e, ones=True)
        self.t(f"blk.{i}.attn_q.weight", e, self.n_head * hd, kind="F16")
        self.t(f"blk.{i}.attn_k.weight", e, self.n_head_kv * hd, kind="F16")
        self.t(f"blk.{i}.attn_v.weight", e, self.n_head_kv * hd, kind="F16")
        self.t(f"blk.{i}.attn_output.weight", self.n_head * hd, e, kind="F16")
        if bias:
            self.t(f"blk.{i}.attn_q.bias", self.n_head * hd, scale=0.1)
            self.t(f"blk.{i}.attn_k.bias", self.n_head_kv * hd, scale=0.1)
            self.t(f"blk.{i}.attn_v.bias", self.n_head_kv * hd, scale=0.1)
        if qk_norm == "head":
            self.t(f"blk.{i}.attn_q_norm.weight", hd, ones=True)
            self.t(f"blk.{i}.attn_k_norm.weight", hd, ones=True)

    def ffn(self, i, norm=True):
        e, f = self.n_embd, self.n_ff
        if norm:
            self.t(f"blk.{i}.ffn_norm.weight", e, ones=True)
        self.t(f"blk.{i}.ffn_gate.weight", e, f, kind="F16")
        self.t(f"blk.{i}.ffn_up.weight", e, f, kind="F16")
        self.t(f"blk.{i}.ffn_down.weight", f, e, kind="F16")

    def moe(self, i, n_exp, ff_exp, shared=None, gate_inp_shexp=False):
        e = self.n_embd
        self.t(f"blk.{i}.ffn_norm.weight", e, ones=True)
        self.t(f"blk.{i}.ffn_gate_inp.weight", e, n_exp, scale=1.0)
        self.t(f"blk.{i}.ffn_gate_exps.weight", e, ff_exp, n_exp, kind="F16")
        self.t(f"blk.{i}.ffn_up_exps.weight", e, ff_exp, n_exp, kind="F16")
        self.t(f"blk.{i}.ffn_down_exps.weight", ff_exp, e, n_exp, kind="F16")
        if shared:
            if gate_inp_shexp:
                self.t(f"blk.{i}.ffn_gate_inp_shexp.weight", e, scale=0.3)
            self.t(f"blk.{i}.ffn_gate_shexp.weight", e, shared, kind="F16")
            self.t(f"blk.{i}.ffn_up_shexp.weight", e, shared, kind="F16")
            self.t(f"blk.{i}.ffn_down_shexp.weight", shared, e, kind="F16")

    def head(self, embd_kind, tied):
        # Small rows: the layers, not the token itself, decide the next token.
        self.t("token_embd.weight", self.n_embd, N_VOCAB, kind=embd_kind, scale=0.15)
        self.t("output_norm.weight", self.n_embd, ones=True)
        if not tied:
            self.t("output.weight", self.n_embd, N_VOCAB, kind="F16")

    def write(self, path):
        tmp = f"{path}.{os.getpid()}.part"
        w = GGUFWriter(tmp, self.arch)
        # Not the file name: llama.cpp treats vocabularies by model name ("phi3").
        w.add_string("general.name", "tiny random model")
        vocab(w)
        for k, v, kind in self.kv:
            if isinstance(v, list):
                w.add_array(k, v)
            elif isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
            elif isinstance(v, str):
                w.add_string(k, v)
            else:
                w.add_uint32(k, v)
        for name, data, qt in self.tensors:
            if qt is None:
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)


def llama(seed=1):
    # Llama 3.1+/3.2 style: global rope_freqs, tied head, Q4_K embeddings.
    m = Model("llama", seed, n_embd=256, n_ff=128, n_layer=7)
    m.common_keys()
    m.key("vocab_size", N_VOCAB)
    m.t("rope_freqs.weight", m.hd // 2, scale=0)
    m.tensors[-1] = ("rope_freqs.weight", np.linspace(1.0, 40.0, m.hd // 2, dtype=np.float32), None)
    for i in range(m.n_layer):
        m.attn(i)
        m.ffn(i)
    m.head("Q4_K", tied=True)
    return m


def qwen2(seed=2):
    m = Model("qwen2", seed, n_embd=256, n_ff=128, n_layer=6)
    m.common_keys()
    for i in range(m.n_layer):
        m.attn(i, bias=True)
        m.ffn(i)
    m.head("Q6_K", tied=False)
    return m


def qwen3(seed=3):
    m = Model("qwen3", seed, n_layer=6)
    m.common_keys()
    m.key("attention.key_length", m.hd)
    m.key("attention.value_length", m.hd)
    for i in range(m.n_layer):
        m.attn(i, qk_norm="head")
        m.ffn(i)
    m.head("BF16", tied=True)
    return m


def qwen2moe(seed=4):
    m = Model("qwen2moe", seed, n_layer=6)
    m.common_keys()
    m.key("expert_count", 4)
    m.key("expert_used_count", 2)
    m.key("expert_feed_forward_length", 32)
    m.key("expert_shared_feed_forward_length", 48)
    for i in range(m.n_layer):
        m.attn(i, bias=True)
        m.moe(i, 4, 32, shared=48, gate_inp_shexp=True)
    m.head("Q8_0", tied=False)
    return m


def qwen3moe(seed=5):
    m = Model("qwen3moe", seed, n_layer=6)
    m.common_keys()
    # Per-layer arrays: sliced by the splitter.
    m.kv = [(k, v, t) for (k, v, t) in m.kv if not k.endswith(("attention.head_count", "attention.head_count_kv"))]
    m.key("attention.head_count", [m.n_head] * m.n_layer)
    m.key("attention.head_count_kv", [m.n_head_kv] * m.n_layer)
    m.key("attention.key_length", m.hd)
    m.key("attention.value_length", m.hd)
    m.key("expert_count", 4)
    m.key("expert_used_count", 2)
    m.key("expert_feed_forward_length", [32] * m.n_layer)
    for i in range(m.n_layer):
        m.attn(i, qk_norm="head")
        m.moe(i, 4, 32)
    m.head("F16", tied=True)
    return m


def gemma3(seed=6):
    # Pattern 6: layers 0-4 slide, 5 is global, 6-7 slide (8 layers).
    m = Model("gemma3", seed, n_embd=256, n_ff=128, n_layer=8)
    m.common_keys()
    m.key("attention.key_length", m.hd)
    m.key("attention.value_length", m.hd)
    m.key("attention.sliding_window", 4)
    m.key("rope.freq_base_swa", 1000.0)
    for i in range(m.n_layer):
        m.attn(i, qk_norm="head")
        m.t(f"blk.{i}.post_attention_norm.weight", m.n_embd, ones=True)
        m.ffn(i)
        m.t(f"blk.{i}.post_ffw_norm.weight", m.n_embd, ones=True)
    m.head("Q5_K", tied=True)
    return m


def phi3(seed=7):
    m = Model("phi3", seed, n_layer=6)
    m.common_keys(ctx=4096)
    m.key("rope.scaling.original_context_length", 1024)
    e, hd = m.n_embd, m.hd
    for i in range(m.n_layer):
        m.t(f"blk.{i}.attn_norm.weight", e, ones=True)
        m.t(f"blk.{i}.attn_qkv.weight", e, e + 2 * m.n_head_kv * hd, kind="F16")
        m.t(f"blk.{i}.attn_output.weight", e, e, kind="F16")
        m.t(f"blk.{i}.ffn_norm.weight", e, ones=True)
        m.t(f"blk.{i}.ffn_up.weight", e, 2 * m.n_ff, kind="F16")
        m.t(f"blk.{i}.ffn_down.weight", m.n_ff, e, kind="F16")
    m.tensors.append(("rope_factors_long.weight", np.linspace(1.0, 30.0, hd // 2, dtype=np.float32), None))
    m.tensors.append(("rope_factors_short.weight", np.linspace(1.0, 3.0, hd // 2, dtype=np.float32), None))
    m.head("F32", tied=False)
    return m


def mistral3(seed=8):
    m = Model("mistral3", seed, n_layer=6)
    m.common_keys()
    m.tensors.append(("rope_freqs.weight", np.linspace(1.0, 20.0, m.hd // 2, dtype=np.float32), None))
    for i in range(m.n_layer):
        m.attn(i)
        m.ffn(i)
    m.head("Q4_0", tied=False)
    return m


def granite(seed=9):
    m = Model("granite", seed, n_layer=6)
    m.common_keys()
    m.key("embedding_scale", 12.0)
    m.key("residual_scale", 0.22)
    m.key("attention.scale", 0.125)
    m.key("logit_scale", 8.0)
    for i in range(m.n_layer):
        m.attn(i)
        m.ffn(i)
    m.head("F16", tied=True)
    return m


def olmo2(seed=10):
    # OLMo 3 style: window 4, pattern 4 (layers 3 and 7 global).
    m = Model("olmo2", seed, n_layer=8)
    m.common_keys()
    m.key("attention.sliding_window", 4)
    for i in range(m.n_layer):
        m.attn(i, norm=False)
        m.t(f"blk.{i}.attn_q_norm.weight", m.n_embd, ones=True)
        m.t(f"blk.{i}.attn_k_norm.weight", m.n_head_kv * m.hd, ones=True)
        m.t(f"blk.{i}.post_attention_norm.weight", m.n_embd, ones=True)
        m.ffn(i, norm=False)
        m.t(f"blk.{i}.post_ffw_norm.weight", m.n_embd, ones=True)
    m.head("F32", tied=False)
    return m


def gpt_oss(seed=11):
    # Window 4 on even layers (pattern 2), sinks, biased experts.
    m = Model("gpt-oss", seed, n_layer=6)
    m.common_keys()
    m.key("attention.key_length", m.hd)
    m.key("attention.value_length", m.hd)
    m.key("attention.sliding_window", 4)
    m.key("expert_count", 4)
    m.key("expert_used_count", 2)
    m.key("expert_feed_forward_length", 32)
    e = m.n_embd
    for i in range(m.n_layer):
        m.attn(i, bias=True)
        m.t(f"blk.{i}.attn_output.bias", e, scale=0.1)
        m.t(f"blk.{i}.attn_sinks.weight", m.n_head, scale=1.0)
        m.t(f"blk.{i}.post_attention_norm.weight", e, ones=True)
        m.t(f"blk.{i}.ffn_gate_inp.weight", e, 4, scale=1.0)
        m.t(f"blk.{i}.ffn_gate_inp.bias", 4, scale=0.1)
        for p in ("gate", "up"):
            m.t(f"blk.{i}.ffn_{p}_exps.weight", e, 32, 4, kind="F16")
            m.t(f"blk.{i}.ffn_{p}_exps.bias", 32, 4, scale=0.1)
        m.t(f"blk.{i}.ffn_down_exps.weight", 32, e, 4, kind="F16")
        m.t(f"blk.{i}.ffn_down_exps.bias", e, 4, scale=0.1)
    m.head("Q8_0", tied=False)
    return m


def stub(arch, n_layer=4, embd_kind="F32"):
    """Metadata and embeddings only: enough for the splitter to decide."""
    def make():
        m = Model(arch, 99, n_layer=n_layer)
        m.common_keys()
        if embd_kind == "I32":
            m.tensors.append(("token_embd.weight", np.zeros((N_VOCAB, m.n_embd), dtype=np.int32), None))
        else:
            m.t("token_embd.weight", m.n_embd, N_VOCAB, kind=embd_kind)
        return m
    return make


REFUSED = ["gemma", "gemma2", "glm4", "glm4moe", "llama4", "exaone4",
           "gemma3n", "gemma4", "qwen35", "qwen35moe", "bert", "mamba"]

def smollm3(seed=13):
    # No RoPE on every 4th layer (3, 7): shards must start at multiples of 4.
    m = Model("smollm3", seed, n_layer=10)
    m.common_keys()
    for i in range(m.n_layer):
        m.attn(i)
        m.ffn(i)
    m.head("Q8_0", tied=True)
    return m


def deepseek2(seed=12):
    # 6 trunk layers (2 leading dense, then MoE with a shared expert) and one
    # MTP layer (blk.6), q LoRA (not a "lite" size), legacy (non-MLA) KV.
    m = Model("deepseek2", seed, n_layer=7, n_head_kv=4)
    m.common_keys()
    e, nh, nope, rope, v, ql, kvl = m.n_embd, m.n_head, 16, 8, 16, 32, 16
    m.key("nextn_predict_layers", 1)
    m.key("leading_dense_block_count", 2)
    m.key("attention.key_length", nope + rope)
    m.key("attention.value_length", v)
    m.key("attention.q_lora_rank", ql)
    m.key("attention.kv_lora_rank", kvl)
    m.kv = [(k, val, t) for (k, val, t) in m.kv if not k.endswith("rope.dimension_count")]
    m.key("rope.dimension_count", rope)
    m.key("expert_count", 4)
    m.key("expert_used_count", 2)
    m.key("expert_shared_count", 1)
    m.key("expert_feed_forward_length", 24)
    m.key("expert_weights_scale", 1.5)
    for i in range(m.n_layer):
        m.t(f"blk.{i}.attn_norm.weight", e, ones=True)
        m.t(f"blk.{i}.attn_q_a_norm.weight", ql, ones=True)
        m.t(f"blk.{i}.attn_q_a.weight", e, ql, kind="F16")
        m.t(f"blk.{i}.attn_q_b.weight", ql, nh * (nope + rope), kind="F16")
        m.t(f"blk.{i}.attn_kv_a_norm.weight", kvl, ones=True)
        m.t(f"blk.{i}.attn_kv_a_mqa.weight", e, kvl + rope, kind="F16")
        m.t(f"blk.{i}.attn_kv_b.weight", kvl, nh * (nope + v), kind="F16")
        m.t(f"blk.{i}.attn_output.weight", nh * v, e, kind="F16")
        if i < 2:
            m.ffn(i)
        else:
            m.moe(i, 4, 24, shared=24)
        if i == 6:
            m.t(f"blk.{i}.nextn.eh_proj.weight", 2 * e, e, kind="F16")
            m.t(f"blk.{i}.nextn.enorm.weight", e, ones=True)
            m.t(f"blk.{i}.nextn.hnorm.weight", e, ones=True)
            m.t(f"blk.{i}.nextn.shared_head_norm.weight", e, ones=True)
    m.head("Q8_0", tied=False)
    return m


MODELS = {
    "llama31-tied": llama,
    "qwen2-untied": qwen2,
    "qwen3-tied": qwen3,
    "qwen2moe": qwen2moe,
    "qwen3moe-arrays": qwen3moe,
    "gemma3-swa": gemma3,
    "phi3-longrope": phi3,
    "mistral3-rope": mistral3,
    "granite-tied": granite,
    "olmo3-swa": olmo2,
    "gpt-oss-swa": gpt_oss,
    "deepseek2-moe-mtp": deepseek2,
    "smollm3-nope": smollm3,
}
MODELS.update({f"stub-{a}": stub(a) for a in REFUSED})
MODELS["stub-gemma3-27b"] = stub("gemma3", n_layer=62, embd_kind="F16")
MODELS["stub-llama-i32-embd"] = stub("llama", embd_kind="I32")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    names = sys.argv[2:] or list(MODELS)
    for name in names:
        path = os.path.join(out, f"{name}.gguf")
        if not os.path.exists(path):
            MODELS[name]().write(path)
        print(path)


if __name__ == "__main__":
    main()
