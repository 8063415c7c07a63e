"""decafa_fast.ops is split by job (extension loading, Triton import, backend status, the auto table, backend
choice and resolution, the CPU cache, argument checks) beside decafa_fast.settings, autotable and _build; no
import cycle runs through any of them (test_layering), and the public backend API is where it was."""
from __future__ import annotations

from test_layering import PACKAGE, import_graph

CHECKED = {"decafa_fast.ops", "decafa_fast.ops.extension", "decafa_fast.ops.triton_import", "decafa_fast.ops.status",
           "decafa_fast.ops.auto", "decafa_fast.ops.backend", "decafa_fast.ops.cpu_cache",
           "decafa_fast.ops.validation", "decafa_fast.settings", "decafa_fast.autotable", "decafa_fast._build"}


# No import cycle runs through these modules: test_layering's cycle test covers every module of the package.
def test_each_module_does_one_job():
    """The loaders import nothing of the choice, the choice nothing of the loaders' internals beyond status
    (imports anywhere in a module, function-level ones included, as test_layering reads them)."""
    graph = import_graph(PACKAGE)
    assert CHECKED <= set(graph), CHECKED - set(graph)
    edges = {name: {m for m in graph[name] if m.startswith("decafa_fast")} for name in CHECKED}
    assert edges["decafa_fast.settings"] == set()
    assert edges["decafa_fast.ops.extension"] <= {"decafa_fast._C", "decafa_fast._build"}
    assert edges["decafa_fast.ops.triton_import"] <= {"decafa_fast.settings", "decafa_fast.triton",
                                                      "decafa_fast.triton.ops"}
    assert edges["decafa_fast.ops.status"] == {"decafa_fast.ops.extension", "decafa_fast.ops.triton_import",
                                               "decafa_fast._torch_private"}
    assert edges["decafa_fast.ops.auto"] == {"decafa_fast.autotable", "decafa_fast.settings",
                                             "decafa_fast.ops.status"}
    assert edges["decafa_fast.ops.backend"] == {"decafa_fast.settings", "decafa_fast.ops.auto",
                                                "decafa_fast.ops.status"}


def test_the_public_backend_api_is_unchanged():
    from decafa_fast import ops
    from decafa_fast.ops import auto, backend, status

    assert ops.set_backend is backend.set_backend and ops.use_backend is backend.use_backend
    assert ops.backends is status.backends and ops.get_backend is backend.get_backend
    assert ops.resolve is backend.resolve and ops.namespace is backend.namespace
    assert ops.AUTO_CUDA_PREFERENCE is auto.AUTO_CUDA_PREFERENCE and ops.measured_gpus is auto.measured_gpus
    assert ops.BACKENDS == ("auto", "triton", "cuda", "cpp", "reference")
    assert set(ops.backends()) == set(ops.BACKENDS)
