//! A whole sampler step as one CUDA graph launch (`FORA_STEP_GRAPH=1`): the step's table (or
//! timestep) copy, the forward and the sampler update captured together, and before each
//! launch the two nodes that differ from step to step re-pointed in the instantiated graph
//! (`cuGraphExecMemcpyNodeSetParams`, `cuGraphExecKernelNodeSetParams`). A step then costs one
//! launch instead of a copy, a graph launch and a kernel launch, with the gaps between them.
//! With `FORA_REUSE_TABLE_IN_PLACE=1` the reuse step copies nothing: its `fora_reuse_final`
//! node, the one reader of the table, is re-pointed at the step's precomputed table instead.
//! Updating an instantiated graph leaves launches already enqueued as they were (CUDA driver
//! API), so steps can be issued back to back.

use super::params::{ForaReuseFinalParams, SamplerStepParams};
use anyhow::{bail, ensure, Result};
use cudarc::driver::{sys, CudaGraph};
use std::ffi::c_void;

/// How a captured step reads its per-step table (or timesteps).
pub enum StepTableSource<'a> {
    /// Through one memcpy node into the forward's buffer.
    Copy,
    /// In place: the graph's one kernel node of these functions (the `fora_reuse_final`
    /// family) reads the table through its `modulation` parameter; no copy.
    ReuseKernel(&'a [sys::CUfunction]),
}

/// A captured step graph and the handles of its per-step nodes.
pub struct StepGraph {
    pub graph: CudaGraph,
    /// The table / timestep copy (None when the step copies nothing) and its captured
    /// parameters, whose source each step replaces.
    copy: Option<(sys::CUgraphNode, sys::CUDA_MEMCPY3D)>,
    /// The fused reuse kernel that reads the table in place, its captured launch parameters
    /// and its captured argument, whose `modulation` each step replaces.
    reader: Option<(
        sys::CUgraphNode,
        sys::CUDA_KERNEL_NODE_PARAMS,
        ForaReuseFinalParams,
    )>,
    /// The sampler update kernel and its captured launch parameters.
    sampler: (sys::CUgraphNode, sys::CUDA_KERNEL_NODE_PARAMS),
    ctx: sys::CUcontext,
}

fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("{what} failed: {r:?}");
    }
    Ok(())
}

/// A node's parameters as the driver getter `get` writes them. Not `mem::zeroed`: some of the
/// structs (`CUDA_MEMCPY3D`) hold `CUmemorytype` enums, which have no zero value (Rust panics at
/// run time on zeroing them); the driver writes every field before it is read.
fn node_params<T>(what: &str, get: impl FnOnce(*mut T) -> sys::CUresult) -> Result<T> {
    let mut p = std::mem::MaybeUninit::<T>::zeroed();
    check(get(p.as_mut_ptr()), what)?;
    // SAFETY: the getter succeeded, so the driver filled in the parameters.
    Ok(unsafe { p.assume_init() })
}

impl StepGraph {
    /// Finds the per-step nodes of `graph`: exactly one kernel node of `sampler_fn`; with
    /// [`StepTableSource::Copy`] exactly one memcpy node, with [`StepTableSource::ReuseKernel`]
    /// none and exactly one kernel node of the given functions.
    pub fn new(
        graph: CudaGraph,
        sampler_fn: sys::CUfunction,
        table: StepTableSource<'_>,
        ctx: sys::CUcontext,
    ) -> Result<StepGraph> {
        let (with_copy, reader_fns): (bool, &[sys::CUfunction]) = match table {
            StepTableSource::Copy => (true, &[]),
            StepTableSource::ReuseKernel(fns) => (false, fns),
        };
        let g = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: a null node array asks for the count only.
        check(
            unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) },
            "cuGraphGetNodes",
        )?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds `n` entries.
        check(
            unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) },
            "cuGraphGetNodes",
        )?;
        nodes.truncate(n);
        let mut copies = Vec::new();
        let mut samplers = Vec::new();
        let mut readers = Vec::new();
        for &node in &nodes {
            let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` belongs to `g`.
            check(
                unsafe { sys::cuGraphNodeGetType(node, &mut ty) },
                "cuGraphNodeGetType",
            )?;
            match ty {
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => {
                    let p = node_params("cuGraphMemcpyNodeGetParams", |p| {
                        // SAFETY: a memcpy node; `p` is writable and the size of the struct.
                        unsafe { sys::cuGraphMemcpyNodeGetParams(node, p) }
                    })?;
                    copies.push((node, p));
                }
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => {
                    let p = node_params("cuGraphKernelNodeGetParams", |p| {
                        // SAFETY: a kernel node; `p` is writable and the size of the struct.
                        unsafe { sys::cuGraphKernelNodeGetParams_v2(node, p) }
                    })?;
                    if p.func == sampler_fn {
                        samplers.push((node, p));
                    } else if reader_fns.contains(&p.func) {
                        readers.push((node, p));
                    }
                }
                _ => {}
            }
        }
        ensure!(
            samplers.len() == 1,
            "step graph: expected one sampler_step node, found {}",
            samplers.len()
        );
        ensure!(
            copies.len() == with_copy as usize,
            "step graph: expected {} copy node(s), found {} (another memcpy in the forward?)",
            with_copy as usize,
            copies.len()
        );
        let reader = if with_copy {
            None
        } else {
            ensure!(
                readers.len() == 1,
                "step graph: expected one fused reuse kernel reading the table in place, found {}",
                readers.len()
            );
            let (node, p) = readers[0];
            ensure!(
                !p.kernelParams.is_null(),
                "step graph: the fused reuse kernel's captured arguments are not readable"
            );
            // SAFETY: the kernel takes one ForaReuseFinalParams by value, so kernelParams[0]
            // points to it; the driver owns that copy while the node's parameters are unchanged
            // (cuGraphKernelNodeGetParams), and it is read here, once.
            let captured =
                unsafe { std::ptr::read(*p.kernelParams as *const ForaReuseFinalParams) };
            Some((node, p, captured))
        };
        Ok(StepGraph {
            graph,
            copy: copies.pop(),
            reader,
            sampler: samplers[0],
            ctx,
        })
    }

    /// Whether a kernel of this graph reads the step's table in place (no copy).
    pub fn reads_table_in_place(&self) -> bool {
        self.reader.is_some()
    }

    /// Points the copy (same size and destination as captured), or the kernel reading the
    /// table in place, at the step's table or timesteps `src`, and the sampler update at `p`,
    /// for the next launch; launches already enqueued are unaffected.
    pub fn set_step(&self, src: Option<u64>, p: &SamplerStepParams) -> Result<()> {
        let exec = self.graph.cu_graph_exec();
        if let Some((node, template, captured)) = &self.reader {
            let Some(src) = src else {
                bail!("step graph: no table for the kernel that reads it in place");
            };
            let arg = ForaReuseFinalParams {
                modulation: src,
                ..*captured
            };
            // SAFETY: the node's kernel takes one ForaReuseFinalParams by value: the captured
            // one with only the table moved, to the step's table of the captured size.
            unsafe { set_kernel_arg(exec, *node, template, arg) }?;
        }
        match (&self.copy, src) {
            (Some((node, template)), Some(src)) => {
                let mut c = *template;
                c.srcDevice = src;
                // SAFETY: the node is this graph's memcpy node; only the source moves, to a
                // buffer of the captured size (the caller's table or timestep row).
                check(
                    unsafe { sys::cuGraphExecMemcpyNodeSetParams(exec, *node, &c, self.ctx) },
                    "cuGraphExecMemcpyNodeSetParams",
                )?;
            }
            (None, None) => {}
            (None, Some(_)) if self.reader.is_some() => {}
            _ => bail!("step graph: a copy source given for a graph without a copy, or none"),
        }
        let (node, template) = &self.sampler;
        // SAFETY: the sampler kernel takes one SamplerStepParams by value.
        unsafe { set_kernel_arg(exec, *node, template, *p) }
    }
}

/// Sets the one by-value argument of kernel node `node` of `exec` to `arg`, the rest of its
/// launch as captured (`template`).
///
/// # Safety
/// The node's kernel must take exactly one parameter of type `T`, and `arg` must describe
/// memory it may access as the captured argument did. The driver copies `arg` during the call.
unsafe fn set_kernel_arg<T>(
    exec: sys::CUgraphExec,
    node: sys::CUgraphNode,
    template: &sys::CUDA_KERNEL_NODE_PARAMS,
    mut arg: T,
) -> Result<()> {
    let mut args = [&mut arg as *mut T as *mut c_void];
    let mut k = *template;
    k.kernelParams = args.as_mut_ptr();
    k.extra = std::ptr::null_mut();
    // SAFETY: per the caller's contract; `args` outlives the call.
    check(
        unsafe { sys::cuGraphExecKernelNodeSetParams_v2(exec, node, &k) },
        "cuGraphExecKernelNodeSetParams",
    )
}
