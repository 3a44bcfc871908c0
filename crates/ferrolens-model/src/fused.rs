//! The fused attention step of KV-cache decoding: scores, softmax, per-head argmax key and the
//! weighted sum of values in one pass, so that no `[heads, T]` pattern is materialised.
//!
//! On CUDA this is one kernel (`kernels/decode_attn.cu`, compiled to PTX by the build script
//! with the `cuda` feature); on the CPU the same semantics are computed head by head in Rust
//! (the reference the GPU kernel is checked against). [`HookedTransformer::run_with_kv_cache`]
//! uses it for single-token steps when [`KvCache::fused`] is on and nothing needs the scores or
//! the pattern (no hook, no gradient, f32 weights, at most 64 heads).
//!
//! [`prefill_attention`] is the CPU counterpart for many queries at once: scores, mask, softmax
//! and the weighted sum of values per query row, with no transposed copies of q/k/v, no repeated
//! KV heads and no `[b,h,q,k]` tensors, and a backward of its own for gradient runs.
//!
//! [`rotate_half`], [`act_mul`] (and [`act_mul_packed`] on the packed gate/up product),
//! [`act`], [`rms_norm`] and [`layer_norm`] are the rotary embedding, a gated MLP's
//! `act(gate) * up` (SwiGLU's SiLU or GeGLU's tanh GELU, [`MlpAct`]), an ungated MLP's
//! activation, RMSNorm and LayerNorm in one pass each, with their own backward.
//!
//! [`HookedTransformer::run_with_kv_cache`]: crate::HookedTransformer::run_with_kv_cache
//! [`KvCache::fused`]: crate::KvCache::fused

use crate::error::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;

/// The CPU storage of `$body` computed in the first operand's float type: `$T` is `f32` for f32
/// storage and `f64` for f64 storage; any other dtype is the error `$err`.
macro_rules! by_float {
    ($s:expr, $err:expr, $T:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $T = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $T = f64;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!($err),
        }
    };
}

/// The op: `(q [b,h,d], k [b,T,kvh,d], v [b,T,kvh,d]) -> [b,h,d+1]` (z, then the argmax key as f32).
struct DecodeAttention {
    scale: f32,
    uniform_mask: u64,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "ferrolens-decode-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, d) = l1.shape().dims3()?;
        let (_, t, kvh, _) = l2.shape().dims4()?;
        let (q, k, v) =
            (cpu_slice::<f32>(s1, l1, "decode attention q")?, cpu_slice::<f32>(s2, l2, "decode attention k")?, cpu_slice::<f32>(s3, l3, "decode attention v")?);
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

/// A pointer that may cross threads (the rows handed out through it never overlap).
struct RowsPtr<T>(*mut T);
// SAFETY: used only with `par_rows`, which gives each thread disjoint rows of one live slice.
unsafe impl<T: Send> Sync for RowsPtr<T> {}

/// `f(i, row)` over the `width`-long rows of `out`, on candle's own CPU thread pool (the one its
/// element-wise ops use, so no second pool spins against it on a small machine).
fn par_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len() / width.max(1);
    let ptr = RowsPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let ptr = &ptr;
        for i in range {
            // SAFETY: execute_chunked hands out disjoint ranges of 0..n, so row i is written by
            // this call alone, and `out` (n * width long) outlives execute_chunked.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(i * width), width) };
            f(i, row);
        }
    });
}

/// The op: `(q [b,p,h,d], k [b,T,kvh,d], v [b,T,kvh,d]) -> z [b,p,h,d]`, CPU only, f32 or f64.
struct PrefillAttention {
    scale: f64,
    softcap: Option<f64>,
    /// Allowed keys, `[mb, p, T]` (1 = allowed; `mb` is 1 or `b`), or every key allowed.
    mask: Option<(Vec<u8>, usize)>,
    /// RelP's AH rule: the pattern is a constant for the backward pass (gradients reach `v` only).
    detach_pattern: bool,
}

/// Where the operands' vectors sit: the element offset of query row `r` (`b * p + i`), head
/// `head` is `r * qs + qo + head * d`; of key row `r` (`b * T + j`), KV head `g`,
/// `r * ks + ko + g * d`, and of its value `r * vs + vo + g * d`. Separate operands have
/// `(qs, ks, vs) = (h d, kvh d, kvh d)` and no offsets; one packed q|k|v tensor `[b,p,h+2kvh,d]`
/// has every stride `(h + 2 kvh) d` and offsets `0`, `h d`, `(h + kvh) d`.
#[derive(Debug, Clone, Copy)]
struct Strides {
    d: usize,
    qs: usize,
    qo: usize,
    ks: usize,
    ko: usize,
    vs: usize,
    vo: usize,
}

impl Strides {
    fn separate(h: usize, kvh: usize, d: usize) -> Self {
        Strides { d, qs: h * d, qo: 0, ks: kvh * d, ko: 0, vs: kvh * d, vo: 0 }
    }

    fn packed(h: usize, kvh: usize, d: usize) -> Self {
        let w = (h + 2 * kvh) * d;
        Strides { d, qs: w, qo: 0, ks: w, ko: h * d, vs: w, vo: (h + kvh) * d }
    }

    /// The offset of query row `r`'s head `head`.
    #[inline]
    fn q(&self, r: usize, head: usize) -> usize {
        r * self.qs + self.qo + head * self.d
    }

    /// The offset of key row `r`'s KV head `g`.
    #[inline]
    fn k(&self, r: usize, g: usize) -> usize {
        r * self.ks + self.ko + g * self.d
    }

    /// The offset of value row `r`'s KV head `g`.
    #[inline]
    fn v(&self, r: usize, g: usize) -> usize {
        r * self.vs + self.vo + g * self.d
    }
}

/// `a . b` with eight independent partial sums (so that the compiler can vectorise it).
#[inline]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |s, &x| s + x);
    for (x, y) in ra.iter().zip(rb) {
        s = s + *x * *y;
    }
    s
}

impl PrefillAttention {
    /// The allowed keys of query `i` of batch row `bi` (`None`: every key).
    fn allowed(&self, bi: usize, i: usize, p: usize, t: usize) -> Option<&[u8]> {
        self.mask.as_ref().map(|(m, mb)| {
            let r = if *mb == 1 { i } else { bi * p + i };
            &m[r * t..(r + 1) * t]
        })
    }

    /// Scores of one query against every key (masked keys -inf), soft-capped: written into
    /// `s`, returning the largest.
    fn scores<T: Float>(&self, qv: &[T], key: impl Fn(usize) -> usize, k: &[T], allowed: Option<&[u8]>, s: &mut [T]) -> T {
        let d = qv.len();
        let scale = T::from(self.scale).expect("a finite scale");
        let cap = self.softcap.map(|c| T::from(c).expect("a finite cap"));
        let mut mx = T::neg_infinity();
        for (j, sj) in s.iter_mut().enumerate() {
            if allowed.is_some_and(|a| a[j] == 0) {
                *sj = T::neg_infinity();
                continue;
            }
            let mut x = dot(qv, &k[key(j)..][..d]) * scale;
            if let Some(c) = cap {
                x = (x / c).tanh() * c;
            }
            *sj = x;
            if x > mx {
                mx = x;
            }
        }
        mx
    }

    /// Gradients of `sum(z * dz)` with respect to `q`, `k` and `v` (read at `st`'s offsets; `dz`
    /// `[b,p,h,d]`): each (batch row, KV head) recomputes its pattern and accumulates `dk`/`dv`
    /// of its own keys, so the parallel tasks write disjoint rows. Each gradient vector (`d`
    /// long) is handed to `put(operand, offset, vector)` at its operand's offset under `st`.
    #[allow(clippy::too_many_arguments)]
    fn grads<T: Float + Send + Sync>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dz: &[T],
        (b, p, h, d): (usize, usize, usize, usize),
        (t, kvh): (usize, usize),
        st: Strides,
        mut put: impl FnMut(Which, usize, &[T]),
    ) {
        let group = h / kvh;
        let scale = T::from(self.scale).expect("a finite scale");
        let cap = self.softcap.map(|c| T::from(c).expect("a finite cap"));
        let nq = p * group * d;
        let width = nq + 2 * t * d;
        let mut buf = vec![T::zero(); b * kvh * width];
        par_rows(&mut buf, width, |task, o| {
            let (bi, g) = (task / kvh, task % kvh);
            let (dq, rest) = o.split_at_mut(nq);
            let (dk, dv) = rest.split_at_mut(t * d);
            let key = |j: usize| st.k(bi * t + j, g);
            let val = |j: usize| st.v(bi * t + j, g);
            let (mut s, mut pr, mut dp) = (vec![T::zero(); t], vec![T::zero(); t], vec![T::zero(); t]);
            for gi in 0..group {
                let head = g * group + gi;
                for i in 0..p {
                    let at = ((bi * p + i) * h + head) * d;
                    let (qv, dzv) = (&q[st.q(bi * p + i, head)..][..d], &dz[at..at + d]);
                    let mx = self.scores(qv, key, k, self.allowed(bi, i, p, t), &mut s);
                    let mut den = T::zero();
                    for (pj, &sj) in pr.iter_mut().zip(&s) {
                        *pj = (sj - mx).exp();
                        den = den + *pj;
                    }
                    let mut dsum = T::zero();
                    for j in 0..t {
                        pr[j] = pr[j] / den;
                        dp[j] = if pr[j] == T::zero() { T::zero() } else { dot(dzv, &v[val(j)..][..d]) };
                        dsum = dsum + pr[j] * dp[j];
                    }
                    for j in 0..t {
                        if pr[j] == T::zero() {
                            continue;
                        }
                        for (x, &y) in dv[j * d..(j + 1) * d].iter_mut().zip(dzv) {
                            *x = *x + pr[j] * y;
                        }
                        if self.detach_pattern {
                            continue;
                        }
                        // d/d(raw score) of the softmax, through the soft-cap, times the scale.
                        let mut ds = pr[j] * (dp[j] - dsum);
                        if let Some(c) = cap {
                            let u = s[j] / c;
                            ds = ds * (T::one() - u * u);
                        }
                        let ds = ds * scale;
                        let kj = &k[key(j)..][..d];
                        for (x, &y) in dq[(i * group + gi) * d..][..d].iter_mut().zip(kj) {
                            *x = *x + ds * y;
                        }
                        for (x, &y) in dk[j * d..(j + 1) * d].iter_mut().zip(qv) {
                            *x = *x + ds * y;
                        }
                    }
                }
            }
        });
        for (task, o) in buf.chunks(width).enumerate() {
            let (bi, g) = (task / kvh, task % kvh);
            for gi in 0..group {
                for i in 0..p {
                    put(Which::Q, st.q(bi * p + i, g * group + gi), &o[(i * group + gi) * d..][..d]);
                }
            }
            for j in 0..t {
                put(Which::K, st.k(bi * t + j, g), &o[nq + j * d..][..d]);
                put(Which::V, st.v(bi * t + j, g), &o[nq + t * d + j * d..][..d]);
            }
        }
    }

    /// [`PrefillAttention::run`] on the op's CPU operands.
    #[allow(clippy::too_many_arguments)]
    fn go<T: Float + Send + Sync>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let dims = l1.shape().dims4()?;
        let (_, t, kvh, _) = l2.shape().dims4()?;
        let (q, k, v) = (cpu_slice(s1, l1, "prefill attention q")?, cpu_slice(s2, l2, "prefill attention k")?, cpu_slice(s3, l3, "prefill attention v")?);
        Ok(self.run(q, k, v, dims, (t, kvh), Strides::separate(dims.2, kvh, dims.3)))
    }

    /// [`PrefillAttention::grads`] of the backward's tensors (copied to the host), as tensors of
    /// the operands' shapes.
    fn grad_tensors<T: Float + Send + Sync + candle_core::WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dz: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let host = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
        let (_, t, kvh, _) = k.dims4()?;
        let (b, p, h, d) = q.dims4()?;
        let (mut dq, mut dk, mut dv) = (vec![T::zero(); b * p * h * d], vec![T::zero(); b * t * kvh * d], vec![T::zero(); b * t * kvh * d]);
        self.grads(&host(q)?, &host(k)?, &host(v)?, &host(dz)?, (b, p, h, d), (t, kvh), Strides::separate(h, kvh, d), |w, at, x| {
            let out = match w {
                Which::Q => &mut dq,
                Which::K => &mut dk,
                Which::V => &mut dv,
            };
            out[at..at + x.len()].copy_from_slice(x)
        });
        Ok((Tensor::from_vec(dq, q.shape(), q.device())?, Tensor::from_vec(dk, k.shape(), k.device())?, Tensor::from_vec(dv, v.shape(), v.device())?))
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T: Float + Send + Sync>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (b, p, h, d): (usize, usize, usize, usize),
        (t, kvh): (usize, usize),
        st: Strides,
    ) -> Vec<T> {
        let group = h / kvh;
        let mut out = vec![T::zero(); b * p * h * d];
        par_rows(&mut out, h * d, |row, o| {
            let (bi, i) = (row / p, row % p);
            let allowed = self.allowed(bi, i, p, t);
            let mut s = vec![T::zero(); t];
            for head in 0..h {
                let kv = head / group;
                let qv = &q[st.q(row, head)..][..d];
                let mx = self.scores(qv, |j| st.k(bi * t + j, kv), k, allowed, &mut s);
                let mut den = T::zero();
                for x in s.iter_mut() {
                    *x = (*x - mx).exp();
                    den = den + *x;
                }
                let z = &mut o[head * d..(head + 1) * d];
                for (j, &w) in s.iter().enumerate() {
                    if w == T::zero() {
                        continue;
                    }
                    let w = w / den;
                    for (zi, &vi) in z.iter_mut().zip(&v[st.v(bi * t + j, kv)..][..d]) {
                        *zi = *zi + w * vi;
                    }
                }
            }
        });
        out
    }
}

impl CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "ferrolens-prefill-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let out = by_float!(s1, "fused prefill attention: q, k and v must all be f32 or all f64", T => self.go::<T>(s1, l1, s2, l2, s3, l3)?);
        Ok((out, shape))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _z: &Tensor, dz: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.grad_tensors::<f32>(q, k, v, dz)?,
            DType::F64 => self.grad_tensors::<f64>(q, k, v, dz)?,
            other => candle_core::bail!("fused prefill attention: no backward for {other:?}"),
        };
        if self.detach_pattern {
            Ok((None, None, Some(dv)))
        } else {
            Ok((Some(dq), Some(dk), Some(dv)))
        }
    }
}

/// Whether [`prefill_attention`] runs these operands: CPU tensors of f32 or f64, GQA groups
/// that divide the heads, and strict layouts off ([`crate::layout::set_strict`] makes the CPU run
/// the device-generic path, the one CUDA runs, so that its products are checked).
pub fn prefill_attention_fits(q: &Tensor, k: &Tensor) -> bool {
    let heads = |t: &Tensor| t.dims().get(2).copied().unwrap_or(0);
    !crate::layout::strict()
        && q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::F64)
        && q.dtype() == k.dtype()
        && heads(k) > 0
        && heads(q) % heads(k) == 0
}

/// Attention of many queries on the CPU, with its own backward.
///
/// `q` `[b,p,h,d]` (rotated), `k`/`v` `[b,T,kvh,d]` (GQA heads not repeated), `mask` `[p,T]` or
/// `[b,1,p,T]` (u8, 1 = the query may see the key; `None`: every key), scores `q.k * scale`,
/// soft-capped as `c * tanh(s / c)` when `softcap` is given. Returns `z` `[b,p,h,d]`: the same
/// values as the scores -> masked softmax -> pattern @ v path to rounding, in one pass per query
/// row (rows run in parallel). When an operand tracks gradients, the backward recomputes each
/// pattern and returns the gradients of `q`, `k` and `v` (with `detach_pattern`, RelP's AH rule:
/// of `v` only, the pattern being a constant).
pub fn prefill_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, softcap: Option<f64>, detach_pattern: bool) -> Result<Tensor> {
    let (b, p, _, d) = q.dims4()?;
    let (kb, t, _, dk) = k.dims4()?;
    if !prefill_attention_fits(q, k) || dk != d || kb != b || v.dims() != k.dims() {
        return Err(Error::Input(format!("fused prefill attention: q {:?}, k {:?}, v {:?} do not fit (CPU, f32/f64, GQA)", q.dims(), k.dims(), v.dims())));
    }
    let op = PrefillAttention { scale, softcap, mask: host_mask(mask, b, p, t)?, detach_pattern };
    // The AH rule: no gradient reaches q or k through the (constant) pattern.
    let (q, k) = if detach_pattern { (q.detach(), k.detach()) } else { (q.clone(), k.clone()) };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// A `[p,T]` or `[b,1,p,T]` mask on the host, with its batch size (1 when shared).
fn host_mask(mask: Option<&Tensor>, b: usize, p: usize, t: usize) -> Result<Option<(Vec<u8>, usize)>> {
    let Some(m) = mask else { return Ok(None) };
    let mb = match m.dims() {
        [mp, mt] if (*mp, *mt) == (p, t) => 1,
        [mb, 1, mp, mt] if (*mp, *mt) == (p, t) && (*mb == b || *mb == 1) => *mb,
        other => return Err(Error::Input(format!("fused prefill attention: mask {other:?} is neither [{p}, {t}] nor [{b}, 1, {p}, {t}]"))),
    };
    Ok(Some((m.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?, mb)))
}

/// Which of q, k and v a vector (a gradient, a segment of a packed row) belongs to.
#[derive(Debug, Clone, Copy)]
enum Which {
    Q,
    K,
    V,
}

/// The op: [`PrefillAttention`] on one packed `qkv` `[b,p,h+2kvh,d]` (queries, keys, values of
/// the same positions) -> `z` `[b,p,h,d]`, with the gradient of `qkv` in its packed layout.
struct PackedPrefillAttention {
    op: PrefillAttention,
    heads: (usize, usize),
}

impl PackedPrefillAttention {
    fn dims(&self, l: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Strides)> {
        let (b, p, _, d) = l.shape().dims4()?;
        let (h, kvh) = self.heads;
        Ok(((b, p, h, d), Strides::packed(h, kvh, d)))
    }

    fn grad<T: Float + Send + Sync + candle_core::WithDType>(&self, y: &Tensor, dz: &Tensor) -> candle_core::Result<Tensor> {
        let ((b, p, h, d), st) = self.dims(y.layout())?;
        let (yv, dzv) = (y.flatten_all()?.to_vec1::<T>()?, dz.flatten_all()?.to_vec1::<T>()?);
        let mut dy = vec![T::zero(); yv.len()];
        self.op.grads(&yv, &yv, &yv, &dzv, (b, p, h, d), (p, self.heads.1), st, |_, at, x| dy[at..at + x.len()].copy_from_slice(x));
        Tensor::from_vec(dy, y.shape(), y.device())
    }
}

impl candle_core::CustomOp1 for PackedPrefillAttention {
    fn name(&self) -> &'static str {
        "ferrolens-packed-prefill-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dims, st) = self.dims(l)?;
        let out = by_float!(s, "fused prefill attention: f32 or f64 only", T => {
            let y = cpu_slice::<T>(s, l, "prefill attention qkv")?;
            self.op.run(y, y, y, dims, (dims.1, self.heads.1), st)
        });
        Ok((out, Shape::from(dims)))
    }

    /// The gradients of q, k and v written into one tensor of `qkv`'s layout (zero for q and k
    /// under RelP's AH rule), so no slice of it needs padding back to the packed width.
    fn bwd(&self, y: &Tensor, _z: &Tensor, dz: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (y, dz) = (y.detach().contiguous()?, dz.contiguous()?);
        Ok(Some(match y.dtype() {
            DType::F32 => self.grad::<f32>(&y, &dz)?,
            DType::F64 => self.grad::<f64>(&y, &dz)?,
            other => candle_core::bail!("fused prefill attention: no backward for {other:?}"),
        }))
    }
}

/// [`prefill_attention`] on one packed `qkv` `[b,p,h+2kvh,d]`: heads `0..h` are the (rotated)
/// queries, `h..h+kvh` the keys and `h+kvh..` the values of the same `p` positions (a packed
/// q/k/v projection, see [`rotate_half_heads`]). `z` `[b,p,h,d]`; the backward hands back one
/// gradient of `qkv`'s shape.
pub fn prefill_attention_packed(
    qkv: &Tensor,
    (h, kvh): (usize, usize),
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
    detach_pattern: bool,
) -> Result<Tensor> {
    let (b, p, n, _) = qkv.dims4()?;
    if !fused_elementwise_fits(qkv) || kvh == 0 || h % kvh != 0 || n != h + 2 * kvh {
        return Err(Error::Input(format!(
            "fused packed prefill attention: qkv {:?} with {h} query and {kvh} KV heads does not fit (CPU, f32/f64, GQA)",
            qkv.dims()
        )));
    }
    let op = PrefillAttention { scale, softcap, mask: host_mask(mask, b, p, p)?, detach_pattern };
    Ok(qkv.contiguous()?.apply_op1(PackedPrefillAttention { op, heads: (h, kvh) })?)
}

/// The elements of a contiguous f32/f64 CPU tensor, as a slice.
fn cpu_slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]>
where
    CpuStorage: AsSlice<T>,
{
    if !l.is_contiguous() {
        candle_core::bail!("fused {what} must be contiguous");
    }
    let v = s.as_slice_of()?;
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// Typed views of CPU storage (f32 and f64).
trait AsSlice<T> {
    fn as_slice_of(&self) -> candle_core::Result<&[T]>;
}

impl AsSlice<f32> for CpuStorage {
    fn as_slice_of(&self) -> candle_core::Result<&[f32]> {
        match self {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("fused op: expected f32"),
        }
    }
}

impl AsSlice<f64> for CpuStorage {
    fn as_slice_of(&self) -> candle_core::Result<&[f64]> {
        match self {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("fused op: expected f64"),
        }
    }
}

/// The op: `(x [b,p,n,d], cos, sin)` with tables `[p,half]` or `[b,p,half]` -> `x` with its
/// first `heads` heads rotated (the others copied).
struct RotateHalf {
    heads: usize,
}

impl RotateHalf {
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float + Send + Sync>(&self, x: &[T], cos: &[T], sin: &[T], (b, p, n, d): (usize, usize, usize, usize), half: usize, per_row: bool) -> Vec<T> {
        let mut out = vec![T::zero(); b * p * n * d];
        let heads = self.heads.min(n);
        par_rows(&mut out, n * d, |row, o| {
            let r = if per_row { row } else { row % p };
            let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            o[heads * d..].copy_from_slice(&x[(row * n + heads) * d..(row + 1) * n * d]);
            for head in 0..heads {
                let xi = &x[(row * n + head) * d..][..d];
                let oi = &mut o[head * d..(head + 1) * d];
                for i in 0..half {
                    let (x1, x2) = (xi[i], xi[half + i]);
                    oi[i] = x1 * c[i] - x2 * s[i];
                    oi[half + i] = x2 * c[i] + x1 * s[i];
                }
                oi[2 * half..].copy_from_slice(&xi[2 * half..]);
            }
        });
        out
    }

    fn go<T: Float + Send + Sync>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let dims = l1.shape().dims4()?;
        let half = *l2.shape().dims().last().unwrap_or(&0);
        let per_row = l2.shape().rank() == 3;
        Ok(self.run(cpu_slice(s1, l1, "rotary x")?, cpu_slice(s2, l2, "rotary cos")?, cpu_slice(s3, l3, "rotary sin")?, dims, half, per_row))
    }
}

impl CustomOp3 for RotateHalf {
    fn name(&self) -> &'static str {
        "ferrolens-rotate-half"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused rotary: f32 or f64 only", T => self.go::<T>(s1, l1, s2, l2, s3, l3)?);
        Ok((out, l1.shape().clone()))
    }

    /// The rotation's transpose is the rotation by minus the angle: the same op with `-sin`.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(&cos.detach().contiguous()?, &sin.detach().neg()?.contiguous()?, &RotateHalf { heads: self.heads })?;
        Ok((Some(dx), None, None))
    }
}

/// Whether the fused CPU element-wise ops ([`rotate_half`], [`act_mul`], [`act`], [`rms_norm`],
/// [`layer_norm`]) take `x`: an f32 or f64 CPU tensor, with strict layouts off (see [`prefill_attention_fits`]).
/// All have their own backward.
pub fn fused_elementwise_fits(x: &Tensor) -> bool {
    !crate::layout::strict() && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Rotate-half rotary embedding of the first `2 * half` features of `x` `[b,p,n,d]` with tables
/// `cos`/`sin` `[p,half]` (or `[b,p,half]` per row, padded batches): `x1 cos - x2 sin`,
/// `x2 cos + x1 sin`, the other features unchanged; the same arithmetic as the written-out ops,
/// in one pass. CPU, f32/f64 (see [`fused_elementwise_fits`]); the backward rotates the gradient
/// back (the same op with `-sin`).
pub fn rotate_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rotate_half_heads(x, cos, sin, x.dims().get(2).copied().unwrap_or(0))
}

/// [`rotate_half`] of the first `heads` heads of `x` `[b,p,n,d]`; the other heads pass through
/// unchanged (a packed q|k|v tensor: queries and keys rotate, values do not).
pub fn rotate_half_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, p, _, d) = x.dims4()?;
    let half = cos.dim(candle_core::D::Minus1)?;
    let tables_fit = match cos.dims() {
        [tp, _] => *tp == p,
        [tb, tp, _] => *tb == b && *tp == p,
        _ => false,
    };
    if !fused_elementwise_fits(x) || !tables_fit || sin.dims() != cos.dims() || 2 * half > d || cos.dtype() != x.dtype() {
        return Err(Error::Input(format!("fused rotary: x {:?} and tables {:?} do not fit", x.dims(), cos.dims())));
    }
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RotateHalf { heads })?)
}

/// The MLP activations with a fused CPU op: SiLU and the tanh approximation of GELU, both
/// written `x sigmoid(v(x))` (SiLU: `v = x`, Llama-style SwiGLU; tanh GELU:
/// `v = 2 sqrt(2/pi) (x + 0.044715 x³)`, since `0.5 (1 + tanh(u)) = sigmoid(2u)`, Gemma's GeGLU
/// and GPT-2's MLP, `gelu_pytorch_tanh` / `gelu_new`), and the exact GELU `x Phi(x)` (GPT-NeoX /
/// Pythia; the error function of candle's own `erf` op, element by element).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpAct {
    /// `x sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))`.
    GeluTanh,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    GeluErf,
}

impl MlpAct {
    /// The fused form of a model's MLP activation, where there is one.
    pub fn of(act: crate::config::Activation) -> Option<MlpAct> {
        match act {
            crate::config::Activation::Silu => Some(MlpAct::Silu),
            crate::config::Activation::GeluNew => Some(MlpAct::GeluTanh),
            crate::config::Activation::Gelu => Some(MlpAct::GeluErf),
        }
    }

    /// `act(x)`: `x / (1 + exp(-v(x)))` with the standard library's `exp`, or `x Phi(x)`, as
    /// RelP's identity rule reads it.
    #[inline]
    fn value<T: ActRows>(self, x: T) -> T {
        let sigmoid_form = |v: T| x / (T::one() + (-v).exp());
        match self {
            MlpAct::Silu => sigmoid_form(SiluArg::arg(x)),
            MlpAct::GeluTanh => sigmoid_form(GeluTanhArg::arg(x)),
            MlpAct::GeluErf => x * phi(x),
        }
    }

    /// RelP's identity rule for `act(x)`: `x * r` with the constant `r = act(x) / (x ± 1e-6)`
    /// (the sign of `x`, `+` at zero), computed as the written-out rule computes it.
    #[inline]
    fn ratio<T: ActRows>(self, x: T) -> T {
        let nudge = T::from(1e-6f64).expect("a small constant");
        let nudged = if x >= T::zero() { x + nudge } else { x + (-nudge) };
        self.value(x) / nudged
    }
}

/// `v(x)` and `v'(x)` of an activation `x sigmoid(v(x))` ([`MlpAct`]), as types so that
/// the row loops are compiled (and vectorised) once per activation.
pub(crate) trait ActArg {
    /// `v(x)`.
    fn arg<T: Float>(x: T) -> T;
    /// `v'(x)`.
    fn darg<T: Float>(x: T) -> T;
}

/// SiLU: `v = x`.
pub(crate) struct SiluArg;

impl ActArg for SiluArg {
    #[inline(always)]
    fn arg<T: Float>(x: T) -> T {
        x
    }
    #[inline(always)]
    fn darg<T: Float>(_x: T) -> T {
        T::one()
    }
}

/// The tanh GELU: `v = 2 sqrt(2/pi) (x + 0.044715 x³)`.
pub(crate) struct GeluTanhArg;

impl GeluTanhArg {
    /// `2 sqrt(2/pi)`.
    const TWO_C: f64 = 1.595_769_121_605_730_7;
    /// The cubic term's coefficient.
    const A: f64 = 0.044715;
}

impl ActArg for GeluTanhArg {
    #[inline(always)]
    fn arg<T: Float>(x: T) -> T {
        let (c, a) = (T::from(Self::TWO_C).expect("a constant"), T::from(Self::A).expect("a constant"));
        c * (x + a * x * x * x)
    }
    #[inline(always)]
    fn darg<T: Float>(x: T) -> T {
        let (c, a3) = (T::from(Self::TWO_C).expect("a constant"), T::from(3.0 * Self::A).expect("a constant"));
        c * (T::one() + a3 * x * x)
    }
}

/// The op: `(gate, up) -> act(gate) * up`, element-wise.
struct ActMul(MlpAct);

impl ActMul {
    fn go<T: Float + Send + Sync + ActRows>(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let (g, u) = (cpu_slice::<T>(s1, l1, "act * up: gate")?, cpu_slice::<T>(s2, l2, "act * up: up")?);
        let mut out = vec![T::zero(); g.len()];
        // `g / (1 + exp(-v(g))) * u` (see [`ActRows`]; candle's silu, then the product, for SiLU).
        par_chunks(&mut out, |start, o| {
            let at = start..start + o.len();
            T::act_mul_rows(self.0, &g[at.clone()], &u[at], o)
        });
        Ok(out)
    }
}

impl candle_core::CustomOp2 for ActMul {
    fn name(&self) -> &'static str {
        "ferrolens-act-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused act * up: f32 or f64 only", T => self.go::<T>(s1, l1, s2, l2)?);
        Ok((out, l1.shape().clone()))
    }

    /// `d up = g act(gate)`, `d gate = g up act'(gate)`, in one pass ([`ActMulBackward`]).
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.detach().contiguous()?.apply_op3_no_bwd(&up.detach().contiguous()?, &grad.contiguous()?, &ActMulBackward(self.0))?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The backward of [`ActMul`]: `(gate, up, g) -> [2, ..]`, `d gate` then `d up`.
struct ActMulBackward(MlpAct);

impl ActMulBackward {
    fn go<T: Float + Send + Sync + ActRows>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let (gate, up, g) = (cpu_slice::<T>(s1, l1, "act * up: gate")?, cpu_slice::<T>(s2, l2, "act * up: up")?, cpu_slice::<T>(s3, l3, "act * up: grad")?);
        let n = gate.len();
        let mut out = vec![T::zero(); 2 * n];
        const W: usize = CHUNK;
        // One chunk of both gradients (see [`ActRows`]).
        let row = |start: usize, dg: &mut [T], du: &mut [T]| {
            let at = start..start + dg.len();
            T::act_mul_grad_rows(self.0, &gate[at.clone()], &up[at.clone()], &g[at], dg, du)
        };
        let (d_gate, d_up) = out.split_at_mut(n);
        let full = n / W * W;
        let up_rows = RowsPtr(d_up.as_mut_ptr());
        par_rows(&mut d_gate[..full], W, |r, o| {
            let up_rows = &up_rows;
            // SAFETY: row r of d_up (as of d_gate) is written by this call alone, and d_up
            // (n >= full long) outlives par_rows.
            let du = unsafe { std::slice::from_raw_parts_mut(up_rows.0.add(r * W), W) };
            row(r * W, o, du);
        });
        row(full, &mut d_gate[full..], &mut d_up[full..]);
        Ok(out)
    }
}

impl CustomOp3 for ActMulBackward {
    fn name(&self) -> &'static str {
        "ferrolens-act-mul-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused act * up backward: f32 or f64 only", T => self.go::<T>(s1, l1, s2, l2, s3, l3)?);
        Ok((out, Shape::from([&[2], l1.dims()].concat())))
    }
}

/// A gated MLP's `act(gate) * up` ([`MlpAct`]: SwiGLU's SiLU, GeGLU's tanh GELU, exact GELU) for `gate`
/// and `up` of one shape, in one pass (CPU, f32/f64; see [`fused_elementwise_fits`]), with the
/// gradients of both operands.
pub fn act_mul(act: MlpAct, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused_elementwise_fits(gate) || !fused_elementwise_fits(up) || gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        return Err(Error::Input(format!("fused act * up: gate {:?} and up {:?} do not fit", gate.dims(), up.dims())));
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, ActMul(act))?)
}

/// The op: `y [.., 2m] -> act(y[.., :m]) * y[.., m:]`, row by row (the packed gate/up product),
/// with RelP's rules for the backward: `identity` (the activation as its own linear ratio,
/// [`MlpAct::ratio`]) and `half` (the product's gradient halved between its factors).
#[derive(Debug, Clone, Copy)]
struct ActMulPacked {
    act: MlpAct,
    identity: bool,
    half: bool,
}

impl ActMulPacked {
    fn go<T: Float + Send + Sync + ActRows>(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let y = cpu_slice::<T>(s, l, "packed act * up")?;
        let m = l.dims()[l.dims().len() - 1] / 2;
        let mut out = vec![T::zero(); y.len() / 2];
        par_rows(&mut out, m, |r, o| {
            let (g, u) = y[2 * m * r..2 * m * (r + 1)].split_at(m);
            if self.identity {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * self.act.ratio(g) * u;
                }
            } else {
                T::act_mul_rows(self.act, g, u, o)
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp1 for ActMulPacked {
    fn name(&self) -> &'static str {
        "ferrolens-act-mul-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s, "fused act * up: f32 or f64 only", T => self.go::<T>(s, l)?);
        let mut dims = l.dims().to_vec();
        let last = dims.len() - 1;
        dims[last] /= 2;
        Ok((out, Shape::from(dims)))
    }

    /// `[d gate | d up]` in one pass, straight into the packed layout ([`ActMulPackedBackward`]).
    fn bwd(&self, y: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.detach().contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ActMulPackedBackward(*self))?))
    }
}

/// The backward of [`ActMulPacked`]: `(y [.., 2m], g [.., m]) -> [.., 2m]`, each row `d gate`
/// then `d up`.
struct ActMulPackedBackward(ActMulPacked);

impl ActMulPackedBackward {
    fn go<T: Float + Send + Sync + ActRows>(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let (y, g) = (cpu_slice::<T>(s1, l1, "packed act * up: y")?, cpu_slice::<T>(s2, l2, "packed act * up: grad")?);
        let m = l1.dims()[l1.dims().len() - 1] / 2;
        let rules = self.0;
        let scale = if rules.half { T::from(0.5f64).expect("one half") } else { T::one() };
        let mut out = vec![T::zero(); y.len()];
        par_rows(&mut out, 2 * m, |r, o| {
            let (gate, up) = y[2 * m * r..2 * m * (r + 1)].split_at(m);
            let (dg, du) = o.split_at_mut(m);
            let g = &g[m * r..m * (r + 1)];
            if rules.identity {
                // prod = (x r) u with r constant: d x = g u r, d u = g x r.
                for i in 0..m {
                    let (x, gi) = (gate[i], g[i] * scale);
                    let r = rules.act.ratio(x);
                    dg[i] = gi * up[i] * r;
                    du[i] = gi * (x * r);
                }
            } else {
                T::act_mul_grad_rows(rules.act, gate, up, g, dg, du);
                if rules.half {
                    o.iter_mut().for_each(|x| *x = *x * scale);
                }
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp2 for ActMulPackedBackward {
    fn name(&self) -> &'static str {
        "ferrolens-act-mul-packed-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused act * up backward: f32 or f64 only", T => self.go::<T>(s1, l1, s2, l2)?);
        Ok((out, l1.shape().clone()))
    }
}

/// [`act_mul`] on the packed gate/up product `y` `[.., 2m]` (gate columns first): `[.., m]`,
/// with the gradient of `y` written straight into its packed layout (CPU, f32/f64; see
/// [`fused_elementwise_fits`]). `rules` are RelP's identity rule (the activation as a constant
/// ratio times its input, value `x act(x) / (x ± 1e-6)`) and half rule (the product's gradient
/// halved), as [`crate::lrp::LrpRules`] sets them; both off: plain gradients.
pub fn act_mul_packed(act: MlpAct, y: &Tensor, (identity, half): (bool, bool)) -> Result<Tensor> {
    let two_m = y.dims().last().copied().unwrap_or(0);
    if !fused_elementwise_fits(y) || two_m == 0 || two_m % 2 != 0 {
        return Err(Error::Input(format!("fused packed act * up: y {:?} does not fit (CPU, f32/f64, an even last dimension)", y.dims())));
    }
    Ok(y.contiguous()?.apply_op1(ActMulPacked { act, identity, half })?)
}

/// The op: `x -> act(x)`, element-wise (an ungated MLP), through the gated rows with `up = 1`
/// (a product with exactly 1 changes no bit); under RelP's identity rule `x r(x)` with the ratio
/// [`MlpAct::ratio`] a constant for the backward.
#[derive(Debug, Clone, Copy)]
struct Act {
    act: MlpAct,
    identity: bool,
}

/// Chunk width of the element-wise ops over flat tensors.
const CHUNK: usize = 4096;

/// `f(start, chunk)` over `out` in chunks of [`CHUNK`] elements (the whole ones on candle's
/// thread pool, then the tail), `start` being the chunk's offset in `out`.
fn par_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let full = out.len() / CHUNK * CHUNK;
    let (whole, tail) = out.split_at_mut(full);
    par_rows(whole, CHUNK, |i, o| f(i * CHUNK, o));
    f(full, tail);
}

impl Act {
    fn go<T: Float + Send + Sync + ActRows>(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let x = cpu_slice::<T>(s, l, "act: x")?;
        let ones = [T::one(); CHUNK];
        let mut out = vec![T::zero(); x.len()];
        par_chunks(&mut out, |start, o| {
            let x = &x[start..start + o.len()];
            if self.identity {
                o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * self.act.ratio(x));
            } else {
                T::act_mul_rows(self.act, x, &ones[..o.len()], o)
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "ferrolens-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s, "fused act: f32 or f64 only", T => self.go::<T>(s, l)?);
        Ok((out, l.shape().clone()))
    }

    /// `dx = g act'(x)` (or `g r(x)` under the identity rule) in one pass ([`ActBackward`]).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.detach().contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &ActBackward(*self))?))
    }
}

/// The backward of [`Act`]: `(x, g) -> dx`.
struct ActBackward(Act);

impl ActBackward {
    fn go<T: Float + Send + Sync + ActRows>(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<Vec<T>>
    where
        CpuStorage: AsSlice<T>,
    {
        let (x, g) = (cpu_slice::<T>(s1, l1, "act: x")?, cpu_slice::<T>(s2, l2, "act: grad")?);
        let ones = [T::one(); CHUNK];
        let mut out = vec![T::zero(); x.len()];
        // The gated rows' `d gate` with `up = 1`; their `d up` (the activation) goes to scratch.
        par_chunks(&mut out, |start, dx| {
            let at = start..start + dx.len();
            if self.0.identity {
                dx.iter_mut().zip(&x[at.clone()]).zip(&g[at]).for_each(|((d, &x), &g)| *d = g * self.0.act.ratio(x));
            } else {
                let mut scratch = vec![T::zero(); dx.len()];
                T::act_mul_grad_rows(self.0.act, &x[at.clone()], &ones[..dx.len()], &g[at], dx, &mut scratch)
            }
        });
        Ok(out)
    }
}

impl candle_core::CustomOp2 for ActBackward {
    fn name(&self) -> &'static str {
        "ferrolens-act-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused act backward: f32 or f64 only", T => self.go::<T>(s1, l1, s2, l2)?);
        Ok((out, l1.shape().clone()))
    }
}

/// An ungated MLP's activation `act(x)` ([`MlpAct`]; GPT-2's `gelu_new`, GPT-NeoX's exact GELU) in one pass (CPU,
/// f32/f64; see [`fused_elementwise_fits`]), with its own backward. `identity`: RelP's identity
/// rule (the activation as a constant ratio times its input, value `x act(x) / (x ± 1e-6)`).
pub fn act(act: MlpAct, x: &Tensor, identity: bool) -> Result<Tensor> {
    if !fused_elementwise_fits(x) {
        return Err(Error::Input(format!("fused act: x {:?} does not fit (CPU, f32/f64)", x.dims())));
    }
    Ok(x.contiguous()?.apply_op1(Act { act, identity })?)
}

/// The op: `(x [.., d], w [d]) -> x / sqrt(mean(x²) + eps) * w` per row of `d` (RMSNorm), or
/// with `center` `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) * w` (LayerNorm without its
/// bias).
#[derive(Clone)]
struct RmsNorm {
    eps: f64,
    /// RelP's LN rule: the scale is a constant for the backward pass.
    detach_scale: bool,
    /// Subtract the row's mean first (LayerNorm).
    center: bool,
}

impl RmsNorm {
    /// The row's mean (LayerNorm) or 0 (RMSNorm).
    #[inline]
    fn mean<T: Float>(&self, x: &[T]) -> T {
        if self.center {
            x.iter().fold(T::zero(), |a, &v| a + v) / T::from(x.len()).expect("a row length")
        } else {
            T::zero()
        }
    }

    /// The row's scale `sqrt(mean((x - m)²) + eps)` for its mean `m` ([`RmsNorm::mean`]), as the
    /// written-out norm computes it.
    #[inline]
    fn scale<T: Float>(&self, x: &[T], m: T) -> T {
        let n = T::from(x.len()).expect("a row length");
        let ss = if self.center { x.iter().fold(T::zero(), |a, &v| a + (v - m) * (v - m)) } else { dot(x, x) };
        (ss / n + T::from(self.eps).expect("a finite eps")).sqrt()
    }

    /// One row: `o = (x - m) / s * w`.
    #[inline]
    fn fwd_row<T: Float>(&self, xr: &[T], w: &[T], o: &mut [T]) {
        let m = self.mean(xr);
        let s = self.scale(xr, m);
        for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
            *o = (x - m) / s * w;
        }
    }

    /// One row of `dx` with `dy = g`: `(g w - c1 - n c2) / s` with `n = (x - m) / s`,
    /// `c1 = mean(g w)` when centering (else 0) and `c2 = mean(g w n)` (0 with the scale held
    /// constant).
    #[inline]
    fn bwd_row<T: Float>(&self, xr: &[T], w: &[T], gr: &[T], o: &mut [T]) {
        let len = T::from(xr.len()).expect("a row length");
        let m = self.mean(xr);
        let s = self.scale(xr, m);
        let c1 = if self.center { gr.iter().zip(w).fold(T::zero(), |a, (&g, &w)| a + g * w) / len } else { T::zero() };
        let c2 = if self.detach_scale {
            T::zero()
        } else {
            let mut acc = T::zero();
            for ((&x, &g), &w) in xr.iter().zip(gr).zip(w) {
                acc = acc + g * w * ((x - m) / s);
            }
            acc / len
        };
        for (((o, &x), &g), &w) in o.iter_mut().zip(xr).zip(gr).zip(w) {
            *o = (g * w - c1 - (x - m) / s * c2) / s;
        }
    }

    fn fwd<T: Float + Send + Sync>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::zero(); x.len()];
        par_rows(&mut out, d, |r, o| self.fwd_row(&x[r * d..(r + 1) * d], w, o));
        out
    }

    fn bwd_rows<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::zero(); x.len()];
        par_rows(&mut out, d, |r, o| self.bwd_row(&x[r * d..(r + 1) * d], w, &g[r * d..(r + 1) * d], o));
        out
    }
}

/// The op: RMSNorm of the query and key parts of a packed `qkv` `[b,p,h+2kvh,d]`, values copied:
/// within each position's row, the query features `[0, h d)` in segments as long as the query
/// gain, the key features `[h d, (h+kvh) d)` in segments as long as the key gain (`d` each for
/// per-head q/k norms, `h d` and `kvh d` for norms over all heads).
#[derive(Clone)]
struct PackedQkNorm {
    norm: RmsNorm,
    /// `(h d, kvh d)`.
    widths: (usize, usize),
}

impl PackedQkNorm {
    /// The output (`n` elements), each position row (`width` long) written segment by segment
    /// by `f(offset of the segment, its part, its gain (empty for the values), its output)`.
    fn rows<T: Float + Send + Sync>(&self, n: usize, width: usize, wq: &[T], wk: &[T], f: impl Fn(usize, Which, &[T], &mut [T]) + Sync) -> Vec<T> {
        let (qw, kw) = self.widths;
        let mut out = vec![T::zero(); n];
        par_rows(&mut out, width, |r, o| {
            let (q, rest) = o.split_at_mut(qw);
            let (k, v) = rest.split_at_mut(kw);
            for (i, seg) in q.chunks_mut(wq.len()).enumerate() {
                f(r * width + i * wq.len(), Which::Q, wq, seg);
            }
            for (i, seg) in k.chunks_mut(wk.len()).enumerate() {
                f(r * width + qw + i * wk.len(), Which::K, wk, seg);
            }
            f(r * width + qw + kw, Which::V, &[], v);
        });
        out
    }
}

impl CustomOp3 for PackedQkNorm {
    fn name(&self) -> &'static str {
        "ferrolens-packed-qk-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, n, d) = l1.shape().dims4()?;
        let out = by_float!(s1, "fused packed q/k norm: f32 or f64 only", T => {
            let (x, wq, wk) = (cpu_slice::<T>(s1, l1, "q/k norm x")?, cpu_slice::<T>(s2, l2, "q norm w")?, cpu_slice::<T>(s3, l3, "k norm w")?);
            self.rows(x.len(), n * d, wq, wk, |at, part, w, o| {
                let xr = &x[at..at + o.len()];
                if matches!(part, Which::V) { o.copy_from_slice(xr) } else { self.norm.fwd_row(xr, w, o) }
            })
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, wq: &Tensor, wk: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, wq, wk, g) = (x.detach().contiguous()?, wq.detach().contiguous()?, wk.detach().contiguous()?, grad.contiguous()?);
        let dx = match x.dtype() {
            DType::F32 => self.grad::<f32>(&x, &wq, &wk, &g)?,
            DType::F64 => self.grad::<f64>(&x, &wq, &wk, &g)?,
            other => candle_core::bail!("fused packed q/k norm: no backward for {other:?}"),
        };
        Ok((Some(dx), None, None))
    }
}

impl PackedQkNorm {
    fn grad<T: Float + Send + Sync + candle_core::WithDType>(&self, x: &Tensor, wq: &Tensor, wk: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, n, d) = x.dims4()?;
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let (xv, wqv, wkv, gv) = (host(x)?, host(wq)?, host(wk)?, host(g)?);
        let dx = self.rows(xv.len(), n * d, &wqv, &wkv, |at, part, w, o| {
            let (xr, gr) = (&xv[at..at + o.len()], &gv[at..at + o.len()]);
            if matches!(part, Which::V) {
                o.copy_from_slice(gr)
            } else {
                self.norm.bwd_row(xr, w, gr, o)
            }
        });
        Tensor::from_vec(dx, x.shape(), x.device())
    }
}

/// RMSNorm of the query and key heads of a packed `qkv` `[b,p,h+2kvh,d]` (heads `0..h` queries,
/// `h..h+kvh` keys, the rest values, passed through): queries with gain `wq` and keys with `wk`,
/// each either `[d]` (per head, Qwen3/Gemma-3) or `[h d]` / `[kvh d]` (over all heads of the
/// part, OLMo-2). The same per-row arithmetic as [`rms_norm`], with its own backward;
/// `detach_scale` is RelP's LN rule. CPU, f32/f64 (see [`fused_elementwise_fits`]).
pub fn rms_norm_qk_packed(qkv: &Tensor, (h, kvh): (usize, usize), wq: &Tensor, wk: &Tensor, eps: f64, detach_scale: bool) -> Result<Tensor> {
    let (_, _, n, d) = qkv.dims4()?;
    let (qw, kw) = (h * d, kvh * d);
    let fits = |w: &Tensor, part: usize| w.rank() == 1 && w.dim(0).is_ok_and(|s| s > 0 && part.is_multiple_of(s)) && w.dtype() == qkv.dtype() && !w.track_op();
    if !fused_elementwise_fits(qkv) || n != h + 2 * kvh || !fits(wq, qw) || !fits(wk, kw) {
        return Err(Error::Input(format!("fused packed q/k norm: qkv {:?} with gains {:?} and {:?} does not fit", qkv.dims(), wq.dims(), wk.dims())));
    }
    let op = PackedQkNorm { norm: RmsNorm { eps, detach_scale, center: false }, widths: (qw, kw) };
    Ok(qkv.contiguous()?.apply_op3(&wq.contiguous()?, &wk.contiguous()?, op)?)
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ferrolens-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused rms norm: f32 or f64 only", T => self.fwd::<T>(cpu_slice(s1, l1, "rms norm x")?, cpu_slice(s2, l2, "rms norm w")?));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.detach().contiguous()?.apply_op3_no_bwd(&w.detach().contiguous()?, &grad.contiguous()?, &RmsNormBackward(self.clone()))?;
        Ok((Some(dx), None))
    }
}

/// The backward of [`RmsNorm`]: `(x, w, dy) -> dx`, one pass per row.
struct RmsNormBackward(RmsNorm);

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "ferrolens-rms-norm-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_float!(s1, "fused rms norm backward: f32 or f64 only", T => {
            self.0.bwd_rows::<T>(cpu_slice(s1, l1, "rms norm x")?, cpu_slice(s2, l2, "rms norm w")?, cpu_slice(s3, l3, "rms norm dy")?)
        });
        Ok((out, l1.shape().clone()))
    }
}

/// RMSNorm over the last axis, `x [.., d]` with gain `w [d]`: `x / sqrt(mean(x²) + eps) * w`
/// per row, in one pass (CPU, f32/f64; see [`fused_elementwise_fits`]), with a backward of its
/// own for `x` (`w` must not need a gradient). `detach_scale`: RelP's LN rule, the scale is a
/// constant for the backward pass. The same formula as the written-out norm; the sum of squares
/// is accumulated in another order, so values can differ in the last bits.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, detach_scale: bool) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if !fused_elementwise_fits(x) || w.dims() != [d] || w.dtype() != x.dtype() || w.track_op() || d == 0 {
        return Err(Error::Input(format!("fused rms norm: x {:?} and gain {:?} do not fit", x.dims(), w.dims())));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps, detach_scale, center: false })?)
}

/// LayerNorm over the last axis, `x [.., d]` with gain `w [d]` and bias `b [d]`:
/// `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) * w + b` per row, in one pass and a bias
/// add (CPU, f32/f64; see [`fused_elementwise_fits`]), with a backward of its own for `x` (`w`
/// and `b` must not need a gradient). `detach_scale`: RelP's LN rule, the scale (not the mean)
/// is a constant for the backward pass. The written-out norm's formula; sums accumulate in
/// another order, so values can differ in the last bits.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64, detach_scale: bool) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let fits = |t: &Tensor| t.dims() == [d] && t.dtype() == x.dtype() && !t.track_op();
    if !fused_elementwise_fits(x) || !fits(w) || !b.is_none_or(fits) || d == 0 {
        return Err(Error::Input(format!("fused layer norm: x {:?}, gain {:?} and bias {:?} do not fit", x.dims(), w.dims(), b.map(|b| b.dims()))));
    }
    let y = x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps, detach_scale, center: true })?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `exp(x)`: f64 through `f64::exp`; f32 through [`exp_f32`], a polynomial the compiler
/// vectorises (see [`ActRows`]), within 2 ulp of the correctly rounded value on the normal range
/// (unit test), 0 below -87.34 (where the result would be subnormal), `inf` above 88.38, NaN
/// kept.
pub(crate) trait FastExp: Sized {
    /// `exp(self)`.
    fn fast_exp(self) -> Self;
}

impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

impl FastExp for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}

/// `o = act(g) * u = g / (1 + exp(-v(g))) * u` ([`ActArg`]), element-wise.
#[inline(always)]
fn act_mul_row<T: Float + FastExp, A: ActArg>(g: &[T], u: &[T], o: &mut [T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (T::one() + (-A::arg(g)).fast_exp()) * u;
    }
}

/// The gradients of `act(x) * u` for the output gradient `g`, with `s = sigmoid(v(x))`:
/// `dx = g u s (1 + x (1 - s) v'(x))`, `du = g x s`, element-wise.
#[inline(always)]
fn act_mul_grad_row<T: Float + FastExp, A: ActArg>(x: &[T], u: &[T], g: &[T], dx: &mut [T], du: &mut [T]) {
    for ((((dx, du), &x), &u), &g) in dx.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
        let sig = T::one() / (T::one() + (-A::arg(x)).fast_exp());
        (*dx, *du) = (g * u * (sig * (x * (T::one() - sig) * A::darg(x) + T::one())), g * (x * sig));
    }
}

/// The standard normal CDF `Phi(x) = 0.5 (1 + erf(x / sqrt 2))`.
#[inline(always)]
fn phi<T: ActRows>(x: T) -> T {
    let half = T::from(0.5f64).expect("one half");
    half * (T::one() + T::erf(x * T::from(std::f64::consts::FRAC_1_SQRT_2).expect("a constant")))
}

/// `o = x Phi(x) u` (the exact GELU times `up`), element-wise; not vectorised (the error
/// function is libm's, as candle's `erf` op computes it).
fn gelu_erf_mul_row<T: ActRows>(g: &[T], u: &[T], o: &mut [T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * phi(g) * u;
    }
}

/// The gradients of `x Phi(x) u`: `dx = g u (Phi(x) + x exp(-x²/2) / sqrt(2 pi))`,
/// `du = g x Phi(x)`, element-wise.
fn gelu_erf_mul_grad_row<T: ActRows>(x: &[T], u: &[T], g: &[T], dx: &mut [T], du: &mut [T]) {
    let (half, inv_sqrt_2pi) = (T::from(0.5f64).expect("one half"), T::from(0.398_942_280_401_432_7f64).expect("a constant"));
    for ((((dx, du), &x), &u), &g) in dx.iter_mut().zip(du.iter_mut()).zip(x).zip(u).zip(g) {
        let p = phi(x);
        (*dx, *du) = (g * u * (p + x * (-(x * x) * half).exp() * inv_sqrt_2pi), g * (x * p));
    }
}

/// A gated MLP's rows: in f32 compiled for AVX-512 or AVX2 + FMA when the CPU has them (checked
/// at run time; the baseline x86-64 target has neither), so that the exponential and the
/// division vectorise 16 or 8 wide; the same arithmetic (bit for bit) on every path.
pub(crate) trait ActRows: Float + FastExp + Send + Sync {
    /// The error function (candle's: libm's `erf`/`erff`).
    fn erf(x: Self) -> Self;
    /// [`act_mul_row`] of `A` (f32: on the widest instructions available).
    fn sigmoid_rows<A: ActArg>(g: &[Self], u: &[Self], o: &mut [Self]) {
        act_mul_row::<Self, A>(g, u, o)
    }
    /// [`act_mul_grad_row`] of `A` (f32: on the widest instructions available).
    fn sigmoid_grad_rows<A: ActArg>(x: &[Self], u: &[Self], g: &[Self], dx: &mut [Self], du: &mut [Self]) {
        act_mul_grad_row::<Self, A>(x, u, g, dx, du)
    }
    /// `act(g) * u`: the sigmoid form's rows of `act` or [`gelu_erf_mul_row`].
    fn act_mul_rows(act: MlpAct, g: &[Self], u: &[Self], o: &mut [Self]) {
        match act {
            MlpAct::Silu => Self::sigmoid_rows::<SiluArg>(g, u, o),
            MlpAct::GeluTanh => Self::sigmoid_rows::<GeluTanhArg>(g, u, o),
            MlpAct::GeluErf => gelu_erf_mul_row(g, u, o),
        }
    }
    /// The gradients of `act(x) * u`: the sigmoid form's rows of `act` or
    /// [`gelu_erf_mul_grad_row`].
    fn act_mul_grad_rows(act: MlpAct, x: &[Self], u: &[Self], g: &[Self], dx: &mut [Self], du: &mut [Self]) {
        match act {
            MlpAct::Silu => Self::sigmoid_grad_rows::<SiluArg>(x, u, g, dx, du),
            MlpAct::GeluTanh => Self::sigmoid_grad_rows::<GeluTanhArg>(x, u, g, dx, du),
            MlpAct::GeluErf => gelu_erf_mul_grad_row(x, u, g, dx, du),
        }
    }
}

impl ActRows for f64 {
    fn erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}

impl ActRows for f32 {
    fn erf(x: f32) -> f32 {
        candle_core::cpu::erf::erf_f32(x)
    }

    fn sigmoid_rows<A: ActArg>(g: &[f32], u: &[f32], o: &mut [f32]) {
        wide::act_mul_rows::<A>(g, u, o)
    }

    fn sigmoid_grad_rows<A: ActArg>(x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) {
        wide::act_mul_grad_rows::<A>(x, u, g, dx, du)
    }
}

/// The f32 rows compiled with the widest vector instructions the CPU has.
mod wide {
    use super::ActArg;

    /// [`super::act_mul_row`] in f32 on the widest instructions available.
    pub(super) fn act_mul_rows<A: ActArg>(g: &[f32], u: &[f32], o: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { act_mul_row_v4::<A>(g, u, o) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { act_mul_row_v3::<A>(g, u, o) };
            }
        }
        super::act_mul_row::<f32, A>(g, u, o)
    }

    /// [`super::act_mul_grad_row`] in f32 on the widest instructions available.
    pub(super) fn act_mul_grad_rows<A: ActArg>(x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { act_mul_grad_row_v4::<A>(x, u, g, dx, du) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { act_mul_grad_row_v3::<A>(x, u, g, dx, du) };
            }
        }
        super::act_mul_grad_row::<f32, A>(x, u, g, dx, du)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn act_mul_row_v4<A: ActArg>(g: &[f32], u: &[f32], o: &mut [f32]) {
        super::act_mul_row::<f32, A>(g, u, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn act_mul_row_v3<A: ActArg>(g: &[f32], u: &[f32], o: &mut [f32]) {
        super::act_mul_row::<f32, A>(g, u, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn act_mul_grad_row_v4<A: ActArg>(x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) {
        super::act_mul_grad_row::<f32, A>(x, u, g, dx, du)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn act_mul_grad_row_v3<A: ActArg>(x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) {
        super::act_mul_grad_row::<f32, A>(x, u, g, dx, du)
    }
}

/// Cephes' `expf`: `exp(x) = 2^n exp(r)` with `n = round(x log2 e)`, `r = x - n ln 2` (ln 2 in
/// two parts) and a degree-7 polynomial for `exp(r)`, written branch-free so that it vectorises.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.376_26; // 127.5 ln 2: 2^n stays a normal number
    const LO: f32 = -87.336_55; // -126 ln 2: below it the result is subnormal; flushed to 0
    let xc = x.clamp(LO, HI);
    // Round to nearest through the 1.5 * 2^23 trick (no rounding instruction needed).
    // The integer n sits in the low mantissa bits of t (read them rather than convert: Rust's
    // saturating float-to-int conversion does not vectorise).
    let t = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = t.to_bits() as i32 - 0x4B40_0000;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let y = e * f32::from_bits(((ni + 127) as u32) << 23);
    let y = if x < LO { 0.0 } else { y };
    let y = if x > HI { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::{ActRows, MlpAct};

    /// The f32 exponential against f64's over the whole range: within 2 ulp where the result is
    /// a normal number, 0 below, inf above, NaN kept.
    #[test]
    fn the_f32_exponential_is_within_two_ulp() {
        let mut xs: Vec<f32> = (0..2_000_001).map(|i| -87.3 + (88.3 + 87.3) * i as f32 / 2_000_000.0).collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1.0, 10.0, -10.0]);
        let mut worst = 0f64;
        for &x in &xs {
            let want = (x as f64).exp();
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((super::exp_f32(x) as f64 - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        let edge = [-1000.0f32, -87.4, 88.5, 1000.0, f32::NEG_INFINITY, f32::INFINITY].map(super::exp_f32);
        assert_eq!(edge, [0.0, 0.0, f32::INFINITY, f32::INFINITY, 0.0, f32::INFINITY]);
        assert!(super::exp_f32(f32::NAN).is_nan());
    }

    /// The f32 gate rows (SiLU and tanh GELU) on this CPU's widest path equal the plain rows
    /// bit for bit (and the f64 rows to f32 rounding), forward and backward, odd lengths included.
    #[test]
    fn wide_gate_rows_equal_the_plain_ones() {
        fn check<A: super::ActArg>(act: MlpAct) {
            let n = 4099;
            let val = |i: usize, k: f32| (i as f32 * 0.37 + k).sin() * 12.0;
            let (x, u, g): (Vec<f32>, Vec<f32>, Vec<f32>) =
                ((0..n).map(|i| val(i, 0.1)).collect(), (0..n).map(|i| val(i, 1.3)).collect(), (0..n).map(|i| val(i, 2.9)).collect());
            let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
            let (mut dx1, mut du1, mut dx2, mut du2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            f32::act_mul_rows(act, &x, &u, &mut o1);
            f32::act_mul_grad_rows(act, &x, &u, &g, &mut dx1, &mut du1);
            super::act_mul_row::<f32, A>(&x, &u, &mut o2);
            super::act_mul_grad_row::<f32, A>(&x, &u, &g, &mut dx2, &mut du2);
            let wide = o1.iter().chain(&dx1).chain(&du1);
            let plain = o2.iter().chain(&dx2).chain(&du2);
            assert!(wide.zip(plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{act:?}: the wide rows differ from the plain ones");
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let u64: Vec<f64> = u.iter().map(|&v| v as f64).collect();
            let mut o64 = vec![0f64; n];
            f64::act_mul_rows(act, &x64, &u64, &mut o64);
            for (a, b) in o1.iter().zip(&o64) {
                assert!((*a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0), "{act:?}: {a} vs {b}");
            }
        }
        check::<super::SiluArg>(MlpAct::Silu);
        check::<super::GeluTanhArg>(MlpAct::GeluTanh);
    }

    /// The tanh GELU as `x sigmoid(v)` equals `0.5 x (1 + tanh(u))` (Hugging Face's
    /// `gelu_pytorch_tanh`), and its gradient equals that formula's derivative, in f64.
    #[test]
    fn the_sigmoid_form_of_the_tanh_gelu_is_the_tanh_form() {
        let c = (2.0f64 / std::f64::consts::PI).sqrt();
        let xs: Vec<f64> = (0..2001).map(|i| -8.0 + 16.0 * i as f64 / 2000.0).collect();
        let ones = vec![1.0f64; xs.len()];
        let (mut o, mut dx, mut du) = (vec![0f64; xs.len()], vec![0f64; xs.len()], vec![0f64; xs.len()]);
        f64::act_mul_rows(MlpAct::GeluTanh, &xs, &ones, &mut o);
        f64::act_mul_grad_rows(MlpAct::GeluTanh, &xs, &ones, &ones, &mut dx, &mut du);
        for (i, &x) in xs.iter().enumerate() {
            let t = (c * (x + 0.044715 * x * x * x)).tanh();
            let want = 0.5 * x * (1.0 + t);
            let dwant = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
            assert!((o[i] - want).abs() <= 1e-14 * want.abs().max(1.0), "gelu({x}) = {} vs {want}", o[i]);
            assert!((du[i] - want).abs() <= 1e-14 * want.abs().max(1.0), "d up at {x}");
            assert!((dx[i] - dwant).abs() <= 1e-13 * dwant.abs().max(1.0), "gelu'({x}) = {} vs {dwant}", dx[i]);
        }
    }
}
