#![no_main]
//! Fuzzes `llama_cluster_tests::fuzz_cases::gguf_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = llama_cluster_tests::fuzz_cases::gguf_header(data);
});
