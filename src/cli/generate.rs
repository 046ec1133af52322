//! `fora generate`: many images of random classes for an evaluation such as FID, as an .npz.

use crate::cli::decode::{decode_latents, vae_gpu_handle};
use crate::cli::merge::{join, Part};
use crate::cli::sample::{steps_bar, RunSetup, SamplingArgs, TuneArgs, UNTUNED_ON_CPU};
use crate::{ensure_finite, run_on, Job, ModelArgs};
use anyhow::{ensure, Context, Result};
use clap::Args;
use fora::backend::{Backend, NoiseSource};
use fora::cache::policy_for_interval;
use fora::config::DitConfig;
use fora::cuda::vae::CudaVae;
use fora::cuda::CudaBackend;
use fora::generate::Shard;
use fora::npz::{NpyDtype, NpzWriter};
use fora::sampler::Sampler;
use fora::weights::DitWeights;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Images to generate (an FID evaluation takes 50,000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) num_samples: u64,
    /// Images a sampler run (or --num-samples where fewer; the model runs on twice as many rows
    /// with guidance); the last batch samples as many too and keeps what the run still needs.
    #[arg(long, value_name = "B", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) batch: u64,
    /// Seed of the class ids (uniform over the model's classes) and of each batch's noise
    /// (`fora::generate`).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Only shard I (from 0) of N of the run: a contiguous run of its batches, whose images are
    /// the whole run's at those places. `fora merge` joins the N files into the whole run's.
    /// For a long run in parts (one stopped costs that part only) or over several GPUs.
    #[arg(long, value_name = "I/N", default_value = "0/1")]
    pub(crate) shard: Shard,
    /// For a latent model: the VAE decoder's weights, as `fora sample --vae` (each batch is
    /// decoded on the model's GPU where it runs on one, else on the CPU).
    #[arg(long, value_name = "VAE")]
    pub(crate) vae: Option<PathBuf>,
    /// Output `.npz`: `arr_0` [N, H, W, C] uint8 (127.5 x + 128, clamped and truncated, as the
    /// official sample_ddp.py) and `labels` [N] int64.
    #[arg(long, value_name = "OUT")]
    pub(crate) out: PathBuf,
    /// Keep each batch's images in this folder as it is done (`batch-J.npz`, batch J of the
    /// run: what `--shard J/BATCHES` writes), and join them into --out at the end, then remove
    /// them. A run stopped (a signal, a crash, a lost machine) and started again with the same
    /// flags keeps the batches the folder holds and samples the others. Takes the disk space
    /// of the output twice until the end.
    #[arg(long, value_name = "DIR")]
    pub(crate) parts: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
    // Tuned on the first batch's plan: its rows and schedule.
    #[command(flatten)]
    pub(crate) tuning: TuneArgs,
}

pub(crate) struct GenerateJob {
    pub(crate) args: GenerateArgs,
    pub(crate) setup: RunSetup,
    /// The model's [`DitWeights::fingerprint`] (`Job::check`).
    model: std::cell::Cell<u64>,
    /// On a GPU: its name and the backend's options as they run (after any tuning).
    backend: std::cell::RefCell<Option<String>>,
}

pub(crate) fn generate(args: GenerateArgs) -> Result<()> {
    fora::io::check_seekable_output("--out", &args.out, &["npz"])?;
    let setup = RunSetup::read(
        &args.model,
        &args.sampling,
        &args.tuning,
        args.vae.as_deref(),
    )?;
    let model = args.model.clone();
    let job = GenerateJob {
        args,
        setup,
        model: std::cell::Cell::new(0),
        backend: std::cell::RefCell::new(None),
    };
    run_on(&model, job)
}

/// Where a shard's images lie in its run.
struct ShardPlan {
    /// Images of the whole run, and a batch's.
    n: u64,
    batch: u64,
    /// The shard's batches, and its images `first..end`.
    batches: std::ops::Range<u64>,
    first: u64,
    end: u64,
}

impl GenerateJob {
    /// The run's batches and this shard's part of them; a shard with no batch is an error.
    fn plan(&self) -> Result<ShardPlan> {
        let (n, shard) = (self.args.num_samples, self.args.shard);
        let batch = self.args.batch.min(n);
        let total = n.div_ceil(batch);
        ensure!(
            total.checked_mul(batch).is_some(),
            "--num-samples {n}: whole batches of {batch} overflow a count"
        );
        // Every shard has a batch exactly where there are no more shards than batches.
        ensure!(
            shard.count <= total,
            "--shard {}/{}: a run of {total} batches has fewer than {} shards",
            shard.index,
            shard.count,
            shard.count
        );
        let batches = shard.batches(total);
        // In u128: a batch index times the batch size may pass u64 at absurd counts.
        let image = |b: u64| (b as u128 * batch as u128).min(n as u128) as u64;
        let (first, end) = (image(batches.start), image(batches.end));
        Ok(ShardPlan {
            n,
            batch,
            batches,
            first,
            end,
        })
    }

    /// One image's `[1, C, H, W]` for a model of `cfg`: the decoder's output for a latent model,
    /// the model's own for a pixel-space one (1 or 3 channels).
    fn image_shape(&self, cfg: &DitConfig) -> Result<[usize; 4]> {
        let (c, s) = (cfg.in_channels, cfg.input_size);
        match &self.setup.vae {
            Some(vae) => {
                ensure!(
                    vae.config().latent_channels == c,
                    "--vae decodes latents of {} channels; this model samples {c}",
                    vae.config().latent_channels
                );
                vae.image_shape([1, c, s, s]).context("--vae")
            }
            None => {
                ensure!(
                    c == 1 || c == 3,
                    "this model samples {c} latent channels: give --vae with the VAE decoder's \
                     weights (images are written, not latents)"
                );
                Ok([1, c, s, s])
            }
        }
    }
}

impl Job for GenerateJob {
    fn cpu_note(&self) -> Option<&'static str> {
        self.setup.tuning.as_ref().map(|_| UNTUNED_ON_CPU)
    }

    fn check(&self, cfg: &DitConfig, weights: &DitWeights) -> Result<()> {
        self.model.set(weights.fingerprint());
        let [_, ic, ih, iw] = self.image_shape(cfg)?;
        // The file's size (its arrays and their .npy headers, and a kilobyte for the zip
        // records), refused now where the disk cannot take it, not after hours of sampling.
        let plan = self.plan()?;
        let n = plan.end - plan.first;
        let npz_bytes = n
            .checked_mul((ih * iw * ic) as u64 + 8)
            .and_then(|data| data.checked_add(2 * 128 + 1024))
            .with_context(|| format!("--num-samples {n}: the images' bytes overflow"))?;
        fora::io::check_free_space("--out", &self.args.out, npz_bytes)
            .with_context(|| format!("--num-samples {n}"))?;
        // A batch's host memory, at the least (its class ids, latents, noise and images),
        // refused now rather than as an allocation that aborts the process.
        let latent = (cfg.in_channels * cfg.input_size * cfg.input_size) as u64;
        let batch_bytes = plan
            .batch
            .checked_mul(8 + 3 * 4 * latent + (ih * iw * ic) as u64)
            .with_context(|| format!("--batch {}: its bytes overflow", plan.batch))?;
        fora::weights::ensure_free_memory(&format!("--batch {}", plan.batch), batch_bytes)?;
        if let Some(dir) = &self.args.parts {
            fora::io::check_writable("--parts", &dir.join("batch.npz"))?;
            // The batches beside the output until it is whole: as much again (and a couple of
            // kilobytes a batch for its own records), on whichever file system holds them,
            // less what the batches already there take.
            let held: u64 = plan
                .batches
                .clone()
                .filter_map(|j| std::fs::metadata(batch_file(dir, j)).ok())
                .map(|m| m.len())
                .sum();
            let batch_bytes = npz_bytes
                .saturating_add((plan.batches.end - plan.batches.start).saturating_mul(2048))
                .saturating_sub(held);
            let total = if same_file_system(&dir.join("batch.npz"), &self.args.out) {
                batch_bytes.saturating_add(npz_bytes)
            } else {
                batch_bytes
            };
            fora::io::check_free_space("--parts", &dir.join("batch.npz"), total)
                .with_context(|| format!("--num-samples {n} with --parts"))?;
        }
        Ok(())
    }

    fn prepare_cuda(&self, backend: &mut CudaBackend) -> Result<()> {
        if self.setup.vae.is_some() {
            // A run on the GPU decodes there: the CPU decoder (about 5 s an image at 256 x 256)
            // is no fallback for thousands of images.
            *self.setup.vae_gpu.borrow_mut() = vae_gpu_handle(backend, true)?;
        }
        let Some(tuning) = &self.setup.tuning else {
            *self.backend.borrow_mut() = Some(backend_key(backend));
            return Ok(());
        };
        // The shard's first batch: the rows and schedule of every batch.
        let plan = self.plan()?;
        let rows = usize::try_from(plan.batch).context("--batch")?;
        let seed = self.args.seed;
        let classes =
            fora::generate::class_ids(seed, plan.first, rows, backend.config().num_classes);
        tuning.apply(
            backend,
            &self.setup.options,
            &classes,
            fora::generate::batch_seed(seed, plan.batches.start),
            self.args.sampling.cache_interval as usize,
        )?;
        *self.backend.borrow_mut() = Some(backend_key(backend));
        Ok(())
    }

    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let args = &self.args;
        let cfg = backend.config();
        let [_, ic, ih, iw] = self.image_shape(cfg)?;
        let plan = self.plan()?;
        let (n, batch) = (plan.n, plan.batch);
        let batches = plan.batches.end - plan.batches.start;
        let count = plan.end - plan.first;
        let sampler = Sampler::new(backend, self.setup.options.clone())?;
        let steps = sampler.steps();
        // The decoder runs after every batch: set up on the model's GPU once, for the whole
        // run; a GPU decode that fails later is an error too.
        let vae_gpu = match (&self.setup.vae, self.setup.vae_gpu.borrow_mut().take()) {
            (Some(vae), Some(gpu)) => Some(CudaVae::on_gpu(gpu, vae.clone()).context(
                "the VAE decoder on the model's GPU (a run on a GPU decodes there; --device cpu \
                 runs both on the CPU)",
            )?),
            _ => None,
        };
        let bar = steps_bar(args.quiet, batches.saturating_mul(steps as u64))?;
        let signal = stop_on_signal();
        let stopped = |done: u64| -> Result<()> {
            match signal.load(std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(()),
                sig => Err(Stopped {
                    signal: sig as i32,
                    what: format!(
                        "after {done} of {batches} batches: nothing written to {}{}",
                        args.out.display(),
                        match &args.parts {
                            Some(dir) if done > 0 => format!(
                                "; the batches done are in {}: the same command continues \
                                 the run",
                                dir.display()
                            ),
                            Some(_) => String::new(),
                            None if done > 0 => "; with --parts DIR a run keeps its batches \
                                                 as they are done, and continues from them"
                                .to_string(),
                            None => String::new(),
                        }
                    ),
                }
                .into()),
            }
        };
        // What the images depend on besides the seed: the model's and the decoder's weights
        // (and the decoder's settings, which a config.json beside it may give), the sampling
        // settings, and the backend (on a GPU, its kind and options). `fora merge`
        // joins shards only where it is the same.
        let settings = fora::generate::settings_hash(&format!(
            "model {:016x}, decoder {:?}, {:?}, FORA interval {}, backend {}",
            self.model.get(),
            self.setup
                .vae
                .as_ref()
                .map(|v| (v.fingerprint(), v.config())),
            self.setup.options,
            args.sampling.cache_interval,
            self.backend.borrow().as_deref().unwrap_or("cpu f32"),
        ));
        let start = std::time::Instant::now();
        let (mut computed, mut reused, mut announced) = (0usize, 0usize, false);
        // Every batch samples `batch` images, the last one too, of which it keeps what the run
        // still needs (as the official script rounds its total up to whole batches and keeps
        // the first N): one plan, one workspace size, and the options tuned for it, for the
        // whole run.
        let keep = |j: u64| usize::try_from(batch.min(n - j * batch)).context("--batch");
        let labels = |j: u64| -> Result<Vec<u8>> {
            let ids = fora::generate::class_ids(args.seed, j * batch, keep(j)?, cfg.num_classes);
            Ok(ids.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect())
        };
        // Batch `j`'s kept images as uint8 [keep, H, W, C].
        let mut sample_batch = |j: u64, done: u64| -> Result<Vec<u8>> {
            let rows = usize::try_from(batch).context("--batch")?;
            let keep = keep(j)?;
            let classes = fora::generate::class_ids(args.seed, j * batch, rows, cfg.num_classes);
            let noise = NoiseSource::Seed(fora::generate::batch_seed(args.seed, j));
            let mut policy = policy_for_interval(args.sampling.cache_interval as usize)?;
            let which = || format!("batch {} of {batches}", j - plan.batches.start + 1);
            let samples = sampler
                .sample_with_progress(&classes, noise, policy.as_mut(), &mut |e| {
                    match e.mode {
                        fora::backend::StepMode::Compute => computed += 1,
                        fora::backend::StepMode::Reuse => reused += 1,
                    }
                    if !announced && signal.load(std::sync::atomic::Ordering::SeqCst) != 0 {
                        announced = true;
                        bar.suspend(|| {
                            eprintln!(
                                "fora: stopping after this batch (a second signal stops at \
                                 once, leaving the partial output behind)"
                            )
                        });
                    }
                    bar.set_message(format!(
                        "batch {}/{batches}, {computed} computed, {reused} reused",
                        done + 1
                    ));
                    bar.inc(1);
                })
                .with_context(which)?;
            let [_, c, h, w] = samples.shape;
            let latents = &samples.latents[..keep * c * h * w];
            ensure_finite("samples", latents, &args.out).with_context(which)?;
            let decoded = match &self.setup.vae {
                Some(vae) => Some(
                    decode_latents(
                        &vae_gpu,
                        true,
                        vae,
                        latents,
                        [keep, c, h, w],
                        &args.out,
                        false,
                    )
                    .with_context(which)?,
                ),
                None => None,
            };
            // A pixel-space model's samples are its images.
            let (pixels, shape) = match &decoded {
                Some((images, shape)) => (images.as_slice(), *shape),
                None => (latents, [keep, c, h, w]),
            };
            Ok(fora::generate::to_nhwc_u8(pixels, shape))
        };
        let shard = args.shard;
        let record = [
            shard.index,
            shard.count,
            n,
            batch,
            args.seed,
            plan.first,
            settings,
        ];
        let images = usize::try_from(count).context("--num-samples")?;
        // Batches (and their images) a --parts folder already held.
        let (mut resumed, mut resumed_images) = (0u64, 0u64);
        let written = match &args.parts {
            None => fora::io::write_atomic_with(&args.out, |path| {
                let mut npz = NpzWriter::create(path)?;
                npz.start_array("arr_0", NpyDtype::U8, &[images, ih, iw, ic])?;
                for j in plan.batches.clone() {
                    let done = j - plan.batches.start;
                    stopped(done)?;
                    npz.write(&sample_batch(j, done)?)?;
                }
                stopped(batches)?;
                // The labels again from the seed, a batch at a time: none is held for the run.
                npz.start_array("labels", NpyDtype::I64, &[images])?;
                for j in plan.batches.clone() {
                    npz.write(&labels(j)?)?;
                }
                fora::generate::write_run(&mut npz, record)?;
                npz.close(path)
            }),
            Some(dir) => {
                // Batch j is shard j of a run split a batch a shard: the file `--shard
                // J/BATCHES` writes, with its record, checked before it is kept.
                let total = n.div_ceil(batch);
                let part = |j: u64| -> Result<Part> {
                    Ok(Part {
                        path: batch_file(dir, j),
                        run: [j, total, n, batch, args.seed, j * batch, settings],
                        shape: vec![keep(j)?, ih, iw, ic],
                    })
                };
                // Batch j's part, once it is checked or written.
                let mut parts = std::collections::BTreeMap::new();
                let unreadable = |path: &Path| {
                    format!(
                        "--parts: {} cannot be read as a batch: remove it, and the same command \
                         samples it again",
                        path.display()
                    )
                };
                for j in plan.batches.clone() {
                    let Part { path, run, shape } = part(j)?;
                    if !path.exists() {
                        continue;
                    }
                    let found = Part::read(&path).with_context(|| unreadable(&path))?;
                    const FIELDS: [&str; 7] = [
                        "batch",
                        "batches",
                        "images",
                        "batch size",
                        "seed",
                        "first image",
                        "settings hash (model, decoder, sampling flags, GPU and its options; \
                         with --tune its choice, which --tune-cache keeps)",
                    ];
                    let mut differ: Vec<String> = FIELDS
                        .iter()
                        .zip(found.run.iter().zip(run))
                        .filter(|(_, (a, b))| *a != b)
                        .map(|(f, (a, b))| match f.starts_with("settings") {
                            true => format!("{f} {a:016x}, not {b:016x}"),
                            false => format!("{f} {a}, not {b}"),
                        })
                        .collect();
                    if found.shape != shape {
                        differ.push(format!("images {:?}, not {shape:?}", found.shape));
                    }
                    ensure!(
                        differ.is_empty(),
                        "--parts: {} is not batch {j} of this run ({}): remove it, or give \
                         another folder",
                        path.display(),
                        differ.join("; ")
                    );
                    resumed_images += shape[0] as u64;
                    parts.insert(j, found);
                }
                resumed = parts.len() as u64;
                if resumed > 0 {
                    bar.suspend(|| {
                        eprintln!(
                            "fora: {resumed} of {batches} batches already in {}",
                            dir.display()
                        )
                    });
                    bar.set_length((batches - resumed).saturating_mul(steps as u64));
                }
                // The folders this run makes on the way to DIR go with it at the end (where
                // empty), and only those.
                let mut made: Vec<PathBuf> = Vec::new();
                let mut done = 0;
                for j in plan.batches.clone() {
                    if parts.contains_key(&j) {
                        continue;
                    }
                    stopped(done + resumed)?;
                    let pixels = sample_batch(j, done + resumed)?;
                    let written = part(j)?;
                    // Again for each batch: a shard sharing the folder removes it when it
                    // finds it empty at its end.
                    make_folders(dir, &mut made)
                        .with_context(|| format!("cannot create --parts {}", dir.display()))?;
                    fora::io::write_atomic_with(&written.path, |tmp| {
                        let mut npz = NpzWriter::create(tmp)?;
                        npz.start_array("arr_0", NpyDtype::U8, &written.shape)?;
                        npz.write(&pixels)?;
                        npz.start_array("labels", NpyDtype::I64, &written.shape[..1])?;
                        npz.write(&labels(j)?)?;
                        fora::generate::write_run(&mut npz, written.run)?;
                        npz.close(tmp)
                    })?;
                    parts.insert(j, written);
                    done += 1;
                }
                stopped(batches)?;
                let parts: Vec<Part> = parts.into_values().collect();
                join(&parts, &args.out, record).with_context(|| {
                    format!(
                        "joining the batches in {} (kept there: the same command joins them \
                         again)",
                        dir.display()
                    )
                })?;
                // The output is whole: a batch that cannot be removed is only left behind.
                for part in &parts {
                    if let Err(e) = std::fs::remove_file(&part.path) {
                        eprintln!("fora: cannot remove {}: {e}", part.path.display());
                    }
                }
                // Other shards' batches may share the folder: it goes only when empty.
                let _ = std::fs::remove_dir(dir);
                for d in made.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                Ok(())
            }
        };
        bar.finish_and_clear();
        written?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "fora: {count} images [{ih}, {iw}, {ic}]{} in {batches} batch(es) of {batch}{}, \
             {steps} steps ({computed} computed, {reused} reused, FORA interval {}), on {} in \
             {secs:.1} s ({:.2} images/s) -> {}",
            match args.shard {
                Shard::WHOLE => String::new(),
                s => format!(
                    " (shard {}/{}: images {}..{} of {n})",
                    s.index, s.count, plan.first, plan.end
                ),
            },
            match (&args.parts, resumed) {
                (Some(dir), 1..) => format!(" ({resumed} of them kept from {})", dir.display()),
                _ => String::new(),
            },
            args.sampling.cache_interval,
            backend.name(),
            (count - resumed_images) as f64 / secs,
            args.out.display()
        );
        Ok(())
    }
}

/// Batch `j`'s file in a `--parts` folder.
fn batch_file(dir: &Path, j: u64) -> PathBuf {
    dir.join(format!("batch-{j:06}.npz"))
}

/// Whether files `a` and `b` (that may not exist yet) would be on one file system: their
/// nearest existing folders are (on an error, assumed so: the larger need is checked).
fn same_file_system(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let device = |p: &Path| {
        let dir = fora::io::nearest_folder("", p).ok()?;
        std::fs::metadata(dir).ok().map(|m| m.dev())
    };
    match (device(a), device(b)) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// The GPU's name (not its ordinal: shards on several GPUs of one kind agree) and the
/// backend's options as they run.
fn backend_key(backend: &CudaBackend) -> String {
    let name = backend.name();
    let gpu = name.split_once(' ').map_or(name.as_str(), |(_, n)| n);
    let options = backend.options().env_overrides().join(" ");
    format!("{gpu} [{options}]")
}

/// Makes `dir` and the folders on the way to it that are missing, adding each one it made to
/// `made` (outermost first; a folder is known by its path as given, so that `a/../b` counts
/// `a` and not `b` where `b` was there).
fn make_folders(dir: &Path, made: &mut Vec<PathBuf>) -> Result<()> {
    let mut on_the_way: Vec<&Path> = dir
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    on_the_way.reverse();
    for p in on_the_way {
        match std::fs::create_dir(p) {
            Ok(()) => made.push(p.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", p.display())),
        }
    }
    Ok(())
}

/// A run stopped by a signal: the process exits 128 + `signal`, as a shell reports one.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub(crate) signal: i32,
    /// Where the run stood.
    pub(crate) what: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            signal_hook::consts::SIGINT => "SIGINT (Ctrl-C)",
            signal_hook::consts::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "stopped by {name} {}", self.what)
    }
}

impl std::error::Error for Stopped {}

/// The signal that asked a long run to stop (0: none yet): SIGINT (Ctrl-C) or SIGTERM, each
/// where the process was not started ignoring it (a script's background job `cmd &` ignores
/// SIGINT: it stays ignored; SIGHUP, what `nohup` ignores, is never touched). The run stops between two batches and removes
/// its partial output (a `--parts` folder keeps the batches done); a second signal ends the process at once (exit 128 + the signal).
pub(crate) fn stop_on_signal() -> Arc<std::sync::atomic::AtomicUsize> {
    use signal_hook::flag;
    let signal = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if signal_ignored(sig) {
            continue;
        }
        // The shutdown goes first: it acts only once an earlier signal has armed it.
        let set = flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
            .and_then(|_| flag::register(sig, armed.clone()))
            .and_then(|_| flag::register_usize(sig, signal.clone(), sig as usize));
        if let Err(e) = set {
            eprintln!(
                "fora: no handler for signal {sig} ({e}); it ends the run at once, leaving the \
                 partial output behind"
            );
        }
    }
    signal
}

/// Whether signal `sig` is set to be ignored (queried; nothing is changed).
pub(crate) fn signal_ignored(sig: i32) -> bool {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with a null new action, sigaction only writes the current one into `current`,
    // a zeroed sigaction (all of whose fields are plain integers or pointers).
    unsafe {
        libc::sigaction(sig, std::ptr::null(), current.as_mut_ptr()) == 0
            && current.assume_init().sa_sigaction == libc::SIG_IGN
    }
}
