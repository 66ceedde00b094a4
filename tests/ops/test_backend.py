"""Backend selection: argument > ENGINE_BACKEND_<OP> > ENGINE_BACKEND > auto, with errors that
name where a bad value came from."""

import pytest
import torch

from engine.ops import _gemm
from engine.ops.backend import graph_step, in_graph_step, requested, resolve
from engine.ops.gated_add import gated_add
from engine.ops.linear import linear


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("ENGINE_BACKEND", "ENGINE_BACKEND_LINEAR", "ENGINE_BACKEND_MLP", "ENGINE_BACKEND_GATED_ADD"):
        monkeypatch.delenv(name, raising=False)


def test_precedence(monkeypatch):
    assert requested(None, "linear") == "auto"
    monkeypatch.setenv("ENGINE_BACKEND", "triton")
    assert requested(None, "linear") == "triton"
    monkeypatch.setenv("ENGINE_BACKEND_LINEAR", "cuda")
    assert requested(None, "linear") == "cuda"  # the op's own variable beats the global one
    assert requested(None, "mlp") == "triton"  # and names that op only
    assert requested("eager", "linear") == "eager"  # the argument beats both


def test_bad_names_say_where_they_came_from(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ENGINE_BACKEND_MLP", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast' \\(from ENGINE_BACKEND_MLP\\)"):
        resolve(None, cpu, "mlp")
    monkeypatch.setenv("ENGINE_BACKEND", "quick")
    with pytest.raises(ValueError, match="unknown backend 'quick' \\(from ENGINE_BACKEND\\)"):
        resolve(None, cpu, "linear")
    with pytest.raises(ValueError, match="unknown backend 'rapid' \\(from backend argument\\)"):
        resolve("rapid", cpu, "linear")


def test_one_op_switched_inside_a_model_call(monkeypatch):
    """ENGINE_BACKEND_GATED_ADD reaches gated_add only: asking it for 'cuda' (which gated_add
    lacks) fails there, while the other ops keep the global choice."""
    r, a, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    monkeypatch.setenv("ENGINE_BACKEND", "eager")
    monkeypatch.setenv("ENGINE_BACKEND_GATED_ADD", "cuda")
    with pytest.raises(RuntimeError, match="gated_add: there is no 'cuda' backend"):
        gated_add(r, a, gate)
    torch.testing.assert_close(linear(r, torch.eye(8)), r)  # linear still resolves to eager
    monkeypatch.setenv("ENGINE_BACKEND_GATED_ADD", "eager")
    torch.testing.assert_close(gated_add(r, a, gate), r + a * gate[:, None])


def test_graph_step_changes_the_linear_auto_order(monkeypatch):
    # As if engine._C had cuBLASLt (CI's build has not): the two orders must then differ.
    monkeypatch.setattr(_gemm, "cublaslt_missing", lambda device_type: False)
    assert _gemm.auto_preference("cuda") == ("triton",)
    with graph_step():
        assert in_graph_step()
        with graph_step():
            pass
        assert in_graph_step()  # a nested use leaves the outer one in force
        assert _gemm.auto_preference("cuda") == ("cuda", "triton")
    assert not in_graph_step()
    assert _gemm.auto_preference("cuda") == ("triton",)
    # Without cuBLASLt the graph step's order drops cuda.
    monkeypatch.setattr(_gemm, "cublaslt_missing", lambda device_type: True)
    with graph_step():
        assert _gemm.auto_preference("cuda") == ("triton",)


@pytest.mark.gpu
def test_graph_step_runs_linear_on_cublaslt(monkeypatch):
    monkeypatch.delenv("ENGINE_BACKEND", raising=False)
    monkeypatch.delenv("ENGINE_BACKEND_LINEAR", raising=False)
    if _gemm.cublaslt_missing("cuda"):
        pytest.skip("engine._C built without cuBLASLt")
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(48, 32, device="cuda")
    with graph_step():
        assert resolve(None, x.device, "linear", prefer=_gemm.auto_preference("cuda")) == "cuda"
        torch.testing.assert_close(linear(x, w), (x.double() @ w.double().t()).float(), rtol=2e-2, atol=2e-2)
