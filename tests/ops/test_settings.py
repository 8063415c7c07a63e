"""Settings from the environment and from files (decafa_fast/settings.py, the auto table): a value that is not
allowed gives one line naming the variable (or file), the value and what is allowed, and the default is used;
nothing aborts, nothing wraps, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from decafa_fast import autotable, settings

MIB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees every warning (the module warns once per message per process)."""
    monkeypatch.setattr(settings, "_warned", set())


def _read(monkeypatch, name: str, value: str | None, reader):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = reader()
    return result, [str(w.message) for w in caught if issubclass(w.category, settings.SettingWarning)]


@pytest.mark.parametrize("value", ["abc", "1.5", "1e3", " ", "-1", str(2**64 - 1), "99999999999999999999999",
                                   str(2**44), "0x10", "12MB", "½"])
def test_a_bad_cache_size_warns_once_and_keeps_the_default(monkeypatch, value):
    mb, messages = _read(monkeypatch, "DECAFA_CPU_CACHE_MB", value, settings.cpu_cache_mb)
    assert mb == settings.CPU_CACHE_MB_DEFAULT
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert messages[0].startswith(f"DECAFA_CPU_CACHE_MB={value!r} is not allowed")
    assert f"from 0 to {2**44 - 1}" in messages[0] and "using the default 1024" in messages[0]
    _, again = _read(monkeypatch, "DECAFA_CPU_CACHE_MB", value, settings.cpu_cache_mb)
    assert again == []  # once per value


@pytest.mark.parametrize("value, mb", [(None, 1024), ("", 1024), ("0", 0), ("12", 12), (" 12 ", 12),
                                       (str(2**44 - 1), 2**44 - 1)])
def test_good_cache_sizes(monkeypatch, value, mb):
    assert _read(monkeypatch, "DECAFA_CPU_CACHE_MB", value, settings.cpu_cache_mb) == (mb, [])
    assert mb * MIB <= settings.SIZE_MAX  # the largest allowed value still fits the C++ size_t


def test_backend_names(monkeypatch):
    assert _read(monkeypatch, "DECAFA_BACKEND", None, settings.backend) == ("auto", [])
    assert _read(monkeypatch, "DECAFA_BACKEND", " CPP ", settings.backend) == ("cpp", [])
    name, messages = _read(monkeypatch, "DECAFA_BACKEND", "numba", settings.backend)
    assert name == "auto"
    assert messages == ["DECAFA_BACKEND='numba' is not allowed (one of auto, triton, cuda, cpp, reference); "
                        "using 'auto'"]


@pytest.mark.parametrize("name, reader, default", [("DECAFA_FIRST_USE_BUILD", settings.first_use_build, True),
                                                   ("DECAFA_BUILD_VERBOSE", settings.build_verbose, False)])
def test_flags(monkeypatch, name, reader, default):
    for value, expected in (("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False),
                            ("off", False), (None, default), ("", default)):
        assert _read(monkeypatch, name, value, reader) == (expected, []), value
    result, messages = _read(monkeypatch, name, "maybe", reader)
    assert result is default and len(messages) == 1 and messages[0].startswith(f"{name}='maybe' is not allowed")


def test_force_cuda_is_always_never_or_detection(monkeypatch):
    for value, expected in (("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False),
                            (" off ", False), (None, None), ("", None)):
        assert _read(monkeypatch, "FORCE_CUDA", value, settings.force_cuda) == (expected, []), value
    result, messages = _read(monkeypatch, "FORCE_CUDA", "maybe", settings.force_cuda)
    assert result is None
    assert messages == ["FORCE_CUDA='maybe' is not allowed (1 or 0 (true/false, yes/no, on/off)); using detection"]


def test_cuda_runs(monkeypatch):
    assert _read(monkeypatch, "DECAFA_CUDA_RUNS", None, settings.cuda_runs) == (None, [])
    assert _read(monkeypatch, "DECAFA_CUDA_RUNS", "8", settings.cuda_runs) == (8, [])
    for bad in ("0", "-3", "1.5", "12abc", str(2**31)):
        runs, messages = _read(monkeypatch, "DECAFA_CUDA_RUNS", bad, settings.cuda_runs)
        assert runs is None and len(messages) == 1 and "from 1 to 2147483647" in messages[0], bad


def test_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name, reader, default in (("DECAFA_AUTO_TABLE", settings.auto_table_path, "auto_table.json"),
                                  ("DECAFA_EXTENSIONS_DIR", settings.extensions_dir, "extensions")):
        assert _read(monkeypatch, name, "", reader) == (tmp_path / "decafa_fast" / default, [])
        assert _read(monkeypatch, name, str(tmp_path / "x"), reader) == (tmp_path / "x", [])


# --------------------------------------------------------------------------------------------------
# The auto table: a file that cannot be a table is skipped with one line naming it
# --------------------------------------------------------------------------------------------------
def test_deep_and_undecodable_tables_are_refused_naming_the_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    nearly = tmp_path / "nearly.json"  # parses, but an entry is nested deep: the message stays short
    entry = {"op": "fuse", "pass": "fwd", "dtype": "float32", "batch": 8, "backend": [[[[[[["cuda"]]]]]]]}
    nearly.write_text(json.dumps({"format": 1, "devices": {"G": {"entries": [entry]}}}))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"format": 1, "devices": {"\xff\xfe\x00": 1}}')
    for path, reason in ((deep, "nested too deep"), (binary, "not UTF-8 text"), (nearly, "bad entry"),
                         (tmp_path, "not a file")):
        with pytest.raises(ValueError) as info:
            autotable.read_table(path)
        message = str(info.value)
        assert message.startswith(str(path)) and reason in message and "\n" not in message and len(message) < 300
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autotable.load_index([deep, binary]) == {}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and str(deep) in messages[0] and str(binary) in messages[1], messages


# --------------------------------------------------------------------------------------------------
# At import, in a fresh process: one line on stderr, no traceback, the default in force
# --------------------------------------------------------------------------------------------------
def _import_ops(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", "import decafa_fast.ops as ops\n" + code], env=env,
                          capture_output=True, text=True, timeout=300)


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_bad_values_at_import_give_one_line_each(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    proc = _import_ops({"DECAFA_CPU_CACHE_MB": "abc", "DECAFA_BACKEND": "cuda-please",
                        "DECAFA_AUTO_TABLE": str(deep)},
                       "print(ops.get_backend(), ops.cpu_cache.limit() if ops.backends()['cpp'] == 'available' "
                       "else 1024 << 20)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["auto", str(1024 << 20)]
    lines = _warning_lines(proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 3, proc.stderr
    assert any("DECAFA_CPU_CACHE_MB='abc' is not allowed" in line for line in lines)
    assert any("DECAFA_BACKEND='cuda-please' is not allowed" in line for line in lines)
    assert any(str(deep) in line and "nested too deep" in line for line in lines)


@pytest.mark.parametrize("value", [str(2**44), "1e3"])
def test_a_bad_cache_size_at_import_neither_aborts_nor_wraps(value):
    """Once a signal 6 at the first op (a C++ exception thrown through ctypes), or a limit of 0 (2**44 MiB
    wrapped in a size_t)."""
    from decafa_fast import ops

    if ops.backends()["cpp"] != "available":
        pytest.skip("the C++ extension is not built")
    proc = _import_ops({"DECAFA_CPU_CACHE_MB": value},
                       "import torch\nops.spatial_softmax(torch.randn(2, 98, 64, 64))\nprint(ops.cpu_cache.limit())")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(1024 << 20)]
    (line,) = _warning_lines(proc.stderr)
    assert f"DECAFA_CPU_CACHE_MB={value!r} is not allowed" in line
