"""The private torch APIs decafa_fast uses, all reached through decafa_fast._torch_private, checked against the
running torch.

Checked on torch 2.11 and 2.13 (the versions are _torch_private.CHECKED_ON): on any other torch the version test fails
until these tests have passed there and the version is added. No test here calls decafa_fast's compiled ops:
the behaviour checks define throwaway ops of their own, so on a torch the extension was not built for they run
with `DECAFA_FIRST_USE_BUILD=0` (importing decafa_fast then records the extension as unavailable instead of
compiling it).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from decafa_fast import _torch_private as tp

PACKAGE = Path(__file__).resolve().parents[2] / "decafa_fast"
TORCH_VERSION = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def test_checked_on_this_torch():
    assert TORCH_VERSION in tp.CHECKED_ON, (
        f"decafa_fast._torch_private was checked on torch {', '.join(tp.CHECKED_ON)}, not {TORCH_VERSION}: "
        f"run tests/ops/test_torch_private.py there and add the version to CHECKED_ON")


@pytest.mark.parametrize("dotted", sorted(tp.PRIVATE_APIS))
def test_every_private_api_resolves(dotted):
    """Each name the wrappers reach exists in this torch (the wrappers fall back where one does not)."""
    assert tp.resolve(dotted) is not None, dotted


def test_resolve_says_none_for_a_missing_name():
    assert tp.resolve("torch._library.no_such_module.f") is None
    assert tp.resolve("torch.autograd.no_such_attribute") is None
    assert tp.resolve("torch.autograd.forward_ad.unpack_dual") is torch.autograd.forward_ad.unpack_dual


def _private_names(source: str) -> list[str]:
    """Dotted torch._X names a module mentions (attribute chains and imports)."""
    found = re.findall(r"\btorch\._[A-Za-z]\w*(?:\.\w+)*", source)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "_current_level":
            found.append("forward_ad._current_level")
    return found


def test_the_scan_sees_private_names():
    source = "import torch._library.utils\nx = torch._C._functorch.peek_interpreter_stack()\nfwad._current_level\n"
    assert _private_names(source) == ["torch._library.utils", "torch._C._functorch.peek_interpreter_stack",
                                      "forward_ad._current_level"]
    assert _private_names("torch.library.custom_op(torch.autograd.grad)") == []


def test_no_other_module_calls_a_private_torch_api():
    """Every private call of the package goes through _torch_private (the application included)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch_private.py" or "_sources" in path.parts:
            continue
        names = _private_names(path.read_text())
        if names:
            offenders.append(f"{path.relative_to(PACKAGE)}: {sorted(set(names))}")
    assert not offenders, offenders


def test_in_functorch_transform():
    seen = []

    def f(x):
        seen.append(tp.in_functorch_transform())
        return x.sin().sum()

    f(torch.ones(2))
    torch.func.grad(f)(torch.ones(2))
    torch.func.vmap(lambda x: f(x) * 0 + x)(torch.ones(3, 2))
    assert seen == [False, True, True]


def test_has_tangent():
    import torch.autograd.forward_ad as fwad

    x = torch.ones(2)
    assert not tp.has_tangent([x, None, 1.0])
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.ones(2))
        assert tp.has_tangent([None, dual])
        assert not tp.has_tangent([x])
    assert not tp.has_tangent([x])


def test_has_kernel():
    lib = torch.library.Library("decafa_private_test", "DEF")
    lib.define("cpu_only(Tensor x) -> Tensor")
    lib.impl("cpu_only", lambda x: x.clone(), "CPU")
    assert tp.has_kernel("decafa_private_test::cpu_only", "CPU")
    assert not tp.has_kernel("decafa_private_test::cpu_only", "CUDA")
    assert tp.has_kernel("aten::add.Tensor", "CPU")


def test_is_wrap_triton_enabled_is_a_bool():
    assert tp.is_wrap_triton_enabled() in (True, False)


def _check_autograd_kernel(qualname: str, op, lib_expected: bool) -> None:
    calls = []

    def setup_context(ctx, inputs, output):
        calls.append("setup")

    def backward(ctx, grad):
        calls.append("backward")
        return grad * 3

    made = tp.autograd_kernel(qualname, backward, setup_context)
    assert made is not None
    kernel, lib, is_custom_op = made
    assert callable(kernel) and is_custom_op is lib_expected and (lib is not None) is lib_expected
    namespace, name = qualname.split("::")
    own = lib or torch.library.Library(namespace, "FRAGMENT")
    for key in (("AutogradCPU",) if lib_expected else ("Autograd",)):
        own.impl(name, kernel, key, with_keyset=True)
    x = torch.ones(2, requires_grad=True)
    op(x).sum().backward()
    assert calls == ["setup", "backward"]
    assert torch.equal(x.grad, torch.full((2,), 3.0))
    return own


def test_autograd_kernel_of_an_op_defined_from_a_schema():
    lib = torch.library.Library("decafa_private_test2", "DEF")
    lib.define("double(Tensor x) -> Tensor")
    lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
    keep = _check_autograd_kernel("decafa_private_test2::double", torch.ops.decafa_private_test2.double, False)
    assert keep is not None and lib is not None


def test_autograd_kernel_of_a_custom_op():
    """torch.library.custom_op: the backward goes on the op, and its own library (CustomOpDef._lib) is returned."""

    @torch.library.custom_op("decafa_private_test3::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    _check_autograd_kernel("decafa_private_test3::double", double, True)
