//! `CudaOptions::from_env`: the defaults (those of `CudaOptions::default`), every switch and
//! kernel choice honoured, and a value other than 0 or 1 (or an unknown kernel) refused with the
//! variable's name; and `CudaOptions::with_settings`, the same words without the environment.
//! No GPU needed. One test reads the environment, because it is shared by the threads of a
//! test binary; the other reads none.

use fora::cuda::attention::AttentionImpl;
use fora::cuda::gemm::GemmImpl;
use fora::cuda::CudaOptions;

const SWITCHES: [&str; 21] = [
    "FORA_PRECOMPUTE_MODULATION",
    "FORA_LT_AUTOTUNE",
    "FORA_FUSED_REUSE",
    "FORA_FUSED_FINAL",
    "FORA_SIDE_STREAM",
    "FORA_FUSED_LN",
    "FORA_LT_BIAS_BF16",
    "FORA_BF16_RESIDUAL",
    "FORA_REUSE_GATES_ONLY",
    "FORA_STEP_GRAPH",
    "FORA_REUSE_TABLE_IN_PLACE",
    "FORA_LT_SPLITK",
    "FORA_L2_PERSIST",
    "FORA_PREFETCH_WEIGHTS",
    "FORA_GEMM_LN",
    "FORA_GEMM_LN_MANY_ROWS",
    "FORA_GEMM_LN_WIDE",
    "FORA_GEMM_LN_ONE_PER_SM",
    "FORA_QKV_ATTENTION",
    "FORA_PDL",
    "FORA_FINAL_SAMPLER",
];

/// The switch `var` of `o`.
fn switch(o: &CudaOptions, var: &str) -> bool {
    match var {
        "FORA_PRECOMPUTE_MODULATION" => o.precompute_modulation,
        "FORA_LT_AUTOTUNE" => o.lt_autotune,
        "FORA_FUSED_REUSE" => o.fused_reuse,
        "FORA_FUSED_FINAL" => o.fused_final,
        "FORA_SIDE_STREAM" => o.side_stream,
        "FORA_FUSED_LN" => o.fused_ln,
        "FORA_LT_BIAS_BF16" => o.lt_bias_bf16,
        "FORA_BF16_RESIDUAL" => o.bf16_residual,
        "FORA_REUSE_GATES_ONLY" => o.reuse_gates_only,
        "FORA_STEP_GRAPH" => o.step_graph,
        "FORA_REUSE_TABLE_IN_PLACE" => o.reuse_table_in_place,
        "FORA_LT_SPLITK" => o.lt_splitk,
        "FORA_L2_PERSIST" => o.l2_persist,
        "FORA_PREFETCH_WEIGHTS" => o.prefetch_weights,
        "FORA_GEMM_LN" => o.gemm_ln,
        "FORA_GEMM_LN_MANY_ROWS" => o.gemm_ln_many_rows,
        "FORA_GEMM_LN_WIDE" => o.gemm_ln_wide,
        "FORA_GEMM_LN_ONE_PER_SM" => o.gemm_ln_one_per_sm,
        "FORA_QKV_ATTENTION" => o.qkv_attention,
        "FORA_PDL" => o.pdl,
        "FORA_FINAL_SAMPLER" => o.final_sampler,
        other => panic!("test bug: unknown switch {other}"),
    }
}

#[test]
fn options_from_the_environment() {
    // SAFETY (for the set_var / remove_var calls below): this binary's only test that touches
    // the environment (the other reads none), so no other
    // thread reads the environment meanwhile.
    for var in SWITCHES {
        unsafe { std::env::remove_var(var) };
    }
    for var in [
        "FORA_GEMM",
        "FORA_ATTENTION",
        "FORA_CUDA_GRAPHS",
        "FORA_REUSE_SUM",
        "FORA_TMA_TILES",
    ] {
        unsafe { std::env::remove_var(var) };
    }
    let defaults = CudaOptions::from_env().unwrap();
    // The environment's defaults are the library's: a caller who never sets a variable gets
    // CudaOptions::default().
    assert_eq!(defaults, CudaOptions::default());
    assert_eq!(defaults.gemm, GemmImpl::CublasLt);
    assert_eq!(defaults.attention, AttentionImpl::Auto);
    assert!(defaults.graphs);
    // On by default: the paths measured faster on an H200; off: the opt-in ones.
    let on = [
        "FORA_PRECOMPUTE_MODULATION",
        "FORA_FUSED_REUSE",
        "FORA_FUSED_LN",
        "FORA_LT_BIAS_BF16",
        "FORA_BF16_RESIDUAL",
        "FORA_REUSE_GATES_ONLY",
        "FORA_STEP_GRAPH",
        "FORA_REUSE_TABLE_IN_PLACE",
        "FORA_FINAL_SAMPLER",
    ];
    for var in SWITCHES {
        assert_eq!(
            switch(&defaults, var),
            on.contains(&var),
            "default of {var}"
        );
    }
    assert!(
        defaults.env_overrides().is_empty(),
        "{:?}",
        defaults.env_overrides()
    );
    for var in SWITCHES {
        for (value, want) in [
            ("1", true),
            ("0", false),
            (" 1 ", true),
            ("", on.contains(&var)),
        ] {
            unsafe { std::env::set_var(var, value) };
            let o = CudaOptions::from_env().unwrap();
            assert_eq!(switch(&o, var), want, "{var}={value:?}");
            // env_overrides names exactly the switch that left its default.
            let overrides: Vec<String> = if want == switch(&defaults, var) {
                vec![]
            } else {
                vec![format!("{var}={}", u8::from(want))]
            };
            assert_eq!(o.env_overrides(), overrides, "{var}={value:?}");
            // The other switches keep their defaults.
            for other in SWITCHES.iter().filter(|&&o| o != var) {
                assert_eq!(
                    switch(&o, other),
                    switch(&defaults, other),
                    "{other} with {var}"
                );
            }
        }
        unsafe { std::env::set_var(var, "yes") };
        let err = format!("{:#}", CudaOptions::from_env().unwrap_err());
        assert!(err.contains(var) && err.contains("yes"), "{var}=yes: {err}");
        unsafe { std::env::remove_var(var) };
    }

    // FORA_REUSE_SUM: 2 by default, 0 off, else the steps a cache sum serves (1..=4), anything
    // else refused.
    unsafe { std::env::remove_var("FORA_REUSE_SUM") };
    assert_eq!(defaults.reuse_sum, 2);
    for (value, want) in [("0", 0), ("1", 1), (" 2 ", 2), ("4", 4), ("", 2)] {
        unsafe { std::env::set_var("FORA_REUSE_SUM", value) };
        let o = CudaOptions::from_env().unwrap();
        assert_eq!(o.reuse_sum, want, "FORA_REUSE_SUM={value:?}");
        let overrides: Vec<String> = if want == 2 {
            vec![]
        } else {
            vec![format!("FORA_REUSE_SUM={want}")]
        };
        assert_eq!(o.env_overrides(), overrides);
        assert_eq!(
            CudaOptions { reuse_sum: 2, ..o },
            defaults,
            "FORA_REUSE_SUM={value:?} changed another option"
        );
    }
    for bad in ["5", "-1", "two"] {
        unsafe { std::env::set_var("FORA_REUSE_SUM", bad) };
        let err = format!("{:#}", CudaOptions::from_env().unwrap_err());
        assert!(
            err.contains("FORA_REUSE_SUM") && err.contains(bad),
            "FORA_REUSE_SUM={bad}: {err}"
        );
    }
    unsafe { std::env::remove_var("FORA_REUSE_SUM") };

    // FORA_TMA_TILES: none by default; forced plans by shape, said back in the same form and
    // changing nothing else; a malformed setting refused, naming the variable.
    assert!(defaults.tma_tiles.is_empty());
    let set = "3456x1152=tma-c4x2-128x128, 1152x4608=mc-128x128/3";
    unsafe { std::env::set_var("FORA_TMA_TILES", set) };
    let o = CudaOptions::from_env().unwrap();
    let forced = o.tma_tiles.get(1152, 4608).unwrap();
    assert_eq!(
        (forced.tile, forced.splits),
        (fora::cuda::gemm::TmaTile::Mc128, Some(3))
    );
    assert_eq!(
        o.env_overrides(),
        ["FORA_TMA_TILES=3456x1152=c4x2-128x128,1152x4608=mc-128x128/3"]
    );
    assert_eq!(
        CudaOptions {
            tma_tiles: Default::default(),
            ..o
        },
        defaults
    );
    unsafe { std::env::set_var("FORA_TMA_TILES", "3456x1152=c9x9-128x128") };
    let err = format!("{:#}", CudaOptions::from_env().unwrap_err());
    assert!(
        err.contains("FORA_TMA_TILES") && err.contains("c9x9"),
        "{err}"
    );
    unsafe { std::env::remove_var("FORA_TMA_TILES") };

    // FORA_CUDA_GRAPHS=0: graphs off, and said so; 1 on; like every switch, nothing else (it
    // used to mean "on" for anything but 0, which a tuning candidate could mistake).
    unsafe { std::env::set_var("FORA_CUDA_GRAPHS", "0") };
    let o = CudaOptions::from_env().unwrap();
    assert!(!o.graphs);
    assert_eq!(o.env_overrides(), ["FORA_CUDA_GRAPHS=0"]);
    unsafe { std::env::set_var("FORA_CUDA_GRAPHS", "1") };
    assert!(CudaOptions::from_env().unwrap().graphs);
    unsafe { std::env::set_var("FORA_CUDA_GRAPHS", "off") };
    let err = format!("{:#}", CudaOptions::from_env().unwrap_err());
    assert!(
        err.contains("FORA_CUDA_GRAPHS") && err.contains("off"),
        "{err}"
    );
    unsafe { std::env::remove_var("FORA_CUDA_GRAPHS") };

    // FORA_ATTENTION and FORA_GEMM: every name, only the one field changed; others refused
    // with the variable's name.
    let attention: Vec<_> = AttentionImpl::ALL
        .into_iter()
        .chain([AttentionImpl::Auto])
        .map(|imp| (format!(" {} ", imp.name()), imp))
        .collect();
    check_choice(
        "FORA_ATTENTION",
        &defaults,
        &attention,
        "v3",
        |o, attention| CudaOptions { attention, ..o },
    );
    let gemm = [
        ("custom", GemmImpl::Custom),
        ("cublaslt", GemmImpl::CublasLt),
        ("wgmma", GemmImpl::Wgmma),
        ("tma", GemmImpl::Tma),
        ("tma_mc", GemmImpl::TmaMulticast),
    ]
    .map(|(name, g)| (name.to_string(), g));
    check_choice("FORA_GEMM", &defaults, &gemm, "cutlass", |o, gemm| {
        CudaOptions { gemm, ..o }
    });
}

/// `var` set to each name of `choices` gives the defaults with that choice `set` in, nothing
/// else changed; `bad` is refused, naming the variable and the value. Unsets `var` after.
fn check_choice<T: Copy + std::fmt::Debug>(
    var: &str,
    defaults: &CudaOptions,
    choices: &[(String, T)],
    bad: &str,
    set: fn(CudaOptions, T) -> CudaOptions,
) {
    // SAFETY (set_var / remove_var): called from the one test that touches the environment.
    for (name, choice) in choices {
        unsafe { std::env::set_var(var, name) };
        let o = CudaOptions::from_env().unwrap();
        assert_eq!(o, set(*defaults, *choice), "{var}={name:?}");
        let overrides = o.env_overrides();
        assert!(
            overrides.is_empty() && o == *defaults
                || overrides == [format!("{var}={}", name.trim())],
            "{var}={name:?}: {overrides:?}"
        );
    }
    unsafe { std::env::set_var(var, bad) };
    let err = format!("{:#}", CudaOptions::from_env().unwrap_err());
    assert!(err.contains(var) && err.contains(bad), "{var}={bad}: {err}");
    unsafe { std::env::remove_var(var) };
}

/// `CudaOptions::with_settings` (the tuner's candidates, `FORA_TUNE_CANDIDATES`): the same
/// names and values as the environment, said back by `env_overrides`, and clear errors. Reads
/// no environment, so it may run beside the test above.
#[test]
fn options_from_settings_words() {
    // Every variable the environment is read for is a setting, and only those.
    assert_eq!(CudaOptions::VARIABLES.len(), 5 + SWITCHES.len());
    for var in SWITCHES {
        assert!(CudaOptions::VARIABLES.contains(&var), "{var}");
        let on = CudaOptions::default()
            .with_settings(&format!("{var}=1"))
            .unwrap();
        let off = CudaOptions::default()
            .with_settings(&format!("{var}=0"))
            .unwrap();
        assert!(switch(&on, var) && !switch(&off, var), "{var}");
    }
    // Settings apply in order over the options they start from, and env_overrides says them
    // back (the form the bench and the tuner print).
    let o = CudaOptions::default()
        .with_settings(
            "FORA_GEMM=tma FORA_PDL=1 FORA_GEMM_LN=1 FORA_GEMM_LN=0 FORA_QKV_ATTENTION=1 \
             FORA_ATTENTION=tma_pp FORA_REUSE_SUM=0 FORA_CUDA_GRAPHS=0 \
             FORA_TMA_TILES=3456x1152=128x112,4608x1152=128x144",
        )
        .unwrap();
    assert_eq!(o.gemm, GemmImpl::Tma);
    assert_eq!(o.attention, AttentionImpl::TmaPingPong);
    assert!(o.pdl && o.qkv_attention && !o.gemm_ln && !o.graphs);
    assert_eq!(o.reuse_sum, 0);
    assert!(o.tma_tiles.get(3456, 1152).is_some() && o.tma_tiles.get(4608, 1152).is_some());
    let said = o.env_overrides().join(" ");
    assert_eq!(
        CudaOptions::default().with_settings(&said).unwrap(),
        o,
        "{said}"
    );
    // Starting elsewhere: only the named options change.
    let base = CudaOptions {
        gemm_ln: true,
        ..CudaOptions::default()
    };
    let o = base.with_settings("FORA_PDL=1").unwrap();
    assert_eq!(o, CudaOptions { pdl: true, ..base });
    assert_eq!(base.with_settings("  ").unwrap(), base);
    // Errors name the word at fault.
    for (bad, names) in [
        ("FORA_PDL", vec!["FORA_PDL", "NAME=value"]),
        ("FORA_PDL=yes", vec!["FORA_PDL=yes", "0 or 1"]),
        ("FORA_NOPE=1", vec!["FORA_NOPE", "FORA_GEMM_LN_WIDE"]),
        ("FORA_GEMM=fast", vec!["FORA_GEMM=fast"]),
        ("FORA_REUSE_SUM=9", vec!["FORA_REUSE_SUM=9", "1..=4"]),
        (
            "FORA_CUDA_GRAPHS=false",
            vec!["FORA_CUDA_GRAPHS=false", "0 or 1"],
        ),
        ("FORA_PDL=1 FORA_TMA_TILES=1x1=c9x9-128x128", vec!["c9x9"]),
    ] {
        let err = format!(
            "{:#}",
            CudaOptions::default().with_settings(bad).unwrap_err()
        );
        for n in names {
            assert!(err.contains(n), "{bad}: {err}");
        }
    }
}
