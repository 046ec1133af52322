//! The committed `src/cuda/params_bindings.rs` must equal what bindgen makes of `kernels/params.h`
//! now (build.rs regenerates it into OUT_DIR when libclang is available), so the kernels' ABI
//! and the Rust launchers cannot drift. Fix a failure with `tools/update_bindings.sh`.

/// Whitespace-insensitive: a formatter difference is not an ABI difference.
fn tokens(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn committed_bindings_match_params_h() {
    let regenerated = include_str!(concat!(env!("OUT_DIR"), "/params_bindings.rs"));
    let committed = include_str!("../src/cuda/params_bindings.rs");
    if regenerated.is_empty() {
        println!(
            "SKIP committed_bindings_match_params_h: libclang was not available at build time"
        );
        return;
    }
    assert!(
        tokens(regenerated) == tokens(committed),
        "src/cuda/params_bindings.rs is stale: kernels/params.h changed. \
         Run tools/update_bindings.sh and commit the result."
    );
}

#[test]
fn every_params_struct_is_a_kernel_argument() {
    let committed = include_str!("../src/cuda/params_bindings.rs");
    let structs: Vec<&str> = committed
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub struct "))
        .map(|r| {
            r.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
        })
        .collect();
    assert!(!structs.is_empty(), "no structs in the committed bindings");
    for s in structs {
        let want = format!("unsafe impl cudarc::driver::DeviceRepr for {s} {{}}");
        assert!(
            committed.contains(&want),
            "{s} has no DeviceRepr impl in the bindings"
        );
    }
}
