"""oneDNN convolutions for XLA:CPU, called from jitted JAX through the XLA FFI.

`conv2d(x, kernel, strides, padding)` computes what `lax.conv_general_dilated` computes for NHWC
activations and HWIO kernels, forward and backward (a `jax.custom_vjp` over three FFI handlers:
forward, backward-data, backward-weights), with oneDNN's direct convolutions, which need none of the
layout copies XLA:CPU makes for its own weight gradients.

The C++ source (`onednn_conv.cc`) is compiled on first use into a cache directory
(`$PIVOT_JAX_CACHE`, default `~/.cache/pivot_jax`), against the oneDNN of the `cpu` extra
(`pip install -e '.[cpu]'`: the `onednn-cpu-gomp` library and its headers) and the FFI headers that
jaxlib ships. `available()` says whether that worked; where it did not (no compiler, no oneDNN), the
reason is logged once and callers fall back to XLA's convolution.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"forward": "PivotConvForward", "backward_data": "PivotConvBackwardData",
           "backward_weights": "PivotConvBackwardWeights"}


def _onednn_prefix() -> pathlib.Path | None:
    """Where the oneDNN of the `cpu` extra is installed (its wheels put it under sys.prefix)."""
    for prefix in (pathlib.Path(sys.prefix), pathlib.Path(sys.base_prefix)):
        if (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and (prefix / "lib" / "libdnnl.so").exists():
            return prefix
    return None


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("PIVOT_JAX_CACHE", pathlib.Path.home() / ".cache" / "pivot_jax"))


def _build() -> pathlib.Path:
    """Compiles the extension (once per source, jaxlib and oneDNN) and returns the library's path."""
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    prefix = _onednn_prefix()
    if prefix is None:
        raise RuntimeError("oneDNN is not installed (pip install -e '.[cpu]')")
    library = (prefix / "lib" / "libdnnl.so").resolve()
    fingerprint = hashlib.sha256(
        SOURCE.read_bytes() + jaxlib.__version__.encode() + str(library).encode() + compiler.encode()
    ).hexdigest()[:16]
    target = cache_dir() / "ops" / f"onednn_conv-{fingerprint}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
                   f"-I{prefix / 'include'}", str(SOURCE), f"-L{prefix / 'lib'}", "-ldnnl",
                   f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {result.stderr.strip()[-500:]}")
        built.replace(target)  # atomic: processes building at once each install a whole library
    return target


@functools.cache
def available() -> bool:
    """Whether the oneDNN convolutions are built and registered with XLA:CPU (logs why not, once)."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (RuntimeError, OSError) as error:
        logging.warning("oneDNN convolutions unavailable, using XLA's: %s", error)
        return False
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"pivot_conv_{name}", jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True


@functools.cache
def bfloat16_supported() -> bool:
    """Whether oneDNN has bfloat16 convolutions on this CPU (it needs AVX512-BF16, AMX or AVX2-VNNI-2;
    plain AVX2 has none): one 1x1 convolution is tried, evaluated now even when called while tracing."""
    if not available():
        return False
    try:
        # Outside any mesh the caller traces under (the train step's), on the default device.
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), jax.ensure_compile_time_eval():
            ones = jnp.ones((1, 1, 1, 1), jnp.bfloat16)
            jax.block_until_ready(_forward_call(ones, ones, (1, 1), ((0, 0), (0, 0))))
    except jax.errors.JaxRuntimeError as error:
        logging.info("oneDNN has no bfloat16 convolution on this CPU; bfloat16 ones use XLA's (%s)",
                     str(error).strip().splitlines()[0][:200])
        return False
    return True


def _pads(x_shape, kernel_shape, strides, padding) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding))
    return tuple(tuple(p) for p in padding)


def _attrs(strides, pads) -> dict:
    (top, bottom), (left, right) = pads
    return {"stride_h": np.int64(strides[0]), "stride_w": np.int64(strides[1]), "pad_top": np.int64(top),
            "pad_bottom": np.int64(bottom), "pad_left": np.int64(left), "pad_right": np.int64(right)}


def _call(name: str, out_shape, dtype, a, b, attrs):
    return jax.ffi.ffi_call(f"pivot_conv_{name}", jax.ShapeDtypeStruct(out_shape, dtype))(a, b, **attrs)


def _forward_call(x, kernel, strides, pads):
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    (top, bottom), (left, right) = pads
    out_shape = (n, (h + top + bottom - kh) // strides[0] + 1, (w + left + right - kw) // strides[1] + 1, o)
    return _call("forward", out_shape, x.dtype, x, kernel, _attrs(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
    call = lambda x, kernel: _forward_call(x, kernel, strides, pads)
    return _per_shard(call, (True, False), True)(x, kernel)


def _conv_forward(x, kernel, strides, pads):
    return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_backward(strides, pads, residuals, dy):
    x, kernel = residuals
    attrs = _attrs(strides, pads)
    backward_data = lambda dy, kernel: _call("backward_data", dy.shape[:1] + x.shape[1:], x.dtype, dy, kernel, attrs)
    backward_weights = lambda x, dy: _call("backward_weights", kernel.shape, kernel.dtype, x, dy, attrs)
    dx = _per_shard(backward_data, (True, False), True)(dy, kernel)
    dkernel = _per_shard(backward_weights, (True, True), False, reduce_over_batch=True)(x, dy)
    return dx, dkernel


_conv.defvjp(_conv_forward, _conv_backward)


def conv2d(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding="SAME") -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO",
    "NHWC"))` with oneDNN: x [N, H, W, C], kernel [KH, KW, C, O], float32 or bfloat16 (both the same);
    `padding` is "SAME", "VALID" or ((top, bottom), (left, right))."""
    if not available():
        raise RuntimeError("oneDNN conv2d: the extension is not available (see the warning logged above)")
    if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"oneDNN conv2d: float32 or bfloat16 inputs of one dtype, got {x.dtype} and {kernel.dtype}")
    if x.dtype == jnp.bfloat16 and not bfloat16_supported():
        raise TypeError("oneDNN conv2d: this CPU has no oneDNN bfloat16 convolution (it needs AVX512-BF16, AMX or "
                        "AVX2-VNNI-2); conv_general_dilated uses XLA's for bfloat16 here")
    strides = tuple(int(s) for s in strides)
    return _conv(x, kernel, strides, _pads(x.shape, kernel.shape, strides, padding))


def _data_axis_mesh():
    """The mesh whose `data` axis splits the batch, when the caller traces under one (the train and
    eval steps do, with `jax.sharding.use_abstract_mesh`); None on one device."""
    from pivot_jax.sharding import DATA_AXIS

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
        return None, DATA_AXIS
    return mesh, DATA_AXIS


def _per_shard(fn, in_specs, out_spec, reduce_over_batch=False):
    """`fn` run once per batch shard (XLA cannot split a custom call itself); a result that sums over
    the batch (the weight gradient) is summed over the shards."""
    mesh, axis = _data_axis_mesh()
    if mesh is None:
        return fn
    P = jax.sharding.PartitionSpec
    body = (lambda *args: lax.psum(fn(*args), axis)) if reduce_over_batch else fn
    specs = tuple(P(axis) if batched else P() for batched in in_specs)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(axis) if out_spec else P(),
                         check_vma=False)


_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """A drop-in for `lax.conv_general_dilated` (as `flax.linen.Conv` calls it): oneDNN for the
    convolutions it covers (NHWC/HWIO, no dilation, no groups, float32, and bfloat16 where this CPU has
    it), XLA for the rest."""
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or _NHWC)
    if (dilated or feature_group_count != 1 or kwargs or lhs.ndim != 4 or lhs.dtype != rhs.dtype
            or lhs.dtype not in (jnp.float32, jnp.bfloat16)
            or (lhs.dtype == jnp.bfloat16 and not bfloat16_supported())
            or numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    return conv2d(lhs, rhs, window_strides, padding)
