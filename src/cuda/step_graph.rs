//! A whole sampler step as one CUDA graph launch (`FORA_STEP_GRAPH=1`): the step's table (or
//! timestep) copy, the forward and the sampler update captured together, and before each
//! launch the two nodes that differ from step to step re-pointed in the instantiated graph
//! (`cuGraphExecMemcpyNodeSetParams`, `cuGraphExecKernelNodeSetParams`). A step then costs one
//! launch instead of a copy, a graph launch and a kernel launch, with the gaps between them.
//! Updating an instantiated graph leaves launches already enqueued as they were (CUDA driver
//! API), so steps can be issued back to back.

use super::params::SamplerStepParams;
use anyhow::{bail, ensure, Result};
use cudarc::driver::{sys, CudaGraph};
use std::ffi::c_void;

/// A captured step graph and the handles of its per-step nodes.
pub struct StepGraph {
    pub graph: CudaGraph,
    /// The table / timestep copy (None when the step copies nothing) and its captured
    /// parameters, whose source each step replaces.
    copy: Option<(sys::CUgraphNode, sys::CUDA_MEMCPY3D)>,
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
    /// Finds the per-step nodes of `graph`: exactly one kernel node of `sampler_fn`, and at
    /// most one memcpy node (exactly one when `with_copy`).
    pub fn new(
        graph: CudaGraph,
        sampler_fn: sys::CUfunction,
        with_copy: bool,
        ctx: sys::CUcontext,
    ) -> Result<StepGraph> {
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
        Ok(StepGraph {
            graph,
            copy: copies.pop(),
            sampler: samplers[0],
            ctx,
        })
    }

    /// Points the copy at `src` (same size and destination as captured) and the sampler
    /// update at `p`, for the next launch; launches already enqueued are unaffected.
    pub fn set_step(&self, src: Option<u64>, p: &SamplerStepParams) -> Result<()> {
        let exec = self.graph.cu_graph_exec();
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
            _ => bail!("step graph: a copy source given for a graph without a copy, or none"),
        }
        let (node, template) = &self.sampler;
        let mut arg = *p;
        let mut args = [&mut arg as *mut SamplerStepParams as *mut c_void];
        let mut k = *template;
        k.kernelParams = args.as_mut_ptr();
        k.extra = std::ptr::null_mut();
        // SAFETY: the sampler kernel takes one SamplerStepParams by value; the driver copies
        // it during the call.
        check(
            unsafe { sys::cuGraphExecKernelNodeSetParams_v2(exec, *node, &k) },
            "cuGraphExecKernelNodeSetParams",
        )
    }
}
