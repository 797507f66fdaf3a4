//! See `previewd::fuzzing::store_yaml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::store_yaml(data));
