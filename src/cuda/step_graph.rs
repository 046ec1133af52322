//! A whole sampler step as one CUDA graph launch (`FORA_STEP_GRAPH=1`): the step's table (or
//! timestep) copy, the forward and the sampler update captured together, and before each
//! launch the two nodes that differ from step to step re-pointed in the instantiated graph
//! (`cuGraphExecMemcpyNodeSetParams`, `cuGraphExecKernelNodeSetParams`). A step then costs one
//! launch instead of a copy, a graph launch and a kernel launch, with the gaps between them.
//! With `FORA_REUSE_TABLE_IN_PLACE=1` the reuse step copies nothing: its `fora_reuse_final`
//! node, the one reader of the table, is re-pointed at the step's precomputed table instead.
//! With `FORA_REUSE_SUM` the reuse step's `fora_sum_final` node is re-pointed at the step's
//! cache sum.
//! Updating an instantiated graph leaves launches already enqueued as they were (CUDA driver
//! API), so steps can be issued back to back.

use super::params::{ForaReuseFinalParams, SamplerStepParams};
use anyhow::{bail, ensure, Result};
use cudarc::driver::{sys, CudaGraph};
use std::ffi::c_void;

/// How a captured step reads its per-step table (or timesteps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepTableSource {
    /// Through one memcpy node into the forward's buffer.
    Copy,
    /// In place: the graph's fused reuse kernel node (see [`StepGraph::new`]) reads the table
    /// through its `modulation` parameter; no copy.
    InPlace,
}

/// A captured step graph and the handles of its per-step nodes.
pub struct StepGraph {
    /// The instantiated graph of the whole step.
    pub graph: CudaGraph,
    /// The table / timestep copy (None when the step copies nothing) and its captured
    /// parameters, whose source each step replaces.
    copy: Option<(sys::CUgraphNode, sys::CUDA_MEMCPY3D)>,
    /// The fused reuse kernel, its captured launch parameters and its captured argument, whose
    /// `modulation` (table in place) and `sum` (a reuse step from a cache sum) each step
    /// replaces.
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
    /// [`StepTableSource::Copy`] exactly one memcpy node, with [`StepTableSource::InPlace`]
    /// none; with `reader` (the fused reuse kernels: `fora_reuse_final`'s family and
    /// `fora_sum_final`; needed in place) exactly one kernel node of those functions.
    pub fn new(
        graph: CudaGraph,
        sampler_fn: sys::CUfunction,
        table: StepTableSource,
        reader: Option<&[sys::CUfunction]>,
        ctx: sys::CUcontext,
    ) -> Result<StepGraph> {
        let with_copy = table == StepTableSource::Copy;
        ensure!(
            with_copy || reader.is_some(),
            "step graph: a table read in place needs the kernel that reads it"
        );
        let reader_fns = reader.unwrap_or(&[]);
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
        let reader = if reader.is_none() {
            None
        } else {
            ensure!(
                readers.len() == 1,
                "step graph: expected one fused reuse kernel node, found {}",
                readers.len()
            );
            let (node, p) = readers[0];
            ensure!(
                !p.kernelParams.is_null(),
                "step graph: the fused reuse kernel's captured arguments are not readable"
            );
            // SAFETY: the kernel takes one ForaReuseFinalParams by value, so kernelParams[0]
            // points to it; the driver owns that copy while the node's parameters are unchanged
            // (cuGraphKernelNodeGetParams), and it is read here, once, without assuming the
            // driver's buffer is aligned for the struct.
            let captured =
                unsafe { std::ptr::read_unaligned(*p.kernelParams as *const ForaReuseFinalParams) };
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

    /// Whether a kernel of this graph reads the step's table in place: the graph has no copy
    /// (a [`StepTableSource::Copy`] graph has exactly one).
    pub fn reads_table_in_place(&self) -> bool {
        self.copy.is_none()
    }

    /// Points the copy (same size and destination as captured), or the kernel reading the
    /// table in place, at the step's table or timesteps `src`; the fused reuse kernel at the
    /// step's cache sum `sum` (a reuse step from a cache sum); and the sampler update at `p`,
    /// for the next launch; launches already enqueued are unaffected.
    ///
    /// # Safety
    /// Every device address in the parameters must point to a live allocation of the launching
    /// context holding at least what the kernel reads or writes at the given sizes (the
    /// parameters' docs say how much); only null and misaligned addresses are refused here.
    pub unsafe fn set_step(
        &self,
        src: Option<u64>,
        sum: Option<u64>,
        p: &SamplerStepParams,
    ) -> Result<()> {
        let exec = self.graph.cu_graph_exec();
        if let Some((node, template, captured)) = &self.reader {
            let mut arg = *captured;
            if self.reads_table_in_place() {
                let Some(src) = src else {
                    bail!("step graph: no table for the kernel that reads it in place");
                };
                // The kernel reads the table in 16-byte vectors.
                arg.modulation = checked_address(src, 16, "the step's table")?;
            }
            match sum {
                Some(sum) => {
                    ensure!(
                        captured.sum != 0,
                        "step graph: a cache sum for a reuse kernel that reads the cache"
                    );
                    // The fused reuse kernel reads the sum in 16-byte vectors.
                    arg.sum = checked_address(sum, 16, "the step's cache sum")?;
                }
                None => ensure!(
                    captured.sum == 0,
                    "step graph: no cache sum for a reuse kernel that reads one"
                ),
            }
            // SAFETY: the node's kernel takes one ForaReuseFinalParams by value: the captured
            // one with only the table (to the step's table of the captured size) and the sum
            // (to a sum of the captured size) moved.
            unsafe { set_kernel_arg(exec, *node, template, arg) }?;
        } else {
            ensure!(
                sum.is_none(),
                "step graph: a cache sum for a graph without a reuse kernel"
            );
        }
        match (&self.copy, src) {
            (Some((node, template)), Some(src)) => {
                let mut c = *template;
                c.srcDevice = checked_address(src, 1, "the step's copy source")?;
                // SAFETY: the node is this graph's memcpy node; only the source moves, to a
                // buffer of the captured size (the caller's table or timestep row).
                check(
                    unsafe { sys::cuGraphExecMemcpyNodeSetParams(exec, *node, &c, self.ctx) },
                    "cuGraphExecMemcpyNodeSetParams",
                )?;
            }
            (None, None) => {}
            (None, Some(_)) if self.reads_table_in_place() => {}
            _ => bail!("step graph: a copy source given for a graph without a copy, or none"),
        }
        let (node, template) = &self.sampler;
        // SAFETY: the sampler kernel takes one SamplerStepParams by value.
        unsafe { set_kernel_arg(exec, *node, template, *p) }
    }
}

/// `addr`, unless it is null or not a multiple of `align` (an error naming `what`).
fn checked_address(addr: u64, align: u64, what: &str) -> Result<u64> {
    ensure!(
        addr != 0 && addr.is_multiple_of(align),
        "step graph: {what} at {addr:#x} is null or not {align}-byte aligned"
    );
    Ok(addr)
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
