//! Source-level rules every kernel (and the host code around them) must keep, checked without a
//! GPU.

use std::path::Path;

/// Under `FORA_PDL=1` a kernel may start while the one before it on the stream still runs, so
/// every kernel's first statement must be `grid_dependency_sync();` (kernels/common.cuh): one
/// that touched global memory first, or returned before it, would race its predecessor. A new
/// kernel without it fails here. The TMA GEMMs (`gemm_tma_*`, the fused `gemm_tma_ln_*`) and the
/// fused `qkv_attention_*` alone may start with `grid_dependency_deferred();`: their producer
/// loads weights before it waits, and their shared bodies must then wait in both roles before
/// anything else.
#[test]
fn every_kernel_waits_for_its_predecessor_first() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut kernels = 0;
    let mut missing = Vec::new();
    let mut deferred = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let mut rest = src.as_str();
        while let Some(at) = rest.find("extern \"C\" __global__") {
            let after = &rest[at..];
            let open = after.find('{').expect("a kernel body");
            let head = &after[..open];
            // The kernel's name: the identifier before its parameter list.
            let name = head[..head.rfind('(').expect("a parameter list")]
                .trim_end()
                .rsplit(|c: char| !(c.is_alphanumeric() || c == '_' || c == '#'))
                .next()
                .unwrap_or("?")
                .to_string();
            // The first statement: skip whitespace and macro line continuations.
            let body =
                after[open + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            let deferred_ok = ["gemm_tma_", "qkv_attention_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                && body.starts_with("grid_dependency_deferred();");
            if deferred_ok {
                deferred += 1;
            } else if !body.starts_with("grid_dependency_sync();") {
                missing.push(format!(
                    "{}: {name}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
            kernels += 1;
            rest = &after[open..];
        }
    }
    assert!(
        kernels >= 30,
        "found only {kernels} kernels in {}",
        dir.display()
    );
    assert!(
        missing.is_empty(),
        "kernels whose first statement is not grid_dependency_sync(): {missing:?}"
    );
    if deferred > 0 {
        // The deferring kernels' body: the producer's wait after its early weight loads, and
        // the consumers' before their first statement past the register handover.
        let src = std::fs::read_to_string(dir.join("gemm_sm90.cu")).unwrap();
        let body = &src[src
            .find("FORA_DEVICE void gemm_tma_tile(")
            .expect("gemm_tma_tile")..];
        let producer = &body[body
            .find("if (warpgroup == 0) {")
            .expect("the producer branch")..];
        // Before the producer's wait: weight loads only (load_a is defined there, not called).
        let wait = producer
            .find("grid_dependency_wait();")
            .expect("a producer wait");
        let early = &producer[..wait];
        let main_loop = producer
            .find("for (int u = first; u < units; u += stride)")
            .expect("the main loop");
        assert!(
            wait < main_loop
                && early.contains("load_w(first_unit, kt")
                && !early.contains("load_a("),
            "the TMA producer may load only W before its wait, and must wait before its main loop"
        );
        // The consumers' branch: its first statement gives them their registers.
        let consumer = &producer[producer
            .find("setmaxnreg_inc<232>();")
            .expect("the consumer branch")..];
        let first = consumer
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .take(2)
            .collect::<Vec<_>>();
        assert_eq!(
            first,
            ["setmaxnreg_inc<232>();", "grid_dependency_wait();"],
            "the TMA consumers must wait first"
        );
        // The fused GEMM + LayerNorm (gemm_ln_sm90.cu) and qkv + attention
        // (qkv_attention_sm90.cu): the same two rules.
        producer_loads_w_first_consumers_wait_first(
            &dir,
            ("gemm_ln_sm90.cu", "FORA_DEVICE void gemm_ln_tile("),
            "if (tid >= kLnConsumers) {",
            "tma_load_2d(smem_b",
            "// ---- consumers: the mainloop ----",
        );
        producer_loads_w_first_consumers_wait_first(
            &dir,
            (
                "qkv_attention_sm90.cu",
                "FORA_DEVICE void qkv_attention_block(",
            ),
            "if (tid >= S::CONSUMERS) {",
            "load_w(",
            "// ---- consumers: the GEMM ----",
        );
    }
}

/// A TMA kernel with one producer branch (`producer` starts it) and consumers (after
/// `consumers`) in the device function `body` of `file`: the producer issues W's loads
/// (`w_load`) and none of A's (`tma_load_2d(smem_a`, `load_a(`) before its
/// `grid_dependency_wait()`, and the consumers' first statement is their wait.
fn producer_loads_w_first_consumers_wait_first(
    dir: &std::path::Path,
    (file, body): (&str, &str),
    producer: &str,
    w_load: &str,
    consumers: &str,
) {
    let src = std::fs::read_to_string(dir.join(file)).unwrap();
    let body = &src[src.find(body).unwrap_or_else(|| panic!("{file}: {body}"))..];
    let branch = &body[body
        .find(producer)
        .unwrap_or_else(|| panic!("{file}: the producer branch"))..];
    let wait = branch
        .find("grid_dependency_wait();")
        .unwrap_or_else(|| panic!("{file}: a producer wait"));
    let early = &branch[..wait];
    assert!(
        early.contains(w_load)
            && !early.contains("tma_load_2d(smem_a")
            && !early.contains("load_a("),
        "{file}: the producer may load only W before its wait"
    );
    let consumer = &body[body
        .find(consumers)
        .unwrap_or_else(|| panic!("{file}: the consumers' part"))..];
    let first = consumer
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("//"));
    assert_eq!(
        first,
        Some("grid_dependency_wait();"),
        "{file}: the consumers must wait first"
    );
}

/// No `mem::zeroed` in the crate: several driver structs hold Rust enums without a zero value
/// (`CUDA_MEMCPY3D`'s `CUmemorytype`), and zeroing one panics at run time, only on a GPU (the
/// step graph aborted that way on an H200, 2026-11-26). Structs the driver fills are
/// `MaybeUninit`; others are built field by field or with `Default`.
#[test]
fn no_zeroed_driver_structs() {
    fn visit(dir: &Path, hits: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, hits);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let src = std::fs::read_to_string(&path).unwrap();
                for (i, line) in src.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if code.contains("mem::zeroed") {
                        hits.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    let mut hits = Vec::new();
    visit(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut hits,
    );
    assert!(
        hits.is_empty(),
        "mem::zeroed in the crate:\n{}",
        hits.join("\n")
    );
}

/// The weights-before-wait contract of the deferring kernels (their producers read W before
/// `griddepcontrol.wait`) holds only if no kernel lets its dependents start before its own wait:
/// a kernel that called `grid_launch_dependents()` first would let the next one start while
/// the one before it still ran, two kernels back. So every call comes right after a
/// `grid_dependency_wait();` (kernels/common.cuh's definition line aside).
#[test]
fn every_launch_of_dependents_follows_a_wait() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut calls = 0;
    let mut bad = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .extension()
            .is_some_and(|e| e == "cu" || e == "cuh" || e == "h")
        {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = src.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() != "grid_launch_dependents();" {
                continue;
            }
            calls += 1;
            // The statement before: the previous line that is not blank or a comment.
            let before = lines[..i]
                .iter()
                .rev()
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !l.starts_with("//"));
            if before != Some("grid_dependency_wait();") {
                bad.push(format!(
                    "{}:{}",
                    path.file_name().unwrap().to_string_lossy(),
                    i + 1
                ));
            }
        }
    }
    assert!(calls >= 7, "found only {calls} calls in {}", dir.display());
    assert!(
        bad.is_empty(),
        "grid_launch_dependents() not right after grid_dependency_wait(): {bad:?}"
    );
}
