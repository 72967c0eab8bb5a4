#!/usr/bin/env python3
"""Writes the GGUF seed of the gguf_header fuzz target: a 2-layer llama
with an 8-wide embedding, 16 tokens and tiny F32 tensors (a header the
splitter accepts, under 4 KiB), with the `gguf` package of scripts/setup.sh.

usage: python3 fuzz/make_gguf_seed.py OUT [KEY=U32 …]
  e.g. fuzz/seeds/gguf_header/tiny-llama.gguf; KEY=U32 overrides a u32 key
  of the llama.* namespace (block_count=4294967295) for regression inputs.
"""
import sys

import numpy as np
from gguf import GGUFWriter

E, V, L = 8, 16, 2
over = dict(a.split("=", 1) for a in sys.argv[2:])
w = GGUFWriter(sys.argv[1], "llama")
for k, v in over.items():
    w.add_uint32(f"llama.{k}", int(v))
if "block_count" not in over:
    w.add_block_count(L)
w.add_embedding_length(E)
w.add_feed_forward_length(16)
w.add_head_count(2)
if "attention.head_count_kv" not in over:
    w.add_head_count_kv(2)
w.add_context_length(64)
w.add_layer_norm_rms_eps(1e-5)
w.add_tokenizer_model("llama")
w.add_token_list([f"t{i}" for i in range(V)])
w.add_token_scores([0.0] * V)
w.add_token_types([1] * V)
t = lambda *shape: np.zeros(shape, dtype=np.float32)
w.add_tensor("token_embd.weight", t(V, E))
for i in range(L):
    w.add_tensor(f"blk.{i}.attn_norm.weight", t(E))
    w.add_tensor(f"blk.{i}.attn_q.weight", t(E, E))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", t(E))
w.add_tensor("output_norm.weight", t(E))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
