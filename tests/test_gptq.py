"""GPTQ int4: the grid MatMulNBits reads, error spreading, and what it buys on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_llama.config.export import ExportConfig
from fed_llama.config.loader import build_config
from fed_llama.errors import ConfigError
from fed_llama.export.gptq import Quantized, _grid, gptq, output_error, pack, unpack


def _rtn(weight: torch.Tensor, block: int) -> Quantized:
    """Round-to-nearest on the same per-block grid GPTQ chooses (no error spreading)."""
    n, k = weight.shape
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    zeros = np.zeros((n, k // block), np.uint8)
    for b in range(k // block):
        w = weight[:, b * block:(b + 1) * block].double()
        scale, zero = _grid(w, 4)
        codes[:, b * block:(b + 1) * block] = torch.clamp(
            torch.round(w / scale[:, None]) + zero[:, None], 0, 15).numpy()
        scales[:, b], zeros[:, b] = scale.numpy(), zero.numpy()
    return Quantized(codes, scales, zeros, block)


def test_the_packed_layout_is_what_onnxruntime_matmulnbits_computes_with() -> None:
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))  # 3 blocks: odd count
    q = gptq(w, torch.eye(96))
    b, scales, zp = pack(q)
    assert b.shape == (8, 3, 16) and zp.shape == (8, 2)
    round_trip = unpack(b, scales, zp)
    assert np.array_equal(round_trip.codes, q.codes)
    assert np.array_equal(round_trip.zeros, q.zeros)

    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft",
                            K=96, N=8, bits=4, block_size=32)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales.reshape(-1), "s"),
         numpy_helper.from_array(zp.reshape(-1), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(1).standard_normal((2, 96)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ q.dequantize().T, rtol=1e-4, atol=1e-4)


def test_with_uncorrelated_inputs_gptq_is_round_to_nearest_on_its_grid() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q = gptq(w, torch.eye(64))  # diagonal Hessian: no error to spread to other columns
    rtn = _rtn(w, 32)
    assert np.array_equal(q.codes, rtn.codes)
    np.testing.assert_allclose(q.scales, rtn.scales, rtol=1e-6)
    assert q.codes.max() <= 15 and q.zeros.max() <= 15


def test_on_correlated_inputs_gptq_moves_the_outputs_less_than_rounding() -> None:
    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ mix  # strongly correlated features
    h = 2 * x.T.double() @ x.double() / len(x)
    w = torch.randn(32, 64, generator=gen)
    q, rtn = gptq(w, h), _rtn(w, 32)
    # what GPTQ minimizes: the change of the layer's outputs on the calibration inputs
    e_gptq = output_error(w.numpy(), q, h.numpy())
    e_rtn = output_error(w.numpy(), rtn, h.numpy())
    assert e_gptq < 0.7 * e_rtn
    y = x @ w.T
    assert ((x @ torch.from_numpy(q.dequantize()).T - y).pow(2).mean()
            < (x @ torch.from_numpy(rtn.dequantize()).T - y).pow(2).mean())


def test_gptq_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError) as err:
        build_config(ExportConfig, {"quant": "int8", "algorithm": "gptq",
                                    "calibration_records": 0}, source="profile.toml")
    text = str(err.value)
    assert "algorithm = 'gptq' is calibrated int4" in text
    assert "calibration_records must be at least 1" in text
    with pytest.raises(ConfigError, match="runtime_adapters keeps the adapter unmerged"):
        build_config(ExportConfig, {"quant": "int4", "algorithm": "gptq",
                                    "runtime_adapters": True}, source="profile.toml")
