//! Matrix products whose operand layouts every backend accepts.
//!
//! candle's CPU matmul takes any strides; its CUDA matmul (cuBLAS strided-batched GEMM) refuses
//! operands whose last two dimensions are neither row- nor column-contiguous, and batch
//! dimensions that cannot be expressed as one batch stride (seen on an H200: a head slice of
//! `z`, `[16,15,64]` with strides `[8640,576,1]`, times `W_O`). Every product in ferrolens goes
//! through [`matmul`] / [`broadcast_matmul`] here (clippy's `disallowed-methods` forbids the
//! tensor methods elsewhere), which apply candle-CUDA's own rule ([`cuda_refuses`], a port of
//! `gemm_config` in candle-core 0.11's CUDA backend) on every device:
//! - normally an operand CUDA would refuse is copied contiguous first (same numbers);
//! - in **strict mode** ([`set_strict`], or `FERROLENS_STRICT_LAYOUTS=1`) it is an error naming
//!   both layouts, so a CPU test run finds every such product without a GPU (tests/layouts.rs
//!   runs every method that way).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ferrolens_model::layout::{cuda_refuses, matmul};
//! let z = Tensor::zeros((16, 15, 9, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
//! let head = z.narrow(2, 3, 1).unwrap().squeeze(2).unwrap(); // [16,15,64], strides [8640,576,1]
//! let w = Tensor::zeros((16, 64, 576), candle_core::DType::F32, &Device::Cpu).unwrap();
//! assert!(cuda_refuses(&head, &w).is_some());
//! assert_eq!(matmul(&head, &w).unwrap().dims(), &[16, 15, 576]);
//! ```

use crate::error::{Error, Result};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static STRICT: AtomicBool = AtomicBool::new(false);

/// Turn strict mode on or off for this process: a product with a layout CUDA refuses is then an
/// error (on every device) instead of a copy. Turn it on before loading a model: a model loaded
/// on the CPU outside strict mode packs its projections row-major, and the separate `W_Q`/`W_K`/
/// `W_V`/`W_gate`/`W_in` views of that packing are layouts CUDA refuses (see
/// [`crate::HookedTransformer::new`]); one loaded in strict mode packs them as on a GPU.
pub fn set_strict(on: bool) {
    STRICT.store(on, Ordering::SeqCst);
}

thread_local! {
    /// Strict mode for this thread alone (unit tests that must not flip it under other tests).
    static LOCAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether strict mode is on ([`set_strict`] or `FERROLENS_STRICT_LAYOUTS=1`).
pub fn strict() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    STRICT.load(Ordering::SeqCst) || LOCAL.with(|l| l.get()) || *ENV.get_or_init(|| std::env::var("FERROLENS_STRICT_LAYOUTS").is_ok_and(|v| v == "1"))
}

/// Why candle's CUDA matmul would refuse `a @ b` (`[.., m, k] @ [.., k, n]`, same batch dims),
/// or `None` when it accepts the layouts. A port of `gemm_config` (candle-core 0.11).
pub fn cuda_refuses(a: &Tensor, b: &Tensor) -> Option<String> {
    let (la, lb) = (a.layout(), b.layout());
    let (da, db) = (a.dims(), b.dims());
    if da.len() < 2 || db.len() < 2 || da.len() != db.len() {
        return None; // candle reports a shape error itself
    }
    let r = da.len();
    let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
    let (sa, sb) = (la.stride(), lb.stride());
    let (a1, a2, b1, b2) = (sa[r - 1], sa[r - 2], sb[r - 1], sb[r - 2]);
    let rhs_ok = ((b1 == 1 || n == 1) && (b2 == n || k == 1)) || ((b1 == k || n == 1) && (b2 == 1 || k == 1));
    let lhs_ok = ((a1 == 1 || k == 1) && (a2 == k || m == 1)) || ((a1 == m || k == 1) && (a2 == 1 || m == 1));
    let batch_ok = |s: &[usize], d: &[usize]| match s[..s.len() - 2] {
        [s1, st] => s1 == st * d[1] || d[0] == 1 || d[1] == 1,
        [_] | [] => true,
        _ => false,
    };
    let why = if !lhs_ok {
        "the left operand's last two dimensions are neither row- nor column-contiguous"
    } else if !rhs_ok {
        "the right operand's last two dimensions are neither row- nor column-contiguous"
    } else if !batch_ok(sa, da) || !batch_ok(sb, db) {
        "the batch dimensions have no single batch stride"
    } else {
        return None;
    };
    Some(format!("{why}: left {:?} strides {:?}, right {:?} strides {:?}", da, sa, db, sb))
}

/// The operands, copied contiguous where CUDA would refuse them; in strict mode, an error.
fn fix(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    match cuda_refuses(a, b) {
        None => Ok((a.clone(), b.clone())),
        Some(why) if strict() => Err(Error::Input(format!("internal (strict layouts): a matrix product CUDA would refuse, {why}"))),
        Some(_) => {
            // Copy only the operand that needs it.
            let ac = a.contiguous()?;
            if cuda_refuses(&ac, b).is_none() {
                return Ok((ac, b.clone()));
            }
            let bc = b.contiguous()?;
            if cuda_refuses(a, &bc).is_none() {
                return Ok((a.clone(), bc));
            }
            Ok((ac, bc))
        }
    }
}

/// `a @ b` (`[.., m, k] @ [.., k, n]`) with layouts every backend accepts.
///
/// The product is recorded as [`Matmul`]: when only one operand takes part in a gradient (e.g.
/// an activation times a weight that is not a [`candle_core::Var`]), its backward computes that
/// operand's gradient alone (candle's own matmul backward also computes the other side's, `aᵀ·g`
/// for a weight, a GEMM as large as the useful one, plus a zero tensor of the weight's shape to
/// add it to, all discarded); on the CPU it skips candle's zero-fill of the output. Same forward
/// numbers as [`Tensor::matmul`] either way.
#[allow(clippy::disallowed_methods)]
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = fix(a, b)?;
    if let Some(op) = Matmul::new(&a, &b) {
        return Ok(a.apply_op2_arc(&b, std::sync::Arc::new(Box::new(op)))?);
    }
    Ok(a.matmul(&b)?)
}

/// A matrix product `[.., m, k] @ [.., k, n]` (see [`matmul`]) whose backward returns the
/// gradients of the operands that track one, and only those. The forward is the backend's own
/// matmul on the layouts [`Tensor::matmul`] passes; on the CPU in f32/f64 it is the very same
/// `gemm` call candle makes (same kernels, same threads, so bit-identical values) into an output
/// that is not zero-filled first (candle's fill is a wasted pass: the call overwrites every
/// element). The backward's products go through [`matmul`] (same layout rule).
#[derive(Debug, Clone)]
pub struct Matmul {
    /// `(batch, m, n, k)` as the backends take it.
    bmnk: (usize, usize, usize, usize),
    /// The output shape `[.., m, n]`.
    shape: candle_core::Shape,
    /// Which operands get a gradient: `(left, right)`.
    grads: (bool, bool),
}

impl Matmul {
    /// The op for `a @ b`, or `None` where candle's own matmul should run (a shape it would
    /// refuse, so that its error is the one reported, or an empty product).
    fn new(a: &Tensor, b: &Tensor) -> Option<Self> {
        let (da, db) = (a.dims(), b.dims());
        let r = da.len();
        if r < 2 || db.len() != r || a.dtype() != b.dtype() || !a.device().same_device(b.device()) {
            return None;
        }
        let (m, k, k2, n) = (da[r - 2], da[r - 1], db[r - 2], db[r - 1]);
        let batch: usize = da[..r - 2].iter().product();
        if k != k2 || da[..r - 2] != db[..r - 2] || k == 0 || batch * m * n == 0 {
            return None;
        }
        let shape = candle_core::Shape::from([&da[..r - 2], &[m, n]].concat());
        Some(Self { bmnk: (batch, m, n, k), shape, grads: (a.track_op(), b.track_op()) })
    }

    /// The forward on any backend: its own matmul, on the layouts [`Tensor::matmul`] passes.
    fn fwd<S: candle_core::backend::BackendStorage>(
        &self,
        s1: &S,
        l1: &candle_core::Layout,
        s2: &S,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        Ok((s1.matmul(s2, self.bmnk, l1, l2)?, self.shape.clone()))
    }

    /// candle-core 0.11's CPU matmul (`MatMul::f` with the gemm crate: the same batch skips, the
    /// same fold of a batch-invariant right operand into one product, the same call and
    /// parallelism) writing into an uninitialized output. `None` where candle would report a
    /// striding error (the caller then runs candle's matmul, which reports it).
    fn cpu_gemm<T: Copy + 'static + num_traits::Zero + num_traits::One>(
        &self,
        lhs: &[T],
        l1: &candle_core::Layout,
        rhs: &[T],
        l2: &candle_core::Layout,
    ) -> Option<Vec<T>> {
        let (b, m, n, k) = self.bmnk;
        let skip = |l: &candle_core::Layout, whole: usize| -> Option<usize> {
            let (s, d) = (l.stride(), l.dims());
            match s[..s.len() - 2] {
                [s1, stride] if s1 == stride * d[1] => Some(stride),
                [_, stride] if d[0] == 1 => Some(stride),
                [stride, _] if d[1] == 1 => Some(stride),
                [stride] => Some(stride),
                [] => Some(whole),
                _ => None,
            }
        };
        let (a_skip, b_skip) = (skip(l1, m * k)?, skip(l2, n * k)?);
        let (sa, sb) = (l1.stride(), l2.stride());
        let r = sa.len();
        let (lhs_cs, lhs_rs, rhs_cs, rhs_rs) = (sa[r - 1], sa[r - 2], sb[r - 1], sb[r - 2]);
        let (lhs, rhs) = (&lhs[l1.start_offset()..], &rhs[l2.start_offset()..]);
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        let len = b * m * n;
        let mut dst: Vec<T> = Vec::with_capacity(len);
        let (steps, rows) = if b_skip == 0 && a_skip == m * k { (1, b * m) } else { (b, m) };
        for step in 0..steps {
            // SAFETY: as in candle's own call: the operands' layouts were checked by the tensor
            // API (shapes) and the skips above (strides); each step writes its own
            // `rows * n` block of `dst`'s capacity, with `read_dst = false`.
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    dst.as_mut_ptr().add(step * m * n),
                    1,
                    n as isize,
                    false,
                    lhs[step * a_skip..].as_ptr(),
                    lhs_cs as isize,
                    lhs_rs as isize,
                    rhs[step * b_skip..].as_ptr(),
                    rhs_cs as isize,
                    rhs_rs as isize,
                    num_traits::Zero::zero(),
                    num_traits::One::one(),
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
        // SAFETY: the gemm calls above wrote all `b * m * n` elements (`k > 0`, read_dst false).
        unsafe { dst.set_len(len) };
        Some(dst)
    }
}

impl candle_core::CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as C;
        let out = match (s1, s2) {
            (C::F32(a), C::F32(b)) => self.cpu_gemm(a, l1, b, l2).map(C::F32),
            (C::F64(a), C::F64(b)) => self.cpu_gemm(a, l1, b, l2).map(C::F64),
            _ => None,
        };
        match out {
            Some(out) => Ok((out, self.shape.clone())),
            None => self.fwd(s1, l1, s2, l2),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.fwd(s1, l1, s2, l2)
    }

    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::MetalStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        self.fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let r = a.rank();
        let wrap = |e: Error| candle_core::Error::Msg(e.to_string());
        // dL/da = g · bᵀ, dL/db = aᵀ · g
        let da = if self.grads.0 { Some(matmul(g, &b.transpose(r - 2, r - 1)?).map_err(wrap)?) } else { None };
        let db = if self.grads.1 { Some(matmul(&a.transpose(r - 2, r - 1)?, g).map_err(wrap)?) } else { None };
        Ok((da, db))
    }
}

/// [`Tensor::broadcast_matmul`] with layouts every backend accepts (candle copies broadcast
/// operands contiguous itself; operands used as they are get [`matmul`]'s check).
#[allow(clippy::disallowed_methods)]
pub fn broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    if da.len() < 2 || db.len() < 2 {
        return Err(Error::Input(format!("a matrix product needs two dimensions on each side, got {da:?} and {db:?}")));
    }
    // Batch dimensions broadcast numpy-style, as candle's broadcast_matmul.
    let (ba, bb) = (&da[..da.len() - 2], &db[..db.len() - 2]);
    let nb = ba.len().max(bb.len());
    let mut batch = Vec::with_capacity(nb);
    for i in 0..nb {
        let x = if i + ba.len() >= nb { ba[i + ba.len() - nb] } else { 1 };
        let y = if i + bb.len() >= nb { bb[i + bb.len() - nb] } else { 1 };
        if x != y && x != 1 && y != 1 {
            return Err(Error::Input(format!("matrix product of {da:?} and {db:?}: batch dimensions do not broadcast")));
        }
        batch.push(x.max(y));
    }
    let ls = candle_core::Shape::from([batch.clone(), da[da.len() - 2..].to_vec()].concat());
    let rs = candle_core::Shape::from([batch, db[db.len() - 2..].to_vec()].concat());
    if ls != *a.shape() || rs != *b.shape() {
        // Broadcast operands are made contiguous by candle; a rank-2 right operand against a
        // contiguous left one is folded into one 2-D product, checked here the same way.
        if b.rank() == 2 && a.is_contiguous() && ls == *a.shape() {
            let rows: usize = a.dims()[..a.rank() - 1].iter().product();
            let k = a.dims()[a.rank() - 1];
            let mut out = a.dims().to_vec();
            out.pop();
            out.push(b.dims()[1]);
            return matmul(&a.reshape((rows, k))?, b)?.reshape(out).map_err(Into::into);
        }
        let a = if ls != *a.shape() { a.broadcast_as(&ls)?.contiguous()? } else { a.clone() };
        let b = if rs != *b.shape() { b.broadcast_as(&rs)?.contiguous()? } else { b.clone() };
        return matmul(&a, &b);
    }
    matmul(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn the_rule_matches_known_cases() {
        let d = Device::Cpu;
        let x = Tensor::arange(0f32, 16.0 * 15.0 * 9.0 * 64.0, &d).unwrap().reshape((16, 15, 9, 64)).unwrap();
        let w = Tensor::arange(0f32, 64.0 * 576.0, &d).unwrap().reshape((64, 576)).unwrap();
        let head = x.i((.., .., 2, ..)).unwrap(); // strides [8640, 576, 1]
        let wb = w.unsqueeze(0).unwrap().broadcast_as((16, 64, 576)).unwrap().contiguous().unwrap();
        assert!(cuda_refuses(&head, &wb).unwrap().contains("left operand"));
        // Contiguous, transposed and single-batch-stride layouts are accepted.
        let hc = head.contiguous().unwrap();
        assert!(cuda_refuses(&hc, &wb).is_none());
        assert!(cuda_refuses(&hc, &wb.transpose(1, 2).unwrap().contiguous().unwrap().transpose(1, 2).unwrap()).is_none());
        assert!(cuda_refuses(&w.t().unwrap().contiguous().unwrap().t().unwrap().unsqueeze(0).unwrap(), &w.t().unwrap().unsqueeze(0).unwrap()).is_none());
        // The copy gives the product of the contiguous operands.
        let got = matmul(&head, &wb).unwrap();
        let want = hc.matmul(&wb).unwrap();
        assert_eq!((got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // Strict mode refuses instead (on this thread only: other tests of the crate run
        // products at the same time, and a packed model's CPU weight views are layouts CUDA
        // would refuse).
        LOCAL.with(|l| l.set(true));
        let e = matmul(&head, &wb).unwrap_err().to_string();
        LOCAL.with(|l| l.set(false));
        assert!(e.contains("strict layouts") && e.contains("[8640, 576, 1]"), "{e}");
        // Two batch dimensions without one batch stride.
        let y = Tensor::zeros((4, 3, 5, 6), DType::F32, &d).unwrap().transpose(0, 1).unwrap(); // [3,4,5,6]
        let z = Tensor::zeros((3, 4, 6, 2), DType::F32, &d).unwrap();
        assert!(cuda_refuses(&y, &z).unwrap().contains("batch"));
        assert_eq!(broadcast_matmul(&y, &z).unwrap().dims(), &[3, 4, 5, 2]);
    }

    /// The CPU forward is candle's own gemm call without the zero-fill: bit-identical to
    /// `Tensor::matmul` on plain, transposed, batched, rank-4, sliced (offset), broadcast
    /// (batch stride 0, the fold into one product) and strided-batch layouts, in f32 and f64.
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn cpu_products_equal_candles_bit_for_bit() {
        let d = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &d).unwrap().to_dtype(dt).unwrap();
            let x = r(&[4, 3, 37, 29]);
            let w = r(&[29, 41]);
            let cases: Vec<(Tensor, Tensor)> = vec![
                (x.i((0, 0)).unwrap(), w.clone()),
                (x.i((0, 0)).unwrap(), r(&[41, 29]).t().unwrap()),
                (x.i((0, 0)).unwrap().t().unwrap().contiguous().unwrap().t().unwrap(), w.clone()),
                (x.i(1).unwrap(), r(&[3, 29, 41])),
                (x.clone(), r(&[4, 3, 29, 41])),
                (x.i(2).unwrap().narrow(1, 5, 20).unwrap(), r(&[3, 29, 8])),
                (x.i(1).unwrap(), w.unsqueeze(0).unwrap().broadcast_as((3, 29, 41)).unwrap()),
                (x.transpose(0, 1).unwrap().i(1).unwrap(), r(&[4, 29, 6])),
                (r(&[1, 1, 29]), r(&[1, 29, 1])),
            ];
            for (i, (a, b)) in cases.iter().enumerate() {
                let ours = matmul(a, b).unwrap();
                let theirs = a.matmul(&b.contiguous().unwrap()).unwrap();
                let alt = a.matmul(b);
                assert_eq!(ours.dims(), theirs.dims(), "case {i}");
                let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                assert!(diff < 1e-5, "case {i} ({dt:?}): {diff}");
                if let Ok(alt) = alt {
                    let same = (&ours - &alt).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                    assert_eq!(same, 0.0, "case {i} ({dt:?}): not bit-identical to candle's product on the same layouts");
                }
            }
        }
        // Shapes candle refuses are refused the same way.
        assert!(matmul(&Tensor::zeros((2, 3), DType::F32, &d).unwrap(), &Tensor::zeros((4, 5), DType::F32, &d).unwrap()).is_err());
    }

    /// The one-sided product: same forward bits as candle's, the tracked operand's gradient equal
    /// to candle's, and no gradient at all for the other operand (candle's backward makes one).
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn one_sided_products_take_one_gradient() {
        let d = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (3, 5, 7), &d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (7, 4), &d).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (4, 7), &d).unwrap().t().unwrap(); // a transposed view
        for (w, batched) in [(&w, false), (&wt, false), (&w, true)] {
            let v = candle_core::Var::from_tensor(&x0).unwrap();
            let x = (v.as_tensor() * 2.0).unwrap(); // tracks, through an op
            let (lhs, rhs) = if batched {
                (x.clone(), w.unsqueeze(0).unwrap().broadcast_as((3, 7, 4)).unwrap().contiguous().unwrap())
            } else {
                (x.reshape((15, 7)).unwrap(), w.clone())
            };
            let ours = matmul(&lhs, &rhs).unwrap();
            let theirs = lhs.matmul(&rhs).unwrap();
            assert_eq!((&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let weights = Tensor::randn(0f32, 1.0, ours.shape(), &d).unwrap();
            let g_ours = (&ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (&theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap());
            assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
            assert!(g_theirs.get(&rhs).is_some(), "candle's matmul backward makes the weight's gradient");
            assert!(g_ours.get(&rhs).is_none(), "the one-sided product must not");
        }
        // The right operand tracked: its gradient alone, equal to candle's.
        let v = candle_core::Var::from_tensor(&w).unwrap();
        let x = x0.reshape((15, 7)).unwrap();
        let ours = matmul(&x, v.as_tensor()).unwrap();
        let theirs = x.matmul(v.as_tensor()).unwrap();
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap());
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-4);
        assert!(g_ours.get(&x).is_none());
        // Neither tracked: no graph. Both tracked: both gradients.
        assert!(!matmul(&x, &w).unwrap().track_op());
        let u = candle_core::Var::from_tensor(&x0.i(0).unwrap()).unwrap(); // [5, 7]
        let g = matmul(u.as_tensor(), v.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(u.as_tensor()).is_some() && g.get(v.as_tensor()).is_some());
    }
}
