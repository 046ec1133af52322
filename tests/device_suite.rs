//! A dry run of `tools/device_suite.sh`, the script of the one device call a session lent a GPU
//! makes, on the CPU: a fake pack (a `fora` and GPU test binaries that are shell scripts
//! printing what the real ones print where the script reads it, and logging how they were
//! called), a fake `nvidia-smi` and a fake `tools/bench_torch.py`. The script's own logic runs
//! as on the device: unpacking the carried archive, the phases in order, the test parts and
//! their bounds, the tuning's retries without a candidate that broke its process, the
//! summaries, and the archive the call brings back. The call prepared in
//! `docs/next_device_call.md` is run as written there. GPU calls are rare (none in sessions 20
//! to 33); a slip in the script found on the device costs the call.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fake `fora`: logs each call (arguments and the environment the suite sets), answers
/// `info` and `sample`, and for `bench` writes the JSON and prints table rows; with `--tune`
/// it goes through candidates `given pdl gemm_ln qkv_attention` (less `FORA_TUNE_SKIP`'s) as
/// the tuner logs them. `FAKE_KILLER=rows:name`: that candidate faults and leaves the GPU
/// unusable (the tuner's error); `FAKE_HANG=rows:name`: its launch never ends and the watchdog
/// ends the process (its line, exit status 3).
const FAKE_FORA: &str = r###"#!/usr/bin/env bash
echo "fora $* | $(env | grep '^FORA_' | sort | tr '\n' ' ')" >> "$FAKE_LOG"
cmd=$1; shift
case $cmd in
  info) echo "cuda kernels: compiled (13 modules, fake)"; echo "hopper: fake"; exit 0 ;;
  sample) while [ $# -gt 0 ]; do if [ "$1" = --out ]; then echo png > "$2"; fi; shift; done; exit 0 ;;
  bench) ;;
  *) echo "fake fora: no command $cmd" >&2; exit 2 ;;
esac
rows=""; json=""; tune=0; watchdog=""
while [ $# -gt 0 ]; do
  case $1 in
    --batches) rows=$2; shift ;;
    --json) json=$2; shift ;;
    --tune) tune=1 ;;
    --watchdog-s) watchdog=$2; shift ;;
  esac
  shift
done
if [ -n "$json" ]; then echo '{"fake": true}' > "$json"; fi
if [ "$tune" = 1 ]; then
  if [ -z "$watchdog" ]; then echo "fake fora: a tuning without --watchdog-s" >&2; exit 2; fi
  for c in given pdl gemm_ln qkv_attention; do
    case ",${FORA_TUNE_SKIP:-}," in *",$c,"*) continue ;; esac
    echo "tune: $rows rows, $c: measuring" >&2
    if [ "$rows:$c" = "${FAKE_KILLER:-}" ]; then
      echo "Error: tuning stopped: candidate \"$c\" left the GPU unusable (fake fault); it failed with: illegal address" >&2
      exit 1
    fi
    if [ "$rows:$c" = "${FAKE_HANG:-}" ]; then
      echo "tune: $rows rows, $c: no answer after $watchdog s: tuning stopped: candidate \"$c\" left the GPU unusable (a launch that does not end; the watchdog ends the process, exit status 3)" >&2
      exit 3
    fi
    echo "tune: $rows rows, $c: window 1.000 ms, rel-L2 forward 1.00e-3 steps 1.00e-3" >&2
  done
  echo "tune: $rows rows, chosen: given (the options as given)" >&2
  echo "## Tuned options (\`--tune\`): the rows labelled \`tuned\` ran the chosen one"
  echo "| given | — | 1.000 | chosen |"
  echo "## Failed measurements"
  echo "| cublaslt | $rows | computing | 1.500 |"
  echo "| tuned | $rows | computing | 1.400 |"
  echo "bench: done in 1.0 s; JSON in $json, Markdown in fake.md" >&2
  exit 0
fi
for r in ${rows//,/ }; do
  echo "| qkv | $r | 512x3456x1152 | cublaslt | 0.0093 |"
  echo "| attention | $r | 16 heads | custom | 0.0070 |"
done
echo "bench: done in 1.0 s; JSON in $json, Markdown in fake.md" >&2
"###;

/// A fake GPU test binary (`NAME` replaced by the binary's name, `@TESTS@` by its real test
/// names): logs its call, hangs where `FAKE_TEST_HANG` names it, else runs (says it runs) the
/// tests its filter selects, as libtest does (`--skip` is left to the real one).
/// it (for the part bound), else prints libtest's lines.
const FAKE_TEST: &str = r###"#!/usr/bin/env bash
echo "test NAME $*" >> "$FAKE_LOG"
if [ "${FAKE_TEST_HANG:-}" = NAME ]; then exec sleep 600; fi
filter=""; skip_next=0
for a in "$@"; do
  if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
  case $a in --skip) skip_next=1 ;; --*) ;; *) filter=$a ;; esac
done
selected=""
for n in @TESTS@; do
  case $n in *"$filter"*) selected="$selected $n" ;; esac
done
set -- $selected
echo "running $# tests"
# As libtest with --nocapture: a test's first output on the line of its name, its outcome later.
failed=""
for n in "$@"; do
  if [ "${FAKE_TEST_FAIL:-}" = "$n" ]; then
    printf "test %s ... thread '%s' panicked at tests/fake.rs:1:1:\nfake failure\nFAILED\n" "$n" "$n"
    failed=$n
  elif [ "$n" = "$1" ]; then
    printf "test %s ... NOTE NAME: a fused path did not serve (fake)\nok\n" "$n"
  else
    echo "test $n ... ok"
  fi
done
if [ -n "$failed" ]; then
  printf "\nfailures:\n    %s\n\ntest result: FAILED. %d passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n" "$failed" $(( $# - 1 ))
  exit 101
fi
echo "test result: ok. $# passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
"###;

/// The fake VAE bench (`.devpack/bench/vae`): logs how it is called and prints a table row.
const FAKE_VAE_BENCH: &str = r###"#!/usr/bin/env bash
echo "bench vae $*" >> "$FAKE_LOG"
echo "| GPU bf16 operands | 1 | 3.00 | 3.00 | 207.4 | 1800x |"
"###;

/// The fake `nvidia-smi`: the query the tests phase prints, and the clock log (`-lms`; a
/// bounded loop, so that a run that fails early leaves nothing behind for long).
const FAKE_SMI: &str = r###"#!/usr/bin/env bash
case "$*" in
  *-lms*)
    for _ in $(seq 400); do
      echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1980, 3201, 480.5, 51"
      sleep 0.25
    done
    exit 0 ;;
esac
echo "NVIDIA H200, 580.159, 143771 MiB"
"###;

/// The fake PyTorch reference: logs its arguments and writes its JSON.
const FAKE_TORCH: &str = r###"import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("bench_torch " + " ".join(args) + "\n")
with open(args[args.index("--json") + 1], "w") as f:
    json.dump({"fake": True}, f)
print("bench_torch: done (fake)")
"###;

const TEST_BINARIES: [&str; 6] = [
    "gpu_small_kernels",
    "gpu_attention",
    "gpu_gemm",
    "gpu_backend",
    "gpu_vae",
    "cli",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A work folder as the device call sees the repository: the suite and the Python tools it
/// runs at the end, the fake PyTorch reference, the fake pack carried as `.devpack.txz` (made
/// by Python's lzma, as xz would), and the fake `nvidia-smi` in `fakebin/`.
fn machine(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("fora_suite_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for dir in [
        "tools",
        ".devpack/bin",
        ".devpack/bench",
        ".devpack/test",
        "fakebin",
        "out",
        "tmp",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for tool in [
        "device_suite.sh",
        "clock_summary.py",
        "variants_report.py",
        "tma_tiles.py",
    ] {
        std::fs::copy(
            repo().join("tools").join(tool),
            root.join("tools").join(tool),
        )
        .unwrap();
    }
    std::fs::write(root.join("tools/bench_torch.py"), FAKE_TORCH).unwrap();
    write_exec(&root.join(".devpack/bin/fora"), FAKE_FORA);
    for t in TEST_BINARIES {
        write_exec(
            &root.join(".devpack/test").join(t),
            &FAKE_TEST
                .replace("@TESTS@", &test_names(t).join(" "))
                .replace("NAME", t),
        );
    }
    write_exec(&root.join(".devpack/bench/vae"), FAKE_VAE_BENCH);
    write_exec(&root.join("fakebin/nvidia-smi"), FAKE_SMI);
    // The sources the pack was built from, as tools/pack_device.sh lists them (here the
    // suite stands for them).
    let sums = Command::new("sha256sum")
        .current_dir(&root)
        .arg("tools/device_suite.sh")
        .output()
        .unwrap();
    assert!(sums.status.success());
    std::fs::write(root.join(".devpack/source.sums"), &sums.stdout).unwrap();
    pack(&root);
    root
}

/// Archives the work folder's `.devpack/` as `.devpack.txz` (Python's lzma, as xz would), and
/// removes the folder (the device call carries only the archive).
fn pack(root: &Path) {
    let packed = Command::new("python3")
        .current_dir(root)
        .args([
            "-c",
            "import tarfile; t = tarfile.open('.devpack.txz', 'w:xz'); t.add('.devpack'); t.close()",
        ])
        .status()
        .unwrap();
    assert!(packed.success());
    std::fs::remove_dir_all(root.join(".devpack")).unwrap();
}

/// Runs `command` (a bash command line) in `root` with the fakes first on PATH and `env` set;
/// its output and the fakes' call log.
fn run_suite(root: &Path, command: &str, env: &[(&str, &str)]) -> (Output, String) {
    let path = format!(
        "{}:{}",
        root.join("fakebin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = root.join("calls.log");
    let mut cmd = Command::new("bash");
    cmd.current_dir(root)
        .args(["-c", command])
        .env("PATH", path)
        .env("OUT", root.join("out"))
        .env("FAKE_LOG", &log)
        // The suite's work folder, inside the machine's (removed with it).
        .env("TMPDIR", root.join("tmp"))
        // The suite's own settings come from `command` and `env` only.
        .env_remove("PHASES")
        .env_remove("TESTS")
        .env_remove("TUNE_WATCHDOG_S")
        .env_remove("SUITE_ALLOW_STALE");
    // And no FORA_* of this process (CI's, a developer's) reaches it.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FORA_") {
            cmd.env_remove(name);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    (out, calls)
}

/// The call of `docs/next_device_call.md`'s section 2, as written there (its lines joined).
fn documented_call() -> String {
    let doc = std::fs::read_to_string(repo().join("docs/next_device_call.md")).unwrap();
    let section = doc
        .split("\n## 2. One call")
        .nth(1)
        .expect("docs/next_device_call.md has a section '## 2. One call'");
    let mut lines = Vec::new();
    for line in section.lines().skip(1) {
        if let Some(code) = line.strip_prefix("    ") {
            lines.push(code.trim_end_matches('\\').trim().to_string());
        } else if !lines.is_empty() {
            break;
        }
    }
    let call = lines.join(" ");
    assert!(
        call.ends_with("bash tools/device_suite.sh"),
        "the documented call: {call}"
    );
    call
}

/// The suite's own `FORA_*` variables (its settings for the test binaries and `fora bench`'s
/// rows and tuning), not the backend's options.
const SUITE_VARIABLES: [&str; 7] = [
    "FORA_REQUIRE_GPU",
    "FORA_BIN",
    "FORA_BENCH_KERNELS",
    "FORA_BENCH_HOPPER_GEMMS",
    "FORA_BENCH_UNTRIED",
    "FORA_TUNE_SKIP",
    "FORA_TEST_SKIP_CUBLASLT",
];

/// Every `fora` call in the fakes' log is one the real program takes: `bench` through its own
/// parser and checks (a flag renamed in Rust and not in the suite fails here, not on the
/// device), `sample` and `info` through the binary (which then fails for want of a GPU, not
/// of arguments); every backend option the call's environment sets is one
/// `CudaOptions::from_env` reads, with a value it takes, and a call that sets some runs other
/// options than the defaults (a variant that times the default under another name is a
/// slip); a `FORA_TUNE_SKIP` names built-in candidates.
fn check_fora_calls(calls: &str, shown: &str) {
    let mut checked = 0;
    for call in calls.lines().filter_map(|l| l.strip_prefix("fora ")) {
        let (args, env) = call.split_once(" | ").unwrap_or((call, ""));
        let args: Vec<&str> = args.split_whitespace().collect();
        if args[0] == "bench" {
            let argv = std::iter::once("dit").chain(args[1..].iter().copied());
            let (parsed, _) = fora::bench::args_from_bench_argv(argv)
                .unwrap_or_else(|e| panic!("fora {call}: {e}\n{shown}"));
            if let Err(e) = parsed.plan() {
                panic!("fora {call}: {e:#}\n{shown}");
            }
        } else {
            let real = Command::new(env!("CARGO_BIN_EXE_fora"))
                .args(&args)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&real.stderr);
            assert!(
                !said.contains("Usage:") && real.status.code() != Some(2),
                "fora {call}: {said}"
            );
        }
        let mut options = fora::cuda::CudaOptions::default();
        let mut sets = false;
        for word in env.split_whitespace() {
            let (name, value) = word.split_once('=').unwrap();
            if value.trim().is_empty() {
                continue;
            }
            if name == "FORA_TUNE_SKIP" {
                let candidates = fora::cuda::tune::default_candidates();
                if let Err(e) = fora::cuda::tune::skip_candidates(candidates, value) {
                    panic!("fora {call}: {e:#}");
                }
            }
            if SUITE_VARIABLES.contains(&name) {
                continue;
            }
            if let Err(e) = options.set(name, value) {
                panic!("fora {call}: {word}: {e:#}");
            }
            sets = true;
        }
        assert!(
            !sets || options != fora::cuda::CudaOptions::default(),
            "fora {call}: its environment sets the default options"
        );
        checked += 1;
    }
    assert!(checked > 0, "no fora call: {shown}");
}

/// The names of the `#[test]` functions of `tests/<binary>.rs`.
fn test_names(binary: &str) -> Vec<String> {
    let path = repo().join("tests").join(format!("{binary}.rs"));
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut names = Vec::new();
    let mut after_test = false;
    for line in src.lines().map(str::trim) {
        if line == "#[test]" {
            after_test = true;
        } else if after_test && line.starts_with("fn ") {
            let name = line["fn ".len()..].split('(').next().unwrap();
            names.push(name.to_string());
            after_test = false;
        } else if after_test && !line.starts_with("#[") && !line.starts_with("//") {
            after_test = false;
        }
    }
    assert!(!names.is_empty(), "no tests in {path:?}");
    names
}

/// The files in the archive the call brings back.
fn archived(root: &Path) -> Vec<String> {
    let out = Command::new("tar")
        .args(["tzf", "out/all.tgz"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "out/all.tgz: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect()
}

/// The prepared call runs every phase to its end: each test part as listed, the tuning
/// of each batch with its watchdog, and again without a candidate that faulted (left out of
/// the later batch too) or hung (the watchdog's line), the Hopper rows and the PyTorch
/// reference; the archive holds every log.
#[test]
fn the_prepared_device_call_runs_every_phase() {
    let root = machine("prepared");
    let call = documented_call();
    let (out, calls) = run_suite(
        &root,
        &call,
        &[("FAKE_KILLER", "2:qkv_attention"), ("FAKE_HANG", "256:pdl")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!("call: {call}\nstdout:\n{stdout}\nstderr:\n{stderr}\ncalls:\n{calls}");
    assert!(out.status.success(), "{shown}");
    assert!(stdout.contains("=== done after"), "{shown}");
    assert!(!stderr.contains("unbound variable"), "{shown}");

    // Each "binary:part" of the call's TESTS names tests of that binary (a filter that matches
    // none would run nothing and still say "test result: ok").
    let tests_list = call
        .split("TESTS=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the call sets TESTS");
    for entry in tests_list.split_whitespace() {
        let Some((binary, filter)) = entry.split_once(':') else {
            continue;
        };
        let names = test_names(binary);
        assert!(
            names.iter().any(|n| n.contains(filter)),
            "TESTS entry {entry}: no test of tests/{binary}.rs matches {filter:?}"
        );
    }
    // The VAE decoder's bench, once, as cargo bench runs it; its rows in the phase's summary.
    assert_eq!(
        calls
            .lines()
            .filter(|l| l.starts_with("bench vae"))
            .collect::<Vec<_>>(),
        ["bench vae --bench"],
        "{shown}"
    );
    assert!(stdout.contains("| GPU bf16 operands | 1 |"), "{shown}");
    // Tests: each "binary:part" of TESTS as one filtered run, in order; a whole binary in its
    // parts (the isolated filters apart).
    let tests: Vec<&str> = calls.lines().filter(|l| l.starts_with("test ")).collect();
    assert!(
        tests[0].starts_with("test gpu_backend --test-threads=1 --nocapture gemm_ln"),
        "{shown}"
    );
    assert!(
        tests
            .iter()
            .any(|t| t.starts_with("test gpu_small_kernels ") && t.contains("--skip _tma")),
        "{shown}"
    );
    assert!(
        tests
            .iter()
            .any(|t| t.ends_with("--nocapture _tma") && t.starts_with("test gpu_gemm ")),
        "{shown}"
    );
    // The tuning: 2 rows, again without the candidate that faulted; 256 rows without it from
    // the start, then also without the one that hung.
    let tunes: Vec<&str> = calls.lines().filter(|l| l.contains("--tune ")).collect();
    let expect = [
        ("--batches 2 ", "--watchdog-s 20 ", "FORA_TUNE_SKIP= "),
        (
            "--batches 2 ",
            "--watchdog-s 20 ",
            "FORA_TUNE_SKIP=qkv_attention ",
        ),
        (
            "--batches 256 ",
            "--watchdog-s 60 ",
            "FORA_TUNE_SKIP=qkv_attention ",
        ),
        (
            "--batches 256 ",
            "--watchdog-s 60 ",
            "FORA_TUNE_SKIP=qkv_attention,pdl ",
        ),
    ];
    assert_eq!(tunes.len(), expect.len(), "{shown}");
    for (call, (rows, watchdog, skip)) in tunes.iter().zip(expect) {
        assert!(
            call.contains(rows) && call.contains(watchdog) && call.contains(skip),
            "{call:?} should have {rows:?} {watchdog:?} {skip:?}\n{shown}"
        );
    }
    for said in [
        "candidate qkv_attention broke the process (rc=1); tuning again without it",
        "candidate pdl broke the process (rc=3); tuning again without it",
        "| tuned | 2 |",
        "| tuned | 256 |",
    ] {
        assert!(stdout.contains(said), "{said:?} missing\n{shown}");
    }
    // The Hopper rows with every kernel, then PyTorch with the call's arguments.
    assert!(
        calls.contains("--sections ceilings,kernels --batches 2,256 --watchdog-s 30 ")
            && calls.contains("FORA_BENCH_KERNELS=all"),
        "{shown}"
    );
    assert!(calls.contains("bench_torch --json"), "{shown}");
    assert!(calls.contains("--budget-s 90 --batches 2,256"), "{shown}");
    check_fora_calls(&calls, &shown);
    // What comes back.
    let files = archived(&root);
    for f in [
        "tests.log",
        "tuned_2_1.log",
        "tuned_2_2.log",
        "tuned_256_1.log",
        "tuned_256_2.log",
        "hopper_rows.log",
        "bench_torch.json",
        "phases.txt",
        "clocks.csv",
        "three.png",
    ] {
        assert!(
            files.iter().any(|a| a == f),
            "{f} not in all.tgz: {files:?}"
        );
    }
    let tests_log = std::fs::read_to_string(root.join("out/tests.log")).unwrap();
    assert!(tests_log.contains("NOTE gpu_backend"), "{tests_log}");
    assert!(!tests_log.contains("NO TESTS"), "{tests_log}");
    assert!(tests_log.contains("NVIDIA H200"), "{tests_log}");
    // The digest at the end (what the device tool's output tail keeps): the tests' totals, each
    // tuning's choice, the candidates that broke a process.
    let digest = stdout.split("=== digest").nth(1).unwrap_or_default();
    for said in [
        "tests: ",
        "tuned_2_1.log: Error: tuning stopped: candidate \"qkv_attention\" left the GPU unusable",
        "tuned_2_2.log: tune: 2 rows, chosen: given",
        "tuned_256_1.log: tune: 256 rows, pdl: no answer after 60 s",
        "tuned_256_2.log: tune: 256 rows, chosen: given",
    ] {
        assert!(
            digest.contains(said),
            "{said:?} not in the digest:\n{digest}"
        );
    }
    assert!(digest.contains(" 0 failed"), "{digest}");
    // The clocks per phase, every phase in it.
    let clocks = stdout
        .split("=== clocks per phase")
        .nth(1)
        .unwrap_or_default();
    for phase in ["tests", "tuned", "hopper_rows", "torch"] {
        assert!(clocks.contains(&format!("| {phase} |")), "{phase}: {shown}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A test part that hangs is cut at TEST_PART_S; TESTS_S skips the parts that would start
/// after it; a phase the deadline leaves no time for is
/// skipped by name, and the call still ends with its archive.
#[test]
fn bounds_cut_a_hang_and_the_deadline_skips_the_rest() {
    let root = machine("bounds");
    let (out, calls) = run_suite(
        &root,
        // (TESTS_S 2, not 1: the suite reads whole seconds, and one may turn between the
        // phase's start and the first part's check.)
        "TEST_PART_S=3 TESTS='gpu_gemm:first gpu_attention:second gpu_small_kernels:third' \
         PHASES='tests torch' TESTS_S=2 DEADLINE_S=20 bash tools/device_suite.sh",
        &[("FAKE_TEST_HANG", "gpu_gemm")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tests_log = std::fs::read_to_string(root.join("out/tests.log")).unwrap_or_default();
    let shown =
        format!("stdout:\n{stdout}\nstderr:\n{stderr}\ncalls:\n{calls}\ntests.log:\n{tests_log}");
    assert!(out.status.success(), "{shown}");
    // The hang cut at 3 s (timeout's 124), then TESTS_S (2 s) spent: the other parts skipped.
    assert!(tests_log.contains("rc=124 after"), "{shown}");
    assert!(
        tests_log.contains("(limit 3s): .devpack/test/gpu_gemm"),
        "{shown}"
    );
    assert!(
        tests_log.contains("SKIPPED (TESTS_S): test gpu_attention second")
            && tests_log.contains("SKIPPED (TESTS_S): test gpu_small_kernels third"),
        "{shown}"
    );
    assert!(!calls.contains("test gpu_attention"), "{shown}");
    // 20 s of deadline less the hang and the sample: no time for PyTorch's 20 s minimum.
    assert!(
        stdout.contains("SKIPPED (deadline): PyTorch reference"),
        "{shown}"
    );
    assert!(!calls.contains("bench_torch"), "{shown}");
    let digest = stdout.split("=== digest").nth(1).unwrap_or_default();
    assert!(
        digest.contains("rc=124 after") && digest.contains("SKIPPED (TESTS_S)"),
        "{shown}"
    );
    assert!(archived(&root).iter().any(|f| f == "tests.log"), "{shown}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A failed test and a NOTE reach the digest by name, although with --nocapture libtest puts
/// a test's first output on the line of its name and its FAILED on a later one.
#[test]
fn the_digest_names_failed_tests_and_notes() {
    let root = machine("digest");
    let (out, _) = run_suite(
        &root,
        "PHASES=tests TESTS='gpu_gemm' bash tools/device_suite.sh",
        &[("FAKE_TEST_FAIL", "gemm_tma_routed_under_cublaslt")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let digest = stdout.split("=== digest").nth(1).unwrap_or_default();
    // (The failing test runs in two of gpu_gemm's parts: the whole binary and "_tma".)
    assert!(
        digest.contains(" failed") && !digest.contains(" 0 failed"),
        "{stdout}"
    );
    for said in [
        "FAILED gemm_tma_routed_under_cublaslt",
        "panicked at tests/fake.rs",
        "NOTE gpu_gemm: a fused path did not serve",
    ] {
        assert!(
            digest.contains(said),
            "{said:?} not in the digest:\n{stdout}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Without the carried archive the suite stops at once, saying what to carry.
#[test]
fn a_call_without_the_pack_says_what_to_carry() {
    let root = machine("no_pack");
    std::fs::remove_file(root.join(".devpack.txz")).unwrap();
    let (out, calls) = run_suite(&root, "PHASES=tests bash tools/device_suite.sh", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("carry .devpack.txz"), "{stderr}");
    assert!(calls.is_empty(), "{calls}");
    let _ = std::fs::remove_dir_all(&root);
}

/// The other phases (the bench, in-model op times, every variant, issue 5's and the TMA tile
/// steps) call `fora` with arguments and options it takes, and end.
#[test]
fn the_other_phases_call_fora_as_it_takes_them() {
    let root = machine("phases");
    let (out, calls) = run_suite(
        &root,
        "PHASES='bench ops variants issue5 issue5_more tma_tuned' VARIANTS=all DEADLINE_S=500 \
         bash tools/device_suite.sh",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!("stdout:\n{stdout}\nstderr:\n{stderr}\ncalls:\n{calls}");
    assert!(out.status.success(), "{shown}");
    assert!(stdout.contains("=== done after"), "{shown}");
    assert!(!stderr.contains("unbound variable"), "{shown}");
    // Every variant of the suite's list ran (VARIANTS=all).
    let suite = std::fs::read_to_string(repo().join("tools/device_suite.sh")).unwrap();
    let list = suite
        .split("local all=(")
        .nth(1)
        .and_then(|rest| rest.split(")\n").next())
        .expect("device_suite.sh's variant list");
    let names: Vec<&str> = list
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|entry| entry.split(':').next().unwrap())
        .collect();
    assert!(names.len() > 40, "{names:?}");
    for name in &names {
        assert!(
            stdout.contains(&format!("--- {name} (")),
            "variant {name}: {shown}"
        );
    }
    check_fora_calls(&calls, &shown);
    let _ = std::fs::remove_dir_all(&root);
}

/// Every heading the suite cuts its summaries at (`grep -A N "^Heading"`, `sed -n
/// '/^Heading/,...'`) is one that `fora bench` (src/bench) or the report tool
/// (tools/bench_report.py) writes: a heading renamed there would leave the device call's
/// summary empty without an error.
#[test]
fn the_summaries_cut_at_headings_the_reports_write() {
    let suite = std::fs::read_to_string(repo().join("tools/device_suite.sh")).unwrap();
    let mut writers = String::new();
    for entry in std::fs::read_dir(repo().join("src/bench")).unwrap() {
        writers += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    writers += &std::fs::read_to_string(repo().join("tools/bench_report.py")).unwrap();
    let mut headings = Vec::new();
    for line in suite.lines() {
        for (open, close) in [("grep -A ", '"'), ("sed -n '/^", '/')] {
            let mut rest = line;
            while let Some(at) = rest.find(open) {
                rest = &rest[at + open.len()..];
                let text = if close == '"' {
                    // grep -A N "^Heading"
                    match rest.split_once(" \"^") {
                        Some((n, after)) if n.chars().all(|c| c.is_ascii_digit()) => after,
                        _ => continue,
                    }
                } else {
                    rest
                };
                if let Some(end) = text.find(close) {
                    headings.push(text[..end].to_string());
                }
            }
        }
    }
    assert!(headings.len() >= 6, "{headings:?}");
    for heading in &headings {
        assert!(
            writers.contains(heading.as_str()),
            "the suite cuts at {heading:?}, which no report writes"
        );
    }
}

/// A pack built from other sources than the tree it runs in (the tree changed after packing),
/// or one that lists none (packed before session 34), is refused before anything runs: its
/// binaries may lack what the suite passes them. SUITE_ALLOW_STALE=1 runs it anyway.
#[test]
fn a_stale_pack_is_refused() {
    let root = machine("stale");
    let suite = root.join("tools/device_suite.sh");
    let mut text = std::fs::read_to_string(&suite).unwrap();
    text.push_str("# changed after packing\n");
    std::fs::write(&suite, text).unwrap();
    let (out, calls) = run_suite(&root, "PHASES=tests bash tools/device_suite.sh", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("other sources than this tree") && stderr.contains("tools/device_suite.sh"),
        "{stderr}"
    );
    assert!(calls.is_empty(), "{calls}");
    // (And a TESTS filter that matches nothing is said, not passed over as "ok".)
    let (out, calls) = run_suite(
        &root,
        "PHASES=tests TESTS=cli:no_such_test bash tools/device_suite.sh",
        &[("SUITE_ALLOW_STALE", "1")],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(calls.contains("test cli "), "{calls}");
    let tests_log = std::fs::read_to_string(root.join("out/tests.log")).unwrap();
    assert!(
        tests_log.contains("NO TESTS: the filter no_such_test matches no test of cli"),
        "{tests_log}"
    );
    // In the call's own output too.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("NO TESTS: the filter no_such_test"), "{said}");
    // A pack without the list.
    let unpacked = Command::new("python3")
        .current_dir(&root)
        .args([
            "-c",
            "import tarfile; tarfile.open('.devpack.txz').extractall()",
        ])
        .status()
        .unwrap();
    assert!(unpacked.success());
    std::fs::remove_file(root.join(".devpack/source.sums")).unwrap();
    pack(&root);
    let (out, _) = run_suite(&root, "PHASES=tests bash tools/device_suite.sh", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lists no sources"), "{stderr}");
    let _ = std::fs::remove_dir_all(&root);
}
