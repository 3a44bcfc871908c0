//! `ndarray` interop: tensors and caches as `ndarray` arrays, for linfa, ndarray-stats and the
//! plotting crates that take them.
//!
//! [`with_view`] lends a zero-copy [`ArrayViewD`] of a CPU f32 tensor, strided layouts
//! (transposes, slices) included; other dtypes and devices are converted first (a copy).
//! [`to_array`] / [`to_array_f64`] copy into an owned array; [`from_array`] goes back to a
//! tensor. Score grids have their own zero-copy view (`ferrolens_methods::ScoreGrid::array`).

use crate::cache::ActivationCache;
use crate::error::{Error, Result};
use crate::hook::HookPoint;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use ndarray::{ArrayD, ArrayViewD, IxDyn, ShapeBuilder};

/// Call `f` with an `ndarray` view of `t` (same shape). Zero-copy when `t` is an f32 tensor on
/// the CPU, whatever its strides; otherwise `t` is first converted to CPU f32 (a copy).
///
/// ```
/// # use candle_core::{Tensor, Device};
/// use ferrolens_model::ndarray::Axis;
/// // [[0, 1, 2], [3, 4, 5]] transposed: a [3, 2] view with strides [1, 3], no copy.
/// let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap().t().unwrap();
/// let (shape, col0) = ferrolens_model::arrays::with_view(&t, |a| (a.shape().to_vec(), a.index_axis(Axis(1), 0).iter().copied().collect::<Vec<f32>>())).unwrap();
/// assert_eq!((shape, col0), (vec![3, 2], vec![0.0, 1.0, 2.0]));
/// ```
pub fn with_view<R>(t: &Tensor, f: impl FnOnce(ArrayViewD<'_, f32>) -> R) -> Result<R> {
    let owned;
    let t = if t.dtype() == DType::F32 && t.device().is_cpu() {
        t
    } else {
        owned = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        &owned
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(Error::Input("internal: a CPU f32 tensor without CPU f32 storage".into()));
    };
    let shape = IxDyn(layout.dims());
    let strides = IxDyn(layout.stride());
    let view = ArrayViewD::from_shape(shape.strides(strides), &data[layout.start_offset()..])
        .map_err(|e| Error::Input(format!("internal: tensor layout {layout:?} as an ndarray view: {e}")))?;
    Ok(f(view))
}

/// An owned f32 copy of `t` (any dtype or device), shape preserved.
pub fn to_array(t: &Tensor) -> Result<ArrayD<f32>> {
    with_view(t, |v| v.to_owned())
}

/// An owned f64 copy of `t` (any dtype or device), shape preserved.
pub fn to_array_f64(t: &Tensor) -> Result<ArrayD<f64>> {
    with_view(t, |v| v.mapv(f64::from))
}

/// A tensor on `device` with the array's shape and values (f32).
pub fn from_array(a: &ArrayViewD<'_, f32>, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = a.iter().copied().collect();
    Ok(Tensor::from_vec(data, a.shape(), device)?)
}

impl ActivationCache {
    /// The activation at `hook` as an owned f32 `ndarray` array (the tensor's shape, e.g.
    /// `[b, p, d_model]` for `hook_resid_pre`).
    pub fn array(&self, hook: HookPoint) -> Result<ArrayD<f32>> {
        to_array(self.get(hook)?)
    }

    /// Call `f` with a zero-copy `ndarray` view of the activation at `hook` (see [`with_view`]).
    pub fn with_view<R>(&self, hook: HookPoint, f: impl FnOnce(ArrayViewD<'_, f32>) -> R) -> Result<R> {
        with_view(self.get(hook)?, f)
    }
}
