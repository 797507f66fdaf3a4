//! See `previewd::fuzzing::agent_http`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::agent_http(data));
