#![no_main]
//! Fuzzes `llama_cluster_tests::fuzz_cases::manifest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = llama_cluster_tests::fuzz_cases::manifest(data);
});
