//! See `previewd::fuzzing::auth_token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| previewd::fuzzing::auth_token(data));
