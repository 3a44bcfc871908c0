//! The fused attention step of KV-cache decoding: scores, softmax, per-head argmax key and the
//! weighted sum of values in one pass, so that no `[heads, T]` pattern is materialised.
//!
//! On CUDA this is one kernel (`kernels/decode_attn.cu`, compiled to PTX by the build script
//! with the `cuda` feature); on the CPU the same semantics are computed head by head in Rust
//! (the reference the GPU kernel is checked against). [`HookedTransformer::run_with_kv_cache`]
//! uses it for single-token steps when [`KvCache::fused`] is on and nothing needs the scores or
//! the pattern (no hook, no gradient, f32 weights, at most 64 heads).
//!
//! [`HookedTransformer::run_with_kv_cache`]: crate::HookedTransformer::run_with_kv_cache
//! [`KvCache::fused`]: crate::KvCache::fused

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// The op: `(q [b,h,d], k [b,T,kvh,d], v [b,T,kvh,d]) -> [b,h,d+1]` (z, then the argmax key as f32).
struct DecodeAttention {
    scale: f32,
    uniform_mask: u64,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    if !l.is_contiguous() {
        candle_core::bail!("fused decode attention: {what} must be contiguous");
    }
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("fused decode attention: {what} must be f32"),
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "ferrolens-decode-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, d) = l1.shape().dims3()?;
        let (_, t, kvh, _) = l2.shape().dims4()?;
        let (q, k, v) = (f32_slice(s1, l1, "q")?, f32_slice(s2, l2, "k")?, f32_slice(s3, l3, "v")?);
        let group = h / kvh;
        let mut out = vec![0f32; b * h * (d + 1)];
        let one = |bh: usize, o: &mut [f32]| {
            let (bi, head) = (bh / h, bh % h);
            let kv = head / group;
            let uniform = (self.uniform_mask >> head) & 1 == 1;
            let qv = &q[bh * d..(bh + 1) * d];
            let row = |j: usize| ((bi * t + j) * kvh + kv) * d;
            let mut scores = Vec::with_capacity(t);
            let (mut best, mut besti) = (f32::NEG_INFINITY, 0usize);
            for j in 0..t {
                let kr = &k[row(j)..row(j) + d];
                let s = if uniform { 0.0 } else { qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * self.scale };
                if s > best {
                    best = s;
                    besti = j;
                }
                scores.push(s);
            }
            let mut den = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - best).exp();
                den += *s;
            }
            let z = &mut o[..d];
            z.iter_mut().for_each(|x| *x = 0.0);
            for (j, w) in scores.iter().enumerate() {
                let vr = &v[row(j)..row(j) + d];
                let w = w / den;
                z.iter_mut().zip(vr).for_each(|(x, y)| *x += w * y);
            }
            o[d] = besti as f32;
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(b * h).max(1);
        let per = (b * h).div_ceil(threads);
        std::thread::scope(|sc| {
            for (ci, chunk) in out.chunks_mut(per * (d + 1)).enumerate() {
                let one = &one;
                sc.spawn(move || {
                    for (i, o) in chunk.chunks_mut(d + 1).enumerate() {
                        one(ci * per + i, o);
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, d + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attn.ptx"));
        for (l, what) in [(l1, "q"), (l2, "k"), (l3, "v")] {
            if !l.is_contiguous() {
                candle_core::bail!("fused decode attention: {what} must be contiguous");
            }
        }
        let (b, h, d) = l1.shape().dims3()?;
        let (_, t, kvh, _) = l2.shape().dims4()?;
        if d > 256 {
            candle_core::bail!("fused decode attention: d_head {d} > 256");
        }
        let dev = s1.device().clone();
        let q = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let k = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let v = s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..);
        let out = unsafe { dev.alloc::<f32>(b * h * (d + 1))? };
        let func = dev.get_or_load_custom_func("ferrolens_decode_attn_f32", "ferrolens_decode_attn", PTX)?;
        let cfg = LaunchConfig { grid_dim: ((b * h) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (hh, kk, tt, dd) = (h as i32, kvh as i32, t as i32, d as i32);
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&out);
        builder.arg(&hh);
        builder.arg(&kk);
        builder.arg(&tt);
        builder.arg(&dd);
        builder.arg(&self.scale);
        builder.arg(&self.uniform_mask);
        // SAFETY: the kernel reads b*h*d, b*T*kvh*d, b*T*kvh*d floats and writes b*h*(d+1).
        unsafe { builder.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, h, d + 1))))
    }
}

/// One decode step of attention without materialising the pattern.
///
/// `q` `[b,h,d]` (rotated), `k`/`v` `[b,T,kvh,d]` (the cache, GQA heads not repeated), scores
/// scaled by `scale`; heads in `uniform` get all-zero scores (uniform attention). Returns
/// `z` `[b,h,d]` and the argmax key of every head `[b,h]` (u32, the first maximal key).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, uniform: &[usize]) -> Result<(Tensor, Tensor)> {
    let (_, h, d) = q.dims3()?;
    let (_, _, kvh, dk) = k.dims4()?;
    if dk != d || kvh == 0 || h % kvh != 0 || h > 64 {
        return Err(Error::Input(format!("fused decode attention: q {:?} and k {:?} do not fit (at most 64 heads)", q.dims(), k.dims())));
    }
    let mut mask = 0u64;
    for &u in uniform {
        if u >= h {
            return Err(Error::Input(format!("uniform attention asked for head {u}, but layers have {h} heads")));
        }
        mask |= 1 << u;
    }
    let op = DecodeAttention { scale: scale as f32, uniform_mask: mask };
    let out = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let z = out.narrow(2, 0, d)?;
    let arg = out.narrow(2, d, 1)?.squeeze(2)?.to_dtype(candle_core::DType::U32)?;
    Ok((z, arg))
}
