//! `fora forward`: one model forward on given tensors.

use crate::{ensure_finite, guidance, run_on, CfgMode, Job, ModelArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use fora::backend::{Backend, Guidance};
use fora::io::{write_tensors, OutTensor, TensorFile};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct ForwardArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// safetensors with `x` [N, C, H, W] f32, `t` [N] int64 (0..999), `y` [N] int64
    /// (num_classes = the null class).
    #[arg(long, value_name = "IN")]
    pub(crate) input: PathBuf,
    /// Output safetensors: `out` [N, out_ch, H, W] f32 (+ `out_cfg` with --cfg-scale).
    #[arg(long, value_name = "OUT")]
    pub(crate) out: PathBuf,
    /// Also run forward_with_cfg at this scale (N even; the first half are the conditional rows).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) cfg_scale: Option<f32>,
    /// Which channels guidance combines.
    #[arg(long, value_enum, default_value_t = CfgMode::Official, requires = "cfg_scale")]
    pub(crate) cfg_mode: CfgMode,
}

pub(crate) struct ForwardJob {
    pub(crate) input: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) guidance: Option<Guidance>,
}

pub(crate) fn forward(args: ForwardArgs) -> Result<()> {
    fora::io::check_output_path("--out", &args.out, &["safetensors"])?;
    let job = ForwardJob {
        input: args.input,
        out: args.out,
        guidance: guidance(args.cfg_scale, args.cfg_mode)?,
    };
    run_on(&args.model, job)
}

impl Job for ForwardJob {
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let cfg = backend.config();
        let file = TensorFile::open(&self.input).context("--input")?;
        let x = file.f32("x", 4)?;
        let t = file.i64("t", 1)?;
        let y = file.i64("y", 1)?;
        let n = x.shape[0];
        let (c, s) = (cfg.in_channels, cfg.input_size);
        ensure!(
            x.shape[1..] == [c, s, s],
            "{}: x has shape {:?}, the model expects [N, {c}, {s}, {s}]",
            self.input.display(),
            x.shape
        );
        ensure!(n > 0, "{}: x holds no rows (N = 0)", self.input.display());
        ensure!(
            t.shape == [n] && y.shape == [n],
            "{}: t {:?} and y {:?} must both be [N] = [{n}] to match x",
            self.input.display(),
            t.shape,
            y.shape
        );
        if let Some((j, &v)) = t
            .data
            .iter()
            .enumerate()
            .find(|(_, &v)| !(0..1000).contains(&v))
        {
            bail!(
                "{}: t[{j}] = {v} is outside the timesteps 0..999",
                self.input.display()
            );
        }
        let null = cfg.null_class() as i64;
        if let Some((j, &v)) = y
            .data
            .iter()
            .enumerate()
            .find(|(_, &v)| !(0..=null).contains(&v))
        {
            bail!(
                "{}: y[{j}] = {v} is outside the labels 0..={null} ({null} = the null class)",
                self.input.display()
            );
        }
        let labels: Vec<usize> = y.data.iter().map(|&v| v as usize).collect();
        if self.guidance.is_some() {
            ensure!(
                n % 2 == 0,
                "--cfg-scale: forward_with_cfg needs an even N (conditional rows, then unconditional), got N = {n}"
            );
        }
        let out = backend.forward(&x.data, &t.data, &labels, None)?;
        let out_shape = [n, cfg.out_channels(), s, s];
        let out_cfg = match self.guidance {
            Some(g) => Some(backend.forward(&x.data, &t.data, &labels, Some(g))?),
            None => None,
        };
        ensure_finite("out", &out, &self.out)?;
        if let Some(o) = &out_cfg {
            ensure_finite("out_cfg", o, &self.out)?;
        }
        let mut tensors = vec![("out", OutTensor::F32(&out_shape, &out))];
        if let Some(o) = &out_cfg {
            tensors.push(("out_cfg", OutTensor::F32(&out_shape, o)));
        }
        let mut meta = cfg.to_metadata();
        if let Some(g) = self.guidance {
            meta.insert("fora.cfg_scale".into(), g.scale.to_string());
            meta.insert("fora.cfg_mode".into(), format!("{:?}", g.mode));
        }
        write_tensors(&self.out, &tensors, Some(meta))?;
        eprintln!(
            "fora: forward of {n} rows on {} -> {}",
            backend.name(),
            self.out.display()
        );
        Ok(())
    }
}
