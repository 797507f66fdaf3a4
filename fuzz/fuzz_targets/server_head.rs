//! See `previewd::fuzzing::server_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::server_head(data));
