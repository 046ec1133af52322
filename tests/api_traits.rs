//! The library's main types can move to (and be shared with) other threads, as engines that
//! embed fora need, and `CudaBackend` is not `Sync` (two threads on its one stream would mix
//! their CUDA graph captures): compile-time checks, no GPU needed. (A `CudaWorkspace`, which
//! holds raw CUDA graph handles, is not `Send`; `Sampler::sample` builds and drops one per
//! call.)

fn is_send<T: Send>() {}
fn is_sync<T: Sync>() {}

/// `<T as NotSync<_>>::check()` compiles only for a type that is not `Sync`: a `Sync` type has
/// both impls, and the compiler cannot choose the parameter.
trait NotSync<Which> {
    fn check() {}
}
impl<T: ?Sized> NotSync<()> for T {}
struct IsSync;
impl<T: ?Sized + Sync> NotSync<IsSync> for T {}

#[test]
fn backends_and_samplers_are_send_and_sync() {
    is_send::<fora::cpu::CpuBackend>();
    is_sync::<fora::cpu::CpuBackend>();
    is_send::<fora::cuda::CudaBackend>();
    is_send::<fora::cuda::Gpu>();
    is_sync::<fora::cuda::Gpu>();
    is_send::<fora::cuda::CudaOptions>();
    // A sampler holds no device memory (each sample() builds its workspace, whose CUDA graph
    // handles stay on the calling thread); on the CPU it is shared freely.
    is_send::<fora::sampler::Sampler<'static, fora::cpu::CpuBackend>>();
    is_sync::<fora::sampler::Sampler<'static, fora::cpu::CpuBackend>>();
    is_send::<fora::sampler::Samples>();
    // A CudaBackend is not Sync (its one stream would mix two threads' graph captures): the
    // name below resolves only when exactly one impl applies, i.e. when it is not Sync.
    <fora::cuda::CudaBackend as NotSync<_>>::check();
    is_send::<fora::weights::DitWeights>();
    is_sync::<fora::weights::DitWeights>();
    is_send::<fora::config::DitConfig>();
}
